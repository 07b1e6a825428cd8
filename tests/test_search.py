"""`raysc search`: Tune + OptunaSearch + ASHA over in-process and Ray Train trials, records, resume, errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import FRONTEND, resources_released, write_space
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from raysc.errors import ConfigError, RayscError
from raysc.experiment import Experiment
from raysc.search import search


def _journal_trials(path: Path) -> dict[int, list[int]]:
    """Optuna journal: trial number -> the states it was told (1 = COMPLETE, 2 = PRUNED, 3 = FAIL)."""
    told: dict[int, list[int]] = {}
    created = 0
    for line in path.read_text().splitlines():
        op = json.loads(line)
        if op["op_code"] == 4:  # CREATE_TRIAL
            told[created] = []
            created += 1
        elif op["op_code"] == 6 and op["state"] not in (0, 4):  # SET_TRIAL_STATE_VALUES, not RUNNING or WAITING
            told[op["trial_id"]].append(op["state"])
    return told


@pytest.fixture(scope="module")
def planted(learnable, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two mobileascnet artefacts that fix the outcome of a trial started from them at a tiny
    learning rate: ``good.pt`` (trained here, asserted clearly above chance) and ``constant.pt``
    (every parameter zero: the features are zero whatever the input, so the logits are the head's
    bias, no weight gets a gradient, and every clip gets the same class; one class predicted
    scores exactly 1 / classes on a macro average)."""
    import torch

    from raysc.config import make_config
    from raysc.models import save_model
    from raysc.train import fit

    cfg = make_config(
        {
            "backbone": "mobileascnet",
            "model": {"width": 0.25, "frontend": FRONTEND},
            "batch_size": 16,
            "lr": 1e-2,
            "epochs": 6,
            "schedule": "constant",
        }
    )
    result = fit(cfg, learnable)
    chance = 1 / sum(a is not None for a in result.best["per_class"].values())  # what one class predicted scores
    assert result.best["macro_accuracy"] >= chance + 0.2, f"the planted good model is too weak: {result.best}"
    out = tmp_path_factory.mktemp("planted")
    save_model(result.model, out / "good.pt", metrics={})
    with torch.no_grad():
        for p in result.model.parameters():
            p.zero_()
    save_model(result.model, out / "constant.pt", metrics={})
    return out / "good.pt", out / "constant.pt"


