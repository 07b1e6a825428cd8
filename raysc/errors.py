"""Errors raised to users. Each one names the file, row and value at fault."""

from __future__ import annotations

from collections.abc import Sequence

# How many problems an error message lists before it only counts the rest.
MAX_LISTED = 20


class RayscError(Exception):
    """Base class for errors the CLI reports as a message (exit code 2), not a traceback."""


class DataError(RayscError):
    """One or more problems found in input data; all of them are collected before raising."""

    def __init__(self, problems: Sequence[str], *, what: str = "input data") -> None:
        self.problems = list(problems)
        shown = self.problems[:MAX_LISTED]
        lines = [f"{len(self.problems)} problem(s) in {what}:"]
        lines += [f"  - {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        super().__init__("\n".join(lines))


class ConfigError(RayscError):
    """A configuration file or option is invalid."""
