"""The aisfx sound-effects CNN (Ma and Lerch, ISMIR 2022: "Representation Learning for the
Automatic Indexing of Sound Effects Libraries"; weights CC BY 4.0, (c) 2022 A.B. Ma and A. Lerch),
written here under the parameter names of its checkpoint, with the front end it was trained on.

The front end is Essentia's mel spectrogram as the package computes it: 44.1 kHz, frames of 2048
samples every 1024 (the first centred on the first sample, zeros outside the clip, a frame kept
while it starts inside the clip), a symmetric Hann window, the power spectrum, 96 HTK mel bands
from 0 to 22,050 Hz with triangles drawn on the mel scale and each band's weights summing to one,
``log10(1 + 10^4 x)``, divided by 9.4578 (the largest value over the training sets). The
network takes blocks of 100 frames (about 2.3 s) every 50 and gives a 512-d embedding per block;
a clip's embedding is the mean and standard deviation over its blocks (1024 values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn


@dataclass(frozen=True)
class AisfxConfig:
    """The trunk's fixed settings (those of the published checkpoint)."""

    sample_rate: int = 44100
    n_fft: int = 2048
    hop_length: int = 1024
    n_mels: int = 96
    f_max: float = 22050.0
    input_max: float = 9.457798957824707  # the package's spectrogram normalisation
    block_frames: int = 100
    block_hop: int = 50
    channels: int = 64  # doubled in each of the four blocks: 64, 128, 256, 512


def _htk_mel(hz: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def mel_weights(cfg: AisfxConfig) -> torch.Tensor:
    """[n_fft // 2 + 1, n_mels] weights: triangles on the HTK mel scale between equally spaced mel
    edges from 0 Hz to ``f_max``, each band's weights scaled to sum to one."""
    bins = torch.arange(cfg.n_fft // 2 + 1, dtype=torch.float64) * cfg.sample_rate / cfg.n_fft
    mel = _htk_mel(bins)
    edges = torch.linspace(0.0, float(_htk_mel(torch.tensor(cfg.f_max, dtype=torch.float64))), cfg.n_mels + 2)
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (mel[None, :] - low) / (centre - low)
    falling = (high - mel[None, :]) / (high - centre)
    tri = torch.clamp(torch.minimum(rising, falling), min=0.0)  # [n_mels, bins]
    tri = tri / tri.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return tri.T.float()


class AisfxLogMel(nn.Module):
    """[B, samples] at ``sample_rate`` -> [B, frames, 96] normalised log-mel (the trunk's input)."""

    def __init__(self, cfg: AisfxConfig, sample_rate: int) -> None:
        super().__init__()
        self.cfg, self.sample_rate = cfg, sample_rate
        # Essentia's Hann window is symmetric (periodic=False).
        self.register_buffer("window", torch.hann_window(cfg.n_fft, periodic=False), persistent=False)
        self.register_buffer("mel", mel_weights(cfg), persistent=False)

    def num_frames(self, num_samples: int) -> int:
        """Frames of a clip of ``num_samples`` at the trunk's rate: one per hop while a frame
        starts inside the clip (the first starts half a frame before it)."""
        return math.ceil((num_samples + self.cfg.n_fft // 2) / self.cfg.hop_length)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        with torch.autocast(device_type=wave.device.type, enabled=False):
            wave = wave.float()
            if self.sample_rate != cfg.sample_rate:
                wave = torchaudio.functional.resample(wave, self.sample_rate, cfg.sample_rate)
            frames = self.num_frames(wave.shape[-1])
            half = cfg.n_fft // 2
            right = (frames - 1) * cfg.hop_length + cfg.n_fft - half - wave.shape[-1]
            padded = F.pad(wave, (half, max(0, right)))
            spec = torch.stft(padded, cfg.n_fft, cfg.hop_length, window=self.window, center=False, return_complex=True)[
                ..., :frames
            ]
            power = spec.real**2 + spec.imag**2  # [B, bins, frames]
            bands = torch.einsum("bft,fm->btm", power, self.mel)
            return torch.log10(1.0 + 1e4 * bands) / cfg.input_max


class ConvBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and ReLU, then max pooling (names as the checkpoint's)."""

    def __init__(self, cin: int, cout: int, pool: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.max_pool2d(x, self.pool) if self.pool > 1 else x


class AisfxNet(nn.Module):
    """Blocks [N, 100, 96] -> embeddings [N, 512]: four conv blocks (pooled 2x2 after the first
    three), the mean over frequency, the maximum over time."""

    def __init__(self, cfg: AisfxConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.conv_block1 = ConvBlock(1, c, 2)
        self.conv_block2 = ConvBlock(c, 2 * c, 2)
        self.conv_block3 = ConvBlock(2 * c, 4 * c, 2)
        self.conv_block4 = ConvBlock(4 * c, 8 * c, 1)
        self.dim = 8 * c

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        x = blocks.unsqueeze(1)
        for block in (self.conv_block1, self.conv_block2, self.conv_block3, self.conv_block4):
            x = block(x)
        return x.mean(dim=3).amax(dim=2)


def split_blocks(spec: torch.Tensor, cfg: AisfxConfig) -> torch.Tensor:
    """[B, frames, mels] -> [B, blocks, block_frames, mels]: every ``block_hop`` frames, a last
    block that would reach past the clip dropped, at least one block (zero-padded), as the
    package blocks a clip."""
    frames = spec.shape[1]
    size, hop = cfg.block_frames, cfg.block_hop
    count = max(1, (frames - size) // hop + 1) if frames >= size else 1
    if frames < size:
        spec = F.pad(spec, (0, 0, 0, size - frames))
    return torch.stack([spec[:, i * hop : i * hop + size] for i in range(count)], dim=1)


class AisfxEmbedding(nn.Module):
    """Waveforms [B, samples] at ``sample_rate`` -> clip embeddings [B, 1024]: the mean and the
    standard deviation of the trunk's block embeddings."""

    def __init__(self, sample_rate: int, cfg: AisfxConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or AisfxConfig()
        self.logmel = AisfxLogMel(self.cfg, sample_rate)
        self.net = AisfxNet(self.cfg)
        self.dim = 2 * self.net.dim

    def block_embeddings(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, samples] -> [B, blocks, 512]."""
        blocks = split_blocks(self.logmel(wave), self.cfg)
        b, n = blocks.shape[:2]
        return self.net(blocks.flatten(0, 1)).view(b, n, -1)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        emb = self.block_embeddings(wave)
        std = emb.std(dim=1, unbiased=False) if emb.shape[1] > 1 else torch.zeros_like(emb[:, 0])
        return torch.cat([emb.mean(dim=1), std], dim=1)
