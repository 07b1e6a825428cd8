"""The live view of a search: a line per trial event and a status line every few seconds,
instead of Ray's raw log stream (which goes to the search's log file)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from .errors import trial_error
from .experiment import RUNNING_BEST as METRIC


class LiveView(Callback):
    """Counts running / finished / stopped / failed trials and tracks the best one."""

    def __init__(
        self, *, total: int, round: int, write: Callable[[str], None], backbone: str = "", every_s: float = 15.0
    ) -> None:
        """``backbone``: the space's only one (its trials do not sample it), else empty."""
        self.total, self.round, self.write, self.every_s = total, round, write, every_s
        self.backbone = backbone
        self.t0 = time.monotonic()
        self.last_status = 0.0
        self.best: tuple[float, str, str] | None = None  # (metric, trial id, backbone)
        self.ended: dict[str, str] = {}  # trial id -> completed | stopped | failed
        self.started: set[str] = set()

    def _elapsed(self) -> str:
        s = int(time.monotonic() - self.t0)
        return f"{s // 60}m{s % 60:02d}s"

    def _best(self) -> str:
        if not self.best:
            return "best: -"
        value, trial_id, backbone = self.best
        return f"best score {value:.4f} ({trial_id}, {backbone})"

    def status_line(self, running: int) -> str:
        counts = {k: sum(v == k for v in self.ended.values()) for k in ("completed", "stopped", "failed")}
        return (
            f"[round {self.round} {self._elapsed()}] running {running}, completed {counts['completed']}, "
            f"stopped {counts['stopped']}, failed {counts['failed']} of {self.total} | {self._best()}"
        )

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.started:
            self.write(f"[round {self.round} {self._elapsed()}] restart {trial.trial_id} (from its checkpoint)")
            return
        self.started.add(trial.trial_id)
        params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(_flat(trial.config).items()))
        self.write(f"[round {self.round} {self._elapsed()}] start {trial.trial_id}: {params}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(METRIC)
        if value is not None and (self.best is None or value > self.best[0]):
            self.best = (value, trial.trial_id, str(trial.config.get("backbone", self.backbone)))

    def _end(self, trial: Any, status: str) -> None:
        if trial.trial_id in self.ended:
            return
        self.ended[trial.trial_id] = status
        last = trial.last_result or {}
        epochs, value = last.get("epoch"), last.get(METRIC)
        detail = f"after {epochs} epoch(s), best score {value:.4f}" if value is not None else "no result"
        if status == "failed" and (why := trial_error(trial)):
            detail += f": {why}"
        self.write(f"[round {self.round} {self._elapsed()}] {status} {trial.trial_id} {detail}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        self._end(trial, "completed" if last.get("final") else "stopped")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "failed")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        for t in [] if self.started or self.ended else trials:  # trials that ended before a --resume
            if t.status in ("TERMINATED", "ERROR"):
                done = t.status == "TERMINATED" and (t.last_result or {}).get("final")
                self.ended[t.trial_id] = "failed" if t.status == "ERROR" else "completed" if done else "stopped"
        now = time.monotonic()
        if now - self.last_status >= self.every_s:
            self.last_status = now
            self.write(self.status_line(sum(t.status == "RUNNING" for t in trials)))

    def summary(self) -> None:
        self.write(self.status_line(0))


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        out |= _flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
