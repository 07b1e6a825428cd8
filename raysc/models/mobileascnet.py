"""MobileASCNet (Li et al., AAAI 2026 workshop): small, gated metadata fusion.

Three residual depthwise-separable conv blocks ([conv-BN-ReLU] -> [depthwise -> pointwise -> BN]
+ skip -> ReLU, then 2x2 pooling), a GRU over time, temporal average pooling, gated fusion with
the city/time vector, one linear classifier. The paper does not publish layer sizes; these land
at its reported ~0.37 M parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import ASCModel, ModelConfig
from .layers import Fusion, scaled
from .registry import register


@dataclass(frozen=True)
class MobileASCNetConfig(ModelConfig):
    fusion: str = "gated"
    channels: tuple[int, ...] = (32, 64, 128)
    gru_hidden: int = 160
    dropout: float = 0.2
    # Blocks whose weights stay fixed when fine-tuning from a pretrained artefact with
    # ``freeze_low_level`` (the paper's "freeze the low-level conv blocks" variant).
    low_level_blocks: tuple[str, ...] = ("blocks.0", "blocks.1")


class DSResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.entry = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())
        self.separable = nn.Sequential(
            nn.Conv2d(c_out, c_out, 3, padding=1, groups=c_out, bias=False),
            nn.Conv2d(c_out, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        return self.pool(torch.relu(self.separable(x) + x))


@register("mobileascnet")
class MobileASCNet(ASCModel):
    config_class = MobileASCNetConfig

    def __init__(self, cfg: MobileASCNetConfig) -> None:
        super().__init__(cfg)
        chans = [scaled(c, cfg.width) for c in cfg.channels]
        self.blocks = nn.Sequential(*(DSResBlock(a, b) for a, b in zip([1, *chans[:-1]], chans, strict=True)))
        hidden = scaled(cfg.gru_hidden, cfg.width)
        self.gru = nn.GRU(chans[-1], hidden, batch_first=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fusion = Fusion(cfg.fusion, hidden, self.meta.out_dim)
        self.head = nn.Linear(self.fusion.out_dim, len(cfg.classes))

    def embed_audio(self, spec: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
        x = self.blocks(spec).mean(dim=3).transpose(1, 2)  # [B, T', C]: frequency averaged out
        x, _ = self.gru(x)
        return self.dropout(x.mean(dim=1))
