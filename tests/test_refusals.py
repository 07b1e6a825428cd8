"""Bad or unusual inputs to the commands that read and write experiments: each is refused in one
line that names what is wrong, before Ray starts and before anything is written."""

from __future__ import annotations

import errno
from pathlib import Path

import pandas as pd
import pytest

from raysc.cli import main
from raysc.errors import RayscError
from raysc.experiment import Ensemble, Experiment, Member
from raysc.models import create_model, save_model


def _one_line_error(caplog) -> str:
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "Traceback" not in caplog.text
    return errors[0].getMessage()


def test_an_experiment_path_that_is_a_file_is_refused(prepared, tmp_path, caplog):
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    argv = ["pipeline", "--data", str(prepared.out), "--experiment", str(path)]
    assert main(argv) == 2
    assert _one_line_error(caplog) == f"{path} is a file, not an experiment folder: give a folder's path"
    assert path.read_text() == "mine\n"
    caplog.clear()
    assert main(["leaderboard", str(path)]) == 2
    assert "notes.txt is a file, not an experiment folder" in _one_line_error(caplog)


def test_an_experiment_on_a_read_only_file_system_is_refused(prepared, tmp_path, monkeypatch, caplog):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    exp = tmp_path / "ro" / "exp"
    assert main(["pipeline", "--data", str(prepared.out), "--experiment", str(exp)]) == 2
    assert _one_line_error(caplog) == (
        f"{exp}: cannot write the experiment folder there (Read-only file system); an experiment needs a writable "
        "folder: choose another, or copy this one somewhere writable (it resumes there)"
    )


def test_a_missing_experiment_folder_is_said_not_to_exist(tmp_path, caplog):
    missing = tmp_path / "nope"
    for argv in (["leaderboard", str(missing)], ["ensemble", str(missing)], ["submit", str(missing), "--out", "x.csv"]):
        caplog.clear()
        assert main(argv) == 2
        assert _one_line_error(caplog) == (
            f"{missing} does not exist (an experiment folder is made by `raysc search` or `raysc pipeline`)"
        )
    assert not missing.exists()


def test_a_budget_too_small_for_the_pipeline_is_refused_before_anything_runs(prepared, tmp_path, caplog):
    exp = tmp_path / "exp"
    for minutes in ("0.5", "1e-9"):
        caplog.clear()
        assert main(["pipeline", "--data", str(prepared.out), "--experiment", str(exp), "--time-budget", minutes]) == 2
        said = _one_line_error(caplog)
        assert said.startswith(
            f"--time-budget {float(minutes):g} min is below the smallest this pipeline can use, 2 min"
        )
        assert "-0." not in said  # never a negative number of minutes
    assert not exp.exists()


def test_a_cut_short_member_file_is_named_before_ray_starts(prepared, tmp_path, monkeypatch, caplog):
    from raysc import inference

    exp = Experiment(tmp_path / "exp")
    model = create_model("stats", classes=prepared.classes, cities=prepared.cities)
    good, cut = exp.root / "a" / "model.pt", exp.root / "b" / "model.pt"
    for path in (good, cut):
        path.parent.mkdir(parents=True)
        save_model(model, path)
    cut.write_bytes(cut.read_bytes()[:200])  # a copy that stopped short
    members = tuple(Member(t, 0, "stats", f"{t}/model.pt", 0.5) for t in ("a", "b"))
    ens = Ensemble("round0-topk2", "topk", members, 0, str(prepared.out), 1.0, False, {"macro_accuracy": 0.5})
    exp.save_ensemble(ens, pd.DataFrame({"filename": ["x.wav"]}))

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started before the members' files were checked")

    monkeypatch.setattr(inference, "init_ray", no_ray)
    with pytest.raises(RayscError, match=r"ensemble round0-topk2: member b: .*b/model\.pt: not a readable raysc model"):
        inference.predict_ensemble(ens, exp.root, ["x.wav"])
    assert main(["submit", str(exp.root), "--out", str(tmp_path / "sub.csv")]) == 2
    said = _one_line_error(caplog)
    assert said.startswith("ensemble round0-topk2: member b: ") and "\x1b[" not in said  # no colour codes
    assert not (tmp_path / "sub.csv").exists()


