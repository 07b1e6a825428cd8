"""How hard is the synthetic task? A linear classifier on simple features, per input set.

Synthesises datasets (several seeds), prepares them with ``raysc prepare``, then trains a
multinomial logistic regression on the labelled dev clips with
- audio only: per-band mean and std of a 64-band log-mel spectrogram,
- metadata only: one-hot city (``<unk>`` for eval-only cities) + the time features,
- both,
where the metadata models also train on a copy of every clip with its city replaced by
``<unk>`` (city dropout, as raysc's models do), so eval-only cities get a trained fallback;
and reports macro accuracy on the synthetic eval clips (overall, seen and unseen cities).

    python benchmarks/synth_difficulty.py            # 3 seeds, the `raysc synth` defaults
    python benchmarks/synth_difficulty.py --smoke-test
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import md_table, write_results  # the script folder is on sys.path
from floor import audio_features, logistic_regression, meta_features

from raysc.metadata import CLASSES
from raysc.metrics import macro_accuracy
from raysc.prepare import prepare
from raysc.synth import DEV_METADATA, EVAL_LABELS, EVAL_METADATA, synthesize


def run_seed(seed: int, work: Path, clips: int, eval_clips: int, clip_seconds: float, workers: int) -> dict:
    raw = work / f"synth-{seed}"
    t0 = time.perf_counter()
    synthesize(raw, clips=clips, eval_clips=eval_clips, clip_seconds=clip_seconds, seed=seed, workers=workers)
    t_synth = time.perf_counter() - t0
    data = prepare(
        dev_meta=raw / DEV_METADATA,
        eval_meta=raw / EVAL_METADATA,
        audio_dirs=[raw / "audio"],
        out=work / f"data-{seed}",
        sample_rate=16000,
        clip_seconds=clip_seconds,
        workers=workers,
    )
    m = data.manifest
    train = m[m["subset"] == "labelled"].reset_index(drop=True)
    test = m[m["subset"] == "eval"].merge(pd.read_csv(raw / EVAL_LABELS), on="filename")
    y = train["label"].map(CLASSES.index).to_numpy()
    y_test = test["scene_label"].map(CLASSES.index).to_numpy()
    unseen = (test["city_idx"] == 0).to_numpy()
    a_tr, a_te = audio_features(data.store, list(train["filename"])), audio_features(data.store, list(test["filename"]))
    n_cities = len(data.cities)
    m_tr, m_te = meta_features(train, n_cities), meta_features(test, n_cities)
    m_unk = meta_features(train.assign(city_idx=0), n_cities)
    out = {"seed": seed, "synth_s": round(t_synth, 1), "train_clips": len(train), "eval_clips": len(test)}
    for name, (xtr, ytr, xte) in {
        "audio": (a_tr, y, a_te),
        "metadata": (np.concatenate([m_tr, m_unk]), np.concatenate([y, y]), m_te),
        "both": (
            np.concatenate([np.concatenate([a_tr, m_tr], 1), np.concatenate([a_tr, m_unk], 1)]),
            np.concatenate([y, y]),
            np.concatenate([a_te, m_te], 1),
        ),
    }.items():
        pred = logistic_regression(xtr, ytr, xte).argmax(1)
        out[name] = macro_accuracy(y_test, pred, len(CLASSES))
        out[f"{name}_seen"] = macro_accuracy(y_test[~unseen], pred[~unseen], len(CLASSES))
        if unseen.any():
            out[f"{name}_unseen"] = macro_accuracy(y_test[unseen], pred[unseen], len(CLASSES))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--eval-clips", type=int, default=400)
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke-test", action="store_true", help="one tiny seed, for CI")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.seeds, args.clips, args.eval_clips, args.clip_seconds = [0], 300, 100, 2.0
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            run_seed(s, Path(tmp), args.clips, args.eval_clips, args.clip_seconds, args.workers) for s in args.seeds
        ]
    keys = ["audio", "metadata", "both"]
    summary = {
        k: {"mean": float(np.mean([r[k] for r in runs])), "std": float(np.std([r[k] for r in runs]))} for k in keys
    }
    rows = []
    for k in keys:
        cells = [k, f"{summary[k]['mean']:.3f} ± {summary[k]['std']:.3f}"]
        for part in ("seen", "unseen"):
            vals = [r[f"{k}_{part}"] for r in runs if f"{k}_{part}" in r]
            cells.append(f"{np.mean(vals):.3f}" if vals else "-")
        rows.append(cells)
    cmd = "python benchmarks/synth_difficulty.py" + (" --smoke-test" if args.smoke_test else "")
    md = (
        "# Synthetic task difficulty (logistic regression, eval macro accuracy)\n\n"
        f"`{cmd}`: seeds {args.seeds}, {args.clips} dev clips ({runs[0]['train_clips']} labelled), "
        f"{args.eval_clips} eval clips of {args.clip_seconds:g} s. Chance is 0.100.\n\n"
        + md_table(["features", "eval macro acc (mean ± std)", "seen cities", "unseen cities"], rows)
    )
    return write_results(
        "synth_difficulty" + ("_smoke" if args.smoke_test else ""),
        {"args": vars(args), "runs": runs, "summary": summary},
        md,
    )


if __name__ == "__main__":
    raise SystemExit(main())
