"""Cached features: the front end's log-mel (or a trunk's clip embedding) of every clip of a data
folder, computed once per front end and reused by every trial and epoch.

    DATA/features/<key>/logmel.npy    float32 [clips, frames, mels] ([clips, 1, dim] for a
                                      trunk), memory-mapped by readers
    DATA/features/<key>/spec.json     the front end it was made with and the store it was made from

``key`` hashes the front end's log-mel settings (SpecAugment's do not change the log-mel) and the
FeatureStore's content hash, so a changed front end or a rebuilt store gets a cache of its own.
Models keep their front end (saved models still take waveforms); training feeds them the cached
log-mel and applies SpecAugment, time shift and mixup to it. The cache is built under a file
lock, so trials that start together build it once; a build is written to a temporary folder and
renamed, so a killed build leaves nothing half-valid.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .audio import FeatureStore
from .fileio import write_json
from .frontend import Frontend, FrontendConfig
from .metadata import read_manifest

log = logging.getLogger(__name__)

CACHE_DIR = "features"
CHUNK = 64  # clips per front-end batch while building
TRUNK_CHUNK = 8  # a trunk's activations for 64 ten-second clips would take gigabytes


def cache_key(frontend: FrontendConfig, store: FeatureStore) -> str:
    spec = {"frontend": frontend.cache_key(), "store": store.spec.content_hash}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class FeatureCache:
    """Log-mel features of every clip of a FeatureStore, in the store's row order; with
    ``city_centred`` (a trunk front end's setting), each clip's minus its city's mean over every
    clip of the data folder."""

    def __init__(self, path: Path, store: FeatureStore, *, city_centred: bool = False) -> None:
        self.path, self.store, self.city_centred = path, store, city_centred
        self._features: np.ndarray | None = None
        self._city_means: tuple[np.ndarray, np.ndarray] | None = None  # (row -> city, city -> mean)

    @classmethod
    def ensure(cls, data_dir: str | Path, store: FeatureStore, frontend: FrontendConfig) -> FeatureCache:
        """The cache of ``frontend`` for this data folder, built first if there is none."""
        root = Path(data_dir) / CACHE_DIR
        path = root / cache_key(frontend, store)
        if not (path / "spec.json").is_file():
            root.mkdir(parents=True, exist_ok=True)
            with (root / f"{path.name}.lock").open("w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait for it
                if not (path / "spec.json").is_file():
                    _build(path, store, frontend)
        return cls(path, store, city_centred=frontend.city_centred)

    @classmethod
    def existing(cls, data_dir: str | Path, store: FeatureStore, frontend: FrontendConfig) -> FeatureCache | None:
        """The cache of ``frontend`` for this data folder when one has been built, else None."""
        path = Path(data_dir) / CACHE_DIR / cache_key(frontend, store)
        return cls(path, store, city_centred=frontend.city_centred) if (path / "spec.json").is_file() else None

    @property
    def features(self) -> np.ndarray:
        """The [clips, frames, mels] array, opened read-only on first use (per process)."""
        if self._features is None:
            self._features = np.load(self.path / "logmel.npy", mmap_mode="r")
        return self._features

    def __getstate__(self) -> dict:
        # A pickled cache reopens its map (and sums its city means) where it lands.
        return {**self.__dict__, "_features": None, "_city_means": None}

    def load(self, filenames: Iterable[str]) -> np.ndarray:
        """[B, 1, frames, mels] float32 log-mel of ``filenames``, in that order."""
        rows = self.store.rows(filenames)
        order = np.argsort(rows)  # sorted reads are sequential on disk
        out = np.empty((len(rows), *self.features.shape[1:]), dtype=np.float32)
        out[order] = self.features[rows[order]]
        if self.city_centred:
            city_of_row, means = self.city_means()
            out -= means[city_of_row[rows]]
        return out[:, None]

    def city_means(self) -> tuple[np.ndarray, np.ndarray]:
        """(each store row's city index, each city's mean features) over every clip of the data
        folder the store belongs to, by the manifest's city names (eval-only cities are their own,
        not ``<unk>``), computed once per process."""
        if self._city_means is None:
            manifest = read_manifest(self.path.parent.parent)
            codes, cities = pd.factorize(manifest["city"].fillna(""))
            city_of_row = np.zeros(len(self.store), np.int64)
            city_of_row[self.store.rows(manifest["filename"])] = codes
            means = np.zeros((len(cities), *self.features.shape[1:]), np.float64)
            for start in range(0, len(self.store), 256):  # the whole cache need not be in memory at once
                block = np.asarray(self.features[start : start + 256], np.float64)
                np.add.at(means, city_of_row[start : start + 256], block)
            means /= np.bincount(city_of_row, minlength=len(cities)).reshape(-1, *[1] * (means.ndim - 1))
            self._city_means = city_of_row, means.astype(np.float32)
        return self._city_means


def _build(path: Path, store: FeatureStore, frontend: FrontendConfig) -> None:
    t0 = time.perf_counter()
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a trunk is a network: its GPU
    fe = Frontend(frontend).eval()
    fe.load_pretrained()  # a trunk's published weights (none for a log-mel)
    fe.to(dev)
    frames = frontend.num_frames(store.spec.num_samples)
    out = np.lib.format.open_memmap(
        partial / "logmel.npy", mode="w+", dtype=np.float32, shape=(len(store), frames, frontend.bins)
    )
    chunk = TRUNK_CHUNK if frontend.trunk else CHUNK
    with torch.no_grad():
        for start in range(0, len(store), chunk):
            names = store.filenames[start : start + chunk]
            wave = torch.from_numpy(store.load(names)).to(dev)
            out[start : start + len(names)] = fe.features(wave)[:, 0].cpu().numpy()
            if frontend.trunk and (start // chunk) % 10 == 9:
                log.info("%s embeddings: %d of %d clips", frontend.trunk, start + len(names), len(store))
    out.flush()
    del out
    write_json(partial / "spec.json", {"frontend": asdict(frontend), "store": asdict(store.spec), "frames": frames})
    partial.rename(path)
    log.info("cached the log-mel of %d clips in %s (%.1f s)", len(store), path, time.perf_counter() - t0)
