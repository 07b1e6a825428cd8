"""ASCMamba (Sun et al., APSIPA 2025 first place): DenseEncoder + dual-path Mamba blocks.

DenseEncoder: 1x1 projection + norm + PReLU, a dense block of depth 4 (layer i sees every
earlier output; 3x3 convs dilated 2^i along time), a frequency-downsampling conv (1x3, stride
(1, 2)). Dual-path blocks: a bidirectional Mamba along time for every frequency bin, then along
frequency for every frame, each pre-normalised and residual. With ``fusion="film"`` (default)
the city/time vector drives every block's normalisation (conditional LayerNorm), which is our
reading of the paper's "text cues"; other fusions act on the pooled embedding instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import ASCModel, ModelConfig
from .layers import Fusion, scaled
from .mamba import BiMamba
from .registry import register


@dataclass(frozen=True)
class ASCMambaConfig(ModelConfig):
    fusion: str = "film"
    channels: int = 64
    dense_depth: int = 4
    blocks: int = 4
    d_state: int = 16
    d_conv: int = 4
    expand: int = 4
    time_stride: int = 1  # >1 downsamples time in the encoder: cheaper scans, coarser time
    chunk: int = 32  # scan chunk length (memory vs. speed)


def _norm_act(c: int) -> list[nn.Module]:
    return [nn.InstanceNorm2d(c, affine=True), nn.PReLU(c)]


class DenseEncoder(nn.Module):
    def __init__(self, c: int, depth: int, time_stride: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(1, c, 1), *_norm_act(c))
        self.dense = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c * (i + 1), c, 3, padding=(2**i, 1), dilation=(2**i, 1)), *_norm_act(c))
            for i in range(depth)
        )
        self.down = nn.Sequential(
            nn.Conv2d(c, c, (time_stride, 3), stride=(time_stride, 2), padding=(0, 1)), *_norm_act(c)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.proj(x)]
        for layer in self.dense:
            feats.append(layer(torch.cat(feats, dim=1)))
        return self.down(feats[-1])


class CondLayerNorm(nn.Module):
    """LayerNorm whose scale and shift come from the metadata vector (or are learned constants)."""

    def __init__(self, c: int, meta_dim: int | None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c, elementwise_affine=meta_dim is None)
        self.film = nn.Linear(meta_dim, 2 * c) if meta_dim else None

    def forward(self, x: torch.Tensor, meta: torch.Tensor, repeats: int) -> torch.Tensor:
        x = self.norm(x)
        if self.film is None:
            return x
        gamma, beta = self.film(meta).repeat_interleave(repeats, dim=0).unsqueeze(1).chunk(2, dim=-1)
        return x * (1 + gamma) + beta


class DualPathBlock(nn.Module):
    def __init__(self, c: int, meta_dim: int | None, **mamba) -> None:
        super().__init__()
        self.norm_t, self.time = CondLayerNorm(c, meta_dim), BiMamba(c, **mamba)
        self.norm_f, self.freq = CondLayerNorm(c, meta_dim), BiMamba(c, **mamba)

    def forward(self, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        b, c, t, f = x.shape
        y = x.permute(0, 3, 2, 1).reshape(b * f, t, c)  # one sequence along time per frequency bin
        y = y + self.time(self.norm_t(y, meta, f))
        y = y.reshape(b, f, t, c).transpose(1, 2).reshape(b * t, f, c)  # one along frequency per frame
        y = y + self.freq(self.norm_f(y, meta, t))
        return y.reshape(b, t, f, c).permute(0, 3, 1, 2)


@register("ascmamba")
class ASCMamba(ASCModel):
    config_class = ASCMambaConfig

    def __init__(self, cfg: ASCMambaConfig) -> None:
        super().__init__(cfg)
        c = scaled(cfg.channels, cfg.width)
        self.encoder = DenseEncoder(c, cfg.dense_depth, cfg.time_stride)
        film = self.meta.out_dim if cfg.fusion == "film" else None
        mamba = dict(d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, chunk=cfg.chunk)
        self.blocks = nn.ModuleList(DualPathBlock(c, film, **mamba) for _ in range(cfg.blocks))
        # FiLM already conditioned every block; the other fusions act on the pooled vector.
        self.fusion = Fusion("none" if film else cfg.fusion, c, self.meta.out_dim)
        self.head = nn.Linear(self.fusion.out_dim, len(cfg.classes))

    def embed(self, spec: torch.Tensor, meta: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
        x = self.encoder(spec)
        for block in self.blocks:
            x = block(x, meta)
        return self.fusion(x.mean(dim=(2, 3)), meta)
