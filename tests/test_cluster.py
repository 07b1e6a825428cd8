"""cluster.yaml: valid for Ray's own cluster launcher, and installing what pyproject.toml pins."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from raysc.distributed import DRIVER_RESOURCE

ROOT = Path(__file__).resolve().parent.parent


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _pins() -> dict[str, Requirement]:
    # (tomllib is 3.11+; raysc supports 3.10) the [project] dependencies list, one string per line
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    deps = re.findall(r'"([^"]+)"', block)
    return {r.name: r for r in map(Requirement, deps)}


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_cluster()))  # raises on unknown keys, missing resources, bad types


def test_cluster_installs_what_pyproject_pins():
    cluster, pins = _cluster(), _pins()
    ray_version = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)-", cluster["docker"]["image"]).group(1)
    assert pins["ray"].specifier.contains(Version(ray_version)), (ray_version, pins["ray"])
    setup = " ".join(cluster["setup_commands"])
    installed = {Requirement(m).name: Requirement(m) for m in re.findall(r'"((?:torch|torchaudio)[^"]*)"', setup)}
    for name in ("torch", "torchaudio"):
        assert installed[name].specifier == pins[name].specifier, (name, installed[name], pins[name])
    # The checkout `ray up` runs in is copied to every node and installed from there, not a placeholder.
    assert cluster["file_mounts"] == {"~/raysc": "."} and "pip install ~/raysc" in cluster["setup_commands"]
    assert "CHANGE" not in setup and ".venv" in cluster["rsync_exclude"]


def test_cluster_shape_drivers_on_the_head_gpus_on_workers_shared_storage():
    cluster = _cluster()
    nodes = cluster["available_node_types"]
    head = nodes[cluster["head_node_type"]]
    assert head["resources"].get(DRIVER_RESOURCE, 0) >= 100 and head["resources"]["CPU"] == 0
    workers = {k: v for k, v in nodes.items() if k != cluster["head_node_type"]}
    assert len(workers) >= 2 and all(v["min_workers"] == 0 for v in workers.values())  # autoscaling from zero
    assert all(DRIVER_RESOURCE not in v["resources"] for v in workers.values())
    assert cluster["idle_timeout_minutes"] > 0
    # Shared storage with nothing to fill in: the head exports /mnt/shared, every worker mounts it
    # from the address Ray gives it (RAY_HEAD_IP is set for workers' commands only).
    init = " ".join(cluster["initialization_commands"])
    assert 'if [ -z "$RAY_HEAD_IP" ]' in init and "exportfs" in init and '"$RAY_HEAD_IP":/mnt/shared' in init
    assert "-v /mnt/shared:/mnt/shared" in cluster["docker"]["run_options"]
    assert "CHANGE" not in (ROOT / "cluster.yaml").read_text()
