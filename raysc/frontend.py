"""The front end: waveform -> log-mel spectrogram on the model's device, plus SpecAugment; or,
with ``trunk`` set, waveform -> a frozen pretrained trunk's clip embedding (``raysc.trunks``).

Output layout is ``[B, 1, frames, mels]`` (time before frequency), as the official baseline feeds
its network; a trunk's embedding is ``[B, 1, 1, dim]``. SpecAugment runs only in training mode,
and only on log-mels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torchaudio
from torch import nn

from .errors import ConfigError
from .trunks import TRUNKS, load_pretrained


@dataclass(frozen=True)
class FrontendConfig:
    """Log-mel settings. Defaults are the official baseline's (44.1 kHz, 64 Slaney mels)."""

    sample_rate: int = 44100
    n_fft: int = 2048
    win_length: int = 1764  # 40 ms
    hop_length: int = 882  # 20 ms
    n_mels: int = 64
    f_min: float = 50.0
    f_max: float | None = 22050.0
    power: float = 1.0  # 1 = magnitude (baseline), 2 = power (RM3)
    mel_scale: str = "slaney"
    mel_norm: str | None = "slaney"
    log: str = "db"  # "db": 10*log10(max(x, 1e-10)) with a top_db floor; "eps": 10*log10(x + 1e-8)
    top_db: float | None = 80.0
    frames: int | None = 500  # keep the first N frames (None: all)
    # SpecAugment: up to this many masks per clip, each up to this many bins/frames wide.
    freq_masks: int = 0
    freq_mask_width: int = 8
    time_masks: int = 0
    time_mask_width: int = 40
    # A pretrained trunk (raysc.trunks.TRUNKS) whose clip embedding the front end gives instead
    # of the log-mel; the trunk brings its own log-mel, so the settings above then do not apply.
    trunk: str | None = None
    # A trunk's embedding minus the mean embedding of its clip's city over every clip of the data
    # folder (development and eval, no labels used): what a city's recordings share is taken out,
    # so an eval-only city reaches the head as the seen ones do. Applied where the feature cache
    # is read (feature_cache.FeatureCache), so the cache itself stays the trunk's.
    city_centred: bool = False
    # Fine-tune the trunk end to end: its weights train with the rest of the network (its batch
    # norms keep the statistics it was pretrained with), so the front end runs on every batch and
    # no feature cache is read. Off: the trunk is frozen and its embedding cached once.
    trunk_trainable: bool = False

    def __post_init__(self) -> None:
        if self.trunk is not None and self.trunk not in TRUNKS:
            raise ConfigError(f"unknown trunk {self.trunk!r} (valid: {', '.join(TRUNKS)})")
        if self.city_centred and self.trunk is None:
            raise ConfigError("city_centred applies to a trunk's embedding: the front end has no trunk")
        if self.trunk_trainable and self.trunk is None:
            raise ConfigError("trunk_trainable fine-tunes a trunk: the front end has no trunk")
        if self.trunk_trainable and self.city_centred:
            raise ConfigError("city_centred is applied to a cached embedding; a trainable trunk's is never cached")

    def at_rate(self, sample_rate: int) -> FrontendConfig:
        """The same front end for audio at ``sample_rate``: window and hop keep their duration,
        the FFT the next power of two that holds the window, the top band stays below Nyquist."""
        if sample_rate == self.sample_rate:
            return self
        ratio = sample_rate / self.sample_rate
        win = max(16, round(self.win_length * ratio))
        nyquist = sample_rate / 2
        return replace(
            self,
            sample_rate=sample_rate,
            win_length=win,
            hop_length=max(1, round(self.hop_length * ratio)),
            n_fft=max(win, 2 ** math.ceil(math.log2(max(win, round(self.n_fft * ratio))))),
            f_max=min(self.f_max, nyquist) if self.f_max else None,
            f_min=min(self.f_min, nyquist / 2),
        )

    def cache_key(self) -> dict:
        """What the features depend on (SpecAugment's settings do not change them; a trunk's
        pinned weights do)."""
        # city_centred is applied on reading; a trainable trunk's output is never cached (and
        # leaving the flag out keeps the keys of caches made before it existed).
        skip = ("freq_mask", "time_mask", "city_centred", "trunk_trainable")
        key = {k: v for k, v in asdict(self).items() if not k.startswith(skip)}
        return key | ({"trunk_sha256": TRUNKS[self.trunk].sha256} if self.trunk else {})

    def num_frames(self, num_samples: int) -> int:
        if self.trunk:
            return 1
        full = num_samples // self.hop_length + 1  # centred STFT
        return min(full, self.frames) if self.frames else full

    @property
    def bins(self) -> int:
        """Values per frame: mel bands, or the trunk's embedding size."""
        return TRUNKS[self.trunk].dim if self.trunk else self.n_mels


