"""SE-Trans: the official APSIPA 2025 / ICME 2024 baseline.

BatchNorm over mel bins; two SE conv blocks; 16 time tokens through one Transformer encoder
layer (post-LN); max over tokens; metadata fused by concatenation. About 0.36 M parameters
(the official code also registers an unused duplicate encoder layer; this one does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import ASCModel, ModelConfig
from .layers import Fusion, SqueezeExcite, scaled
from .registry import register


@dataclass(frozen=True)
class SETransConfig(ModelConfig):
    channels: tuple[int, int] = (64, 128)
    se_reduction: int = 16
    tokens: int = 16
    heads: int = 8
    ff_dim: int = 32
    dropout: float = 0.1
    fusion_dim: int = 128


class SEConvBlock(nn.Module):
    """conv3x3-BN-SE-ReLU twice, then 2x2 average pooling."""

    def __init__(self, c_in: int, c_out: int, reduction: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            SqueezeExcite(c_out, reduction),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            SqueezeExcite(c_out, reduction),
            nn.ReLU(),
            nn.AvgPool2d(2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@register("setrans")
class SETrans(ASCModel):
    config_class = SETransConfig

    def __init__(self, cfg: SETransConfig) -> None:
        super().__init__(cfg)
        c1, c2 = (scaled(c, cfg.width, minimum=cfg.heads) for c in cfg.channels)
        c2 -= c2 % cfg.heads  # attention heads must divide the model width
        self.input_norm = nn.BatchNorm2d(cfg.frontend.n_mels)
        self.blocks = nn.Sequential(SEConvBlock(1, c1, cfg.se_reduction), SEConvBlock(c1, c2, cfg.se_reduction))
        self.pool = nn.AdaptiveAvgPool2d((cfg.tokens, 1))
        self.encoder = nn.TransformerEncoderLayer(
            c2, cfg.heads, dim_feedforward=cfg.ff_dim, dropout=cfg.dropout, batch_first=True, norm_first=False
        )
        self.fusion = Fusion(cfg.fusion, c2, self.meta.out_dim, hidden=scaled(cfg.fusion_dim, cfg.width))
        self.head = nn.Linear(self.fusion.out_dim, len(cfg.classes))

    def embed_audio(self, spec: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(spec.transpose(1, 3)).transpose(1, 3)  # normalise each mel bin
        x = self.blocks(x)  # [B, C, T/4, F/4]
        tokens = self.pool(x).squeeze(-1).transpose(1, 2)  # [B, 16, C]
        return self.encoder(tokens).amax(dim=1)
