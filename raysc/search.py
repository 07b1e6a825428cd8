"""`raysc search`: Ray Tune + OptunaSearch (TPE) + ASHA.

One search is one round of an experiment folder (its layout: ``raysc.experiment``).

How a trial trains depends on its size:
- one worker (every CPU space, and most GPU ones): ``fit`` runs in the Tune trial's own process,
  which reserves the worker's CPUs and GPU share. Tune keeps these processes across trials
  (``reuse_actors``), so torch is imported once per slot, not once per trial: a Ray Train run
  pays a worker group's start-up and tear-down per trial (measured by
  ``benchmarks/trial_overhead.py``; docs/results.md).
- several workers (DDP): a small driver (it reserves the ``raysc_driver`` resource, not a CPU)
  starts a Ray Train ``TorchTrainer`` sized by the space's resources.
Either way every epoch's checkpoint lands in the trial's own run folder under a stable name, so
a retried trial (a lost process or node) or a resumed search continues from its latest epoch,
and ASHA stops trials between epochs. Whether a trial completed or was stopped, its result is
read back from its latest checkpoint, which holds the best weights so far, their validation
predictions and the history.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig, make_config
from .datafolder import load_dataset
from .distributed import DRIVER_RESOURCE, init_ray, log_to, make_trainer
from .errors import ConfigError, RayscError, trial_error
from .experiment import (
    RECORD_METRICS,
    RUNNING_BEST,
    Experiment,
    TrialRecord,
    rank_key,
    score_of,
    settings_changes,
    train_run_name,
)
from .fileio import write_json
from .models import count_macs, count_parameters, load_model
from .models.base import config_to_dict
from .pseudo_labels import read_candidates
from .search_space import Resources, SearchSpace, load_search_space
from .train import PARTIAL, fit

log = logging.getLogger(__name__)

METRIC = RUNNING_BEST


@dataclass(frozen=True)
class SearchOptions:
    """How one search runs: the keyword options of ``search()``, the flags of ``raysc search``
    (same names) and what the pipeline sets per round.

    Attributes:
        trials: trials to run.
        max_epochs: epochs a trial trains at most (None: the space's).
        time_budget_minutes: start no trial after this long (None: no limit).
        fold: the validation fold of every trial.
        round: 0 trains on labelled clips; 1 and up also on the pseudo-labels of
            ``pseudo_candidates``.
        pseudo_candidates: a ``candidates.csv`` (``write_candidates``), from round 1.
        seed: the sampler's and every trial's.
        max_concurrent: trials at once (None: what the cluster's CPUs and GPUs fit).
        sampler: ``tpe`` or ``random``.
        early_stopping: stop poor trials with ASHA; off, every trial runs ``max_epochs`` (or
            to its ``patience_steps``).
        ray_train: ``auto`` (one-worker trials train in their warm Tune process, DDP trials
            as Ray Train runs) or ``always`` (every trial a Ray Train run).
        backbone_turns: the space's backbones take turns (trial i trains the i-th in turn,
            ``backbone_turns``; the sampler draws the rest of its values) and ASHA compares a
            trial only with trials of its own backbone: each backbone gets its share of the
            trials however their validation scores compare (the pipeline's per-backbone blend).
    """

    trials: int = 8
    max_epochs: int | None = None
    time_budget_minutes: float | None = None
    fold: int = 0
    round: int = 0
    pseudo_candidates: str | None = None
    seed: int = 0
    max_concurrent: int | None = None
    sampler: str = "tpe"
    early_stopping: bool = True
    ray_train: str = "auto"
    backbone_turns: bool = False


@dataclass(frozen=True)
class SearchSettings(SearchOptions):
    """Everything that defines a search (the options, resolved, plus the space and the data);
    stored in ``search.json`` and checked on ``--resume``."""

    space: str = ""
    data: str = ""
    startup_trials: int = 1  # TPE's random start-up


@dataclass(frozen=True)
class SearchResult:
    """What ``search`` returns.

    Attributes:
        round_dir: the round's folder in the experiment.
        records: the round's trial records, best validation score first.
        best: the best trial, or None when every trial failed.
        seconds: wall-clock seconds of the search.
    """

    round_dir: Path
    records: list[TrialRecord]
    best: TrialRecord | None
    seconds: float


def search(
    space: str | Path | SearchSpace,
    *,
    data: str | Path,
    experiment: str | Path,
    points_to_evaluate: list[dict[str, Any]] | None = None,
    resume: bool = False,
    address: str | None = None,
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> SearchResult:
    """Run (or resume) one round's search: Ray Tune trials sampled by Optuna, stopped by ASHA.

    Everything is checked before Ray starts: the space, the data folder, the fold, the
    pseudo-label candidates (required from round 1), that one trial fits the cluster, and that
    no other raysc process is using the experiment (``Experiment.in_use``).

    Args:
        space: a search space file, a shipped space by name (``default``...), or a loaded one.
        data: a prepared data folder.
        experiment: the experiment folder (made if missing).
        points_to_evaluate: configurations to try first (Optuna names, e.g. a paper's
            settings ``{"backbone": "setrans", "lr": 1e-4}``), before the space's own
            ``start`` points; what they leave out is sampled.
        resume: continue the round's interrupted search with the same settings.
        address: a Ray cluster to join (None: a local Ray).
        progress: called with each progress line (default: the log).
        **options: the fields of ``SearchOptions`` (``trials=16, max_epochs=12, round=1``...).

    Returns:
        The round's folder, its trial records best first, the best trial and the seconds.

    Raises:
        ConfigError: an unknown option, an invalid space or option, a fold the data lacks, or
            a trial that does not fit the cluster.
        RayscError: a resume without a search to resume or with other settings, or an
            experiment in use by another process.
    """
    names = {f.name for f in dataclasses.fields(SearchOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"unknown search option(s) {unknown} (valid: {', '.join(sorted(names))})")
    opts = SearchOptions(**options)
    exp = Experiment(Path(experiment).resolve())
    rdir = exp.round_dir(opts.round)
    sp = space if isinstance(space, SearchSpace) else load_search_space(space)
    candidates = opts.pseudo_candidates
    settings = SearchSettings(
        **{
            **dataclasses.asdict(opts),
            "max_epochs": opts.max_epochs or sp.scheduler.max_epochs,
            "pseudo_candidates": str(Path(candidates).resolve()) if candidates else None,
        },
        space=str(sp.path.resolve()),
        data=str(Path(data).resolve()),
        startup_trials=min(10, max(1, opts.trials // 3)),
    )
    _check_inputs(sp, settings, exp)
    with exp.in_use():  # another process searching this experiment is refused
        settings_path = exp.search_settings(opts.round)
        if resume:
            if not settings_path.is_file():
                raise RayscError(f"{rdir}: no search to resume (no search.json); run without --resume")
            stored = json.loads(settings_path.read_text())  # a setting it lacks counts as its default
            changes = settings_changes(stored, dataclasses.asdict(settings), dataclasses.asdict(SearchSettings()))
            if changes:
                raise RayscError(f"{rdir}: --resume with different settings ({changes}); give the original ones")
        elif rdir.exists() and any(rdir.iterdir()):
            raise RayscError(
                f"{rdir} already holds a search; pass --resume to continue it or choose another --experiment"
            )
        rdir.mkdir(parents=True, exist_ok=True)
        write_json(settings_path, dataclasses.asdict(settings))
        if not exp.space_copy(opts.round).exists():
            shutil.copyfile(sp.path, exp.space_copy(opts.round))

        points = [*(points_to_evaluate or []), *sp.start_points(round=opts.round)]
        if opts.backbone_turns:
            points = backbone_turns(points, list(sp.backbones), opts.trials)
        t0 = time.perf_counter()
        _run_tune(sp, settings, exp, resume=resume, address=address, points=points, progress=progress or log.info)
        records = collect_records(exp, sp, settings)
        exp.write_trials_table()
        done = [r for r in records if r.status != "failed"]
        best = max(done, key=lambda r: score_of(r.metrics)) if done else None
        return SearchResult(rdir, sorted(records, key=rank_key), best, time.perf_counter() - t0)


def _check_inputs(sp: SearchSpace, s: SearchSettings, exp: Experiment) -> None:
    if s.trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {s.trials}")
    if s.sampler not in ("tpe", "random"):
        raise ConfigError(f"sampler {s.sampler!r} (valid: tpe, random)")
    if s.ray_train not in ("auto", "always"):
        raise ConfigError(f"ray_train {s.ray_train!r} (valid: auto, always)")
    if s.max_epochs < 1:
        raise ConfigError(f"--max-epochs must be >= 1, got {s.max_epochs}")
    if s.round >= 1 and not s.pseudo_candidates:
        raise ConfigError(f"round {s.round} trains on pseudo-labels: give --pseudo-candidates CSV")
    if s.round >= 1 and not sp.rounds and "pseudo_threshold" not in sp.rounds_fixed:
        log.warning("%s has no 'rounds' section: round %d uses the default threshold and weight", sp.path, s.round)
    if s.round == 0 and s.pseudo_candidates:
        raise ConfigError("round 0 searches on labelled clips only: --pseudo-candidates needs --round >= 1")
    data = load_dataset(s.data)
    if s.fold not in data.folds():
        folds = data.folds()
        raise ConfigError(f"fold {s.fold} does not exist in {s.data} (folds: {folds}); a search needs validation")
    spec = data.store.spec
    for name, (own_fixed, _) in sp.backbones.items():
        # Every backbone's front end must read this data: checked once here, not in every trial.
        cfg = make_config({**sp.fixed, **dict(own_fixed), "backbone": name}, where=f"{sp.path}: backbones.{name}")
        cfg.model_overrides(classes=data.classes, cities=data.cities, sample_rate=spec.sample_rate)
    if s.pseudo_candidates:
        read_candidates(s.pseudo_candidates, data.manifest, data.classes)
    for name, (own_fixed, own) in sp.backbones.items():
        choices = _init_choices(sp, own_fixed, own, s.round)
        if "pretrained" in choices and not exp.pretrained_model(name).is_file():
            raise ConfigError(
                f"{sp.path}: backbone {name} may start from init_from: pretrained, but {exp.pretrained_model(name)} "
                f"does not exist (run `raysc pretrain --backbone {name} --out {exp.pretrain_dir(name)} ...`, or "
                "the pipeline's pretrain stage)"
            )
        if "previous_round" in choices and s.round == 0:
            raise ConfigError(f"{sp.path}: init_from: previous_round needs a round >= 1")


# Values of ``init_from`` that name a model of the experiment rather than a file.
INIT_SOURCES = ("pretrained", "previous_round")


def _init_choices(sp: SearchSpace, own_fixed: Mapping[str, Any], own: Mapping[str, Any], round: int) -> set:
    """Every value ``init_from`` can take for one backbone of the space in ``round`` (the space's
    ``rounds`` section applies from round 1 on, over the rest, as ``SearchSpace.suggest`` does)."""
    later = round >= 1
    fixed = {**sp.fixed, **dict(own_fixed), **(sp.rounds_fixed if later else {})}
    dist = {**sp.params, **dict(own), **(sp.rounds if later else {})}.get("init_from")
    if "init_from" in (sp.rounds_fixed if later else {}):
        return {fixed["init_from"]}
    return set(dist.choices) if dist is not None and dist.kind == "categorical" else {fixed.get("init_from")}


def resolve_init(values: dict[str, Any], exp: Experiment, round: int) -> dict[str, Any]:
    """A trial's ``init_from: pretrained`` (the experiment's pretrained trunk of its backbone) or
    ``previous_round`` (the best model of its backbone in the round before) as a file path. A
    backbone the previous round did not train starts from scratch, and the trial log says so."""
    source = values.get("init_from")
    if source == "pretrained":
        return {**values, "init_from": str(exp.pretrained_model(values["backbone"]))}
    if source == "previous_round":
        best = exp.best_model(round - 1, values["backbone"])
        if best is None:
            log.warning("no %s model in round %d: this trial starts from scratch", values["backbone"], round - 1)
        return {**values, "init_from": str(best) if best else None}
    return values


class Replay:
    """A stand-in Optuna trial that answers with values already sampled (a trial's config)."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = _flatten(params)

    def _get(self, name: str, *_: Any, **__: Any) -> Any:
        if name not in self.params:
            raise RayscError(f"trial parameters {sorted(self.params)} lack {name!r}: was the search space changed?")
        return self.params[name]

    suggest_categorical = suggest_int = suggest_float = _get


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Undo Tune's nesting of ``<backbone>/<key>`` names into ``{backbone: {key: ...}}``."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out |= _flatten(v, f"{prefix}{k}/")
        else:
            out[f"{prefix}{k}"] = v
    return out


def backbone_turns(points: list[dict[str, Any]], backbones: list[str], trials: int) -> list[dict[str, Any]]:
    """The first ``trials`` points of a search whose backbones take turns: trial i trains
    ``backbones[i % len(backbones)]``, from the first unused given point of that backbone when
    there is one (a space's ``start`` point, a paper's settings), else from the next given point
    that names no backbone, else from the backbone alone (the sampler draws the rest). With one
    backbone, ``points`` as they are."""
    if len(backbones) < 2:
        return points
    given = {b: [p for p in points if p.get("backbone") == b] for b in backbones}
    open_points = [p for p in points if "backbone" not in p]
    turns = (backbones[i % len(backbones)] for i in range(trials))
    return [
        given[b].pop(0) if given[b] else {**(open_points.pop(0) if open_points else {}), "backbone": b} for b in turns
    ]


def _define_by_run(trial: Any, *, space: SearchSpace, round: int) -> None:
    space.suggest(trial, round=round)  # Optuna records every value asked; the trial replays them


def _trial_values(space: SearchSpace, params: Mapping[str, Any], s: SearchSettings) -> dict[str, Any]:
    values = space.suggest(Replay(params), round=s.round)
    own_fixed, _ = space.backbones[values["backbone"]]
    # A backbone's own schedule (the pipeline's plan sets one) within the search's max_epochs.
    epochs = min(s.max_epochs, own_fixed.get("epochs", s.max_epochs))
    values |= {"epochs": epochs, "fold": s.fold, "seed": s.seed}
    if s.pseudo_candidates:
        values["pseudo_labels"] = s.pseudo_candidates
    return values


def _run_trial(
    params: dict[str, Any], *, space: SearchSpace, settings: SearchSettings, experiment: str, resources: Resources
) -> None:
    """One Tune trial: drive a TorchTrainer for the sampled config; metrics flow to Tune through
    ``TuneReportCallback``."""
    import ray.train  # lazy: Ray (see _run_tune)
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    exp = Experiment(experiment)
    values = resolve_init(_trial_values(space, params, settings), exp, settings.round)
    cfg = make_config(values, where=f"trial {trial_id}")
    out = exp.trial_dir(settings.round, trial_id)
    out.mkdir(parents=True, exist_ok=True)
    res = resources
    if _in_process(res, settings):
        _fit_in_trial(
            cfg,
            settings.data,
            out,
            exp.train_run(settings.round, trial_id),
            res,
            exp.trial_log(settings.round, trial_id),
        )
        return
    trainer = make_trainer(
        cfg,
        settings.data,
        out,
        name=train_run_name(trial_id),
        storage_path=str(exp.train_storage(settings.round)),
        workers=res.workers,
        gpus_per_worker=res.gpus_per_worker,
        cpus_per_worker=res.cpus_per_worker,
        max_failures=0,
        callbacks=[TuneReportCallback()],
        log_file=exp.trial_log(settings.round, trial_id),
    )
    result = trainer.fit()
    if result.error:
        raise RayscError(f"trial {trial_id} failed: {result.error}")


def _in_process(res: Resources, s: SearchSettings) -> bool:
    """Whether a trial runs ``fit`` in its own Tune process instead of a Ray Train run."""
    return res.workers == 1 and s.ray_train == "auto"


def _fit_in_trial(cfg: TrainConfig, data: str, out: Path, run_dir: Path, res: Resources, log_file: Path) -> None:
    """A one-worker trial in this (reused) Tune process: metrics to Tune every epoch, the
    checkpoint to the trial's run folder, from which a retried or resumed trial continues."""
    import ray  # lazy: Ray (see _run_tune)
    import ray.tune

    torch.set_num_threads(max(1, int(res.cpus_per_worker)))  # what it reserved, whatever ran here before
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = _latest_checkpoint(run_dir)
    with log_to(log_file):
        node = ray.get_runtime_context().get_node_id()
        log.info("trial runs in process %d on node %s (Tune's, kept for the next trial)", os.getpid(), node)
        fit(
            cfg,
            data,
            out_dir=out,
            report=lambda metrics, _: ray.tune.report(metrics),
            resume=resume,
            checkpoint_dir=run_dir,
        )


def _trial_resources(ray: Any, res: Resources, s: SearchSettings) -> dict[str, float]:
    if _in_process(res, s):
        return {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})}
    if ray.cluster_resources().get(DRIVER_RESOURCE):
        return {DRIVER_RESOURCE: 1}
    # A cluster started without the driver resource: a sliver of CPU per trial driver.
    log.warning("the cluster has no %r resource (see cluster.yaml); trial drivers take 0.01 CPU", DRIVER_RESOURCE)
    return {"CPU": 0.01}


