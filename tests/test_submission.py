"""Submission validation rejects every kind of wrong file; the leaderboard renders and ranks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from raysc.errors import ConfigError, DataError
from raysc.leaderboard import render
from raysc.submission import COLUMNS, apply_session_labels, check_submission_file, validate_submission


@pytest.fixture
def good(prepared):
    m = prepared.manifest
    rows = m[m["subset"] == "eval"]
    expected = pd.DataFrame(
        {"filename": rows["filename"], "location": rows["city"], "record_time": rows["record_time"]}
    ).reset_index(drop=True)
    classes = prepared.info["classes"]
    labels = [classes[i % len(classes)] for i in range(len(expected))]
    return expected, expected.assign(scene_label=labels), classes


def _problems(sub, expected, classes, probs=None) -> str:
    with pytest.raises(DataError) as err:
        validate_submission(sub, expected, classes, probs)
    return str(err.value)


def test_a_valid_submission_passes_and_matches_the_eval_metadata_order(prepared, good, tmp_path):
    expected, sub, classes = good
    validate_submission(sub, expected, classes)
    path = tmp_path / "s.csv"
    sub.to_csv(path, index=False)
    check_submission_file(path, prepared.out)
    raw_eval = pd.read_csv(prepared.out / "manifest.csv").query("subset == 'eval'")
    assert list(sub["filename"]) == list(raw_eval["filename"])


def test_eval_clips_recorded_in_a_labelled_development_session_take_its_label(prepared):
    m, classes = prepared.manifest, prepared.classes
    ev = m[m["subset"] == "eval"].sample(frac=1.0, random_state=0)  # any order of clips
    p = np.random.default_rng(0).dirichlet(np.ones(len(classes)), len(ev))
    probs = pd.DataFrame(p, columns=classes)
    probs.insert(0, "filename", ev["filename"].to_numpy())
    out, hit = apply_session_labels(probs, m, classes)
    labelled = m[m["subset"] == "labelled"]
    assert hit.any() and not hit.all()  # the tiny data has eval sessions of both kinds
    for i, row in enumerate(ev.itertuples()):
        same = labelled[(labelled["city"] == row.city) & (labelled["record_time"] == row.record_time)]
        assert hit[i] == (len(same) > 0)
        if hit[i]:  # the session's scene, certain
            assert out[classes].iloc[i].to_dict() == {c: float(c == same["label"].mode()[0]) for c in classes}
    assert np.array_equal(out.loc[~hit, classes].to_numpy(), p[~hit])  # the others as predicted
    assert list(out["filename"]) == list(ev["filename"])


def test_every_kind_of_wrong_submission_is_rejected(prepared, good, tmp_path):
    expected, sub, classes = good
    assert "columns ['filename', 'scene_label']" in _problems(sub[["filename", "scene_label"]], expected, classes)
    assert "1 eval clip(s) missing" in _problems(sub.iloc[1:], expected, classes)
    dup = pd.concat([sub, sub.iloc[[0]]], ignore_index=True)
    assert "listed more than once" in _problems(dup, expected, classes)
    extra = pd.concat([sub, sub.iloc[[0]].assign(filename="stranger")], ignore_index=True)
    assert "1 clip(s) not in the eval metadata" in _problems(extra, expected, classes)
    assert "not in the eval metadata's order" in _problems(sub.iloc[::-1].reset_index(drop=True), expected, classes)
    moved = sub.copy()
    moved.loc[2, "location"] = "Atlantis"
    assert ":4: location 'Atlantis' differs" in _problems(moved, expected, classes)
    bad = sub.copy()
    bad.loc[0, "scene_label"] = "Beach"
    bad.loc[1, "scene_label"] = np.nan
    text = _problems(bad, expected, classes)
    assert ":2: scene_label 'Beach' is not a class" in text and ":3: scene_label is empty" in text
    probs = pd.DataFrame(np.full((len(sub), len(classes)), 1 / len(classes)), columns=classes)
    probs.iloc[0, 0] = np.nan
    assert "probabilities contain NaN" in _problems(sub, expected, classes, probs)
    uniform = pd.DataFrame(np.eye(len(classes))[[(i + 1) % len(classes) for i in range(len(sub))]], columns=classes)
    assert "disagrees with the highest probability" in _problems(sub, expected, classes, uniform)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + sub.to_csv(index=False).encode())
    with pytest.raises(DataError, match="byte-order mark"):
        check_submission_file(bom, prepared.out)
    assert list(sub.columns) == COLUMNS


def test_leaderboard_renders_csv_markdown_and_a_sortable_page():
    table = pd.DataFrame(
        {
            "rank": [1, 2],
            "name": ["ens", "t1"],
            "kind": ["ensemble", "trial"],
            "macro_accuracy": [0.8, None],
            "parameters": [1234567, 10],
            "fit_seconds": [12.0, 1.5],
        }
    )
    assert render(table, "csv").splitlines()[0] == "rank,name,kind,macro_accuracy,parameters,fit_seconds"
    md = render(table, "md")
    assert "| 1 | ens | ensemble | 0.8000 | 1,234,567 | 12.0 |" in md
    page = render(table, "html", title="board <x>")
    assert page.startswith("<!doctype html>") and "board &lt;x&gt;" in page and "function sortBy" in page
    assert "data-v='null'" in page and f"data-v='{json.dumps(1234567)}'" in page
    with pytest.raises(ConfigError, match="format 'pdf'"):
        render(table, "pdf")


def test_check_submission_command_names_the_problem(prepared, good, tmp_path, capsys, caplog):
    from raysc.cli import main

    _, sub, _ = good
    path = tmp_path / "s.csv"
    sub.to_csv(path, index=False)
    assert main(["check-submission", str(path), "--data", str(prepared.out)]) == 0
    assert "a valid submission" in capsys.readouterr().out
    sub.assign(scene_label="bus").to_csv(path, index=False)
    assert main(["check-submission", str(path), "--data", str(prepared.out)]) == 2
    assert "s.csv:2: scene_label 'bus' is not a class; did you mean 'Bus'? (" in caplog.text
    for name, content, message in (("missing.csv", None, "no such file"), ("empty.csv", b"", "the file is empty")):
        f = tmp_path / name
        if content is not None:
            f.write_bytes(content)
        with pytest.raises(DataError, match=rf"{name}: {message}"):
            check_submission_file(f, prepared.out)


def test_a_model_file_that_does_not_fit_its_network_is_named(tmp_path):
    import torch

    from raysc.errors import RayscError
    from raysc.models import create_model, load_model, save_model

    save_model(create_model("stats", width=0.25), tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["state_dict"]["head.weight"] = torch.zeros(3, 3)
    del payload["weights_sha256"]  # as in a file written before raysc hashed its weights
    torch.save(payload, tmp_path / "shape.pt")
    with pytest.raises(RayscError, match=r"shape.pt: its weights do not fit its stats network"):
        load_model(tmp_path / "shape.pt")
    del payload["state_dict"]
    torch.save(payload, tmp_path / "nostate.pt")
    with pytest.raises(RayscError, match=r"nostate.pt: a raysc model file without \['state_dict'\]"):
        load_model(tmp_path / "nostate.pt")


def test_a_damaged_model_file_is_refused_not_loaded_with_wrong_weights(tmp_path):
    import torch

    from raysc.errors import RayscError
    from raysc.models import create_model, load_model, save_model

    save_model(create_model("stats", width=0.25), tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["state_dict"]["head.weight"][0, 0] = float("nan")  # what a flipped byte in the data does
    torch.save(payload, tmp_path / "flipped.pt")
    with pytest.raises(RayscError, match=r"flipped\.pt: its weights do not match their recorded hash"):
        load_model(tmp_path / "flipped.pt")
    assert load_model(tmp_path / "m.pt").artefact["metrics"] == {}
