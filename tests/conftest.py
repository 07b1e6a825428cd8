"""Shared fixtures: a tiny synthetic dataset in the challenge format, and helpers to write
hand-made metadata and audio for error cases, and the helpers several test files share (a tiny
training config, a small search space). No test file imports another."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from raysc.config import TrainConfig, make_config
from raysc.datafolder import PreparedData
from raysc.prepare import prepare
from raysc.synth import DEV_METADATA, EVAL_METADATA, SynthSummary, synthesize

ROOT = Path(__file__).resolve().parent.parent
SR = 8000
# A small front end for 1 s clips at 8 kHz.
FRONTEND = {
    "sample_rate": SR,
    "n_fft": 256,
    "win_length": 256,
    "hop_length": 128,
    "n_mels": 32,
    "f_min": 0.0,
    "f_max": 4000.0,
    "frames": None,
}


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray (2 CPUs) for every test that needs it, started the way raysc starts it."""
    import ray

    from raysc.distributed import init_ray

    init_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


def resources_released(timeout: float = 120) -> bool:
    """Every CPU and GPU back to its total and no placement group alive (polled: release is async,
    and takes tens of seconds on 2 cores under load; the timeout is only a hang guard)."""
    import ray
    from ray.util import placement_group_table

    deadline = time.time() + timeout
    while time.time() < deadline:
        avail, total = ray.available_resources(), ray.cluster_resources()
        alive = [p for p in placement_group_table().values() if p["state"] != "REMOVED"]
        if all(avail.get(k, 0) == total.get(k, 0) for k in ("CPU", "GPU")) and not alive:
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSummary]:
    out = tmp_path_factory.mktemp("synth")
    summary = synthesize(
        out,
        clips=200,
        eval_clips=60,
        sample_rate=SR,
        clip_seconds=1.0,
        cities=4,
        unseen_cities=2,
        session_size=4,
        pretrain_clips=12,
        seed=0,
    )
    return out, summary


def _prepare_tiny(raw: Path, out: Path, *, clip_seconds: float = 1.0, **extra) -> PreparedData:
    return prepare(
        dev_meta=raw / DEV_METADATA,
        eval_meta=raw / EVAL_METADATA,
        audio_dirs=[raw / "audio"],
        out=out,
        sample_rate=SR,
        clip_seconds=clip_seconds,
        folds=3,
        workers=1,
        **extra,
    )


