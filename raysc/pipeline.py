"""`raysc pipeline`: the semi-supervised rounds end to end.

    search (round 0, labelled clips) -> ensemble -> pseudo-label candidates
    -> search (round 1: + pseudo-labels, threshold and weight searched) -> ensemble -> ...
    -> final ensemble -> eval predictions -> submission -> plots

Each stage's outputs stay in the experiment folder and ``EXP/pipeline.json`` lists the stages
done; run the same command again after a crash and it continues at the stage it was in (a search
continues its own trials).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .candidates import write_candidates
from .config import make_config
from .crossfit import DEFAULT_SELECTION, crossfit_ensemble, crossfit_pseudo_round
from .dataset import load_dataset
from .distributed import init_ray, train
from .ensemble import build_ensemble
from .errors import ConfigError, RayscError
from .experiment import OUT_OF_FOLD, Ensemble, Experiment, final_ensemble, settings_changes
from .fileio import read_yaml_mapping, write_json
from .leaderboard import leaderboard
from .plan import describe, kept, plan_space, restore_space
from .plots import write_plots
from .pseudo import Selection
from .refit import refit_ensemble
from .search import resolve_resources, search
from .search_space import Resources, SearchSpace, load_search_space, space_path
from .submission import make_submission

log = logging.getLogger(__name__)

# Cross-fitting candidates with a time budget, by default. Measured on a 30-minute run's own trials
# (benchmarks/crossfit.py): 0.744 eval macro accuracy against its final ensemble's 0.718, and 0.553
# against 0.412 on eval-only cities, in 7 of the 11 minutes the run had left.
CROSSFIT_CANDIDATES = 10


@dataclass(frozen=True)
class PipelineConfig:
    """A pipeline file's keys (all optional; the defaults search all five backbones)."""

    space: str = "default"  # a search space file, or the name of one in search_spaces/
    rounds: int = 2  # round 0 on labelled clips, then rounds - 1 semi-supervised rounds
    trials: int = 16  # per round
    max_epochs: int | None = None  # default: the space's
    fold: int = 0  # validation fold of every trial and ensemble
    seed: int = 0
    max_concurrent: int | None = None
    ensemble_method: str = "topk"  # topk | greedy
    ensemble_k: int = 5
    temperature: bool = True
    session_smoothing: bool = True  # also score a session-smoothed variant (its own leaderboard row)
    refit: bool = True  # retrain the final ensemble's members on every labelled clip (when the budget allows)
    # Cross-fit the best N round-0 trials once per fold and choose the final ensemble on their
    # out-of-fold predictions over every labelled clip (0: off). Default: with --time-budget, the
    # best 10 that what the budget leaves holds (benchmarks/crossfit.py); without one, off.
    crossfit: int | None = None
    # With cross-fitting, rounds after 0 are not searched: each retrains the final cross-fitted
    # ensemble's fold models with its pseudo-labels (crossfit.crossfit_pseudo_round), selected by these.
    pseudo_threshold: float = DEFAULT_SELECTION.threshold
    pseudo_targets: str = DEFAULT_SELECTION.targets
    submission: str = "submission.csv"
    # Eval clips recorded in a labelled development session take its label in the submission.
    eval_session_labels: bool = True
    # Pretraining before round 0 on the data folder's TAU / CochlScene clips, e.g.
    # {backbones: [setrans], epochs: 10, config: {lr: 1.0e-3}}; every trial of a pretrained backbone
    # then starts from it (init_from: pretrained, reset_head) unless the space searches init_from.
    pretrain: dict[str, Any] | None = None

    def space_path(self) -> Path:
        return space_path(self.space)


# Pipelines by name: ``raysc pipeline baseline`` runs the official baseline's recipe (one SE-Trans,
# one round of hard pseudo-labels on every unlabelled clip) beside the default.
BUILTIN = {
    "default": PipelineConfig(),
    "baseline": PipelineConfig(
        space="baseline",
        rounds=2,
        trials=1,
        ensemble_k=1,
        temperature=False,
        session_smoothing=False,
        crossfit=0,  # the recipe: a searched round 1 on the first model's pseudo-labels
        eval_session_labels=False,  # the recipe predicts every eval clip with its model
    ),
}


