"""The pipeline's stage bookkeeping without Ray: a stage done before is kept, a stage whose inputs
changed is redone with every stage after it, and the submission always follows the final ensemble."""

from __future__ import annotations

import dataclasses
import json
import re
from types import SimpleNamespace

import pandas as pd
import pytest

from raysc.budget import Budget
from raysc.errors import RayscError
from raysc.experiment import Ensemble, Experiment, Member
from raysc.fileio import write_json
from raysc.pipeline import PipelineConfig
from raysc.pipeline import stages as stages_module
from raysc.pipeline.stages import Context, Plots, Refit, Repeats, Search, Submit, execute
from raysc.pipeline.state import PipelineState


def _ensemble(exp: Experiment, name: str, score: float, refit_of: str | None = None) -> None:
    metrics = {"macro_accuracy": score, "score": score}
    ens = Ensemble(name, "topk", (), 0, "data", 1.0, False, metrics, refit_of)
    exp.save_ensemble(ens, pd.DataFrame({"filename": ["a.wav"]}))


def _context(exp: Experiment, lines: list[str]) -> Context:
    cfg = PipelineConfig()
    state = PipelineState(exp, dataclasses.asdict(cfg), dataclasses.asdict(cfg))
    dataset = SimpleNamespace(classes=["a"])
    return Context(cfg, exp, dataset, "data", Budget(None), state, None, lines.append, None, 0)


def test_the_submission_is_redone_when_the_final_ensemble_changes(tmp_path, monkeypatch):
    exp = Experiment(tmp_path / "exp")
    exp.root.mkdir()
    made = []

    def fake_submission(root, out, *, ensemble, session_labels, address):
        made.append(ensemble)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"from {ensemble}\n")
        return SimpleNamespace(csv=out, counts={}, session_labelled=0)

    monkeypatch.setattr(stages_module, "make_submission", fake_submission)
    monkeypatch.setattr(stages_module, "write_plots", lambda root, final, classes: [])
    _ensemble(exp, "round0-topk5", 0.6)
    lines: list[str] = []
    ctx = _context(exp, lines)
    assert execute(ctx, Submit()) == "submission/submission.csv"  # stored relative to the experiment
    execute(ctx, Plots())
    assert execute(ctx, Submit()) == "submission/submission.csv" and made == ["round0-topk5"]
    assert lines[-1] == "[pipeline] submit: done before, kept"

    # A better ensemble appears (a resumed run's later round): the submission and the plots are redone.
    _ensemble(exp, "round1-topk5", 0.7)
    ctx = _context(exp, lines)
    execute(ctx, Submit())
    assert made == ["round0-topk5", "round1-topk5"]
    assert (exp.root / "submission" / "submission.csv").read_text() == "from round1-topk5\n"
    assert any(
        line.startswith("[pipeline] submit: its inputs changed (ensemble: was 'round0-topk5', now 'round1-topk5')")
        and line.endswith("redoing submit, plots")
        for line in lines
    )
    stored = json.loads(exp.pipeline_state.read_text())
    assert stored["inputs"] == {"submit": {"ensemble": "round1-topk5", "session_labels": True}}
    assert "plots" not in stored["done"]  # after the redone stage: forgotten, to be done again


def test_a_done_refit_is_kept_although_it_became_the_final_model(tmp_path, monkeypatch):
    exp = Experiment(tmp_path / "exp")
    exp.root.mkdir()
    _ensemble(exp, "round0-topk5", 0.6)

    def fake_refit(root, final, *, cpus, gpus, workers, address):
        _ensemble(exp, f"{final.name}-refit", 0.6, refit_of=final.name)
        return SimpleNamespace(name=f"{final.name}-refit")

    monkeypatch.setattr(stages_module, "refit_ensemble", fake_refit)
    monkeypatch.setattr(Refit, "skipped", lambda self, ctx: None)
    lines: list[str] = []
    ctx = _context(exp, lines)
    ctx._cluster = ({}, SimpleNamespace(cpus_per_worker=1, gpus_per_worker=0))
    assert execute(ctx, Refit()) == "round0-topk5-refit"
    assert ctx.final().name == "round0-topk5-refit"
    assert execute(_context(exp, lines), Refit()) == "round0-topk5-refit"
    assert lines[-1] == "[pipeline] refit: done before, kept"


