"""Optional pretraining sources in their own layouts, mapped to the challenge classes.

TAU Urban Acoustic Scenes 2020 Mobile: a tab-separated ``meta.csv`` (``filename`` like
``audio/<name>.wav``, ``scene_label``, ``identifier``, ``source_label``). CochlScene: one folder
per scene under ``Train/``, ``Val/`` and ``Test/``. A YAML mapping (default:
``pretrain_labels.yaml``, the ALPS-ASC table) turns source labels into challenge classes;
unmapped labels are dropped and counted.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import ConfigError
from .fileio import read_yaml_mapping
from .metadata import AUDIO_EXTENSIONS, CLASSES

log = logging.getLogger(__name__)

DEFAULT_LABEL_MAP = Path(__file__).with_name("pretrain_labels.yaml")
SOURCES = ("tau", "cochlscene")
COLUMNS = ["filename", "label", "session", "audio_path"]


def load_label_map(path: str | Path | None = None) -> dict[str, dict[str, str]]:
    """Read and check a source -> {source label: challenge class} mapping."""
    path = Path(path) if path else DEFAULT_LABEL_MAP
    raw = read_yaml_mapping(path, what=f"label tables per source ({', '.join(SOURCES)})")
    problems = []
    for source, table in raw.items():
        if source not in SOURCES:
            problems.append(f"unknown source {source!r} (valid: {', '.join(SOURCES)})")
        elif not isinstance(table, dict):
            problems.append(f"{source}: expected 'source label: challenge class' pairs")
        else:
            problems += [
                f"{source}.{k}: {v!r} is not a challenge class (valid: {', '.join(CLASSES)})"
                for k, v in table.items()
                if v not in CLASSES
            ]
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return {s: dict(raw.get(s) or {}) for s in SOURCES}


@dataclass
class SourceResult:
    rows: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)


def read_tau(root: str | Path, mapping: dict[str, str]) -> SourceResult:
    root = Path(root)
    meta = root / "meta.csv"
    if not meta.is_file():
        return SourceResult(pd.DataFrame(columns=COLUMNS), [f"{meta}: TAU meta.csv not found"])
    rows, problems, dropped = [], [], Counter()
    with meta.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, [])
        need = ["filename", "scene_label", "identifier"]
        if any(c not in header for c in need):
            return SourceResult(pd.DataFrame(columns=COLUMNS), [f"{meta}:1: header {header} lacks {need}"])
        col = {c: header.index(c) for c in need}
        for lineno, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) != len(header):
                problems.append(f"{meta}:{lineno}: expected {len(header)} tab-separated fields, found {len(fields)}")
                continue
            rel, label, ident = (fields[col[c]] for c in need)
            if label not in mapping:
                dropped[label] += 1
                continue
            path = root / rel
            if not path.is_file():
                problems.append(f"{meta}:{lineno}: audio file {path} not found")
                continue
            stem = Path(rel).stem
            rows.append((f"tau__{stem}", mapping[label], f"tau:{ident}", path))
    return SourceResult(pd.DataFrame(rows, columns=COLUMNS), problems, dropped)


def read_cochlscene(root: str | Path, mapping: dict[str, str]) -> SourceResult:
    root = Path(root)
    if not root.is_dir():
        return SourceResult(pd.DataFrame(columns=COLUMNS), [f"{root}: CochlScene folder not found"])
    rows, dropped = [], Counter()
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS):
        scene = path.parent.name
        if scene not in mapping:
            dropped[scene] += 1
            continue
        rel = path.relative_to(root).with_suffix("")
        rows.append((f"cochl__{'__'.join(rel.parts)}", mapping[scene], f"cochl:{path.stem}", path))
    if not rows and not dropped:
        return SourceResult(pd.DataFrame(columns=COLUMNS), [f"{root}: no audio files in scene folders"])
    return SourceResult(pd.DataFrame(rows, columns=COLUMNS), [], dropped)