def resolve_resources(res: Resources, total: Mapping[str, float], max_concurrent: int | None) -> Resources:
    """A space's resources against the cluster met: GPU shares where there are GPUs; on a
    cluster without any (and not autoscaling: no --max-concurrent), whole CPUs per worker
    instead, no more than the cluster has, so that every shipped space also runs on a CPU machine."""
    if res.gpus_per_worker and not total.get("GPU") and not max_concurrent:
        fits = max(1, math.floor(total.get("CPU", 1) / res.workers))
        cpus = float(min(max(1, round(res.cpus_per_worker)), fits))
        return Resources(workers=res.workers, gpus_per_worker=0.0, cpus_per_worker=cpus)
    return res


def _concurrency(total: Mapping[str, float], res: Resources, space: SearchSpace, s: SearchSettings) -> int:
    """Trials that fit at once: the cluster's CPUs and GPUs over one trial's needs."""
    cpu, gpu = res.workers * res.cpus_per_worker, res.workers * res.gpus_per_worker
    fits = [math.floor(total.get("CPU", 0) / cpu + 1e-9) if cpu else s.trials]
    if gpu:
        fits.append(math.floor(total.get("GPU", 0) / gpu + 1e-9))
    if s.max_concurrent:
        return s.max_concurrent  # the user knows better (an autoscaling cluster grows)
    if min(fits) < 1:
        raise ConfigError(
            f"{space.path}: one trial needs {cpu:g} CPU and {gpu:g} GPU ({res.workers} worker(s)); the cluster has "
            f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU (set resources, or --max-concurrent on "
            "an autoscaling cluster)"
        )
    return max(1, min(s.trials, *fits))


def _run_tune(
    space: SearchSpace,
    s: SearchSettings,
    exp: Experiment,
    *,
    resume: bool,
    address: str | None,
    points: list[dict[str, Any]] | None,
    progress: Callable[[str], None],
) -> None:
    # Tune's experiment snapshot at most once a minute: taken after every step (the loop polls
    # about ten times a second) it cost a CPU trial a measurable share of each epoch (docs/results.md). A resume then
    # starts from a state up to a minute old: trials that ended since restart from their final
    # checkpoint and report at once; a trial asked for since is handed out again (tunestate).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "60")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Only a running search needs these. lazy: Ray, Tune and Optuna take seconds to import.
    import optuna
    import ray
    import ray.tune

    from .asha import step_asha
    from .live import LiveView
    from .sampler import StopAwareOptunaSearch
    from .tunestate import StateBackup, repair_state, requeue_lost_trials

    rdir = exp.round_dir(s.round)
    _log_to_file(exp.search_log(s.round))
    init_ray(address, log_to_driver=False)
    total = ray.cluster_resources()
    resources = resolve_resources(space.resources, total, s.max_concurrent)
    if resources != space.resources:
        progress(
            f"the cluster has no GPU: each trial runs {resources.workers} worker(s) on "
            f"{resources.cpus_per_worker:g} CPU(s) each instead of {space.resources.gpus_per_worker:g} GPU"
        )
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(_run_trial, space=space, settings=s, experiment=str(exp.root), resources=resources),
        _trial_resources(ray, resources, s),
    )
    only = next(iter(space.backbones)) if len(space.backbones) == 1 else ""
    view = LiveView(total=s.trials, round=s.round, write=progress, backbone=only)
    tune_dir = exp.tune_dir(s.round)
    backup = StateBackup(tune_dir, exp.tune_backup_dir(s.round))
    study_name = exp.study_name(s.round)
    if resume:
        for line in repair_state(tune_dir, backup.backup_dir) + requeue_lost_trials(
            tune_dir, exp.study_journal(s.round), study_name=study_name
        ):
            progress(line)
    if resume and ray.tune.Tuner.can_restore(str(tune_dir)):
        progress(f"resuming the search in {rdir}")
        tuner = ray.tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True)
        # The restored run config keeps its callbacks only by pickle; give them back.
        tuner._local_tuner._run_config.callbacks = [view, backup]
    else:
        if s.sampler == "random":
            sampler = optuna.samplers.RandomSampler(seed=s.seed)
        else:
            # Running trials count as poor results (constant liar), so concurrent asks spread out.
            sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.startup_trials, constant_liar=True)
        journal = optuna.storages.journal.JournalFileBackend(str(exp.study_journal(s.round)))
        storage = optuna.storages.JournalStorage(journal)
        searcher = StopAwareOptunaSearch(
            partial(_define_by_run, space=space, round=s.round),
            metric=METRIC,
            mode="max",
            sampler=sampler,
            study_name=study_name,
            storage=storage,
            points_to_evaluate=points,
            startup_gate=s.startup_trials if s.sampler == "tpe" else 0,
        )
        asha = step_asha(space.scheduler, metric=METRIC, group_by="backbone" if s.backbone_turns else None)
        tuner = ray.tune.Tuner(
            trainable,
            tune_config=ray.tune.TuneConfig(
                search_alg=searcher,
                scheduler=asha if s.early_stopping else None,
                num_samples=s.trials,
                max_concurrent_trials=_concurrency(total, resources, space, s),
                # In-process trials keep their process (torch imported, threads set) for the next.
                reuse_actors=_in_process(resources, s),
                time_budget_s=s.time_budget_minutes * 60 if s.time_budget_minutes else None,
            ),
            run_config=ray.tune.RunConfig(
                name=tune_dir.name,
                storage_path=str(tune_dir.parent),
                verbose=0,
                callbacks=[view, backup],
                # A failed trial is retried here, not inside Ray Train (max_failures=0 there): when
                # Tune kills a trial (an ASHA stop), a Train controller allowed to retry can restart
                # its dying worker group and leak the new placement group. The retried trial's
                # Train run resumes from its last checkpoint (a stable run name per trial).
                failure_config=ray.tune.FailureConfig(max_failures=1),
            ),
        )
    try:
        tuner.fit()
    except RuntimeError as exc:
        error = out_of_memory(exc, s.round)
        if error is None:
            raise
        raise error from exc
    view.summary()


