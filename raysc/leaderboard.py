"""The leaderboard: every trial of every round and every ensemble, ranked by validation score
(macro accuracy mixed with the city-held-out score, ``metrics.objective``); as CSV, Markdown or a
self-contained sortable HTML page."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from .errors import ConfigError, RayscError
from .experiment import OUT_OF_FOLD, RECORD_METRICS, Experiment

FORMATS = ("csv", "md", "html")
COLUMNS = [
    "rank",
    "name",
    "kind",
    "round",
    "backbone",
    "params",
    *RECORD_METRICS,
    "parameters",
    "macs",
    "fit_seconds",
    "predict_seconds",
    "status",
]


def _short_params(params: dict) -> str:
    """Sampled values without the backbone, names without the backbone prefix, 3 digits."""
    parts = []
    for k, v in sorted(params.items()):
        if k == "backbone":
            continue
        name = k.split("/", 1)[-1]
        parts.append(f"{name}={v:.3g}" if isinstance(v, float) else f"{name}={v}")
    return " ".join(parts)


def leaderboard(experiment: str | Path, *, round: int | None = None) -> pd.DataFrame:
    """One row per trial (failed ones last) and per ensemble, best validation score first.

    Args:
        experiment: an experiment folder.
        round: only the trials of that round and the ensembles whose members all come from it
            (None: everything).

    Returns:
        One row a trial or ensemble: its name, kind, round, backbone, parameters, validation
        metrics, size and cost.

    Raises:
        RayscError: no experiment folder.
    """
    exp = Experiment.existing(experiment)
    every = exp.records()
    records = [r for r in every if round is None or r.round == round]
    by_id = {r.trial_id: r for r in every}
    rows = [
        {
            "name": r.trial_id,
            "kind": "trial",
            "round": r.round,
            "backbone": r.backbone,
            "params": _short_params(r.params),
            **{k: r.metrics.get(k) for k in RECORD_METRICS},
            "parameters": r.parameters,
            "macs": r.macs,
            "fit_seconds": r.fit_seconds,
            "predict_seconds": r.predict_seconds,
            "status": r.status,
        }
        for r in records
    ]
    for e in exp.ensembles():
        rounds = sorted({m.round for m in e.members})
        if round is not None and rounds != [round]:
            continue
        members = [by_id[m.trial_id] for m in e.members if m.trial_id in by_id]
        trials = len({m.trial_id for m in e.members})
        size = (
            f"{trials} configurations x {len(e.members) // trials} folds"
            if e.fold == OUT_OF_FOLD
            else f"{trials} members"
        )
        rows.append(
            {
                "name": e.name,
                "kind": "ensemble",
                "round": "+".join(map(str, rounds)),
                "backbone": "+".join(sorted({m.backbone for m in e.members})),
                "params": f"{e.method}, {size}, T={e.temperature:.3g}"
                + (", session smoothing" if e.session_smoothing else "")
                + (", out of fold on every labelled clip" if e.fold == OUT_OF_FOLD else ""),
                **{k: e.metrics.get(k) for k in RECORD_METRICS},
                "parameters": sum(m.parameters or 0 for m in members),
                "macs": sum(m.macs or 0 for m in members),
                "fit_seconds": sum(m.fit_seconds for m in members),
                "predict_seconds": sum(m.predict_seconds or 0 for m in members),
                "status": "ensemble",
            }
        )
    if not rows:
        raise RayscError(f"{exp.root}: nothing to rank yet" + (f" in round {round}" if round is not None else ""))
    table = pd.DataFrame(rows)
    table["_failed"] = table["status"] == "failed"
    table["score"] = table["score"].fillna(table["macro_accuracy"])  # runs from before the score existed
    table = table.sort_values(["_failed", "score", "name"], ascending=[True, False, True], na_position="last")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.drop(columns="_failed")[COLUMNS].reset_index(drop=True)


def _fmt(v: object, col: str) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return ""
    if col in ("parameters", "macs"):
        return f"{int(v):,}"
    if col.endswith("seconds"):
        return f"{float(v):.1f}" if col == "fit_seconds" else f"{float(v):.3f}"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _sort_key(v: object) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "null"
    return json.dumps(v if isinstance(v, int | float) else str(v))


def render(table: pd.DataFrame, fmt: str, *, title: str = "raysc leaderboard") -> str:
    """The leaderboard as text.

    Args:
        table: a ``leaderboard`` table.
        fmt: ``csv``, ``md`` (a Markdown table) or ``html`` (a self-contained page; click a
            header to sort).
        title: the html page's title.

    Returns:
        The text.

    Raises:
        ConfigError: an unknown format.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} (valid: {', '.join(FORMATS)})")
    if fmt == "csv":
        return table.to_csv(index=False)
    cells = [[_fmt(v, c) for c, v in zip(table.columns, row, strict=True)] for row in table.itertuples(index=False)]
    if fmt == "md":
        lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
        return "\n".join(lines) + "\n"
    head = "".join(f"<th onclick='sortBy({i})'>{html.escape(c)}</th>" for i, c in enumerate(table.columns))
    body = "".join(
        "<tr>"
        + "".join(
            f"<td data-v='{html.escape(_sort_key(raw))}'>{html.escape(c)}</td>"
            for c, raw in zip(row, raws, strict=True)
        )
        + "</tr>"
        for row, raws in zip(cells, table.itertuples(index=False), strict=True)
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}}table{{border-collapse:collapse;font-size:13px}}
th,td{{border:1px solid #ccc;padding:3px 6px;text-align:right}}th{{cursor:pointer;background:#eee}}
td:nth-child(2),td:nth-child(3),td:nth-child(5),td:nth-child(6){{text-align:left}}</style></head>
<body><h2>{html.escape(title)}</h2><p>Validation metrics; click a column header to sort.</p>
<table id="t"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<script>
let dir = {{}};
function sortBy(i) {{
  const tb = document.querySelector('#t tbody');
  const rows = Array.from(tb.rows);
  dir[i] = -(dir[i] || -1);
  const val = r => {{ const v = JSON.parse(r.cells[i].dataset.v); return v === null || v === "" ? null : v; }};
  rows.sort((a, b) => {{
    const x = val(a), y = val(b);
    if (x === null) return 1; if (y === null) return -1;
    return (x > y ? 1 : x < y ? -1 : 0) * dir[i];
  }});
  rows.forEach(r => tb.appendChild(r));
}}
</script></body></html>
"""
