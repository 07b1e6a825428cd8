"""`raysc train`: ``fit`` under a Ray Train ``TorchTrainer`` (Train V2), one or many workers.

Ray Train starts the workers, sets up the torch.distributed group (gloo on CPU, NCCL on GPU)
and restarts failed workers from the last reported checkpoint; ``fit`` does the rest.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig, make_config
from .datafolder import load_dataset
from .errors import RayscError, root_cause
from .feature_cache import FeatureCache
from .malloc import MALLOC_ENV
from .plan import BackbonePlan, hardware, plan_space
from .search_space import SearchSpace
from .train import build_model, fit
from .train import device as train_device

log = logging.getLogger(__name__)

# Ray Train drains each worker's report queue every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default), so every report blocks up to that long; 0.2 s cuts the overhead of short epochs.
# A worker group must start within RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default); on a
# loaded machine importing torch can take longer, and in Ray 2.60 the retry after a timeout can
# leave the failed attempt's placement group holding its CPUs (measured: the trial then waits
# forever). A longer timeout, plus a limit on controller retries (make_trainer), avoids both.
RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
}
# A local Ray's daemons poll on timers made for a dashboard someone watches (node stats every
# 5 s, metrics every 5-10 s, event files every 2 s). These longer ones cut what an idle Ray takes from
# the CPU (benchmarks/ray_idle.py; docs/results.md); every trial shares the cores with it. Only the
# local Ray raysc starts gets them, and a user's own values win.
QUIET_ENV = {
    "REPORTER_UPDATE_INTERVAL_MS": "30000",
    "NODE_STATS_UPDATE_INTERVAL_SECONDS": "60",
    "METRICS_RECORD_INTERVAL_S": "60",
    "RAY_metrics_report_interval_ms": "60000",
    "SCAN_EVENT_DIR_INTERVAL_SECONDS": "30",
    "AUTOSCALER_UPDATE_INTERVAL_S": "30",
}


def worker_env() -> dict[str, str]:
    """Environment variables for every Ray worker raysc starts work in. The malloc settings
    (raysc/malloc.py) matter most there: Ray Train and Tune run the training function in a
    thread of the worker, which with glibc's defaults gets an arena of its own."""
    return {**RAY_ENV, **{k: os.environ.get(k, v) for k, v in MALLOC_ENV.items()}}


def local_ray_env() -> dict[str, str]:
    """Environment variables for the daemons of a local Ray that raysc starts."""
    return {k: os.environ.get(k, v) for k, v in {**RAY_ENV, **QUIET_ENV}.items()}


# A custom resource for search drivers (one Tune trial = one small driver that launches a
# TorchTrainer). Trials reserve it instead of a CPU, so workers get every CPU without deadlock;
# cluster.yaml gives it to the head node only, which pins drivers there.
DRIVER_RESOURCE = "raysc_driver"
DRIVER_SLOTS = 1000


def free_port(preferred: int = 0) -> int:
    """``preferred`` if it is free, else any free port (a local Ray's GCS and dashboard ports: two
    local Rays on one machine must not share them; a Ray that loses the dashboard port runs
    without a dashboard, and then Ray Train cannot release stopped trials' placement groups)."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RayscError("no free port for the local Ray")


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail within seconds, naming the address, when nothing listens there (``ray.init`` would
    retry for minutes). Addresses without a port (``auto``, ``local``) are left to Ray."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RayscError(
            f"cannot reach a Ray cluster at {address} ({exc}); start it (`ray start --head`) or fix --address / "
            "RAY_ADDRESS"
        ) from None


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a private local Ray; no-op when connected.

    Without an address raysc always starts its own local Ray, also when another Ray runs on the
    machine (``ray start --head``) or a dead one left its address file behind: joining one by
    accident would share its resources and lose raysc's settings. ``--address auto`` joins the
    Ray that runs on this machine instead.

    A local Ray gets a GCS port chosen here, and its workers get ``RAY_ADDRESS`` pointing at it:
    Ray Train's placement-group cleaner finds its cluster through the State API, which, with no
    address, refuses to choose when several Rays run on one machine (then the placement groups
    of stopped trials leak and later trials wait forever).
    """
    import ray  # lazy, as every Ray import here: it takes seconds, and `fit` alone never needs Ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
    env = worker_env()
    if not address:
        os.environ.update(local_ray_env())  # for the local cluster's own processes
        kwargs.setdefault("resources", {DRIVER_RESOURCE: DRIVER_SLOTS})
        kwargs.setdefault("dashboard_port", free_port(8265))
        gcs_port = free_port()
        env["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{gcs_port}"
        os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)
        log.info("starting a private local Ray (to join the Ray already running on this machine: --address auto)")
    try:
        ray.init(address=address or "local", runtime_env={"env_vars": env}, **kwargs)
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)


