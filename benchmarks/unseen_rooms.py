"""Does showing training clips through random rooms, as from an unseen city, help eval-only cities?

Single `stats` models (the default pipeline's member: modulation features, a 256-unit MLP) trained
with ``fit`` on the labelled and session-labelled clips outside fold 0, at several
``model.unseen_rooms`` shares, fusions and seeds, side by side with the floor (log-mel statistics
+ logistic regression) in one run, on the challenge-shaped synthetic data of
``benchmarks/budget.py``. Each model is scored on the eval clips' true labels: overall, on cities
seen in development and on eval-only cities, as predicted and session-smoothed.

    python benchmarks/unseen_rooms.py --raw RAW --data DATA
    python benchmarks/unseen_rooms.py --smoke-test
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import add_challenge_data_options, challenge_data, md_table, write_results  # on sys.path
from floor import eval_score, floor_predictions

from raysc.config import make_config
from raysc.datafolder import load_dataset
from raysc.ensemble import smooth_sessions
from raysc.inference import predict_clips
from raysc.metadata import CLASSES
from raysc.synth import EVAL_LABELS
from raysc.train import fit


def scores(probs, ev: pd.DataFrame) -> dict[str, float]:
    plain = eval_score(probs.argmax(1), ev)
    smoothed = eval_score(smooth_sessions(probs, ev["session"].to_numpy()).argmax(1), ev)
    return {**plain, **{f"{k}_smoothed": v for k, v in smoothed.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_challenge_data_options(parser)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    parser.add_argument("--fusions", nargs="+", default=["concat", "film"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.shares, args.fusions, args.seeds, args.epochs = [0.0, 0.5], ["concat"], [0], 2
    with tempfile.TemporaryDirectory() as tmp:
        raw, data_dir = challenge_data(args.raw, args.data, Path(tmp), smoke=args.smoke_test)
        data = load_dataset(data_dir)
        ev = data.manifest[data.manifest["subset"] == "eval"].merge(pd.read_csv(raw / EVAL_LABELS), on="filename")
        names = list(ev["filename"])
        runs = [
            {
                "system": "logistic regression (labelled clips), the floor",
                **scores(floor_predictions(data.store, data.rows("labelled"), ev, len(data.cities)), ev),
            }
        ]
        for fusion in args.fusions:
            for share in args.shares:
                for seed in args.seeds:
                    cfg = make_config(
                        {
                            "backbone": "stats",
                            "model": {
                                "modulation": True,
                                "hidden": 256,
                                "dropout": 0.3,
                                "fusion": fusion,
                                "unseen_rooms": share,
                            },
                            "optimizer": "adamw",
                            "schedule": "cosine",
                            "warmup_steps": 20,
                            "lr": 3e-3,
                            "weight_decay": 1e-3,
                            "batch_size": 64,
                            "epochs": args.epochs,
                            "city_dropout": 0.3,
                            "seed": seed,
                            "fold": 0,
                        }
                    )
                    t0 = time.perf_counter()
                    out = Path(tmp) / f"{fusion}-{share}-{seed}"
                    fit(cfg, data_dir, out_dir=out)
                    seconds = time.perf_counter() - t0
                    pred = predict_clips(out / "model.pt", data, names).set_index("filename").loc[names]
                    row = scores(pred[list(CLASSES)].to_numpy(), ev)
                    runs.append(
                        {
                            "system": "stats",
                            "fusion": fusion,
                            "unseen_rooms": share,
                            "seed": seed,
                            "fit_s": seconds,
                            **row,
                        }
                    )
    keys = ["eval", "seen", "unseen", "eval_smoothed", "seen_smoothed", "unseen_smoothed"]
    rows = [[runs[0]["system"], "", "", *(f"{runs[0][k]:.3f}" for k in keys)]]
    for fusion in args.fusions:
        for share in args.shares:
            group = [r for r in runs[1:] if r["fusion"] == fusion and r["unseen_rooms"] == share]
            mean = {k: statistics.mean(r[k] for r in group) for k in keys}
            rows.append([f"stats, {fusion}", f"{share:g}", len(group), *(f"{mean[k]:.3f}" for k in keys)])
    cmd = "python benchmarks/unseen_rooms.py" + (" --smoke-test" if args.smoke_test else " --raw RAW --data DATA")
    md = (
        f"# Unseen rooms: single `stats` models against the floor\n\n`{cmd}`: fold 0 held out, "
        f"{args.epochs} epochs, mean over seeds {args.seeds}; eval macro accuracy.\n\n"
        + md_table(["system", "unseen_rooms", "seeds", *keys], rows)
    )
    name = "unseen_rooms" + ("_smoke" if args.smoke_test else "")
    return write_results(name, {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, md)


if __name__ == "__main__":
    raise SystemExit(main())