@pytest.fixture(scope="session")
def prepared(synth_dir, tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    return _prepare_tiny(synth_dir[0], tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def prepared_short(synth_dir, tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """The tiny data set cut to its first 0.25 s a clip (13 frames): for ASCMamba, whose scan
    costs seconds a training step even on 1 s clips at width 0.125."""
    return _prepare_tiny(synth_dir[0], tmp_path_factory.mktemp("short-data"), clip_seconds=0.25)


@pytest.fixture(scope="session")
def prepared_with_aisfx(prepared) -> PreparedData:
    """``prepared`` with the aisfx trunk's embedding of every clip in its feature cache (the
    weights fetched into the user's cache first): a data folder a pipeline with the trunk used."""
    from raysc.feature_cache import FeatureCache
    from raysc.frontend import FRONTENDS

    FeatureCache.ensure(prepared.out, prepared.store, FRONTENDS["aisfx"].at_rate(prepared.store.spec.sample_rate))
    return prepared


@pytest.fixture(scope="session")
def with_pretrain(synth_dir, tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """The tiny data set, prepared with its TAU- and CochlScene-format pretraining clips."""
    raw = synth_dir[0]
    out = tmp_path_factory.mktemp("pretrain-data")
    return _prepare_tiny(raw, out, tau=raw / "pretrain" / "tau", cochlscene=raw / "pretrain" / "cochlscene")


@pytest.fixture(scope="session")
def learnable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """More labelled clips than ``prepared``: one epoch at lr 1e-2 beats chance clearly."""
    raw = tmp_path_factory.mktemp("learnable-raw")
    synthesize(
        raw,
        clips=300,
        eval_clips=40,
        labelled_fraction=0.6,
        sample_rate=SR,
        clip_seconds=1.0,
        cities=3,
        unseen_cities=1,
        session_size=4,
        seed=0,
    )
    return prepare(
        dev_meta=raw / DEV_METADATA,
        eval_meta=raw / EVAL_METADATA,
        audio_dirs=[raw / "audio"],
        out=tmp_path_factory.mktemp("learnable"),
        sample_rate=SR,
        clip_seconds=1.0,
        folds=3,
        workers=1,
    ).out


def write_metadata(
    path: Path, rows: Sequence[str], *, header: str = "filename,location,record_time,scene_label", bom: bool = True
) -> Path:
    """Write a metadata CSV the way the challenge does: UTF-8 with a BOM, one line per row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def write_wav(path: Path, seconds: float = 1.0, *, rate: int = SR, channels: int = 1, freq: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    sf.write(str(path), np.stack([wave] * channels, 1), rate, subtype="PCM_16")
    return path


@pytest.fixture
def small_inputs(tmp_path: Path) -> dict:
    """A valid hand-written dev/eval pair with audio: 6 dev clips in 3 sessions, 2 eval clips."""
    dev_rows = [
        "a1_1,Xi'an,2023-06-18 18:44:34,Airport",
        "a2_1,Xi'an,2023-06-18 18:44:34,",
        "b1_1,Jinan,2023-06-19 08:00:00,Bus",
        "b2_1,Jinan,2023-06-19 08:00:00,Bus",
        "c1_1,Hefei,2023-06-20 12:30:00,Metro",
        "c2_1,Hefei,2023-06-20 12:30:00,",
    ]
    eval_rows = ["e1_1,Xi'an,2023-06-21 05:51:23,", "e2_1,Sanya,2023-06-22 10:00:00,"]
    audio = tmp_path / "audio"
    for row in dev_rows + eval_rows:
        write_wav(audio / f"{row.split(',')[0]}.wav")
    return {
        "dev_meta": write_metadata(tmp_path / "dev.csv", dev_rows),
        "eval_meta": write_metadata(tmp_path / "eval.csv", eval_rows),
        "audio_dirs": [audio],
        "out": tmp_path / "data",
        "sample_rate": SR,
        "clip_seconds": 1.0,
        "folds": 2,
        "workers": 1,
    }


def tiny_config(**kw) -> TrainConfig:
    values = {
        "backbone": "mobileascnet",
        "model": {"width": 0.25, "frontend": FRONTEND},
        "epochs": 2,
        "batch_size": 16,
        "lr": 3e-3,
        "seed": 0,
        **kw,
    }
    return make_config(values)


def tiny_gpu_recipe(folder: Path, *, fixed: dict | None = None, **sections) -> Path:
    """The shipped GPU recipe (`raysc pipeline gpu`), its DDP settings as they are, cut to what CI
    trains on 2 cores: its space's ``sections`` replaced (backbones at a tiny width for 1 s clips),
    ``fixed`` added to its fixed values, no start points; one round of 2 trials, one member, no
    cross-fitting, no pretraining (pretraining runs through the same DDP call as the refit)."""
    from raysc.pipeline import load_pipeline
    from raysc.search_space import SPACES_DIR

    space = yaml.safe_load((SPACES_DIR / "gpu.yaml").read_text())
    space["fixed"] = {**space["fixed"], "warmup_steps": 1, **(fixed or {})}
    space |= {"start": [], **sections}
    (folder / "gpu-tiny.yaml").write_text(yaml.safe_dump(space))
    recipe = dataclasses.asdict(load_pipeline("gpu"))
    recipe |= {"space": str(folder / "gpu-tiny.yaml"), "rounds": 1, "trials": 2, "ensemble_k": 1, "crossfit": 0}
    recipe |= {"pretrain": None, "session_smoothing": False}
    path = folder / "gpu-tiny-pipeline.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def write_space(path: Path, **sections) -> Path:
    space = {
        "fixed": {"model.width": 0.25, "model.frontend": FRONTEND, "batch_size": 16},
        "params": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "backbones": {
            "mobileascnet": {"model.dropout": {"type": "float", "low": 0.0, "high": 0.3}},
            "setrans": {"model.dropout": {"type": "float", "low": 0.0, "high": 0.3}},
        },
        "rounds": {"pseudo_threshold": {"type": "float", "low": 0.3, "high": 0.9}},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "scheduler": {"grace_steps": 1, "reduction_factor": 2, "max_epochs": 2},
    } | sections
    path.write_text(yaml.safe_dump(space))
    return path


def build_artefact(kind: str, out: Path) -> Path:
    """Build the project's wheel or sdist into ``out`` with setuptools' own backend, from a copy
    of what the project tracks (a build leaves its own folders behind)."""
    source = out.parent / "source"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("raysc", "search_spaces", "recipes"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    script = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", script], cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def install_artefact(artefact: Path, target: Path) -> Path:
    """Install a built wheel or sdist into ``target`` (its dependencies are this environment's):
    with ``PYTHONPATH=target``, outside the checkout, ``raysc`` is that install."""
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    done = subprocess.run([*pip, "--target", str(target), str(artefact)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The project's wheel, and a folder it is installed in."""
    root = tmp_path_factory.mktemp("wheel")
    built = build_artefact("wheel", root / "dist")
    return built, install_artefact(built, root / "site")
