"""The pipeline's time arithmetic (``raysc.budget``) and its stage bookkeeping, without Ray."""

from __future__ import annotations

import pytest

from raysc.budget import Budget, check_budget, smallest_budget
from raysc.errors import ConfigError


class Clock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_budget_counts_from_its_start_and_never_goes_negative():
    clock = Clock()
    budget = Budget(10.0, clock=clock)
    assert budget.limited and budget.elapsed() == 0.0
    clock.now += 120  # two minutes
    assert budget.elapsed() == pytest.approx(2.0)
    assert budget.left() == pytest.approx(8.0) and budget.left(reserve=3.0) == pytest.approx(5.0)
    assert budget.share(2, reserve=3.0) == pytest.approx(2.5)
    clock.now += 60 * 60  # an hour later: past the budget
    assert budget.left(reserve=1.0) == 0.0 and budget.share(3) == 0.0
    assert budget.share(3, floor=0.5) == 0.5  # the least a round's search gets


def test_no_budget_limits_nothing():
    budget = Budget(None, clock=Clock())
    assert not budget.limited
    assert budget.left(reserve=5.0) == float("inf") and budget.share(2) is None
    assert budget.reserve([1.0, 2.0], clips=1000) == 0.0


def test_the_reserve_grows_with_the_members_inference_and_the_clips_to_score():
    budget = Budget(60.0, clock=Clock())
    assert budget.reserve([], clips=600) == pytest.approx(6.0)  # no member measured yet: a tenth
    assert Budget(5.0, clock=Clock()).reserve([], clips=600) == 1.0  # at least the fixed minute
    # Two members at 0.01 s and 0.02 s a clip over 600 clips: 18 s, doubled is 0.6 min, plus 1.
    assert budget.reserve([0.01, 0.02], clips=600) == pytest.approx(1.6)
    assert budget.reserve([0.01, 0.02], clips=1200) == pytest.approx(2.2)


def test_a_measured_reserve_counts_the_inference_tasks_that_run_at_once_and_the_submission():
    budget = Budget(60.0, clock=Clock())
    # 30 tasks of 4 s, 2 at once: 15 rounds of 4 s is 1 min, doubled, plus the submission's half minute.
    assert budget.measured_reserve(4.0, tasks=30, slots=2) == pytest.approx(2.5)
    assert budget.measured_reserve(4.0, tasks=31, slots=2) == pytest.approx(0.5 + 2 * 16 * 4 / 60)  # one more round
    assert budget.measured_reserve(4.0, tasks=30, slots=30) == pytest.approx(0.5 + 2 * 4 / 60)
    assert budget.measured_reserve(4.0, tasks=0, slots=2) == pytest.approx(0.5)
    assert Budget(None).measured_reserve(4.0, tasks=30, slots=2) == 0.0


@pytest.mark.parametrize("minutes", [0.0, -1.0, float("nan")])
def test_a_budget_that_is_not_a_positive_number_is_refused(minutes):
    with pytest.raises(ConfigError, match=r"a time budget must be a positive number of minutes, got"):
        Budget(minutes)


@pytest.mark.parametrize("minutes", [0.5, 1e-9, 1.99])
def test_a_budget_below_what_the_pipeline_can_use_names_the_smallest(minutes):
    assert smallest_budget(2) == 2.0
    with pytest.raises(
        ConfigError,
        match=rf"--time-budget {minutes:g} min is below the smallest this pipeline can use, 2 min \(1 min kept "
        r"for inference, ensembles and the submission, and 0\.5 min of search for each of its 2 round\(s\)\); "
        r"give at least that, or no budget",
    ):
        check_budget(minutes, rounds=2)
    check_budget(2.0, rounds=2)  # the smallest is accepted
    check_budget(None, rounds=2)
