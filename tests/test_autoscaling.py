"""The GPU recipe as a job on an autoscaling cluster built from cluster.yaml's node types (Ray's
fake multi-node provider, GPUs logical): the autoscaler launches GPU worker nodes from zero,
the plan, the trials and the DDP refit land on them, a worker node removed mid-search has its
trial resumed from checkpoints elsewhere, and the job ends with a valid submission and every
resource free."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FRONTEND, tiny_gpu_recipe

from raysc.experiment import Experiment
from raysc.search_space import SPACES_DIR
from raysc.submission import check_submission_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _gpu_recipe_one_gpu_per_trial(tmp_path: Path) -> Path:
    """The GPU recipe with one backbone at a tiny width, a whole (logical) GPU and one CPU per
    trial, and epochs of a few seconds (small batches, no early stopping): long enough that a
    node can go while its trial trains."""
    lr = yaml.safe_load((SPACES_DIR / "gpu.yaml").read_text())["params"]["lr"]
    return tiny_gpu_recipe(
        tmp_path,
        fixed={"batch_size": 8},
        params={"lr": lr},
        backbones={"mobileascnet": {"model.width": 0.25, "model.frontend": FRONTEND}},
        resources={"workers": 1, "gpus_per_worker": 1, "cpus_per_worker": 1},
        scheduler={"grace_steps": 10_000, "reduction_factor": 2, "max_epochs": 5},
    )


def test_the_pipeline_as_a_job_on_a_fake_autoscaling_cluster_survives_a_node_removed_mid_search(learnable, tmp_path):
    pipeline, exp = _gpu_recipe_one_gpu_per_trial(tmp_path), tmp_path / "exp"
    script = Path(__file__).with_name("fake_cluster.py")
    done = subprocess.run(
        [sys.executable, str(script), str(pipeline), str(learnable), str(exp), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "SUCCEEDED", result["logs"]
    logs = result["logs"]
    # The plan measured the backbones where trials run: in a task holding one trial's resources.
    assert "measured where trials run (CPU, " in logs and "a task holding CPU 1, GPU 1)" in logs, logs
    # Logical GPUs: said once, and the work ran on CPUs.
    assert logs.count("a task holding one sees no CUDA device") == 1, logs
    types, launched = result["types"], result["launched"]
    # The autoscaler launched worker nodes of cluster.yaml's GPU types (none existed at the start).
    assert launched and all(types[t]["resources"].get("GPU", 0) >= 1 for t in launched.values()), launched
    # Every trial ran on launched GPU nodes, none on the head (it has no CPU or GPU).
    ran_on = result["ran_on"]
    assert len(ran_on) == 2 and all(nodes and set(nodes) <= set(launched) for nodes in ran_on.values()), ran_on
    # The node removed mid-search had a trial, which went on elsewhere from its checkpoints:
    # no epoch lost or repeated.
    moved = [t for t, nodes in ran_on.items() if result["removed"] in nodes]
    assert len(moved) == 1 and ran_on[moved[0]][-1] != result["removed"], (result["removed"], ran_on)
    metrics = json.loads((exp / "round-0" / "trials" / moved[0] / "metrics.json").read_text())
    assert metrics["resumed_at_epochs"] and metrics["resumed_at_epochs"][0] >= 2
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 6))
    records = Experiment(exp).records()
    assert len(records) == 2 and all(r.status == "completed" and r.epochs == 5 for r in records)
    # The refit, the recipe's large work, ran as a 2-worker DDP run; the job ended in a submission.
    (refit,) = exp.glob("refit/*/metrics.json")
    assert {h["ranks"] for h in json.loads(refit.read_text())["history"]} == {2}
    check_submission_file(exp / "submission" / "submission.csv", learnable)
    assert result["released"], "CPUs or GPUs still held after the job ended"