def _record(exp: Experiment, trial_id: str, round_: int) -> None:
    folder = exp.root / f"round-{round_}" / "trials" / trial_id
    folder.mkdir(parents=True)
    record = {"trial_id": trial_id, "round": round_, "status": "completed", "backbone": "stats", "params": {}}
    record |= {"epochs": 3, "best_epoch": 3, "metrics": {"macro_accuracy": 0.5}, "parameters": 1, "macs": 1}
    record |= {"fit_seconds": 1.0, "started": None, "predict_seconds": 0.1, "fold": 0}
    (folder / "record.json").write_text(json.dumps(record | {"model_path": None, "predictions_path": None}))


def test_a_run_that_ends_with_most_of_its_budget_left_says_which_caps_ended_it(tmp_path):
    exp = Experiment(tmp_path / "exp")
    exp.root.mkdir()
    for i in range(3):
        _record(exp, f"t{i}", 0)
    members = tuple(Member(f"t{i}", 0, "stats", f"crossfit/t{i}/fold-0/model.pt", 1.0) for i in range(2))
    ens = Ensemble("crossfit-topk5", "topk", members, -1, "data", 1.0, False, {"macro_accuracy": 0.8, "score": 0.8})
    exp.save_ensemble(ens, pd.DataFrame({"filename": ["a.wav"]}))
    lines: list[str] = []
    ctx = dataclasses.replace(_context(exp, lines), cfg=PipelineConfig(trials=3, rounds=2), crossfit=2)
    ctx.outputs = {"crossfit": ["crossfit-topk5"], "pseudo-round-1": "crossfit-topk5-pseudo1"}
    assert stages_module.ended_early(ctx) is None  # no budget: nothing to say
    now = [0.0]
    ctx = dataclasses.replace(ctx, budget=Budget(60.0, clock=lambda: now[0]))
    now[0] = 15 * 60.0  # 15 of 60 minutes used
    said = stages_module.ended_early(ctx)
    assert said == (
        "[pipeline] ended with 45.0 of 60 min unused: round 0 ran all 3 of its trials (`trials`); cross-fitting "
        "took its 2 best configurations (`crossfit`); the 1 pseudo-label round(s) ran (`rounds`). Final "
        "crossfit-topk5: macro accuracy 0.8000 out of fold. A pipeline file with larger `trials`, `crossfit` or "
        "`rounds` spends more of it"
    )
    # No cap reached (the clock ended the search, cross-fitting took fewer): the reserve was unspent.
    ctx = dataclasses.replace(ctx, cfg=PipelineConfig(trials=50, rounds=1), crossfit=10)
    said = stages_module.ended_early(ctx)
    assert "unused: the time kept for inference and the submission was more than they took. Final" in said
    now[0] = 50 * 60.0  # 50 of 60 used: less than a fifth left, nothing to say
    assert stages_module.ended_early(ctx) is None


def _repeats_context(exp: Experiment, lines: list[str], budget: Budget, **cfg) -> Context:
    """A context after cross-fitting: a plain and a smoothed ensemble of one split (0.80 and 0.78)
    of 2 configurations x 5 folds, whose member took 3 s to score the 100 eval clips."""
    members = tuple(
        Member(t, 0, "stats", f"crossfit/{t}/fold-{f}/model.pt", 0.1) for t in ("t0", "t1") for f in range(5)
    )
    for name, score in (("crossfit-topk5", 0.80), ("crossfit-topk5-session", 0.78)):
        ens = Ensemble(name, "topk", members, -1, "data", 1.0, False, {"macro_accuracy": score, "score": score})
        exp.save_ensemble(ens, pd.DataFrame({"filename": ["a.wav"]}))
    _record(exp, "t0", 0)
    dataset = SimpleNamespace(
        classes=["a"],
        split_by="session",
        folds=lambda: [0, 1, 2, 3, 4],
        split=lambda fold: (None, [None] * 40),
        rows=lambda subset: pd.DataFrame({"filename": [f"{subset}-{i}.wav" for i in range(100)]}),
    )
    ctx = dataclasses.replace(_context(exp, lines), cfg=PipelineConfig(**cfg), dataset=dataset, budget=budget)
    ctx._cluster = ({}, SimpleNamespace(cpus_per_worker=1, gpus_per_worker=0))
    ctx.outputs = {"crossfit": ["crossfit-topk5", "crossfit-topk5-session"]}
    ctx._eval_pass_seconds = 3.0
    return ctx


