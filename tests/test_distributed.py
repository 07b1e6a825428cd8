"""Ray Train: 1 vs 2 workers, a worker killed mid-run, nothing leaked. One local Ray (2 CPUs)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import FRONTEND, resources_released

from raysc.config import make_config
from raysc.errors import RayscError

pytestmark = pytest.mark.slow


def _cfg(**kw):
    return make_config(
        {
            "backbone": "mobileascnet",
            "model": {"width": 0.25, "frontend": FRONTEND},
            "epochs": 3,
            "batch_size": 16,
            "lr": 3e-3,
            **kw,
        }
    )


def test_workers_sharing_a_gpu_reduce_through_gloo(tmp_path):
    from raysc.distributed import ddp_backend, make_trainer

    # NCCL refuses two ranks on one GPU, and Ray packs fractional-GPU workers onto one GPU.
    assert ddp_backend(2, 0.5) == "gloo"
    assert ddp_backend(4, 0.25) == "gloo"
    assert ddp_backend(2, 1.0) == "nccl"
    assert ddp_backend(1, 0.25) == "nccl"  # one rank: nothing to share
    assert ddp_backend(2, 0.0) == "gloo"
    trainer = make_trainer(
        _cfg(),
        tmp_path,
        tmp_path,
        name="backend",
        storage_path=str(tmp_path),
        workers=2,
        gpus_per_worker=0.5,
        cpus_per_worker=1,
        max_failures=0,
    )
    assert trainer.backend_config.backend == "gloo"


def test_one_and_two_workers_reach_the_same_metrics(local_ray, prepared, tmp_path):
    from raysc.distributed import train

    one = train(_cfg(), prepared.out, tmp_path / "one", workers=1)
    two = train(_cfg(), prepared.out, tmp_path / "two", workers=2)
    # Same global batches (the sampler's design); what differs is BatchNorm statistics over
    # 8 instead of 16 clips and float summation order. Stated tolerance: 0.15 macro accuracy
    # on this ~13-clip validation fold (two clips), 10 % relative on every epoch's log loss.
    assert abs(one["best"]["macro_accuracy"] - two["best"]["macro_accuracy"]) <= 0.15
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["train_clips"] == b["train_clips"]
        assert abs(a["log_loss"] - b["log_loss"]) <= 0.10 * a["log_loss"]
    # Validation covers the whole fold, not rank 0's shard.
    val = prepared.manifest.query("subset == 'labelled' and fold == 0")
    assert two["best"]["clips"] == len(val)
    assert resources_released()


# `raysc pretrain` runs through the same `train` (train_on: pretrain); its resume from a
# checkpoint is tested without Ray in tests/test_train.py.
def test_a_killed_worker_is_replaced_and_resumes_from_its_checkpoint(local_ray, prepared, tmp_path):
    from ray.util.state import list_actors

    from raysc.distributed import train

    out = tmp_path / "run"
    killed = []
    address = local_ray.get_runtime_context().gcs_address  # the State API must not guess among several Rays
    # Workers of earlier runs can still be listed ALIVE while they exit (seen once in a full run:
    # the watcher froze and killed one of those, and this run was never interrupted): only this
    # run's workers count.
    earlier = {a.actor_id for a in list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")])}

    def kill_after_first_checkpoint():
        # Synchronised with training, not timed against it: the worker is frozen (SIGSTOP) as
        # soon as it exists, which is before it trains (it still has to set up torch and load the
        # data), then let run in 50 ms steps until a checkpoint after epoch 1 is in storage, and
        # killed while frozen, so it can never have finished its 12 epochs first.
        deadline = time.time() + 300
        pid = None
        while time.time() < deadline and pid is None:
            actors = list_actors(
                address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
            )
            actors = [a for a in actors if a.actor_id not in earlier]
            pid = actors[0].pid if actors else None
            time.sleep(0.05)
        if pid is None:
            return
        os.kill(pid, signal.SIGSTOP)
        try:
            while time.time() < deadline and len(list((out / "ray").glob("train-run/checkpoint_*"))) < 2:
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.05)
                os.kill(pid, signal.SIGSTOP)
                time.sleep(0.05)  # a checkpoint being written finishes its rename
        finally:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    cfg = _cfg(epochs=12, model={"width": 0.5, "frontend": FRONTEND})
    metrics = train(cfg, prepared.out, out, workers=1, max_failures=1)
    watcher.join(timeout=5)
    assert killed, "no worker was killed"
    assert metrics["resumed_at_epochs"] and 2 <= metrics["resumed_at_epochs"][0] <= 12
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 13))
    assert json.loads((out / "metrics.json").read_text())["best"]["macro_accuracy"] == metrics["best"]["macro_accuracy"]
    assert resources_released()


def test_failures_beyond_the_limit_are_an_error(local_ray, prepared, tmp_path):
    from raysc.distributed import train

    with pytest.raises(RayscError, match=r"training failed after 0 restart\(s\): .*missing\.csv") as caught:
        train(
            _cfg(pseudo_labels=str(tmp_path / "missing.csv")), prepared.out, tmp_path / "bad", workers=1, max_failures=0
        )
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)  # one line: the worker's reason
    assert resources_released()


def test_ray_workers_start_with_one_malloc_arena_and_large_blocks_kept(local_ray, monkeypatch):
    from raysc.distributed import worker_env
    from raysc.malloc import MALLOC_ENV

    def start_environment() -> dict[str, str]:
        """The environment the worker was started with (glibc reads its malloc settings then)."""
        with open("/proc/self/environ", "rb") as f:
            return dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if b"=" in item)

    env = local_ray.get(local_ray.remote(start_environment).remote())
    for key, value in MALLOC_ENV.items():
        assert env[key] == value
    # A user's own setting wins over raysc's.
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert worker_env()["MALLOC_ARENA_MAX"] == "4" and worker_env()["MALLOC_TRIM_THRESHOLD_"] == str(1 << 30)


def test_a_local_ray_polls_for_its_dashboard_rarely(local_ray, monkeypatch):
    from raysc.distributed import QUIET_ENV, local_ray_env

    # The daemons of this session's Ray name its GCS address on their command lines.
    gcs = local_ray.get_runtime_context().gcs_address
    daemons = {}
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if gcs in cmd and ("dashboard/agent.py" in cmd or "dashboard/dashboard.py" in cmd):
            daemons[cmd] = dict(item.decode().split("=", 1) for item in env.split(b"\0") if b"=" in item)
    assert len(daemons) >= 2, f"no dashboard daemons found for {gcs}"
    for env in daemons.values():
        for key, value in QUIET_ENV.items():
            assert env[key] == value
    # A user's own setting wins over raysc's.
    monkeypatch.setenv("REPORTER_UPDATE_INTERVAL_MS", "1000")
    assert local_ray_env()["REPORTER_UPDATE_INTERVAL_MS"] == "1000"
    assert local_ray_env()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"


_RESOURCES = (
    "import json, sys, ray\n"
    "from raysc.distributed import init_ray\n"
    "for address in sys.argv[1:]:\n"
    "    init_ray(address or None)\n"
    "    print(json.dumps(ray.cluster_resources()))\n"
    "    ray.shutdown()\n"
)


def _resources_seen(*addresses: str) -> list[dict]:
    """The cluster resources one fresh raysc process sees after ``init_ray(address or None)``,
    for each address in turn."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", _RESOURCES, *addresses], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-len(addresses) :]]


