"""Plots in the experiment folder (matplotlib, PNG): the ensemble's confusion matrix and per-city
accuracy on validation, every trial's learning curve, and the search history of each round."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster node
import matplotlib.pyplot as plt
import numpy as np

from .experiment import Ensemble, Experiment


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_confusion(ens: Ensemble, classes: list[str], path: Path) -> Path:
    cm = np.asarray(ens.metrics["confusion"], dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    int(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{ens.name}: validation (macro accuracy {ens.metrics['macro_accuracy']:.3f})")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_per_city(ens: Ensemble, path: Path) -> Path:
    per_city = ens.metrics["per_city"]
    cities = sorted(per_city)
    acc = [per_city[c]["accuracy"] for c in cities]
    fig, ax = plt.subplots(figsize=(max(5, len(cities) * 0.8), 4))
    ax.bar(cities, acc, color="tab:blue")
    for i, c in enumerate(cities):
        ax.text(i, acc[i] + 0.01, f"n={per_city[c]['clips']}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{ens.name}: validation accuracy per city")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return _save(fig, path)


def plot_learning_curves(exp: Experiment, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in exp.records():
        if not r.model_path:
            continue
        history = json.loads((exp.root / r.model_path).with_name("metrics.json").read_text())["history"]
        epochs = [h["epoch"] for h in history if "macro_accuracy" in h]
        style = "-" if r.status == "completed" else "--"
        ax.plot(
            epochs,
            [h["macro_accuracy"] for h in history if "macro_accuracy" in h],
            marker=".",
            alpha=0.7,
            label=f"r{r.round} {r.trial_id} {r.backbone}",
            linestyle=style,
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation macro accuracy")
    ax.set_title("learning curves (dashed: stopped early by ASHA)")
    if len(ax.lines) <= 12:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_search_history(exp: Experiment, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    records = [r for r in exp.records() if r.status != "failed"]
    for rnd in sorted({r.round for r in records}):
        mine = sorted((r for r in records if r.round == rnd), key=lambda r: r.started or 0)
        acc = [r.metrics["macro_accuracy"] for r in mine]
        x = np.arange(1, len(mine) + 1)
        ax.scatter(x, acc, label=f"round {rnd} trials", alpha=0.7)
        ax.step(x, np.maximum.accumulate(acc), where="post", label=f"round {rnd} best so far")
    ax.set_xlabel("trial (start order)")
    ax.set_ylabel("best validation macro accuracy")
    ax.set_title("search history")
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_plots(experiment: str | Path, ens: Ensemble, classes: list[str]) -> list[Path]:
    """All four plots into ``EXP/plots/``."""
    exp = Experiment.existing(experiment)
    out = exp.plots_dir
    return [
        plot_confusion(ens, classes, out / "confusion_matrix.png"),
        plot_per_city(ens, out / "per_city_accuracy.png"),
        plot_learning_curves(exp, out / "learning_curves.png"),
        plot_search_history(exp, out / "search_history.png"),
    ]
