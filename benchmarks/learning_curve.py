"""Learning curves on challenge-shaped synthetic data: eval macro accuracy against optimiser
steps, per backbone, with and without session labels, next to the logistic-regression floor
in the same run.

Each configuration trains with ``fit`` (no Ray) on the labelled clips outside validation fold 0
(plus, with session labels, the unlabelled clips of labelled sessions outside it); after every
epoch the current weights predict the eval clips, scored on their true labels (the synthetic data
keeps them; nothing else sees them). The floor is a logistic regression on log-mel mean/std + city
+ time on the same clips. A plot goes to results/bench/learning_curve.png.

With ``--labelled 240 480 1740`` it draws the curve against labelled clips instead: one set at
the same shape with enough labelled development clips is synthesised and prepared once
(``--work`` keeps it); for each count a nested random subset of the labelled clips keeps its
labels (the rest become unlabelled, and session labels follow from what is kept), and the floor
and each backbone train on it as above.

    python benchmarks/learning_curve.py --raw RAW --data DATA   # RAW from `raysc synth`; DATA prepared if missing
    python benchmarks/learning_curve.py --labelled 240 480 1740 --backbones stats --work W
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
from common import (  # the script folder is on sys.path
    RESULTS,
    add_challenge_data_options,
    challenge_data,
    md_table,
    write_results,
)
from floor import eval_score, floor_predictions

from raysc.config import make_config
from raysc.datafolder import INFO_FILE, MANIFEST_FILE, STORE_DIR, PreparedData, load_dataset
from raysc.feature_cache import CACHE_DIR
from raysc.fileio import write_csv, write_json
from raysc.loader import ClipTable
from raysc.metadata import CLASSES, session_labels
from raysc.models import load_model
from raysc.prepare import prepare
from raysc.synth import DEV_METADATA, EVAL_LABELS, EVAL_METADATA, synthesize
from raysc.train import fit, predict, session_labelled

# CPU-sized configurations: what a 2-core machine can train in minutes on 10 s clips.
_COMMON = {"optimizer": "adamw", "batch_size": 32, "schedule": "cosine", "warmup_steps": 20, "city_dropout": 0.2}
_NETWORK = {**_COMMON, "lr": 2e-3, "weight_decay": 1e-3, "spec_augment": 1, "mixup_alpha": 0.3}
CONFIGS: dict[str, dict[str, Any]] = {
    "stats": {**_COMMON, "backbone": "stats", "lr": 3e-3, "weight_decay": 1e-2},
    "mobileascnet": {**_NETWORK, "backbone": "mobileascnet"},
    "setrans": {**_NETWORK, "backbone": "setrans", "model": {"width": 0.5}},
    "rm3": {**_NETWORK, "backbone": "rm3", "model": {"width": 0.5}},
    "resnet_cbam": {**_NETWORK, "backbone": "resnet_cbam", "model": {"width": 0.25}},
}
# Not here: ascmamba. At paper size one training step on 2 clips of 10 s did not finish in 8
# minutes on this CPU (benchmarks/models.py); it is a GPU network.


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


def save_plot(fig: plt.Figure, ax: plt.Axes, xlabel: str, name: str) -> None:
    """Eval macro accuracy against ``xlabel`` on a log axis, to results/bench/NAME.png."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("eval macro accuracy")
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=110, bbox_inches="tight")


def with_labelled(data: PreparedData, keep: int, out: Path, *, seed: int = 0) -> PreparedData:
    """A data folder sharing ``data``'s store and feature cache in which only ``keep`` labelled
    clips (a seeded random draw, so that smaller counts are subsets of larger ones) keep their
    labels; the others become unlabelled, and session labels follow from what is kept."""
    m = data.manifest.copy()
    labelled = m.index[m["subset"] == "labelled"].to_numpy()
    dropped = np.random.default_rng(seed).permutation(labelled)[keep:]
    m.loc[dropped, "subset"] = "unlabelled"
    m.loc[dropped, "label"] = None
    m["session_label"] = session_labels(m)
    out.mkdir(parents=True, exist_ok=True)
    (data.out / CACHE_DIR).mkdir(exist_ok=True)
    for name in (STORE_DIR, CACHE_DIR):
        if not (out / name).exists():
            (out / name).symlink_to((data.out / name).resolve(), target_is_directory=True)
    counts = m["subset"].value_counts().to_dict()
    write_json(
        out / INFO_FILE, {**data.info, "counts": counts, "session_labels": int(m["session_label"].notna().sum())}
    )
    write_csv(out / MANIFEST_FILE, m)
    return load_dataset(out)


