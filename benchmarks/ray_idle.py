"""What an idle local Ray takes from the CPU, with raysc's quieter timers and with Ray's own.

A local Ray that raysc starts gets longer polling intervals for its dashboard, metrics and
autoscaler monitor (``raysc.distributed.QUIET_ENV``). This starts a local Ray the way raysc does,
lets it settle, and reads every process's CPU time from ``/proc`` over a window; then the same
with Ray's defaults (each variable set to Ray's own default value, which raysc leaves alone), in
alternating rounds, side by side in one run. Linux only (``/proc``).

    python benchmarks/ray_idle.py
    python benchmarks/ray_idle.py --smoke-test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import md_table, write_results  # the script folder is on sys.path

from raysc.distributed import QUIET_ENV

# Ray 2.60's own values for the variables raysc sets.
RAY_DEFAULTS = {
    "REPORTER_UPDATE_INTERVAL_MS": "5000",
    "NODE_STATS_UPDATE_INTERVAL_SECONDS": "15",
    "METRICS_RECORD_INTERVAL_S": "5",
    "RAY_metrics_report_interval_ms": "10000",
    "SCAN_EVENT_DIR_INTERVAL_SECONDS": "2",
    "AUTOSCALER_UPDATE_INTERVAL_S": "5",
}
# How a Ray process shows on its command line, for the per-process columns.
KINDS = {
    "raylet/raylet ": "raylet",  # first: its command line names the agents it starts
    "gcs_server ": "GCS",
    "dashboard/agent.py": "dashboard agent",
    "dashboard/dashboard.py": "dashboard",
    "ray-dashboard-": "dashboard modules",
    "forkserver": "dashboard modules",
    "log_monitor": "log monitor",
    "autoscaler/_private/monitor.py": "autoscaler monitor",
    "ray::IDLE": "idle workers",
    "runtime_env": "runtime env agent",
}


def cpu_seconds() -> dict[int, tuple[str, int, float]]:
    """CPU seconds (user + system) of every process, with its command line and parent."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(proc.name)] = (cmd, int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def measure(settle: float, window: float) -> dict[str, float]:
    """In a fresh process: start a local Ray as raysc does, wait, and return each kind of Ray
    process's share of one core over the window."""
    import ray

    from raysc.distributed import init_ray

    init_ray()
    time.sleep(settle)
    before, t0 = cpu_seconds(), time.perf_counter()
    time.sleep(window)
    after, elapsed = cpu_seconds(), time.perf_counter() - t0
    # This Ray's processes: a local Ray's daemons are this process's children, its workers and
    # agents their children (and so on); another Ray on the machine is left out.
    ours, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, (_, parent, _) in after.items() if parent in ours} - ours
        ours |= more
        grew = bool(more)
    ours.discard(os.getpid())
    shares: dict[str, float] = {}
    for pid in ours & before.keys():
        cmd, _, cpu = after[pid]
        kind = next((name for key, name in KINDS.items() if key in cmd), "other")
        shares[kind] = shares.get(kind, 0.0) + (cpu - before[pid][2]) / elapsed
    ray.shutdown()
    return shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both settings (default 3)")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds after start-up before measuring")
    parser.add_argument("--window", type=float, default=40.0, help="seconds measured")
    parser.add_argument("--smoke-test", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.settle, args.window)))
        return 0
    if args.smoke_test:
        args.rounds, args.settle, args.window = 1, 5.0, 5.0
    variants = {"raysc's timers": QUIET_ENV, "Ray's defaults": RAY_DEFAULTS}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, values in variants.items():
            env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV and k != "RAY_ADDRESS"} | values
            cmd = [sys.executable, __file__, "--child", "1", "--settle", str(args.settle), "--window", str(args.window)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    kinds = sorted({k for per_round in runs.values() for shares in per_round for k in shares})
    rows, result = [], {}
    for name, shares in runs.items():
        totals = [sum(s.values()) for s in shares]
        result[name] = {"total_core_share": totals, "per_kind": shares}
        per_kind = [f"{100 * statistics.mean(s.get(k, 0.0) for s in shares):.1f}" for k in kinds]
        rows.append([name, f"{100 * statistics.mean(totals):.1f}", f"{100 * min(totals):.1f}-{100 * max(totals):.1f}"])
        rows[-1] += per_kind
    cmd = "python benchmarks/ray_idle.py" + (" --smoke-test" if args.smoke_test else "")
    md = (
        f"# What an idle local Ray takes from the CPU\n\n`{cmd}`: {args.rounds} alternating round(s), "
        f"{args.window:g} s measured after {args.settle:g} s of settling; % of one core, mean over rounds.\n\n"
        + md_table(["timers", "all of Ray, %", "range, %", *(f"{k}, %" for k in kinds)], rows)
    )
    return write_results("ray_idle" + ("_smoke" if args.smoke_test else ""), {"args": vars(args), "runs": result}, md)


if __name__ == "__main__":
    raise SystemExit(main())
