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

from dataclasses import dataclass

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
    """[B, 1, T, F] log-mel -> [B, F * (2 + len(quantiles) + 2 * deltas)] statistics over time."""
    x = spec.squeeze(1).float()  # [B, T, F]
    parts = [x.mean(1), x.std(1, unbiased=False)]
    if quantiles:
        parts += list(torch.quantile(x, torch.tensor(quantiles, device=x.device), dim=1))
    if deltas:
        d = x[:, 1:] - x[:, :-1]
        parts += [d.abs().mean(1), d.std(1, unbiased=False)]
    return torch.cat(parts, dim=-1)


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

    def embed(self, spec: torch.Tensor, meta: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
        stats = band_statistics(spec, self.cfg.quantiles, self.cfg.deltas)
        return self.fusion(self.dropout(self.input_norm(stats)), meta)
