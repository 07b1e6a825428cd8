"""Classification metrics. Macro accuracy (the mean of per-class recalls) is the challenge metric."""

from __future__ import annotations

import numpy as np


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Recall of each class; NaN for a class with no true example."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    hits = np.bincount(y_true[y_true == y_pred], minlength=n_classes).astype(float)
    support = np.bincount(y_true, minlength=n_classes).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, hits / support, np.nan)


def macro_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """The challenge's metric: the mean of per-class accuracy over the classes in ``y_true``.

    Args:
        y_true: true class indices.
        y_pred: predicted class indices.
        n_classes: the number of classes.

    Returns:
        The macro accuracy, in [0, 1].

    Raises:
        ValueError: no clips.
    """
    if len(y_true) == 0:
        raise ValueError("macro accuracy of an empty set is undefined")
    return float(np.nanmean(per_class_accuracy(y_true, y_pred, n_classes)))


def log_loss(probs: np.ndarray, y_true: np.ndarray, *, eps: float = 1e-7) -> float:
    p = np.clip(probs[np.arange(len(y_true)), y_true], eps, 1.0)
    return float(-np.mean(np.log(p)))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """[true, predicted] counts."""
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def unk_columns(classes: list[str]) -> list[str]:
    """Prediction columns of the same clips scored with their city as ``<unk>``."""
    return [f"<unk>:{c}" for c in classes]


def objective(macro: float, unk_city: float | None, unseen_weight: float) -> float:
    """What a search maximises and a run selects its epoch by: macro accuracy, mixed with the
    city-held-out macro accuracy in the share ``unseen_weight`` (by default the share of eval
    clips from cities absent in development, which the models meet as ``<unk>``)."""
    if unk_city is None:
        return macro
    return (1.0 - unseen_weight) * macro + unseen_weight * unk_city


def classification_report(
    probs: np.ndarray,
    y_true: np.ndarray,
    *,
    classes: list[str],
    cities: np.ndarray,
    seen: np.ndarray,
    unk_probs: np.ndarray | None = None,
    unseen_weight: float = 0.0,
) -> dict:
    """Every metric raysc reports for one set of predictions.

    Args:
        probs: class probabilities, one row a clip.
        y_true: true class indices.
        classes: the class names, in index order.
        cities: each clip's city.
        seen: whether each clip's city was seen in training.
        unk_probs: the same clips predicted with their city as ``<unk>``, or None.
        unseen_weight: the share of ``unk_city_macro_accuracy`` in ``score`` (``objective``).

    Returns:
        ``macro_accuracy`` (the challenge metric), ``accuracy``, ``log_loss``, ``per_class``,
        ``per_city`` (accuracy and clip count), ``seen_city_macro_accuracy`` and
        ``unseen_city_macro_accuracy`` (None when there are no such clips),
        ``unk_city_macro_accuracy`` (from ``unk_probs``: a city-held-out score, how the model
        does on a city it has never seen; None without them), ``clips`` and ``score`` (what a
        search maximises).
    """
    n = len(classes)
    y_true = np.asarray(y_true)
    y_pred = np.asarray(probs).argmax(1)
    per_class = per_class_accuracy(y_true, y_pred, n)
    report = {
        "macro_accuracy": macro_accuracy(y_true, y_pred, n),
        "accuracy": float((y_true == y_pred).mean()),
        "log_loss": log_loss(np.asarray(probs), y_true),
        "per_class": {c: (None if np.isnan(a) else float(a)) for c, a in zip(classes, per_class, strict=True)},
        "per_city": {},
        "seen_city_macro_accuracy": None,
        "unseen_city_macro_accuracy": None,
        "unk_city_macro_accuracy": None,
        "clips": len(y_true),
    }
    for city in sorted(set(cities)):
        mask = cities == city
        report["per_city"][city] = {"accuracy": float((y_true[mask] == y_pred[mask]).mean()), "clips": int(mask.sum())}
    for key, mask in (("seen_city_macro_accuracy", seen), ("unseen_city_macro_accuracy", ~seen)):
        if mask.any():
            report[key] = macro_accuracy(y_true[mask], y_pred[mask], n)
    if unk_probs is not None:
        report["unk_city_macro_accuracy"] = macro_accuracy(y_true, np.asarray(unk_probs).argmax(1), n)
    report["score"] = objective(report["macro_accuracy"], report["unk_city_macro_accuracy"], unseen_weight)
    return report
