"""Run a search on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``); used by
test_multinode.py in a subprocess so that its Ray is separate from the tests' local one.

    python tests/multinode.py SPACE DATA EXPERIMENT

The head has no CPU and the ``raysc_driver`` resource (as in cluster.yaml); two worker nodes
have one CPU each. The search runs as ``raysc search --address`` in a child process; the worker
node of one running trial is removed once that trial has checkpoints.
Prints one JSON line: the worker nodes, the node(s) each trial started on, the
removed node.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from ray.cluster_utils import Cluster

from raysc.distributed import DRIVER_RESOURCE, RAY_ENV, free_port


def started_on(exp: Path) -> dict[str, list[str]]:
    """trial id -> the nodes it started on, in order (from train.log: an in-process trial's
    process or a Ray Train run's rank-0 worker)."""
    out = {}
    for log in exp.glob("round-0/trials/*/train.log"):
        out[log.parent.name] = re.findall(
            r"(?:worker 0 of \d+|trial runs in process \d+) on node (\w+)", log.read_text()
        )
    return out


def checkpointed_epochs(run: Path) -> int:
    """Epochs saved in a trial's run folder: Ray Train keeps one checkpoint_* per epoch reported
    (the best two and the latest), an in-process trial its latest epoch-NNNN."""
    own = [int(p.name.split("-")[1]) for p in run.glob("epoch-*") if p.name.split("-")[1].isdigit()]
    return max([*own, len(list(run.glob("checkpoint_*")))])


def main(space: str, data: str, experiment: str) -> int:
    head = {"num_cpus": 0, "resources": {DRIVER_RESOURCE: 100}, "dashboard_port": free_port(8265), "env_vars": RAY_ENV}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    nodes = [cluster.add_node(num_cpus=1, env_vars=RAY_ENV) for _ in range(2)]
    cluster.wait_for_nodes()
    ids = [n.node_id for n in nodes]
    exp = Path(experiment)
    cmd = [
        sys.executable,
        "-m",
        "raysc.cli",
        "search",
        space,
        "--data",
        data,
        "--experiment",
        experiment,
        "--trials",
        "2",
        "--address",
        cluster.address,
    ]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    removed, deadline = None, time.time() + 300
    while removed is None and time.time() < deadline and driver.poll() is None:
        for trial, where in started_on(exp).items():
            saved = checkpointed_epochs(exp / "round-0" / "train" / f"train-{trial}")
            epochs = re.findall(r"epoch (\d+)/(\d+)", (exp / "round-0" / "trials" / trial / "train.log").read_text())
            running = epochs and int(epochs[-1][0]) <= int(epochs[-1][1]) - 3  # well before its end
            if where and saved >= 2 and running and where[-1] in ids:
                removed = where[-1]
                cluster.remove_node(nodes[ids.index(removed)])
                break
        time.sleep(0.2)
    output, _ = driver.communicate(timeout=600)
    print(
        json.dumps(
            {
                "rc": driver.returncode,
                "output": output[-4000:],
                "workers": ids,
                "removed": removed,
                "started_on": started_on(exp),
            }
        )
    )
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
