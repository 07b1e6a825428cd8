"""Keep Tune's experiment state resumable across a kill.

Ray Tune 2.60 rewrites ``experiment_state-<session>.json`` in place (open, write), so a search
killed at the wrong moment leaves it empty or cut short, and ``Tuner.restore`` then silently
starts over. ``StateBackup`` keeps an atomic copy of the last complete version, and
``repair_state`` puts it back before a resume.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ray import tune

from .errors import RayscError
from .fileio import atomic_path

log = logging.getLogger(__name__)

STATE_GLOB = "experiment_state-*.json"


def _complete(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


class StateBackup(tune.Callback):
    """After every Tune step, copy the newest experiment state to ``backup_dir`` if it changed and
    is complete JSON (Tune may still be writing it: then the next step takes it)."""

    def __init__(self, tune_dir: Path, backup_dir: Path) -> None:
        self.tune_dir, self.backup_dir = Path(tune_dir), Path(backup_dir)
        self._last: bytes | None = None

    def _take(self) -> None:
        states = sorted(self.tune_dir.glob(STATE_GLOB))
        if not states:
            return
        try:
            data = states[-1].read_bytes()
        except FileNotFoundError:
            return
        if data == self._last or not _complete(data):
            return
        with atomic_path(self.backup_dir / states[-1].name) as tmp:
            tmp.write_bytes(data)
        self._last = data

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._take()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._take()


def repair_state(tune_dir: Path, backup_dir: Path) -> list[str]:
    """Make the newest experiment state in ``tune_dir`` readable again; return what was done.

    A state file that is not complete JSON gets its backup back. Without a backup it is set aside
    (``.unreadable``) so that Tune resumes from the session before; if no readable state is left
    at all, resuming would silently start the search over, so that is an error.
    """
    done = []
    states = sorted(Path(tune_dir).glob(STATE_GLOB), reverse=True)
    for path in states:
        if _complete(path.read_bytes()):
            return done
        backup = Path(backup_dir) / path.name
        if backup.is_file() and _complete(backup.read_bytes()):
            with atomic_path(path) as tmp:
                tmp.write_bytes(backup.read_bytes())
            done.append(f"{path.name} was cut short by the kill; put back its last complete copy")
            return done
        path.rename(path.with_name(path.name + ".unreadable"))
        done.append(f"{path.name} was cut short by the kill and has no complete copy; set aside")
    if states:
        raise RayscError(
            f"{tune_dir}: no readable Tune state is left ({'; '.join(done)}), so the search cannot resume; "
            "start it again in a new --experiment folder"
        )
    return done
