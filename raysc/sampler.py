"""The search's Optuna searcher: a trial that ASHA stopped is told to Optuna as PRUNED.

Ray's ``OptunaSearch`` tells every trial that ended without an error COMPLETE, with its last
value, so a trial stopped at ASHA's first rung counts for TPE as a finished configuration worth
that early value. Told PRUNED instead, it keeps its intermediate values (reported per optimiser
step, which a resumed trial continues, not per Tune iteration, which restarts at 1), and TPE
ranks it below every completed trial and pruned trials by how far they got: what an early stop
really says about a configuration.

Concurrent trials: TPE models only trials that have ended, so when a cluster starts many trials
at once every one of them is sampled at random. Two things keep it learning: TPE is told about
running trials (Optuna's constant liar: they count as poor results, so concurrent asks spread
out), and no trial past the random start-up trials is asked for until the start-up trials have
ended (``startup_gate``): the trials after them are then modelled on results.
"""

from __future__ import annotations

from typing import Any

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch


class StopAwareOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that reports by optimiser step and tells stopped trials PRUNED (a
    trial's last result says ``final`` when it ended by itself)."""

    def __init__(self, *args: Any, startup_gate: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_step: dict[str, int] = {}  # trial id -> the last step told (saved and restored with the rest)
        self._startup_gate = startup_gate

    def waiting_for_startup(self) -> bool:
        """Whether the next trial must wait: the start-up trials are all asked, not all ended."""
        asked, ended = len(self._ot_trials), len(self._completed_trials)
        gate = getattr(self, "_startup_gate", 0)  # a searcher saved before the gate existed has none
        return 0 < gate <= asked and ended < gate

    def suggest(self, trial_id: str) -> dict | None:
        if self.waiting_for_startup():
            return None  # Tune asks again on its next step
        return super().suggest(trial_id)

    def _ended_before_the_restore(self, trial_id: str) -> bool:
        """Whether the study already holds this trial's end, told after the Tune snapshot that a
        resumed search restored (up to a minute old): Tune runs the trial again, and it reports
        its final result again, which Optuna refuses for a finished trial."""
        trial = self._ot_trials.get(trial_id)
        if trial_id in self._completed_trials or trial is None:
            return False
        if not self._ot_study.get_trials(deepcopy=False)[trial.number].state.is_finished():
            return False
        self._completed_trials.add(trial_id)
        return True

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._ended_before_the_restore(trial_id):
            return None
        if trial_id in self._completed_trials or self.metric not in result:
            return super().on_trial_result(trial_id, result)
        step = int(result.get("steps") or result["training_iteration"])
        if step > self._last_step.get(trial_id, -1):  # a retried trial repeats the steps of its checkpoint
            self._ot_trials[trial_id].report(result[self.metric], step)
            self._last_step[trial_id] = step
        return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._ended_before_the_restore(trial_id):
            return
        if error or not result or result.get("final") or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)
