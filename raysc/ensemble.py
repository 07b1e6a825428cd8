"""Ensembles of search trials: top-k mean or greedy forward selection with replacement (Caruana
et al. 2004) on validation predictions, optional temperature scaling, optional session smoothing.

Every member must have been validated on the same fold: its validation clips are then clips
that no member trained on (labels of other folds, pseudo-labels outside the fold), so the
ensemble's validation score is computed on held-out clips. Members may come from different
backbones and rounds. An ensemble is written to ``EXP/ensembles/NAME/``: ``ensemble.json``
(members, weights, method, temperature, metrics) and ``val_predictions.csv``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError, RayscError
from .fileio import write_csv, write_json
from .metrics import classification_report, confusion_matrix, log_loss, macro_accuracy
from .search import TrialRecord, read_records

log = logging.getLogger(__name__)

METHODS = ("topk", "greedy")


@dataclass(frozen=True)
class Member:
    trial_id: str
    round: int
    backbone: str
    model_path: str  # relative to the experiment folder
    weight: float


@dataclass(frozen=True)
class Ensemble:
    name: str
    method: str
    members: tuple[Member, ...]
    fold: int
    data: str
    temperature: float
    session_smoothing: bool
    metrics: dict[str, Any]  # validation report of the ensemble's predictions

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ensemble:
        return cls(**{**d, "members": tuple(Member(**m) for m in d["members"])})


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


def _validation(data_dir: str, fold: int) -> tuple[pd.DataFrame, list[str]]:
    """Validation clips of ``fold`` with a ``seen`` column (city among the training folds')."""
    from .train import load_dataset

    data = load_dataset(data_dir)
    m = data.manifest
    lab = m[m["subset"] == "labelled"]
    val = lab[lab["fold"] == fold].copy()
    val["seen"] = val["city_idx"].isin(set(lab.loc[lab["fold"] != fold, "city_idx"]))
    return val, data.classes


def _candidates(exp: Path, rounds: list[int] | None) -> list[TrialRecord]:
    records = [r for r in read_records(exp) if r.status != "failed" and r.predictions_path]
    if rounds is not None:
        records = [r for r in records if r.round in rounds]
    if not records:
        where = f" in round(s) {rounds}" if rounds is not None else ""
        raise RayscError(f"{exp}: no finished trial{where} to ensemble (run `raysc search` first)")
    folds = sorted({r.fold for r in records})
    if len(folds) > 1:
        raise RayscError(f"{exp}: trials validate on folds {folds}; no clip is held out from all of them. "
                         "Ensemble the trials of one fold (--rounds)")  # fmt: skip
    return records


def _search_data(exp: Path, round: int) -> str:
    return json.loads((exp / f"round-{round}" / "search.json").read_text())["data"]


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

    ``k``: members for ``topk``; selection steps (members with repeats) for ``greedy``.
    """
    if method not in METHODS:
        raise ConfigError(f"ensemble method {method!r} (valid: {', '.join(METHODS)})")
    if k < 1:
        raise ConfigError(f"ensemble size k must be >= 1, got {k}")
    exp = Path(experiment)
    records = _candidates(exp, rounds)
    data_dir = _search_data(exp, records[0].round)
    fold = records[0].fold
    val, classes = _validation(data_dir, fold)
    y = val["label"].map(classes.index).to_numpy()
    probs = []
    for r in records:
        p = pd.read_csv(exp / r.predictions_path).set_index("filename")
        missing = set(val["filename"]) - set(p.index)
        if missing:
            raise RayscError(f"{exp / r.predictions_path}: lacks {len(missing)} validation clip(s) of fold {fold}")
        probs.append(p.loc[val["filename"], classes].to_numpy(np.float64))
    if method == "topk":
        picks = top_k([r.metrics["macro_accuracy"] or 0.0 for r in records], k)
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
    if session_smoothing:
        final = smooth_sessions(final, val["session"].to_numpy())
    report = classification_report(final, y, classes=classes, cities=val["city"].to_numpy(),
                                   seen=val["seen"].to_numpy())  # fmt: skip
    report["confusion"] = confusion_matrix(y, final.argmax(1), len(classes)).tolist()
    rounds_used = sorted({m.round for m in members})
    name = name or f"{method}{k}-r{'-'.join(map(str, rounds_used))}" + ("-session" if session_smoothing else "")
    ens = Ensemble(name, method, members, fold, data_dir, t, session_smoothing, report)
    out = exp / "ensembles" / name
    preds = pd.DataFrame(final, columns=classes)
    preds.insert(0, "filename", val["filename"].to_numpy())
    write_csv(out / "val_predictions.csv", preds)
    write_json(out / "ensemble.json", ens.to_dict())
    log.info("ensemble %s: %d member(s), validation macro accuracy %.4f", name, len(members), report["macro_accuracy"])
    return ens


def load_ensemble(experiment: str | Path, name: str | None = None) -> Ensemble:
    """An ensemble by name, or (no name) the one with the best validation macro accuracy."""
    exp = Path(experiment)
    found = {p.parent.name: p for p in (exp / "ensembles").glob("*/ensemble.json")}
    if not found:
        raise RayscError(f"{exp}: no ensemble yet (run `raysc ensemble` first)")
    if name is None:
        ens = [Ensemble.from_dict(json.loads(p.read_text())) for p in found.values()]
        return max(ens, key=lambda e: (e.metrics["macro_accuracy"], e.name))
    if name not in found:
        raise RayscError(f"{exp}: no ensemble {name!r} (have: {', '.join(sorted(found))})")
    return Ensemble.from_dict(json.loads(found[name].read_text()))


def list_ensembles(experiment: str | Path) -> list[Ensemble]:
    paths = sorted(Path(experiment).glob("ensembles/*/ensemble.json"))
    return [Ensemble.from_dict(json.loads(p.read_text())) for p in paths]


# ---- inference on any clips (eval, unlabelled), distributed over Ray


def _predict_chunk(model_path: str, data_dir: str, filenames: list[str]) -> pd.DataFrame:
    import torch

    from .loader import ClipTable
    from .models import load_model
    from .train import load_dataset, predict

    data = load_dataset(data_dir)
    rows = data.manifest.set_index("filename").loc[filenames].reset_index()
    table = ClipTable.from_rows(rows, np.zeros((len(rows), len(data.classes)), np.float32))
    model = load_model(model_path)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return predict(model.to(device), table, data.store, device=device)


def predict_ensemble(
    ens: Ensemble,
    experiment: str | Path,
    filenames: list[str],
    *,
    chunk: int = 2048,
    address: str | None = None,
) -> pd.DataFrame:
    """The ensemble's probabilities for ``filenames`` (clips of its data folder): one Ray task
    per member and chunk of clips, on GPUs when the cluster has them."""
    import ray

    from .distributed import init_ray

    init_ray(address)
    exp = Path(experiment).resolve()
    gpu = 0.25 if ray.cluster_resources().get("GPU") else 0  # inference is light: share a GPU
    task = ray.remote(_predict_chunk).options(num_cpus=1, num_gpus=gpu)
    parts = {m.trial_id: [] for m in ens.members}
    refs = []
    for m in ens.members:
        for start in range(0, len(filenames), chunk):
            refs.append((m.trial_id, task.remote(str(exp / m.model_path), ens.data, filenames[start : start + chunk])))
    for trial_id, ref in refs:
        parts[trial_id].append(ray.get(ref))
    classes = None
    mean = None
    for m in ens.members:
        p = pd.concat(parts[m.trial_id]).set_index("filename").loc[filenames]
        classes = list(p.columns)
        mean = p.to_numpy(np.float64) * m.weight + (0 if mean is None else mean)
    final = apply_temperature(mean, ens.temperature) if ens.temperature != 1.0 else mean
    if ens.session_smoothing:
        from .train import load_dataset

        sessions = load_dataset(ens.data).manifest.set_index("filename").loc[filenames, "session"].to_numpy()
        final = smooth_sessions(final, sessions)
    out = pd.DataFrame(final, columns=classes)
    out.insert(0, "filename", filenames)
    return out
