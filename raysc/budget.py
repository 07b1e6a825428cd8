"""The pipeline's time budget: every piece of time arithmetic in one object, with no Ray in it.

A budget of ``total`` minutes starts when it is made. The searches, cross-fitting and pseudo-label
rounds share what is ``left`` after a ``reserve`` kept for what must follow them (inference on the
eval and unlabelled clips, the ensembles, the submission). ``share`` splits what is left between
the parts of work still to come. No number it gives is ever negative. The reserve is estimated
from the trials' validation inference until a cross-fitted member's inference has been timed as
the submission runs it (``measured_reserve``).

Without a budget (``total`` is None) nothing is limited: ``limited`` is False, the reserve is 0,
and a share is None (the search runs its trials and epochs to the end).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .errors import ConfigError

# Kept for ensembles, plots and Ray's start-up on top of the inference estimate.
FIXED_RESERVE_MINUTES = 1.0
# Before any member has measured its inference, this share of the budget is kept instead.
FIRST_RESERVE_SHARE = 0.1
# The inference estimate is doubled: a member scored once on the validation clips is the only
# measurement, and the eval and unlabelled clips are many times more.
RESERVE_SAFETY = 2.0
# Kept for the ensembles' files, the submission and the plots once a cross-fitted member's
# inference is measured: the submit and plots stages took 0.24-0.40 min together, inference
# included, in the 10-minute budget runs of docs/notes/2026-12-06-budget-runs.md.
SUBMIT_MINUTES = 0.5
# The least search time a round gets: less cannot finish one epoch of the smallest member.
MIN_SEARCH_MINUTES = 0.5


@dataclass
class Budget:
    """Minutes of wall-clock time for a whole pipeline run, measured from creation.

    The one holder of the pipeline's time arithmetic; tested alone, with its own clock.

    Attributes:
        total: the budget in minutes, or None for no limit.
        clock: seconds since an arbitrary start (``time.perf_counter``); a test passes its own.
        start: the clock when the budget was made.

    Raises:
        ConfigError: a ``total`` that is not a positive number.
    """

    total: float | None
    clock: Callable[[], float] = time.perf_counter
    start: float = field(init=False)

    def __post_init__(self) -> None:
        if self.total is not None and not self.total > 0:
            raise ConfigError(f"a time budget must be a positive number of minutes, got {self.total!r}")
        self.start = self.clock()

    @property
    def limited(self) -> bool:
        return self.total is not None

    def elapsed(self) -> float:
        """Minutes since the budget started.

        Returns:
            The minutes.
        """
        return (self.clock() - self.start) / 60

    def left(self, reserve: float = 0.0) -> float:
        """Minutes left after ``reserve``.

        Args:
            reserve: minutes kept back (for inference, ensembles and the submission).

        Returns:
            The minutes, never below 0 (``inf`` without a budget).
        """
        if self.total is None:
            return float("inf")
        return max(0.0, self.total - self.elapsed() - reserve)

    def share(self, parts: float, *, reserve: float = 0.0, floor: float = 0.0) -> float | None:
        """One of ``parts`` equal parts of what is left after ``reserve``.

        Args:
            parts: how many parts (below 1 counts as 1).
            reserve: minutes kept back first.
            floor: the least a part gets.

        Returns:
            The minutes of one part, or None without a budget.
        """
        if self.total is None:
            return None
        return max(floor, self.left(reserve) / max(parts, 1))

    def reserve(self, per_clip_seconds: Sequence[float], clips: int) -> float:
        """Minutes to keep for scoring ``clips`` clips with the ensemble's members.

        Their measured inference time, doubled, plus a fixed minute; before any member has been
        measured, a tenth of the budget (at least the fixed minute).

        Args:
            per_clip_seconds: each member's validation inference seconds per clip.
            clips: the clips still to score (eval and unlabelled).

        Returns:
            The minutes, 0 without a budget.
        """
        if self.total is None:
            return 0.0
        if not per_clip_seconds:
            return max(FIXED_RESERVE_MINUTES, FIRST_RESERVE_SHARE * self.total)
        return FIXED_RESERVE_MINUTES + RESERVE_SAFETY * sum(per_clip_seconds) * clips / 60

    def measured_reserve(self, task_seconds: float, tasks: int, slots: int) -> float:
        """Minutes to keep for ``tasks`` inference tasks of a measured ``task_seconds`` each, run
        ``slots`` at once: doubled, as ``reserve``, plus ``SUBMIT_MINUTES``.

        Args:
            task_seconds: one task's measured seconds (model and data loading included).
            tasks: the tasks still to run.
            slots: how many run at once.

        Returns:
            The minutes, 0 without a budget.
        """
        if self.total is None:
            return 0.0
        return SUBMIT_MINUTES + RESERVE_SAFETY * task_seconds * math.ceil(tasks / max(1, slots)) / 60


def smallest_budget(rounds: int) -> float:
    """The smallest budget in minutes a pipeline of ``rounds`` rounds can use: the first reserve
    plus the least search time of each round (the plan shares the budget between the rounds)."""
    first_reserve = FIXED_RESERVE_MINUTES  # FIRST_RESERVE_SHARE of so small a budget is below it
    return first_reserve + MIN_SEARCH_MINUTES * rounds


def check_budget(total: float | None, *, rounds: int) -> None:
    """Refuse a budget that the pipeline cannot use, naming the smallest that it can.

    Raises:
        ConfigError: ``total`` is not positive or is below ``smallest_budget``.
    """
    if total is None:
        return
    Budget(total)  # a non-positive number: its own message
    least = smallest_budget(rounds)
    if total < least:
        raise ConfigError(
            f"--time-budget {total:g} min is below the smallest this pipeline can use, {least:g} min "
            f"({FIXED_RESERVE_MINUTES:g} min kept for inference, ensembles and the submission, and "
            f"{MIN_SEARCH_MINUTES:g} min of search for each of its {rounds} round(s)); "
            "give at least that, or no budget"
        )
