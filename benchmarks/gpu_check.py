"""The CUDA paths no CPU test can reach, checked and measured on one GPU (under 8 minutes).

1. throughput: every backbone at paper size (width 1), 10 s clips, batch 32: training clips/s
   under bf16 autocast and in fp32, and peak GPU memory; under bf16 also with channels-last
   tensors and through torch.compile (compiled while 90 s last);
2. search: a 4-trial search whose trials take 0.25 GPU each, so that all four share the GPU at
   once (checked: every trial trained on CUDA, all four ran at one moment, all completed);
3. ddp: ``raysc train`` with 2 workers of 0.5 GPU each on the one GPU (NCCL), checked against
   the same run with 1 worker (same clips per epoch, metrics close);
4. mamba: the chunked parallel selective scan on CUDA against the sequential scan and the
   step-by-step reference (largest difference, milliseconds);
5. plan: the default space's plan measured in a Ray task holding a quarter GPU (on the GPU);
6. pipeline: `raysc synth`, `raysc prepare` and `raysc pipeline --time-budget 5` (the default)
   on 1,200 challenge-shaped clips, ending in a checked submission.

Each check records ``ok`` and its error instead of stopping the others. Writes
``OUT/gpu_check.json`` and ``OUT/gpu_check.md``.

    bash benchmarks/gpu_check.sh OUT
    python benchmarks/gpu_check.py --out OUT --smoke-test     # on a CPU: the same code, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import queue
import re
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from common import FRONTEND_8K, dumps, machine, md_table, small_data  # the script folder is on sys.path

from raysc.config import make_config
from raysc.distributed import ddp_backend, free_port, init_ray, measure_plan, train
from raysc.experiment import Experiment
from raysc.models import create_model, list_models
from raysc.models.mamba import selective_scan, selective_scan_reference
from raysc.models.summary import training_throughput
from raysc.search import search
from raysc.search_space import load_search_space
from raysc.submission import check_submission_file
from raysc.synth import DEV_METADATA, EVAL_METADATA

log = logging.getLogger("gpu_check")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check_throughput(device: str, smoke: bool, progress: Callable[[list[dict[str, Any]]], None]) -> dict[str, Any]:
    """Calls ``progress`` after each backbone, so that those measured survive a cut-short run.

    A backbone that runs out of memory at the paper's batch is measured at the largest halved
    batch that fits (the row says which), since that is what a user of that GPU would train with.
    """
    width, batch, seconds = (0.125, 2, 1.0) if smoke else (1.0, 32, 10.0)
    rows: list[dict[str, Any]] = []
    compile_until = time.time() + COMPILE_SECONDS  # compiling every backbone would not fit 8 minutes
    for name in list_models():
        row: dict[str, Any] = {"backbone": name, "width": width, "batch": batch}
        for key, amp, layout in VARIANTS:
            if layout == "compile" and (smoke or time.time() > compile_until):
                # On a CPU (the smoke test) inductor compiles C++ for minutes per network.
                row[f"{key}_skipped"] = "smoke test" if smoke else "time"
                continue
            b = batch
            while b >= 1:
                torch.manual_seed(0)
                model = create_model(name, width=width)
                if layout == "channels_last":
                    model = model.to(memory_format=torch.channels_last)
                elif layout == "compile":
                    model = torch.compile(model)
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    row[f"{key}_clips_per_s"] = training_throughput(
                        model, batch=b, seconds=seconds, device=device, amp=amp, min_steps=2, min_time=3.0
                    )
                    if device == "cuda":
                        row[f"{key}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    row[f"{key}_batch"] = b
                    break
                except torch.OutOfMemoryError:
                    row[f"{key}_oom_at_batch"] = b
                    b //= 2
                finally:
                    del model
        rows.append(row)
        log.info("throughput %s", row)
        progress(rows)
    return {"rows": rows}


# (column key, autocast, layout): every backbone in fp32 and bf16, bf16 with channels-last
# tensors, and bf16 through torch.compile while COMPILE_SECONDS last.
VARIANTS = (
    ("bf16", "bf16", None),
    ("fp32", None, None),
    ("bf16_cl", "bf16", "channels_last"),
    ("bf16_compile", "bf16", "compile"),
)
COMPILE_SECONDS = 90


def check_plan(device: str, data: Path) -> dict[str, Any]:
    """The pipeline's plan of the default space, measured in a Ray task holding one trial's
    resources (a quarter GPU): on the GPU, not on the driver's CPU."""
    space = load_search_space("default")
    gpus = space.resources.gpus_per_worker if device == "cuda" else 0.0
    init_ray(None, num_cpus=None if device == "cuda" else 2)
    plans, where = measure_plan(space, data, budget_minutes=5.0, trials=16, cpus=1.0, gpus=gpus, concurrency=4)
    rows = {p.backbone: {"s_per_step": p.seconds_per_step, "kept": p.fits, "width": p.width} for p in plans}
    on_gpu = device != "cuda" or not where.startswith("CPU")
    return {"ok": on_gpu and bool(plans), "measured": where, "backbones": rows}


