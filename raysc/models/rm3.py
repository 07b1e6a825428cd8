"""RM3 (Neri & Carli, ICME 2024): log-mel + Wavegram, attention map, MobileFaceNet, ArcFace.

Input: 16 kHz log-mel (128 HTK mels, Slaney norm, power 2) stacked with a learned Wavegram (a
separable 1-D conv, kernel 1024 / stride 512 / padding 512, so its frames align with the mel
frames, 128 channels),
standardised per clip and channel. An attention map (two separable-conv blocks, 1x1
projection, sigmoid; no ReLU before the sigmoid, unlike the original library) multiplies the
input. MobileFaceNet with bottlenecks (t, c, n, s) = (2,128,2,2), (4,128,2,2), (4,128,2,2)
gives a 128-d embedding, fused with the metadata, then an ArcFace head (s 8, m 0.2) on
L2-normalised embedding and class weights; the margin applies only in training. About 0.87 M
parameters (the paper reports 874k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..frontend import FRONTENDS, FrontendConfig
from .base import ASCModel, ModelConfig
from .layers import Fusion, scaled
from .registry import register


@dataclass(frozen=True)
class RM3Config(ModelConfig):
    frontend: FrontendConfig = field(default_factory=lambda: FRONTENDS["rm3"])
    wavegram_kernel: int = 1024
    # The paper's Wavegram is a *separable* conv (1024-tap depthwise filter, then 1 -> 128
    # pointwise), which is what its 874k parameters imply; False gives a full 1 -> 128 conv.
    wavegram_separable: bool = True
    attention_channels: tuple[int, int] = (16, 64)
    stem_channels: int = 64
    bottlenecks: tuple[tuple[int, int, int, int], ...] = ((2, 128, 2, 2), (4, 128, 2, 2), (4, 128, 2, 2))
    conv_channels: int = 512
    gdc_size: tuple[int, int] = (8, 20)  # map size at 10 s: the global depthwise conv's kernel
    embedding: int = 128
    arcface_scale: float = 8.0
    arcface_margin: float = 0.2


def _conv_bn(c_in: int, c_out: int, k: int = 1, s: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.PReLU(c_out)) if act else nn.Sequential(*layers)


class SeparableBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, c_out: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.body = nn.Sequential(
            _conv_bn(c_in, hidden),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, c_out, act=False),
        )
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class ArcFace(nn.Module):
    """Cosine logits scaled by s; in training, an additive angular margin m on the target.

    Soft targets (mixup, pseudo-labels) get the margin in proportion to their weight, which is
    exactly ArcFace for one-hot targets.
    """

    def __init__(self, dim: int, n_classes: int, scale: float, margin: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = scale, margin

    def forward(self, emb: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        cos = F.linear(F.normalize(emb.float()), F.normalize(self.weight.float())).clamp(-1, 1)
        if target is None:
            return self.scale * cos
        m = self.margin
        sin = torch.sqrt((1 - cos**2).clamp_min(1e-7))
        # cos(theta + m), kept monotonic past theta = pi - m (the usual ArcFace guard).
        with_margin = torch.where(
            cos > math.cos(math.pi - m), cos * math.cos(m) - sin * math.sin(m), cos - math.sin(math.pi - m) * m
        )
        return self.scale * (cos - target.float() * (cos - with_margin))


@register("rm3")
class RM3(ASCModel):
    config_class = RM3Config
    uses_wave = True  # the wavegram learns from the waveform

    def __init__(self, cfg: RM3Config) -> None:
        super().__init__(cfg)
        fe = cfg.frontend
        k = cfg.wavegram_kernel
        if cfg.wavegram_separable:
            self.wavegram = nn.Sequential(
                nn.Conv1d(1, 1, k, stride=fe.hop_length, padding=k // 2), nn.Conv1d(1, fe.n_mels, 1)
            )
        else:
            self.wavegram = nn.Conv1d(1, fe.n_mels, k, stride=fe.hop_length, padding=k // 2)
        a1, a2 = (scaled(c, cfg.width) for c in cfg.attention_channels)
        self.attention = nn.Sequential(SeparableBlock(2, a1), SeparableBlock(a1, a2), nn.Conv2d(a2, 2, 1), nn.Sigmoid())
        c = scaled(cfg.stem_channels, cfg.width)
        layers: list[nn.Module] = [_conv_bn(2, c, 3, 2), _conv_bn(c, c, 3, groups=c)]
        for t, c_out, n, s in cfg.bottlenecks:
            c_out = scaled(c_out, cfg.width)
            for i in range(n):
                layers.append(Bottleneck(c, c_out, t, s if i == 0 else 1))
                c = c_out
        conv = scaled(cfg.conv_channels, cfg.width)
        layers.append(_conv_bn(c, conv))
        self.body = nn.Sequential(*layers)
        # Global depthwise conv: its kernel covers the whole map of a 10 s clip; other lengths
        # are pooled to that size first (a no-op at 10 s).
        self.gdc_pool = nn.AdaptiveAvgPool2d(cfg.gdc_size)
        self.gdc = nn.Sequential(nn.Conv2d(conv, conv, cfg.gdc_size, groups=conv, bias=False), nn.BatchNorm2d(conv))
        emb = scaled(cfg.embedding, cfg.width)
        self.embedding = nn.Sequential(nn.Linear(conv, emb, bias=False), nn.BatchNorm1d(emb))
        self.fusion = Fusion(cfg.fusion, emb, self.meta.out_dim, hidden=emb)
        self.head = ArcFace(self.fusion.out_dim, len(cfg.classes), cfg.arcface_scale, cfg.arcface_margin)

    def embed_audio(self, spec: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
        mel = spec.transpose(2, 3)  # [B, 1, mels, T]
        wg = self.wavegram(wave.unsqueeze(1).to(mel.dtype)).unsqueeze(1)  # [B, 1, mels, T']
        frames = min(mel.shape[-1], wg.shape[-1])
        x = torch.cat([mel[..., :frames], wg[..., :frames]], dim=1)
        x = (x - x.mean(dim=(2, 3), keepdim=True)) / (x.std(dim=(2, 3), keepdim=True) + 1e-5)
        x = x * self.attention(x)
        x = self.gdc(self.gdc_pool(self.body(x))).flatten(1)
        return self.embedding(x)

    def forward(
        self,
        wave: torch.Tensor,
        city: torch.Tensor,
        time: torch.Tensor,
        target: torch.Tensor | None = None,
        spec: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.forward_features(wave, city, time, spec)
        return self.head(emb, target if self.training else None)
