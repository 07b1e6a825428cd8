"""Refit: the final ensemble's members retrained on every labelled clip.

A search validates every trial on one fold, so its models train on the other folds only (on a
few hundred labelled clips, a fifth of the labels is worth several points of accuracy). After the
ensemble is chosen on validation, each member's configuration is trained again with ``fold: -1``
(every labelled clip and its session labels; the same pseudo-labels) for as many epochs as its
best epoch, in parallel as Ray tasks. The refit ensemble keeps the chosen ensemble's weights,
temperature and session smoothing; ``final_ensemble`` then prefers it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pandas as pd

from .config import make_config
from .distributed import fit_all
from .experiment import Ensemble, Experiment

log = logging.getLogger(__name__)


def refit_ensemble(
    experiment: str | Path,
    ens: Ensemble,
    *,
    cpus: float = 1.0,
    gpus: float = 0.0,
    workers: int = 1,
    address: str | None = None,
) -> Ensemble:
    """Retrain ``ens``'s members on every labelled clip (``workers`` > 1: each as a Ray Train DDP
    run, see ``distributed.fit_all``); save and return the refit ensemble."""
    exp = Experiment(experiment)
    records = {r.trial_id: r for r in exp.records()}
    todo, configs, outs = [], [], []
    for m in ens.members:
        out = exp.refit_dir(m.trial_id)
        if not (out / "model.pt").is_file():  # a rerun keeps the refits that finished
            train = json.loads((exp.root / m.model_path).with_name("config.json").read_text())["train"]
            epochs = max(1, records[m.trial_id].best_epoch or train["epochs"])
            configs.append(make_config({**train, "fold": -1, "epochs": epochs}, where=f"refit of {m.trial_id}"))
            outs.append(out)
            todo.append(m.trial_id)
    if todo:
        log.info("refitting %d member(s) of %s on every labelled clip: %s", len(todo), ens.name, todo)
        fit_all(configs, ens.data, outs, workers=workers, cpus=cpus, gpus=gpus, address=address)
    members = tuple(replace(m, model_path=exp.relative(exp.refit_dir(m.trial_id) / "model.pt")) for m in ens.members)
    refit = replace(ens, name=f"{ens.name}-refit", members=members, refit_of=ens.name)
    exp.save_ensemble(refit, pd.read_csv(exp.ensemble_predictions(ens.name)))
    return refit
