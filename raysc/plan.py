"""The pipeline's plan: what a search space can afford on the hardware it meets.

Before round 0 the pipeline measures each candidate backbone's seconds per training step where
trials run (``distributed.measure_plan`` runs ``plan_space`` in a Ray task holding one trial
worker's CPUs and GPUs: a few steps on cached features, on that task's device; the result is kept
per data folder and hardware) and turns it into seconds per epoch. A trial may take an eighth of
the round's trial time (``TRIAL_SHARE``; a round of fewer trials splits the time among them), so
that a round holds enough trials for the sampler and the ensemble: that many epochs, at most the
space's, become the backbone's schedule, so its learning rate really decays before the budget
ends. A backbone whose schedule in that time would not reach twice ASHA's grace period (a first
rung with room past it) is shrunk (``model.width``) first, and left out only if even the
narrowest width does not fit: it is never started just to be stopped by the clock.

Why an eighth and not a quarter (measured with ``benchmarks/budget.py``):
docs/notes/2026-12-06-budget-runs.md#defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch

from . import __version__
from .config import make_config
from .datafolder import PreparedData
from .feature_cache import CACHE_DIR, FeatureCache
from .fileio import write_json
from .loader import make_loader
from .models import model_class
from .search_space import SearchSpace
from .train import augment, build_model, device, make_optimizer, soft_cross_entropy, training_table

log = logging.getLogger(__name__)

WIDTHS = (1.0, 0.5, 0.25)  # tried in this order when a network does not fit
TRIAL_SHARE = 8  # a trial may take 1/TRIAL_SHARE of a round's trial time (budget x trials at once)
GRACE_ROOM = 2  # a kept schedule reaches this many times ASHA's grace period
SLOW_STEP_SECONDS = 2.0  # a measured step this long is measured once (after the warm-up)


@dataclass(frozen=True)
class BackbonePlan:
    backbone: str
    width: float | None  # the width kept (None: the space's own)
    seconds_per_step: float
    steps_per_epoch: int
    epoch_seconds: float  # training steps + validation
    epochs: int  # the schedule a trial of it gets
    fits: bool
    reason: str


def hardware() -> str:
    """What a plan measured on: the GPU's name, or ``CPU`` with the machine's core count."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"


def _hardware_key(threads: int) -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    # raysc's version too: a faster model after an upgrade must not be planned with old step times
    parts = (platform.machine(), platform.processor(), os.cpu_count(), threads, gpu, torch.__version__, __version__)
    what = "|".join(map(str, parts))
    return hashlib.sha256(what.encode()).hexdigest()[:12]