def parallel_slots(cpus: float, gpus: float, address: str | None = None) -> int:
    """How many runs of ``cpus`` CPUs and ``gpus`` GPUs the cluster holds at once."""
    import ray  # lazy: see init_ray

    init_ray(address)
    total = ray.cluster_resources()
    fits = [total.get("CPU", 1) // cpus] + ([total.get("GPU", 0) // gpus] if gpus else [])
    return max(1, int(min(fits)))


def largest_node_cpus(address: str | None = None) -> float:
    """The most CPUs one live node of the cluster has: what one task can hold at most."""
    import ray  # lazy: see init_ray

    init_ray(address)
    return max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=0.0)


def _plan_task(
    space: SearchSpace, data_dir: str, budget_minutes: float, concurrency: int, threads: int, trials: int
) -> tuple[list[BackbonePlan], str]:
    """``plan_space`` in a Ray task that holds one trial worker's resources, and where it ran."""
    import ray  # lazy: see init_ray

    torch.set_num_threads(threads)
    data = load_dataset(data_dir)
    plans = plan_space(
        space, data, budget_minutes=budget_minutes, concurrency=concurrency, threads=threads, trials=trials
    )
    held = ray.get_runtime_context().get_assigned_resources()
    held_said = ", ".join(f"{k} {v:g}" for k, v in sorted(held.items()) if k in ("CPU", "GPU"))
    return plans, f"{hardware()}; a task holding {held_said}"