def test_after_cross_fitting_the_inference_reserve_comes_from_a_member_timed_once(tmp_path, monkeypatch):
    exp = Experiment(tmp_path / "exp")
    exp.root.mkdir()
    timed = []

    def fake_member_seconds(ens, root, clips, *, address):
        timed.append((ens.name, len(clips)))
        return 3.0

    monkeypatch.setattr(stages_module, "member_seconds", fake_member_seconds)
    monkeypatch.setattr(stages_module, "parallel_slots", lambda cpus, gpus, address: 2)
    now = [0.0]
    lines: list[str] = []
    ctx = _repeats_context(exp, lines, Budget(60.0, clock=lambda: now[0]))
    ctx._eval_pass_seconds = None
    now[0] = 10 * 60.0  # 10 of 60 minutes used
    # 10 fold models a split, 2 at once, 3 s each on the eval clips, doubled, plus the submission's
    # half minute: 1 split keeps 0.5 + 2 x 3 x 5 / 60 = 1.0 min of the 50 left.
    assert ctx.after_crossfit_minutes(1) == pytest.approx(49.0)
    assert ctx.after_crossfit_minutes(3) == pytest.approx(50 - 0.5 - 2 * 3 * 15 / 60)
    # A pseudo-label round left scores the 100 unlabelled clips too (as many as the eval clips here).
    assert ctx.after_crossfit_minutes(1, pseudo_rounds=1) == pytest.approx(50 - 0.5 - 2 * 6 * 5 / 60)
    assert timed == [("crossfit-topk5", 100)]  # measured once, on the eval clips
    assert [line for line in lines if "inference" in line] == [
        "[pipeline] inference: one fold model scores the 100 eval clips in 3.00 s (measured); "
        "the inference reserve is kept from it"
    ]
    # Before cross-fitting: estimated from the trials' validation inference (the fixed minute,
    # and the estimate for the members scaled to their 5 fold models), nothing timed.
    ctx.outputs = {}
    estimate = ctx.reserve(0)
    assert estimate > 1.0 and ctx.after_crossfit_minutes(1) == pytest.approx(50 - 1 - (estimate - 1) * 5)
    assert len(timed) == 1


def test_repeated_cross_fitting_adds_splits_while_the_estimate_rises_and_says_what_stopped_it(tmp_path, monkeypatch):
    exp = Experiment(tmp_path / "exp")
    exp.root.mkdir()
    # Scores on the redrawn splits: split 2 gives the first, split 3 raises it, split 4 does not;
    # split 5 is never tried.
    redrawn = {2: 0.78, 3: 0.80, 4: 0.795, 5: 0.9}
    asked = []

    def fake_repeats(root, base, *, repeats, temperature, session_smoothing, cpus, gpus, address):
        asked.append((base, repeats))
        metrics = {"macro_accuracy": 0.7, "score": 0.7, "redrawn_score": redrawn[repeats]}
        return [SimpleNamespace(name=f"{base}-x{repeats}", metrics=metrics)]

    monkeypatch.setattr(stages_module, "crossfit_repeats", fake_repeats)
    monkeypatch.setattr(stages_module, "parallel_slots", lambda cpus, gpus, address: 2)
    monkeypatch.setattr(stages_module, "repeat_minutes", lambda root, base, slots: 2.0 / slots)
    now = [10 * 60.0]
    budget = Budget(60.0, clock=lambda: now[0])
    lines: list[str] = []
    ctx = _repeats_context(exp, lines, budget, rounds=1)
    record = execute(ctx, Repeats())
    assert asked == [("crossfit-topk5", 2), ("crossfit-topk5", 3), ("crossfit-topk5", 4)]
    assert record == {
        "splits": 4,
        "ensembles": ["crossfit-topk5-x2", "crossfit-topk5-x3", "crossfit-topk5-x4"],
        "stopped": "split 4 took the score on the redrawn splits from 0.8000 to 0.7950, no higher",
    }
    assert lines[-1] == f"[pipeline] repeats: 4 split(s); stopped: {record['stopped']}"
    ctx.outputs["repeats"] = record
    said = stages_module.ended_early(ctx)
    assert "repeated cross-fitting stopped at 4 split(s): split 4 took the score on the redrawn splits" in said

    # Time: each split takes 20 min over the 2 slots here, and the pseudo-label round after it
    # retrains every fold model of both splits (2 x 20 min): 60 min needed, less left.
    asked.clear()
    monkeypatch.setattr(stages_module, "repeat_minutes", lambda root, base, slots: 40.0 / slots)
    ctx = _repeats_context(Experiment(tmp_path / "exp2"), lines, budget, rounds=2)
    record = execute(ctx, Repeats())
    assert asked == [] and record["splits"] == 1
    assert re.fullmatch(
        r"split 2 and the pseudo-label rounds after it need about 60\.0 min, [0-9.]+ left", record["stopped"]
    )

    # The estimate (1 min a split here) counts epochs only: once a split has taken 10 min, the
    # next is estimated at that, with its pseudo-label round: 10 x (1 + 3) min, more than is left.
    asked.clear()
    monkeypatch.setattr(stages_module, "repeat_minutes", lambda root, base, slots: 2.0 / slots)

    def slow_repeats(*args, **kw):
        now[0] += 10 * 60.0
        return fake_repeats(*args, **kw)

    monkeypatch.setattr(stages_module, "crossfit_repeats", slow_repeats)
    now[0] = 0.0
    ctx = _repeats_context(Experiment(tmp_path / "exp7"), lines, Budget(60.0, clock=lambda: now[0]), rounds=2)
    now[0] = 10 * 60.0  # 10 of 60 minutes used; 20 after split 2
    record = execute(ctx, Repeats())
    assert asked == [("crossfit-topk5", 2)] and record["splits"] == 2
    assert re.fullmatch(
        r"split 3 and the pseudo-label rounds after it need about 40\.0 min, 3[0-9]\.[0-9] left", record["stopped"]
    ), record

    # Without a budget: prepare's split only, unless the pipeline file asks for more.
    ctx = _repeats_context(Experiment(tmp_path / "exp3"), lines, Budget(None))
    assert execute(ctx, Repeats()) is None
    assert lines[-1] == (
        "[pipeline] repeats skipped: no --time-budget and no `repeats` in the pipeline file: prepare's split only"
    )
    ctx = _repeats_context(Experiment(tmp_path / "exp6"), lines, budget, repeats=1)
    assert execute(ctx, Repeats()) is None
    assert lines[-1] == "[pipeline] repeats skipped: the pipeline file sets `repeats: 1`: prepare's split only"
    ctx = _repeats_context(Experiment(tmp_path / "exp4"), lines, Budget(None), repeats=2)
    record = execute(ctx, Repeats())
    assert record["splits"] == 2 and record["stopped"] == "it reached 2 splits, the most it takes (`repeats`)"
    ctx = _repeats_context(Experiment(tmp_path / "exp5"), lines, Budget(None), repeats=2)
    ctx.dataset.split_by = "city"
    assert execute(ctx, Repeats()) is None
    assert lines[-1] == "[pipeline] repeats skipped: data's folds are split by city: there is no other split to draw"