def load_pipeline(path: str | Path | None) -> PipelineConfig:
    """A pipeline file's settings, a built-in pipeline by name (``default``, ``baseline``), or
    (no path) the default."""
    if path is None:
        return PipelineConfig()
    if str(path) in BUILTIN:
        return BUILTIN[str(path)]
    raw = read_yaml_mapping(path, what="pipeline settings")
    names = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} (valid: {', '.join(sorted(names))})")
    cfg = PipelineConfig(**raw)
    flags = ("temperature", "session_smoothing", "refit", "eval_session_labels")
    not_bool = {k: getattr(cfg, k) for k in flags if not isinstance(getattr(cfg, k), bool)}
    if not_bool:
        raise ConfigError(f"{path}: true or false expected, got {not_bool}")
    if cfg.rounds < 1 or cfg.trials < 1 or cfg.ensemble_k < 1:
        raise ConfigError(f"{path}: rounds, trials and ensemble_k must be >= 1")
    if not 0.0 <= cfg.pseudo_threshold <= 1.0 or cfg.pseudo_targets not in ("hard", "soft"):
        raise ConfigError(
            f"{path}: pseudo_threshold must be in [0, 1] and pseudo_targets hard or soft, got "
            f"{cfg.pseudo_threshold!r} and {cfg.pseudo_targets!r}"
        )
    if cfg.pretrain is not None:
        _check_pretrain(cfg.pretrain, f"{path}: pretrain")
    return cfg


PRETRAIN_KEYS = ("backbones", "epochs", "config")


def _check_pretrain(stage: Any, where: str) -> None:
    if not isinstance(stage, dict) or set(stage) - set(PRETRAIN_KEYS):
        extra = sorted(set(stage) - set(PRETRAIN_KEYS)) if isinstance(stage, dict) else stage
        raise ConfigError(f"{where}: unknown key(s) {extra} (valid: {', '.join(PRETRAIN_KEYS)})")
    epochs = stage.get("epochs", 10)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ConfigError(f"{where}.epochs must be an integer >= 1, got {epochs!r}")
    make_config({**stage.get("config", {}), "train_on": "pretrain"}, where=f"{where}.config")


@dataclass(frozen=True)
class PipelineResult:
    final: Ensemble
    submission: Path
    leaderboard: pd.DataFrame
    plots: list[Path]
    seconds: float


def with_pretrained(space: SearchSpace, backbones: list[str]) -> SearchSpace:
    """Every trial of a pretrained backbone starts from its trunk (``init_from: pretrained``, a new
    head), unless the space sets or searches ``init_from`` itself (from scratch vs pretrained)."""
    out = {}
    for name, (own_fixed, own) in space.backbones.items():
        searched = {**space.fixed, **space.params, **dict(own_fixed), **dict(own)}
        if name in backbones and "init_from" not in searched:
            own_fixed = {**dict(own_fixed), "init_from": "pretrained", "reset_head": True}
        out[name] = (own_fixed, own)
    return dataclasses.replace(space, backbones=out)


class _State:
    """``EXP/pipeline.json``: the settings and the stages done with their outputs."""

    def __init__(self, exp: Experiment, settings: dict[str, Any]) -> None:
        self.path = exp.pipeline_state
        if self.path.is_file():
            stored = json.loads(self.path.read_text())
            changes = settings_changes(stored["settings"], settings, dataclasses.asdict(PipelineConfig()))
            if changes:
                raise RayscError(
                    f"{exp.root} holds a pipeline with other settings ({changes}); use another --experiment"
                )
            self.done: dict[str, Any] = stored["done"]
        else:
            self.done = {}
        self.settings = settings
        self.save()

    def save(self) -> None:
        write_json(self.path, {"settings": self.settings, "done": self.done})

    def mark(self, stage: str, output: Any) -> None:
        self.done[stage] = output
        self.save()


