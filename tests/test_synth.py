"""The synthetic dataset: exact challenge format, session/city/time structure, determinism."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from conftest import SR

from raysc.errors import ConfigError
from raysc.metadata import CLASSES, parse_metadata
from raysc.synth import DEV_METADATA, EVAL_LABELS, EVAL_METADATA, SCENES, activity, synthesize

NAME = re.compile(r"[0-9a-f]{32}\d{1,2}_[12]")


def test_metadata_is_in_the_challenge_format(synth_dir):
    raw, summary = synth_dir
    dev_bytes = (raw / DEV_METADATA).read_bytes()
    assert dev_bytes.startswith(b"\xef\xbb\xbffilename,location,record_time,scene_label\n")
    dev, problems = parse_metadata(raw / DEV_METADATA, subset="dev")
    ev, eval_problems = parse_metadata(raw / EVAL_METADATA, subset="eval")
    assert problems == [] and eval_problems == []
    assert len(dev) == summary.dev_clips == 200 and len(ev) == summary.eval_clips == 60
    assert dev["label"].notna().sum() == summary.labelled == 40
    assert all(NAME.fullmatch(f) for f in [*dev["filename"], *ev["filename"]])
    # Unlabelled rows end with a comma, as in the official files.
    assert any(line.endswith(",") for line in dev_bytes.decode("utf-8-sig").splitlines()[1:])
    for name in list(dev["filename"][:3]) + list(ev["filename"][:3]):
        sub = "dev" if name in set(dev["filename"]) else "eval"
        info = sf.info(str(raw / "audio" / sub / f"{name}.wav"))
        assert info.samplerate == SR and info.frames == SR and info.channels == 1


def test_sessions_share_city_time_and_scene(synth_dir):
    raw, summary = synth_dir
    dev, _ = parse_metadata(raw / DEV_METADATA, subset="dev")
    truth = pd.read_csv(raw / EVAL_LABELS)
    ev, _ = parse_metadata(raw / EVAL_METADATA, subset="eval")
    ev = ev.drop(columns="label").merge(truth, on="filename")
    lab = dev.dropna(subset=["label"])
    assert (lab.groupby(["city", "record_time"])["label"].nunique() == 1).all()
    assert (ev.groupby(["city", "record_time"])["scene_label"].nunique() == 1).all()
    sizes = dev.groupby(["city", "record_time"]).size()
    assert sizes.max() > 1 and summary.dev_sessions == len(sizes)
    assert set(truth["scene_label"]) <= set(CLASSES)


def test_eval_has_cities_never_seen_in_dev(synth_dir):
    raw, summary = synth_dir
    dev, _ = parse_metadata(raw / DEV_METADATA, subset="dev")
    ev, _ = parse_metadata(raw / EVAL_METADATA, subset="eval")
    unseen = set(ev["city"]) - set(dev["city"])
    assert unseen and unseen <= set(summary.unseen_cities)
    assert 0.2 < ev["city"].isin(unseen).mean() < 0.5


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    kw = dict(clips=30, eval_clips=10, sample_rate=SR, clip_seconds=0.5, cities=2, unseen_cities=1, session_size=3)
    a = synthesize(tmp_path / "a", seed=7, **kw)
    b = synthesize(tmp_path / "b", seed=7, **kw)
    c = synthesize(tmp_path / "c", seed=8, **kw)
    for rel in (DEV_METADATA, EVAL_METADATA, EVAL_LABELS):
        assert (a.out / rel).read_bytes() == (b.out / rel).read_bytes()
        assert (a.out / rel).read_bytes() != (c.out / rel).read_bytes()
    wavs = sorted(p.relative_to(a.out) for p in (a.out / "audio").rglob("*.wav"))
    assert len(wavs) == 40
    assert all((a.out / w).read_bytes() == (b.out / w).read_bytes() for w in wavs)


@pytest.mark.slow
def test_workers_do_not_change_the_audio(tmp_path):
    kw = dict(clips=20, eval_clips=4, sample_rate=SR, clip_seconds=0.5, cities=2, unseen_cities=0, seed=1)
    a = synthesize(tmp_path / "a", workers=1, **kw)
    b = synthesize(tmp_path / "b", workers=2, **kw)
    wavs = sorted(p.relative_to(a.out) for p in (a.out / "audio").rglob("*.wav"))
    assert all((a.out / w).read_bytes() == (b.out / w).read_bytes() for w in wavs)


def test_time_shapes_the_scene_prior():
    bar, site = SCENES["Bar"], SCENES["Construction site"]
    assert activity(bar, 23.0) > 0.9 and activity(bar, 10.0) < 0.2
    assert activity(site, 11.0) > 0.9 and activity(site, 2.0) < 0.1
    assert site.weekend < 0.5 < SCENES["Urban park"].weekend


def _band_features(raw, names, folder):
    feats = []
    for name in names:
        wave, _ = sf.read(str(raw / "audio" / folder / f"{name}.wav"))
        frames = wave[: len(wave) // 256 * 256].reshape(-1, 256)
        spec = np.abs(np.fft.rfft(frames * np.hanning(256), axis=1)) ** 2
        bands = np.log(spec.reshape(spec.shape[0], -1)[:, :128].reshape(spec.shape[0], 16, 8).mean(-1) + 1e-10)
        feats.append(np.concatenate([bands.mean(0), bands.std(0)]))
    return np.array(feats)


def test_audio_alone_is_learnable(synth_dir):
    """A nearest-class-mean classifier on band energies beats chance clearly on eval clips."""
    raw, _ = synth_dir
    dev, _ = parse_metadata(raw / DEV_METADATA, subset="dev")
    lab = dev.dropna(subset=["label"])
    truth = pd.read_csv(raw / EVAL_LABELS)
    x, xe = _band_features(raw, lab["filename"], "dev"), _band_features(raw, truth["filename"], "eval")
    mu, sd = x.mean(0), x.std(0) + 1e-9
    x, xe = (x - mu) / sd, (xe - mu) / sd
    classes = sorted(set(lab["label"]))
    centroids = np.stack([x[(lab["label"] == c).to_numpy()].mean(0) for c in classes])
    pred = np.array(classes)[((xe[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
    accuracy = (pred == truth["scene_label"].to_numpy()).mean()
    assert accuracy > 0.3, accuracy  # chance is 0.1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clips": 5}, "need at least 10 dev clips"),
        ({"labelled_fraction": 0.0}, "labelled fraction must be in (0, 1]"),
        ({"cities": 20, "unseen_cities": 5}, "cities + unseen cities <= 22 (got 20 + 5)"),
        ({"sample_rate": 4000}, "sample rate must be >= 8000"),
        ({"session_size": 0}, "session size must be >= 1"),
    ],
)
def test_bad_options(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        synthesize(tmp_path, **kwargs)
    assert not (tmp_path / "metadata").exists()