def test_a_round_0_without_a_finished_epoch_says_how_its_trials_ended(tmp_path, monkeypatch):
    exp = Experiment(tmp_path / "exp")
    exp.root.mkdir()
    stopped, broken = SimpleNamespace(status="stopped", error=None), SimpleNamespace(status="failed", error="boom")
    # A trial the round's time limit ended before its first epoch: recorded as failed, without an error.
    cut = SimpleNamespace(status="failed", error=None)
    for ended, how in (
        ([stopped, stopped, broken], "1 failed, 2 stopped before their first epoch ended, of 3"),
        ([cut], "1 ended by the round's time limit before it, of 1"),
    ):
        monkeypatch.setattr(
            stages_module, "search", lambda space, ended=ended, **kw: SimpleNamespace(records=ended, best=None)
        )
        with pytest.raises(RayscError) as raised:
            Search(0).run(_context(exp, []))
        assert str(raised.value) == (
            f"round 0: no trial finished an epoch ({how}); see {exp.trials_dir(0)} and {exp.search_log(0)}"
        )


def test_backbones_take_turns_with_cross_fitting_and_a_resumed_search_keeps_its_own_setting(tmp_path, monkeypatch):
    exp = Experiment(tmp_path / "exp")
    exp.root.mkdir()
    asked = []

    def fake_search(space, **kw):
        asked.append((kw["backbone_turns"], kw["resume"]))
        return SimpleNamespace(records=[], best=SimpleNamespace(trial_id="t0"))

    monkeypatch.setattr(stages_module, "search", fake_search)
    ctx = _context(exp, [])
    Search(0).run(dataclasses.replace(ctx, crossfit=10))  # the default with cross-fitting: turns
    Search(0).run(ctx)  # no cross-fitting, no blend: no turns
    Search(0).run(dataclasses.replace(ctx, crossfit=10, cfg=PipelineConfig(per_backbone=False)))
    # A round-0 search started by a version without turns continues without them.
    write_json(exp.search_settings(0), {"time_budget_minutes": 5.0})
    Search(0).run(dataclasses.replace(ctx, crossfit=10))
    assert asked == [(True, False), (False, False), (False, False), (False, True)]
