"""The challenge submission: the eval metadata rows in their original order with ``scene_label``
filled, validated before anything is written; plus probabilities and an info JSON.

An eval clip recorded in a labelled development session (same city and ``record_time``; a
session is one recording of one scene) takes that session's label, as the development set's
unlabelled clips do in training (on the official data 59 of the 160 eval sessions continue a
development session); ``session_labels=False`` keeps the ensemble's prediction for every clip."""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from .datafolder import load_dataset
from .errors import DataError
from .experiment import Ensemble, Experiment
from .fileio import write_csv, write_json
from .inference import predict_ensemble
from .metadata import did_you_mean
from .metadata import session_labels as scenes_of_sessions

COLUMNS = ["filename", "location", "record_time", "scene_label"]


@dataclass(frozen=True)
class Submission:
    """What ``make_submission`` wrote.

    Attributes:
        csv: the challenge file.
        probabilities: every eval clip's class probabilities.
        info: the ensemble, its members' settings and validation scores.
        counts: predicted clips per class.
        session_labelled: eval clips labelled by their development session.
    """

    csv: Path
    probabilities: Path
    info: Path
    counts: dict[str, int]
    session_labelled: int


def validate_submission(
    sub: pd.DataFrame,
    expected: pd.DataFrame,
    classes: list[str],
    probs: pd.DataFrame | None = None,
    *,
    where: str = "submission",
) -> None:
    """Raise a DataError listing every problem: columns, every eval clip exactly once and in
    order, location and record time as in the metadata, labels among the classes, no NaN,
    probabilities that are distributions and agree with the labels."""
    problems = []
    if list(sub.columns) != COLUMNS:
        raise DataError([f"{where}: columns {list(sub.columns)}, expected {COLUMNS}"], what="submission")
    names, want = sub["filename"].astype(str), expected["filename"].astype(str)
    dup = sorted(set(names[names.duplicated()]))
    if dup:
        problems.append(f"{where}: clip(s) listed more than once: {dup[:5]}" + (" ..." if len(dup) > 5 else ""))
    missing, extra = sorted(set(want) - set(names)), sorted(set(names) - set(want))
    if missing:
        problems.append(f"{where}: {len(missing)} eval clip(s) missing, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{where}: {len(extra)} clip(s) not in the eval metadata, e.g. {extra[:3]}")
    if not (dup or missing or extra):
        if list(names) != list(want):
            problems.append(f"{where}: rows are not in the eval metadata's order")
        else:
            for col in ("location", "record_time"):
                bad = np.flatnonzero(sub[col].astype(str).to_numpy() != expected[col].astype(str).to_numpy())
                problems += [
                    f"{where}:{i + 2}: {col} {sub[col].iloc[i]!r} differs from the metadata's {expected[col].iloc[i]!r}"
                    for i in bad[:5]
                ]
    labels = sub["scene_label"]
    for i in np.flatnonzero(labels.isna().to_numpy())[:5]:
        problems.append(f"{where}:{i + 2}: scene_label is empty")
    for i, label in enumerate(labels):
        if pd.notna(label) and label not in classes:
            hint = did_you_mean(str(label), classes)
            problems.append(f"{where}:{i + 2}: scene_label {label!r} is not a class{hint} ({', '.join(classes)})")
    if probs is not None:
        p = probs[classes].to_numpy(np.float64)
        if not np.isfinite(p).all():
            problems.append(f"{where}: probabilities contain NaN or infinity")
        elif (np.abs(p.sum(1) - 1) > 1e-3).any():
            problems.append(f"{where}: probability rows do not sum to 1")
        elif len(p) == len(sub) and (np.asarray(classes)[p.argmax(1)] != labels.to_numpy()).any():
            problems.append(f"{where}: scene_label disagrees with the highest probability")
    if problems:
        raise DataError(problems, what="submission")


