"""ASHA that lets a trial's last epoch end by itself (raysc.asha)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from raysc.asha import LastEpochASHA, step_asha
from raysc.search_space import Scheduler


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


def test_rungs_count_optimiser_steps_not_epochs():
    # Grace 20 steps: a trial on a big data set (25 steps an epoch) is judged after its first
    # epoch, one on a small data set (6 steps an epoch) only after its fourth, at the same rung.
    sched = step_asha(Scheduler(grace_steps=20, reduction_factor=2, max_epochs=10), metric="acc")
    big, small = SimpleNamespace(trial_id="big"), SimpleNamespace(trial_id="small")
    for t in (big, small):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, big, {"epoch": 1, "steps": 25, "acc": 0.6, "final": False}) == "CONTINUE"
    early = [
        sched.on_trial_result(None, small, {"epoch": e, "steps": 6 * e, "acc": 0.1, "final": False}) for e in (1, 2, 3)
    ]
    assert early == [TrialScheduler.CONTINUE] * 3  # 18 steps: not judged yet, however bad
    assert sched.on_trial_result(None, small, {"epoch": 4, "steps": 24, "acc": 0.1, "final": False}) == "STOP"


def _rung_stops(group_by: str | None) -> list[str]:
    """A log-mel trial judged at the first rung after two trunk-head trials scored higher there."""
    sched = step_asha(Scheduler(grace_steps=10, reduction_factor=2, max_epochs=10), metric="acc", group_by=group_by)
    trials = {
        name: SimpleNamespace(trial_id=name, config={"backbone": backbone})
        for name, backbone in (("head1", "aisfx"), ("head2", "aisfx"), ("logmel1", "stats"), ("logmel2", "stats"))
    }
    for t in trials.values():
        sched.on_trial_add(None, t)
    said = {
        name: sched.on_trial_result(None, trials[name], {"steps": 10, "acc": acc, "final": False})
        for name, acc in (("head1", 0.9), ("head2", 0.8), ("logmel1", 0.6), ("logmel2", 0.5))
    }
    return [said[name] for name in ("head1", "head2", "logmel1", "logmel2")]


def test_with_group_by_a_trial_is_judged_only_against_its_own_backbone():
    C, S = TrialScheduler.CONTINUE, TrialScheduler.STOP
    # One set of rungs: each trial below the best half so far stops, so both log-mel trials do.
    assert _rung_stops(None) == [C, S, S, S]
    # Rungs per backbone: the first log-mel trial is the best of its own rung and goes on; the
    # second is below its own backbone's cutoff, as the second head is below the first.
    assert _rung_stops("backbone") == [C, S, C, S]