def test_a_damaged_checkpoint_behind_rays_tracebacks_is_one_line():
    from raysc.errors import root_cause

    # What Ray Train raises after its restarts: every attempt's traceback, coloured.
    attempt = (
        "\x1b[36mray::RayTrainWorker.run_train_fn()\x1b[39m (pid=4242)\n"
        "Traceback (most recent call last):\n"
        '  File "raysc/train.py", line 358, in load\n'
        "raysc.errors.RayscError: /exp/ray/train-x/checkpoint_000001: the checkpoint to resume from is damaged "
        "(cut short); delete that folder and resume again\n"
    )
    failure = RuntimeError("Training failed.\n" + attempt * 3)
    assert root_cause(failure) == (
        "/exp/ray/train-x/checkpoint_000001: the checkpoint to resume from is damaged (cut short); delete that folder "
        "and resume again"
    )
    assert root_cause(RuntimeError("Worker died.\n\x1b[31mOOM: the node ran out of memory\x1b[0m\n")) == (
        "OOM: the node ran out of memory"
    )


def test_the_pipeline_without_experiment_uses_results_named_after_data_and_pipeline(prepared, tmp_path, monkeypatch):
    from raysc.pipeline import default_experiment

    monkeypatch.chdir(tmp_path)
    assert default_experiment(prepared.out, None) == Path("results") / f"{prepared.out.name}-default"
    assert default_experiment("d/raw-data/", "recipes/fast.yaml") == Path("results/raw-data-fast")
    # The folder is printed first; here the budget is refused before anything is made.
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    assert main(["pipeline", "--data", str(prepared.out), "--time-budget", "0.5"]) == 2
    assert printed == [f"experiment folder: results/{prepared.out.name}-default (give --experiment to choose another)"]
    assert not (tmp_path / "results").exists()


def test_a_data_error_behind_rays_tracebacks_keeps_its_problems_on_one_line():
    from raysc.errors import DataError, root_cause

    error = DataError(["a.csv: gone"])
    worker = f'Traceback (most recent call last):\n  File "x.py", line 1\nraysc.errors.DataError: {error}\n'
    assert root_cause(RuntimeError("Training failed.\n" + worker)) == "1 problem(s) in input data: - a.csv: gone"


def test_a_search_trial_that_failed_says_why_in_its_line(tmp_path):
    from types import SimpleNamespace

    from raysc.live import LiveView

    error = tmp_path / "error.txt"
    error.write_text(
        "Traceback (most recent call last):\n  ...\nraysc.errors.RayscError: /exp/epoch-0003: the checkpoint to resume "
        "from is damaged (cut short); delete that folder and resume again\n"
    )
    lines: list[str] = []
    view = LiveView(total=1, round=0, write=lines.append)
    trial = SimpleNamespace(trial_id="t1", last_result={}, error_file=str(error), config={})
    view.on_trial_error(0, [], trial)
    assert lines[-1].endswith(
        "failed t1 no result: /exp/epoch-0003: the checkpoint to resume from is damaged (cut short); delete that "
        "folder and resume again"
    )
    # A space of one backbone (a recipe's): its trials do not sample it, the status line names it.
    from raysc.experiment import RUNNING_BEST

    view = LiveView(total=1, round=0, write=lines.append, backbone="rm3")
    view.on_trial_result(0, [], SimpleNamespace(trial_id="t2", config={}), {RUNNING_BEST: 0.5})
    assert view.status_line(running=0).endswith("best score 0.5000 (t2, rm3)")


def test_a_trial_killed_for_memory_as_it_starts_ends_the_search_with_what_to_change():
    from raysc.search import out_of_memory

    # Tune's own words when Ray's memory monitor kills a trial's actor in its __init__ (seen with
    # ASCMamba, two trials at once on a 24 GB machine).
    tune_said = RuntimeError(
        "Caught unexpected exception: 1 worker(s) were killed due to the node running low on memory. Memory on the "
        "node (IP: 192.0.2.2, ID: c1ba) was 22.50GB used / 23.54GB limit (0.955999)"
    )
    error = out_of_memory(tune_said, 0)
    assert str(error) == (
        "round 0: Ray killed a trial's worker for lack of memory (22.50GB of 23.54GB used); run fewer trials at once "
        "(--max-concurrent 1) or smaller ones (batch_size, model.width), then continue it (the same `raysc "
        "pipeline` command again, or `raysc search --resume`)"
    )
    assert out_of_memory(RuntimeError("something else"), 0) is None