FRONTENDS: dict[str, FrontendConfig] = {
    "baseline": FrontendConfig(),
    # RM3 (ICME 2024): 16 kHz, 128 HTK mels with Slaney norm on the power spectrogram.
    "rm3": FrontendConfig(
        sample_rate=16000,
        n_fft=1024,
        win_length=1024,
        hop_length=512,
        n_mels=128,
        f_min=0.0,
        f_max=8000.0,
        power=2.0,
        mel_scale="htk",
        mel_norm="slaney",
        log="eps",
        top_db=None,
        frames=None,
    ),
    # PANNs (Kong et al., 2020): 32 kHz, 1024-sample windows, 10 ms hop, 64 mels from 50 Hz to
    # 14 kHz (librosa's Slaney filters) on the power spectrogram, in dB without a floor.
    # The aisfx sound-effects CNN's clip embedding (raysc.trunks.aisfx), for audio at 44.1 kHz.
    "aisfx": FrontendConfig(sample_rate=44100, frames=None, trunk="aisfx"),
    "panns": FrontendConfig(
        sample_rate=32000,
        n_fft=1024,
        win_length=1024,
        hop_length=320,
        n_mels=64,
        f_min=50.0,
        f_max=14000.0,
        power=2.0,
        mel_scale="slaney",
        mel_norm="slaney",
        log="db",
        top_db=None,
        frames=None,
    ),
}


def frontend_preset(name: str, **overrides) -> FrontendConfig:
    if name not in FRONTENDS:
        raise KeyError(f"unknown front end {name!r} (valid: {', '.join(FRONTENDS)})")
    return replace(FRONTENDS[name], **overrides)


class Frontend(nn.Module):
    """The network's front end. With a trunk, the trunk is built with random weights (a saved
    model brings its own); ``load_pretrained`` gives it the published ones. Its batch norms stay
    in eval mode whatever mode the network is in; its weights stay frozen unless the config makes
    it trainable (``trunk_trainable``: fine-tuned end to end)."""

    def __init__(self, cfg: FrontendConfig) -> None:
        super().__init__()
        if cfg.log not in ("db", "eps"):
            raise ValueError(f"front end log must be 'db' or 'eps', got {cfg.log!r}")
        self.cfg = cfg
        if cfg.trunk:
            self.trunk = TRUNKS[cfg.trunk].build(cfg.sample_rate).eval().requires_grad_(cfg.trunk_trainable)
            return
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            win_length=cfg.win_length,
            hop_length=cfg.hop_length,
            f_min=cfg.f_min,
            f_max=cfg.f_max,
            n_mels=cfg.n_mels,
            power=cfg.power,
            norm=cfg.mel_norm,
            mel_scale=cfg.mel_scale,
            center=True,
            pad_mode="reflect",
        )

    def train(self, mode: bool = True) -> Frontend:
        super().train(mode)
        if self.cfg.trunk:
            # Frozen or fine-tuned, its batch norms keep the statistics it was pretrained with: a
            # few hundred clips would give worse ones.
            self.trunk.eval()
        return self

    def load_pretrained(self) -> None:
        """The trunk's published weights (fetched into the user's cache when missing); nothing
        without a trunk."""
        if self.cfg.trunk:
            load_pretrained(self.trunk, self.cfg.trunk)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, samples] float waveform -> [B, 1, frames, mels] log-mel (SpecAugment in training)."""
        return self.augment(self.features(wave))

    def augment(self, spec: torch.Tensor) -> torch.Tensor:
        """SpecAugment on a log-mel batch, in training mode only (also on cached features)."""
        if self.training and not self.cfg.trunk and (self.cfg.freq_masks or self.cfg.time_masks):
            return spec_augment(spec, self.cfg)
        return spec

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, samples] float waveform -> [B, 1, frames, mels] log-mel, or [B, 1, 1, dim] the
        trunk's clip embedding; never augmented: what a feature cache stores."""
        cfg = self.cfg
        if cfg.trunk:
            with torch.set_grad_enabled(cfg.trunk_trainable and torch.is_grad_enabled()):
                return self.trunk(wave)[:, None, None, :]
        # The STFT runs in fp32 even under autocast: bf16 spectra lose the quiet bands.
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spec = self.mel(wave.float())  # [B, mels, frames]
            if cfg.log == "db":
                spec = 10.0 * torch.log10(spec.clamp_min(1e-10))
                if cfg.top_db is not None:  # per clip, not per batch
                    spec = torch.maximum(spec, spec.amax(dim=(-2, -1), keepdim=True) - cfg.top_db)
            else:
                spec = 10.0 * torch.log10(spec + 1e-8)
        if cfg.frames:
            spec = spec[..., : cfg.frames]
        return spec.transpose(1, 2).unsqueeze(1)


