"""Keep Tune's experiment state resumable across a kill.

Each step, Ray Tune 2.60 writes its driver state (experiment state, search generator, searcher,
callbacks) to a local staging folder and copies it into the experiment folder, overwriting the
files there in place. A search killed during that copy leaves some of them empty or cut short,
and ``Tuner.restore`` then silently starts over. ``StateBackup`` keeps an atomic copy of the
last complete set, and ``repair_state`` puts it back before a resume.

The Optuna journal is written at once, so it can be a step ahead of Tune's saved state: a trial
asked for just before the kill is RUNNING in the study but unknown to the restored Tune.
``requeue_lost_trials`` hands such trials out again instead of leaving them RUNNING forever.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray import tune

from .errors import RayscError
from .fileio import atomic_path

# One set per Tune session ({} = the session's timestamp); the first is the one Tune looks for.
STATE_FILES = (
    "experiment_state-{}.json",
    "search_gen_state-{}.json",
    "searcher-state-{}.pkl",
    "callback-states-{}.pkl",
)
EXPERIMENT_STATE, SEARCHER_STATE = STATE_FILES[0], STATE_FILES[2]


def _readable(path: Path) -> bool:
    try:
        data = path.read_bytes()
        if path.name.startswith(EXPERIMENT_STATE.split("{}")[0]):
            json.loads(data)  # the others are pickles, whatever their suffix
        else:
            pickle.loads(data)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError):
        return False
    return True


def _sessions(tune_dir: Path) -> list[tuple[Path, str]]:
    """(experiment state, session) of every Tune session in ``tune_dir``, newest first."""
    prefix, suffix = EXPERIMENT_STATE.split("{}")
    states = sorted(Path(tune_dir).glob(EXPERIMENT_STATE.format("*")), reverse=True)
    return [(state, state.name[len(prefix) : -len(suffix)]) for state in states]


def _session_files(folder: Path, session: str) -> list[Path]:
    return [folder / t.format(session) for t in STATE_FILES if (folder / t.format(session)).is_file()]


class StateBackup(tune.Callback):
    """After every Tune step, copy the state files from Tune's staging folder (complete there:
    Tune has just written them in this thread) to ``backup_dir``, when they changed."""

    def __init__(self, tune_dir: Path, backup_dir: Path) -> None:
        self.tune_dir, self.backup_dir = Path(tune_dir), Path(backup_dir)
        self._seen: tuple | None = None  # names, mtimes and sizes of the last copy: most steps change nothing

    def _take(self, trials: list) -> None:
        if not trials:
            return  # nothing to resume yet
        staging = Path(trials[0].storage.experiment_driver_staging_path)
        files = [p for t in STATE_FILES for p in sorted(staging.glob(t.format("*")))]
        try:
            key = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
            if key == self._seen:
                return
            contents = {p.name: p.read_bytes() for p in files}
        except FileNotFoundError:
            return
        for name, data in contents.items():
            with atomic_path(self.backup_dir / name) as tmp:
                tmp.write_bytes(data)
        self._seen = key

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._take(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._take(trials)


def repair_state(tune_dir: Path, backup_dir: Path) -> list[str]:
    """Make the newest Tune session's state in ``tune_dir`` readable again; return what was done.

    If any of its files is not readable, the session's whole backed-up set is put back (the files
    must agree with each other). Without a usable backup its experiment state is set aside
    (``.unreadable``) so that Tune resumes from the session before; if no session is left,
    resuming would silently start the search over, so that is an error.
    """
    done = []
    sessions = _sessions(tune_dir)
    for state, session in sessions:
        broken = [p.name for p in _session_files(Path(tune_dir), session) if not _readable(p)]
        if not broken:
            return done
        saved = _session_files(Path(backup_dir), session)
        if saved and saved[0].name == state.name and all(_readable(p) for p in saved):
            for p in saved:
                with atomic_path(Path(tune_dir) / p.name) as tmp:
                    tmp.write_bytes(p.read_bytes())
            done.append(f"cut short by the kill: {', '.join(broken)}; put back the last complete copy")
            return done
        state.rename(state.with_name(state.name + ".unreadable"))
        done.append(f"cut short by the kill: {', '.join(broken)}; no complete copy, {state.name} set aside")
    if sessions:
        raise RayscError(
            f"{tune_dir}: no readable Tune state is left ({'; '.join(done)}), so the search cannot resume; "
            "start it again in a new --experiment folder"
        )
    return done


def requeue_lost_trials(tune_dir: Path, journal: Path, study_name: str) -> list[str]:
    """Put the study's RUNNING trials that the saved searcher state does not know back in the
    queue (WAITING); Optuna's next ``ask`` hands out the oldest of them again, with its values.

    Call it after ``repair_state`` and before ``Tuner.restore``. Returns what was done.
    """
    sessions = _sessions(tune_dir)
    searcher = Path(tune_dir) / SEARCHER_STATE.format(sessions[0][1]) if sessions else None
    if searcher is None or not searcher.is_file() or not Path(journal).is_file():
        return []
    # OptunaSearch saves its __dict__; its _ot_trials maps Tune's trial ids to the Optuna trials.
    known = {t.number for t in pickle.loads(searcher.read_bytes())["_ot_trials"].values()}
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study_id = storage.get_study_id_from_name(study_name)
    done = []
    for trial in storage.get_all_trials(study_id, states=(TrialState.RUNNING,)):
        if trial.number not in known:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_state_values(trial_id, TrialState.WAITING)
            done.append(
                f"Optuna trial {trial.number} was asked for just before the kill and never started; "
                "it is handed out again"
            )
    return done
