"""Challenge metadata -> Manifest: labels, cities, time features, sessions and folds.

The Manifest is a DataFrame with one row per clip, keyed by ``filename``. Validation folds are
grouped by recording session (city + record_time) so that no session is split between training
and validation: a clip-level split puts nearly every validation session into training.
"""

from __future__ import annotations

import csv
import difflib
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .errors import DataError

log = logging.getLogger(__name__)

# Official class order of the APSIPA 2025 / ICME 2024 challenge (index = class id).
CLASSES: tuple[str, ...] = (
    "Bus",
    "Airport",
    "Metro",
    "Restaurant",
    "Shopping mall",
    "Public square",
    "Urban park",
    "Traffic street",
    "Construction site",
    "Bar",
)
# The baseline's 22-city vocabulary (dev holds 8 of them, eval 12).
OFFICIAL_CITIES: tuple[str, ...] = (
    "Xi'an",
    "Xianyang",
    "Changchun",
    "Jinan",
    "Hefei",
    "Sanya",
    "Nanning",
    "Haikou",
    "Guilin",
    "Guangzhou",
    "Chongqing",
    "Shenyang",
    "Beijing",
    "Baishan",
    "Taiyuan",
    "Tianjin",
    "Nanchang",
    "Shanghai",
    "Luoyang",
    "Liupanshui",
    "Shangrao",
    "Dandong",
)
UNK_CITY = "<unk>"
METADATA_HEADER = ("filename", "location", "record_time", "scene_label")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
TIME_FEATURES: tuple[str, ...] = (
    "tod_sin",
    "tod_cos",
    "dow_sin",
    "dow_cos",
    "doy_sin",
    "doy_cos",
    "weekend",
)
MANIFEST_COLUMNS: tuple[str, ...] = (
    "filename",
    "subset",
    "label",
    "city",
    "city_idx",
    "record_time",
    *TIME_FEATURES,
    "session",
    "fold",
    "audio_path",
    "session_label",
)
SUBSETS = ("labelled", "unlabelled", "eval", "pretrain")

_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
AUDIO_EXTENSIONS = (".wav", ".flac")

SplitMode = Literal["session", "city"]


def check_filename(name: str) -> str | None:
    """Return why ``name`` is not a plain clip name, or None when it is one."""
    if not name:
        return "empty filename"
    if "/" in name or "\\" in name or ".." in name or not _NAME_RE.fullmatch(name):
        return f"filename {name!r} is not a plain name (letters, digits, '_', '-', '.'; no folder, no '..')"
    if name.lower().endswith(AUDIO_EXTENSIONS):
        return f"filename {name!r} has an extension; the metadata names clips without '.wav'"
    return None


def parse_record_time(value: str) -> tuple[datetime | None, str | None]:
    """Parse ``YYYY-MM-DD HH:MM:SS`` exactly; return (time, None) or (None, reason)."""
    if not _TIME_RE.fullmatch(value):
        return None, f"record_time {value!r} is not in the format YYYY-MM-DD HH:MM:SS"
    try:
        return datetime.strptime(value, TIME_FORMAT), None
    except ValueError as exc:
        return None, f"record_time {value!r} is not a valid date and time ({exc})"


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """``"; did you mean 'Bus'?"`` for the choice ``value`` most likely meant (the same letters in
    another case first, then the closest spelling), or '' when none is close."""
    same = [c for c in choices if c.casefold() == value.strip().casefold()]
    close = same or difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_label(value: str) -> str:
    return f"unknown scene_label {value!r}{did_you_mean(value, CLASSES)} (valid: {', '.join(CLASSES)})"


