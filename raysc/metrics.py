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
    """Mean of per-class accuracy over the classes present in ``y_true``."""
    if len(y_true) == 0:
        raise ValueError("macro accuracy of an empty set is undefined")
    return float(np.nanmean(per_class_accuracy(y_true, y_pred, n_classes)))
