"""Pseudo-labels: read ensemble candidates and select the clips a training run may use.

Candidates (``raysc pseudo-label``) are an ensemble's probabilities on unlabelled development
clips: ``filename`` + one column per class (+ optional ``weight``). Selection is per run, because
it depends on the run's validation fold (clips of validation sessions never train) and on its
sampled threshold and weight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError

log = logging.getLogger(__name__)


def read_candidates(path: str | Path, manifest: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """A candidates CSV, checked: its columns, that every clip is an unlabelled development clip
    of this data folder, and that each row is a probability distribution."""
    path = Path(path)
    if not path.is_file():
        raise DataError([f"{path}: no such file"], what="pseudo-label candidates")
    table = pd.read_csv(path)
    missing = [c for c in ["filename", *classes] if c not in table.columns]
    if missing:
        raise DataError([f"{path}: missing column(s) {missing}"], what="pseudo-labels")
    subset = manifest.set_index("filename")["subset"].reindex(table["filename"])
    problems = [
        f"{path}:{i + 2}: {name!r} is not an unlabelled development clip"
        for i, (name, s) in enumerate(zip(table["filename"], subset, strict=True))
        if s != "unlabelled"
    ]
    probs = table[classes].to_numpy(np.float64)
    bad = ~np.isfinite(probs).all(1) | (probs < 0).any(1) | (np.abs(probs.sum(1) - 1) > 1e-3)
    problems += [
        f"{path}:{i + 2}: probabilities are not a distribution (sum {probs[i].sum():.4f})" for i in np.flatnonzero(bad)
    ]
    if table["filename"].duplicated().any():
        twice = sorted(table.loc[table["filename"].duplicated(), "filename"])
        problems.append(f"{path}: clip(s) listed twice: {twice}")
    if problems:
        raise DataError(problems, what="pseudo-labels")
    return table


@dataclass(frozen=True)
class Selection:
    """How candidates become training targets.

    Attributes:
        threshold: the minimum confidence (top probability) a clip needs.
        weight: the loss weight of a pseudo-labelled clip relative to a labelled one.
        adaptive: per-class thresholds: ``threshold`` times the class's mean confidence over
            the highest class mean.
        balance: keep at most as many clips per class as the rarest kept class has.
        targets: ``hard`` (one-hot of the top class) or ``soft`` (the probabilities).
        confidence_weight: multiply each clip's weight by its confidence (RM3).
    """

    threshold: float = 0.0
    weight: float = 1.0
    adaptive: bool = False
    balance: bool = False
    targets: str = "hard"
    confidence_weight: bool = False


def select(
    candidates: pd.DataFrame, classes: list[str], sel: Selection, *, exclude: np.ndarray | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(selected, summary). ``selected``: filename, one target column per class, weight.
    ``summary``: per class, candidates predicted as it, threshold, kept. ``exclude`` marks
    candidates that must not be used (clips of validation sessions)."""
    probs = candidates[classes].to_numpy(np.float64)
    conf, top = probs.max(1), probs.argmax(1)
    usable = np.ones(len(probs), bool) if exclude is None else ~exclude
    thresholds = np.full(len(classes), sel.threshold)
    if sel.adaptive:
        mean_conf = np.array(
            [conf[usable & (top == c)].mean() if (usable & (top == c)).any() else 0.0 for c in range(len(classes))]
        )
        if mean_conf.max() > 0:
            thresholds = sel.threshold * mean_conf / mean_conf.max()
    keep = usable & (conf >= thresholds[top])
    if sel.balance:
        counts = np.bincount(top[keep], minlength=len(classes))
        cap = counts[counts > 0].min() if (counts > 0).any() else 0
        for c in range(len(classes)):
            idx = np.flatnonzero(keep & (top == c))
            drop = idx[np.argsort(-conf[idx], kind="stable")][cap:]  # the least confident go first
            keep[drop] = False
    targets = np.eye(len(classes))[top] if sel.targets == "hard" else probs
    weight = np.full(len(probs), sel.weight)
    if "weight" in candidates:
        weight *= candidates["weight"].to_numpy(np.float64)
    if sel.confidence_weight:
        weight *= conf
    selected = pd.DataFrame(targets[keep], columns=classes).assign(weight=weight[keep])
    selected.insert(0, "filename", candidates["filename"].to_numpy()[keep])
    summary = pd.DataFrame(
        {
            "class": classes,
            "candidates": np.bincount(top[usable], minlength=len(classes)),
            "threshold": thresholds,
            "kept": np.bincount(top[keep], minlength=len(classes)),
        }
    )
    return selected, summary