def parse_metadata(path: str | Path, *, subset: Literal["dev", "eval"]) -> tuple[pd.DataFrame, list[str]]:
    """Read one official metadata CSV; return its rows and every problem found (not raised).

    Args:
        path: the CSV (UTF-8, a BOM accepted; header ``filename,location,record_time,scene_label``).
        subset: ``"dev"`` or ``"eval"``; an eval row with a label is a problem.

    Returns:
        The rows, with the columns ``filename, city, record_time, label, line`` (``label`` is
        None for unlabelled rows; ``line`` is the 1-based line number in the file, the header
        being line 1), and the problems, each as ``file:line: what is wrong, with the value``.
    """
    path = Path(path)
    problems: list[str] = []
    empty = pd.DataFrame(columns=["filename", "city", "record_time", "label", "line"])
    if path.is_dir():
        return empty, [f"{path}: a folder, not a metadata file"]
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        return empty, [f"{path}: metadata file not found"]
    except UnicodeDecodeError as exc:
        return empty, [f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})"]
    lines = text.splitlines()
    header = lines[0] if lines else ""
    if tuple(header.split(",")) != METADATA_HEADER:
        return empty, [f"{path}:1: header is {header!r}, expected {','.join(METADATA_HEADER)!r}"]

    rows = []
    first_line: dict[str, int] = {}
    for lineno, fields in enumerate(csv.reader(lines[1:], quoting=csv.QUOTE_NONE), start=2):
        if not fields:
            continue  # blank line: nothing to lose
        where = f"{path}:{lineno}"
        if len(fields) != len(METADATA_HEADER):
            problems.append(f"{where}: expected 4 comma-separated fields, found {len(fields)}: {','.join(fields)!r}")
            continue
        name, city, record_time, label = fields
        bad = check_filename(name)
        if bad:
            problems.append(f"{where}: {bad}")
        elif name in first_line:
            problems.append(f"{where}: duplicate filename {name!r} (first on line {first_line[name]})")
        else:
            first_line[name] = lineno
        if not city:
            problems.append(f"{where}: empty location for {name!r}")
        _, why = parse_record_time(record_time)
        if why:
            problems.append(f"{where}: {why}")
        if label and subset == "eval":
            problems.append(f"{where}: scene_label {label!r} given, but evaluation rows must be unlabelled")
        elif label and label not in CLASSES:
            problems.append(f"{where}: {_unknown_label(label)}")
        rows.append((name, city, record_time, label or None, lineno))
    if not rows and not problems:
        problems.append(f"{path}: no data rows")
    return pd.DataFrame(rows, columns=empty.columns), problems


def city_warnings(tables: Sequence[tuple[Path, pd.DataFrame]]) -> list[str]:
    """Locations that look like another city with stray spaces or quotes (``Xi'an ``, ``"Xi'an"``):
    accepted as written (the file is the data), but named with the city they probably mean."""
    known = set(OFFICIAL_CITIES) | {c for _, rows in tables for c in rows["city"]}
    warnings, seen = [], set()
    for path, rows in tables:
        for city, line in zip(rows["city"], rows["line"], strict=True):
            clean = city.strip().strip("\"'").strip()
            if clean != city and city not in seen:
                seen.add(city)
                near = f"; did you mean {clean!r}?" if clean in known else ""
                warnings.append(f"{path}:{line}: location {city!r} has stray spaces or quotes{near} (kept as written)")
    return warnings


def time_features(record_times: pd.Series) -> pd.DataFrame:
    """Cyclic time of day, weekday and day of year (sin/cos) plus a weekend flag.

    Empty strings (clips without a timestamp, e.g. pretraining data) give all-zero features.
    """
    known = record_times.astype(str) != ""
    t = pd.to_datetime(record_times.where(known), format=TIME_FORMAT)
    seconds = t.dt.hour * 3600 + t.dt.minute * 60 + t.dt.second
    days_in_year = np.where(t.dt.is_leap_year, 366, 365)
    angles = {
        "tod": 2 * math.pi * seconds / 86400,
        "dow": 2 * math.pi * t.dt.day_of_week / 7,
        "doy": 2 * math.pi * (t.dt.day_of_year - 1) / days_in_year,
    }
    out = pd.DataFrame(index=record_times.index)
    for name, angle in angles.items():
        out[f"{name}_sin"] = np.sin(angle.astype(float))
        out[f"{name}_cos"] = np.cos(angle.astype(float))
    out["weekend"] = (t.dt.day_of_week >= 5).astype(float)
    return out.fillna(0.0).astype(np.float32)[list(TIME_FEATURES)]


def _greedy_assign(
    items: Sequence[tuple[str, int]], n_folds: int, loads: np.ndarray, totals: np.ndarray, sizes: dict[str, int]
) -> dict[str, int]:
    """Give each (key, weight) item, largest first, to the fold with the least load.

    Ties go to the fold with fewer clips overall. The final spread of ``loads`` is at most the
    largest weight (list scheduling), which is what makes the folds balanced.
    """
    out = {}
    for key, weight in sorted(items, key=lambda kv: -kv[1]):
        fold = min(range(n_folds), key=lambda f: (loads[f], totals[f], f))
        loads[fold] += weight
        totals[fold] += sizes[key]
        out[key] = fold
    return out


