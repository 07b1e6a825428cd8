"""Stats: per-band log-mel statistics + city + time -> a small MLP. Not from a paper: the strong,
fast floor of this task (a logistic regression on log-mel mean/std + city + hour beats the
networks on a few hundred labelled clips), trained in seconds on a CPU and a natural ensemble
partner for the networks.

Per mel band, over time: mean, standard deviation, quantiles, and the mean and standard deviation
of the frame-to-frame difference (how fast the band changes). The statistics are standardised by
BatchNorm (its running estimates act as the dataset's mean and scale), then fused with the
metadata and classified. ``hidden: 0`` makes it a logistic regression on the fused vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .base import ASCModel, ModelConfig
from .layers import Fusion, scaled
from .registry import register


@dataclass(frozen=True)
class StatsConfig(ModelConfig):
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    deltas: bool = True
    hidden: int = 256  # fused width (times ``width``); 0: no hidden layer
    dropout: float = 0.3  # on the statistics and on the hidden layer

    def __post_init__(self) -> None:
        super().__post_init__()
        if not all(0.0 <= q <= 1.0 for q in self.quantiles):
            raise ValueError(f"quantiles must be in [0, 1], got {self.quantiles}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def band_statistics(spec: torch.Tensor, quantiles: tuple[float, ...], deltas: bool) -> torch.Tensor:
    """[B, 1, T, F] log-mel -> [B, F * (2 + len(quantiles) + 2 * deltas)] statistics over time.

    Quantiles interpolate linearly between the sorted frames (as ``torch.quantile``)."""
    x = spec.squeeze(1).float().transpose(1, 2).contiguous()  # [B, F, T]: reductions over the last dim
    mean = x.mean(2)
    parts = [mean, _std(x, mean)]
    if quantiles:
        s = _sort_frames(x)
        last = s.shape[2] - 1
        for q in quantiles:
            lo = math.floor(q * last)
            hi, w = min(lo + 1, last), q * last - lo
            parts.append(s[..., lo] + w * (s[..., hi] - s[..., lo]))
    if deltas:
        d = x[..., 1:] - x[..., :-1]
        parts += [d.abs().mean(2), _std(d, d.mean(2))]
    return torch.cat(parts, dim=-1)


def _std(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    # Two elementwise passes over contiguous rows: faster here than torch's fused std on the CPU.
    return (x - mean.unsqueeze(2)).square().mean(2).sqrt()


def _sort_frames(x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and not x.requires_grad:
        # numpy's SIMD sort is about 10x faster than torch's CPU sort on these rows; the
        # quantiles were most of a training step's time.
        return torch.from_numpy(np.sort(x.numpy(), axis=2))
    return x.sort(dim=2).values


@register("stats")
class Stats(ASCModel):
    config_class = StatsConfig

    def __init__(self, cfg: StatsConfig) -> None:
        super().__init__(cfg)
        n_stats = cfg.frontend.n_mels * (2 + len(cfg.quantiles) + 2 * cfg.deltas)
        self.input_norm = nn.BatchNorm1d(n_stats)
        self.dropout = nn.Dropout(cfg.dropout)
        hidden = scaled(cfg.hidden, cfg.width) if cfg.hidden else None
        fusion_dropout = cfg.dropout if hidden else 0.0
        self.fusion = Fusion(cfg.fusion, n_stats, self.meta.out_dim, hidden=hidden, norm=True, dropout=fusion_dropout)
        self.head = nn.Linear(self.fusion.out_dim, len(cfg.classes))

    def embed_audio(self, spec: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
        stats = band_statistics(spec, self.cfg.quantiles, self.cfg.deltas)
        return self.dropout(self.input_norm(stats))