def out_of_memory(exc: BaseException, round: int) -> RayscError | None:
    """Tune's own crash when Ray's memory monitor kills a trial's worker as it starts (a
    ``RuntimeError`` from Tune's actor manager, not a failed trial), as a one-line error with what
    to change; None for any other error."""
    said = str(exc)
    if "running low on memory" not in said:
        return None
    memory = re.search(r"was ([\d.]+GB) used / ([\d.]+GB) limit", said)
    how = f" ({memory.group(1)} of {memory.group(2)} used)" if memory else ""
    return RayscError(
        f"round {round}: Ray killed a trial's worker for lack of memory{how}; run fewer trials at once "
        "(--max-concurrent 1) or smaller ones (batch_size, model.width), then continue it (the same "
        "`raysc pipeline` command again, or `raysc search --resume`)"
    )


def _log_to_file(path: Path) -> None:
    """Ray's, Tune's and Optuna's own log lines go to the search's log file, not the terminal."""
    import optuna  # lazy: see _run_tune
    import ray  # noqa: F401  (sets up the "ray" logger's handlers, replaced here)

    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.raysc_search = True  # an earlier search's file (same process) stops receiving lines
    optuna.logging.disable_default_handler()
    for name in ("ray", "optuna"):
        logger = logging.getLogger(name)
        for old in logger.handlers:
            if getattr(old, "raysc_search", False):
                old.close()
        keep = [h for h in logger.handlers if isinstance(h, logging.FileHandler) and not getattr(h, "raysc_search", 0)]
        logger.handlers = [*keep, handler]
        logger.propagate = False