def assign_folds(
    groups: pd.Series, labels: pd.Series, *, n_folds: int, seed: int | list[int], quiet: bool = False
) -> pd.Series:
    """Folds grouped by ``groups`` and stratified by ``labels`` (None = unlabelled); ``seed``
    seeds numpy's generator (a list: ``[prepare's seed, repeat]`` for a repeat's folds);
    ``quiet``: no warning about classes sparser than the folds (prepare gave it already).

    A group's stratum is its most frequent label. Labelled groups are balanced per class by
    their labelled clip count, then groups without labels are balanced by size.
    """
    if n_folds < 2:
        raise DataError([f"--folds must be at least 2, got {n_folds}"], what="options")
    rng = np.random.default_rng(seed)
    sizes = groups.value_counts().to_dict()
    labelled = labels.notna()
    n_groups = groups[labelled].nunique()
    if n_folds > n_groups:
        raise DataError(
            [
                f"--folds {n_folds}: only {n_groups} labelled recording session(s), so some folds would validate on "
                f"nothing; use at most {n_groups}"
            ],
            what="options",
        )
    per_group = labels[labelled].groupby(groups[labelled]).agg(lambda s: s.value_counts().idxmax())
    counts = labels[labelled].groupby(groups[labelled]).size()
    totals = np.zeros(n_folds)
    fold_of: dict[str, int] = {}
    sparse = {}
    for label in sorted(per_group.unique(), key=lambda c: (CLASSES.index(c) if c in CLASSES else len(CLASSES), c)):
        keys = list(per_group.index[per_group == label])
        rng.shuffle(keys)  # random order among equal sizes; the sort below is stable
        items = [(k, int(counts[k])) for k in keys]
        if len(items) < n_folds:
            sparse[label] = len(items)
        fold_of |= _greedy_assign(items, n_folds, np.zeros(n_folds), totals, sizes)
    if sparse and not quiet:
        log.warning("classes with fewer groups than the %d folds (some folds lack them): %s", n_folds, sparse)
    rest = [k for k in sizes if k not in fold_of]
    rng.shuffle(rest)
    fold_of |= _greedy_assign([(k, sizes[k]) for k in rest], n_folds, totals.copy(), totals, sizes)
    return groups.map(fold_of).astype(int)


@dataclass(frozen=True)
class SourceRows:
    """Validated rows from every input, before folds: what ``build_manifest`` needs."""

    dev: pd.DataFrame
    eval: pd.DataFrame
    audio_paths: dict[str, Path]
    pretrain: pd.DataFrame | None = None


def city_vocabulary(cities: Sequence[str]) -> list[str]:
    """``<unk>`` first, then the distinct cities in sorted order."""
    return [UNK_CITY, *sorted(set(cities) - {"", UNK_CITY})]


def city_indices(cities: Sequence[str], vocabulary: Sequence[str]) -> tuple[np.ndarray, int]:
    """Index of each city in ``vocabulary``; a city not in it gets 0 (``<unk>``), never another
    city's index. Returns the indices and how many were unknown."""
    index = {c: i for i, c in enumerate(vocabulary)}
    out = np.fromiter((index.get(c, 0) for c in cities), dtype=np.int64, count=len(cities))
    unknown = sum(c not in index for c in cities)
    if unknown:
        log.warning("%d clip(s) from cities outside the vocabulary map to %s", unknown, UNK_CITY)
    return out, unknown