def check_pipeline(device: str, work: Path, smoke: bool) -> dict[str, Any]:
    """``raysc pipeline --time-budget 5`` (the default) on challenge-shaped synthetic data, as a
    user runs it; ends in a checked submission."""
    import subprocess
    import sys

    minutes = "2" if smoke else "5"
    raw, data, exp = work / "raw", work / "data", work / "exp"
    clips, eval_clips, rate, seconds = ("60", "20", "8000", "1") if smoke else ("1200", "600", "44100", "10")
    synth = [sys.executable, "-m", "raysc.cli", "synth", str(raw), "--clips", clips, "--eval-clips", eval_clips]
    synth += ["--sample-rate", rate, "--clip-seconds", seconds, "--workers", "8"]
    prepare = [sys.executable, "-m", "raysc.cli", "prepare", "--dev-meta", str(raw / DEV_METADATA)]
    prepare += ["--eval-meta", str(raw / EVAL_METADATA), "--audio", str(raw / "audio"), "--out", str(data)]
    prepare += ["--sample-rate", rate, "--clip-seconds", seconds, "--workers", "8"]
    pipeline = [sys.executable, "-m", "raysc.cli", "pipeline", "--data", str(data), "--experiment", str(exp)]
    pipeline += ["--time-budget", minutes]
    t0, outputs = time.time(), []
    for cmd in (synth, prepare, pipeline):
        done = subprocess.run(cmd, capture_output=True, text=True)
        outputs.append(done.stdout + done.stderr)
        if done.returncode != 0:
            return {"ok": False, "failed": cmd[3], "output": outputs[-1][-3000:]}
    pipeline_s = time.time() - t0
    check_submission_file(exp / "submission" / "submission.csv", data)
    plan = [line for line in outputs[-1].splitlines() if "measured where trials run" in line]
    return {"ok": True, "wall_s": pipeline_s, "budget_min": float(minutes), "plan": plan[:1]}


def _space(gpus: float, cpus: float) -> dict[str, Any]:
    return {
        "name": "gpu_check",
        "fixed": {"model.width": 0.5, "model.frontend": FRONTEND_8K, "batch_size": 16, "epochs": 8},
        "params": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "backbones": {"mobileascnet": {}},
        "resources": {"workers": 1, "gpus_per_worker": gpus, "cpus_per_worker": cpus},
        "scheduler": {"grace_steps": 1, "reduction_factor": 2, "max_epochs": 8},
    }


def check_search(device: str, data: Path, work: Path) -> dict[str, Any]:
    gpus, cpus = (0.25, 1) if device == "cuda" else (0.0, 0.5)
    space = work / "space.yaml"
    space.write_text(yaml.safe_dump(_space(gpus, cpus)))
    lines: list[tuple[float, str]] = []
    t0 = time.time()
    init_ray(None, num_cpus=None if device == "cuda" else 2)
    result = search(
        space,
        data=data,
        experiment=work / "exp-search",
        trials=4,
        max_concurrent=4,
        early_stopping=False,
        progress=lambda line: lines.append((time.time(), line)),
    )
    start = {m.group(1): t for t, line in lines if (m := re.search(r" start (\w+):", line))}
    end = {m.group(1): t for t, line in lines if (m := re.search(r" (?:completed|stopped|failed) (\w+)", line))}
    # The most trials running at one moment (each trial from its start line to its end line).
    peak = max((sum(start[o] <= t < end.get(o, math.inf) for o in start) for t in start.values()), default=0)
    devices = []
    for r in result.records:
        text = Experiment(work / "exp-search").trial_log(0, r.trial_id).read_text()
        devices += re.findall(r"training on (\S+),", text)
    return {
        "ok": len(result.records) == 4
        and all(r.status == "completed" for r in result.records)
        and (peak == 4 or device == "cpu")  # on the GPU all four share it at once
        and all(d.startswith(device) for d in devices)
        and len(devices) >= 4,
        "gpus_per_trial": gpus,
        "statuses": [r.status for r in result.records],
        "macro_accuracy": [r.metrics["macro_accuracy"] for r in result.records],
        "devices": sorted(set(devices)),
        "peak_trials_at_once": peak,
        "wall_s": time.time() - t0,
    }


