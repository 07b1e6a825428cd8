"""Learning curves on challenge-shaped synthetic data: eval macro accuracy against optimiser
steps, per backbone, with and without session labels, next to the logistic-regression floor
in the same run.

Each configuration trains with ``fit`` (no Ray) on the labelled clips outside validation fold 0
(plus, with session labels, the unlabelled clips of labelled sessions outside it); after every
epoch the current weights predict the eval clips, scored on their true labels (the synthetic data
keeps them; nothing else sees them). The floor is a logistic regression on log-mel mean/std + city
+ time on the same clips. A plot goes to results/bench/learning_curve.png.

    python benchmarks/learning_curve.py --raw RAW --data DATA   # RAW from `raysc synth`; DATA prepared if missing
    python benchmarks/learning_curve.py --smoke-test
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from common import RESULTS, challenge_data, md_table, write_results  # the script folder is on sys.path
from floor import eval_score, floor_predictions

from raysc.config import make_config
from raysc.data import CLASSES
from raysc.dataset import PreparedData, load_dataset
from raysc.loader import ClipTable
from raysc.models import load_model
from raysc.synth import EVAL_LABELS
from raysc.train import fit, predict, session_labelled

# CPU-sized configurations: what a 2-core machine can train in minutes on 10 s clips.
_COMMON = {"optimizer": "adamw", "batch_size": 32, "schedule": "cosine", "warmup_steps": 20, "city_dropout": 0.2}
_NETWORK = {**_COMMON, "lr": 2e-3, "weight_decay": 1e-3, "spec_augment": 1, "mixup_alpha": 0.3}
CONFIGS: dict[str, dict[str, Any]] = {
    "stats": {**_COMMON, "backbone": "stats", "lr": 3e-3, "weight_decay": 1e-2},
    "mobileascnet": {**_NETWORK, "backbone": "mobileascnet"},
    "setrans": {**_NETWORK, "backbone": "setrans", "model": {"width": 0.5}},
}


def eval_rows(data: PreparedData, raw: Path) -> pd.DataFrame:
    truth = pd.read_csv(raw / EVAL_LABELS)
    return data.manifest[data.manifest["subset"] == "eval"].merge(truth, on="filename")


def curve(name: str, values: dict[str, Any], data: PreparedData, ev: pd.DataFrame, epochs: int) -> list[dict]:
    """Train one configuration; after each epoch score the current weights on the eval clips."""
    cfg = make_config({**values, "epochs": epochs, "fold": 0})
    table = ClipTable.from_rows(ev, np.zeros((len(ev), len(CLASSES)), np.float32))
    points, t0 = [], time.perf_counter()

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        train_s = time.perf_counter() - t0
        model = load_model(checkpoint / "model.pt")
        probs = predict(model, table, data.store)[list(CLASSES)].to_numpy()
        points.append(
            {
                "config": name,
                "epoch": metrics["epoch"],
                "steps": metrics["steps"],
                "train_clips": metrics["train_clips"],
                "val": metrics["macro_accuracy"],
                "seconds": round(train_s, 1),
                **eval_score(probs.argmax(1), ev),
            }
        )
        print(f"  {name} epoch {metrics['epoch']}: val {metrics['macro_accuracy']:.3f} eval {points[-1]['eval']:.3f}")

    with tempfile.TemporaryDirectory() as ckpt:
        fit(cfg, data.out, report=report, checkpoint_dir=ckpt)
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", type=Path, help="a `raysc synth` folder (default: synthesised at challenge shape)")
    parser.add_argument("--data", type=Path, help="its prepared data folder (prepared here when missing)")
    parser.add_argument("--backbones", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--smoke-test", action="store_true", help="tiny data, 2 epochs, for CI")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke_test:
            args.epochs = 2
        raw, data_dir = challenge_data(args.raw, args.data, Path(tmp), smoke=args.smoke_test)
        data = load_dataset(data_dir)
        ev = eval_rows(data, raw)
        train, _ = data.split(0)
        sessions = session_labelled(data, 0)
        t0 = time.perf_counter()
        floors = [
            {
                "config": "logistic regression",
                "train_clips": len(train),
                **eval_score(floor_predictions(data.store, train, ev, len(data.cities)).argmax(1), ev),
            },
            {
                "config": "logistic regression + session labels",
                "train_clips": len(train) + len(sessions),
                **eval_score(
                    floor_predictions(data.store, pd.concat([train, sessions]), ev, len(data.cities)).argmax(1), ev
                ),
            },
        ]
        floor_s = time.perf_counter() - t0
        points = []
        for name in args.backbones:
            for with_sessions in (False, True):
                label = f"{name}{' + session labels' if with_sessions else ''}"
                values = {**CONFIGS[name], "session_labels": with_sessions}
                if args.smoke_test:
                    values["model"] = {**values.get("model", {}), "width": 0.25}
                points += curve(label, values, data, ev, args.epochs)
    rows = [
        [
            f["config"],
            f["train_clips"],
            "-",
            f"{floor_s / 2:.0f}",
            "-",
            f"{f['eval']:.3f}",
            f"{f['seen']:.3f}",
            f"{f['unseen']:.3f}",
        ]
        for f in floors
    ]
    table = pd.DataFrame(points)
    for label, part in table.groupby("config", sort=False):
        best = part.loc[part["val"].idxmax()]  # the epoch validation would pick
        last = part.iloc[-1]
        rows.append(
            [
                label,
                int(last["train_clips"]),
                int(last["steps"]),
                f"{last['seconds']:.0f}",
                f"{best['eval']:.3f} (epoch {int(best['epoch'])})",
                f"{last['eval']:.3f}",
                f"{last['seen']:.3f}",
                f"{last['unseen']:.3f}",
            ]
        )
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, part in table.groupby("config", sort=False):
        ax.plot(part["steps"], part["eval"], marker=".", label=label)
    for f, style in zip(floors, (":", "--"), strict=True):
        ax.axhline(f["eval"], color="grey", linestyle=style, label=f["config"])
    ax.set_xlabel("optimiser steps")
    ax.set_ylabel("eval macro accuracy")
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    name = "learning_curve" + ("_smoke" if args.smoke_test else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=110, bbox_inches="tight")
    cmd = "python benchmarks/learning_curve.py" + (" --smoke-test" if args.smoke_test else "")
    md = f"`{cmd}` ({args.epochs} epochs, validation fold 0 held out; {len(ev)} eval clips):\n\n" + md_table(
        [
            "configuration",
            "train clips",
            "steps",
            "train s",
            "eval at best val epoch",
            "eval, last epoch",
            "seen cities",
            "eval-only cities",
        ],
        rows,
    )
    return write_results(
        name, {"args": {k: str(v) for k, v in vars(args).items()}, "floors": floors, "points": points}, md
    )


if __name__ == "__main__":
    raise SystemExit(main())
