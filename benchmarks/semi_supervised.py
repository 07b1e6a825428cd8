"""What ensembles and pseudo-label rounds buy, on synthetic data with known eval labels.

Side by side in one run, for several seeds (each seed: its own synthetic dataset and sampler
seed), at equal compute measured in trials of the same space and epochs (``search_spaces/demo.yaml``
trimmed to ``--max-epochs``), all scored on the eval clips' true labels (macro accuracy):

- ensembles, from one round-0 search of 3N trials: best single model, top-k mean (k=3),
  greedy selection (6 steps);
- pseudo-labels at 3N trials in all, each scored with the top-3 ensemble over all its trials:
  none (the 3N-trial round 0 above), one round (N + 2N, threshold searched), two rounds
  (N + N + N, threshold searched), one round with a fixed threshold (N + 2N, ``--fixed-threshold``,
  by default the middle of the searched range). The N-trial round 0 is run once and shared.
  For these, the table also shows how many clips the last round's trials trained on (labelled +
  pseudo-labelled, validation fold excluded).

    python benchmarks/semi_supervised.py
    python benchmarks/semi_supervised.py --smoke-test

Results go to results/bench/semi_supervised.{json,md} (``_eval<N>`` added when --eval-clips is given).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from common import md_table, write_results  # the script folder is on sys.path

from raysc.candidates import write_candidates
from raysc.dataset import load_dataset
from raysc.distributed import init_ray
from raysc.ensemble import build_ensemble
from raysc.experiment import Experiment
from raysc.inference import predict_ensemble
from raysc.metrics import macro_accuracy
from raysc.prepare import prepare
from raysc.search import search
from raysc.search_space import SPACES_DIR
from raysc.synth import DEV_METADATA, EVAL_LABELS, EVAL_METADATA, synthesize

SEARCHED_1, SEARCHED_2 = "1 round, searched threshold", "2 rounds, searched threshold"


def eval_accuracy(exp: Path, ens_name: str, truth: pd.DataFrame, classes: list[str]) -> float:
    ens = Experiment(exp).load_ensemble(ens_name)
    probs = predict_ensemble(ens, exp, list(truth["filename"]))
    y = truth["scene_label"].map(classes.index).to_numpy()
    return macro_accuracy(y, probs[classes].to_numpy().argmax(1), len(classes))


def train_clips(exp: Path, round: int) -> float:
    """Mean number of clips the round's trials trained on (from each trial's first epoch)."""
    counts = [
        json.loads(m.read_text())["history"][0]["train_clips"]
        for m in (exp / f"round-{round}" / "trials").glob("*/metrics.json")
    ]
    return statistics.mean(counts)


def run_rounds(base: Path, exp: Path, space: Path, data: Path, trials: list[int], seed: int, max_epochs: int) -> Path:
    """Continue the shared round 0 in ``base`` with rounds of ``trials[1:]`` trials in ``exp``."""
    shutil.copytree(base / "round-0", exp / "round-0")
    for r, n in enumerate(trials[1:], start=1):
        ens = build_ensemble(exp, name=f"r{r - 1}", k=3, rounds=list(range(r)))
        cand, _ = write_candidates(exp, ensemble=ens.name)
        search(
            space,
            data=data,
            experiment=exp,
            trials=n,
            round=r,
            pseudo_candidates=cand,
            seed=seed + r,
            max_epochs=max_epochs,
            max_concurrent=1,
        )
    build_ensemble(exp, name="final", k=3)
    return exp


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=2, help="trials per unit of compute (N)")
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--clips", type=int, default=600)
    parser.add_argument("--eval-clips", type=int, help="eval clips per seed (default: a quarter of --clips)")
    parser.add_argument("--fixed-threshold", type=float, default=0.45)
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.seeds, args.n, args.max_epochs, args.clips, args.eval_clips = 1, 1, 1, 160, None
    results_name = "semi_supervised" + ("_smoke" if args.smoke_test else "")
    if args.eval_clips is not None:
        results_name += f"_eval{args.eval_clips}"
    args.eval_clips = args.eval_clips or args.clips // 4
    init_ray(num_cpus=2, log_to_driver=False)
    fixed_name = f"1 round, threshold {args.fixed_threshold}"
    variants = ["best single", "top-3 mean", "greedy (6 steps)", "no pseudo-labels", SEARCHED_1, SEARCHED_2, fixed_name]
    scores: dict[str, list[float]] = {v: [] for v in variants}
    clips: dict[str, list[float]] = {v: [] for v in variants[3:]}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in range(args.seeds):
            raw, data = tmp / f"raw{seed}", tmp / f"data{seed}"
            synthesize(
                raw,
                clips=args.clips,
                eval_clips=args.eval_clips,
                labelled_fraction=0.3,
                sample_rate=8000,
                clip_seconds=2.0,
                cities=6,
                unseen_cities=2,
                session_size=6,
                seed=100 + seed,
                workers=2,
            )
            prepare(
                dev_meta=raw / DEV_METADATA,
                eval_meta=raw / EVAL_METADATA,
                audio_dirs=[raw / "audio"],
                out=data,
                sample_rate=8000,
                clip_seconds=2.0,
                folds=4,
                workers=2,
            )
            classes = load_dataset(data).classes
            truth = pd.read_csv(raw / EVAL_LABELS)
            spec = yaml.safe_load((SPACES_DIR / "demo.yaml").read_text())
            spec["resources"] = {"workers": 1, "cpus_per_worker": 2}  # one trial at a time: exact trial counts
            space = tmp / "space.yaml"
            space.write_text(yaml.safe_dump(spec))
            fixed = tmp / "space_fixed.yaml"
            fixed.write_text(
                yaml.safe_dump(
                    {
                        **spec,
                        "rounds": {
                            "pseudo_threshold": args.fixed_threshold,
                            "pseudo_weight": {"type": "float", "low": 0.2, "high": 1.0},
                        },
                    }
                )
            )
            n, kw = args.n, {"seed": seed, "max_epochs": args.max_epochs, "max_concurrent": 1}
            big = tmp / f"big{seed}"
            search(space, data=data, experiment=big, trials=3 * n, **kw)
            records = [r for r in Experiment(big).records() if r.status != "failed"]
            best = max(records, key=lambda r: r.metrics["macro_accuracy"])
            build_ensemble(big, name="best", method="topk", k=1)
            build_ensemble(big, name="top3", method="topk", k=3)
            build_ensemble(big, name="greedy", method="greedy", k=6)
            assert load_best_id(big) == best.trial_id
            scores["best single"].append(eval_accuracy(big, "best", truth, classes))
            scores["top-3 mean"].append(eval_accuracy(big, "top3", truth, classes))
            scores["greedy (6 steps)"].append(eval_accuracy(big, "greedy", truth, classes))
            scores["no pseudo-labels"].append(scores["top-3 mean"][-1])
            clips["no pseudo-labels"].append(train_clips(big, 0))
            base = tmp / f"base{seed}"
            search(space, data=data, experiment=base, trials=n, **kw)
            for name, sp, trials in (
                (SEARCHED_1, space, [n, 2 * n]),
                (SEARCHED_2, space, [n, n, n]),
                (fixed_name, fixed, [n, 2 * n]),
            ):
                exp = run_rounds(
                    base,
                    tmp / f"{name.replace(' ', '_').replace(',', '')}{seed}",
                    sp,
                    data,
                    trials,
                    seed,
                    args.max_epochs,
                )
                scores[name].append(eval_accuracy(exp, "final", truth, classes))
                clips[name].append(train_clips(exp, len(trials) - 1))
            # After every seed, so that a run stopped part-way still reports the seeds it finished.
            report(results_name, args, scores, clips, seed + 1, time.perf_counter() - t0)
    return 0


def report(name: str, args: argparse.Namespace, scores: dict, clips: dict, seeds_done: int, seconds: float) -> None:
    rows, columns = [], ["variant", "mean", "stdev", "per seed", "train clips, last round"]
    for v, s in scores.items():
        spread = f"{statistics.stdev(s):.3f}" if len(s) > 1 else "-"
        used = f"{statistics.mean(clips[v]):.0f}" if v in clips else ""
        rows.append([v, f"{statistics.mean(s):.3f}", spread, " ".join(f"{x:.3f}" for x in s), used])
    md = (
        f"Eval macro accuracy on synthetic data ({args.clips} dev clips, 30 % labelled, {args.eval_clips} eval clips; "
        f"{seeds_done} of {args.seeds} seed(s) done); N = {args.n} trials of at most {args.max_epochs} epochs; every "
        f"pseudo-label variant spends 3N trials.\n\n"
        + md_table(columns, rows)
        + f"\nwall time {seconds / 60:.1f} min. Command: "
        f"`python benchmarks/semi_supervised.py{' ' if sys.argv[1:] else ''}{' '.join(sys.argv[1:])}`\n"
    )
    result = {"args": vars(args), "seeds_done": seeds_done, "scores": scores, "train_clips": clips}
    write_results(name, result, md)


def load_best_id(exp: Path) -> str:
    return Experiment(exp).load_ensemble("best").members[0].trial_id


if __name__ == "__main__":
    raise SystemExit(main())
