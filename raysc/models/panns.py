"""PANNs CNN10 and CNN14 (Kong et al., "PANNs: Large-Scale Pretrained Audio Neural Networks for
Audio Pattern Recognition", 2020): the AudioSet-pretrained CNNs, under their official parameter
names, so that the authors' checkpoints load by name:

    raysc import-weights Cnn14_mAP=0.431.pth --backbone cnn14 --out cnn14.pt

A BatchNorm over the mel bins (``bn0``), then conv blocks (two 3x3 convolutions with BatchNorm
and ReLU, 2x2 average pooling; the last block of CNN14 does not pool): 64, 128, 256, 512 channels
for CNN10, up to 2048 for CNN14; the mean over frequency, then max + mean over time, and
``fc1`` with ReLU. The AudioSet classifier (``fc_audioset``) and the authors' own STFT and mel
buffers are not part of the network: raysc's head (with city and time) classifies the scenes and
raysc's front end (the ``panns`` preset) computes the same log-mel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..frontend import FRONTENDS, FrontendConfig
from .base import ASCModel, ModelConfig
from .layers import Fusion, scaled
from .registry import register


@dataclass(frozen=True)
class PANNsConfig(ModelConfig):
    frontend: FrontendConfig = field(default_factory=lambda: FRONTENDS["panns"])
    channels: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    pooled_blocks: int = 5  # the blocks after which 2x2 average pooling halves time and frequency
    dropout: float = 0.2  # after every block, as the authors train
    embedding_dropout: float = 0.5


@dataclass(frozen=True)
class Cnn14Config(PANNsConfig):
    pass


@dataclass(frozen=True)
class Cnn10Config(PANNsConfig):
    channels: tuple[int, ...] = (64, 128, 256, 512)
    pooled_blocks: int = 4


class ConvBlock(nn.Module):
    """The authors' ConvBlock: conv1, bn1, conv2, bn2 (their names), ReLU after each BatchNorm."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor, pool: bool) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, 2) if pool else x


class PANNs(ASCModel):
    """The shared body of CNN10 and CNN14; ``conv_block1`` ... and ``fc1`` as the authors name them."""

    config_class = PANNsConfig

    def __init__(self, cfg: PANNsConfig) -> None:
        super().__init__(cfg)
        chans = [scaled(c, cfg.width) for c in cfg.channels]
        self.bn0 = nn.BatchNorm2d(cfg.frontend.n_mels)
        c_in = 1
        for i, c in enumerate(chans, start=1):
            self.add_module(f"conv_block{i}", ConvBlock(c_in, c))
            c_in = c
        self.fc1 = nn.Linear(c_in, c_in)
        self.fusion = Fusion(cfg.fusion, c_in, self.meta.out_dim, hidden=c_in // 2, norm=True, dropout=cfg.dropout)
        self.head = nn.Linear(self.fusion.out_dim, len(cfg.classes))

    def embed_audio(self, spec: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        # bn0 normalises each mel bin: the authors' transpose puts the bins on the channel axis.
        x = self.bn0(spec.transpose(1, 3)).transpose(1, 3)
        for i in range(1, len(cfg.channels) + 1):
            x = getattr(self, f"conv_block{i}")(x, pool=i <= cfg.pooled_blocks)
            x = F.dropout(x, cfg.dropout, self.training)
        x = x.mean(dim=3)  # over frequency
        x = x.amax(dim=2) + x.mean(dim=2)  # over time
        x = F.dropout(x, cfg.embedding_dropout, self.training)
        return F.dropout(F.relu(self.fc1(x)), cfg.embedding_dropout, self.training)


@register("cnn14")
class Cnn14(PANNs):
    """PANNs CNN14 (about 80 M parameters at width 1; AudioSet mAP 0.431 as published)."""

    config_class = Cnn14Config


@register("cnn10")
class Cnn10(PANNs):
    """PANNs CNN10 (about 5 M parameters at width 1; AudioSet mAP 0.380 as published)."""

    config_class = Cnn10Config
