"""Batches from the FeatureStore: the ``Batch`` type and the loaders that make them."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .audio import FeatureStore
from .feature_cache import FeatureCache
from .metadata import TIME_FEATURES


class Batch(NamedTuple):
    wave: torch.Tensor  # [B, samples] float32 ([B, 0] when the batch comes from a feature cache)
    city: torch.Tensor  # [B] long, 0 = <unk>
    time: torch.Tensor  # [B, 7] float32
    target: torch.Tensor  # [B, classes] soft targets summing to 1
    weight: torch.Tensor  # [B] per-sample loss weights
    filename: list[str]
    spec: torch.Tensor | None = None  # [B, 1, frames, mels] cached log-mel, when there is a cache

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.wave),
            move(self.city),
            move(self.time),
            move(self.target),
            move(self.weight),
            self.filename,
            move(self.spec),
        )


@dataclass(frozen=True)
class ClipTable:
    """The columns a loader draws from, one row per clip, aligned by position."""

    filename: np.ndarray
    city: np.ndarray  # int64
    time: np.ndarray  # float32 [N, 7]
    target: np.ndarray  # float32 [N, C]
    weight: np.ndarray  # float32 [N]

    @classmethod
    def from_rows(cls, rows: pd.DataFrame, target: np.ndarray, weight: np.ndarray | None = None) -> ClipTable:
        return cls(
            filename=rows["filename"].to_numpy(dtype=object),
            city=rows["city_idx"].to_numpy(dtype=np.int64),
            time=rows[list(TIME_FEATURES)].to_numpy(dtype=np.float32),
            target=np.asarray(target, dtype=np.float32),
            weight=np.ones(len(rows), np.float32) if weight is None else np.asarray(weight, np.float32),
        )

    def __len__(self) -> int:
        return len(self.filename)

    @staticmethod
    def concat(tables: list[ClipTable]) -> ClipTable:
        return ClipTable(*(np.concatenate([getattr(t, f) for t in tables]) for f in ClipTable.__dataclass_fields__))


class ClipDataset(Dataset):
    """Indexable clips; ``__getitems__`` reads a whole batch from the store in one sorted pass."""

    def __init__(self, table: ClipTable, store: FeatureStore, cache: FeatureCache | None = None) -> None:
        self.table, self.store, self.cache = table, store, cache

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> Batch:
        return self.__getitems__([i])

    def __getitems__(self, idx: list[int]) -> Batch:
        t, idx = self.table, np.asarray(idx)
        names = list(t.filename[idx])
        cached = self.cache is not None
        return Batch(
            wave=torch.zeros(len(names), 0) if cached else torch.from_numpy(self.store.load(names)),
            spec=torch.from_numpy(self.cache.load(names)) if cached else None,
            city=torch.from_numpy(t.city[idx]),
            time=torch.from_numpy(t.time[idx]),
            target=torch.from_numpy(t.target[idx]),
            weight=torch.from_numpy(t.weight[idx]),
            filename=names,
        )


def _identity(batch: Batch) -> Batch:
    return batch  # __getitems__ already built the Batch


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # set per worker by the loader's seeded generator
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    table: ClipTable,
    store: FeatureStore,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    cache: FeatureCache | None = None,
) -> DataLoader:
    """A loader over this rank's share of ``table``.

    The sampler is a DistributedSampler even on one process: it shuffles by (seed, epoch), and
    rank r of W takes every W-th clip of that order, so the union of the W ranks' k-th batches
    is the single process's k-th batch of ``batch_size * W`` clips. Evaluation loaders pad the
    last ranks with repeats; ``gather_predictions`` removes them by filename.
    """
    dataset = ClipDataset(table, store, cache)
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch * 101 + rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        # BatchNorm cannot train on a batch of one clip: a shuffled epoch's last batch of one is dropped.
        drop_last=shuffle and len(sampler) % batch_size == 1,
        collate_fn=_identity,
        num_workers=workers,
        worker_init_fn=_seed_worker,
        generator=g,
        persistent_workers=False,
    )