def _masks(count: int, width: int, size: int, batch: int, device: torch.device) -> torch.Tensor:
    """[batch, size] bool: up to ``count`` random stripes per row, each 0..width wide."""
    widths = torch.randint(0, width + 1, (batch, count, 1), device=device)
    starts = (torch.rand(batch, count, 1, device=device) * (size - widths + 1).clamp_min(1)).long()
    pos = torch.arange(size, device=device).view(1, 1, size)
    return ((pos >= starts) & (pos < starts + widths)).any(dim=1)


def spec_augment(spec: torch.Tensor, cfg: FrontendConfig) -> torch.Tensor:
    """Frequency and time masks (SpecAugment) on [B, 1, T, F], filled with each clip's mean."""
    b, _, t, f = spec.shape
    mask = torch.zeros(b, t, f, dtype=torch.bool, device=spec.device)
    if cfg.freq_masks:
        mask |= _masks(cfg.freq_masks, cfg.freq_mask_width, f, b, spec.device)[:, None, :]
    if cfg.time_masks:
        mask |= _masks(cfg.time_masks, cfg.time_mask_width, t, b, spec.device)[:, :, None]
    fill = spec.mean(dim=(-2, -1), keepdim=True)
    return torch.where(mask.unsqueeze(1), fill, spec)


# An eval-only city records through a device and rooms no training clip had. A random room acts
# on the log-mel as what such a city changes: a smooth EQ over the mel bands (a device, a
# housing) and a late-reverb tail per band (energy decaying 60 dB in RT60, at a random
# reverberant-to-direct level).
ROOM_RT60_S = (0.1, 1.0)
ROOM_REVERB_MIX = (0.05, 0.4)  # reverb amplitude relative to the direct sound
ROOM_EQ_DB = 6.0  # standard deviation of the EQ gain at each knot, in power dB
ROOM_EQ_KNOTS = 8  # spread evenly over the mel bands


def random_rooms(spec: torch.Tensor, cfg: FrontendConfig) -> torch.Tensor:
    """Each clip of a [B, 1, T, F] log-mel batch (made by a front end with ``cfg``) as recorded
    in a random room through a random device. Uses torch's global generator."""
    b, _, t, f = spec.shape
    x = spec.float()
    per_db = cfg.power / 2  # the front end's dB are of magnitude (power 1) or power (power 2)
    energy = torch.pow(10.0, x / (10 * per_db))
    dev = x.device
    rt60 = torch.empty(b, device=dev).uniform_(*ROOM_RT60_S)
    mix = torch.empty(b, device=dev).uniform_(*ROOM_REVERB_MIX)
    decay = torch.pow(10.0, -6.0 / (rt60 * cfg.sample_rate / cfg.hop_length))  # energy kept per frame
    # An exponential tail whose weights sum to mix**2: the reverb's share of a steady sound's energy.
    kernel = (mix**2 * (1 - decay))[:, None] * decay[:, None] ** torch.arange(t, device=dev)
    n = 2 * t  # zero-padded: a linear, causal convolution along time
    tail = torch.fft.irfft(
        torch.fft.rfft(energy, n, dim=2) * torch.fft.rfft(kernel, n, dim=1)[:, None, :, None], n, dim=2
    )
    y = 10 * per_db * torch.log10((energy + tail[:, :, :t].clamp_min(0)).clamp_min(1e-30))
    knots = torch.randn(b, 1, ROOM_EQ_KNOTS, device=dev) * ROOM_EQ_DB
    gains = nn.functional.interpolate(knots, size=f, mode="linear", align_corners=True)  # [B, 1, F]
    y = y + per_db * gains[:, :, None, :]
    if cfg.log == "db" and cfg.top_db is not None:  # the front end's floor, per clip
        y = torch.maximum(y, y.amax(dim=(-2, -1), keepdim=True) - cfg.top_db)
    return y.to(spec.dtype)
