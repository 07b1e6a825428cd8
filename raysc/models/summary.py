"""Sizes and speeds of the backbones: what `raysc models` prints and `benchmarks/models.py` records."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..metadata import TIME_FEATURES
from .registry import count_macs, count_parameters, create_model, list_models


@dataclass(frozen=True)
class ModelSummary:
    """One backbone's size and cost (``raysc models``).

    Attributes:
        name: the backbone.
        width: the channel width multiplier it was built at.
        params: trainable and frozen parameters.
        macs: multiply-accumulates of one forward pass over a clip of ``seconds``.
        seconds: the clip length the cost is for.
        train_clips_per_s: training clips per second on this machine (measured with
            ``bench``), or None.
    """

    name: str
    width: float
    params: int
    macs: int
    seconds: float
    train_clips_per_s: float | None = None


def training_throughput(
    model: torch.nn.Module,
    *,
    batch: int = 8,
    seconds: float = 10.0,
    min_steps: int = 2,
    min_time: float = 3.0,
    device: str = "cpu",
    amp: str | None = None,
) -> float:
    """Clips per second of forward + backward + SGD step on random clips, after one warm-up step.

    Runs at least ``min_steps`` steps and at least ``min_time`` seconds. ``amp="bf16"`` runs
    under bf16 autocast (the front end and the Mamba scan stay fp32 by design).
    """
    model = model.to(device).train()
    sr = model.cfg.frontend.sample_rate
    n_classes = len(model.cfg.classes)
    g = torch.Generator().manual_seed(0)
    wave = (torch.randn(batch, round(sr * seconds), generator=g) * 0.1).to(device)
    city = torch.randint(0, len(model.cfg.cities), (batch,), generator=g).to(device)
    times = torch.randn(batch, len(TIME_FEATURES), generator=g).to(device)
    target = torch.nn.functional.one_hot(torch.randint(0, n_classes, (batch,), generator=g), n_classes).float()
    target = target.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(wave, city, times, target), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    step()
    sync()
    steps, start = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - start < min_time:
        step()
        steps += 1
    sync()
    return steps * batch / (time.perf_counter() - start)


def summarize(
    names: list[str] | None = None,
    *,
    width: float = 1.0,
    seconds: float = 10.0,
    bench: bool = False,
    batch: int = 8,
) -> list[ModelSummary]:
    """Size and cost of backbones at paper-default settings and ``width``.

    Args:
        names: the backbones (None: every registered one).
        width: the channel width multiplier.
        seconds: the clip length the cost is computed for.
        bench: also time training steps on this machine (slow).
        batch: the batch size of the timed steps.

    Returns:
        One summary per backbone, in the order given.
    """
    out = []
    for name in names or list_models():
        torch.manual_seed(0)
        model = create_model(name, width=width)
        tput = training_throughput(model, batch=batch, seconds=seconds) if bench else None
        out.append(
            ModelSummary(name, width, count_parameters(model), count_macs(model, seconds=seconds), seconds, tput)
        )
    return out
