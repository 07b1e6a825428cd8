"""The `raysc` command line: version, help, synth -> prepare, errors as messages with exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import write_metadata

from raysc import __version__
from raysc.cli import main
from raysc.errors import RayscError
from raysc.metadata import read_manifest
from raysc.synth import DEV_METADATA, EVAL_METADATA


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"raysc {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "synth" in out and "prepare" in out


def test_pipeline_options_override_the_pipeline_file(monkeypatch, caplog):
    import raysc.pipeline

    seen = []

    def fake_run(cfg, **_):
        seen.append(cfg)
        raise RayscError("stopped before anything ran")

    monkeypatch.setattr(raysc.pipeline, "run_pipeline", fake_run)
    base = ["pipeline", "--data", "d", "--experiment", "e"]
    assert main(base) == 2 and "stopped before anything ran" in caplog.text
    assert main([*base, "--seed", "3", "--max-concurrent", "2"]) == 2
    assert (seen[0].seed, seen[0].max_concurrent) == (0, None)
    assert (seen[1].seed, seen[1].max_concurrent) == (3, 2)


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "raysc.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"raysc {__version__}"


def test_synth_then_prepare(tmp_path, capsys):
    raw, data = tmp_path / "raw", tmp_path / "data"
    assert (
        main(
            [
                "synth",
                str(raw),
                "--clips",
                "40",
                "--eval-clips",
                "10",
                "--sample-rate",
                "8000",
                "--clip-seconds",
                "0.5",
                "--cities",
                "3",
                "--unseen-cities",
                "1",
                "--session-size",
                "3",
            ]
        )
        == 0
    )
    assert "wrote 40 dev clips" in capsys.readouterr().out
    rc = main(
        [
            "prepare",
            "--dev-meta",
            str(raw / DEV_METADATA),
            "--eval-meta",
            str(raw / EVAL_METADATA),
            "--audio",
            str(raw / "audio"),
            "--out",
            str(data),
            "--sample-rate",
            "8000",
            "--clip-seconds",
            "0.5",
            "--folds",
            "2",
            "--workers",
            "1",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "prepared 50 clips" in out and "2 folds by session" in out
    assert len(read_manifest(data)) == 50


def test_errors_are_messages_with_exit_code_2(tmp_path, caplog):
    dev = write_metadata(tmp_path / "dev.csv", ["a_1,Jinan,2023-06-21 05:51:23,Bus"])
    rc = main(
        [
            "prepare",
            "--dev-meta",
            str(dev),
            "--eval-meta",
            str(tmp_path / "missing.csv"),
            "--audio",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2
    text = caplog.text
    assert f"{tmp_path / 'missing.csv'}: metadata file not found" in text
    assert f"{dev}:2: no audio file a_1.wav" in text
    assert "Traceback" not in text
    assert main(["synth", str(tmp_path / "s"), "--clips", "3"]) == 2
    assert "need at least 10 dev clips" in caplog.text


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--dev-meta", "x"])
    assert exit_.value.code == 2
    assert "the following arguments are required" in capsys.readouterr().err


def test_models_and_train_argument_errors(tmp_path, caplog):
    assert main(["models", "resnet"]) == 2
    assert "unknown backbone(s) ['resnet'] (valid: aisfx, aisfx_ft, ascmamba" in caplog.text
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 2\n")
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(cfg)]) == 2
    assert "give --backbone NAME or a --config file that sets backbone" in caplog.text
    cfg.write_text("backbone: setrans\nlearning_rate: 0.1\n")
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(cfg)]) == 2
    assert "unknown key 'learning_rate'" in caplog.text and not (tmp_path / "run").exists()


def test_repeats_without_cross_fitting_is_refused(tmp_path, caplog):
    assert main(["ensemble", str(tmp_path / "exp"), "--repeats", "3"]) == 2
    assert "--repeats repeats cross-fitting: give --crossfit N too" in caplog.text
    assert not (tmp_path / "exp").exists()
    assert main(["ensemble", str(tmp_path / "exp"), "--per-backbone"]) == 2
    assert "--per-backbone blends cross-fitted configurations: give --crossfit N too" in caplog.text
    assert not (tmp_path / "exp").exists()


def test_search_errors_exit_2_with_the_message(prepared, tmp_path, caplog):
    code = main(
        [
            "search",
            "search_spaces/mobileascnet.yaml",
            "--data",
            str(prepared.out),
            "--experiment",
            str(tmp_path / "exp"),
            "--round",
            "1",
        ]
    )
    assert code == 2 and "round 1 trains on pseudo-labels: give --pseudo-candidates CSV" in caplog.text
    explicit_rate = tmp_path / "rate.yaml"
    explicit_rate.write_text("fixed: {model.frontend.sample_rate: 44100}\nbackbones: {mobileascnet: {}}\n")
    code = main(["search", str(explicit_rate), "--data", str(prepared.out), "--experiment", str(tmp_path / "exp")])
    assert code == 2 and "front end expects 44100 Hz audio but the data is at 8000 Hz" in caplog.text
    assert not (tmp_path / "exp").exists()


def test_train_checks_its_inputs_and_the_address_before_anything_starts(prepared, tmp_path, caplog):
    import time

    out = tmp_path / "run"
    base = ["train", "--out", str(out), "--backbone", "stats"]
    assert main([*base, "--data", str(tmp_path / "no-such-folder")]) == 2
    assert "no-such-folder: not a prepared data folder" in caplog.text and not out.exists()
    assert main([*base, "--data", str(prepared.out), "--fold", "9"]) == 2
    assert "fold 9 does not exist" in caplog.text and not out.exists()
    assert main([*base, "--data", str(prepared.out), "--set", "freeze=encoder"]) == 2
    assert "freeze: no parameter of stats starts with 'encoder'" in caplog.text and not out.exists()
    assert main([*base, "--data", str(prepared.out), "--set", f"pseudo_labels={tmp_path / 'none.csv'}"]) == 2
    assert "none.csv: no such file" in caplog.text and not out.exists()
    t0 = time.perf_counter()
    assert main([*base, "--data", str(prepared.out), "--address", "127.0.0.1:9"]) == 2
    assert "cannot reach a Ray cluster at 127.0.0.1:9" in caplog.text and not out.exists()
    assert time.perf_counter() - t0 < 60  # a hang guard only


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["prepare", "--dev-meta", "d", "--eval-meta", "e", "--audio", "a", "--out", "o", "--workers", "-1"],
            "argument --workers: -1 must be >= 1",
        ),
        (
            ["prepare", "--dev-meta", "d", "--eval-meta", "e", "--audio", "a", "--out", "o", "--clip-seconds", "nan"],
            "argument --clip-seconds: nan must be > 0",
        ),
        (
            ["prepare", "--dev-meta", "d", "--eval-meta", "e", "--audio", "a", "--out", "o", "--folds", "1"],
            "argument --folds: 1 must be >= 2",
        ),
        (
            ["search", "s.yaml", "--data", "d", "--experiment", "e", "--trials", "two"],
            "argument --trials: 'two' is not an integer",
        ),
        (
            ["pipeline", "--data", "d", "--experiment", "e", "--time-budget", "-5"],
            "argument --time-budget: -5 must be > 0",
        ),
    ],
)
def test_numbers_on_the_command_line_are_checked_by_range(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