@pytest.mark.slow
@pytest.mark.parametrize("ray_train", ["auto", "always"])
def test_search_with_asha_stops_and_a_failure_completes_and_releases_everything(
    local_ray, learnable, planted, ray_train, tmp_path
):
    good_pt, constant_pt = planted
    missing = str(tmp_path / "missing.pt")
    # Run one at a time in a known order. The outcome is fixed by construction, not by the
    # numerics of a tiny run: the good trial starts from a trained model (and a learning rate too
    # small to move it) and sets the bar at epoch 1; the constant trials predict one class, so
    # they are below it there; one fails at start-up. In-process trials run a constant one on
    # each side of the failure (the process kept, then a new one). Ray Train trials, which pay
    # Ray Train's start-up each (twice for a failure, retried once), run the good and a constant
    # one: failures under Ray Train are test_distributed's.
    good = {"backbone": "mobileascnet", "lr": 1e-7, "init_from": str(good_pt)}
    bad = {"backbone": "mobileascnet", "lr": 1e-7, "init_from": str(constant_pt)}
    broken = {"backbone": "setrans", "lr": 1e-7, "init_from": missing}
    points = [good, bad, broken, bad] if ray_train == "auto" else [good, bad]
    expected_states = [1, 2, 3, 2] if ray_train == "auto" else [1, 2]  # COMPLETE, PRUNED, FAIL
    space = write_space(
        tmp_path / "s.yaml",
        params={
            "lr": {"type": "categorical", "choices": [1e-7]},
            "init_from": {"type": "categorical", "choices": [str(good_pt), str(constant_pt), missing]},
        },
        # Six epochs: a stopped trial keeps training until the stop reaches it (a fraction of a
        # second, longer under load); it must not reach its last epoch first.
        scheduler={"grace_steps": 1, "reduction_factor": 2, "max_epochs": 6},
        # In-process trials take their points from the space's `start:` section, Ray Train
        # trials from the caller: both reach the sampler as the first trials.
        **({"start": points} if ray_train == "auto" else {}),
    )
    lines = []
    result = search(
        space,
        data=learnable,
        experiment=tmp_path / "exp",
        trials=len(points),
        max_concurrent=1,
        points_to_evaluate=None if ray_train == "auto" else points,
        progress=lines.append,
        ray_train=ray_train,
    )
    by_status = {s: [r for r in result.records if r.status == s] for s in ("completed", "stopped", "failed")}
    assert len(result.records) == len(points)
    assert len(by_status["completed"]) == 1 and by_status["completed"][0].epochs == 6
    assert len(by_status["stopped"]) == points.count(bad) and all(r.epochs < 6 for r in by_status["stopped"])
    failed = points.count(broken)
    assert len(by_status["failed"]) == failed and all("missing.pt" in r.error for r in by_status["failed"])
    assert result.best.trial_id == by_status["completed"][0].trial_id
    # The conditional space: each trial holds its own backbone's parameters, never another's.
    assert {r.backbone for r in result.records} == {p["backbone"] for p in points}
    for r in result.records:
        assert {k for k in r.params if "/" in k} == {f"{r.backbone}/model.dropout"}
    # The experiment folder: a record per trial, models and predictions of every trial that ran.
    exp = tmp_path / "exp"
    table = pd.read_csv(exp / "trials.csv")
    assert sorted(table["trial_id"]) == sorted(r.trial_id for r in result.records)
    assert table["macro_accuracy"].iloc[0] == table["macro_accuracy"].max()
    data_manifest = pd.read_csv(Path(learnable) / "manifest.csv")
    val = set(data_manifest.query("subset == 'labelled' and fold == 0")["filename"])
    for r in by_status["completed"] + by_status["stopped"]:
        preds = pd.read_csv(exp / r.predictions_path)
        assert set(preds["filename"]) == val
        assert (exp / r.model_path).is_file() and r.parameters > 0 and r.macs > 0
        assert r.fit_seconds > 0 and r.predict_seconds > 0
    # Optuna is told what happened: the good trial COMPLETE, the stopped ones PRUNED (not
    # COMPLETE with their early value), the broken one FAIL; in the order they ran.
    told = _journal_trials(exp / "round-0" / "study.journal")
    assert [states[-1] for _, states in sorted(told.items())] == expected_states
    assert (exp / "round-0" / "search.log").stat().st_size > 0
    # In-process trials (one worker) keep their process: the bad trial that follows the good one
    # trains in the same process (the failed trial's process is not kept, so the last may not).
    # Ray Train starts new workers for every trial.
    ran = sorted(by_status["completed"] + by_status["stopped"], key=lambda r: r.started)
    logs = [(exp / r.predictions_path).with_name("train.log").read_text() for r in ran]
    pids = [re.findall(r"trial runs in process (\d+)", text) for text in logs]
    assert all("epoch 1/6" in text for text in logs)  # every trial's training log is complete
    if ray_train == "auto":
        assert all(len(p) == 1 for p in pids) and pids[0] == pids[1], pids
    else:
        assert pids == [[], []] and all("worker 0 of 1 on node" in text for text in logs)
    # The live view: one line per start and end, and a final status line with the best trial.
    assert sum(" start " in line for line in lines) == len(points)
    assert f"best score {result.best.metrics['score']:.4f} ({result.best.trial_id}" in lines[-1]
    stopped = points.count(bad)
    assert f"completed 1, stopped {stopped}, failed {failed} of {len(points)}" in lines[-1]
    assert resources_released()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "raysc.cli", *args]


