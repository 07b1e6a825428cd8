"""THE data folder (``raysc prepare`` writes it): one reader type, and the rules for splitting it.

DATA/manifest.csv     the Manifest (written last: its presence means a finished folder)
DATA/dataset.json     classes, city vocabulary, counts, inputs, the store's spec
DATA/store/           the FeatureStore (int16 waveforms, memory-mapped)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .audio import FeatureStore
from .errors import ConfigError, DataError
from .metadata import assign_folds, read_manifest

INFO_FILE = "dataset.json"
MANIFEST_FILE = "manifest.csv"
STORE_DIR = "store"


@dataclass(frozen=True)
class PreparedData:
    """A prepared data folder: the Manifest, the FeatureStore and ``dataset.json``.

    Open one with ``load_dataset``.

    Attributes:
        out: the folder.
        manifest: one row per clip: ``filename, subset`` (labelled, unlabelled, eval,
            pretrain), ``label, city, city_idx, record_time``, the time features, ``session,
            fold, audio_path, session_label``.
        store: the int16 waveforms, memory-mapped, by filename.
        classes: the scene classes in label-index order.
        cities: the development cities in city-index order (index 0 is ``<unk>``).
        info: ``dataset.json``: the inputs, counts and store settings.
    """

    out: Path
    manifest: pd.DataFrame
    store: FeatureStore
    classes: list[str]
    cities: list[str]
    info: dict

    @property
    def split_by(self) -> str:
        """What ``raysc prepare`` grouped the folds by: ``session`` or ``city``."""
        return self.info.get("inputs", {}).get("split", "session")

    def rows(self, subset: str) -> pd.DataFrame:
        return self.manifest[self.manifest["subset"] == subset]

    def folds(self, subset: str = "labelled") -> list[int]:
        """The validation folds of the labelled (or the pretraining) clips."""
        return sorted(set(self.rows(subset)["fold"]))

    def check_fold(self, fold: int, *, allow_none: bool = True, subset: str = "labelled") -> None:
        if subset == "pretrain" and self.rows("pretrain").empty:
            raise ConfigError(
                f"{self.out} has no pretraining clips: prepare it with --tau and/or --cochlscene "
                "(or raysc synth --pretrain-clips N for a test)"
            )
        folds = self.folds(subset)
        if fold in folds or (allow_none and fold == -1):
            return
        also = ", or -1" if allow_none else ""
        raise ConfigError(f"fold {fold} does not exist in {self.out} (folds: {folds}{also})")

    def split(self, fold: int, subset: str = "labelled") -> tuple[pd.DataFrame, pd.DataFrame]:
        """(training rows, validation rows) of the labelled clips (or the pretraining clips,
        ``subset="pretrain"``, with their own session-grouped folds) for validation fold ``fold``;
        the validation rows carry ``seen`` (see ``mark_unseen``)."""
        labelled = self.rows(subset)
        train, val = labelled[labelled["fold"] != fold], labelled[labelled["fold"] == fold].copy()
        return train, mark_unseen(val, train)

    def unseen_weight(self, override: float | None = None) -> float:
        """The city-held-out score's share of the objective (``metrics.objective``): ``override``
        when given, else the share of eval clips whose city no development clip comes from (0
        without eval clips)."""
        if override is not None:
            return float(override)
        ev = self.rows("eval")
        dev_cities = set(self.manifest.loc[self.manifest["subset"] != "eval", "city"])
        return float((~ev["city"].isin(dev_cities)).mean()) if len(ev) else 0.0

    def labels(self, rows: pd.DataFrame) -> np.ndarray:
        """Class indices of labelled rows."""
        return rows["label"].map(self.classes.index).to_numpy()

    def one_hot(self, rows: pd.DataFrame) -> np.ndarray:
        return np.eye(len(self.classes), dtype=np.float32)[self.labels(rows)]


def mark_unseen(rows: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """The seen-city rule: a clip whose city no training clip comes from is ``seen == False`` and
    is scored as ``<unk>`` (city index 0). That is how a model meets unseen eval cities, and what
    keeps city-held-out folds honest."""
    rows = rows.copy()
    rows["seen"] = rows["city_idx"].isin(set(train["city_idx"]))
    rows.loc[~rows["seen"], "city_idx"] = 0
    return rows


def load_dataset(data_dir: str | Path, *, repeat: int = 0) -> PreparedData:
    """Open a prepared data folder (the manifest is read, the store memory-mapped on first use).

    Args:
        data_dir: the folder ``raysc prepare`` wrote.
        repeat: which split of the development sessions into folds: 0, the one ``raysc prepare``
            drew; n > 0, the same number of folds drawn again (grouped by session, stratified by
            scene, as prepare draws them) with the n-th seed after prepare's. Repeated
            cross-fitting trains on these (``raysc.crossfit``).

    Returns:
        The data folder, its manifest read and its folds those of ``repeat``.

    Raises:
        DataError: not a prepared data folder.
        ConfigError: a repeat of folds that prepare split by city (those are fixed).
    """
    data_dir = Path(data_dir)
    info_path = data_dir / INFO_FILE
    if not info_path.is_file():
        raise DataError([f"{data_dir}: not a prepared data folder (no {INFO_FILE}; run `raysc prepare`)"])
    info = json.loads(info_path.read_text())
    manifest = read_manifest(data_dir)
    if repeat:
        manifest = _redrawn_folds(manifest, info, repeat, data_dir)
    return PreparedData(
        out=data_dir,
        manifest=manifest,
        store=FeatureStore.open(data_dir / STORE_DIR),
        classes=info["classes"],
        cities=info["cities"],
        info=info,
    )


def _redrawn_folds(manifest: pd.DataFrame, info: dict, repeat: int, data_dir: Path) -> pd.DataFrame:
    """The manifest with its development clips' folds drawn again for ``repeat`` (pretraining and
    eval clips keep theirs)."""
    if repeat < 0:
        raise ConfigError(f"repeat must be >= 0, got {repeat}")
    inputs = info.get("inputs", {})
    if inputs.get("split", "session") != "session":
        raise ConfigError(
            f"{data_dir} was prepared with folds split by {inputs['split']}: they are fixed, so a repeat of "
            "cross-fitting would train on the same folds again (prepare it with --split session to repeat)"
        )
    m = manifest.copy()
    dev = m["subset"].isin(["labelled", "unlabelled"])
    folds = int(m.loc[m["subset"] == "labelled", "fold"].nunique())
    seed = [int(inputs.get("seed", 0)), repeat]
    m.loc[dev, "fold"] = assign_folds(m.loc[dev, "session"], m.loc[dev, "label"], n_folds=folds, seed=seed, quiet=True)
    return m
