"""ResNet-34 with CBAM: the ALPS-ASC network (Yang et al., APSIPA ASC 2025).

Stem conv7x7/2 + maxpool; basic residual blocks [3, 4, 6, 3] with CBAM before the residual add;
attention pooling + average pooling + max pooling, summed; metadata concatenated and compressed
to 256 (BN, ReLU, dropout 0.3); classifier 256 -> 128 -> 64 -> classes. About 21.6 M parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .base import ASCModel, ModelConfig
from .layers import CBAM, Fusion, MetaConfig, scaled
from .registry import register


@dataclass(frozen=True)
class ResNetCBAMConfig(ModelConfig):
    meta: MetaConfig = field(default_factory=lambda: MetaConfig(time_layers=2))  # ALPS: time MLP 8 -> 16 -> 16
    depths: tuple[int, ...] = (3, 4, 6, 3)
    channels: tuple[int, ...] = (64, 128, 256, 512)
    cbam_reduction: int = 16
    fusion_dim: int = 256
    fusion_dropout: float = 0.3
    head_dims: tuple[int, ...] = (128, 64)
    head_dropout: tuple[float, ...] = (0.4, 0.3)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, reduction: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
            CBAM(c_out, reduction),
        )
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class TriplePool(nn.Module):
    """Attention-weighted sum + global average + global max over time and frequency."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.att = nn.Sequential(nn.Conv2d(channels, channels // 2, 1), nn.ReLU(), nn.Conv2d(channels // 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.att(x).flatten(1), dim=1).view_as(x[:, :1])
        return (x * w).sum(dim=(2, 3)) + x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))


@register("resnet_cbam")
class ResNetCBAM(ASCModel):
    config_class = ResNetCBAMConfig

    def __init__(self, cfg: ResNetCBAMConfig) -> None:
        super().__init__(cfg)
        chans = [scaled(c, cfg.width) for c in cfg.channels]
        self.stem = nn.Sequential(
            nn.Conv2d(1, chans[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(chans[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, c_in = [], chans[0]
        for i, (depth, c) in enumerate(zip(cfg.depths, chans, strict=True)):
            for j in range(depth):
                stages.append(BasicBlock(c_in, c, 2 if (j == 0 and i > 0) else 1, cfg.cbam_reduction))
                c_in = c
        self.stages = nn.Sequential(*stages)
        self.pool = TriplePool(c_in)
        self.fusion = Fusion(
            cfg.fusion,
            c_in,
            self.meta.out_dim,
            hidden=scaled(cfg.fusion_dim, cfg.width),
            norm=True,
            dropout=cfg.fusion_dropout,
        )
        head: list[nn.Module] = []
        d = self.fusion.out_dim
        for h, p in zip(cfg.head_dims, cfg.head_dropout, strict=True):
            h = scaled(h, cfg.width)
            head += [nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(p)]
            d = h
        self.head = nn.Sequential(*head, nn.Linear(d, len(cfg.classes)))

    def embed_audio(self, spec: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(spec)))