def test_a_ray_started_on_the_machine_is_joined_only_when_asked(tmp_path):
    import shutil
    import subprocess

    from raysc.distributed import DRIVER_RESOURCE, free_port

    # A workstation's own Ray, as `ray start --head` leaves it (and its address file in /tmp/ray,
    # which stays behind, stale, when that Ray dies: the same code path ignores it).
    port = free_port()
    head = [shutil.which("ray"), "start", "--head", "--block", "--num-cpus", "1", "--port", str(port)]
    head += ["--include-dashboard=false", "--disable-usage-stats"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = subprocess.Popen(
        head, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        current = Path("/tmp/ray/ray_current_cluster")
        while not (current.is_file() and current.read_text().strip().endswith(f":{port}")):
            assert time.time() < deadline and started.poll() is None, "ray start --head did not come up"
            time.sleep(0.5)
        # --address auto: the running one, as it is (1 CPU, no resources added by raysc); then no
        # address: raysc's own private Ray (its driver slots, every CPU), not the running one.
        joined, own = _resources_seen("auto", "")
        assert joined["CPU"] == 1 and DRIVER_RESOURCE not in joined
        assert own.get(DRIVER_RESOURCE) and own["CPU"] == os.cpu_count()
    finally:
        # Every process `ray start` began is in its session: gone at once (SIGTERM takes 30 s).
        os.killpg(started.pid, signal.SIGKILL)
        started.wait(timeout=60)
