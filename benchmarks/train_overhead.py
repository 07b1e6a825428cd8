"""What raysc's training machinery costs over a bare PyTorch loop of the same model and data.

Side by side in one run, the same backbone, clips, batch size and epochs:
- bare: all training clips in one tensor, forward/backward/Adam step, a validation pass per
  epoch; nothing else;
- fit: ``raysc.train.fit`` in this process (loaders from the memory-mapped store, metrics,
  checkpoints, outputs);
- ray x1 / ray x2: ``raysc train`` through Ray Train with 1 worker on all cores and 2 workers
  on half each (Ray gives a worker one torch thread per CPU it holds; gloo between workers);
- search trial: the same configuration as the one trial of a ``raysc search`` (no early
  stopping), which trains in its own Tune process on all cores;
- fit again while a local Ray idles beside it: what Ray's own processes (raylet, GCS,
  dashboard) take from the cores, whatever runs the training;
- the bare loop again in a process with glibc's default malloc settings: this script runs with
  the settings raysc gives its Ray workers (``raysc.malloc.MALLOC_ENV``), so that every
  other row compares like with like, and this row shows what the settings themselves buy.
Reported: wall time of the whole call (Ray's start-up included) and steady-state seconds per
epoch (epochs 2..): for raysc's runs the time from one epoch's end to the next's, so each
epoch's checkpoint and report are in it, with ratios to the bare loop.

    python benchmarks/train_overhead.py
    python benchmarks/train_overhead.py --smoke-test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from common import md_table, write_results  # the script folder is on sys.path

from raysc.config import make_config
from raysc.datafolder import load_dataset
from raysc.distributed import init_ray, train
from raysc.malloc import MALLOC_ENV
from raysc.models import create_model
from raysc.prepare import prepare
from raysc.search import search
from raysc.synth import DEV_METADATA, EVAL_METADATA, synthesize
from raysc.train import fit


def bare_loop(cfg, data_dir: Path) -> tuple[float, list[float]]:
    torch.manual_seed(cfg.seed)
    data = load_dataset(data_dir)
    m = data.manifest
    lab = m[m["subset"] == "labelled"]
    tr, va = lab[lab["fold"] != cfg.fold], lab[lab["fold"] == cfg.fold]
    t0 = time.perf_counter()
    model = create_model(
        cfg.backbone,
        **cfg.model_overrides(classes=data.classes, cities=data.cities, sample_rate=data.store.spec.sample_rate),
    )
    x = torch.from_numpy(data.store.load(tr["filename"]))
    y = torch.from_numpy(data.one_hot(tr))
    city = torch.from_numpy(tr["city_idx"].to_numpy().copy())
    tm = torch.from_numpy(
        tr[[c for c in m.columns if c.startswith(("tod", "dow", "doy", "weekend"))]].to_numpy(np.float32)
    )
    xv = torch.from_numpy(data.store.load(va["filename"]))
    cv = torch.from_numpy(va["city_idx"].to_numpy().copy())
    tv = torch.from_numpy(
        va[[c for c in m.columns if c.startswith(("tod", "dow", "doy", "weekend"))]].to_numpy(np.float32)
    )
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    epochs = []
    for _ in range(cfg.epochs):
        e0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = torch.nn.functional.cross_entropy(model(x[idx], city[idx], tm[idx], y[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for i in range(0, len(xv), cfg.batch_size):
                model(xv[i : i + cfg.batch_size], cv[i : i + cfg.batch_size], tv[i : i + cfg.batch_size])
        epochs.append(time.perf_counter() - e0)
    return time.perf_counter() - t0, epochs


def bare_loop_default_malloc(cfg, data_dir: Path) -> tuple[float, list[float]]:
    """``bare_loop`` in a fresh process started without raysc's malloc settings."""
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    code = (
        "import json, sys; from train_overhead import bare_loop; from raysc.config import make_config; "
        "print(json.dumps(bare_loop(make_config(json.loads(sys.argv[1])), sys.argv[2])))"
    )
    cmd = [sys.executable, "-c", code, json.dumps(cfg.to_dict()), str(data_dir)]
    out = subprocess.run(cmd, env=env, cwd=Path(__file__).parent, capture_output=True, text=True, check=True)
    total, epochs = json.loads(out.stdout.strip().splitlines()[-1])
    return total, epochs


