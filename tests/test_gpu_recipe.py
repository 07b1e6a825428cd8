"""The GPU recipe (`raysc pipeline gpu`) on a simulated cluster with logical GPUs: its resource
arithmetic (trials per GPU, DDP workers per stage), the plan measured in a task that holds one
trial's resources, the fall-back to CPUs said in one line, and every resource released."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FRONTEND, tiny_gpu_recipe

from raysc.pipeline import BUILTIN
from raysc.search_space import SPACES_DIR
from raysc.submission import check_submission_file

pytestmark = pytest.mark.slow


def _tiny_gpu_recipe(tmp_path: Path) -> Path:
    """The GPU recipe with its resources as they are, two of its backbones at a tiny width, one
    epoch each."""
    shipped = yaml.safe_load((SPACES_DIR / "gpu.yaml").read_text())["backbones"]["stats"]
    stats = {**shipped, "model.frontend": FRONTEND, "model.codebook": 8}
    backbones = {"stats": stats, "mobileascnet": {"model.width": 0.25, "model.frontend": FRONTEND}}
    return tiny_gpu_recipe(
        tmp_path, backbones=backbones, scheduler={"grace_steps": 1, "reduction_factor": 2, "max_epochs": 1}
    )


def test_the_gpu_recipe_on_logical_gpus_runs_ddp_stages_and_releases_everything(prepared, tmp_path):
    assert BUILTIN["gpu"].ddp_workers == 2  # the shipped recipe trains its large work with DDP
    pipeline, exp = _tiny_gpu_recipe(tmp_path), tmp_path / "exp"
    script = Path(__file__).with_name("logical_gpus.py")
    done = subprocess.run(
        [sys.executable, str(script), str(pipeline), str(prepared.out), str(exp), "5"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    out = result["output"]
    assert result["rc"] == 0, out
    # The plan ran in a task holding one trial's resources: 4 CPUs and half a GPU.
    assert "measured where trials run (CPU, " in out and "a task holding CPU 4, GPU 0.5)" in out, out
    # 8 CPUs / 4 per trial = 2 trials at once (2 GPUs / 0.5 would allow 4).
    assert "2 trial(s) at once" in out
    # Logical GPUs: said once, and the work ran on CPUs.
    assert out.count("a task holding one sees no CUDA device") == 1
    # The large work ran as a 2-worker DDP run, one GPU each; the search trials as single processes.
    (refit,) = exp.glob("refit/*/metrics.json")
    assert {h["ranks"] for h in json.loads(refit.read_text())["history"]} == {2}
    trials = list(exp.glob("round-0/trials/*/metrics.json"))
    assert len(trials) == 2 and all(json.loads(t.read_text())["history"][0]["ranks"] == 1 for t in trials)
    check_submission_file(exp / "submission" / "submission.csv", prepared.out)
    assert result["released"], "CPUs or GPUs still held after the pipeline ended"
