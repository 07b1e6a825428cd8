"""ASHA for Tune trials that each drive a Ray Train run.

``ASHAScheduler`` answers STOP to every trial that reaches ``max_t``, so Tune kills each finishing
trial, and its Ray Train controller with it. In Ray 2.60 the dying controller can see its worker
die first, restart the worker group and create a new placement group that Ray's cleaner never
registered: the group keeps its CPUs and the next trial waits for them (seen once in about 100
trials, at a trial's last epoch). A trial's last epoch therefore gets CONTINUE: the trial ends by
itself a moment later, and nothing is killed. Stops at earlier rungs still kill the trial; there
the Train run has no retries to take (search.py: Tune retries failed trials instead).

The rungs count optimiser steps (every epoch reports ``steps``), not epochs: on 192 clips an epoch
is 6 steps, on 8,700 it is 136, and a trial is judged after as much training either way.

With ``group_by`` (the pipeline's per-backbone search), a trial is compared only with trials of
its own backbone: a head on a pretrained trunk scores higher on a validation fold of the
development cities than a log-mel model at every rung, and one shared rung would stop every
log-mel trial early, leaving that member of the blend untrained.
"""

from __future__ import annotations

import copy
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from .search_space import Scheduler


class LastEpochASHA(ASHAScheduler):
    """``ASHAScheduler`` that never stops a trial on the result of its last epoch (``final``) and,
    with ``group_by``, keeps one set of rungs per value of that config key."""

    def __init__(self, *args: Any, group_by: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._group_by = group_by
        self._empty_bracket = copy.deepcopy(self._brackets[0])  # no trial yet: a template
        self._group_brackets: dict[Any, Any] = {}

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)  # checks the metric, assigns the shared rungs
        group_by = getattr(self, "_group_by", None)  # a scheduler saved before groups existed has none
        if group_by is not None:
            key = trial.config.get(group_by)
            if key not in self._group_brackets:
                self._group_brackets[key] = copy.deepcopy(self._empty_bracket)
            self._trial_info[trial.trial_id] = self._group_brackets[key]

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)  # records the rung result
        return TrialScheduler.CONTINUE if result.get("final") else decision


def step_asha(scheduler: Scheduler, *, metric: str, group_by: str | None = None) -> LastEpochASHA:
    """The search's ASHA: rungs at ``grace_steps`` x ``reduction_factor``^k optimiser steps (a
    set per value of the trial config's ``group_by`` key when given). A trial ends by itself
    after its epochs, so ``max_t`` only bounds the number of rungs."""
    return LastEpochASHA(
        group_by=group_by,
        time_attr="steps",
        metric=metric,
        mode="max",
        max_t=scheduler.grace_steps * scheduler.reduction_factor**8,
        grace_period=scheduler.grace_steps,
        reduction_factor=scheduler.reduction_factor,
    )
