"""Writes the docs' generated reference pages from the code they describe.

    python docs/generate.py          # rewrite docs/reference/cli.md and configuration.md
    python docs/generate.py --check  # exit 1, naming the page, when one is out of date

`tests/test_docs.py` runs the check, so a flag or a training key added without regenerating
fails the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

REFERENCE = Path(__file__).parent / "reference"


def cli_reference() -> str:
    """Every command's `--help`, as argparse prints it at a fixed width."""
    # argparse wraps to the terminal's width: fixed, so the page is the same on every machine.
    os.environ["COLUMNS"] = "100"
    from raysc.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    parts = [
        "# Command-line reference",
        "",
        "Generated from the parser by `python docs/generate.py`; the guides explain each command.",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
    ]
    for name, sub in commands.choices.items():
        parts += ["", f"## `raysc {name}`", "", f"{helps[name]}.", "", "```text", sub.format_help().rstrip(), "```"]
    return "\n".join(parts) + "\n"


def configuration_reference() -> str:
    """`TrainConfig`'s keys: type, default and the comment beside each in `raysc/config.py`."""
    from raysc.config import TrainConfig

    source = inspect.getsource(TrainConfig)
    comments = dict(re.findall(r"^    (\w+): [^#\n]*#\s*(.+)$", source, flags=re.M))
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        given = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        default = repr(given)
        kind = str(f.type).replace("|", "\\|")
        meaning = comments.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{kind}` | `{default}` | {meaning} |")
    return (
        "# Training configuration\n\n"
        "Every key of a training config (`raysc train --config`, a search space's entries, the\n"
        "`finetune:` mapping of a pipeline file), generated from `raysc.config.TrainConfig` by\n"
        "`python docs/generate.py`. `model.*` keys belong to the backbone: see\n"
        "[Backbones and trunks](../backbones.md).\n\n" + "\n".join(rows) + "\n"
    )


PAGES: dict[str, Callable[[], str]] = {"cli.md": cli_reference, "configuration.md": configuration_reference}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report out-of-date pages; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name, make in PAGES.items():
        path, text = REFERENCE / name, make()
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
    if stale:
        print(f"out of date (run python docs/generate.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