def run_pipeline(
    cfg: PipelineConfig,
    *,
    data: str | Path,
    experiment: str | Path,
    time_budget_minutes: float | None = None,
    address: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> PipelineResult:
    """Run (or continue) the pipeline; the time budget is shared by the rounds' searches and
    always leaves a reserve for the ensembles, pseudo-labels and the submission. Another raysc
    process using ``experiment`` at the time is refused (``Experiment.in_use``)."""
    exp = Experiment(Path(experiment).resolve())
    load_dataset(data)  # a wrong data folder fails before the experiment folder is made
    with exp.in_use():
        return _run_pipeline(
            cfg, data=data, exp=exp, time_budget_minutes=time_budget_minutes, address=address, progress=progress
        )


def _run_pipeline(
    cfg: PipelineConfig,
    *,
    data: str | Path,
    exp: Experiment,
    time_budget_minutes: float | None,
    address: str | None,
    progress: Callable[[str], None] | None,
) -> PipelineResult:
    say = progress or log.info
    t0 = time.perf_counter()
    space = cfg.space_path()
    data = str(Path(data).resolve())
    dataset = load_dataset(data)  # fails early on a wrong folder
    classes = dataset.classes
    exp.root.mkdir(parents=True, exist_ok=True)
    state = _State(exp, {**dataclasses.asdict(cfg), "space": str(space.resolve()), "data": data})
    # What inference must score after the searches: the eval clips, and the unlabelled clips
    # that pseudo-labels may come from.
    to_score = {"eval": len(dataset.rows("eval")), "unlabelled": len(dataset.rows("unlabelled"))}

    def reserve_minutes(rounds_left: int) -> float:
        """Time kept for what follows the searches: inference on the clips to score by the
        ensemble's members (estimated from their measured validation inference), twice the
        estimate for safety, plus a fixed minute for ensembles, plots and Ray's start-up."""
        if not time_budget_minutes:
            return 0.0
        members = [r for r in exp.records() if r.status != "failed" and r.predict_seconds]
        if not members:
            return max(1.0, 0.1 * time_budget_minutes)
        val_clips = max(1, len(dataset.split(cfg.fold)[1]))
        per_clip = sorted(r.predict_seconds / val_clips for r in members)[-cfg.ensemble_k :]
        clips = to_score["eval"] + to_score["unlabelled"] * min(1, rounds_left)
        return 1.0 + 2 * sum(per_clip) * clips / 60

    def run_stage(stage: str, fn: Callable[[], Any]) -> Any:
        if stage in state.done:
            say(f"[pipeline] {stage}: done before, kept")
            return state.done[stage]
        say(f"[pipeline] {stage} ...")
        output = fn()
        state.mark(stage, output)
        return output

    def cluster() -> tuple[dict[str, float], Resources]:
        """The cluster's resources and what one trial gets on it."""
        import ray  # lazy: Ray takes seconds to import; only a running pipeline needs it

        init_ray(address, log_to_driver=False)  # workers' lines go to the search's log files
        total = ray.cluster_resources()
        return total, resolve_resources(sp.resources, total, cfg.max_concurrent)

    crossfit = cfg.crossfit if cfg.crossfit is not None else (CROSSFIT_CANDIDATES if time_budget_minutes else 0)
    # Cross-fitting trains only configurations without pseudo-labels (their teacher must not have
    # seen the held-out fold), so a searched round 1 could not reach the final model: with it,
    # the pseudo-label rounds retrain the cross-fitted fold models instead.
    searched_rounds = 1 if crossfit else cfg.rounds
    rounds_said = f"{searched_rounds} searched round(s) of up to {cfg.trials} trials" + (
        f" (then cross-fitting and {cfg.rounds - 1} pseudo-label round(s) of the fold models)"
        if crossfit and cfg.rounds > 1
        else ""
    )

    def do_plan() -> dict[str, dict[str, Any] | None]:
        total, res = cluster()
        budget = (time_budget_minutes - reserve_minutes(cfg.rounds - 1)) / cfg.rounds
        if res.gpus_per_worker:  # GPU trials: a step measured on the driver's CPU would say nothing
            say(
                f"[pipeline] plan: {rounds_said}, {budget:.1f} min of search each, on GPUs: every backbone of "
                f"{sp.name} kept"
            )
            return dict.fromkeys(sp.backbones)
        concurrency = cfg.max_concurrent or max(1, int(total.get("CPU", 1) // (res.workers * res.cpus_per_worker)))
        plans = plan_space(
            sp,
            dataset,
            budget_minutes=budget,
            concurrency=concurrency,
            threads=max(1, int(res.cpus_per_worker)),
            trials=cfg.trials,
        )
        say(
            f"[pipeline] plan: {rounds_said}, {budget:.1f} min of search each, {concurrency} trial(s) at once;"
            f" epochs up to {cfg.max_epochs or sp.scheduler.max_epochs}, ASHA from "
            f"step {sp.scheduler.grace_steps} (x{sp.scheduler.reduction_factor}); measured on this machine:"
        )
        for line in describe(plans):
            say(line)
        return kept(plans)

    def do_pretrain() -> list[str]:
        if dataset.rows("pretrain").empty:
            say(
                f"[pipeline] pretrain: skipped: {data} has no pretraining clips (prepare it with --tau and/or "
                "--cochlscene)"
            )
            return []
        _, res = cluster()
        stage = cfg.pretrain or {}
        asked = list(stage.get("backbones", sp.backbones))
        unknown = sorted(set(asked) - set(load_search_space(space).backbones))
        if unknown:
            raise ConfigError(f"pretrain: backbone(s) {unknown} are not in {space}")
        names = [b for b in asked if b in sp.backbones]
        for name in sorted(set(asked) - set(names)):
            say(f"[pipeline] pretrain {name}: not pretrained, the plan left it out")
        for name in names:
            if exp.pretrained_model(name).is_file():
                say(f"[pipeline] pretrain {name}: {exp.pretrained_model(name)} exists, kept")
                continue
            own_fixed = {k: v for k, v in sp.backbones[name][0].items() if k not in ("epochs", "init_from")}
            values = {k: v for k, v in sp.fixed.items() if k not in ("init_from", "freeze", "reset_head")}
            values |= {**own_fixed, "backbone": name, "train_on": "pretrain", "epochs": stage.get("epochs", 10)}
            pre = make_config(values | dict(stage.get("config", {})), where="pipeline pretrain")
            say(f"[pipeline] pretrain {name}: {pre.epochs} epochs on {len(dataset.rows('pretrain'))} clips")
            metrics = train(
                pre,
                data,
                exp.pretrain_dir(name),
                workers=res.workers,
                gpus_per_worker=res.gpus_per_worker,
                cpus_per_worker=res.cpus_per_worker,
                address=address,
            )
            say(f"[pipeline] pretrain {name}: validation macro accuracy {metrics['best']['macro_accuracy']:.4f}")
        return names

    sp = load_search_space(space)
    if time_budget_minutes:
        sp = restore_space(sp, run_stage("plan", do_plan))
    if cfg.pretrain is not None:
        sp = with_pretrained(sp, run_stage("pretrain", do_pretrain))

    candidates: str | None = None
    ensembles: list[str] = []
    for r in range(searched_rounds):
        started = exp.search_settings(r).is_file()
        if r > 0 and not started and time_budget_minutes and f"search-{r}" not in state.done:
            left = time_budget_minutes - (time.perf_counter() - t0) / 60 - reserve_minutes(cfg.rounds - r - 1)
            shortest = min((rec.fit_seconds for rec in exp.records() if rec.status != "failed"), default=0) / 60
            if left < max(0.5, shortest):
                say(
                    f"[pipeline] rounds {r}-{cfg.rounds - 1} skipped: {max(left, 0):.1f} min left after the "
                    f"inference reserve, a trial took {shortest:.1f} min; the submission uses what is trained"
                )
                break

        def do_search(r: int = r, started: bool = started, candidates: str | None = candidates) -> dict:
            budget = None
            if started:  # continuing: the same settings as when it started
                budget = exp.read_search_settings(r)["time_budget_minutes"]
            elif time_budget_minutes:
                spent = (time.perf_counter() - t0) / 60
                budget = max(
                    0.5, (time_budget_minutes - reserve_minutes(cfg.rounds - r - 1) - spent) / (cfg.rounds - r)
                )
            result = search(
                sp,
                data=data,
                experiment=exp.root,
                trials=cfg.trials,
                max_epochs=cfg.max_epochs,
                time_budget_minutes=budget,
                fold=cfg.fold,
                round=r,
                pseudo_candidates=candidates,
                seed=cfg.seed + r,
                max_concurrent=cfg.max_concurrent,
                resume=started,
                address=address,
                progress=say,
            )
            if result.best is None and r == 0:
                raise RayscError(f"round {r}: every trial failed; see {exp.trials_dir(r)} and {exp.search_log(r)}")
            if result.best is None:
                say(
                    f"[pipeline] round {r}: no trial finished an epoch (see {exp.search_log(r)}); the submission "
                    "uses the earlier rounds' models"
                )
            return {"trials": len(result.records), "best": result.best.trial_id if result.best else None}

        if run_stage(f"search-{r}", do_search)["best"] is None:
            break

        def do_ensemble(r: int = r) -> list[str]:
            name = f"round{r}-{cfg.ensemble_method}{cfg.ensemble_k}"
            kw = {
                "method": cfg.ensemble_method,
                "k": cfg.ensemble_k,
                "rounds": list(range(r + 1)),
                "temperature": cfg.temperature,
            }
            built = [build_ensemble(exp.root, name=name, **kw)]
            if cfg.session_smoothing:
                built.append(build_ensemble(exp.root, name=f"{name}-session", session_smoothing=True, **kw))
            for e in built:
                say(
                    f"[pipeline] ensemble {e.name}: {len(e.members)} member(s), validation macro accuracy "
                    f"{e.metrics['macro_accuracy']:.4f}"
                )
            return [e.name for e in built]

        ensembles = run_stage(f"ensemble-{r}", do_ensemble)
        if r + 1 < searched_rounds:
            # The candidates come from the best ensemble so far (the same rule as the final model).
            best = final_ensemble([exp.load_ensemble(n) for n in ensembles])

            def do_pseudo(best: Ensemble = best) -> str:
                path, summary = write_candidates(exp.root, ensemble=best.name, address=address)
                say(
                    f"[pipeline] pseudo-label candidates from {best.name}: {summary['candidates'].sum()} clips "
                    "(each trial of the next round selects its own, by its sampled threshold)"
                )
                return str(path)

            candidates = run_stage(f"pseudo-{r}", do_pseudo)

    def after_crossfit_minutes() -> float:
        """What the time budget has left for fold-model training: its ensemble predicts with every
        fold's model, so the inference reserve grows with the folds."""
        reserve, folds = reserve_minutes(0), len(dataset.folds())
        return time_budget_minutes - (time.perf_counter() - t0) / 60 - reserve - (reserve - 1) * (folds - 1)

    if crossfit:

        def do_crossfit() -> list[str]:
            _, res = cluster()
            budget = None
            if time_budget_minutes:
                # The pseudo-label rounds retrain up to ensemble_k configurations each: their share.
                budget = after_crossfit_minutes() * crossfit / (crossfit + cfg.ensemble_k * (cfg.rounds - 1))
            try:
                built = crossfit_ensemble(
                    exp.root,
                    candidates=crossfit,
                    method=cfg.ensemble_method,
                    k=cfg.ensemble_k,
                    temperature=cfg.temperature,
                    session_smoothing=cfg.session_smoothing,
                    cpus=res.cpus_per_worker,
                    gpus=res.gpus_per_worker,
                    time_budget_minutes=budget,
                    address=address,
                )
            except RayscError as exc:
                say(f"[pipeline] cross-fitting skipped: {exc}")
                return []
            for e in built:
                say(
                    f"[pipeline] ensemble {e.name}: {len({m.trial_id for m in e.members})} configuration(s) x "
                    f"{len(dataset.folds())} folds, out-of-fold macro accuracy {e.metrics['macro_accuracy']:.4f} on "
                    f"every labelled clip (+- {e.metrics['fold_macro_accuracy_std']:.4f} over folds)"
                )
            return [e.name for e in built]

        run_stage("crossfit", do_crossfit)

        for r in range(1, cfg.rounds):

            def do_pseudo_round(r: int = r) -> str | None:
                teacher = exp.load_ensemble()  # the final rule: the best cross-fitted one, or its last round
                if teacher.fold != OUT_OF_FOLD:
                    say(f"[pipeline] pseudo-label round {r} skipped: no cross-fitted ensemble to teach")
                    return None
                _, res = cluster()
                budget = after_crossfit_minutes() / (cfg.rounds - r) if time_budget_minutes else None
                try:
                    built = crossfit_pseudo_round(
                        exp.root,
                        teacher.name,
                        round=r,
                        selection=Selection(threshold=cfg.pseudo_threshold, targets=cfg.pseudo_targets),
                        cpus=res.cpus_per_worker,
                        gpus=res.gpus_per_worker,
                        time_budget_minutes=budget,
                        address=address,
                    )
                except RayscError as exc:
                    say(f"[pipeline] pseudo-label round {r} skipped: {exc}")
                    return None
                say(
                    f"[pipeline] {built.name}: {teacher.name}'s fold models retrained with its pseudo-labels "
                    f"({cfg.pseudo_targets}, threshold {cfg.pseudo_threshold:g}); out-of-fold macro accuracy "
                    f"{built.metrics['macro_accuracy']:.4f} (optimistic: the teacher saw every fold)"
                )
                return built.name

            if run_stage(f"pseudo-round-{r}", do_pseudo_round) is None:
                break

    # The final model: the same rule as `raysc submit` without --ensemble (experiment.final_ensemble).
    final = exp.load_ensemble()
    if cfg.refit and final.refit_of is None and final.fold != OUT_OF_FOLD:

        def do_refit() -> str | None:
            records = {r.trial_id: r for r in exp.records()}
            train, _ = dataset.split(cfg.fold)
            scale = (len(dataset.rows("labelled")) + 1) / (len(train) + 1)
            need = (
                sum(
                    records[m.trial_id].fit_seconds * (records[m.trial_id].best_epoch or 1) / records[m.trial_id].epochs
                    for m in final.members
                    if records[m.trial_id].epochs
                )
                * scale
                / 60
            )
            if time_budget_minutes:
                left = time_budget_minutes - (time.perf_counter() - t0) / 60 - reserve_minutes(0)
                if need > left:
                    say(f"[pipeline] refit skipped: about {need:.1f} min needed, {max(left, 0):.1f} min left")
                    return None
            _, res = cluster()  # a refit task gets what one trial's worker gets
            refit = refit_ensemble(exp.root, final, cpus=res.cpus_per_worker, gpus=res.gpus_per_worker, address=address)
            say(f"[pipeline] {refit.name}: the members of {final.name} retrained on every labelled clip")
            return refit.name

        run_stage("refit", do_refit)
        final = exp.load_ensemble()
    out = exp.submission(cfg.submission)

    def do_submit() -> str:
        sub = make_submission(
            exp.root, out, ensemble=final.name, session_labels=cfg.eval_session_labels, address=address
        )
        say(
            f"[pipeline] submission {sub.csv} from {final.name} (per class: {sub.counts}); "
            f"{sub.session_labelled} eval clip(s) took the label of their development session"
        )
        return str(sub.csv)

    submission = Path(run_stage("submit", do_submit))
    plots = [Path(p) for p in run_stage("plots", lambda: [str(p) for p in write_plots(exp.root, final, classes)])]
    board = leaderboard(exp.root)
    return PipelineResult(final, submission, board, plots, time.perf_counter() - t0)
