"""The simple floor every trained system must beat: a logistic regression on per-band log-mel
mean/std (audio) + one-hot city + the time features (metadata), trained on labelled clips; and
the same with a pretrained trunk's clip embedding added (what one linear model gets from it).

Eval-only cities: the metadata models also train on a copy of every clip with its city replaced
by ``<unk>`` (city dropout, as raysc's models do), so those cities get a trained fallback.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchaudio

from raysc.audio import FeatureStore
from raysc.feature_cache import FeatureCache
from raysc.frontend import FRONTENDS
from raysc.metadata import CLASSES, TIME_FEATURES
from raysc.metrics import macro_accuracy


def audio_features(store: FeatureStore, names: list[str]) -> np.ndarray:
    mel = torchaudio.transforms.MelSpectrogram(
        store.spec.sample_rate, n_fft=1024, hop_length=512, n_mels=64, f_min=50.0
    )
    feats = []
    for start in range(0, len(names), 64):
        wave = torch.from_numpy(store.load(names[start : start + 64]))
        logmel = torch.log10(mel(wave) + 1e-8)  # [B, 64, T]
        feats.append(torch.cat([logmel.mean(-1), logmel.std(-1)], 1).numpy())
    return np.concatenate(feats)


def trunk_features(
    data_dir: Path, store: FeatureStore, names: list[str], trunk: str = "aisfx", *, city_centred: bool = False
) -> np.ndarray:
    """A pretrained trunk's clip embedding (raysc.trunks), from the data folder's feature cache:
    the one the pipeline's trunk member reads, built here when missing; ``city_centred``: less
    its city's mean over the data folder (``FrontendConfig.city_centred``)."""
    frontend = FRONTENDS[trunk].at_rate(store.spec.sample_rate)  # as the member at the data's rate
    frontend = dataclasses.replace(frontend, city_centred=city_centred)
    return FeatureCache.ensure(data_dir, store, frontend).load(names)[:, 0, 0]


def meta_features(m: pd.DataFrame, n_cities: int) -> np.ndarray:
    city = np.eye(n_cities, dtype=np.float32)[m["city_idx"].to_numpy()]
    return np.concatenate([city, m[list(TIME_FEATURES)].to_numpy(np.float32)], 1)


def logistic_regression(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, *, l2: float = 1e-2) -> np.ndarray:
    """Full-batch L-BFGS softmax regression on standardised features; returns the test clips'
    class probabilities."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mu) / sd).float()
    xe = torch.from_numpy((x_test - mu) / sd).float()
    yt = torch.from_numpy(np.array(y, dtype=np.int64))
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], len(CLASSES))
    opt = torch.optim.LBFGS(lin.parameters(), lr=0.5, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt), yt) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return torch.softmax(lin(xe), 1).numpy()


def floor_predictions(
    store: FeatureStore,
    train: pd.DataFrame,
    test: pd.DataFrame,
    n_cities: int,
    *,
    features: str = "both",
    data_dir: Path | None = None,
) -> np.ndarray:
    """Class probabilities for ``test`` from the floor trained on ``train`` (rows with ``label``);
    ``features``: audio, metadata, both, both+aisfx (the aisfx trunk's embedding added, from
    ``data_dir``'s feature cache) or both+aisfx-centred (that embedding less its city's mean)."""
    y = train["label"].map(CLASSES.index).to_numpy()
    parts_tr, parts_unk, parts_te = [], [], []
    trunk = features in ("both+aisfx", "both+aisfx-centred")
    if features in ("audio", "both") or trunk:
        a_tr = audio_features(store, list(train["filename"]))
        parts_tr.append(a_tr)
        parts_unk.append(a_tr)
        parts_te.append(audio_features(store, list(test["filename"])))
    if trunk:
        centred = features == "both+aisfx-centred"
        t_tr = trunk_features(data_dir, store, list(train["filename"]), city_centred=centred)
        parts_tr.append(t_tr)
        parts_unk.append(t_tr)
        parts_te.append(trunk_features(data_dir, store, list(test["filename"]), city_centred=centred))
    if features in ("metadata", "both") or trunk:
        parts_tr.append(meta_features(train, n_cities))
        parts_unk.append(meta_features(train.assign(city_idx=0), n_cities))
        parts_te.append(meta_features(test, n_cities))
    x_tr, x_te = np.concatenate(parts_tr, 1), np.concatenate(parts_te, 1)
    if features == "audio":
        return logistic_regression(x_tr, y, x_te)
    x_unk = np.concatenate(parts_unk, 1)
    return logistic_regression(np.concatenate([x_tr, x_unk]), np.concatenate([y, y]), x_te)


def eval_score(labels: np.ndarray, rows: pd.DataFrame) -> dict[str, float]:
    """Macro accuracy of predicted class indices on eval rows with ``scene_label`` (the synthetic
    data's truth): overall, on cities seen in development, and on eval-only cities (``<unk>``)."""
    y = rows["scene_label"].map(CLASSES.index).to_numpy()
    unseen = (rows["city_idx"] == 0).to_numpy()
    return {
        "eval": macro_accuracy(y, labels, len(CLASSES)),
        "seen": macro_accuracy(y[~unseen], labels[~unseen], len(CLASSES)),
        "unseen": macro_accuracy(y[unseen], labels[unseen], len(CLASSES)) if unseen.any() else float("nan"),
    }
