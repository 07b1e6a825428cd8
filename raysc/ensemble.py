"""Ensembles of search trials: top-k mean or greedy forward selection with replacement (Caruana
et al. 2004) on validation predictions, optional temperature scaling, optional session smoothing.

Every member must have been validated on the same fold: its validation clips are then clips
that no member trained on (labels of other folds, pseudo-labels outside the fold), so the
ensemble's validation score is computed on held-out clips. Members may come from different
backbones and rounds. An ensemble is written to ``EXP/ensembles/NAME/``: ``ensemble.json``
(members, weights, method, temperature, metrics) and ``val_predictions.csv``.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from .datafolder import load_dataset
from .errors import ConfigError, RayscError
from .experiment import Ensemble, Experiment, Member, TrialRecord, score_of
from .metrics import classification_report, confusion_matrix, log_loss, macro_accuracy, unk_columns

log = logging.getLogger(__name__)

METHODS = ("topk", "greedy")


# ---- selection on validation predictions (pure functions: arrays in, indices out)


def top_k(scores: list[float], k: int) -> list[int]:
    """Indices of the ``k`` best scores, best first (ties: the earlier one)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def greedy_selection(probs: list[np.ndarray], y: np.ndarray, *, steps: int) -> list[int]:
    """Forward selection with replacement: at each step add the candidate that makes the running
    mean best (macro accuracy, then log loss); return the best prefix, as indices (repeats are
    weights)."""
    n_classes = probs[0].shape[1]

    def score(p: np.ndarray) -> tuple[float, float]:
        return macro_accuracy(y, p.argmax(1), n_classes), -log_loss(p, y)

    chosen: list[int] = []
    total = np.zeros_like(probs[0])
    best_prefix, best_score = [], (-np.inf, -np.inf)
    for _ in range(steps):
        trial_scores = [score((total + p) / (len(chosen) + 1)) for p in probs]
        pick = max(range(len(probs)), key=lambda i: (trial_scores[i], -i))
        chosen.append(pick)
        total += probs[pick]
        if trial_scores[pick] > best_score:
            best_prefix, best_score = list(chosen), trial_scores[pick]
    return best_prefix


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising the log loss of softmax(log p / T) (grid in log space)."""
    logits = np.log(np.clip(probs, 1e-12, 1.0))
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 400))
    losses = [log_loss(apply_temperature(logits, t, is_logits=True), y) for t in grid]
    return float(grid[int(np.argmin(losses))])


def apply_temperature(p: np.ndarray, t: float, *, is_logits: bool = False) -> np.ndarray:
    z = (p if is_logits else np.log(np.clip(p, 1e-12, 1.0))) / t
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def smooth_sessions(probs: np.ndarray, sessions: np.ndarray) -> np.ndarray:
    """Every clip gets the mean prediction of its recording session (clips sharing a city and a
    record time were recorded together, so they share a scene)."""
    out = np.empty_like(probs)
    for session in pd.unique(sessions):
        idx = sessions == session
        out[idx] = probs[idx].mean(0)
    return out


# ---- building from an experiment


def candidate_records(exp: Experiment, rounds: list[int] | None) -> list[TrialRecord]:
    """The trials an ensemble may take: finished, with validation predictions, of one fold."""
    records = [r for r in exp.records() if r.status != "failed" and r.predictions_path]
    if rounds is not None:
        records = [r for r in records if r.round in rounds]
    if not records:
        where = f" in round(s) {rounds}" if rounds is not None else ""
        raise RayscError(f"{exp.root}: no finished trial{where} to ensemble (run `raysc search` first)")
    folds = sorted({r.fold for r in records})
    if len(folds) > 1:
        raise RayscError(
            f"{exp.root}: trials validate on folds {folds}; no clip is held out from all of them. "
            "Ensemble the trials of one fold (--rounds)"
        )
    return records


def build_ensemble(
    experiment: str | Path,
    *,
    name: str | None = None,
    method: str = "topk",
    k: int = 5,
    rounds: list[int] | None = None,
    temperature: bool = False,
    session_smoothing: bool = False,
) -> Ensemble:
    """Select members among the experiment's trials and score the ensemble on validation.

    Saved in ``ensembles/NAME/`` with its validation predictions.

    Args:
        experiment: an experiment folder with finished trials of one validation fold.
        name: the ensemble's name (None: ``METHODk-rROUNDS``, ``-session`` when smoothed).
        method: ``topk`` (the k best trials, equal weights) or ``greedy`` (Caruana's forward
            selection with repeats, on validation).
        k: members for ``topk``; selection steps (members with repeats) for ``greedy``.
        rounds: take trials of these rounds only (None: every round).
        temperature: fit the temperature T of softmax(log p / T) on validation (log loss).
        session_smoothing: give clips of one recording session their mean probabilities.

    Returns:
        The saved ensemble, with its validation metrics.

    Raises:
        ConfigError: an unknown method or a k below 1.
        RayscError: no finished trial, trials of several folds, or predictions that lack
            validation clips.
    """
    if method not in METHODS:
        raise ConfigError(f"ensemble method {method!r} (valid: {', '.join(METHODS)})")
    if k < 1:
        raise ConfigError(f"ensemble size k must be >= 1, got {k}")
    exp = Experiment.existing(experiment)
    records = candidate_records(exp, rounds)
    data_dir = exp.read_search_settings(records[0].round)["data"]
    fold = records[0].fold
    data = load_dataset(data_dir)
    _, val = data.split(fold)
    classes = data.classes
    y = data.labels(val)
    probs, unk = [], []
    for r in records:
        path = exp.root / r.predictions_path
        p = pd.read_csv(path).set_index("filename")
        missing = set(val["filename"]) - set(p.index)
        if missing:
            raise RayscError(f"{path}: lacks {len(missing)} validation clip(s) of fold {fold}")
        probs.append(p.loc[val["filename"], classes].to_numpy(np.float64))
        # Trials run before the city-held-out score existed have no <unk> columns.
        has_unk = unk_columns(classes)[0] in p.columns
        unk.append(p.loc[val["filename"], unk_columns(classes)].to_numpy(np.float64) if has_unk else None)
    if method == "topk":
        picks = top_k([max(score_of(r.metrics), 0.0) for r in records], k)
    else:
        picks = greedy_selection(probs, y, steps=k)
    counts = Counter(picks)
    total = sum(counts.values())
    members = tuple(
        Member(records[i].trial_id, records[i].round, records[i].backbone, records[i].model_path, c / total)
        for i, c in sorted(counts.items(), key=lambda ic: (-ic[1], ic[0]))
    )
    mean = sum(probs[i] * c for i, c in counts.items()) / total
    t = fit_temperature(mean, y) if temperature else 1.0
    final = apply_temperature(mean, t) if t != 1.0 else mean
    final_unk = None
    if all(unk[i] is not None for i in counts):  # the same temperature and smoothing
        final_unk = sum(unk[i] * c for i, c in counts.items()) / total
        final_unk = apply_temperature(final_unk, t) if t != 1.0 else final_unk
    if session_smoothing:
        final = smooth_sessions(final, val["session"].to_numpy())
        final_unk = None if final_unk is None else smooth_sessions(final_unk, val["session"].to_numpy())
    report = classification_report(
        final,
        y,
        classes=classes,
        cities=val["city"].to_numpy(),
        seen=val["seen"].to_numpy(),
        unk_probs=final_unk,
        unseen_weight=data.unseen_weight(exp.train_config(records[0]).get("unseen_weight")),
    )
    report["confusion"] = confusion_matrix(y, final.argmax(1), len(classes)).tolist()
    rounds_used = sorted({m.round for m in members})
    name = name or f"{method}{k}-r{'-'.join(map(str, rounds_used))}" + ("-session" if session_smoothing else "")
    ens = Ensemble(name, method, members, fold, data_dir, t, session_smoothing, report)
    preds = pd.DataFrame(final, columns=classes)
    preds.insert(0, "filename", val["filename"].to_numpy())
    exp.save_ensemble(ens, preds)
    log.info("ensemble %s: %d member(s), validation macro accuracy %.4f", name, len(members), report["macro_accuracy"])
    return ens
