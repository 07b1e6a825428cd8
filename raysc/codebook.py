"""Frame codebooks: k-means centroids of log-mel frames, fitted without labels.

A clip's frames are taken relative to the clip's own mean log-mel (so a device's or room's
constant gain per band drops out), and the centroids of those frame shapes over many clips are
the "words" of a bag-of-frames histogram (``models.stats``). The centroids depend only on the
audio of the clips they are fitted on, never on labels; ``fit`` fits them on the development
clips outside its validation fold (labelled and unlabelled alike) and caches them beside the
feature cache, keyed by the clip set and the number of centroids:

    DATA/features/<front end key>/codebook-<k>-<clip set hash>.npy
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from .feature_cache import FeatureCache
from .fileio import atomic_path

log = logging.getLogger(__name__)

MAX_FRAMES = 60_000  # frames the centroids are fitted on: enough for 128 centroids of 64 bands
ITERATIONS = 20
CHUNK = 64  # clips read from the cache at a time


def codebook_clips(manifest: pd.DataFrame, fold: int, subset: str = "labelled") -> list[str]:
    """The clips a run on validation fold ``fold`` may fit its codebook on: the training subset's
    and the unlabelled development clips, except every clip of a validation session (folds
    follow sessions; ``fold == -1`` keeps them all)."""
    subsets = {subset, "unlabelled"} if subset == "labelled" else {subset}
    rows = manifest[manifest["subset"].isin(subsets)]
    held_out = set(manifest.loc[(manifest["subset"] == subset) & (manifest["fold"] == fold), "session"])
    return sorted(rows.loc[~rows["session"].isin(held_out), "filename"])


def centred_frames(logmel: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, F] log-mel -> [B, T, F] frames minus their clip's mean over time."""
    x = logmel.squeeze(1).float()
    return x - x.mean(1, keepdim=True)


def distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[..., F] rows, [k, F] centroids -> [..., k] squared distances minus |x|^2 (the same for
    every centroid, so the nearest centroid is still the argmin; one matrix product)."""
    return centroids.square().sum(1) - 2 * x @ centroids.T


def kmeans(x: torch.Tensor, k: int, *, iterations: int = ITERATIONS, seed: int = 0) -> torch.Tensor:
    """[N, F] -> [k, F] centroids (Lloyd's algorithm from k distinct random rows; a cluster left
    empty takes the row farthest from its centroid)."""
    if len(x) < k:
        raise ValueError(f"k-means needs at least k={k} rows, got {len(x)}")
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iterations):
        d = distances(x, c)
        assign = d.argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp(min=1)[:, None].to(x.dtype))
        if empty.any():
            far = (d.gather(1, assign[:, None]).squeeze(1) + x.square().sum(1)).topk(int(empty.sum())).indices
            c[empty] = x[far]
    return c


def frame_codebook(cache: FeatureCache, clips: Sequence[str], k: int) -> torch.Tensor:
    """[k, mels] centroids of the centred frames of ``clips``, fitted once and cached."""
    digest = hashlib.sha256("\n".join(sorted(clips)).encode()).hexdigest()[:16]
    path = cache.path / f"codebook-{k}-{digest}.npy"
    if not path.is_file():
        with (cache.path.parent / f"{path.name}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another trial may be fitting the same one: wait for it
            if not path.is_file():
                t0 = time.perf_counter()
                centroids = kmeans(_sample_frames(cache, clips), k).numpy()
                with atomic_path(path) as tmp, tmp.open("wb") as f:
                    np.save(f, centroids)
                log.info("fitted %d frame centroids on %d clips (%.1f s)", k, len(clips), time.perf_counter() - t0)
    return torch.from_numpy(np.load(path))


def _sample_frames(cache: FeatureCache, clips: Sequence[str]) -> torch.Tensor:
    frames = cache.features.shape[1]
    stride = max(1, -(-len(clips) * frames // MAX_FRAMES))  # ceil: at most MAX_FRAMES frames in all
    parts = []
    for start in range(0, len(clips), CHUNK):
        x = centred_frames(torch.from_numpy(cache.load(clips[start : start + CHUNK])))
        parts.append(x[:, ::stride].reshape(-1, x.shape[2]))
    return torch.cat(parts)