def measure_plan(
    space: SearchSpace,
    data_dir: str | Path,
    *,
    budget_minutes: float,
    trials: int,
    cpus: float,
    gpus: float,
    concurrency: int,
    address: str | None = None,
) -> tuple[list[BackbonePlan], str]:
    """The plan of ``space`` (``raysc.plan``) measured where trials run: inside a Ray task that
    holds one trial worker's ``cpus`` and ``gpus`` (on a GPU node, on its GPU; on an autoscaling
    cluster the task waits for such a node).

    Returns:
        Every backbone's plan, and where its steps were timed: the hardware (``plan.hardware``)
        and the resources the task held.
    """
    import ray  # lazy: see init_ray

    init_ray(address)
    task = ray.remote(_plan_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    threads = max(1, int(cpus))
    return ray.get(task.remote(space, str(Path(data_dir).resolve()), budget_minutes, concurrency, threads, trials))


ESTIMATE_CLIPS = 8  # clips timed to estimate a feature cache's build


def _features_task(train: dict[str, Any], data_dir: str, threads: int, max_seconds: float | None) -> dict[str, Any]:
    """The feature cache of ``train``'s network (its front end at the data's rate) in a Ray task;
    not built when the time a few clips take says it would exceed ``max_seconds``."""
    torch.set_num_threads(threads)
    data = load_dataset(data_dir)
    t0 = time.perf_counter()
    model = build_model(make_config(train), data).to(train_device())  # a trunk gets its weights, once per node
    frontend = model.cfg.frontend
    clips = len(data.store)
    if max_seconds is not None and FeatureCache.existing(data.out, data.store, frontend) is None:
        wave = torch.from_numpy(data.store.load(data.store.filenames[:ESTIMATE_CLIPS])).to(train_device())
        model.frontend.features(wave[:1])  # warm-up
        t1 = time.perf_counter()
        model.frontend.features(wave)
        estimate = (time.perf_counter() - t1) / len(wave) * clips
        if estimate > max_seconds:
            return {"clips": clips, "estimate": estimate, "path": None, "seconds": time.perf_counter() - t0}
    cache = FeatureCache.ensure(data.out, data.store, frontend)
    return {"path": str(cache.path), "clips": clips, "seconds": time.perf_counter() - t0}


def build_features(
    train: TrainConfig,
    data_dir: str | Path,
    *,
    cpus: float,
    gpus: float,
    max_seconds: float | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Build (or find) the data folder's feature cache for ``train``'s network in a Ray task holding
    ``cpus`` CPUs and ``gpus`` GPUs: a trunk's embedding of every clip, computed once before the
    trials that read it. With ``max_seconds``, a build that a few clips' time says would take
    longer is not started.

    Returns:
        The cache's path (None: not built), the clips in it, the seconds taken, and (when not
        built) the ``estimate`` of seconds it would have taken.
    """
    import ray  # lazy: see init_ray

    init_ray(address)
    task = ray.remote(_features_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)
    return ray.get(task.remote(train.to_dict(), str(Path(data_dir).resolve()), max(1, int(cpus)), max_seconds))


def _fit_task(train: dict[str, Any], data_dir: str, out_dir: str, threads: int) -> dict[str, Any]:
    """One ``fit`` in a Ray task (a single process: no Train controller, no worker group). Its
    epoch checkpoints go to a temporary folder, gone when it ends: such a run restarts from
    scratch, and kept in the run folder they were most of it, times every fold, split and
    pseudo-label round."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="raysc-fit-") as checkpoints:
        result = fit(make_config(train), data_dir, out_dir=out_dir, checkpoint_dir=checkpoints)
    return {"epochs": len(result.history)}


def fit_many(
    configs: list[TrainConfig],
    data_dir: str | Path,
    out_dirs: list[Path],
    *,
    cpus: float = 1.0,
    gpus: float = 0.0,
    address: str | None = None,
) -> list[dict[str, Any]]:
    """Train several single-process runs at once as Ray tasks (each ``cpus`` CPUs and ``gpus``
    GPU), every one writing its run folder; for short retrainings that need no checkpoints."""
    import ray  # lazy: see init_ray

    init_ray(address)
    task = ray.remote(_fit_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)
    data = str(Path(data_dir).resolve())
    refs = [task.remote(c.to_dict(), data, str(o), max(1, int(cpus))) for c, o in zip(configs, out_dirs, strict=True)]
    return ray.get(refs)


def fit_all(
    configs: list[TrainConfig],
    data_dir: str | Path,
    out_dirs: list[Path],
    *,
    workers: int = 1,
    cpus: float = 1.0,
    gpus: float = 0.0,
    address: str | None = None,
) -> None:
    """Train every config into its run folder: as single-process Ray tasks side by side
    (``fit_many``) when ``workers`` is 1, else each as a Ray Train DDP run of ``workers`` workers
    (one whole GPU each on a GPU cluster, ``cpus`` CPUs each), one run after another: the large
    retrainings (pretraining, pseudo-labelled rounds, refits) where one GPU is too slow."""
    if workers <= 1:
        fit_many(configs, data_dir, out_dirs, cpus=cpus, gpus=gpus, address=address)
        return
    for cfg, out in zip(configs, out_dirs, strict=True):
        train(
            cfg,
            data_dir,
            out,
            workers=workers,
            gpus_per_worker=1.0 if gpus else 0.0,
            cpus_per_worker=cpus,
            address=address,
        )


@contextmanager
def log_to(path: Path) -> Iterator[None]:
    """raysc's log lines (INFO and up) also go to ``path`` while inside."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("raysc")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def _train_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: ``fit`` with Ray's checkpoint and report plumbing."""
    import ray  # lazy: see init_ray
    import ray.train

    ctx = ray.train.get_context()
    logged = config.get("log_file") and ctx.get_world_rank() == 0
    with log_to(Path(config["log_file"])) if logged else nullcontext():
        # Ray Train workers start with one torch thread whatever CPUs they reserved: use them all.
        torch.set_num_threads(config["threads"])
        log.info(
            "worker %d of %d on node %s",
            ctx.get_world_rank(),
            ctx.get_world_size(),
            ray.get_runtime_context().get_node_id(),
        )
        cfg = make_config(config["train"])
        checkpoint = ray.train.get_checkpoint()

        def report(metrics: dict[str, Any], path: Path | None) -> None:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path) if path else None)

        with (
            checkpoint.as_directory() if checkpoint else nullcontext(None) as resume,
            tempfile.TemporaryDirectory() as tmp,
        ):
            fit(
                cfg,
                config["data_dir"],
                out_dir=config["out_dir"] if ctx.get_world_rank() == 0 else None,
                report=report,
                resume=resume,
                checkpoint_dir=tmp,
            )


def check_run_dir(out_dir: str | Path) -> None:
    """A run never overwrites another run's results."""
    if (Path(out_dir) / "metrics.json").exists():
        raise RayscError(f"{out_dir} already holds a finished run; choose another --out")


