"""Run a pipeline as a job on Ray's fake autoscaling cluster, built from cluster.yaml's own node
types; used by test_autoscaling.py in a subprocess, so that its Ray is separate from the tests'.

    python tests/fake_cluster.py PIPELINE DATA EXPERIMENT WORKDIR

The head is started as cluster.yaml starts it (``ray start --head --autoscaling-config``, no CPU,
the ``raysc_driver`` resource) under ``RAY_FAKE_CLUSTER=1``, whose provider runs the real
autoscaler and starts each node it launches as local Ray processes with its node type's
resources (GPUs as logical resources). The pipeline is submitted with ``ray job submit``, as
docs/guides/cluster.md tells a user. Once a trial has checkpoints, the worker node it runs on is removed (every
process of that node killed, as when a cloud takes a spot instance back).

Prints one JSON line: the job's status and logs, the worker nodes launched (id -> node type),
the node removed, and the node(s) each trial ran on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

from raysc.distributed import DRIVER_RESOURCE, RAY_ENV, free_port

ROOT = Path(__file__).resolve().parent.parent
# What Ray's AWS provider detects on cluster.yaml's instance types (their `resources: {}`).
INSTANCE_RESOURCES = {"g5.2xlarge": {"CPU": 8, "GPU": 1}, "g5.12xlarge": {"CPU": 48, "GPU": 4}}
# The fake nodes share this machine's cores and memory: three at most.
MAX_WORKERS = 3
# Every process of the fake cluster inherits this variable, so the run can stop exactly its own.
MARK = "RAYSC_FAKE_CLUSTER_RUN"


def fake_config(cluster: dict, gcs_address: str) -> dict:
    """cluster.yaml turned into a config for the fake multi-node provider: the same node types
    with the resources their instance types have, the same head and autoscaling settings."""
    head_type = cluster["head_node_type"]
    # The fake provider registers the node `ray start --head` started under its own type name.
    head = cluster["available_node_types"][head_type]
    types = {FAKE_HEAD_NODE_TYPE: {"resources": head["resources"], "node_config": {}, "max_workers": 0}}
    for name, spec in cluster["available_node_types"].items():
        if name == head_type:
            continue
        resources = {**INSTANCE_RESOURCES[spec["node_config"]["InstanceType"]], **spec["resources"]}
        limits = {"min_workers": spec["min_workers"], "max_workers": min(spec["max_workers"], MAX_WORKERS)}
        types[name] = {"resources": resources, "node_config": {}, **limits}
    return {
        "cluster_name": "raysc-fake",
        "max_workers": min(cluster["max_workers"], MAX_WORKERS),
        "upscaling_speed": cluster["upscaling_speed"],
        "idle_timeout_minutes": cluster["idle_timeout_minutes"],
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        **{k: [] for k in ("head_setup_commands", "setup_commands", "worker_setup_commands")},
        **{k: [] for k in ("head_start_ray_commands", "worker_start_ray_commands", "initialization_commands")},
        **{k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = (Path("/proc") / str(pid) / "environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def own_processes(mark: str) -> dict[int, dict[str, str]]:
    """This run's processes (pid -> environment): they carry its mark."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != os.getpid()]
    return {pid: env for pid in pids if (env := _environ(pid)).get(MARK) == mark}


def worker_nodes(mark: str) -> dict[str, str]:
    """Worker node id -> node type, from the environment the fake provider starts a node with."""
    return {
        env["RAY_OVERRIDE_NODE_ID_FOR_TESTING"]: env["RAY_NODE_TYPE_NAME"]
        for env in own_processes(mark).values()
        if "RAY_OVERRIDE_NODE_ID_FOR_TESTING" in env and "RAY_NODE_TYPE_NAME" in env  # the raylet has both
    }


def kill(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, signal.SIGKILL)


def kill_node(mark: str, node: str) -> None:
    """Every process of one worker node: its raylet, agents and workers."""
    own = own_processes(mark)
    kill(pid for pid, env in own.items() if env.get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node)


def ran_on(exp: Path) -> dict[str, list[str]]:
    """trial id -> the nodes it ran on, in order (from its train.log)."""
    out = {}
    for log in exp.glob("round-0/trials/*/train.log"):
        out[log.parent.name] = re.findall(
            r"(?:worker 0 of \d+|trial runs in process \d+) on node (\w+)", log.read_text()
        )
    return out


def checkpointed_epochs(exp: Path, trial: str) -> int:
    run = exp / "round-0" / "train" / f"train-{trial}"
    own = [int(p.name.split("-")[1]) for p in run.glob("epoch-*") if p.name.split("-")[1].isdigit()]
    return max([*own, len(list(run.glob("checkpoint_*")))])


