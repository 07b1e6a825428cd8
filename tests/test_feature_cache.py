"""The feature cache: the front end's own output, one cache per front end, training unchanged."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from conftest import FRONTEND, tiny_config

from raysc.config import make_config
from raysc.datafolder import load_dataset
from raysc.feature_cache import CACHE_DIR, FeatureCache
from raysc.frontend import Frontend, FrontendConfig
from raysc.inference import predict_clips
from raysc.loader import Batch
from raysc.models import load_model
from raysc.train import augment, fit


def test_cached_features_equal_the_front_end_and_follow_its_config(prepared):
    data = load_dataset(prepared.out)
    fe = FrontendConfig(**FRONTEND)
    cache = FeatureCache.ensure(prepared.out, data.store, fe)
    names = data.store.filenames[5:12]
    with torch.no_grad():
        own = Frontend(fe).eval()(torch.from_numpy(data.store.load(names))).numpy()
    assert np.abs(cache.load(names) - own).max() <= 1e-5  # dB
    # SpecAugment does not change the log-mel: the same cache; another front end: another one.
    masked = FeatureCache.ensure(prepared.out, data.store, dataclasses.replace(fe, freq_masks=2, time_masks=2))
    assert masked.path == cache.path
    other = FeatureCache.ensure(prepared.out, data.store, dataclasses.replace(fe, n_mels=16))
    assert other.path != cache.path and other.load(names).shape == (7, 1, own.shape[2], 16)
    assert {p.name for p in (prepared.out / CACHE_DIR).iterdir() if p.is_dir()} >= {cache.path.name, other.path.name}
    assert not list((prepared.out / CACHE_DIR).glob("*.partial"))


def test_training_on_cached_features_matches_training_on_waveforms(prepared):
    cached = fit(tiny_config(cache_features=True), prepared.out)
    waves = fit(tiny_config(cache_features=False), prepared.out)
    for a, b in zip(cached.history, waves.history, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4 and abs(a["log_loss"] - b["log_loss"]) < 1e-4


def test_inference_reads_the_cache_when_there_is_one_and_predicts_the_same(prepared, tmp_path, monkeypatch):
    fit(tiny_config(epochs=1), prepared.out, out_dir=tmp_path / "run")
    names = list(prepared.rows("eval")["filename"][:9])
    fe = load_model(tmp_path / "run" / "model.pt").cfg.frontend
    assert FeatureCache.existing(prepared.out, prepared.store, fe) is not None  # training built it
    cached = predict_clips(tmp_path / "run" / "model.pt", prepared.out, names)
    monkeypatch.setattr(FeatureCache, "existing", classmethod(lambda cls, *a: None))  # as without a cache
    waves = predict_clips(tmp_path / "run" / "model.pt", prepared.out, names)
    assert list(cached["filename"]) == names == list(waves["filename"])
    assert np.abs(cached.drop(columns="filename").to_numpy() - waves.drop(columns="filename").to_numpy()).max() < 1e-4
    other = dataclasses.replace(fe, n_mels=fe.n_mels + 3)
    assert FeatureCache.existing(prepared.out, prepared.store, other) is None  # never built: no cache


def test_time_shift_of_cached_features_rolls_whole_frames():
    spec = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 1, 10, 3)
    batch = Batch(
        torch.zeros(2, 0),
        torch.zeros(2, dtype=torch.long),
        torch.zeros(2, 7),
        torch.eye(2),
        torch.ones(2),
        ["a", "b"],
        spec,
    )
    cfg = make_config({"backbone": "stats", "time_shift": 1.0})
    out = augment(batch, cfg, sample_rate=100, g=torch.Generator().manual_seed(0), hop_length=20)
    for i in range(2):  # each clip's frames, rolled as a block by its own shift
        shift = [s for s in range(10) if torch.equal(out.spec[i, 0], spec[i, 0].roll(s, dims=0))]
        assert len(shift) == 1
    assert out.wave.shape == (2, 0)
