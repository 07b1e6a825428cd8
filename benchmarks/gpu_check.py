"""The CUDA paths no CPU test can reach, checked and measured on one GPU (under 8 minutes).

1. throughput: every backbone at paper size (width 1), 10 s clips, batch 32: training clips/s
   under bf16 autocast and in fp32, and peak GPU memory;
2. search: a 4-trial search whose trials take 0.25 GPU each, so that all four share the GPU at
   once (checked: every trial trained on CUDA, all four ran at one moment, all completed);
3. ddp: ``raysc train`` with 2 workers of 0.5 GPU each on the one GPU (NCCL), checked against
   the same run with 1 worker (same clips per epoch, metrics close);
4. mamba: the chunked parallel selective scan on CUDA against the sequential scan and the
   step-by-step reference (largest difference, milliseconds).

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
from raysc.distributed import init_ray, train
from raysc.experiment import Experiment
from raysc.models import create_model, list_models
from raysc.models.mamba import selective_scan, selective_scan_reference
from raysc.models.summary import training_throughput
from raysc.search import search

log = logging.getLogger("gpu_check")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check_throughput(device: str, smoke: bool) -> dict[str, Any]:
    width, batch, seconds = (0.125, 2, 1.0) if smoke else (1.0, 32, 10.0)
    rows = []
    for name in list_models():
        row: dict[str, Any] = {"backbone": name, "width": width, "batch": batch}
        for amp in ("bf16", None):
            torch.manual_seed(0)
            model = create_model(name, width=width)
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            key = amp or "fp32"
            try:
                row[f"{key}_clips_per_s"] = training_throughput(
                    model, batch=batch, seconds=seconds, device=device, amp=amp, min_steps=2, min_time=4.0
                )
                if device == "cuda":
                    row[f"{key}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except torch.OutOfMemoryError as exc:
                row[f"{key}_error"] = f"out of memory: {exc}"[:300]
            del model
        rows.append(row)
        log.info("throughput %s", row)
    return {"rows": rows}


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
        "runs": runs,
    }


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and .md")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes; runs on a CPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = "cuda" if torch.cuda.is_available() and not args.smoke_test else "cpu"
    if device == "cpu" and not args.smoke_test:
        parser.error("no CUDA device: this check is for a GPU machine (--smoke-test runs it tiny on a CPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    checks: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    checks["throughput"] = _run("throughput", lambda: check_throughput(device, args.smoke_test))
    checks["mamba"] = _run("mamba", lambda: check_mamba(device, args.smoke_test))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = small_data(work, 60 if args.smoke_test else 240)
        init_ray(None, num_cpus=2 if args.smoke_test else None)
        checks["search"] = _run("search", lambda: check_search(device, data, work))
        checks["ddp"] = _run("ddp", lambda: check_ddp(device, data, work))
    (args.out / "gpu_check.json").write_text(dumps({**checks, "machine": machine()}))
    tput = checks["throughput"].get("rows", [])
    md = (
        f"`bash benchmarks/gpu_check.sh OUT` on {checks['device']}: training throughput at width "
        f"{tput[0]['width'] if tput else '-'}, batch {tput[0]['batch'] if tput else '-'}\n\n"
        + md_table(
            ["backbone", "bf16 clips/s", "bf16 peak GiB", "fp32 clips/s", "fp32 peak GiB"],
            [
                [
                    r["backbone"],
                    *(
                        f"{r[k]:.1f}" if isinstance(r.get(k), float) else r.get(k.replace("clips_per_s", "error"), "")
                        for k in ("bf16_clips_per_s", "bf16_peak_gib", "fp32_clips_per_s", "fp32_peak_gib")
                    ),
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
                for name in ("search", "ddp", "mamba")
            ],
        )
    )
    (args.out / "gpu_check.md").write_text(md)
    print(md)
    return 0 if all(checks[n].get("ok") for n in ("search", "ddp", "mamba")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