def floors_on(data: PreparedData, ev: pd.DataFrame) -> list[dict[str, Any]]:
    """The floor trained on the labelled clips outside fold 0, without and with session labels."""
    train, _ = data.split(0)
    sessions = session_labelled(data, 0)
    return [
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


def label_curves(args: argparse.Namespace, work: Path) -> int:
    """Eval macro accuracy against labelled clips (``--labelled``), floor and backbones side by side."""
    counts = sorted(args.labelled)
    raw, data_dir = work / "raw-labelled", work / "data-labelled"
    rate, seconds, dev, eval_clips = (16000, 2.0, 240, 60) if args.smoke_test else (44100, 10.0, 2400, 600)
    if counts[-1] > dev:
        raise SystemExit(f"--labelled: at most {dev} labelled clips, got {counts[-1]}")
    if not (raw / EVAL_LABELS).is_file():
        synthesize(
            raw,
            clips=dev,
            eval_clips=eval_clips,
            labelled_fraction=counts[-1] / dev,
            sample_rate=rate,
            clip_seconds=seconds,
            cities=6,
            unseen_cities=2,
            seed=0,
            workers=2,
        )
    if not (data_dir / MANIFEST_FILE).is_file():
        prepare(
            dev_meta=raw / DEV_METADATA,
            eval_meta=raw / EVAL_METADATA,
            audio_dirs=[raw / "audio"],
            out=data_dir,
            sample_rate=rate,
            clip_seconds=seconds,
            workers=2,
        )
    full = load_dataset(data_dir)
    ev = eval_rows(full, raw)
    rows, points = [], []
    for n in counts:
        data = with_labelled(full, n, work / f"labelled-{n}")
        floors = floors_on(data, ev)
        row = {"labelled": n, **{f["config"]: f["eval"] for f in floors}}
        for name in args.backbones:
            values = {**CONFIGS[name], "session_labels": True}
            if args.smoke_test:
                values["model"] = {**values.get("model", {}), "width": 0.25}
            part = pd.DataFrame(curve(f"{name} + session labels", values, data, ev, args.epochs))
            best = part.loc[part["val"].idxmax()]
            row[name] = float(best["eval"])
            row[f"{name} train clips"] = int(part["train_clips"].iloc[-1])
            points += [{**p, "labelled": n} for p in part.to_dict("records")]
        row["train clips"] = floors[1]["train_clips"]
        rows.append(row)
    table = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(8, 5))
    for col, style in (("logistic regression", ":"), ("logistic regression + session labels", "--")):
        ax.plot(table["labelled"], table[col], color="grey", linestyle=style, marker="o", label=col)
    for name in args.backbones:
        ax.plot(table["labelled"], table[name], marker="o", label=f"{name} + session labels (epoch chosen on fold 0)")
    name = "learning_curve_labelled" + ("_smoke" if args.smoke_test else "")
    save_plot(fig, ax, "labelled development clips", name)
    header = ["labelled clips", "train clips (outside fold 0, + session labels)", "logistic regression"]
    header += ["logistic regression + session labels"] + [f"{b} + session labels" for b in args.backbones]
    md_rows = [
        [
            int(r["labelled"]),
            int(r["train clips"]),
            f"{r['logistic regression']:.3f}",
            f"{r['logistic regression + session labels']:.3f}",
            *[f"{r[b]:.3f}" for b in args.backbones],
        ]
        for r in rows
    ]
    cmd = "python benchmarks/learning_curve.py --labelled " + " ".join(map(str, counts))
    md = (
        f"`{cmd}{' --smoke-test' if args.smoke_test else ''}` ({args.epochs} epochs, validation fold 0 held out; "
        f"{len(ev)} eval clips; eval macro accuracy, networks at the epoch fold 0 picks):\n\n"
        + md_table(header, md_rows)
    )
    return write_results(name, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "points": points}, md)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_challenge_data_options(parser)
    parser.add_argument("--backbones", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--labelled", type=int, nargs="+", help="labelled-clip counts: the curve against labels")
    parser.add_argument("--work", type=Path, help="keep the --labelled data here (default: a temporary folder)")
    parser.add_argument(
        "--plot-with",
        type=Path,
        nargs="+",
        default=[],
        help="earlier runs' learning_curve.json on the same data: their curves join the plot (not with --labelled)",
    )
    parser.add_argument("--smoke-test", action="store_true", help="tiny data, 2 epochs, for CI")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke_test:
            args.epochs = 2
            args.labelled = args.labelled and [24, 48, 96]
        if args.labelled:
            return label_curves(args, args.work or Path(tmp))
        raw, data_dir = challenge_data(args.raw, args.data, Path(tmp), smoke=args.smoke_test)
        data = load_dataset(data_dir)
        ev = eval_rows(data, raw)
        t0 = time.perf_counter()
        floors = floors_on(data, ev)
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
    # Earlier runs' curves on the same data join the plot (a run of every backbone takes an hour).
    earlier = pd.DataFrame([p for path in args.plot_with for p in json.loads(path.read_text())["points"]])
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, part in pd.concat([table, earlier]).groupby("config", sort=False):
        ax.plot(part["steps"], part["eval"], marker=".", label=label)
    for f, style in zip(floors, (":", "--"), strict=True):
        ax.axhline(f["eval"], color="grey", linestyle=style, label=f["config"])
    name = "learning_curve" + ("_smoke" if args.smoke_test else "")
    save_plot(fig, ax, "optimiser steps", name)
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
