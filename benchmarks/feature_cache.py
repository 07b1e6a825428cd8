"""Cached features: seconds per training epoch with the front end's log-mel read from the data
folder's cache (the default) against computing it in every batch, per backbone at the widths a
CPU trains, side by side in one run, with what building the cache costs once.

Each backbone trains with ``fit`` (no Ray, both cores) on the labelled clips outside validation
fold 0 for ``--epochs`` epochs, once with ``cache_features: true`` and once with ``false``, same
seed; an epoch's seconds are ``fit``'s own (training and the validation passes), and the steady
figure is the median of the epochs after the first. The cache's build is timed into a temporary
folder (the data folder's own cache, if there is one, is left alone). ``rm3`` is not here: its
Wavegram reads the waveform, so it never uses the cache.

    python benchmarks/feature_cache.py --raw RAW --data DATA   # the budget benchmark's data
    python benchmarks/feature_cache.py --smoke-test
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (  # the script folder is on sys.path
    add_challenge_data_options,
    challenge_data,
    md_table,
    write_results,
)
from learning_curve import CONFIGS

from raysc.config import make_config
from raysc.datafolder import PreparedData, load_dataset
from raysc.feature_cache import FeatureCache, cache_key
from raysc.train import build_model, fit

BACKBONES = ("stats", "mobileascnet", "setrans", "resnet_cbam")


def epochs_of(values: dict[str, Any], data: PreparedData, epochs: int) -> list[dict[str, Any]]:
    """``fit``'s per-epoch metrics for one configuration."""
    history: list[dict[str, Any]] = []
    cfg = make_config({**values, "epochs": epochs, "fold": 0, "session_labels": False})
    with tempfile.TemporaryDirectory() as ckpt:
        fit(cfg, data.out, report=lambda metrics, _: history.append(metrics), checkpoint_dir=ckpt)
    return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_challenge_data_options(parser)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--smoke-test", action="store_true", help="tiny data, 2 epochs, small widths, for CI")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.smoke_test:
        args.epochs = 2
    rows, results, builds = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        _, data_dir = challenge_data(args.raw, args.data, Path(tmp), smoke=args.smoke_test)
        data = load_dataset(data_dir)
        for name in args.backbones:
            values = dict(CONFIGS[name])
            if args.smoke_test:
                values["model"] = {**values.get("model", {}), "width": 0.25}
            frontend = build_model(make_config(values), data).cfg.frontend
            key = cache_key(frontend, data.store)
            if key not in builds:  # one build per front end, as a first trial pays it
                t0 = time.perf_counter()
                FeatureCache.ensure(Path(tmp) / "cache", data.store, frontend)  # a data folder of its own
                builds[key] = time.perf_counter() - t0
            runs = {}
            for cached in (False, True):
                history = epochs_of({**values, "cache_features": cached}, data, args.epochs)
                seconds = [h["epoch_seconds"] for h in history]
                runs[cached] = {
                    "epoch_seconds": seconds,
                    "steady": statistics.median(seconds[1:] or seconds),
                    "val": [h["macro_accuracy"] for h in history],
                    "train_clips": history[-1]["train_clips"],
                }
                print(f"{name} cached={cached}: {[round(s, 2) for s in seconds]} s per epoch", flush=True)
            saved = runs[False]["steady"] - runs[True]["steady"]
            results.append({"backbone": name, "values": values, "build_seconds": builds[key], "runs": runs})
            rows.append(
                [
                    name,
                    values.get("model", {}).get("width", 1),
                    runs[True]["train_clips"],
                    f"{runs[False]['steady']:.2f}",
                    f"{runs[True]['steady']:.2f}",
                    f"{runs[False]['steady'] / runs[True]['steady']:.2f}",
                    f"{builds[key]:.1f}",
                    f"{builds[key] / saved:.1f}" if saved > 0 else "never",
                    f"{runs[False]['val'][-1]:.3f} / {runs[True]['val'][-1]:.3f}",
                ]
            )
    cmd = "python benchmarks/feature_cache.py" + (" --smoke-test" if args.smoke_test else "")
    md = (
        f"`{cmd}` ({args.epochs} epochs, `fit` on the labelled clips outside fold 0, "
        f"{len(data.store)} clips in the store; the cache's build covers all of them):\n\n"
        + md_table(
            [
                "backbone",
                "width",
                "train clips",
                "s per epoch, front end every batch",
                "s per epoch, cached",
                "speed-up",
                "cache build s (once per front end)",
                "epochs to repay the build",
                "val macro acc, last epoch (every batch / cached)",
            ],
            rows,
        )
    )
    name = "feature_cache" + ("_smoke" if args.smoke_test else "")
    return write_results(name, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, md)


if __name__ == "__main__":
    raise SystemExit(main())
