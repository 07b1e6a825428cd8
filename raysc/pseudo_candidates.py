"""`raysc pseudo-label`: an ensemble's probabilities on the unlabelled clips outside its
validation sessions, written as pseudo-label candidates (selection happens per training run,
``raysc.pseudo_labels``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .datafolder import load_dataset
from .errors import DataError
from .experiment import Experiment
from .fileio import write_csv
from .inference import predict_ensemble
from .pseudo_labels import Selection, select

log = logging.getLogger(__name__)


def write_candidates(
    experiment: str | Path,
    *,
    ensemble: str | None = None,
    selection: Selection | None = None,
    without_session_label: bool = False,
    agree_with: str | Path | None = None,
    address: str | None = None,
) -> tuple[Path, pd.DataFrame]:
    """Score every unlabelled clip outside the ensemble's validation sessions with the ensemble
    (Ray batch inference) and write the pseudo-label candidates.

    ``candidates.csv`` (filename, one probability per class, label, confidence) and
    ``summary.csv`` (per class: candidates, threshold, and what ``selection`` would keep) go to
    the experiment's pseudo-label folder of that ensemble.

    Args:
        experiment: an experiment folder with ensembles.
        ensemble: the ensemble that scores (None: the final one, ``final_ensemble``).
        selection: the selection the summary reports (None: ``Selection()``, every clip).
        without_session_label: only the clips of sessions without any label (the only ones a
            run with session labels takes pseudo-labels for).
        agree_with: earlier candidates; only the clips to which they gave the same label stay
            (ASCMamba's two-step pseudo-labelling).
        address: a Ray cluster to join (None: a local Ray).

    Returns:
        The path of ``candidates.csv`` and the per-class summary.

    Raises:
        RayscError: no experiment folder, or no such ensemble in it.
        DataError: no unlabelled clip outside the validation fold.
    """
    exp = Experiment.existing(experiment)
    ens = exp.load_ensemble(ensemble)
    data = load_dataset(ens.data)
    m = data.manifest
    # Unlabelled clips of validation sessions share the validation fold: never candidates.
    unl = m[(m["subset"] == "unlabelled") & (m["fold"] != ens.fold)]
    if without_session_label:
        unl = unl[unl["session_label"].isna()]
    if unl.empty:
        raise DataError([f"{ens.data}: no unlabelled clip outside validation fold {ens.fold}"], what="pseudo-labels")
    probs = predict_ensemble(ens, exp.root, list(unl["filename"]), address=address)
    p = probs[data.classes].to_numpy()
    probs["label"] = np.asarray(data.classes)[p.argmax(1)]
    probs["confidence"] = p.max(1)
    if agree_with is not None:
        earlier = pd.read_csv(agree_with).set_index("filename")["label"]
        agree = earlier.reindex(probs["filename"]).to_numpy() == probs["label"].to_numpy()
        log.info("pseudo-label candidates: %d of %d clips keep the label of %s", agree.sum(), len(probs), agree_with)
        probs = probs[agree].reset_index(drop=True)
    path = exp.pseudo_candidates(ens.name)
    write_csv(path, probs)
    _, summary = select(probs, data.classes, selection or Selection())
    write_csv(exp.pseudo_summary(ens.name), summary)
    log.info("pseudo-label candidates: %d unlabelled clips scored by %s -> %s", len(probs), ens.name, path)
    return path, summary
