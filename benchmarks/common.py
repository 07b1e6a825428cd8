"""Shared helpers for benchmark scripts: where results go and how they are written."""

from __future__ import annotations

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
