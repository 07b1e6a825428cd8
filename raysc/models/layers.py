"""Layers shared by the backbones: metadata encoder, fusion modes, SE and CBAM attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..metadata import TIME_FEATURES

FUSIONS = ("none", "concat", "gated", "film")


@dataclass(frozen=True)
class MetaConfig:
    """City embedding + time MLP. ``city_dropout`` replaces the city by ``<unk>`` while training,
    so that the ``<unk>`` embedding (used for cities never seen in training) is trained too."""

    city_dim: int = 16
    time_dim: int = 16
    time_layers: int = 1  # 1: Linear+ReLU (baseline); 2: Linear-ReLU-Linear-ReLU (ALPS)
    city_dropout: float = 0.0


class MetaEncoder(nn.Module):
    """(city index [B], time features [B, 7]) -> one metadata vector [B, city_dim + time_dim]."""

    def __init__(self, n_cities: int, cfg: MetaConfig) -> None:
        super().__init__()
        if not 0.0 <= cfg.city_dropout <= 1.0:
            raise ValueError(f"city_dropout must be in [0, 1], got {cfg.city_dropout}")
        self.cfg = cfg
        self.city = nn.Embedding(n_cities, cfg.city_dim)
        layers: list[nn.Module] = [nn.Linear(len(TIME_FEATURES), cfg.time_dim), nn.ReLU()]
        for _ in range(cfg.time_layers - 1):
            layers += [nn.Linear(cfg.time_dim, cfg.time_dim), nn.ReLU()]
        self.time = nn.Sequential(*layers)
        self.out_dim = cfg.city_dim + cfg.time_dim

    def forward(self, city: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        if self.training and self.cfg.city_dropout > 0:
            drop = torch.rand(city.shape, device=city.device) < self.cfg.city_dropout
            city = city.masked_fill(drop, 0)  # 0 = <unk>
        return torch.cat([self.city(city), self.time(time.float())], dim=-1)


class Fusion(nn.Module):
    """Fuse an audio embedding [B, D] with the metadata vector [B, M].

    - ``none``: audio only (the metadata is ignored: an ablation);
    - ``concat``: [x; m] -> Linear(hidden) [-> BatchNorm] -> ReLU [-> Dropout] (baseline, ALPS);
    - ``gated``: z = [x; m]; z * (1 - s(W1 z)) + W2 z * s(W3 z) (MobileASCNet);
    - ``film``: LayerNorm(x) * (1 + g(m)) + b(m) (conditional normalisation, as ASCMamba's cues).
    """

    def __init__(
        self,
        kind: str,
        audio_dim: int,
        meta_dim: int,
        *,
        hidden: int | None = None,
        norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in FUSIONS:
            raise ValueError(f"unknown fusion {kind!r} (valid: {', '.join(FUSIONS)})")
        self.kind = kind
        z = audio_dim + meta_dim
        if kind == "none":
            self.out_dim = audio_dim
        elif kind == "concat":
            self.out_dim = hidden or audio_dim
            layers: list[nn.Module] = [nn.Linear(z, self.out_dim)]
            layers += [nn.BatchNorm1d(self.out_dim)] if norm else []
            layers += [nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            self.proj = nn.Sequential(*layers)
        elif kind == "gated":
            self.out_dim = z
            self.w1, self.w2, self.w3 = nn.Linear(z, z), nn.Linear(z, z), nn.Linear(z, z)
        else:
            self.out_dim = audio_dim
            self.norm = nn.LayerNorm(audio_dim, elementwise_affine=False)
            self.film = nn.Linear(meta_dim, 2 * audio_dim)

    def forward(self, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return x
        if self.kind == "film":
            gamma, beta = self.film(meta).chunk(2, dim=-1)
            return self.norm(x) * (1 + gamma) + beta
        z = torch.cat([x, meta], dim=-1)
        if self.kind == "concat":
            return self.proj(z)
        return z * (1 - torch.sigmoid(self.w1(z))) + self.w2(z) * torch.sigmoid(self.w3(z))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


class CBAM(nn.Module):
    """Channel attention (shared MLP on avg- and max-pooled maps) then spatial attention (7x7)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        x = x * torch.sigmoid(avg + mx)
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


def scaled(channels: int, width: float, minimum: int = 4) -> int:
    """Channel count times the width multiplier, at least ``minimum``."""
    return max(minimum, round(channels * width))
