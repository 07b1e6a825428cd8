"""Search efficiency: TPE + ASHA against random search without early stopping.

Side by side in one run, for several seeds: the same space, data, number of trials and maximum
epochs; trials run one at a time so that "spent so far" is well defined. For each seed, the
target is the best validation score (macro accuracy mixed with the city-held-out score, as the
search maximises) either strategy found, minus 1 point; each strategy's cost is the
trial-epochs it had spent when a trial first reached the target (a strategy that never reaches
it is charged everything it spent). Reported: those costs,
their ratio (random / TPE+ASHA: above 1 means TPE+ASHA got there cheaper), and wall time.

    python benchmarks/hpo_efficiency.py
    python benchmarks/hpo_efficiency.py --grace-steps 26 --reduction-factor 3   # a gentler ASHA
    python benchmarks/hpo_efficiency.py --smoke-test
    python benchmarks/hpo_efficiency.py --concurrency 8   # 8 trials at once (a quarter CPU each)

With ``--concurrency N`` a third strategy runs beside them: TPE + ASHA as raysc ran it before it
learnt under concurrency (no constant liar, no wait for the start-up trials), restored in this
process by patching, so that the table shows what the two changes buy at N trials at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import optuna
import yaml
from common import FRONTEND_8K as FRONTEND
from common import md_table, small_data, write_results  # the script folder is on sys.path

from raysc.distributed import init_ray
from raysc.experiment import RUNNING_BEST, Experiment, score_of
from raysc.sampler import StopAwareOptunaSearch
from raysc.search import search

SPACE = {
    "name": "hpo_efficiency",
    "fixed": {"model.width": 0.25, "model.frontend": FRONTEND, "batch_size": 16},
    "params": {
        "lr": {"type": "float", "low": 1e-5, "high": 3e-2, "log": True},
        "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
        "mixup_alpha": {"type": "float", "low": 0.0, "high": 1.0},
        "city_dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "model.fusion": {"type": "categorical", "choices": ["concat", "gated", "film", "none"]},
    },
    "backbones": {
        "mobileascnet": {"model.dropout": {"type": "float", "low": 0.0, "high": 0.5}},
        "setrans": {"model.dropout": {"type": "float", "low": 0.0, "high": 0.5}},
    },
    "resources": {"workers": 1, "cpus_per_worker": 2},
    "scheduler": {"grace_steps": 10, "reduction_factor": 2, "max_epochs": 8},
}


RANDOM = {"sampler": "random", "early_stopping": False}


def cost_to_reach(records: list, target: float) -> tuple[int, bool]:
    """Trial-epochs spent (trials in start order) until one reached ``target``."""
    spent = 0
    for r in sorted(records, key=lambda r: r.started or 0):
        spent += r.epochs
        if score_of(r.metrics) >= target:
            return spent, True
    return spent, False


def survives_halving(exp: Path, records: list, trial_id: str, *, grace: int, factor: int) -> bool:
    """Whether ``trial_id`` of a search without early stopping would have passed every ASHA rung
    of the schedule, replayed synchronously on the full histories: at the k-th rung (grace x
    factor^k steps) only the best 1/factor^k of the trials by running best go on."""
    curves = {}
    for r in records:
        history = json.loads((exp / r.model_path).with_name("metrics.json").read_text())["history"]
        curves[r.trial_id] = [(h["steps"], h[RUNNING_BEST]) for h in history]
    alive, rung, k = set(curves), grace, 1
    while any(curves[t][-1][0] >= rung for t in alive):
        at = {t: next((v for steps, v in curves[t] if steps >= rung), curves[t][-1][1]) for t in alive}
        alive = set(sorted(at, key=at.get, reverse=True)[: max(1, len(records) // factor**k)])
        if trial_id not in alive:
            return False
        rung, k = rung * factor, k + 1
    return True


@contextlib.contextmanager
def unaware_of_running_trials() -> Iterator[None]:
    """raysc's TPE before it learnt under concurrency: no constant liar, no start-up gate."""
    real_init = optuna.samplers.TPESampler.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **{**kwargs, "constant_liar": False})

    with (
        mock.patch.object(optuna.samplers.TPESampler, "__init__", init),
        mock.patch.object(StopAwareOptunaSearch, "waiting_for_startup", lambda self: False),
    ):
        yield


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--clips", type=int, default=600)
    # ASHA's schedule: the first rung (optimiser steps) and the halving factor.
    parser.add_argument("--grace-steps", type=int, default=SPACE["scheduler"]["grace_steps"])
    parser.add_argument("--reduction-factor", type=int, default=SPACE["scheduler"]["reduction_factor"])
    parser.add_argument("--concurrency", type=int, default=1, help="trials at once (2 CPUs shared between them)")
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.seeds, args.trials, args.max_epochs, args.clips = 1, 2, 2, 120
    strategies = {"tpe_asha": ({}, contextlib.nullcontext), "random_full": (RANDOM, contextlib.nullcontext)}
    if args.concurrency > 1:
        strategies["tpe_asha_unaware"] = ({}, unaware_of_running_trials)
    init_ray(num_cpus=2, log_to_driver=False)
    rows, runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = small_data(tmp, args.clips)
        space = tmp / "space.yaml"
        schedule = {"grace_steps": args.grace_steps, "reduction_factor": args.reduction_factor}
        resources = {"workers": 1, "cpus_per_worker": 2 / args.concurrency}
        scheduler = {**schedule, "max_epochs": args.max_epochs}
        space.write_text(yaml.safe_dump({**SPACE, "resources": resources, "scheduler": scheduler}))
        for seed in range(args.seeds):
            found = {}
            for name, (kw, context) in strategies.items():
                t0 = time.perf_counter()
                exp = tmp / f"{name}-{seed}"
                with context():
                    search(
                        space,
                        data=data,
                        experiment=exp,
                        trials=args.trials,
                        seed=seed,
                        max_concurrent=args.concurrency,
                        **kw,
                    )
                found[name] = (Experiment(exp).records(), time.perf_counter() - t0)
            best = max(score_of(r.metrics) for recs, _ in found.values() for r in recs)
            target = best - 0.01
            cost = {name: cost_to_reach(recs, target) for name, (recs, _) in found.items()}
            run = {"seed": seed, "best": best, "target": target}
            for name, (recs, wall) in found.items():
                run[name] = {
                    "epochs_to_target": cost[name][0],
                    "reached": cost[name][1],
                    "wall_s": wall,
                    "total_epochs": sum(r.epochs for r in recs),
                    "best": max(score_of(r.metrics) for r in recs),
                }
            run["ratio"] = cost["random_full"][0] / max(cost["tpe_asha"][0], 1)
            if "tpe_asha_unaware" in cost:
                run["ratio_unaware"] = cost["random_full"][0] / max(cost["tpe_asha_unaware"][0], 1)
            # Would ASHA have let random search's best configuration finish?
            recs = found["random_full"][0]
            top = max(recs, key=lambda r: score_of(r.metrics))
            run["random_best_survives_asha"] = survives_halving(
                tmp / f"random_full-{seed}", recs, top.trial_id, grace=args.grace_steps, factor=args.reduction_factor
            )
            runs.append(run)
            rows.append(
                [
                    seed,
                    f"{best:.4f}",
                    *[f"{run[n]['best']:.4f}" for n in found],
                    *[f"{run[n]['epochs_to_target']}{'' if run[n]['reached'] else ' (not reached)'}" for n in found],
                    *[f"{run[n]['total_epochs']}" for n in found],
                    *[f"{run[n]['wall_s']:.0f}" for n in found],
                    f"{run['ratio']:.2f}",
                    *([f"{run['ratio_unaware']:.2f}"] if "ratio_unaware" in run else []),
                    "yes" if run["random_best_survives_asha"] else "no",
                ]
            )
    ratios = [r["ratio"] for r in runs]
    label = {"tpe_asha": "TPE+ASHA", "random_full": "random", "tpe_asha_unaware": "TPE+ASHA unaware"}
    names = [label[n] for n in strategies]
    at_once = "one at a time" if args.concurrency == 1 else f"{args.concurrency} at once"
    header = ["seed", "best", *[f"best {n}" for n in names], *[f"epochs to target {n}" for n in names]]
    header += [*[f"epochs spent {n}" for n in names], *[f"wall s {n}" for n in names], "ratio random/TPE+ASHA"]
    header += [
        *(["ratio random/TPE+ASHA unaware"] if args.concurrency > 1 else []),
        "random's best would pass ASHA's rungs",
    ]
    md = (
        f"TPE + ASHA vs random search without early stopping: {args.trials} trials of at most {args.max_epochs} "
        f"epochs each, {at_once}, {args.seeds} seed(s); ASHA from step {args.grace_steps}, x"
        f"{args.reduction_factor} per rung; target = best of all - 1 point.\n\n"
        + md_table(header, rows)
        + f"\nratio: mean {statistics.mean(ratios):.2f}"
        + (f", spread (stdev) {statistics.stdev(ratios):.2f}" if len(ratios) > 1 else "")
        + (
            f"; unaware TPE: mean {statistics.mean(r['ratio_unaware'] for r in runs):.2f}"
            if args.concurrency > 1
            else ""
        )
        + f"\n\nCommand: `python benchmarks/hpo_efficiency.py{' ' if sys.argv[1:] else ''}{' '.join(sys.argv[1:])}`\n"
    )
    name = "hpo_efficiency" + (f"_c{args.concurrency}" if args.concurrency > 1 else "")
    return write_results(name + ("_smoke" if args.smoke_test else ""), {"args": vars(args), "runs": runs}, md)


if __name__ == "__main__":
    raise SystemExit(main())