@pytest.mark.slow
def test_a_killed_search_resumes_without_rerunning_finished_trials(learnable, tmp_path):
    space = write_space(tmp_path / "s.yaml")
    args = ["search", str(space), "--data", str(learnable), "--experiment", str(tmp_path / "exp"), "--trials", "3"]
    args.append("--no-early-stopping")  # every trial runs its 2 epochs, whatever its metrics
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, killed with it
    log = (tmp_path / "first.out").open("w")
    driver = subprocess.Popen(_cli(*args), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 300
    ended = re.compile(r"\] completed ([0-9a-f]{8}) after")
    while time.time() < deadline and not ended.search((tmp_path / "first.out").read_text()):
        assert driver.poll() is None, (tmp_path / "first.out").read_text()
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
    driver.wait()
    first = (tmp_path / "first.out").read_text()
    finished = set(ended.findall(first))
    assert finished, first
    ckpts_before = {t: _files(tmp_path / "exp/round-0/train" / f"train-{t}") for t in finished}
    assert all(ckpts_before.values()), ckpts_before  # every finished trial left its checkpoint
    # Tune rewrites its state files in place; make this kill the worst case, one in the middle of that write.
    (state,) = (tmp_path / "exp/round-0/tune").glob("experiment_state-*.json")
    state.write_text(state.read_text()[:100])
    # The journal is written at once, Tune's state after each step: make sure the study also holds a
    # trial that Optuna handed out but the restored Tune never heard of, where 3 trials leave room.
    (saved,) = (tmp_path / "exp/round-0/tune-state").glob("experiment_state-*.json")
    restored = [json.loads(t) for t, _ in json.loads(saved.read_text())["trial_data"]]  # what the resume puts back
    known = len(restored)
    journal = JournalStorage(JournalFileBackend(str(tmp_path / "exp/round-0/study.journal")))
    study = optuna.load_study(study_name="round-0", storage=journal)
    lost = [t.params for t in study.trials[known:]]  # asked in Tune's order: the first `known` are Tune's
    if known + len(lost) < 3:
        lost.append(study.ask(fixed_distributions=study.trials[0].distributions).params)
    time.sleep(2)
    again = subprocess.run(_cli(*args, "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(rf"cut short by the kill: [^\n]*{re.escape(state.name)}[^\n]*; put back the last", again.stdout)
    assert again.stdout.count("was asked for just before the kill and never started; it is handed out") == len(lost)
    records = Experiment(tmp_path / "exp").records()
    assert len(records) == 3 and all(r.status == "completed" and r.epochs == 2 for r in records)
    ran = [r.params for r in records]
    assert all(p in ran for p in lost), (lost, ran, again.stdout)  # run with the values Optuna had given it
    saved_ended = {t["trial_id"] for t in restored if t["status"] == "TERMINATED"}
    for t in finished:  # never trained again: no checkpoint written or rewritten
        assert _files(tmp_path / "exp/round-0/train" / f"train-{t}") == ckpts_before[t]
        # A trial that ended after Tune's last complete save is RUNNING in the restored state, so
        # Tune starts it again (its Train run finds the final checkpoint); one saved as ended is not.
        assert t not in saved_ended or f"start {t}" not in again.stdout
    told = _journal_trials(tmp_path / "exp" / "round-0" / "study.journal")
    assert len(told) == 3 and all(states == [1] for states in told.values())
    assert len(pd.read_csv(tmp_path / "exp" / "trials.csv")) == 3


def _files(run: Path) -> dict[str, int]:
    """Every file under a trial's training run folder, with its modification time."""
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def test_search_input_errors_stop_before_ray_starts(prepared, tmp_path):
    space = write_space(tmp_path / "s.yaml")
    exp = tmp_path / "exp"
    with pytest.raises(ConfigError, match="round 1 trains on pseudo-labels: give --pseudo-candidates"):
        search(space, data=prepared.out, experiment=exp, round=1)
    with pytest.raises(ConfigError, match=r"fold 7 does not exist .* \(folds: \[0, 1, 2\]\)"):
        search(space, data=prepared.out, experiment=exp, fold=7)
    with pytest.raises(ConfigError, match="--trials must be >= 1, got 0"):
        search(space, data=prepared.out, experiment=exp, trials=0)
    with pytest.raises(ConfigError, match=r"ray_train 'never' \(valid: auto, always\)"):
        search(space, data=prepared.out, experiment=exp, ray_train="never")
    with pytest.raises(RayscError, match="no search to resume"):
        search(space, data=prepared.out, experiment=exp, resume=True)
    (exp / "round-0").mkdir(parents=True)
    (exp / "round-0" / "search.json").write_text(json.dumps({"trials": 8}))
    with pytest.raises(RayscError, match="already holds a search; pass --resume"):
        search(space, data=prepared.out, experiment=exp)
    with pytest.raises(RayscError, match=r"different settings \(.*trials: was 8, now 5") as refused:
        search(space, data=prepared.out, experiment=exp, trials=5, resume=True)
    # A setting the stored search lacks (one a newer raysc added) counts as its default.
    assert "backbone_turns" not in str(refused.value)
    with pytest.raises(RayscError, match=r"backbone_turns: was False, now True"):
        search(space, data=prepared.out, experiment=exp, trials=8, backbone_turns=True, resume=True)
    rate = write_space(tmp_path / "r.yaml", fixed={"model.width": 0.25, "model.frontend.sample_rate": 44100})
    with pytest.raises(RayscError, match="mobileascnet front end expects 44100 Hz audio but the data is at 8000 Hz"):
        search(rate, data=prepared.out, experiment=tmp_path / "exp2")
    bad = tmp_path / "cand.csv"
    pd.DataFrame({"filename": ["nope"], **{c: [0.1] for c in prepared.info["classes"]}}).to_csv(bad, index=False)
    with pytest.raises(RayscError, match=r"cand.csv:2: 'nope' is not an unlabelled development clip"):
        search(space, data=prepared.out, experiment=tmp_path / "exp3", round=1, pseudo_candidates=bad)
    assert not (tmp_path / "exp2").exists() and not (tmp_path / "exp3").exists()


def test_an_experiment_in_use_by_another_process_is_refused_by_name(prepared, tmp_path):
    exp = Experiment(tmp_path / "exp")
    hold = "import sys, time\nfrom raysc.experiment import Experiment\nwith Experiment(sys.argv[1]).in_use():\n"
    hold += "    print('held', flush=True)\n    time.sleep(120)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(exp.root)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        held_by = rf"{re.escape(str(exp.root))} is in use by a Python process \(pid {holder.pid}, since 20\d\d-"
        with pytest.raises(RayscError, match=held_by):
            search(write_space(tmp_path / "s.yaml"), data=prepared.out, experiment=exp.root)
        assert not exp.round_dir(0).exists()  # refused before anything was written
        from raysc.crossfit import crossfit_ensemble

        with pytest.raises(RayscError, match=held_by):
            crossfit_ensemble(exp.root)
    finally:
        holder.kill()
        holder.wait()
    # The holder's end frees the folder (a killed run leaves nothing to clean up); a process may
    # take it again while it holds it (a pipeline runs its searches).
    with exp.in_use(), exp.in_use():
        pass
    with exp.in_use():
        assert f"(pid {os.getpid()}, since" in (exp.root / ".in-use").read_text()
