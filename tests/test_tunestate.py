"""Tune's experiment state survives a kill in the middle of its write (raysc.tunestate)."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest

from raysc.errors import RayscError
from raysc.tunestate import StateBackup, repair_state, requeue_lost_trials

SESSION, OLDER = "2026-01-01_00-00-00", "2025-12-31_00-00-00"
STATE, SEARCHER = f"experiment_state-{SESSION}.json", f"search_gen_state-{SESSION}.json"  # a pickle, named .json


def _dirs(tmp_path):
    tune_dir, backup_dir, staging = tmp_path / "tune", tmp_path / "tune-state", tmp_path / "staging"
    tune_dir.mkdir()
    staging.mkdir()
    return tune_dir, backup_dir, staging


def _trials(staging):
    return [SimpleNamespace(storage=SimpleNamespace(experiment_driver_staging_path=str(staging)))]


def test_the_backup_keeps_the_last_complete_set_and_repair_puts_it_back(tmp_path):
    tune_dir, backup_dir, staging = _dirs(tmp_path)
    backup = StateBackup(tune_dir, backup_dir)
    backup.on_step_end(iteration=0, trials=[])
    assert not backup_dir.exists()  # no trial yet: nothing to keep
    good = json.dumps({"trial_data": [["t1", "TERMINATED"]], "runner_data": {}})
    searcher = pickle.dumps({"told": ["t1"]})
    (staging / STATE).write_text(good)
    (staging / SEARCHER).write_bytes(searcher)
    backup.on_step_end(iteration=1, trials=_trials(staging))
    assert (backup_dir / STATE).read_text() == good and (backup_dir / SEARCHER).read_bytes() == searcher
    # The kill hit Tune's copy into the experiment folder: one file empty, one cut short.
    (tune_dir / STATE).write_text("")
    (tune_dir / SEARCHER).write_bytes(searcher[:10])
    assert repair_state(tune_dir, backup_dir) == [
        f"cut short by the kill: {STATE}, {SEARCHER}; put back the last complete copy"
    ]
    assert (tune_dir / STATE).read_text() == good and (tune_dir / SEARCHER).read_bytes() == searcher
    assert repair_state(tune_dir, backup_dir) == []  # readable now: nothing to do


def test_without_a_backup_an_unreadable_state_gives_way_to_the_session_before(tmp_path):
    tune_dir, backup_dir, _ = _dirs(tmp_path)
    (tune_dir / f"experiment_state-{OLDER}.json").write_text(json.dumps({"trial_data": []}))
    (tune_dir / STATE).write_text('{"trial_data": [')
    done = repair_state(tune_dir, backup_dir)
    assert done == [f"cut short by the kill: {STATE}; no complete copy, {STATE} set aside"]
    assert sorted(p.name for p in tune_dir.iterdir()) == [f"experiment_state-{OLDER}.json", STATE + ".unreadable"]


def test_no_readable_state_at_all_is_an_error_not_a_fresh_start(tmp_path):
    tune_dir, backup_dir, _ = _dirs(tmp_path)
    (tune_dir / STATE).write_text("")
    with pytest.raises(RayscError, match=r"no readable Tune state is left .*start it again in a new --experiment"):
        repair_state(tune_dir, backup_dir)
    assert repair_state(tmp_path / "tune-never-started", backup_dir) == []  # killed before Tune wrote anything


def _define(trial):  # a search space as define-by-run; module level, so the searcher pickles
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    trial.suggest_categorical("backbone", ["a", "b", "c"])


def test_a_trial_asked_for_just_before_the_kill_is_handed_out_again(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    journal = tmp_path / "study.journal"

    def searcher(seed):
        storage = JournalStorage(JournalFileBackend(str(journal)))
        return OptunaSearch(
            _define,
            metric="acc",
            mode="max",
            sampler=optuna.samplers.RandomSampler(seed=seed),
            study_name="round-0",
            storage=storage,
        )

    first = searcher(seed=0)
    first.suggest("t1")
    first.suggest("t2")
    first.on_trial_complete("t1", {"acc": 0.5})
    tune_dir = tmp_path / "tune"
    tune_dir.mkdir()
    (tune_dir / STATE).write_text("{}")
    saved = tune_dir / f"searcher-state-{SESSION}.pkl"
    first.save(str(saved))
    lost = first.suggest("t3")  # in the journal at once; the kill came before Tune saved its state again
    assert requeue_lost_trials(tune_dir, journal, "round-0") == [
        "Optuna trial 2 was asked for just before the kill and never started; it is handed out again"
    ]
    resumed = searcher(seed=1)  # another seed: a fresh sample could not match by chance
    resumed.restore(str(saved))
    assert resumed.suggest("t4") == lost
    resumed.on_trial_complete("t2", {"acc": 0.4})
    resumed.on_trial_complete("t4", {"acc": 0.6})
    study = optuna.load_study(study_name="round-0", storage=JournalStorage(JournalFileBackend(str(journal))))
    assert [(t.number, t.state) for t in study.trials] == [(n, TrialState.COMPLETE) for n in range(3)]
    assert study.trials[2].params == lost and study.trials[2].value == 0.6
    assert requeue_lost_trials(tune_dir, journal, "round-0") == []  # no RUNNING trial is left unknown