def check_ddp(device: str, data: Path, work: Path) -> dict[str, Any]:
    gpus = 1.0 if device == "cuda" else 0.0  # the one GPU, split between the workers
    cfg = make_config(
        {
            "backbone": "mobileascnet",
            "model": {"width": 0.5, "frontend": FRONTEND_8K},
            "batch_size": 16,
            "epochs": 3,
            "lr": 3e-3,
        }
    )
    init_ray(None, num_cpus=None if device == "cuda" else 2)
    runs = {}
    for workers in (1, 2):
        t0 = time.time()
        m = train(cfg, data, work / f"ddp-{workers}", workers=workers, gpus_per_worker=gpus / workers)
        runs[workers] = {
            "wall_s": time.time() - t0,
            "macro_accuracy": m["best"].get("macro_accuracy"),
            "train_clips": [h["train_clips"] for h in m["history"]],
            "epoch_seconds": [h["epoch_seconds"] for h in m["history"]],
        }
    return {
        "ok": runs[1]["train_clips"] == runs[2]["train_clips"]
        and abs(runs[1]["macro_accuracy"] - runs[2]["macro_accuracy"]) <= 0.15,
        "gpus_per_worker_with_2": gpus / 2,
        "backend_with_2": ddp_backend(2, gpus / 2),
        "runs": runs,
    }


def _allreduce_rank(rank: int, world: int, backend: str, port: int, results: Any) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        x = torch.full((1024,), float(rank + 1), device="cuda" if backend == "nccl" else "cpu")
        dist.all_reduce(x)
        if backend == "nccl":
            torch.cuda.synchronize()
        results.put((rank, "ok", float(x[0])))
        dist.destroy_process_group()
    except Exception as exc:  # reported to the parent, which records it
        results.put((rank, "error", f"{type(exc).__name__}: {exc}"[:500]))


def check_nccl(device: str) -> dict[str, Any]:
    """Two NCCL ranks on the one GPU, outside Ray: the case ``ddp_backend`` routes to gloo."""
    import torch.multiprocessing as mp

    backend = "nccl" if device == "cuda" else "gloo"
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, 2, backend, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    outcomes = []
    deadline = time.time() + 90  # a hang is an outcome too
    while len(outcomes) < 2 and time.time() < deadline:
        try:
            outcomes.append(results.get(timeout=max(0.1, deadline - time.time())))
        except queue.Empty:
            break
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    two_ranks_ok = len(outcomes) == 2 and all(o[1] == "ok" and o[2] == 3.0 for o in outcomes)
    # Not a pass/fail check: it records whether this NCCL accepts two ranks on one GPU.
    return {"backend": backend, "two_ranks_one_gpu_ok": two_ranks_ok, "outcomes": sorted(outcomes)}


def check_mamba(device: str, smoke: bool) -> dict[str, Any]:
    b, length, d, n = (2, 64, 8, 4) if smoke else (64, 512, 256, 16)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(b, length, d, generator=g).to(device)
    delta = torch.nn.functional.softplus(torch.randn(b, length, d, generator=g)).to(device)
    a = -torch.exp(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1)).to(device)
    bb = torch.randn(b, length, n, generator=g).to(device)
    cc = torch.randn(b, length, n, generator=g).to(device)
    dd = torch.randn(d, generator=g).to(device)
    out: dict[str, Any] = {"shape": [b, length, d, n]}
    results = {}
    for name, fn in (
        ("parallel", lambda: selective_scan(u, delta, a, bb, cc, dd, method="parallel")),
        ("sequential", lambda: selective_scan(u, delta, a, bb, cc, dd, method="sequential")),
        ("reference", lambda: selective_scan_reference(u, delta, a, bb, cc, dd)),
    ):
        with torch.no_grad():
            results[name] = fn()
            _sync(device)
            t0 = time.perf_counter()
            reps = 3
            for _ in range(reps):
                fn()
            _sync(device)
        out[f"{name}_ms"] = (time.perf_counter() - t0) / reps * 1000
    scale = results["reference"].abs().max().item()
    out["max_diff_parallel"] = (results["parallel"] - results["reference"]).abs().max().item() / scale
    out["max_diff_sequential"] = (results["sequential"] - results["reference"]).abs().max().item() / scale
    out["ok"] = out["max_diff_parallel"] < 1e-4 and out["max_diff_sequential"] < 1e-4
    return out


