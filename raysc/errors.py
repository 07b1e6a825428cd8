"""Errors raised to users. Each one names the file, row and value at fault."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

# How many problems an error message lists before it only counts the rest.
MAX_LISTED = 20


class RayscError(Exception):
    """Base class for errors the CLI reports as a message (exit code 2), not a traceback."""


class DataError(RayscError):
    """One or more problems found in input data; all of them are collected before raising.

    The message lists the first ``MAX_LISTED`` problems and counts the rest.

    Args:
        problems: each problem, as ``file:line: what is wrong, with the value``.
        what: what the problems are in (``the inputs (nothing was written)``...).
    """

    def __init__(self, problems: Sequence[str], *, what: str = "input data") -> None:
        self.problems = list(problems)
        shown = self.problems[:MAX_LISTED]
        lines = [f"{len(self.problems)} problem(s) in {what}:"]
        lines += [f"  - {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        super().__init__("\n".join(lines))


class ConfigError(RayscError):
    """A configuration file or option is invalid; the message names the file or flag, the key
    and the valid values."""


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def root_cause(error: BaseException | str) -> str:
    """One line for a failure that Ray reports with the workers' tracebacks: raysc's own message
    when a worker raised one (a damaged checkpoint names itself and what to delete), else the
    last line of the text, without colour codes."""
    text = ANSI.sub("", str(error))
    # raysc's message, with the indented problem lines a DataError lists under it.
    ours = re.findall(r"raysc\.errors\.\w+: (.+(?:\n[ \t]+\S.*)*)", text)
    if ours:
        return " ".join(part.strip() for part in ours[-1].splitlines())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def trial_error(trial: object) -> str | None:
    """A failed Tune trial's reason in one line (from its error file), or None."""
    path = getattr(trial, "error_file", None)
    return root_cause(Path(path).read_text()) if path and Path(path).is_file() else None
