"""Cross-fitting: the best trials retrained once per fold, an ensemble chosen out of fold."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import FRONTEND

from raysc.config import make_config
from raysc.crossfit import crossfit_ensemble
from raysc.ensemble import build_ensemble
from raysc.errors import RayscError
from raysc.experiment import OUT_OF_FOLD, Experiment, TrialRecord, final_ensemble
from raysc.fileio import write_json
from raysc.train import fit

pytestmark = pytest.mark.slow


def _trial(exp: Experiment, data, trial_id: str, **values) -> None:
    """A finished round-0 trial, as a search leaves it: its run folder and its record."""
    cfg = make_config({"backbone": "stats", "model": {"frontend": FRONTEND}, "epochs": 2, "batch_size": 16, **values})
    out = exp.trial_dir(0, trial_id)
    result = fit(cfg, data.out, out_dir=out)
    best = result.best
    record = TrialRecord(
        trial_id, 0, "completed", "stats", {}, 2, best["epoch"], {"macro_accuracy": best["macro_accuracy"]},
        1, 1, 1.0, None, 0.1, 0, exp.relative(out / "model.pt"), exp.relative(out / "val_predictions.csv"),
    )  # fmt: skip
    exp.write_record(record)


def test_crossfitted_ensembles_are_chosen_out_of_fold_on_every_labelled_clip(local_ray, prepared, tmp_path):
    exp = Experiment(tmp_path / "exp")
    write_json(exp.search_settings(0), {"data": str(prepared.out)})
    _trial(exp, prepared, "aaaa0000", lr=3e-3)
    _trial(exp, prepared, "bbbb1111", lr=1e-2, weight_decay=1e-2)
    # A trial trained on pseudo-labels is not cross-fitted (its teacher saw the other folds).
    m = prepared.manifest
    unl = m[m["subset"] == "unlabelled"]
    cands = pd.DataFrame(np.full((len(unl), 10), 0.1), columns=prepared.classes).assign(filename=unl["filename"].values)
    cands.to_csv(tmp_path / "cands.csv", index=False)
    _trial(exp, prepared, "cccc2222", lr=3e-3, pseudo_labels=str(tmp_path / "cands.csv"))
    single = build_ensemble(exp.root, k=2)

    address = local_ray.get_runtime_context().gcs_address
    plain, smoothed = crossfit_ensemble(exp.root, candidates=3, k=2, address=address)

    labelled = m[m["subset"] == "labelled"]
    folds = sorted(labelled["fold"].unique())
    assert not (exp.root / "crossfit" / "cccc2222").exists()
    for trial_id in ("aaaa0000", "bbbb1111"):
        seen = []
        for f in folds:
            run = exp.crossfit_dir(trial_id, f)
            train = json.loads((run / "config.json").read_text())["train"]
            assert train["fold"] == f and train["keep_last"]  # fold f held out, never used to choose
            names = list(pd.read_csv(run / "val_predictions.csv")["filename"])
            assert set(names) == set(labelled.loc[labelled["fold"] == f, "filename"])
            history = json.loads((run / "metrics.json").read_text())["history"]
            assert (history[0]["train_clips"] < len(m) and len(history) == 2) or len(history) >= 1
            seen += names
        assert sorted(seen) == sorted(labelled["filename"])  # every labelled clip exactly once
    for ens in (plain, smoothed):
        assert ens.fold == OUT_OF_FOLD and ens.metrics["clips"] == len(labelled)
        assert len(ens.metrics["fold_macro_accuracy"]) == len(folds) and ens.metrics["fold_macro_accuracy_std"] >= 0
        assert len(ens.members) == 2 * len(folds) and sum(mb.weight for mb in ens.members) == pytest.approx(1.0)
        assert {mb.trial_id for mb in ens.members} == {"aaaa0000", "bbbb1111"}
    assert smoothed.session_smoothing and not plain.session_smoothing
    # The final model: a cross-fitted ensemble when there is one.
    assert final_ensemble([single, plain, smoothed]).fold == OUT_OF_FOLD
    assert final_ensemble([single]) == single
    # A budget that holds no candidate's runs: refused by name before anything trains.
    with pytest.raises(RayscError, match=r"no trial's cross-fitting fits in 0\.0 min"):
        crossfit_ensemble(exp.root, candidates=3, k=2, time_budget_minutes=0.0001, address=address)