def loop_seconds(history: list[dict]) -> list[float]:
    """Seconds per epoch of a raysc run: epoch 1's own timing, then from one epoch's end to the
    next's (so a checkpoint written and a result reported between them count)."""
    ends = [h["finished_at"] for h in history]
    return [history[0]["epoch_seconds"], *np.diff(ends).tolist()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="rm3")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--clips", type=int, default=480)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        # glibc reads them at start: run again with the settings raysc's Ray workers get.
        script = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
        os.execve(sys.executable, script, {**os.environ, **MALLOC_ENV})
    seconds = 10.0
    if args.smoke_test:
        args.clips, args.epochs, seconds = 120, 2, 1.0
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        synthesize(
            raw,
            clips=args.clips,
            eval_clips=10,
            labelled_fraction=0.5,
            sample_rate=16000,
            clip_seconds=seconds,
            workers=2,
            seed=0,
        )
        data = Path(tmp) / "data"
        prepare(
            dev_meta=raw / DEV_METADATA,
            eval_meta=raw / EVAL_METADATA,
            audio_dirs=[raw / "audio"],
            out=data,
            sample_rate=16000,
            clip_seconds=seconds,
            folds=5,
            workers=2,
        )
        cfg = make_config(
            {
                "backbone": args.backbone,
                "model": {"width": args.width},
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": 1e-3,
                "session_labels": False,  # the bare loop trains on the labelled clips only
            }
        )
        runs = {}
        total, epochs = bare_loop(cfg, data)
        runs["bare PyTorch loop"] = (total, epochs)
        runs["bare PyTorch loop, glibc's default malloc settings"] = bare_loop_default_malloc(cfg, data)
        t = time.perf_counter()
        res = fit(cfg, data, out_dir=Path(tmp) / "fit")
        runs["raysc fit (no Ray)"] = (time.perf_counter() - t, loop_seconds(res.history))
        labelled = res.history[0]["train_clips"]
        init_ray()
        # The same fit with a local Ray idling beside it: what Ray's own processes take from the cores.
        t = time.perf_counter()
        res = fit(cfg, data, out_dir=Path(tmp) / "fit-ray-idle")
        runs["raysc fit (no Ray), a local Ray idling"] = (time.perf_counter() - t, loop_seconds(res.history))
        cores = os.cpu_count() or 1
        for workers in (1, 2):
            # Ray gives a worker as many torch threads as CPUs: split the cores as the bare loop uses them.
            t = time.perf_counter()
            metrics = train(cfg, data, Path(tmp) / f"ray{workers}", workers=workers, cpus_per_worker=cores / workers)
            runs[f"raysc train --workers {workers}"] = (time.perf_counter() - t, loop_seconds(metrics["history"]))
        space = Path(tmp) / "space.yaml"
        space.write_text(
            yaml.safe_dump(
                {
                    "fixed": {
                        "model.width": args.width,
                        "batch_size": args.batch_size,
                        "epochs": args.epochs,
                        "session_labels": False,
                    },
                    "params": {"lr": {"type": "categorical", "choices": [1e-3]}},
                    "backbones": {args.backbone: {}},
                    "resources": {"workers": 1, "cpus_per_worker": cores},
                    "scheduler": {"grace_steps": 1, "reduction_factor": 2, "max_epochs": args.epochs},
                }
            )
        )
        t = time.perf_counter()
        found = search(space, data=data, experiment=Path(tmp) / "exp", trials=1, early_stopping=False)
        history = json.loads((Path(tmp) / "exp" / found.best.model_path).with_name("metrics.json").read_text())
        runs["raysc search, one trial (in its Tune process)"] = (
            time.perf_counter() - t,
            loop_seconds(history["history"]),
        )
    base_total, base_epochs = runs["bare PyTorch loop"]
    base_steady = float(np.mean(base_epochs[1:] or base_epochs))
    rows, result = [], {}
    for name, (total, epochs) in runs.items():
        steady = float(np.mean(epochs[1:] or epochs))
        result[name] = {
            "total_s": total,
            "epoch_s": epochs,
            "steady_epoch_s": steady,
            "train_clips_per_s": labelled / steady,
        }
        rows.append(
            [
                name,
                f"{total:.1f}",
                f"{total / base_total:.2f}",
                f"{steady:.2f}",
                f"{steady / base_steady:.2f}",
                f"{labelled / steady:.1f}",
            ]
        )
    cmd = "python benchmarks/train_overhead.py" + (" --smoke-test" if args.smoke_test else "")
    md = (
        f"# Training overhead: raysc vs a bare PyTorch loop\n\n`{cmd}`: {args.backbone} (width {args.width:g}), "
        f"~{labelled} training clips of {seconds:g} s at 16 kHz, batch {args.batch_size}, {args.epochs} epochs, "
        "on this machine's CPU cores, in one run.\n\n"
        + md_table(["run", "wall s", "wall / bare", "s per epoch (steady)", "epoch / bare", "train clips/s"], rows)
    )
    return write_results(
        "train_overhead" + ("_smoke" if args.smoke_test else ""), {"args": vars(args), "runs": result}, md
    )


if __name__ == "__main__":
    raise SystemExit(main())