def check_submission_file(path: str | Path, data_dir: str | Path) -> None:
    """Validate a submission CSV on disk against a prepared data folder's eval clips
    (``raysc check-submission``).

    Args:
        path: the submission CSV.
        data_dir: the prepared data folder whose eval clips it must hold.

    Raises:
        DataError: every problem found: not a readable CSV, a byte-order mark, the columns,
            a clip missing, extra or out of order, a location or time unlike the metadata, a
            label outside the classes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError([f"{path}: no such file"], what="submission")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError([f"{path}: the file is empty"], what="submission")
    if raw.startswith(b"\xef\xbb\xbf"):
        raise DataError([f"{path}: starts with a byte-order mark; write plain UTF-8"], what="submission")
    data = load_dataset(data_dir)
    try:
        sub = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError([f"{path}: not a CSV file ({exc})"], what="submission") from None
    validate_submission(sub, _eval_rows(data.manifest), data.classes, where=str(path))


def _eval_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    rows = manifest[manifest["subset"] == "eval"]
    return pd.DataFrame({"filename": rows["filename"], "location": rows["city"], "record_time": rows["record_time"]})


def apply_session_labels(
    probs: pd.DataFrame, manifest: pd.DataFrame, classes: list[str]
) -> tuple[pd.DataFrame, np.ndarray]:
    """``probs`` (a ``filename`` column and one per class) with every eval clip of a labelled
    development session set to its session's scene (probability 1), and which rows those are."""
    scene = scenes_of_sessions(manifest, subset="eval").set_axis(manifest["filename"])
    known = scene.reindex(probs["filename"]).to_numpy()
    hit = pd.notna(known)
    out = probs.copy()
    if hit.any():
        out.loc[hit, classes] = (np.asarray(classes)[None, :] == known[hit].astype(str)[:, None]).astype(np.float64)
    return out, hit


def make_submission(
    experiment: str | Path,
    out: str | Path,
    *,
    ensemble: str | None = None,
    session_labels: bool = True,
    address: str | None = None,
) -> Submission:
    """Predict every eval clip with an ensemble and write the challenge file.

    ``out`` (the challenge CSV), ``<out>_probabilities.csv`` and ``<out>_info.json``; the
    challenge file is written last, so its name only ever holds a complete file. It is
    validated (every eval clip once, in order, labels among the classes) before it is written.

    Args:
        experiment: an experiment folder with ensembles.
        out: the challenge CSV to write.
        ensemble: the ensemble that predicts (None: the final one, ``final_ensemble``).
        session_labels: eval clips of labelled development sessions take their session's
            label.
        address: a Ray cluster to join (None: a local Ray).

    Returns:
        The files written and the predicted counts.

    Raises:
        RayscError: no experiment folder, or no such ensemble in it.
        DataError: a data folder without eval clips, or predictions that fail validation.
    """
    exp = Experiment.existing(experiment)
    ens = exp.load_ensemble(ensemble)
    data = load_dataset(ens.data)
    expected = _eval_rows(data.manifest)
    if expected.empty:
        raise DataError([f"{ens.data}: no eval clips in this data folder"], what="submission")
    probs = predict_ensemble(ens, exp.root, list(expected["filename"]), address=address)
    n_session = 0
    if session_labels:
        probs, hit = apply_session_labels(probs, data.manifest, data.classes)
        n_session = int(hit.sum())
    labels = np.asarray(data.classes)[probs[data.classes].to_numpy().argmax(1)]
    sub = expected.assign(scene_label=labels).reset_index(drop=True)[COLUMNS]
    validate_submission(sub, expected.reset_index(drop=True), data.classes, probs)
    out = Path(out)
    prob_path = out.with_name(out.stem + "_probabilities.csv")
    info_path = out.with_name(out.stem + "_info.json")
    members = []
    for m in ens.members:
        files = exp.member_files(m)
        members.append(
            {
                **dataclasses.asdict(m),
                "params": files["record"]["params"],
                "config": files["config"],
                "validation": files["record"]["metrics"],
            }
        )
    # The challenge file last: its name only ever holds a complete file, and once it is there
    # its probabilities and info beside it are of the same ensemble.
    write_csv(prob_path, probs)
    write_json(info_path, {**_info(ens, members), "session_labels": {"on": session_labels, "clips": n_session}})
    write_csv(out, sub)
    counts = {c: int((labels == c).sum()) for c in data.classes}
    return Submission(out, prob_path, info_path, counts, n_session)


def _info(ens: Ensemble, members: list[dict]) -> dict[str, Any]:
    metrics = (
        "macro_accuracy",
        "accuracy",
        "log_loss",
        "clips",
        "seen_city_macro_accuracy",
        "unseen_city_macro_accuracy",
    )
    versions = {
        "raysc": __version__,
        "python": platform.python_version(),
        **{name: version(name) for name in ("torch", "torchaudio", "ray", "optuna")},
    }
    return {
        "ensemble": ens.name,
        "method": ens.method,
        "temperature": ens.temperature,
        "session_smoothing": ens.session_smoothing,
        "validation": {k: ens.metrics[k] for k in metrics},
        "validation_fold": ens.fold,
        "members": members,
        "versions": versions,
    }
