"""Cross-fitting: the best configurations trained once per fold, chosen out of fold.

A search scores every trial on one validation fold, about fifty sessions: too few to tell members
at 0.55 and 0.60 apart, and none of its models trains on that fold. Cross-fitting retrains the top
``candidates`` configurations once per fold (that fold held out, as many epochs as the trial's
best epoch, and the last epoch's weights: the held-out fold is only predicted, never used to
choose), in parallel as Ray tasks. Every labelled clip then has one out-of-fold prediction per
configuration, from a model that never saw its session. Ensemble selection (top-k or greedy),
the temperature and session smoothing are scored on those predictions over every labelled clip;
the ensemble's members are the fold models (a configuration's models share its weight), so
between them they train on every label (bagging).

Only configurations trained without pseudo-labels are cross-fitted: a later round's
pseudo-labels come from models that trained on the other folds, so a model of that round
retrained with fold ``f`` held out would learn from a teacher that saw fold ``f``'s labels.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from .config import make_config
from .dataset import load_dataset
from .distributed import fit_many, parallel_slots
from .ensemble import apply_temperature, candidate_records, fit_temperature, greedy_selection, smooth_sessions, top_k
from .errors import ConfigError, RayscError
from .experiment import OUT_OF_FOLD, Ensemble, Experiment, Member, TrialRecord, rank_key
from .metrics import classification_report, confusion_matrix, macro_accuracy

log = logging.getLogger(__name__)


def crossfit_ensemble(
    experiment: str | Path,
    *,
    candidates: int = 10,
    method: str = "topk",
    k: int = 5,
    temperature: bool = True,
    session_smoothing: bool = True,
    cpus: float = 1.0,
    gpus: float = 0.0,
    time_budget_minutes: float | None = None,
    address: str | None = None,
) -> list[Ensemble]:
    """Cross-fit the best ``candidates`` trials (without pseudo-labels), then select ``k`` of
    them on their out-of-fold predictions; returns the ensemble and, with ``session_smoothing``,
    its session-smoothed variant (both saved, each scored out of fold).

    ``time_budget_minutes``: take the candidates in rank order while their runs (estimated from
    each trial's own time for its best epoch's share, with as many runs at once as the cluster
    holds) fit; one that would not fit is passed over for the next."""
    if candidates < 1 or k < 1:
        raise ConfigError(f"candidates and k must be >= 1, got {candidates} and {k}")
    exp = Experiment(experiment)
    records = [r for r in candidate_records(exp, None) if not _config(exp, r).get("pseudo_labels")]
    if not records:
        raise RayscError(f"{exp.root}: no finished trial without pseudo-labels to cross-fit")
    data_dir = exp.read_search_settings(records[0].round)["data"]
    data = load_dataset(data_dir)
    folds = data.folds()
    slots = parallel_slots(cpus, gpus, address) if time_budget_minutes is not None else 1
    top, spent = [], 0.0
    for r in sorted(records, key=rank_key):
        cost = crossfit_minutes(r, len(folds), slots)
        if len(top) < candidates and (time_budget_minutes is None or spent + cost <= time_budget_minutes):
            top.append(r)
            spent += cost
    if not top:
        raise RayscError(f"{exp.root}: no trial's cross-fitting fits in {time_budget_minutes:.1f} min")

    # ---- one run per configuration and fold (a rerun keeps those that finished)
    configs, outs = [], []
    for r in top:
        train = _config(exp, r)
        epochs = max(1, r.best_epoch or train["epochs"])
        for f in folds:
            if not (exp.crossfit_dir(r.trial_id, f) / "model.pt").is_file():
                values = {**train, "fold": f, "epochs": epochs, "keep_last": True}
                configs.append(make_config(values, where=f"cross-fit of {r.trial_id}"))
                outs.append(exp.crossfit_dir(r.trial_id, f))
    if configs:
        log.info("cross-fitting %d configuration(s) x %d folds: %d run(s)", len(top), len(folds), len(configs))
        fit_many(configs, data_dir, outs, cpus=cpus, gpus=gpus, address=address)

    # ---- out-of-fold predictions over every labelled clip, each from the model without its fold
    rows = pd.concat([data.split(f)[1] for f in folds], ignore_index=True)  # with "seen" per fold
    y = data.labels(rows)
    classes = data.classes
    probs = []
    for r in top:
        parts = [pd.read_csv(exp.crossfit_dir(r.trial_id, f) / "val_predictions.csv") for f in folds]
        probs.append(pd.concat(parts).set_index("filename").loc[rows["filename"], classes].to_numpy(np.float64))
    scores = [macro_accuracy(y, p.argmax(1), len(classes)) for p in probs]
    picks = top_k(scores, k) if method == "topk" else greedy_selection(probs, y, steps=k)
    counts = Counter(picks)
    total = sum(counts.values())
    members = tuple(
        Member(r.trial_id, r.round, r.backbone, exp.relative(exp.crossfit_dir(r.trial_id, f) / "model.pt"), w)
        for i, c in sorted(counts.items(), key=lambda ic: (-ic[1], ic[0]))
        for r, w in [(top[i], c / total / len(folds))]
        for f in folds
    )
    mean = sum(probs[i] * c for i, c in counts.items()) / total
    t = fit_temperature(mean, y) if temperature else 1.0
    calibrated = apply_temperature(mean, t) if t != 1.0 else mean

    ensembles = []
    for smooth in (False, True) if session_smoothing else (False,):
        final = smooth_sessions(calibrated, rows["session"].to_numpy()) if smooth else calibrated
        report = classification_report(
            final, y, classes=classes, cities=rows["city"].to_numpy(), seen=rows["seen"].to_numpy()
        )
        report["confusion"] = confusion_matrix(y, final.argmax(1), len(classes)).tolist()
        per_fold = [
            macro_accuracy(y[mask], final[mask].argmax(1), len(classes))
            for mask in (rows["fold"].to_numpy() == f for f in folds)
        ]
        report |= {"fold_macro_accuracy": per_fold, "fold_macro_accuracy_std": float(np.std(per_fold))}
        name = f"crossfit-{method}{k}" + ("-session" if smooth else "")
        ens = Ensemble(name, method, members, OUT_OF_FOLD, data_dir, t, smooth, report)
        preds = pd.DataFrame(final, columns=classes)
        preds.insert(0, "filename", rows["filename"].to_numpy())
        exp.save_ensemble(ens, preds)
        log.info(
            "%s: %d configuration(s) x %d folds, out-of-fold macro accuracy %.4f (+- %.4f over folds)",
            name,
            len(counts),
            len(folds),
            report["macro_accuracy"],
            report["fold_macro_accuracy_std"],
        )
        ensembles.append(ens)
    return ensembles


def crossfit_minutes(r: TrialRecord, folds: int, slots: int = 1) -> float:
    """The estimated time of a trial's cross-fitting: its fit time for its best epoch's share,
    once per fold, over ``slots`` runs at once."""
    share = (r.best_epoch or r.epochs) / max(1, r.epochs)
    return r.fit_seconds * share * folds / max(1, slots) / 60


def _config(exp: Experiment, r: TrialRecord) -> dict:
    return json.loads((exp.root / r.model_path).with_name("config.json").read_text())["train"]
