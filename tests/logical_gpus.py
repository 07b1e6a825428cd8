"""Run a pipeline on a simulated cluster whose GPUs are logical (``ray.cluster_utils.Cluster``);
used by test_gpu_recipe.py in a subprocess, so that its Ray is separate from the tests' own.

    python tests/logical_gpus.py PIPELINE DATA EXPERIMENT MINUTES

The head has no CPU and the ``raysc_driver`` resource (as in cluster.yaml); one worker node has
8 CPUs and 2 GPUs, like half a 4-GPU node. The pipeline runs as ``raysc pipeline --address`` in
a child process. Prints one JSON line: its exit code and output, and whether every CPU and GPU
was free again afterwards (no placement group left behind).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import ray
from ray.cluster_utils import Cluster

from raysc.distributed import DRIVER_RESOURCE, RAY_ENV, free_port


def main(pipeline: str, data: str, experiment: str, minutes: str) -> int:
    head = {"num_cpus": 0, "resources": {DRIVER_RESOURCE: 100}, "dashboard_port": free_port(8265), "env_vars": RAY_ENV}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.add_node(num_cpus=8, num_gpus=2, env_vars=RAY_ENV)
    cluster.wait_for_nodes()
    cmd = [sys.executable, "-m", "raysc.cli", "pipeline", pipeline, "--data", data, "--experiment", experiment]
    cmd += ["--time-budget", minutes, "--address", cluster.address]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    ray.init(address=cluster.address)
    released, deadline = False, time.time() + 60
    while not released and time.time() < deadline:
        free, total = ray.available_resources(), ray.cluster_resources()
        released = all(free.get(k, 0) == total.get(k, 0) for k in ("CPU", "GPU"))
        time.sleep(0.5)
    ray.shutdown()
    cluster.shutdown()
    output = done.stdout + done.stderr
    print(json.dumps({"rc": done.returncode, "output": output[-20000:], "released": released}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