def _latest_checkpoint(train_dir: Path) -> Path | None:
    """The checkpoint with the most epochs (each holds metrics.json with its history): Ray
    Train's ``checkpoint_*`` or an in-process trial's ``epoch-*`` (not one still being written)."""
    best, best_epochs = None, -1
    for ckpt in [*train_dir.glob("checkpoint_*"), *train_dir.glob("epoch-*")]:
        if ckpt.name.endswith(PARTIAL):
            continue
        metrics = ckpt / "metrics.json"
        if metrics.is_file():
            epochs = len(json.loads(metrics.read_text())["history"])
            if epochs > best_epochs:
                best, best_epochs = ckpt, epochs
    return best


def collect_records(exp: Experiment, space: SearchSpace, s: SearchSettings) -> list[TrialRecord]:
    """A TrialRecord per trial Tune knows of in round ``s.round``: read back when it was written
    before, otherwise built (``_record_trial``) and written."""
    from ray.tune import ExperimentAnalysis  # lazy: Ray (see _run_tune)

    records = []
    for trial in ExperimentAnalysis(str(exp.tune_dir(s.round))).trials:
        rec = exp.read_record(s.round, trial.trial_id)
        if rec is not None and rec.error and trial.status == "TERMINATED":
            rec = None  # it ended in an error, then ran again after a --resume and ended: recorded anew
        if rec is None:
            if trial.status not in ("TERMINATED", "ERROR"):
                continue  # never ran (time budget) or still pending
            rec = _record_trial(exp, trial, space, s)
            exp.write_record(rec)
        records.append(rec)
    return records


