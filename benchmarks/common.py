"""Shared helpers for benchmark scripts: where results go and how they are written."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from raysc import __version__
from raysc.fileio import write_json, write_text

# A small log-mel front end for the benchmarks' 1 s clips at 8 kHz.
FRONTEND_8K = {
    "sample_rate": 8000,
    "n_fft": 256,
    "win_length": 256,
    "hop_length": 128,
    "n_mels": 32,
    "f_min": 0.0,
    "f_max": 4000.0,
    "frames": None,
}

RESULTS = Path(__file__).resolve().parent.parent / "results" / "bench"


def small_data(work: Path, clips: int) -> Path:
    """A prepared data folder of ``clips`` synthetic 1 s clips at 8 kHz (half labelled, 4 + 1
    cities, 3 folds): the size of the search benchmarks, whose subject is the search, not the audio."""
    from raysc.prepare import prepare
    from raysc.synth import DEV_METADATA, EVAL_METADATA, synthesize

    raw = work / "raw"
    synthesize(
        raw,
        clips=clips,
        eval_clips=20,
        labelled_fraction=0.5,
        sample_rate=8000,
        clip_seconds=1.0,
        cities=4,
        unseen_cities=1,
        session_size=4,
        seed=0,
    )
    return prepare(
        dev_meta=raw / DEV_METADATA,
        eval_meta=raw / EVAL_METADATA,
        audio_dirs=[raw / "audio"],
        out=work / "data",
        sample_rate=8000,
        clip_seconds=1.0,
        folds=3,
        workers=1,
    ).out


def add_challenge_data_options(parser: argparse.ArgumentParser) -> None:
    """``--raw`` and ``--data``, the two arguments of ``challenge_data``."""
    parser.add_argument("--raw", type=Path, help="a `raysc synth` folder (default: synthesised at challenge shape)")
    parser.add_argument("--data", type=Path, help="its prepared data folder (prepared here when missing)")


def challenge_data(raw: Path | None, data: Path | None, work: Path, *, smoke: bool, seed: int = 0) -> tuple[Path, Path]:
    """(raw, data): a `raysc synth` folder at the challenge's shape (44.1 kHz, 10 s clips, 1,200
    development clips of which 20 % labelled, 600 eval clips, 8 cities of which 2 only in eval;
    ``smoke``: 200 clips of 2 s at 16 kHz), synthesised into ``work`` with ``seed`` unless given
    or already there, and its prepared data folder, prepared unless it is there."""
    from raysc.prepare import prepare
    from raysc.synth import DEV_METADATA, EVAL_METADATA, synthesize

    if smoke:
        raw, data = work / "raw", work / "data"
        synthesize(
            raw,
            clips=200,
            eval_clips=60,
            sample_rate=16000,
            clip_seconds=2.0,
            cities=4,
            unseen_cities=1,
            session_size=4,
            seed=seed,
        )
    elif raw is None and (work / "raw" / "synth.json").is_file():
        raw = work / "raw"  # synthesised by an earlier run into the same folder
    elif raw is None:
        raw = work / "raw"
        synthesize(
            raw,
            clips=1200,
            eval_clips=600,
            labelled_fraction=0.2,
            sample_rate=44100,
            clip_seconds=10.0,
            cities=6,
            unseen_cities=2,
            seed=seed,
            workers=2,
        )
    data = data or work / "data"
    if not (data / "manifest.csv").is_file():
        spec = json.loads((raw / "synth.json").read_text())
        prepare(
            dev_meta=raw / DEV_METADATA,
            eval_meta=raw / EVAL_METADATA,
            audio_dirs=[raw / "audio"],
            out=data,
            sample_rate=int(spec["sample_rate"]),
            clip_seconds=float(spec["clip_seconds"]),
            workers=2,
        )
    return raw, data


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "raysc": __version__,
    }


def write_results(name: str, result: dict[str, Any], markdown: str) -> int:
    """Write results/bench/<name>.json and .md, show the table; return the exit code 0."""
    path = RESULTS / f"{name}.json"
    write_json(path, {**result, "machine": machine()})
    write_text(RESULTS / f"{name}.md", markdown)
    print(markdown)
    print(f"wrote {path}")
    return 0


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
