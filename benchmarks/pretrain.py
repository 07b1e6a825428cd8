"""From scratch vs pretrained + fine-tuned, at the same CPU time, next to the floor.

Synthetic data with a pretraining set from the same generator but other cities (TAU- and
CochlScene-format clips: a shifted device/city mix, 9 of the 10 classes after the label
mapping). One network is pretrained on those clips (``raysc pretrain``'s ``fit``) and fine-tuned
on the labelled + session-labelled development clips (new head); the same network is trained from
scratch for as many epochs as the pretraining + fine-tuning took time, and also for the
fine-tuning's epochs only. Eval macro accuracy on the eval clips' true labels (kept by the
synthetic data), overall and on eval-only cities, with the log-mel logistic regression in the
same run.

    python benchmarks/pretrain.py                 # 16 kHz, 5 s clips, 600 dev + 300 eval + 1,200 pretraining
    python benchmarks/pretrain.py --smoke-test    # tiny, for CI
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from common import md_table, write_results  # the script folder is on sys.path
from floor import eval_score, floor_predictions

from raysc.config import make_config
from raysc.datafolder import PreparedData, load_dataset
from raysc.loader import ClipTable
from raysc.metadata import CLASSES
from raysc.prepare import prepare
from raysc.synth import DEV_METADATA, EVAL_LABELS, EVAL_METADATA, synthesize
from raysc.train import fit, predict, session_labelled


def make_data(work: Path, *, smoke: bool) -> tuple[Path, PreparedData]:
    raw = work / "raw"
    size = {"clips": 120, "eval_clips": 60, "pretrain_clips": 60, "clip_seconds": 2.0} if smoke else {}
    spec = {"clips": 600, "eval_clips": 300, "pretrain_clips": 600, "clip_seconds": 5.0} | size
    synthesize(
        raw,
        clips=spec["clips"],
        eval_clips=spec["eval_clips"],
        labelled_fraction=0.2,
        sample_rate=16000,
        clip_seconds=spec["clip_seconds"],
        cities=6,
        unseen_cities=2,
        pretrain_clips=spec["pretrain_clips"],
        seed=0,
        workers=2,
    )
    data = prepare(
        dev_meta=raw / DEV_METADATA,
        eval_meta=raw / EVAL_METADATA,
        audio_dirs=[raw / "audio"],
        out=work / "data",
        sample_rate=16000,
        clip_seconds=spec["clip_seconds"],
        workers=2,
        tau=raw / "pretrain" / "tau",
        cochlscene=raw / "pretrain" / "cochlscene",
    )
    return raw, load_dataset(data.out)


def eval_accuracy(model: Any, data: PreparedData, ev: pd.DataFrame) -> dict[str, float]:
    table = ClipTable.from_rows(ev, np.zeros((len(ev), len(CLASSES)), np.float32))
    probs = predict(model, table, data.store)[list(CLASSES)].to_numpy()
    return eval_score(probs.argmax(1), ev)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="mobileascnet")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--smoke-test", action="store_true", help="tiny data and 1 + 1 epochs, for CI")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.pretrain_epochs, args.finetune_epochs = 1, 1
    base = {
        "backbone": args.backbone,
        "model": {"width": args.width},
        "optimizer": "adamw",
        "lr": 3e-3,
        "weight_decay": 1e-3,
        "batch_size": 32,
        "schedule": "cosine",
        "warmup_steps": 20,
        "city_dropout": 0.2,
        "fold": 0,
        "seed": 0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        raw, data = make_data(Path(tmp), smoke=args.smoke_test)
        ev = data.rows("eval").merge(pd.read_csv(raw / EVAL_LABELS), on="filename")
        m = data.manifest
        train = data.split(0)[0]
        rows = []
        t0 = time.perf_counter()
        with_sessions = pd.concat([train, session_labelled(data, 0)])
        floor = eval_score(floor_predictions(data.store, with_sessions, ev, len(data.cities)).argmax(1), ev)
        rows.append({"system": "logistic regression (+ session labels)", "minutes": None, "epochs": None, **floor})
        rows[-1]["minutes"] = round((time.perf_counter() - t0) / 60, 2)

        t0 = time.perf_counter()
        pre_cfg = make_config({**base, "train_on": "pretrain", "epochs": args.pretrain_epochs})
        fit(pre_cfg, data.out, out_dir=Path(tmp) / "pre")
        pre_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        tuned_cfg = make_config(
            {
                **base,
                "epochs": args.finetune_epochs,
                "init_from": str(Path(tmp) / "pre" / "model.pt"),
                "reset_head": True,
            }
        )
        tuned = fit(tuned_cfg, data.out)
        tune_seconds = time.perf_counter() - t0
        rows.append(
            {
                "system": f"pretrained {args.pretrain_epochs} + fine-tuned {args.finetune_epochs} epochs",
                "minutes": round((pre_seconds + tune_seconds) / 60, 2),
                "epochs": args.finetune_epochs,
                **eval_accuracy(tuned.model, data, ev),
            }
        )
        epoch_s = float(np.median([h["epoch_seconds"] for h in tuned.history]))
        same_time = max(args.finetune_epochs, math.ceil((pre_seconds + tune_seconds) / epoch_s))
        for epochs in sorted({args.finetune_epochs, same_time}):
            t0 = time.perf_counter()
            scratch = fit(make_config({**base, "epochs": epochs}), data.out)
            label = "same CPU time" if epochs == same_time else "the fine-tuning's epochs"
            rows.append(
                {
                    "system": f"from scratch, {epochs} epochs ({label})",
                    "minutes": round((time.perf_counter() - t0) / 60, 2),
                    "epochs": epochs,
                    **eval_accuracy(scratch.model, data, ev),
                }
            )
        pre_rows = m[m["subset"] == "pretrain"]
        header = (
            f"`python benchmarks/pretrain.py{' --smoke-test' if args.smoke_test else ''}`: {args.backbone} at width "
            f"{args.width:g}; {len(train)} labelled training clips (+ session labels), {len(ev)} eval clips, "
            f"{len(pre_rows)} pretraining clips of {pre_rows['label'].nunique()} classes from other cities; "
            f"eval macro accuracy (chance {1 / len(CLASSES):.3f}).\n\n"
        )
        table = md_table(
            ["system", "wall min", "eval macro acc", "seen cities", "eval-only cities"],
            [[r["system"], r["minutes"], f"{r['eval']:.3f}", f"{r['seen']:.3f}", f"{r['unseen']:.3f}"] for r in rows],
        )
        name = "pretrain_smoke" if args.smoke_test else "pretrain"
        return write_results(name, {"rows": rows, "args": vars(args)}, header + table + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
