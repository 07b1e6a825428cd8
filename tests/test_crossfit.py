"""Cross-fitting: the best trials retrained once per fold, an ensemble chosen out of fold."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from conftest import FRONTEND

from raysc.config import make_config
from raysc.crossfit import (
    BLEND_MARGIN,
    backbones_in_turn,
    crossfit_ensemble,
    crossfit_pseudo_round,
    crossfit_repeats,
    run_key,
)
from raysc.datafolder import load_dataset
from raysc.ensemble import apply_temperature, build_ensemble
from raysc.errors import ConfigError, RayscError
from raysc.experiment import OUT_OF_FOLD, Experiment, TrialRecord, final_ensemble
from raysc.fileio import write_json
from raysc.inference import member_seconds, predict_clips, predict_ensemble
from raysc.metrics import macro_accuracy, objective, unk_columns
from raysc.pseudo_labels import Selection
from raysc.train import fit

pytestmark = pytest.mark.slow


def _trial(exp: Experiment, data, trial_id: str, backbone: str = "stats", **values) -> None:
    """A finished round-0 trial, as a search leaves it: its run folder and its record."""
    model = {"frontend": FRONTEND} | ({"width": 0.125} if backbone != "stats" else {})
    cfg = make_config({"backbone": backbone, "model": model, "epochs": 2, "batch_size": 16, **values})
    out = exp.trial_dir(0, trial_id)
    result = fit(cfg, data.out, out_dir=out)
    best = result.best
    record = TrialRecord(
        trial_id, 0, "completed", backbone, {}, 2, best["epoch"], {"macro_accuracy": best["macro_accuracy"]},
        1, 1, 1.0, None, 0.1, 0, exp.relative(out / "model.pt"), exp.relative(out / "val_predictions.csv"),
    )  # fmt: skip
    exp.write_record(record)


def _together(dev: pd.DataFrame, fold_of: pd.Series) -> set[tuple[str, str]]:
    """The pairs of development sessions in one fold."""
    fold = dict(zip(dev["session"], fold_of[dev["filename"]], strict=True))
    return {(a, b) for a in fold for b in fold if a < b and fold[a] == fold[b]}


def test_crossfitted_ensembles_are_chosen_out_of_fold_on_every_labelled_clip(local_ray, prepared, tmp_path):
    exp = Experiment(tmp_path / "exp")
    write_json(exp.search_settings(0), {"data": str(prepared.out)})
    _trial(exp, prepared, "aaaa0000", lr=3e-3)
    _trial(exp, prepared, "bbbb1111", lr=1e-2, weight_decay=1e-2)
    # A trial trained on pseudo-labels is not cross-fitted (its teacher saw the other folds).
    m = prepared.manifest
    unl = m[m["subset"] == "unlabelled"]
    cands = pd.DataFrame(np.full((len(unl), 10), 0.1), columns=prepared.classes).assign(filename=unl["filename"].values)
    cands.to_csv(tmp_path / "cands.csv", index=False)
    _trial(exp, prepared, "cccc2222", lr=3e-3, pseudo_labels=str(tmp_path / "cands.csv"))
    single = build_ensemble(exp.root, k=2)

    address = local_ray.get_runtime_context().gcs_address
    plain, smoothed = crossfit_ensemble(exp.root, candidates=3, k=2, address=address)

    labelled = m[m["subset"] == "labelled"]
    folds = sorted(labelled["fold"].unique())
    weight = prepared.unseen_weight()
    assert not (exp.root / "crossfit" / "cccc2222").exists()
    for trial_id in ("aaaa0000", "bbbb1111"):
        seen = []
        for f in folds:
            run = exp.crossfit_dir(trial_id, f)
            train = json.loads((run / "config.json").read_text())["train"]
            assert train["fold"] == f and train["keep_last"]  # fold f held out, never used to choose
            assert not (run / "checkpoint").exists()  # a finished fold run keeps its model, not its epochs
            names = list(pd.read_csv(run / "val_predictions.csv")["filename"])
            assert set(names) == set(labelled.loc[labelled["fold"] == f, "filename"])
            history = json.loads((run / "metrics.json").read_text())["history"]
            assert (history[0]["train_clips"] < len(m) and len(history) == 2) or len(history) >= 1
            seen += names
        assert sorted(seen) == sorted(labelled["filename"])  # every labelled clip exactly once
    for ens in (plain, smoothed):
        assert ens.fold == OUT_OF_FOLD and ens.metrics["clips"] == len(labelled)
        assert len(ens.metrics["fold_macro_accuracy"]) == len(folds) and ens.metrics["fold_macro_accuracy_std"] >= 0
        assert len(ens.members) == 2 * len(folds) and sum(mb.weight for mb in ens.members) == pytest.approx(1.0)
        assert {mb.trial_id for mb in ens.members} == {"aaaa0000", "bbbb1111"}
        # The objective mixes in the fold models' predictions with the city held out (<unk>).
        unk = ens.metrics["unk_city_macro_accuracy"]
        assert unk is not None
        assert ens.metrics["score"] == pytest.approx(objective(ens.metrics["macro_accuracy"], unk, weight))
    assert smoothed.session_smoothing and not plain.session_smoothing
    # An ensemble predicts with every city withheld (<unk>) as its members do.
    names = list(m.loc[m["subset"] == "eval", "filename"])
    withheld = predict_ensemble(plain, exp.root, names, unknown_city=True, address=address)
    members = sum(
        mb.weight
        * predict_clips(exp.root / mb.model_path, prepared, names, unknown_city=True)[prepared.classes].to_numpy()
        for mb in plain.members
    )
    expected = apply_temperature(members, plain.temperature)
    np.testing.assert_allclose(withheld[prepared.classes].to_numpy(), expected, atol=1e-5)
    as_given = predict_ensemble(plain, exp.root, names, address=address)
    assert not np.allclose(as_given[prepared.classes].to_numpy(), expected, atol=1e-4)
    # The pipeline's inference reserve: one member's task timed twice, the faster kept.
    t0 = time.perf_counter()
    seconds = member_seconds(plain, exp.root, names, address=address)
    assert 0 < seconds <= (time.perf_counter() - t0) / 2
    # Smoothing is scored over whole sessions, as on the eval clips: every development clip of a
    # fold predicted by the fold model that held it out, and one prediction per session.
    dev = m[m["subset"].isin(["labelled", "unlabelled"])]
    for trial_id in ("aaaa0000", "bbbb1111"):
        for f in folds:
            fold_preds = pd.read_csv(exp.crossfit_dir(trial_id, f) / "fold_predictions.csv")
            assert set(fold_preds["filename"]) == set(dev.loc[dev["fold"] == f, "filename"])
    oof = pd.read_csv(exp.ensemble_predictions(smoothed.name)).merge(m[["filename", "session"]], on="filename")
    assert (oof.groupby("session")[prepared.classes].nunique() == 1).all().all()
    # The final model: a cross-fitted ensemble when there is one.
    assert final_ensemble([single, plain, smoothed]).fold == OUT_OF_FOLD
    assert final_ensemble([single]) == single
    # Repeated cross-fitting: the chosen configurations, with their weights, trained again on a
    # redrawn split of the sessions into as many folds; each clip is then predicted out of fold twice.
    bagged, bagged_smoothed = crossfit_repeats(exp.root, plain.name, repeats=2, address=address)
    redrawn = load_dataset(prepared.out, repeat=1).manifest.set_index("filename")["fold"]
    drawn = m.set_index("filename")["fold"]
    dev_names = list(dev["filename"])
    assert sorted(redrawn[dev_names].unique()) == folds
    # Another partition of the sessions, not the same folds renamed: some sessions that shared a
    # fold are apart now.
    assert _together(dev, redrawn) != _together(dev, drawn)
    assert (dev.assign(fold=redrawn[dev_names].values).groupby("session")["fold"].nunique() == 1).all()
    assert (redrawn[drawn.index[m["subset"] == "eval"]] == -1).all()  # eval clips have no fold
    expected = 0.0
    for trial_id in ("aaaa0000", "bbbb1111"):
        seen = []
        for f in folds:
            run = exp.crossfit_dir(run_key(trial_id, 1), f)
            train = json.loads((run / "config.json").read_text())["train"]
            assert train["repeat"] == 1 and train["fold"] == f and train["keep_last"]
            names = list(pd.read_csv(run / "val_predictions.csv")["filename"])
            assert set(names) == set(labelled.loc[redrawn[labelled["filename"]].values == f, "filename"])
            seen += names
        assert sorted(seen) == sorted(labelled["filename"])
        weight_of = sum(mb.weight for mb in plain.members if mb.trial_id == trial_id)
        for key in (trial_id, run_key(trial_id, 1)):
            oof = pd.concat([pd.read_csv(exp.crossfit_dir(key, f) / "val_predictions.csv") for f in folds])
            expected = expected + weight_of / 2 * oof.set_index("filename").loc[labelled["filename"], prepared.classes]
    for ens in (bagged, bagged_smoothed):
        assert ens.metrics["splits"] == 2 and len(ens.members) == 2 * 2 * len(folds)
        assert sum(mb.weight for mb in ens.members) == pytest.approx(1.0)
    assert bagged.name == f"{plain.name}-x2" and bagged_smoothed.name == f"{plain.name}-x2-session"
    got = pd.read_csv(exp.ensemble_predictions(bagged.name)).set_index("filename").loc[labelled["filename"]]
    want = apply_temperature(expected.to_numpy(), bagged.temperature)
    np.testing.assert_allclose(got[prepared.classes].to_numpy(), want, atol=1e-6)
    # More bagging of the same configurations replaces the ensemble of fewer splits; split 0 chose
    # them, so the estimate that can compare splits is the redrawn split's alone.
    assert bagged.refit_of == plain.name and bagged_smoothed.refit_of == smoothed.name
    assert final_ensemble([plain, bagged]) == bagged and final_ensemble([smoothed, bagged_smoothed]) == bagged_smoothed
    columns = {"plain": prepared.classes, "unk": unk_columns(prepared.classes)}
    redrawn_only = {"plain": 0.0, "unk": 0.0}
    for trial_id in ("aaaa0000", "bbbb1111"):
        oof = pd.concat([pd.read_csv(exp.crossfit_dir(run_key(trial_id, 1), f) / "val_predictions.csv") for f in folds])
        weight_of = sum(mb.weight for mb in plain.members if mb.trial_id == trial_id)
        for kind, cols in columns.items():
            part = oof.set_index("filename").loc[labelled["filename"], cols].to_numpy()
            redrawn_only[kind] = redrawn_only[kind] + weight_of * part
    y = labelled["label"].map(prepared.classes.index).to_numpy()
    acc = {k: macro_accuracy(y, v.argmax(1), len(prepared.classes)) for k, v in redrawn_only.items()}
    assert bagged.metrics["redrawn_score"] == pytest.approx(objective(acc["plain"], acc["unk"], weight))
    assert bagged.metrics["clips"] == len(labelled)
    with pytest.raises(ConfigError, match=r"repeats must be >= 2 \(prepare's split and a redrawn one\), got 1"):
        crossfit_repeats(exp.root, plain.name, repeats=1, address=address)
    with pytest.raises(ConfigError, match=r"crossfit-topk2-session: repeats start from a plain cross-fitted"):
        crossfit_repeats(exp.root, smoothed.name, repeats=2, address=address)
    with pytest.raises(ConfigError, match=r"crossfit-topk2-x2: already an ensemble of repeated splits"):
        crossfit_repeats(exp.root, bagged.name, repeats=3, address=address)

    # A pseudo-label round: the same configurations, splits and folds, retrained with the
    # teacher's pseudo-labels for the clips of sessions without a label; it replaces its teacher.
    teacher = bagged
    student = crossfit_pseudo_round(
        exp.root, teacher.name, round=1, selection=Selection(threshold=0.0), address=address
    )
    pool = set(m.loc[(m["subset"] == "unlabelled") & m["session_label"].isna(), "filename"])
    assert pool  # the tiny data has clips of sessions without any label
    assert set(pd.read_csv(exp.pseudo_candidates(teacher.name))["filename"]) == pool
    for mb in student.members:
        run = exp.root / mb.model_path
        train = json.loads(run.with_name("config.json").read_text())["train"]
        source = exp.crossfit_dir(run_key(mb.trial_id, train["repeat"]), train["fold"])
        assert run.parent.parent.name == f"{source.parent.name}-pseudo1" and mb.round == 0  # the trial's round
        assert train["pseudo_labels"] == str(exp.pseudo_candidates(teacher.name))
        before = json.loads((source / "config.json").read_text())["train"]
        assert {k: v for k, v in train.items() if not k.startswith("pseudo_")} == {
            k: v for k, v in before.items() if not k.startswith("pseudo_")
        }
        clips = [
            json.loads((d / "metrics.json").read_text())["history"][0]["train_clips"] for d in (source, run.parent)
        ]
        assert clips[1] > clips[0]  # pseudo-labelled clips added (threshold 0: every pool clip outside the fold)
    assert sum(mb.weight for mb in student.members) == pytest.approx(1.0)
    assert student.refit_of == teacher.name and student.metrics["teacher_saw_folds"]
    assert student.temperature == teacher.temperature and student.session_smoothing == teacher.session_smoothing
    assert len(student.members) == len(teacher.members)
    assert final_ensemble([single, teacher, student]) == student
    with pytest.raises(ConfigError, match="a cross-fitted ensemble is needed as the teacher"):
        crossfit_pseudo_round(exp.root, single.name, address=address)
    # A round that does not fit in the time left: refused by name before it scores or trains.
    with pytest.raises(RayscError, match=r"the pseudo-label round needs about [0-9.]+ min, 0\.0 left"):
        crossfit_pseudo_round(exp.root, student.name, round=2, time_budget_minutes=0.0001, address=address)
    assert not list((exp.root / "crossfit").glob("*-pseudo2"))
    assert not exp.pseudo_candidates(student.name).exists()
    # A budget that holds no candidate's runs: refused by name before anything trains.
    with pytest.raises(RayscError, match=r"no trial's cross-fitting fits in 0\.0 min"):
        crossfit_ensemble(exp.root, candidates=3, k=2, time_budget_minutes=0.0001, address=address)


def _record(trial_id: str, backbone: str, score: float) -> TrialRecord:
    return TrialRecord(
        trial_id, 0, "completed", backbone, {}, 2, 2, {"macro_accuracy": score}, 1, 1, 1.0, None, 0.1, 0, None, None
    )  # fmt: skip


def test_backbones_take_turns_in_the_candidates_each_from_its_best():
    ranked = [_record(f"h{i}", "aisfx", 0.9 - i / 100) for i in range(4)] + [_record("s0", "stats", 0.6)]
    ranked += [_record("s1", "stats", 0.5), _record("m0", "mobileascnet", 0.4)]
    order = [r.trial_id for r in backbones_in_turn(ranked)]
    assert order == ["h0", "s0", "m0", "h1", "s1", "h2", "h3"]
    assert backbones_in_turn([]) == []


def test_a_per_backbone_ensemble_blends_its_backbones_in_equal_shares(local_ray, prepared, tmp_path):
    exp = Experiment(tmp_path / "exp")
    write_json(exp.search_settings(0), {"data": str(prepared.out)})
    _trial(exp, prepared, "aaaa0000", lr=3e-3)
    _trial(exp, prepared, "bbbb1111", lr=1e-2, weight_decay=1e-2)
    _trial(exp, prepared, "cccc2222", backbone="mobileascnet", lr=3e-3)
    address = local_ray.get_runtime_context().gcs_address

    plain, smoothed = crossfit_ensemble(exp.root, candidates=2, k=2, per_backbone=True, address=address)

    # Two candidates, one per backbone, whatever their ranks: the best stats trial and the network.
    stats_best = max(
        (r for r in exp.records() if r.backbone == "stats"), key=lambda r: r.metrics["macro_accuracy"]
    ).trial_id
    assert sorted(p.name for p in (exp.root / "crossfit").iterdir()) == sorted([stats_best, "cccc2222"])
    for ens in (plain, smoothed):
        trials = {m.trial_id: 0.0 for m in ens.members}
        for m in ens.members:
            trials[m.trial_id] += m.weight
        shares = ens.metrics["backbones"]
        assert abs(sum(shares.values()) - 1) < 1e-3 and abs(sum(trials.values()) - 1) < 1e-6
        # Each backbone in the blend holds an equal share; one is left out only when its best
        # out-of-fold score is more than the margin below the other's.
        assert set(shares.values()) == {round(1 / len(shares), 4)}
    scores = {}
    folds = prepared.folds()
    labelled = prepared.rows("labelled")
    for trial_id in (stats_best, "cccc2222"):
        parts = pd.concat([pd.read_csv(exp.crossfit_dir(trial_id, f) / "val_predictions.csv") for f in folds])
        parts = parts.set_index("filename").loc[labelled["filename"]]
        y = prepared.labels(labelled)
        plain_acc = macro_accuracy(y, parts[prepared.classes].to_numpy().argmax(1), len(prepared.classes))
        unk_acc = macro_accuracy(y, parts[unk_columns(prepared.classes)].to_numpy().argmax(1), len(prepared.classes))
        scores[trial_id] = objective(plain_acc, unk_acc, prepared.unseen_weight())
    both = abs(scores[stats_best] - scores["cccc2222"]) <= BLEND_MARGIN
    assert len(plain.metrics["backbones"]) == (2 if both else 1), (scores, plain.metrics["backbones"])