def build_manifest(
    src: SourceRows, *, n_folds: int = 5, split: SplitMode = "session", seed: int = 0
) -> tuple[pd.DataFrame, list[str]]:
    """Assemble the Manifest and the city vocabulary from validated rows.

    The city vocabulary comes from the development rows only, so eval-only cities map to
    ``<unk>`` (index 0) rather than to an embedding that was never trained.
    """
    dev = src.dev.assign(subset=np.where(src.dev["label"].notna(), "labelled", "unlabelled"))
    ev = src.eval.assign(subset="eval", label=None)
    parts = [dev, ev]
    if src.pretrain is not None and len(src.pretrain):
        parts.append(src.pretrain.assign(subset="pretrain", city="", record_time=""))
    m = pd.concat([p.drop(columns=["line"], errors="ignore") for p in parts], ignore_index=True)

    vocab = city_vocabulary(dev["city"])
    index = {c: i for i, c in enumerate(vocab)}
    m["city_idx"] = m["city"].map(index).fillna(0).astype(int)  # eval-only and pretraining: <unk>
    unseen = sorted(set(ev["city"]) - set(vocab))
    if unseen:
        log.info("%d eval city(ies) not in the development data map to %s: %s", len(unseen), UNK_CITY, unseen)
    m = pd.concat([m, time_features(m["record_time"])], axis=1)
    if "session" not in m or m["session"].isna().any():
        made = m["city"] + "|" + m["record_time"]
        m["session"] = m["session"].fillna(made) if "session" in m else made
    _warn_mixed_sessions(m[m["subset"] == "labelled"])

    m["fold"] = -1
    is_dev = m["subset"].isin(["labelled", "unlabelled"])
    if split == "city":
        n_cities = m.loc[m["subset"] == "labelled", "city"].nunique()
        if n_folds > n_cities:
            raise DataError(
                [f"--split city needs at most one fold per labelled city: {n_cities} cities, --folds {n_folds}"],
                what="options",
            )
        # Cities are balanced by labelled clips; unlabelled-only cities follow by size.
        groups = m.loc[is_dev, "city"]
        city_weight = m.loc[m["subset"] == "labelled"].groupby("city").size()
        sizes = groups.value_counts().to_dict()
        totals = np.zeros(n_folds)
        items = [(c, int(city_weight.get(c, 0))) for c in sorted(sizes)]
        fold_of = _greedy_assign(items, n_folds, np.zeros(n_folds), totals, sizes)
        m.loc[is_dev, "fold"] = groups.map(fold_of).astype(int)
    elif split == "session":
        m.loc[is_dev, "fold"] = assign_folds(
            m.loc[is_dev, "session"], m.loc[is_dev, "label"], n_folds=n_folds, seed=seed
        )
    else:
        raise DataError([f"unknown split {split!r} (valid: session, city)"], what="options")
    pre = m["subset"] == "pretrain"
    if pre.any():
        m.loc[pre, "fold"] = assign_folds(m.loc[pre, "session"], m.loc[pre, "label"], n_folds=n_folds, seed=seed)

    m["audio_path"] = [str(src.audio_paths[f]) for f in m["filename"]]
    m["session_label"] = session_labels(m)
    return m[list(MANIFEST_COLUMNS)], vocab


def session_labels(m: pd.DataFrame, subset: str = "unlabelled") -> pd.Series:
    """The scene of each clip of ``subset`` whose recording session holds labelled clips (a
    session is one recording of one scene; a session with mixed labels gives its most frequent
    one); None elsewhere. Folds follow sessions, so an unlabelled clip's label never crosses
    folds; an eval clip gets one when its session continues a labelled development session."""
    labelled = m[m["subset"] == "labelled"]
    scene = labelled.groupby("session")["label"].agg(lambda s: s.value_counts().idxmax())
    out = m["session"].map(scene).where(m["subset"] == subset)
    return out.astype(object).where(out.notna(), None)


def _warn_mixed_sessions(labelled: pd.DataFrame) -> None:
    n_labels = labelled.groupby("session")["label"].nunique()
    mixed = n_labels[n_labels > 1]
    if len(mixed):
        log.warning(
            "%d labelled session(s) hold more than one label (folds stratify by the most frequent): %s",
            len(mixed),
            list(mixed.index[:5]),
        )


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Load a Manifest written by ``raysc prepare`` (a data folder or its ``manifest.csv``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.csv"
    if not path.is_file():
        raise DataError([f"{path}: no manifest (run `raysc prepare` first)"], what="data folder")
    m = pd.read_csv(
        path,
        dtype={"filename": str, "label": str, "city": str, "record_time": str, "session_label": str},
        keep_default_na=False,
    )
    if "session_label" not in m.columns:  # a data folder prepared before session labels: none
        m["session_label"] = ""
    missing = [c for c in MANIFEST_COLUMNS if c not in m.columns]
    if missing:
        raise DataError([f"{path}: missing column(s) {missing}"], what="manifest")
    m["label"] = m["label"].replace("", None)
    m["session_label"] = m["session_label"].replace("", None)
    return m