def busy_node(exp: Path, live: dict[str, str]) -> str | None:
    """The worker node of a trial that has saved two epochs and has at least two to go."""
    for trial, nodes in ran_on(exp).items():
        epochs = re.findall(r"epoch (\d+)/(\d+)", (exp / "round-0" / "trials" / trial / "train.log").read_text())
        running = epochs and int(epochs[-1][0]) <= int(epochs[-1][1]) - 2
        if nodes and nodes[-1] in live and running and checkpointed_epochs(exp, trial) >= 2:
            return nodes[-1]
    return None


def job_client(address: str) -> Any:
    """Ray's job client, once the head's job server answers (`ray start` returns before)."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 60
    while True:
        try:
            return JobSubmissionClient(address)
        except ConnectionError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def submit(address: str, entrypoint: list[str], env: dict[str, str]) -> str:
    """``ray job submit --no-wait`` as a user runs it; the job's id."""
    cmd = ["ray", "job", "submit", "--address", address, "--no-wait", "--", *entrypoint]
    for _ in range(60):  # the head's job agent starts a few seconds after its job server
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if "No available agent" not in done.stderr:
            break
        time.sleep(1)
    if done.returncode:
        raise RuntimeError(f"ray job submit failed: {done.stdout}{done.stderr}")
    return re.search(r"raysubmit_\w+", done.stdout).group(0)


def released(address: str) -> bool:
    """Every CPU and GPU of the live nodes free and no placement group alive, once the job ended
    (``conftest.resources_released``, from this process's connection to the cluster)."""
    import ray
    from conftest import resources_released  # this script's folder is on sys.path

    ray.init(address=address, log_to_driver=False)
    try:
        return resources_released(timeout=60)
    finally:
        ray.shutdown()


def main(pipeline: str, data: str, experiment: str, workdir: str) -> int:
    from ray.job_submission import JobStatus

    work, mark, exp = Path(workdir), uuid.uuid4().hex, Path(experiment)
    gcs, dashboard = free_port(), free_port(8265)
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = work / "fake-cluster.yaml"
    config.write_text(yaml.safe_dump(fake_config(cluster, f"127.0.0.1:{gcs}")))
    # `ray` and `raysc` from this environment, also for the job's driver on the head.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, **RAY_ENV, "RAY_FAKE_CLUSTER": "1", MARK: mark, "PATH": path}
    env["AUTOSCALER_UPDATE_INTERVAL_S"] = "1"  # the autoscaler looks every second, not every 5
    # Ray 2.60 turns token authentication on for clusters started on one machine only; a `ray up`
    # cluster of this version has it off, and so has this simulation of one.
    env["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"] = "disabled"
    head = cluster["available_node_types"][cluster["head_node_type"]]["resources"]
    start = ["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs)]
    start += ["--dashboard-port", str(dashboard), "--autoscaling-config", str(config)]
    # Ports of their own: the tests' local Ray holds the default ones.
    for option in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port"):
        start += [option, str(free_port())]
    start += ["--runtime-env-agent-port", str(free_port()), "--ray-client-server-port", str(free_port())]
    start += ["--num-cpus", str(head["CPU"]), "--num-gpus", "0", "--resources", json.dumps({DRIVER_RESOURCE: 1000})]
    started, launched, removed = time.time(), {}, None
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, text=True, timeout=120)
        client = job_client(f"http://127.0.0.1:{dashboard}")
        # As docs/guides/cluster.md shows it: the job runs `raysc pipeline` on the head, which joins the cluster.
        entrypoint = ["raysc", "pipeline", pipeline, "--data", data, "--experiment", experiment]
        # With a budget, so that the plan measures the backbones in a task holding one trial's
        # resources: a GPU, on a node the autoscaler launches for it.
        entrypoint += ["--max-concurrent", "2", "--time-budget", "10"]
        job = submit(f"http://127.0.0.1:{dashboard}", entrypoint, env)
        ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        deadline = time.time() + 600
        while client.get_job_status(job) not in ended and time.time() < deadline:
            live = worker_nodes(mark)
            launched |= live
            if removed is None and (removed := busy_node(exp, live)):
                kill_node(mark, removed)
            time.sleep(0.2)
        result = {
            "status": str(client.get_job_status(job)),
            "logs": client.get_job_logs(job)[-20000:],
            "launched": launched,
            "types": fake_config(cluster, "")["available_node_types"],
            "removed": removed,
            "ran_on": ran_on(exp),
            "seconds": round(time.time() - started),
            "released": released(f"127.0.0.1:{gcs}"),
        }
    finally:
        while own := own_processes(mark):  # a daemon may start another process while they are killed
            kill(own)
            time.sleep(0.2)
        # `ray start --head` left its address for `--address auto`; `ray stop` would remove it.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{gcs}"):
            current.unlink()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
