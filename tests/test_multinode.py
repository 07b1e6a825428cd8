"""A search on a simulated two-worker-node cluster: its trials spread over the nodes, and a node
removed mid-search has its trial restarted from checkpoints on the surviving node (one cluster
run checks both, to keep CI short)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FRONTEND, write_space

from raysc.experiment import Experiment

pytestmark = pytest.mark.slow


def _run(space: Path, data: Path, exp: Path) -> dict:
    script = Path(__file__).with_name("multinode.py")
    done = subprocess.run(
        [sys.executable, str(script), str(space), str(data), str(exp)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, result["output"]
    return result


def test_trials_spread_over_nodes_and_a_removed_node_restarts_its_trial_on_the_survivor(learnable, tmp_path):
    # Epochs of a few seconds (more clips, small batches), so the node goes while its trial trains.
    space = write_space(
        tmp_path / "s.yaml",
        scheduler={"grace_steps": 10_000, "reduction_factor": 2, "max_epochs": 6},
        fixed={"model.width": 0.5, "model.frontend": FRONTEND, "batch_size": 8},
    )
    exp = tmp_path / "exp"
    result = _run(space, learnable, exp)
    # Both trials ran at once, one per worker node, none on the CPU-less head.
    assert {where[0] for where in result["started_on"].values()} == set(result["workers"])
    assert result["removed"] in result["workers"]
    survivor = next(w for w in result["workers"] if w != result["removed"])
    moved = [t for t, where in result["started_on"].items() if where[0] == result["removed"]]
    assert len(moved) == 1 and result["started_on"][moved[0]][-1] == survivor
    records = Experiment(exp).records()
    assert len(records) == 2 and all(r.status == "completed" and r.epochs == 6 for r in records)
    metrics = json.loads((exp / "round-0" / "trials" / moved[0] / "metrics.json").read_text())
    assert metrics["resumed_at_epochs"] and metrics["resumed_at_epochs"][0] >= 2
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 7))  # nothing lost or repeated
    assert sorted(p.name for p in (exp / "round-0" / "trials").iterdir()) == sorted(r.trial_id for r in records)
