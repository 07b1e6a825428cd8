"""The front end against an independent numpy computation of the same definition; SpecAugment."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from raysc.frontend import (
    FRONTENDS,
    ROOM_REVERB_MIX,
    ROOM_RT60_S,
    Frontend,
    FrontendConfig,
    frontend_preset,
    random_rooms,
)


def _hz_to_mel(f: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    f = np.asarray(f, dtype=float)  # Slaney: linear to 1 kHz, logarithmic above
    return np.where(f < 1000.0, f / (200.0 / 3), 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) / (np.log(6.4) / 27.0))


def _mel_to_hz(m: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 700.0 * (10 ** (m / 2595.0) - 1.0)
    return np.where(m < 15.0, m * 200.0 / 3, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0))


def reference_logmel(wave: np.ndarray, c: FrontendConfig) -> np.ndarray:
    """[frames, mels] by the textbook definition, float64, no torch."""
    pad = c.n_fft // 2
    x = np.pad(wave.astype(np.float64), pad, mode="reflect")
    n = np.arange(c.win_length)
    window = np.zeros(c.n_fft)
    left = (c.n_fft - c.win_length) // 2
    window[left : left + c.win_length] = 0.5 - 0.5 * np.cos(2 * np.pi * n / c.win_length)  # periodic Hann
    frames = 1 + len(wave) // c.hop_length
    idx = np.arange(c.n_fft)[None, :] + c.hop_length * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * window, axis=1)) ** c.power  # [frames, bins]
    freqs = np.fft.rfftfreq(c.n_fft, 1.0 / c.sample_rate)
    hz = _mel_to_hz(
        np.linspace(_hz_to_mel(c.f_min, c.mel_scale), _hz_to_mel(c.f_max, c.mel_scale), c.n_mels + 2), c.mel_scale
    )
    fb = np.zeros((c.n_mels, len(freqs)))
    for i in range(c.n_mels):
        lower = (freqs - hz[i]) / (hz[i + 1] - hz[i])
        upper = (hz[i + 2] - freqs) / (hz[i + 2] - hz[i + 1])
        fb[i] = np.maximum(0, np.minimum(lower, upper)) * (2.0 / (hz[i + 2] - hz[i]))  # Slaney area norm
    mel = spec @ fb.T
    if c.log == "db":
        db = 10 * np.log10(np.maximum(mel, 1e-10))
        db = np.maximum(db, db.max() - c.top_db)
    else:
        db = 10 * np.log10(mel + 1e-8)
    return db[: c.frames] if c.frames else db


def _test_signal(seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tones = sum(a * np.sin(2 * np.pi * f * t) for a, f in ((0.3, 220.0), (0.1, 1375.0), (0.02, 6000.0)))
    return (tones + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.mark.parametrize("preset", ["baseline", "rm3"])
def test_front_end_matches_independent_reference(preset):
    cfg = FRONTENDS[preset]
    waves = np.stack([_test_signal(10.0, cfg.sample_rate, s) for s in (0, 1)])
    waves[1] *= 1e-3  # a quiet clip: the 80 dB floor must be per clip, not per batch
    out = Frontend(cfg).eval()(torch.from_numpy(waves)).numpy()
    expected_frames = 500 if preset == "baseline" else 313
    assert out.shape == (2, 1, expected_frames, cfg.n_mels)
    for i in range(2):
        ref = reference_logmel(waves[i], cfg)
        # float32 (torch) against float64 (numpy): within 0.01 dB everywhere.
        np.testing.assert_allclose(out[i, 0], ref, atol=0.01, rtol=0)
    if preset == "baseline":
        assert out[1, 0].max() - out[1, 0].min() <= 80.0 + 1e-3


def test_spec_augment_masks_only_in_training():
    cfg = dataclasses.replace(
        FRONTENDS["baseline"],
        sample_rate=16000,
        n_fft=512,
        win_length=400,
        hop_length=160,
        f_max=8000.0,
        frames=None,
        freq_masks=2,
        freq_mask_width=8,
        time_masks=2,
        time_mask_width=20,
    )
    fe = Frontend(cfg)
    wave = torch.from_numpy(np.stack([_test_signal(2.0, 16000, s) for s in range(4)]))
    clean = fe.eval()(wave)
    assert torch.equal(clean, fe.eval()(wave))
    torch.manual_seed(0)
    masked = fe.train()(wave)
    changed = masked != clean
    assert changed.any()
    # Masks are whole stripes: a masked frequency bin is masked at every frame or a masked frame
    # at every bin, and filled with the clip's mean.
    for b in range(4):
        m = changed[b, 0]
        stripes = m.all(dim=0)[None, :] | m.all(dim=1)[:, None]
        assert torch.equal(m & ~stripes, torch.zeros_like(m))
        fill = clean[b].mean()
        assert torch.allclose(masked[b, 0][m], fill.expand(int(m.sum())), atol=1e-4)
        assert changed[b, 0].all(dim=0).sum() <= 2 * 8 and changed[b, 0].all(dim=1).sum() <= 2 * 20


def test_random_rooms_add_a_causal_exponential_tail_and_one_eq_per_clip():
    # Power dB at 1,000 frames a second: a tail decays a fraction of a dB a frame, so its slope and
    # level can be read back from a few frames after an impulse.
    cfg = FrontendConfig(sample_rate=8000, hop_length=8, n_mels=16, power=2.0, log="eps", top_db=None)
    rate = cfg.sample_rate / cfg.hop_length
    quiet = torch.full((8, 1, 60, 16), -200.0)
    impulse = quiet.clone()
    impulse[:, :, 20] = 0.0
    torch.manual_seed(0)
    y = random_rooms(impulse, cfg)
    torch.manual_seed(0)
    y_quiet = random_rooms(quiet, cfg)  # the same rooms
    # Nothing before the sound (causal), up to the float FFT's rounding: 1e-7 of the loudest energy.
    leak = (10 ** (y[:, :, :20] / 10) - 10 ** (y_quiet[:, :, :20] / 10)).abs().max()
    assert leak < 1e-7 * 10 ** (y.amax() / 10)
    steps = y[:, 0, 22:40] - y[:, 0, 21:39]  # dB a frame, per clip and band
    assert torch.allclose(steps, steps[:, :1], atol=0.02)  # exponential, the same in every band
    decay = 10 ** (steps[:, 0, 0] / 10)  # energy kept per frame
    rt60 = -60 / (steps[:, 0, 0] * rate)
    assert ((rt60 > ROOM_RT60_S[0] - 1e-3) & (rt60 < ROOM_RT60_S[1] + 1e-3)).all(), rt60
    assert rt60.std() > 0.05  # each clip its own room
    # The first tail frame against the impulse's: mix**2 (1 - a) a / (1 + mix**2 (1 - a)).
    r = 10 ** ((y[:, 0, 21, 0] - y[:, 0, 20, 0]) / 10)
    mix = (r / ((1 - decay) * (decay - r))).sqrt()
    assert ((mix > ROOM_REVERB_MIX[0] - 1e-3) & (mix < ROOM_REVERB_MIX[1] + 1e-3)).all(), mix
    # The EQ: one gain per clip and band, constant in time, smooth over the bands, not flat.
    gain = y[:, 0, 20] - 10 * torch.log10(1 + mix[:, None] ** 2 * (1 - decay[:, None]))
    assert gain.std() > 1.0 and (gain[:, 1:] - gain[:, :-1]).abs().max() < gain.abs().max()
    assert torch.allclose(y[:, 0, 30] - y[:, 0, 29], steps[:, 8], atol=1e-4)


def test_random_rooms_keep_the_front_ends_floor_and_magnitude_decibels():
    cfg = dataclasses.replace(FRONTENDS["baseline"], sample_rate=8000, hop_length=80, n_mels=16, f_max=4000.0)
    fe = Frontend(cfg).eval()
    spec = fe(torch.from_numpy(np.stack([_test_signal(1.0, 8000, s) for s in range(4)])))
    torch.manual_seed(1)
    y = random_rooms(spec, cfg)
    assert y.shape == spec.shape and y.dtype == spec.dtype and not torch.equal(y, spec)
    low, high = y.amin(dim=(1, 2, 3)), y.amax(dim=(1, 2, 3))
    assert (low >= high - cfg.top_db - 1e-3).all()  # the 80 dB floor, per clip


def test_presets_and_bad_values():
    assert frontend_preset("rm3", n_mels=64).n_mels == 64
    with pytest.raises(KeyError, match="unknown front end 'htk'"):
        frontend_preset("htk")
    with pytest.raises(ValueError, match="front end log must be 'db' or 'eps'"):
        Frontend(FrontendConfig(log="ln"))
    assert FrontendConfig().num_frames(441000) == 500 and FRONTENDS["rm3"].num_frames(160000) == 313
