"""Search throughput against cluster size: trials/hour with 1 vs 2 simulated worker nodes on this
machine (``ray.cluster_utils.Cluster``: a CPU-less head with the ``raysc_driver`` resource, as in
cluster.yaml, plus one-CPU worker nodes), side by side in one run, and the model of a cluster of N
GPUs built from the measured per-trial time.

Model: a trial that holds ``g`` GPUs for ``t`` seconds (fixed Ray Train start-up + epochs) gives
``3600 * floor(N / g) / t`` trials per hour on N GPUs, times the parallel efficiency measured
here from 1 to 2 nodes. ``t`` is measured on this machine's CPU cores; on GPUs, put in your own.

    python benchmarks/scaling.py
    python benchmarks/scaling.py --smoke-test
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import FRONTEND_8K as FRONTEND
from common import md_table, small_data, write_results  # the script folder is on sys.path
from ray.cluster_utils import Cluster

from raysc.distributed import DRIVER_RESOURCE, RAY_ENV, free_port
from raysc.experiment import Experiment

SPACE = {
    "fixed": {"model.width": 0.25, "model.frontend": FRONTEND, "batch_size": 16},
    "params": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
    "backbones": {"mobileascnet": {"model.dropout": {"type": "float", "low": 0.0, "high": 0.3}}},
    "resources": {"workers": 1, "cpus_per_worker": 1},
}


def run_search(nodes: int, space: Path, data: Path, exp: Path, trials: int) -> float:
    """Wall seconds of a ``trials``-trial search on a head + ``nodes`` one-CPU worker nodes."""
    head = {"num_cpus": 0, "resources": {DRIVER_RESOURCE: 100}, "dashboard_port": free_port(8265), "env_vars": RAY_ENV}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(nodes):
        cluster.add_node(num_cpus=1, env_vars=RAY_ENV)
    cluster.wait_for_nodes()
    cmd = [
        sys.executable,
        "-m",
        "raysc.cli",
        "search",
        str(space),
        "--data",
        str(data),
        "--experiment",
        str(exp),
        "--trials",
        str(trials),
        "--address",
        cluster.address,
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cluster.shutdown()
    if done.returncode:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.trials, args.epochs = 2, 1
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = small_data(tmp, 400)
        space = tmp / "space.yaml"
        space.write_text(
            yaml.safe_dump(
                {**SPACE, "scheduler": {"grace_steps": 10**6, "reduction_factor": 2, "max_epochs": args.epochs}}
            )
        )
        for nodes in (1, 2):
            exp = tmp / f"exp{nodes}"
            wall = run_search(nodes, space, data, exp, args.trials)
            records = Experiment(exp).records()
            runs[nodes] = {
                "wall_s": wall,
                "trials": len(records),
                "trials_per_hour": 3600 * len(records) / wall,
                "trial_s": statistics.mean(r.fit_seconds for r in records),
            }
    efficiency = runs[2]["trials_per_hour"] / (2 * runs[1]["trials_per_hour"])
    t = statistics.mean(r["trial_s"] for r in runs.values())
    model = []
    for gpus in (1, 2, 4, 8, 16, 32, 64):
        row = [gpus]
        for g in (1.0, 0.5, 0.25):
            row.append(f"{3600 * int(gpus / g) / t * (efficiency if gpus > 1 else 1):,.0f}")
        model.append(row)
    measured = [
        [n, f"{r['wall_s']:.0f}", r["trials"], f"{r['trials_per_hour']:.0f}", f"{r['trial_s']:.1f}"]
        for n, r in runs.items()
    ]
    md = (
        f"Search throughput on simulated nodes (one CPU each), {args.trials} trials of {args.epochs} epoch(s) "
        "(mobileascnet width 0.25, 1 s clips at 8 kHz), measured in one run on this machine:\n\n"
        + md_table(["worker nodes", "wall s", "trials", "trials/hour", "mean trial s (Tune's time_total_s)"], measured)
        + f"\nParallel efficiency 1 -> 2 nodes: {efficiency:.2f} (2-node trials/hour / twice the 1-node rate).\n\n"
        f"Model for N GPUs with this per-trial time ({t:.1f} s) and efficiency, trials/hour for trials holding "
        "g GPUs:\n\n"
        + md_table(["GPUs", "g = 1", "g = 0.5", "g = 0.25"], model)
        + f"\nCommand: `python benchmarks/scaling.py{' ' if sys.argv[1:] else ''}{' '.join(sys.argv[1:])}`\n"
    )
    return write_results(
        "scaling" + ("_smoke" if args.smoke_test else ""),
        {"args": vars(args), "runs": runs, "efficiency": efficiency, "trial_s": t},
        md,
    )


if __name__ == "__main__":
    raise SystemExit(main())
