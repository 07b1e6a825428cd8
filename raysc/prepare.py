"""``raysc prepare``: challenge metadata + audio folders -> a data folder (Manifest + FeatureStore).

Everything is validated before anything is decoded, and every problem is reported at once.
The manifest is written last, so a data folder with a ``manifest.csv`` is a finished one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from . import __version__
from .audio import FeatureStore, build_store, check_audio_header, decoding_pool, index_audio
from .datafolder import INFO_FILE, MANIFEST_FILE, STORE_DIR, PreparedData
from .errors import DataError, RayscError
from .fileio import write_csv, write_json
from .metadata import CLASSES, SourceRows, SplitMode, build_manifest, city_warnings, parse_metadata
from .pretrain_sources import load_label_map, read_cochlscene, read_tau

log = logging.getLogger(__name__)

MAX_EXTRA_LISTED = 5


MARKER = ".raysc-data"  # written into a data folder before anything else: raysc only replaces what it wrote


def _claim(out: Path) -> None:
    """Make ``out`` a raysc data folder, or refuse: a folder that holds files but no sign that
    raysc wrote them (its marker, or an older raysc's dataset.json) is never written into, not
    even with --overwrite: replacing its store or manifest would delete someone else's files."""
    if out.exists() and not out.is_dir():
        raise RayscError(f"--out {out} is a file, not a folder; choose another --out")
    ours = (out / MARKER).is_file() or (out / INFO_FILE).is_file()
    if out.is_dir() and any(out.iterdir()) and not ours:
        held = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise RayscError(
            f"--out {out} already holds files that raysc did not write ({held}); choose an empty or new folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(f"raysc data folder (raysc {__version__}); raysc prepare may replace what is here\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pretraining_rows(
    tau: str | Path | None, cochlscene: str | Path | None, label_map: str | Path | None, problems: list[str]
) -> tuple[pd.DataFrame | None, Counter]:
    """The TAU / CochlScene clips mapped to the challenge's classes (None without either), and
    how many of each source label were dropped; their problems are added to ``problems``."""
    if not (tau or cochlscene):
        return None, Counter()
    mapping = load_label_map(label_map)
    parts, dropped = [], Counter()
    for root, reader, key in ((tau, read_tau, "tau"), (cochlscene, read_cochlscene, "cochlscene")):
        if root:
            res = reader(root, mapping[key])
            problems += res.problems
            dropped.update({f"{key}:{k}": v for k, v in res.dropped.items()})
            parts.append(res.rows)
    if dropped:
        log.info("pretraining clips dropped (label not in the mapping): %s", dict(dropped))
    return pd.concat(parts, ignore_index=True), dropped


def _read_metadata_and_audio(
    dev_meta: Path, eval_meta: Path, audio_dirs: list[str | Path]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Path], list[str], list[str]]:
    """Both metadata files and the audio index: (dev rows, eval rows, audio by clip name, audio
    without a metadata row, every problem found). Warnings are logged, nothing is raised."""
    dev, problems = parse_metadata(dev_meta, subset="dev")
    ev, eval_problems = parse_metadata(eval_meta, subset="eval")
    problems += eval_problems
    dev_lines = dict(zip(dev["filename"], dev["line"], strict=True))
    problems += [
        f"{eval_meta}:{line}: filename {name!r} is also in {dev_meta} (line {dev_lines[name]})"
        for name, line in zip(ev["filename"], ev["line"], strict=True)
        if name in dev_lines
    ]
    for warning in city_warnings([(dev_meta, dev), (eval_meta, ev)]):
        log.warning("%s", warning)
    audio, audio_problems = index_audio(audio_dirs)
    problems += audio_problems
    for meta, rows in ((dev_meta, dev), (eval_meta, ev)):
        problems += [
            f"{meta}:{line}: no audio file {name}.wav under {', '.join(map(str, audio_dirs))}"
            for name, line in zip(rows["filename"], rows["line"], strict=True)
            if name not in audio
        ]
    extra = sorted(set(audio) - set(dev["filename"]) - set(ev["filename"]))
    if extra:
        log.warning(
            "%d audio file(s) have no metadata row and are ignored, e.g. %s",
            len(extra),
            [str(audio[n]) for n in extra[:MAX_EXTRA_LISTED]],
        )
    return dev, ev, audio, extra, problems


def _dataset_info(
    manifest: pd.DataFrame,
    cities: list[str],
    ev: pd.DataFrame,
    *,
    inputs: dict[str, Any],
    store: FeatureStore,
    extra: int,
    dropped: dict[str, int],
) -> dict[str, Any]:
    """``dataset.json``: what was prepared from what, with the counts a user checks first."""
    unseen = sorted(set(ev["city"]) - set(cities))
    labelled = manifest[manifest["subset"] == "labelled"]
    return {
        "raysc_version": __version__,
        "inputs": inputs,
        "classes": list(CLASSES),
        "cities": cities,
        "eval_cities_not_in_dev": unseen,
        "counts": manifest["subset"].value_counts().to_dict(),
        "labelled_per_class": {c: int((labelled["label"] == c).sum()) for c in CLASSES},
        "sessions": int(manifest.loc[manifest["subset"] != "pretrain", "session"].nunique()),
        "session_labels": int(manifest["session_label"].notna().sum()),
        "audio_without_metadata": extra,
        "pretrain_dropped": dict(dropped),
        "store": asdict(store.spec),
    }


def prepare(
    *,
    dev_meta: str | Path,
    eval_meta: str | Path,
    audio_dirs: list[str | Path],
    out: str | Path,
    sample_rate: int = 44100,
    clip_seconds: float = 10.0,
    folds: int = 5,
    split: SplitMode = "session",
    seed: int = 0,
    workers: int | None = None,
    tau: str | Path | None = None,
    cochlscene: str | Path | None = None,
    label_map: str | Path | None = None,
    overwrite: bool = False,
) -> PreparedData:
    """Validate the inputs, then write ``out/manifest.csv``, ``out/dataset.json`` and ``out/store``.

    Every row and every audio header is checked before any audio is decoded; all problems are
    reported together and nothing is written. A rerun with the same inputs reuses the store.

    Args:
        dev_meta: the official development metadata CSV.
        eval_meta: the official eval metadata CSV.
        audio_dirs: folders searched (recursively) for ``<filename>.wav`` or ``.flac``.
        out: the data folder to write.
        sample_rate: Hz every clip is resampled to.
        clip_seconds: every clip is zero-padded or trimmed to this length.
        folds: cross-validation folds of the labelled clips.
        split: ``"session"`` (folds grouped by recording session) or ``"city"`` (a fold per
            city, for a city-held-out estimate).
        seed: the seed of the fold assignment.
        workers: decoding processes (None: one per CPU).
        tau: a TAU Urban Acoustic Scenes folder for pretraining, or None.
        cochlscene: a CochlScene folder for pretraining, or None.
        label_map: a YAML file mapping the pretraining sets' labels to the ten classes (None:
            the built-in map).
        overwrite: replace a data folder prepared from other inputs or options.

    Returns:
        The prepared data folder, opened.

    Raises:
        DataError: problems in the metadata or the audio (each named by file, line and value).
        RayscError: a sample rate or clip length out of range, or ``out`` prepared from other
            inputs without ``overwrite``.
    """
    out = Path(out)
    workers = workers or os.cpu_count() or 1
    if sample_rate < 1000 or clip_seconds <= 0:
        raise RayscError(f"sample rate must be >= 1000 Hz and clip length > 0 s (got {sample_rate}, {clip_seconds})")
    dev_meta, eval_meta = Path(dev_meta), Path(eval_meta)

    # 1. Metadata, audio index, pretraining sources: collect every problem before deciding.
    dev, ev, audio, extra, problems = _read_metadata_and_audio(dev_meta, eval_meta, audio_dirs)
    pretrain, dropped = _pretraining_rows(tau, cochlscene, label_map, problems)

    # A new store's decoding processes start now and import torch (1-2 s each) while the
    # headers are checked. A rerun mostly reuses its store and starts none.
    new_store = not problems and not (out / STORE_DIR / "spec.json").is_file()
    with decoding_pool(workers if new_store else 1) as decoders:
        # 2. Audio headers: catches corrupt and empty files before hours of decoding.
        paths = [audio[n] for n in (*dev["filename"], *ev["filename"]) if n in audio]
        if pretrain is not None:
            paths += list(pretrain["audio_path"])
        with ThreadPoolExecutor(max_workers=workers) as threads:
            problems += [p for p in threads.map(check_audio_header, paths) if p]
        if problems:
            raise DataError(problems, what="the inputs (nothing was written)")

        # 3. Manifest and store.
        if pretrain is not None:
            audio = {**audio, **dict(zip(pretrain["filename"], pretrain["audio_path"], strict=True))}
        src = SourceRows(dev=dev, eval=ev, audio_paths=audio, pretrain=pretrain)
        manifest, cities = build_manifest(src, n_folds=folds, split=split, seed=seed)
        num_samples = round(sample_rate * clip_seconds)
        files = list(zip(manifest["filename"], map(Path, manifest["audio_path"]), strict=True))
        inputs = {
            "dev_meta_sha256": _sha256(dev_meta),
            "eval_meta_sha256": _sha256(eval_meta),
            "folds": folds,
            "split": split,
            "seed": seed,
            "sample_rate": sample_rate,
            "num_samples": num_samples,
            "pretrain": sorted(str(p) for p in (tau, cochlscene) if p),
        }
        info_path = out / INFO_FILE
        _claim(out)
        if info_path.is_file() and not overwrite:
            previous = json.loads(info_path.read_text()).get("inputs")
            if previous != inputs:
                raise RayscError(
                    f"{out} holds data prepared from other inputs or options; choose another --out or pass --overwrite"
                )
        store = build_store(
            out / STORE_DIR, files, sample_rate=sample_rate, num_samples=num_samples, workers=workers, pool=decoders
        )

    info = _dataset_info(manifest, cities, ev, inputs=inputs, store=store, extra=len(extra), dropped=dropped)
    write_json(info_path, info)
    write_csv(out / MANIFEST_FILE, manifest)
    return PreparedData(out=out, manifest=manifest, store=store, classes=list(CLASSES), cities=cities, info=info)
