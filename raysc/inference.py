"""Ray batch inference: an ensemble's probabilities on any clips of its data folder (eval,
unlabelled), one Ray task per member and chunk of clips, on GPUs when the cluster has them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .datafolder import PreparedData, load_dataset
from .distributed import init_ray
from .ensemble import apply_temperature, smooth_sessions
from .errors import RayscError
from .experiment import Ensemble, Experiment
from .feature_cache import FeatureCache
from .loader import ClipTable
from .models import load_model
from .train import device, predict


def predict_clips(
    model_path: str | Path,
    data: str | Path | PreparedData,
    filenames: list[str],
    *,
    unknown_city: bool = False,
    with_unknown_city: bool = False,
) -> pd.DataFrame:
    """One model's probabilities for ``filenames`` of a data folder (its path, or loaded) keyed by
    filename, on this process's device; from the data folder's cached log-mels when training left
    them (the same numbers as the model's own front end, without recomputing it), with
    ``unknown_city`` every city as ``<unk>``, with ``with_unknown_city`` both (``predict``)."""
    data = data if isinstance(data, PreparedData) else load_dataset(data)
    rows = data.manifest.set_index("filename").loc[filenames].reset_index()
    table = ClipTable.from_rows(rows, np.zeros((len(rows), len(data.classes)), np.float32))
    dev = device()
    model = load_model(model_path).to(dev)
    frontend = model.cfg.frontend
    if frontend.city_centred:  # its input is the cache's, less its city's mean over the folder: build it
        cache = FeatureCache.ensure(data.out, data.store, frontend)
    else:
        cache = None if model.uses_wave else FeatureCache.existing(data.out, data.store, frontend)
    return predict(
        model,
        table,
        data.store,
        device=dev,
        cache=cache,
        unknown_city=unknown_city,
        with_unknown_city=with_unknown_city,
    )


def check_members(ens: Ensemble, exp: Experiment) -> None:
    """Every member's model file loads (and matches its recorded hash), checked before Ray starts.

    Raises:
        RayscError: a member's file is missing, damaged or cut short; the message names it.
    """
    for m in ens.members:
        path = exp.root / m.model_path
        if not path.is_file():
            raise RayscError(f"ensemble {ens.name}: member {m.trial_id}'s model file {path} does not exist")
        try:
            load_model(path)
        except RayscError as exc:
            raise RayscError(f"ensemble {ens.name}: member {m.trial_id}: {exc}") from None


INFERENCE_GPUS = 0.25  # a member's inference task's share of a GPU: inference is light


def _member_task() -> Any:
    """``predict_clips`` as the Ray task that scores one member's clips: one CPU, and a share of a
    GPU where the cluster has them."""
    import ray  # lazy: see predict_ensemble

    gpu = INFERENCE_GPUS if ray.cluster_resources().get("GPU") else 0
    return ray.remote(predict_clips).options(num_cpus=1, num_gpus=gpu)


def member_seconds(ens: Ensemble, experiment: str | Path, filenames: list[str], *, address: str | None = None) -> float:
    """Seconds one Ray task takes to score ``filenames`` with the ensemble's first member, as
    ``predict_ensemble`` scores each member: the faster of two runs (the first may wait for a
    worker process to start).

    Args:
        ens: the ensemble.
        experiment: its experiment folder.
        filenames: clips of its data folder.
        address: a Ray cluster to join (None: a local Ray).

    Returns:
        The seconds, model and data loading included.
    """
    import ray  # lazy: see predict_ensemble

    exp = Experiment(Path(experiment).resolve())
    init_ray(address)
    task, model = _member_task(), str(exp.root / ens.members[0].model_path)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        ray.get(task.remote(model, ens.data, filenames))
        times.append(time.perf_counter() - t0)
    return min(times)


def predict_ensemble(
    ens: Ensemble,
    experiment: str | Path,
    filenames: list[str],
    *,
    chunk: int = 2048,
    unknown_city: bool = False,
    address: str | None = None,
) -> pd.DataFrame:
    """The ensemble's probabilities for ``filenames``: the members' weighted mean, its
    temperature, and session smoothing when the ensemble has it; ``unknown_city`` every city as
    ``<unk>``."""
    import ray  # lazy: importing Ray costs seconds, and only the launching commands need it

    exp = Experiment(Path(experiment).resolve())
    check_members(ens, exp)
    init_ray(address)
    task = _member_task()
    # Keyed by member position: a cross-fitted ensemble holds one member per trial and fold.
    refs = [
        (
            i,
            task.remote(
                str(exp.root / m.model_path), ens.data, filenames[start : start + chunk], unknown_city=unknown_city
            ),
        )
        for i, m in enumerate(ens.members)
        for start in range(0, len(filenames), chunk)
    ]
    parts: dict[int, list[pd.DataFrame]] = {i: [] for i in range(len(ens.members))}
    for i, ref in refs:
        parts[i].append(ray.get(ref))
    classes, mean = None, None
    for i, m in enumerate(ens.members):
        p = pd.concat(parts[i]).set_index("filename").loc[filenames]
        classes = list(p.columns)
        mean = p.to_numpy(np.float64) * m.weight + (0 if mean is None else mean)
    final = apply_temperature(mean, ens.temperature) if ens.temperature != 1.0 else mean
    if ens.session_smoothing:
        sessions = load_dataset(ens.data).manifest.set_index("filename").loc[filenames, "session"].to_numpy()
        final = smooth_sessions(final, sessions)
    out = pd.DataFrame(final, columns=classes)
    out.insert(0, "filename", filenames)
    return out