def _run(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.time()
    try:
        out = fn()
    except Exception as exc:  # one failed check must not hide the others' numbers
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    out["seconds"] = time.time() - t0
    log.info("%s: %s", name, "ok" if out.get("ok", True) else "FAILED")
    return out


def _cell(row: dict[str, Any], amp: str, key: str) -> str:
    if f"{amp}_clips_per_s" not in row:
        return "out of memory at batch 1" if key.endswith("clips_per_s") else ""
    value = row.get(key, "")
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _markdown(checks: dict[str, Any]) -> str:
    tput = checks.get("throughput", {}).get("rows", [])
    return (
        f"`bash benchmarks/gpu_check.sh OUT` on {checks['device']}: training throughput at width "
        f"{tput[0]['width'] if tput else '-'}, batch {tput[0]['batch'] if tput else '-'}\n\n"
        + md_table(
            [
                "backbone",
                "bf16 batch",
                "bf16 clips/s",
                "bf16 peak GiB",
                "fp32 batch",
                "fp32 clips/s",
                "fp32 peak GiB",
                "bf16 channels-last clips/s",
                "bf16 compiled clips/s",
            ],
            [
                [
                    r["backbone"],
                    *(
                        _cell(r, amp, k)
                        for amp in ("bf16", "fp32")
                        for k in (f"{amp}_batch", f"{amp}_clips_per_s", f"{amp}_peak_gib")
                    ),
                    _cell(r, "bf16_cl", "bf16_cl_clips_per_s"),
                    _cell(r, "bf16_compile", "bf16_compile_clips_per_s") if "bf16_compile_skipped" not in r else "-",
                ]
                for r in tput
            ],
        )
        + "\n"
        + md_table(
            ["check", "ok", "seconds", "details"],
            [
                [
                    name,
                    checks[name].get("ok"),
                    f"{checks[name]['seconds']:.0f}",
                    json.dumps({k: v for k, v in checks[name].items() if k not in ("ok", "seconds", "traceback")})[
                        :400
                    ],
                ]
                for name in ("search", "ddp", "plan", "pipeline", "mamba", "nccl")
                if name in checks
            ],
        )
    )


def _save(out: Path, checks: dict[str, Any]) -> None:
    """Write what is measured so far, so that a run cut short by its time limit still reports."""
    (out / "gpu_check.json").write_text(dumps({**checks, "machine": machine()}))
    (out / "gpu_check.md").write_text(_markdown(checks))


PARTS = ("mamba", "nccl", "search", "ddp", "plan", "throughput", "pipeline")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and .md")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes; runs on a CPU")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="comma-separated checks to run (default all); results merge into OUT/gpu_check.json",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parts = args.parts.split(",")
    if unknown := sorted(set(parts) - set(PARTS)):
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    device = "cuda" if torch.cuda.is_available() and not args.smoke_test else "cpu"
    if device == "cpu" and not args.smoke_test:
        parser.error("no CUDA device: this check is for a GPU machine (--smoke-test runs it tiny on a CPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    # Another invocation's parts (the shell script runs Ray's checks apart, under their own time limit).
    saved = args.out / "gpu_check.json"
    checks: dict[str, Any] = json.loads(saved.read_text()) if saved.is_file() else {}
    checks.pop("machine", None)
    checks["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if "mamba" in parts:
        checks["mamba"] = _run("mamba", lambda: check_mamba(device, args.smoke_test))
        _save(args.out, checks)
    if "nccl" in parts:
        checks["nccl"] = _run("nccl", lambda: check_nccl(device))
        _save(args.out, checks)
    if "search" in parts or "ddp" in parts or "plan" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            data = small_data(work, 60 if args.smoke_test else 240)
            if "plan" in parts:
                checks["plan"] = _run("plan", lambda: check_plan(device, data))
                _save(args.out, checks)
            if "search" in parts:
                checks["search"] = _run("search", lambda: check_search(device, data, work))
                _save(args.out, checks)
            if "ddp" in parts:
                checks["ddp"] = _run("ddp", lambda: check_ddp(device, data, work))
                _save(args.out, checks)
    if "throughput" in parts:
        checks["throughput"] = _run(
            "throughput",
            lambda: check_throughput(
                device, args.smoke_test, lambda rows: _save(args.out, {**checks, "throughput": {"rows": rows}})
            ),
        )
        _save(args.out, checks)
    if "pipeline" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            checks["pipeline"] = _run("pipeline", lambda: check_pipeline(device, Path(tmp), args.smoke_test))
            _save(args.out, checks)
    print(_markdown(checks))
    gated = ("search", "ddp", "mamba", "plan", "pipeline")
    return 0 if all(checks[n].get("ok") for n in gated if n in parts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
