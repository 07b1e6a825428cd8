"""Stats: per-band log-mel statistics + city + time -> a small MLP. Not from a paper: the strong,
fast floor of this task (a logistic regression on log-mel mean/std + city + hour beats the
networks on a few hundred labelled clips), trained in seconds on a CPU and a natural ensemble
partner for the networks.

Per mel band, over time: mean, standard deviation, quantiles, and the mean and standard deviation
of the frame-to-frame difference (how fast the band changes). With ``modulation`` on, also the
modulation spectrum: the mel bands averaged into ``modulation_groups`` groups, each group's
log-mel trajectory Fourier-transformed over time, and its mean magnitude (log) in each
modulation band between ``modulation_edges`` (Hz). It tells babble (syllables, 3-6 Hz) from
pass-bys (under 1 Hz), beats and impacts, and it does not change when a device or room scales a
band by a constant gain, which is what an unseen city's recordings do. With ``codebook`` on, also a
bag of frames: each frame, taken relative to the clip's mean log-mel (a constant gain per band
drops out here too), is assigned to the nearest of ``codebook`` centroids fitted without labels
on the training data's frames (``raysc.codebook``; ``fit`` fits them before the first epoch and
they are saved with the weights), and the clip is described by the log share of its frames per
centroid: which kinds of moment (a voice, a brake, a chime) it holds, and how often.

The statistics are standardised by BatchNorm (its running estimates act as the dataset's mean and
scale), then fused with the metadata and classified. ``hidden: 0`` makes it a logistic
regression on the fused vector.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..codebook import centred_frames, distances
from .base import ASCModel, ModelConfig
from .layers import Fusion, scaled
from .registry import register


@dataclass(frozen=True)
class StatsConfig(ModelConfig):
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    deltas: bool = True
    hidden: int = 256  # fused width (times ``width``); 0: no hidden layer
    dropout: float = 0.3  # on the statistics and on the hidden layer
    modulation: bool = False
    modulation_edges: tuple[float, ...] = (0.1, 0.5, 1.5, 3.0, 6.0, 12.0, 24.0)  # Hz; 6 bands
    modulation_groups: int = 16  # mel bands are averaged into this many groups first
    codebook: int = 0  # frame centroids of the bag-of-frames histogram; 0: none

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.modulation:
            edges, nyquist = self.modulation_edges, self.frontend.sample_rate / self.frontend.hop_length / 2
            if len(edges) < 2 or any(b <= a for a, b in itertools.pairwise(edges)) or edges[0] < 0:
                raise ValueError(f"modulation_edges must be at least two increasing values >= 0, got {edges}")
            if edges[-1] > nyquist:
                raise ValueError(
                    f"modulation_edges reach {edges[-1]} Hz, above the front end's frame-rate Nyquist of "
                    f"{nyquist:g} Hz (sample_rate / hop_length / 2)"
                )
            if not 1 <= self.modulation_groups <= self.frontend.n_mels:
                raise ValueError(
                    f"modulation_groups must be in [1, n_mels={self.frontend.n_mels}], got {self.modulation_groups}"
                )
        if self.codebook < 0:
            raise ValueError(f"codebook must be >= 0 (0: no bag of frames), got {self.codebook}")
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


def modulation_energies(spec: torch.Tensor, edges: tuple[float, ...], groups: int, frame_rate: float) -> torch.Tensor:
    """[B, 1, T, F] log-mel -> [B, (len(edges) - 1) * groups], band-major: the log mean magnitude
    of each mel group's trajectory spectrum in each modulation band. A band too narrow for the
    clip's frequency resolution takes the bin nearest its centre, so short clips get a value."""
    x = _pool_groups(spec.squeeze(1).float(), groups).transpose(1, 2)  # [B, groups, T]
    x = x - x.mean(2, keepdim=True)  # a constant gain per band drops out here
    frames = x.shape[2]
    mag = torch.fft.rfft(x * torch.hann_window(frames, periodic=False, device=x.device), dim=2).abs()
    freqs = torch.fft.rfftfreq(frames, 1 / frame_rate).to(x.device)
    parts = []
    for lo, hi in itertools.pairwise(edges):
        inside = (freqs >= lo) & (freqs < hi)
        if not inside.any():
            off_centre = (freqs - (lo + hi) / 2).abs()
            inside = off_centre == off_centre.min()
        parts.append(torch.log(mag[..., inside].mean(2) + 1e-6))
    return torch.cat(parts, dim=1)


def frame_histogram(spec: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, F] log-mel, [k, F] centroids -> [B, k]: the log share of the clip's frames
    (relative to its mean) nearest to each centroid, floored at 1e-3."""
    x = centred_frames(spec)  # [B, T, F]
    nearest = distances(x, codebook).argmin(2)  # [B, T]
    counts = torch.zeros(x.shape[0], len(codebook), device=x.device).scatter_add_(
        1, nearest, torch.ones_like(nearest, dtype=torch.float32)
    )
    return torch.log(counts / x.shape[1] + 1e-3)


def _pool_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, T, F] -> [B, T, groups], the mean of each group of adjacent bands (adaptive pooling)."""
    b, t, f = x.shape
    if f % groups == 0:  # equal groups: a reshape, twice as fast as adaptive pooling on the CPU
        return x.reshape(b, t, groups, f // groups).mean(3)
    return nn.functional.adaptive_avg_pool1d(x, groups)


def _std(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    # Two elementwise passes over contiguous rows: faster here than torch's fused std on the CPU.
    return (x - mean.unsqueeze(2)).square().mean(2).sqrt()


def _sort_frames(x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and not x.requires_grad:
        # numpy's SIMD sort is much faster than torch's CPU sort on these rows, and the
        # quantiles were most of a training step's time (docs/notes/2026-12-06-budget-runs.md#defaults).
        return torch.from_numpy(np.sort(x.numpy(), axis=2))
    return x.sort(dim=2).values


@register("stats")
class Stats(ASCModel):
    config_class = StatsConfig

    def __init__(self, cfg: StatsConfig) -> None:
        super().__init__(cfg)
        n_stats = cfg.frontend.n_mels * (2 + len(cfg.quantiles) + 2 * cfg.deltas)
        if cfg.modulation:
            n_stats += cfg.modulation_groups * (len(cfg.modulation_edges) - 1)
        n_stats += cfg.codebook
        # Fitted by ``fit`` before training (zeros until then), saved and loaded with the weights
        # (not saved when empty: models saved before it existed still load).
        self.register_buffer("codebook", torch.zeros(cfg.codebook, cfg.frontend.n_mels), persistent=cfg.codebook > 0)
        self.input_norm = nn.BatchNorm1d(n_stats)
        self.dropout = nn.Dropout(cfg.dropout)
        hidden = scaled(cfg.hidden, cfg.width) if cfg.hidden else None
        fusion_dropout = cfg.dropout if hidden else 0.0
        self.fusion = Fusion(cfg.fusion, n_stats, self.meta.out_dim, hidden=hidden, norm=True, dropout=fusion_dropout)
        self.head = nn.Linear(self.fusion.out_dim, len(cfg.classes))

    def embed_audio(self, spec: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        stats = band_statistics(spec, cfg.quantiles, cfg.deltas)
        if cfg.modulation:
            rate = cfg.frontend.sample_rate / cfg.frontend.hop_length
            stats = torch.cat([stats, modulation_energies(spec, cfg.modulation_edges, cfg.modulation_groups, rate)], 1)
        if cfg.codebook:
            stats = torch.cat([stats, frame_histogram(spec, self.codebook)], 1)
        return self.dropout(self.input_norm(stats))

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook
