"""Tune's experiment state survives a kill in the middle of its write (raysc.tunestate)."""

from __future__ import annotations

import json

import pytest

from raysc.errors import RayscError
from raysc.tunestate import StateBackup, repair_state

STATE = "experiment_state-2026-01-01_00-00-00.json"
OLDER = "experiment_state-2025-12-31_00-00-00.json"


def _dirs(tmp_path):
    tune_dir, backup_dir = tmp_path / "tune", tmp_path / "tune-state"
    tune_dir.mkdir()
    return tune_dir, backup_dir


def test_the_backup_keeps_the_last_complete_state_and_repair_puts_it_back(tmp_path):
    tune_dir, backup_dir = _dirs(tmp_path)
    backup = StateBackup(tune_dir, backup_dir)
    backup.on_step_end(iteration=0, trials=[])
    assert not backup_dir.exists()  # nothing written yet: nothing to copy
    good = json.dumps({"trial_data": [["t1", "TERMINATED"]], "runner_data": {}})
    (tune_dir / STATE).write_text(good)
    backup.on_step_end(iteration=1, trials=[])
    assert (backup_dir / STATE).read_text() == good
    (tune_dir / STATE).write_text(good[:20])  # Tune caught mid-write: the backup must not take it
    backup.on_step_end(iteration=2, trials=[])
    assert (backup_dir / STATE).read_text() == good
    (tune_dir / STATE).write_text("")  # the kill left it empty
    assert repair_state(tune_dir, backup_dir) == [f"{STATE} was cut short by the kill; put back its last complete copy"]
    assert (tune_dir / STATE).read_text() == good
    assert repair_state(tune_dir, backup_dir) == []  # readable now: nothing to do


def test_without_a_backup_an_unreadable_state_gives_way_to_the_session_before(tmp_path):
    tune_dir, backup_dir = _dirs(tmp_path)
    (tune_dir / OLDER).write_text(json.dumps({"trial_data": []}))
    (tune_dir / STATE).write_text('{"trial_data": [')
    done = repair_state(tune_dir, backup_dir)
    assert done == [f"{STATE} was cut short by the kill and has no complete copy; set aside"]
    assert sorted(p.name for p in tune_dir.iterdir()) == [OLDER, STATE + ".unreadable"]


def test_no_readable_state_at_all_is_an_error_not_a_fresh_start(tmp_path):
    tune_dir, backup_dir = _dirs(tmp_path)
    (tune_dir / STATE).write_text("")
    with pytest.raises(RayscError, match=r"no readable Tune state is left .*start it again in a new --experiment"):
        repair_state(tune_dir, backup_dir)
    assert repair_state(tmp_path / "tune-never-started", backup_dir) == []  # killed before Tune wrote anything
