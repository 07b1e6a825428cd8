"""Cross-fitting measured on a finished experiment: its own final ensemble vs the same search's
best trials cross-fitted and chosen out of fold, on eval data neither selected on.

The experiment is one that `benchmarks/budget.py --work W` left (``W/exp-default``), on synthetic
data whose eval labels `raysc synth` kept. The cross-fitting takes what ``--time-budget`` holds
(estimated from the trials' own times); its minutes are reported next to the scores, so the cost
of the gain is in the table. A copy of the experiment is cross-fitted: the original stays as the
pipeline left it.

    python benchmarks/crossfit.py --experiment W/exp-default --raw RAW [--candidates 10] [--k 5] [--time-budget 10]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import md_table, write_results  # the script folder is on sys.path
from floor import eval_score

from raysc.crossfit import crossfit_ensemble
from raysc.datafolder import load_dataset
from raysc.experiment import Experiment
from raysc.inference import predict_ensemble
from raysc.metadata import CLASSES
from raysc.synth import EVAL_LABELS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", type=Path, required=True, help="a finished pipeline experiment")
    parser.add_argument("--raw", type=Path, required=True, help="its `raysc synth` folder (eval labels)")
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--time-budget", type=float, default=10.0, help="minutes for the cross-fitting runs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / args.experiment.name
        shutil.copytree(args.experiment, work, ignore=shutil.ignore_patterns("train", "tune", "tune-state"))
        exp = Experiment(work)
        final = exp.load_ensemble()
        data = load_dataset(final.data)
        ev = data.rows("eval").merge(pd.read_csv(args.raw / EVAL_LABELS), on="filename")
        names = list(ev["filename"])

        def scored(ens) -> dict:
            probs = predict_ensemble(ens, work, names)[list(CLASSES)].to_numpy()
            return eval_score(probs.argmax(1), ev)

        rows = [{"system": f"the pipeline's final ensemble ({final.name})", "minutes": None, **scored(final)}]
        t0 = time.perf_counter()
        built = crossfit_ensemble(work, candidates=args.candidates, k=args.k, time_budget_minutes=args.time_budget)
        minutes = round((time.perf_counter() - t0) / 60, 1)
        for ens in built:
            configs = len({m.trial_id for m in ens.members})
            rows.append(
                {
                    "system": f"cross-fitted {ens.name} ({configs} configurations x {len(data.folds())} folds)",
                    "minutes": minutes,
                    "oof": ens.metrics["macro_accuracy"],
                    "oof_std": ens.metrics["fold_macro_accuracy_std"],
                    **scored(ens),
                }
            )
    header = (
        f"`python benchmarks/crossfit.py --experiment {args.experiment} --candidates {args.candidates} --k {args.k} "
        f"--time-budget {args.time_budget:g}`: {len(ev)} eval clips; eval macro accuracy (chance 0.100); minutes of "
        "cross-fitting runs; out-of-fold macro accuracy on every labelled clip (+- over folds).\n\n"
    )
    table = md_table(
        ["system", "cross-fit min", "out of fold", "eval macro acc", "seen cities", "eval-only cities"],
        [
            [
                r["system"],
                r["minutes"] if r["minutes"] is not None else "",
                f"{r['oof']:.3f} +- {r['oof_std']:.3f}" if "oof" in r else "",
                f"{r['eval']:.3f}",
                f"{r['seen']:.3f}",
                f"{r['unseen']:.3f}",
            ]
            for r in rows
        ],
    )
    return write_results("crossfit", {"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, header + table)


if __name__ == "__main__":
    raise SystemExit(main())