def train(
    cfg: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    address: str | None = None,
    max_failures: int = 1,
    keep_checkpoints: int = 2,
    storage_path: str | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` with Ray Train (``raysc train``): ``fit`` on every worker, DDP over several.

    A worker that dies is replaced and resumes from the latest checkpoint, up to
    ``max_failures`` times.

    Args:
        cfg: the training configuration.
        data_dir: a prepared data folder, at the same path on every node.
        out_dir: the run folder (``fit``'s files); must not hold another run.
        workers: Ray Train workers (DDP ranks).
        gpus_per_worker: GPUs each worker holds (0: train on CPUs).
        cpus_per_worker: CPUs each worker holds.
        address: a Ray cluster to join (None: a local Ray).
        max_failures: restarts after a worker dies.
        keep_checkpoints: the best checkpoints by validation score kept, plus the latest.
        storage_path: where checkpoints go (default ``out_dir/ray``; shared storage on a
            cluster).

    Returns:
        ``out_dir/metrics.json``: the best epoch and the history.

    Raises:
        RayscError: an unreachable cluster, a run folder in use, or training that failed after
            its restarts (its root cause named).
    """
    import ray.train  # lazy: see init_ray

    out_dir = Path(out_dir).resolve()
    check_run_dir(out_dir)
    init_ray(address)  # an unreachable address fails here, before --out exists
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(
        cfg,
        data_dir,
        out_dir,
        name=f"train-{out_dir.name}",
        storage_path=storage_path or str(out_dir / "ray"),
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        max_failures=max_failures,
        keep_checkpoints=keep_checkpoints,
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise RayscError(f"training failed after {max_failures} restart(s): {root_cause(exc)}") from None
    if result.error:
        raise RayscError(f"training failed: {root_cause(result.error)}")
    metrics_path = out_dir / "metrics.json"
    if not metrics_path.is_file():
        raise RayscError(f"training finished but wrote no {metrics_path}")
    return json.loads(metrics_path.read_text())


def ddp_backend(workers: int, gpus_per_worker: float, *, cuda: bool = True) -> str:
    """The torch.distributed backend for ``workers`` workers of ``gpus_per_worker`` GPUs each.

    NCCL needs a GPU of its own per rank ("Duplicate GPU detected" otherwise), and Ray packs
    workers of fractional GPUs onto the same GPU, so those use gloo, which reduces CUDA tensors
    through host memory: slower, but only small models are given fractional GPUs. Workers whose
    GPUs are logical (``cuda`` False: a simulated cluster) train on CPUs, with gloo.
    """
    shares_a_gpu = workers > 1 and gpus_per_worker < 1
    return "gloo" if gpus_per_worker <= 0 or shares_a_gpu or not cuda else "nccl"


def _sees_cuda() -> bool:
    return torch.cuda.is_available()


_CUDA_SEEN: dict[float, bool] = {}  # GPUs a task held -> whether it saw CUDA, once per process


def cuda_where_gpus_are(gpus: float, address: str | None = None) -> bool:
    """Whether a Ray task holding ``gpus`` GPUs sees a CUDA device. False where the cluster's GPUs
    are logical (a simulated cluster): the work then runs on CPUs, and this says so once."""
    import ray  # lazy: see init_ray

    if gpus not in _CUDA_SEEN:
        init_ray(address)
        _CUDA_SEEN[gpus] = ray.get(ray.remote(_sees_cuda).options(num_cpus=0, num_gpus=gpus).remote())
        if not _CUDA_SEEN[gpus]:
            log.warning("the cluster's GPUs are logical here (a task holding one sees no CUDA): training on CPUs")
    return _CUDA_SEEN[gpus]


def make_trainer(
    cfg: TrainConfig,
    data_dir: str | Path,
    out_dir: Path,
    *,
    name: str,
    storage_path: str,
    workers: int,
    gpus_per_worker: float,
    cpus_per_worker: float,
    max_failures: int,
    keep_checkpoints: int = 2,
    callbacks: list[Any] | None = None,
    log_file: Path | None = None,
) -> Any:
    """The ``TorchTrainer`` that runs ``fit`` for ``cfg``; ``name`` must be stable so that a
    restarted run finds its own checkpoints under ``storage_path``."""
    import ray.train  # lazy: see init_ray
    from ray.train.torch import TorchConfig, TorchTrainer

    scaled = ray.train.ScalingConfig(
        num_workers=workers,
        use_gpu=gpus_per_worker > 0,
        resources_per_worker={"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})},
    )
    score = {"checkpoint_score_attribute": "score", "checkpoint_score_order": "max"} if cfg.fold != -1 else {}
    # NCCL needs real GPUs: where whole GPUs per rank are asked for, check that they are (Ray is
    # running here: a driver's or a trial's process).
    cuda = cuda_where_gpus_are(gpus_per_worker) if workers > 1 and gpus_per_worker >= 1 else True
    return TorchTrainer(
        _train_worker,
        train_loop_config={
            "train": cfg.to_dict(),
            "data_dir": str(Path(data_dir).resolve()),
            "out_dir": str(out_dir),
            "threads": max(1, int(cpus_per_worker)),
            "log_file": str(log_file) if log_file else None,
        },
        scaling_config=scaled,
        torch_config=TorchConfig(backend=ddp_backend(workers, gpus_per_worker, cuda=cuda)),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            # A run whose workers cannot start fails with the reason instead of retrying forever.
            failure_config=ray.train.FailureConfig(max_failures=max_failures, controller_failure_limit=2),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints, **score),
            callbacks=callbacks or [],
        ),
    )
