"""ASHA that lets a trial's last epoch end by itself (raysc.asha)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from raysc.asha import LastEpochASHA


def _decisions(cls: type) -> list[str]:
    sched = cls(time_attr="epoch", metric="acc", mode="max", max_t=2, grace_period=1, reduction_factor=2)
    a, b = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
    for t in (a, b):
        sched.on_trial_add(None, t)
    return [
        sched.on_trial_result(None, a, {"epoch": 1, "acc": 0.9, "final": False}),
        sched.on_trial_result(None, b, {"epoch": 1, "acc": 0.1, "final": False}),  # below the rung's cutoff
        sched.on_trial_result(None, a, {"epoch": 2, "acc": 0.95, "final": True}),  # its last epoch
    ]


@pytest.mark.parametrize(
    ("cls", "last"), [(ASHAScheduler, TrialScheduler.STOP), (LastEpochASHA, TrialScheduler.CONTINUE)]
)
def test_the_last_epoch_is_not_stopped_and_rung_stops_remain(cls, last):
    assert _decisions(cls) == [TrialScheduler.CONTINUE, TrialScheduler.STOP, last]
