"""The pipeline end to end on tiny synthetic data, killed and resumed; pseudo-labels never come
from validation sessions; the submission is valid."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pandas as pd
import pytest
import yaml
from conftest import write_space

from raysc.errors import ConfigError
from raysc.experiment import OUT_OF_FOLD
from raysc.pipeline import load_pipeline
from raysc.submission import check_submission_file


def test_pipeline_file_errors(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("rounds: 2\ntrails: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['trails'\] \(valid: .*trials"):
        load_pipeline(bad)
    bad.write_text("rounds: 0\n")
    with pytest.raises(
        ConfigError, match=r"rounds, trials, ensemble_k and ddp_workers must be integers >= 1, got \{'rou"
    ):
        load_pipeline(bad)
    bad.write_text("ddp_workers: 0.5\n")
    with pytest.raises(ConfigError, match=r"must be integers >= 1, got .*'ddp_workers': 0\.5"):
        load_pipeline(bad)
    bad.write_text("repeats: 0\n")
    with pytest.raises(ConfigError, match=r"repeats must be an integer >= 1 \(1: prepare's split only\), got 0"):
        load_pipeline(bad)
    bad.write_text("eval_session_labels: flase\n")
    with pytest.raises(ConfigError, match=r"true or false expected, got \{'eval_session_labels': 'flase'\}"):
        load_pipeline(bad)
    bad.write_text("pseudo_targets: fuzzy\n")
    with pytest.raises(ConfigError, match=r"pseudo_targets hard or soft, got 0\.7 and 'fuzzy'"):
        load_pipeline(bad)
    with pytest.raises(ConfigError, match=r"search space 'all_backbonez': not a .yaml file nor one of \[.*'demo'"):
        load_pipeline(None).__class__(space="all_backbonez").space_path()


def test_a_pipeline_started_before_a_setting_existed_resumes_and_a_changed_setting_is_refused(tmp_path):
    import dataclasses

    from raysc.errors import RayscError
    from raysc.experiment import Experiment
    from raysc.fileio import write_json
    from raysc.pipeline import PipelineConfig
    from raysc.pipeline.state import PipelineState

    exp = Experiment(tmp_path / "exp")
    exp.root.mkdir()
    defaults = dataclasses.asdict(PipelineConfig())
    settings = {**defaults, "space": "space.yaml", "data": "data", "time_budget_minutes": 30.0}
    older = {k: v for k, v in settings.items() if k not in ("eval_session_labels", "time_budget_minutes")}
    write_json(exp.pipeline_state, {"settings": older, "done": {"search-0": {"trials": 2, "best": "a"}}})
    defaults = {**defaults, "time_budget_minutes": 30.0}
    assert PipelineState(exp, settings, defaults).done == {"search-0": {"trials": 2, "best": "a"}}  # no change
    with pytest.raises(RayscError, match=r"other settings \(eval_session_labels: was True, now False\)"):
        PipelineState(exp, {**settings, "eval_session_labels": False}, defaults)
    with pytest.raises(RayscError, match=r"other settings \(trials: was 16, now 8\); continue it with its own"):
        PipelineState(exp, {**settings, "trials": 8}, defaults)
    # The budget is a setting: a finished 30-minute pipeline resumed without one is refused.
    with pytest.raises(RayscError, match=r"\(time_budget_minutes: was 30\.0, now None\)"):
        PipelineState(exp, {**settings, "time_budget_minutes": None}, defaults)


@pytest.mark.slow
def test_pipeline_runs_end_to_end_and_resumes_after_a_kill(prepared, tmp_path):
    # Tiny models are unsure: thresholds low enough that round 1 surely keeps pseudo-labels.
    space = write_space(
        tmp_path / "space.yaml",
        scheduler={"grace_steps": 1, "reduction_factor": 2, "max_epochs": 1},
        rounds={"pseudo_threshold": {"type": "float", "low": 0.0, "high": 0.1}},
    )
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text(yaml.safe_dump({"space": str(space), "rounds": 2, "trials": 2, "ensemble_k": 2}))
    exp = tmp_path / "exp"
    args = [
        sys.executable,
        "-m",
        "raysc.cli",
        "pipeline",
        str(pipe),
        "--data",
        str(prepared.out),
        "--experiment",
        str(exp),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = (tmp_path / "first.out").open("w")
    first = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    state = exp / "pipeline.json"
    deadline = time.time() + 400
    while time.time() < deadline and "ensemble-0" not in (
        json.loads(state.read_text())["done"] if state.exists() else {}
    ):
        assert first.poll() is None, (tmp_path / "first.out").read_text()
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    round0 = sorted(p.name for p in (exp / "round-0" / "trials").iterdir())
    time.sleep(2)
    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[pipeline] search-0: done before, kept" in again.stdout
    assert "[pipeline] ensemble-0: done before, kept" in again.stdout
    done = json.loads(state.read_text())["done"]
    order = ["search-0", "ensemble-0", "pseudo-0", "search-1", "ensemble-1", "refit", "submit", "plots"]
    assert json.loads(state.read_text())["order"] == order and set(done) == set(order)
    assert sorted(p.name for p in (exp / "round-0" / "trials").iterdir()) == round0  # round 0 was not rerun
    # Pseudo-label candidates: unlabelled clips outside the validation fold only, all of them.
    m = prepared.manifest
    assert not os.path.isabs(done["pseudo-0"])  # relative to the experiment: a moved one still works
    cands = pd.read_csv(exp / done["pseudo-0"])
    assert set(cands["filename"]) == set(m.query("subset == 'unlabelled' and fold != 0")["filename"])
    # Round 1 trained on them: its trials saw more clips than round 0's.
    r1 = [json.loads(p.read_text()) for p in (exp / "round-1" / "trials").glob("*/metrics.json")]
    r0 = [json.loads(p.read_text()) for p in (exp / "round-0" / "trials").glob("*/metrics.json")]
    assert min(h["history"][0]["train_clips"] for h in r1) > max(h["history"][0]["train_clips"] for h in r0)
    # The submission comes from the chosen ensemble's members retrained on every labelled clip.
    info = json.loads((exp / "submission" / "submission_info.json").read_text())
    assert info["ensemble"] == done["refit"] and done["refit"].endswith("-refit")
    for member in info["members"]:
        refit = json.loads((exp / member["model_path"]).with_name("metrics.json").read_text())
        trial = json.loads((exp / f"round-{member['round']}/trials/{member['trial_id']}/metrics.json").read_text())
        assert refit["history"][0]["train_clips"] > trial["history"][0]["train_clips"]
        assert "refit" in member["model_path"] and refit["best"] == {}  # no validation: it trained on every fold
    # The submission is valid, with its probabilities and info.
    sub = exp / "submission" / "submission.csv"
    check_submission_file(sub, prepared.out)
    info = json.loads((exp / "submission" / "submission_info.json").read_text())
    assert info["members"] and info["versions"]["ray"].startswith("2.60")
    # Eval clips recorded in a labelled development session carry its label.
    scene = m[m["subset"] == "labelled"].groupby("session")["label"].first()
    ev = m[m["subset"] == "eval"].merge(pd.read_csv(sub)[["filename", "scene_label"]], on="filename")
    known = ev["session"].map(scene)
    assert info["session_labels"] == {"on": True, "clips": int(known.notna().sum())} and known.notna().any()
    assert (ev.loc[known.notna(), "scene_label"] == known.dropna()).all()
    assert len(pd.read_csv(exp / "submission" / "submission_probabilities.csv")) == (m["subset"] == "eval").sum()
    # Plots and the leaderboard (printed at the end): trials of both rounds and the ensembles.
    for name in ("confusion_matrix", "per_city_accuracy", "learning_curves", "search_history"):
        assert (exp / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert again.stdout.count("| trial |") == 4 and "| ensemble |" in again.stdout
    assert "-session" in again.stdout  # the session-smoothed variant has its own row

    # The tools people already have: TensorBoard finds every trial's curves under the experiment,
    # and optuna-dashboard's storage loader reads each round's study from its journal.
    import optuna
    from optuna_dashboard._storage_url import get_storage
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    runs = EventMultiplexer().AddRunsFromDirectory(str(exp)).Runs()
    for r in (0, 1):
        for trial in (exp / f"round-{r}" / "trials").iterdir():
            assert any(run.startswith(f"round-{r}/trials/{trial.name}/") for run in runs), (trial, runs)
        study = optuna.load_study(study_name=f"round-{r}", storage=get_storage(str(exp / f"round-{r}/study.journal")))
        assert len(study.trials) == 2 and all(t.state.is_finished() for t in study.trials)

    # A copied experiment folder resumes in its new place: every stage kept, its files reported there.
    from raysc.pipeline import run_pipeline

    moved = tmp_path / "moved"
    shutil.copytree(exp, moved)
    shutil.rmtree(exp)
    lines = []
    result = run_pipeline(load_pipeline(pipe), data=prepared.out, experiment=moved, progress=lines.append)
    assert lines == [
        "[pipeline] trunks skipped: no member of the space uses a pretrained trunk",
        "[pipeline] plan skipped: no --time-budget: every backbone of the space at its own epochs",
        "[pipeline] pretrain skipped: the pipeline file has no pretrain section",
        *(f"[pipeline] {name}: done before, kept" for name in order),
    ], lines
    assert result.submission == moved / "submission" / "submission.csv" and result.submission.is_file()
    assert all(p.parent == moved / "plots" and p.is_file() for p in result.plots)


@pytest.mark.slow
def test_a_wheel_installed_pipeline_whose_budget_runs_out_in_round_one_still_ends_with_a_submission(
    wheel, prepared_with_aisfx, tmp_path
):
    prepared = prepared_with_aisfx  # the trunk's embedding cached, as after a first run
    from raysc.experiment import Experiment, final_ensemble
    from raysc.leaderboard import leaderboard

    # `raysc pipeline` as a user runs it from a wheel install (outside the checkout, so the
    # shipped default space comes from the wheel), on a CPU-only machine, on tiny data. 50 trials
    # cannot fit in 2 minutes on 2 CPUs: the real clock cuts the search; then cross-fitting, a
    # second split of it (`repeats: 2`: more splits would only fill the budget, at a minute of this
    # test's time), and a pseudo-label round of the fold models, if what the budget leaves holds it.
    settings = tmp_path / "pipeline.yaml"
    settings.write_text(
        yaml.safe_dump({"space": "default", "rounds": 2, "trials": 50, "ensemble_k": 2, "repeats": 2, "pretrain": {}})
    )
    exp = tmp_path / "exp"
    cmd = [sys.executable, "-m", "raysc.cli", "pipeline", str(settings), "--data", str(prepared.out)]
    cmd += ["--experiment", str(exp), "--time-budget", "2"]
    t0 = time.perf_counter()
    done = subprocess.run(
        cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(wheel[1])}, capture_output=True, text=True, timeout=600
    )
    minutes = (time.perf_counter() - t0) / 60
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    lines = done.stdout.splitlines()
    assert any("[pipeline] pretrain skipped: " in line and "has no pretraining clips" in line for line in lines)
    assert any("the cluster has no GPU: each trial runs 1 worker(s) on 1 CPU(s)" in line for line in lines)
    said = "[pipeline] plan: 1 searched round(s) of up to 50 trials (then cross-fitting and 1 pseudo-label round(s)"
    plan = [line for line in lines if line.startswith(said)]
    assert plan and "2 trial(s) at once" in plan[0] and any(line.lstrip().startswith("stats ") for line in lines)
    # The default's trunk member: its embedding of every clip computed before the plan timed it.
    trunk = [line for line in lines if line.startswith("[pipeline] trunks: aisfx: ") and " clips in " in line]
    assert trunk and lines.index(trunk[0]) < lines.index(plan[0]), out
    assert any(line.lstrip().startswith("aisfx ") for line in lines), out
    check_submission_file(exp / "submission" / "submission.csv", prepared.out)
    records = Experiment(exp).records()
    assert {r.round for r in records} == {0} and len(records) < 50, out  # the clock ended it
    # The default's backbones (those the plan kept) take turns in the search and share the
    # cross-fitted ensemble equally.
    counts = Counter(r.backbone for r in records)
    assert {"stats", "aisfx"} <= set(counts) and max(counts.values()) - min(counts.values()) <= 1, counts
    blend = [line for line in lines if line.startswith("[pipeline] ensemble crossfit-topk2: ")]
    shares = re.search(r"configuration\(s\) \(([^)]*)\)", blend[0]).group(1).split(", ") if blend else []
    assert shares and len({share.split()[1] for share in shares}) == 1, out
    # The final model: the cross-fitted ensemble, its fold models retrained with its pseudo-labels
    # when the budget left time for that; otherwise the pipeline said why it skipped the round.
    final = final_ensemble(Experiment(exp).ensembles())
    assert final.fold == OUT_OF_FOLD and {m.round for m in final.members} == {0}, out
    if final.name.endswith("-pseudo1"):
        assert final.refit_of and all("-pseudo1/" in m.model_path for m in final.members)
    else:
        skipped = [line for line in lines if line.startswith("[pipeline] pseudo-label round 1 skipped: ")]
        assert skipped and re.search(r"needs about \d+\.\d min, \d+\.\d left$", skipped[0]), out
    # Repeated cross-fitting after it, up to its 2 splits unless the clock stopped it first.
    repeats = [line for line in lines if line.startswith("[pipeline] repeats: ")]
    assert repeats and re.search(r"\d split\(s\); stopped: (split 2 and the pseudo|it reached 2 splits)", repeats[0]), (
        out
    )
    # Its inference reserve from a cross-fitted member timed on the eval clips, before the splits.
    timed = [line for line in lines if line.startswith("[pipeline] inference: one fold model scores the ")]
    assert len(timed) == 1 and lines.index(timed[0]) < lines.index(repeats[0]), out
    board = leaderboard(exp)
    assert (board["kind"] == "trial").sum() == len(records) and (board["kind"] == "ensemble").any()
    assert minutes < 2.0 * 1.5, f"{minutes:.1f} min for a 2-minute budget"  # the budget covers the whole job