def _record_trial(exp: Experiment, trial: Any, space: SearchSpace, s: SearchSettings) -> TrialRecord:
    """A finished trial's record, from its run folder (a completed run) or its latest Train
    checkpoint (a run ASHA stopped: its best weights, predictions and history are copied into
    the run folder first, so every recorded trial has one)."""
    values = _trial_values(space, trial.config, s)
    last = trial.last_result or {}
    base = {
        "trial_id": trial.trial_id,
        "round": s.round,
        "backbone": values["backbone"],
        "params": _flatten(trial.config),
        "fold": s.fold,
        "fit_seconds": float(last.get("time_total_s", 0.0)),
        "started": last["timestamp"] - last.get("time_total_s", 0) if "timestamp" in last else None,
    }
    ckpt = _latest_checkpoint(exp.train_run(s.round, trial.trial_id))
    # A trial that ended in an error keeps its reason, also when its checkpoint holds results
    # (then it counts as stopped there: e.g. its resume found that checkpoint damaged).
    error = (trial_error(trial) or "no result") if trial.status == "ERROR" else None
    if ckpt is None:
        return TrialRecord(
            **base,
            status="failed",
            epochs=0,
            best_epoch=None,
            metrics=dict.fromkeys(RECORD_METRICS),
            parameters=None,
            macs=None,
            predict_seconds=None,
            model_path=None,
            predictions_path=None,
            error=error,
        )
    out = exp.trial_dir(s.round, trial.trial_id)
    out.mkdir(parents=True, exist_ok=True)
    m = json.loads((ckpt / "metrics.json").read_text())
    if not (out / "metrics.json").is_file():  # the run was stopped: its results are in the checkpoint
        shutil.copyfile(ckpt / "best.pt", out / "model.pt")
        shutil.copyfile(ckpt / "val_predictions.csv", out / "val_predictions.csv")
        write_json(out / "metrics.json", m)
    model = load_model(out / "model.pt")
    if not (out / "config.json").is_file():
        cfg = make_config(values, where=f"trial {trial.trial_id}")
        write_json(out / "config.json", {"train": cfg.to_dict(), "model": config_to_dict(model.cfg)})
    best = m["best"]
    return TrialRecord(
        **base,
        status="completed" if m.get("final", True) else "stopped",
        epochs=len(m["history"]),
        best_epoch=best.get("epoch"),
        metrics={k: best.get(k) for k in RECORD_METRICS},
        parameters=count_parameters(model),
        macs=count_macs(model),
        predict_seconds=best.get("predict_seconds"),
        model_path=exp.relative(out / "model.pt"),
        predictions_path=exp.relative(out / "val_predictions.csv"),
        error=error,
    )