def seconds_per_step(values: dict[str, Any], data: PreparedData, *, threads: int, steps: int = 3) -> float:
    """Seconds of one training step of ``values`` (a training config) on this machine, measured
    after one warm-up step; remembered in the data folder per hardware and config."""
    cfg = make_config({**values, "fold": 0, "epochs": 1})
    store_path = data.out / CACHE_DIR / f"step-seconds-{_hardware_key(threads)}.json"
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    known = json.loads(store_path.read_text()) if store_path.is_file() else {}
    if key in known:
        return known[key]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    dev = device()  # where a trial would train: a GPU when this process has one
    use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and dev.type == "cuda")  # as ``fit`` decides
    try:
        model = build_model(cfg, data).to(dev)
        cache = FeatureCache.ensure(data.out, data.store, model.cfg.frontend) if not model.uses_wave else None
        opt = make_optimizer(cfg, model)
        train_rows, _ = data.split(0)
        table = training_table(cfg, data, train_rows)
        loader = make_loader(table, data.store, batch_size=cfg.batch_size, shuffle=True, seed=0, cache=cache)
        g = torch.Generator().manual_seed(0)
        model.train()
        times = []
        for i, batch in enumerate(loader):
            # A warm-up step, then ``steps``; a slow network (seconds a step: ASCMamba's scan on
            # a CPU) stops after one, its time is clear enough and the plan is not kept waiting.
            if i > steps or (len(times) > 1 and sum(times[1:]) > SLOW_STEP_SECONDS):
                break
            t0 = time.perf_counter()
            b = augment(batch.to(dev), cfg, data.store.spec.sample_rate, g, model.cfg.frontend.hop_length)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(b.wave, b.city, b.time, b.target, spec=b.spec)
            loss = soft_cross_entropy(logits.float(), b.target, b.weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()  # the step's kernels have run, not just been queued
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    seconds = sum(times[1:]) / max(1, len(times) - 1) if len(times) > 1 else times[0]
    write_json(store_path, {**known, key: seconds})
    return seconds


def plan_space(
    space: SearchSpace,
    data: PreparedData,
    *,
    budget_minutes: float,
    concurrency: int,
    threads: int,
    trials: int = TRIAL_SHARE,
) -> list[BackbonePlan]:
    """The plan of every backbone for ``budget_minutes`` of search with ``concurrency`` trials at
    once and ``trials`` a round: kept (``fits``, at ``width``) or left out, and why.
    ``restore_space`` applies it."""
    plans = []
    train_rows, val_rows = data.split(0)
    grace = space.scheduler.grace_steps
    max_epochs = space.scheduler.max_epochs
    # The seconds one trial may take: 1/TRIAL_SHARE of the round's trial time, or, for a round of
    # fewer trials, its part of that time (a one-trial round, e.g. the baseline's, gets all of it).
    parts = min(TRIAL_SHARE, trials)
    share = budget_minutes * 60 * min(concurrency, trials) / parts
    for name, (own_fixed, own) in space.backbones.items():
        values = {**space.fixed, **dict(own_fixed), "backbone": name, "init_from": None}  # the cost is the same
        searched = {k: d for k, d in {**space.params, **own}.items() if k != "init_from"}
        for key, dist in searched.items():  # a representative point: the smallest batch, the first choice
            if key not in values:
                values[key] = min(dist.extremes()) if key == "batch_size" else dist.extremes()[0]
        width_fixed = "model.width" in own_fixed or "model.width" in own
        widths = [None] if width_fixed or not _has_width(name) else list(WIDTHS)
        plan = None
        for width in widths:
            v = values if width is None else {**values, "model.width": width}
            step_s = seconds_per_step(v, data, threads=threads)
            cfg = make_config({**v, "fold": 0, "epochs": 1})
            n_train = len(training_table(cfg, data, train_rows))
            steps = math.ceil(n_train / cfg.batch_size)
            epoch_s = steps * step_s + math.ceil(len(val_rows) / cfg.batch_size) * step_s / 3
            epochs = min(max_epochs, int(share // epoch_s))
            fits = epochs * steps >= GRACE_ROOM * grace or epochs == max_epochs
            reason = (
                f"{share / 60:.1f} min a trial (1/{parts} of the round's trial time) holds {epochs} epoch(s) "
                f"of {steps} steps"
                + (": its schedule" if fits else f", short of {GRACE_ROOM}x ASHA's grace period ({grace} steps)")
            )
            plan = BackbonePlan(name, width, step_s, steps, epoch_s, max(epochs, 1), fits, reason)
            if fits:
                break
        plans.append(plan)
    if not any(p.fits for p in plans):  # nothing fits: the cheapest rather than nothing
        cheapest = min(plans, key=lambda p: p.epoch_seconds)
        plans = [
            dataclasses.replace(p, fits=True, reason=p.reason + "; the cheapest") if p is cheapest else p for p in plans
        ]
    return plans


def _has_width(backbone: str) -> bool:
    return any(f.name == "width" for f in dataclasses.fields(model_class(backbone).config_class))


def describe(plans: list[BackbonePlan]) -> list[str]:
    lines = []
    for p in plans:
        width = f" at width {p.width:g}" if p.width is not None else ""
        verdict = f"kept, {p.epochs} epochs" if p.fits else "left out"
        lines.append(
            f"  {p.backbone:<13}{width}: {p.seconds_per_step:.3f} s/step, {p.steps_per_epoch} steps/epoch, "
            f"{p.epoch_seconds:.0f} s/epoch: {verdict} ({p.reason})"
        )
    return lines


def kept(plans: list[BackbonePlan]) -> dict[str, dict[str, Any]]:
    """What the pipeline stores of a plan: backbone -> its width and epochs."""
    return {p.backbone: {"width": p.width, "epochs": p.epochs} for p in plans if p.fits}


def restore_space(space: SearchSpace, plan: dict[str, dict[str, Any] | None]) -> SearchSpace:
    """The space as planned (``kept``): only the kept backbones, each at its width and epochs
    (None: as the space has it)."""
    backbones = {}
    for name, chosen in plan.items():
        own_fixed, own = space.backbones[name]
        own_fixed = dict(own_fixed)
        if chosen and chosen.get("width") not in (None, 1.0):
            own_fixed["model.width"] = chosen["width"]
        if chosen and chosen.get("epochs"):
            own_fixed["epochs"] = chosen["epochs"]
        backbones[name] = (own_fixed, own)
    return dataclasses.replace(space, backbones=backbones)
