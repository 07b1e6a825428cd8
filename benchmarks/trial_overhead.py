"""What a search trial costs besides its training: in-process trials against Ray Train trials.

Side by side in one run, on one local Ray: the same space (``stats`` on 1 s clips, a few short
epochs), data, seed and trials, run one at a time without early stopping, first with
``ray_train="auto"`` (a one-worker trial trains in its own Tune process, kept for the next
trial) and then with ``ray_train="always"`` (every trial a Ray Train ``TorchTrainer``). From the
search's own start/end lines and each trial's log:
- start: from Tune starting the trial to its first batch (the first epoch's end in the trial's
  log minus that epoch's own seconds);
- gap: from one trial's end to the next trial's start;
- fixed cost per trial: (the search's wall time - every epoch's own seconds) / trials.

    python benchmarks/trial_overhead.py
    python benchmarks/trial_overhead.py --smoke-test
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml
from common import FRONTEND_8K as FRONTEND
from common import md_table, small_data, write_results  # the script folder is on sys.path

from raysc.distributed import init_ray
from raysc.experiment import Experiment
from raysc.search import search

SPACE = {
    "name": "trial_overhead",
    "fixed": {"model.frontend": FRONTEND, "batch_size": 16},
    "params": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
    "backbones": {"stats": {}},
    "resources": {"workers": 1, "cpus_per_worker": 2},
    "scheduler": {"grace_steps": 1, "reduction_factor": 2, "max_epochs": 3},
}
LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"


def _log_times(text: str, pattern: str) -> list[float]:
    return [
        datetime.strptime(m.group(1), LOG_TIME).timestamp()
        for m in re.finditer(r"^(\S+ \S+) .*" + pattern, text, re.MULTILINE)
    ]


def measure(exp: Path, lines: list[tuple[float, str]], wall: float) -> dict:
    """Start, gap and fixed cost per trial of one finished search."""
    started = {m.group(1): t for t, line in lines if (m := re.search(r" start (\w+):", line))}
    ended = {m.group(1): t for t, line in lines if (m := re.search(r" (?:completed|stopped|failed) (\w+)", line))}
    records = Experiment(exp).records()
    starts, trained = {}, 0.0
    for r in records:
        history = json.loads((exp / r.model_path).with_name("metrics.json").read_text())["history"]
        trained += sum(h["epoch_seconds"] for h in history)
        first_epoch_end = _log_times((exp / r.model_path).with_name("train.log").read_text(), r"epoch 1/")[0]
        starts[r.trial_id] = first_epoch_end - history[0]["epoch_seconds"] - started[r.trial_id]
    order = sorted(started, key=started.get)
    gaps = [started[b] - ended[a] for a, b in itertools.pairwise(order)]
    return {
        "trials": len(records),
        "wall_s": wall,
        "trained_s": trained,
        "fixed_per_trial_s": (wall - trained) / len(records),
        "start_first_s": starts[order[0]],
        "start_median_s": statistics.median(starts.values()),
        "start_max_s": max(starts.values()),
        "gap_median_s": statistics.median(gaps) if gaps else None,
        "gap_max_s": max(gaps) if gaps else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--smoke-test", action="store_true", help="3 trials")
    args = parser.parse_args(argv)
    trials = 3 if args.smoke_test else args.trials
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = small_data(work, 120)
        space = work / "space.yaml"
        space.write_text(yaml.safe_dump(SPACE))
        init_ray(None, num_cpus=2)  # one Ray for both: its own start-up is not a trial's
        for mode in ("auto", "always"):
            lines: list[tuple[float, str]] = []
            t0 = time.time()
            search(
                space,
                data=data,
                experiment=work / f"exp-{mode}",
                trials=trials,
                max_concurrent=1,
                early_stopping=False,
                ray_train=mode,
                progress=lambda line, lines=lines: lines.append((time.time(), line)),
            )
            results[mode] = measure(work / f"exp-{mode}", lines, time.time() - t0)
    names = {"auto": "in-process (ray_train auto)", "always": "Ray Train TorchTrainer (ray_train always)"}
    rows = [
        [
            names[mode],
            r["trials"],
            f"{r['wall_s']:.1f}",
            f"{r['trained_s']:.1f}",
            f"{r['fixed_per_trial_s']:.2f}",
            f"{r['start_first_s']:.2f}",
            f"{r['start_median_s']:.2f}",
            f"{r['gap_median_s']:.2f}" if r["gap_median_s"] is not None else "",
        ]
        for mode, r in results.items()
    ]
    ratio = results["always"]["fixed_per_trial_s"] / max(results["auto"]["fixed_per_trial_s"], 1e-9)
    cmd = "python benchmarks/trial_overhead.py" + (" --smoke-test" if args.smoke_test else f" --trials {trials}")
    md = (
        f"`{cmd}`: {trials} `stats` trials of {SPACE['scheduler']['max_epochs']} epochs on 1 s clips, one at a "
        "time, no early stopping, one local Ray (2 CPUs), both searches in one run.\n\n"
        + md_table(
            [
                "trials run as",
                "trials",
                "search wall s",
                "training s (all epochs)",
                "fixed cost per trial s",
                "first trial: start to first batch s",
                "median start to first batch s",
                "median gap between trials s",
            ],
            rows,
        )
        + f"\nFixed cost per trial, Ray Train / in-process: {ratio:.1f}x.\n"
    )
    name = "trial_overhead" + ("_smoke" if args.smoke_test else "")
    return write_results(name, {"args": vars(args), "results": results, "ratio": ratio}, md)


if __name__ == "__main__":
    raise SystemExit(main())
