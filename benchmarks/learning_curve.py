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
import json
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
from common import RESULTS, md_table, write_results  # the script folder is on sys.path
from floor import floor_predictions

from raysc.config import make_config
from raysc.data import CLASSES
from raysc.dataset import PreparedData, load_dataset
from raysc.loader import ClipTable
from raysc.metrics import macro_accuracy
from raysc.models import load_model
from raysc.prepare import prepare
from raysc.synth import DEV_METADATA, EVAL_LABELS, EVAL_METADATA, synthesize
from raysc.train import fit, predict, session_labelled

# CPU-sized configurations: what a 2-core machine can train in minutes on 10 s clips.
CONFIGS: dict[str, dict[str, Any]] = {
    "stats": {
        "backbone": "stats",
        "optimizer": "adamw",
        "lr": 3e-3,
        "weight_decay": 1e-2,
        "batch_size": 32,
        "schedule": "cosine",
        "warmup_epochs": 1,
        "city_dropout": 0.2,
    },
    "mobileascnet": {
        "backbone": "mobileascnet",
        "optimizer": "adamw",
        "lr": 2e-3,
        "weight_decay": 1e-3,
        "batch_size": 32,
        "schedule": "cosine",
        "warmup_epochs": 1,
        "city_dropout": 0.2,
        "spec_augment": 1,
        "mixup_alpha": 0.3,
    },
    "setrans": {
        "backbone": "setrans",
        "model": {"width": 0.5},
        "optimizer": "adamw",
        "lr": 2e-3,
        "weight_decay": 1e-3,
        "batch_size": 32,
        "schedule": "cosine",
        "warmup_epochs": 1,
        "city_dropout": 0.2,
        "spec_augment": 1,
        "mixup_alpha": 0.3,
    },
}


def eval_rows(data: PreparedData, raw: Path) -> pd.DataFrame:
    truth = pd.read_csv(raw / EVAL_LABELS)
    return data.manifest[data.manifest["subset"] == "eval"].merge(truth, on="filename")


def score(pred: np.ndarray, rows: pd.DataFrame) -> dict[str, float]:
    y = rows["scene_label"].map(CLASSES.index).to_numpy()
    unseen = (rows["city_idx"] == 0).to_numpy()
    out = {
        "eval": macro_accuracy(y, pred, len(CLASSES)),
        "eval_seen": macro_accuracy(y[~unseen], pred[~unseen], len(CLASSES)),
    }
    out["eval_unseen"] = macro_accuracy(y[unseen], pred[unseen], len(CLASSES)) if unseen.any() else float("nan")
    return out


def curve(name: str, values: dict[str, Any], data: PreparedData, ev: pd.DataFrame, epochs: int) -> list[dict]:
    """Train one configuration; after each epoch score the current weights on the eval clips."""
    cfg = make_config({**values, "epochs": epochs, "fold": 0, "patience": epochs})
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
                **score(probs.argmax(1), ev),
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
        raw, data_dir = args.raw, args.data
        if args.smoke_test:
            raw, data_dir, args.epochs = Path(tmp) / "raw", Path(tmp) / "data", 2
            synthesize(
                raw,
                clips=200,
                eval_clips=60,
                sample_rate=16000,
                clip_seconds=2.0,
                cities=4,
                unseen_cities=1,
                session_size=4,
                seed=0,
            )
        elif raw is None:
            raw = Path(tmp) / "raw"
            synthesize(
                raw,
                clips=1200,
                eval_clips=600,
                sample_rate=44100,
                clip_seconds=10.0,
                cities=6,
                unseen_cities=2,
                seed=0,
                workers=2,
            )
        data_dir = data_dir or Path(tmp) / "data"
        if not (data_dir / "manifest.csv").is_file():
            spec = json.loads((raw / "synth.json").read_text())
            prepare(
                dev_meta=raw / DEV_METADATA,
                eval_meta=raw / EVAL_METADATA,
                audio_dirs=[raw / "audio"],
                out=data_dir,
                sample_rate=int(spec["sample_rate"]),
                clip_seconds=float(spec["clip_seconds"]),
                workers=2,
            )
        data = load_dataset(data_dir)
        ev = eval_rows(data, raw)
        train, _ = data.split(0)
        sessions = session_labelled(data, 0)
        t0 = time.perf_counter()
        floors = [
            {
                "config": "logistic regression",
                "train_clips": len(train),
                **score(floor_predictions(data.store, train, ev, len(data.cities)), ev),
            },
            {
                "config": "logistic regression + session labels",
                "train_clips": len(train) + len(sessions),
                **score(floor_predictions(data.store, pd.concat([train, sessions]), ev, len(data.cities)), ev),
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
            f"{f['eval_seen']:.3f}",
            f"{f['eval_unseen']:.3f}",
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
                f"{last['eval_seen']:.3f}",
                f"{last['eval_unseen']:.3f}",
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
