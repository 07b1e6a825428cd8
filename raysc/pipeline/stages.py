"""The pipeline's stages: each is an object with a name (its key in ``pipeline.json``), a reason
it may give to be skipped, the inputs it runs on, and ``run`` that returns its record.

    plan -> pretrain -> search-0 -> ensemble-0 -> pseudo-0 -> search-1 -> ... (searched rounds)
         -> crossfit -> pseudo-round-1 -> ... (with cross-fitting) -> refit -> submit -> plots

``stage_sequence`` yields them in order and reads what the earlier ones returned to decide what
follows (a round whose search found nothing ends the rounds). Every stage reads and writes one
``Context``: the settings, the experiment and data folders, the space as planned so far, and the
one ``Budget`` that holds all the time arithmetic.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..budget import MIN_SEARCH_MINUTES, Budget
from ..config import make_config
from ..crossfit import crossfit_ensemble, crossfit_pseudo_round, crossfit_repeats, repeat_minutes
from ..datafolder import PreparedData
from ..distributed import build_features, init_ray, largest_node_cpus, measure_plan, parallel_slots, train
from ..ensemble import build_ensemble
from ..errors import ConfigError, RayscError
from ..experiment import OUT_OF_FOLD, Ensemble, Experiment, final_ensemble
from ..frontend import FrontendConfig
from ..inference import INFERENCE_GPUS, member_seconds
from ..models import apply_overrides, model_class
from ..plan import describe, kept, restore_space
from ..plots import write_plots
from ..pseudo_candidates import write_candidates
from ..pseudo_labels import Selection
from ..refit import refit_ensemble
from ..search import resolve_resources, search
from ..search_space import Resources, SearchSpace, load_search_space, parse_section
from ..submission import make_submission
from ..trunks import unavailable as trunk_unavailable
from .config import MAX_REPEATS, PipelineConfig
from .state import PipelineState


@dataclass
class Context:
    """What every stage reads: the run's settings and folders, and what earlier stages left."""

    cfg: PipelineConfig
    exp: Experiment
    dataset: PreparedData
    data: str  # the data folder, absolute
    budget: Budget
    state: PipelineState
    address: str | None
    say: Callable[[str], None]
    space: SearchSpace  # the space as planned so far (the plan and pretrain stages narrow it)
    crossfit: int  # candidates to cross-fit; 0: off
    outputs: dict[str, Any] = field(default_factory=dict)  # stage name -> its record, this run
    _cluster: tuple[dict[str, float], Resources] | None = None
    _eval_pass_seconds: float | None = None

    @property
    def searched_rounds(self) -> int:
        # Cross-fitting trains only configurations without pseudo-labels (their teacher must not
        # have seen the held-out fold), so a searched round 1 could not reach the final model:
        # with it, the pseudo-label rounds retrain the cross-fitted fold models instead.
        return 1 if self.crossfit else self.cfg.rounds

    def cluster(self) -> tuple[dict[str, float], Resources]:
        """The cluster's resources and what one trial gets on it (Ray starts on the first call)."""
        if self._cluster is None:
            import ray  # lazy: Ray takes seconds to import; only a running pipeline needs it

            init_ray(self.address, log_to_driver=False)  # workers' lines go to the search's log files
            total = ray.cluster_resources()
            self._cluster = total, resolve_resources(self.space.resources, total, self.cfg.max_concurrent)
        return self._cluster

    def reserve(self, rounds_left: int) -> float:
        """Minutes kept for what follows the searches: the ensemble's members scoring the eval
        clips (and the unlabelled clips while pseudo-label rounds are left), from the members'
        measured validation inference."""
        if not self.budget.limited:
            return 0.0
        members = [r for r in self.exp.records() if r.status != "failed" and r.predict_seconds]
        val_clips = max(1, len(self.dataset.split(self.cfg.fold)[1]))
        per_clip = sorted(r.predict_seconds / val_clips for r in members)[-self.cfg.ensemble_k :]
        clips = len(self.dataset.rows("eval")) + len(self.dataset.rows("unlabelled")) * min(1, rounds_left)
        return self.budget.reserve(per_clip, clips)

    def after_crossfit_minutes(self, splits: int = 1, *, pseudo_rounds: int = 0) -> float:
        """What the budget leaves for fold-model training: every fold model of every split scores
        the eval clips, and the unlabelled clips in each of ``pseudo_rounds`` pseudo-label rounds,
        so the inference reserve grows with them. Once there is a cross-fitted ensemble, the
        reserve comes from one of its members timed as the submission runs it; before, from the
        trials' validation inference (a pass over a few dozen clips, which overstates the time a
        clip by several times)."""
        crossfitted = self.outputs.get("crossfit")
        if not self.budget.limited or not crossfitted:
            reserve = self.reserve(0)
            return self.budget.left(reserve + (reserve - 1) * (len(self.dataset.folds()) * splits - 1))
        ens = self.exp.load_ensemble(crossfitted[0])
        unlabelled_passes = len(self.dataset.rows("unlabelled")) / max(1, len(self.dataset.rows("eval")))
        seconds = self.eval_pass_seconds(ens) * (1 + pseudo_rounds * unlabelled_passes)
        slots = parallel_slots(1.0, INFERENCE_GPUS if self.cluster()[0].get("GPU") else 0.0, self.address)
        return self.budget.left(self.budget.measured_reserve(seconds, len(ens.members) * splits, slots))

    def eval_pass_seconds(self, ens: Ensemble) -> float:
        """Seconds one member of ``ens`` takes to score the eval clips as the submission scores
        them (``inference.member_seconds``), measured once a run and said once."""
        if self._eval_pass_seconds is None:
            clips = self.dataset.rows("eval")["filename"].tolist()
            self._eval_pass_seconds = member_seconds(ens, self.exp.root, clips, address=self.address)
            self.say(
                f"[pipeline] inference: one fold model scores the {len(clips)} eval clips in "
                f"{self._eval_pass_seconds:.2f} s (measured); the inference reserve is kept from it"
            )
        return self._eval_pass_seconds

    def final(self, *, without: str | None = None) -> Ensemble:
        """The final model by the one rule (``experiment.final_ensemble``), leaving out the
        ensemble named ``without``."""
        return final_ensemble([e for e in self.exp.ensembles() if e.name != without])


class Stage(ABC):
    """One step of the pipeline. Subclasses set ``name`` and implement ``run``."""

    name: str

    def skipped(self, ctx: Context) -> str | None:
        """Why the stage does not run this time (None: it runs)."""
        return None

    def inputs(self, ctx: Context) -> dict[str, Any] | None:
        """What the stage runs on; when it changes, the stage and all after it are redone."""
        return None

    @abstractmethod
    def run(self, ctx: Context) -> Any:
        """Do the work; the return value is the stage's record in ``pipeline.json``."""

    def apply(self, ctx: Context, record: Any) -> None:  # noqa: B027  (most stages carry nothing)
        """Carry the stage's record into the context (also when it was done before)."""


def execute(ctx: Context, stage: Stage) -> Any:
    """Run ``stage`` unless it is done (with the same inputs) or skipped; its record, or None."""
    state = ctx.state
    if stage.name in state.done:
        changed = state.changed(stage.name, stage.inputs(ctx))
        if not changed:
            ctx.say(f"[pipeline] {stage.name}: done before, kept")
            record = state.done[stage.name]
            stage.apply(ctx, record)
            return record
        gone = state.forget_from(stage.name)
        ctx.say(f"[pipeline] {stage.name}: its inputs changed ({changed}); redoing {', '.join(gone)}")
    why = stage.skipped(ctx)
    if why:
        ctx.say(f"[pipeline] {stage.name} skipped: {why}")
        return None
    ctx.say(f"[pipeline] {stage.name} ...")
    inputs = stage.inputs(ctx)  # before it runs: what it ran on
    record = stage.run(ctx)
    state.mark(stage.name, record, inputs)
    stage.apply(ctx, record)
    return record


def ended_early(ctx: Context) -> str | None:
    """With a budget of which more than a fifth is left after the last stage: what ended the run
    (the caps of the pipeline file that the stages reached, or the time kept for inference),
    and the final model's estimate."""
    b, cfg = ctx.budget, ctx.cfg
    if not b.limited or b.left() <= 0.2 * b.total:
        return None
    records = ctx.exp.records()
    reached = []
    for r in range(ctx.searched_rounds):
        if sum(1 for rec in records if rec.round == r) >= cfg.trials:
            reached.append(f"round {r} ran all {cfg.trials} of its trials (`trials`)")
    crossfitted = ctx.outputs.get("crossfit") or []
    if crossfitted:
        configurations = {m.trial_id for m in ctx.exp.load_ensemble(crossfitted[0]).members}
        if len(configurations) >= ctx.crossfit:
            reached.append(f"cross-fitting took its {ctx.crossfit} best configurations (`crossfit`)")
    repeats = ctx.outputs.get("repeats")
    if repeats:
        reached.append(f"repeated cross-fitting stopped at {repeats['splits']} split(s): {repeats['stopped']}")
    if cfg.rounds > 1 and all(ctx.outputs.get(f"pseudo-round-{r}") for r in range(1, cfg.rounds)):
        reached.append(f"the {cfg.rounds - 1} pseudo-label round(s) ran (`rounds`)")
    why = "; ".join(reached) or "the time kept for inference and the submission was more than they took"
    final = ctx.final()
    estimate = "out of fold" if final.fold == OUT_OF_FOLD else f"on validation fold {final.fold}"
    more = ". A pipeline file with larger `trials`, `crossfit` or `rounds` spends more of it" if reached else ""
    return (
        f"[pipeline] ended with {b.left():.1f} of {b.total:g} min unused: {why}. Final {final.name}: "
        f"macro accuracy {final.metrics['macro_accuracy']:.4f} {estimate}{more}"
    )


def stage_sequence(ctx: Context) -> Iterator[Stage]:
    """The stages in order; each is yielded after the one before it ran (``ctx.outputs``)."""
    yield Trunks()
    yield Plan()
    yield Pretrain()
    for r in range(ctx.searched_rounds):
        yield Search(r)
        found = ctx.outputs.get(f"search-{r}")
        if not found or found["best"] is None:
            break
        yield EnsembleRound(r)
        if r + 1 < ctx.searched_rounds:
            yield PseudoCandidates(r)
    if ctx.crossfit:
        yield Crossfit()
        yield Repeats()
        for r in range(1, ctx.cfg.rounds):
            yield PseudoRound(r)
            if ctx.outputs.get(f"pseudo-round-{r}") is None:
                break
    yield Refit()
    yield Submit()
    yield Plots()


def trunk_frontends(space: SearchSpace) -> dict[str, FrontendConfig]:
    """Backbone -> its front end, for the space's members whose front end is a pretrained trunk."""
    out = {}
    for name, (own_fixed, _) in space.backbones.items():
        cfg = make_config({**space.fixed, **dict(own_fixed), "backbone": name}, where=f"{space.path} {name}")
        frontend = apply_overrides(model_class(name).config_class(), dict(cfg.model), where=name).frontend
        if frontend.trunk:
            out[name] = frontend
    return out


def trunk_members(space: SearchSpace) -> dict[str, str]:
    """Backbone -> trunk, for the space's members whose front end is a pretrained trunk."""
    return {name: frontend.trunk for name, frontend in trunk_frontends(space).items()}


TRUNK_SHARE = 0.25  # of the budget left, for a trunk's embedding of every clip


class Trunks(Stage):
    """Make each trunk member's input ready before anything is timed: the trunk's weights (fetched
    once per machine) and its embedding of every clip (the feature cache, built once per data
    folder), or leave the member out, saying why (e.g. no package index reachable)."""

    name = "trunks"

    def skipped(self, ctx: Context) -> str | None:
        return None if trunk_members(ctx.space) else "no member of the space uses a pretrained trunk"

    def run(self, ctx: Context) -> dict[str, Any]:
        sp = ctx.space
        _, res = ctx.cluster()
        kept, left_out = [], {}
        for name, frontend in trunk_frontends(sp).items():
            trunk = frontend.trunk
            why = trunk_unavailable(trunk, progress=lambda line: ctx.say(f"[pipeline] trunks: {line}"))
            if why:
                ctx.say(f"[pipeline] trunks: {why}; the pipeline runs without {name}")
                left_out[name] = why
                continue
            if frontend.trunk_trainable:  # fine-tuned: it reads waveforms, there is nothing to cache
                ctx.say(f"[pipeline] trunks: {name}: fine-tunes the {trunk} trunk; its weights are here")
                kept.append(name)
                continue
            values = {**sp.fixed, **dict(sp.backbones[name][0]), "backbone": name}
            train_cfg = make_config(values, where=f"{sp.path} {name}")
            ctx.say(f"[pipeline] trunks: {name}: the {trunk} embedding of every clip of {ctx.data} ...")
            # On a budget, the embedding may take a quarter of it: the member must leave time to train.
            most = ctx.budget.left() * 60 * TRUNK_SHARE if ctx.budget.limited else None
            # One trial's share of a GPU where there are GPUs; else a whole node's CPUs: it is one
            # pass over every clip that all the trials wait for.
            gpus = res.gpus_per_worker
            cpus = res.cpus_per_worker if gpus else max(res.cpus_per_worker, largest_node_cpus(ctx.address))
            built = build_features(train_cfg, ctx.data, cpus=cpus, gpus=gpus, max_seconds=most, address=ctx.address)
            if built["path"] is None:
                why = (
                    f"its embedding of {built['clips']} clips would take about {built['estimate'] / 60:.1f} min here, "
                    f"more than {TRUNK_SHARE:.0%} of the {ctx.budget.left():.1f} min left"
                )
                ctx.say(f"[pipeline] trunks: {name}: {why}; the pipeline runs without {name}")
                left_out[name] = why
                continue
            ctx.say(f"[pipeline] trunks: {name}: {built['clips']} clips in {built['path']} ({built['seconds']:.0f} s)")
            kept.append(name)
        return {"kept": kept, "left_out": left_out}

    def apply(self, ctx: Context, record: Any) -> None:
        left = set(record["left_out"])
        if left:
            kept = {k: v for k, v in ctx.space.backbones.items() if k not in left}
            start = tuple(p for p in ctx.space.start if p.get("backbone") not in left)
            ctx.space = dataclasses.replace(ctx.space, backbones=kept, start=start)


class Plan(Stage):
    """Measure each backbone's step time and keep what the budget affords (``raysc.plan``)."""

    name = "plan"

    def skipped(self, ctx: Context) -> str | None:
        return None if ctx.budget.limited else "no --time-budget: every backbone of the space at its own epochs"

    def run(self, ctx: Context) -> dict[str, dict[str, Any] | None]:
        cfg, sp = ctx.cfg, ctx.space
        total, res = ctx.cluster()
        minutes = ctx.budget.share(cfg.rounds, reserve=ctx.reserve(cfg.rounds - 1))
        rounds_said = f"{ctx.searched_rounds} searched round(s) of up to {cfg.trials} trials" + (
            f" (then cross-fitting and {cfg.rounds - 1} pseudo-label round(s) of the fold models)"
            if ctx.crossfit and cfg.rounds > 1
            else ""
        )
        trial_cpus, trial_gpus = res.workers * res.cpus_per_worker, res.workers * res.gpus_per_worker
        concurrency = cfg.max_concurrent or parallel_slots(trial_cpus, trial_gpus, ctx.address)
        plans, measured_on = measure_plan(
            sp,
            ctx.data,
            budget_minutes=minutes,
            trials=cfg.trials,
            cpus=res.cpus_per_worker,
            gpus=res.gpus_per_worker,
            concurrency=concurrency,
            address=ctx.address,
        )
        if res.gpus_per_worker and measured_on.startswith("CPU"):
            ctx.say(
                f"[pipeline] the cluster has {total.get('GPU', 0):g} GPU(s), but a task holding one sees no CUDA "
                "device (logical GPUs, as in a simulated cluster): the work runs on CPUs"
            )
        ctx.say(
            f"[pipeline] plan: {rounds_said}, {minutes:.1f} min of search each, {concurrency} trial(s) at once;"
            f" epochs up to {cfg.max_epochs or sp.scheduler.max_epochs}, ASHA from "
            f"step {sp.scheduler.grace_steps} (x{sp.scheduler.reduction_factor}); measured where trials run "
            f"({measured_on}):"
        )
        for line in describe(plans):
            ctx.say(line)
        return kept(plans)

    def apply(self, ctx: Context, record: Any) -> None:
        ctx.space = restore_space(ctx.space, record)


def at_width(space: SearchSpace, width: float | None) -> SearchSpace:
    """Every backbone of the space at ``width`` (the pipeline file's ``width``, ``model.width``
    of every network; None: the space as it is)."""
    if width is None:
        return space
    out = {
        name: ({**dict(own_fixed), "model.width": width}, {k: d for k, d in own.items() if k != "model.width"})
        for name, (own_fixed, own) in space.backbones.items()
    }
    return dataclasses.replace(space, backbones=out)


def with_pretrained(space: SearchSpace, backbones: list[str], finetune: Mapping[str, Any] | None = None) -> SearchSpace:
    """Every trial of a pretrained backbone starts from its trunk (``init_from: pretrained``, a new
    head), unless the space sets or searches ``init_from`` itself (from scratch vs pretrained);
    ``finetune`` (the pipeline file's ``pretrain.finetune``: fixed values and distributions) is
    added to those backbones' own settings, e.g. MobileASCNet's frozen low-level blocks."""
    more_fixed, more = parse_section(finetune or {}, "pipeline pretrain.finetune")
    out = {}
    for name, (own_fixed, own) in space.backbones.items():
        searched = {**space.fixed, **space.params, **dict(own_fixed), **dict(own)}
        if name in backbones:
            if "init_from" not in searched:
                own_fixed = {**dict(own_fixed), "init_from": "pretrained", "reset_head": True}
            own_fixed, own = {**dict(own_fixed), **more_fixed}, {**dict(own), **more}
        out[name] = (own_fixed, own)
    return dataclasses.replace(space, backbones=out)


def missing_data(ctx: Context) -> str | None:
    """Said before the first stage: data the pipeline file asks for that the data folder lacks
    (a recipe's TAU / CochlScene pretraining), and that the rest of it runs without."""
    if ctx.cfg.pretrain is not None and ctx.dataset.rows("pretrain").empty:
        return (
            f"[pipeline] this pipeline pretrains on TAU Urban Acoustic Scenes 2020 / CochlScene clips, and {ctx.data} "
            "has none (prepare it with --tau and/or --cochlscene): the rest runs without pretraining"
        )
    return None


class Pretrain(Stage):
    """Pretrain the chosen backbones on the data folder's TAU / CochlScene clips."""

    name = "pretrain"

    def skipped(self, ctx: Context) -> str | None:
        if ctx.cfg.pretrain is None:
            return "the pipeline file has no pretrain section"
        if ctx.dataset.rows("pretrain").empty:
            return f"{ctx.data} has no pretraining clips (prepare it with --tau and/or --cochlscene)"
        return None

    def run(self, ctx: Context) -> list[str]:
        sp, exp = ctx.space, ctx.exp
        _, res = ctx.cluster()
        stage = ctx.cfg.pretrain or {}
        asked = list(stage.get("backbones", sp.backbones))
        unknown = sorted(set(asked) - set(load_search_space(sp.path).backbones))
        if unknown:
            raise ConfigError(f"pretrain: backbone(s) {unknown} are not in {sp.path}")
        names = [b for b in asked if b in sp.backbones]
        for name in sorted(set(asked) - set(names)):
            ctx.say(f"[pipeline] pretrain {name}: not pretrained, the plan left it out")
        for name in names:
            if exp.pretrained_model(name).is_file():
                ctx.say(f"[pipeline] pretrain {name}: {exp.pretrained_model(name)} exists, kept")
                continue
            own_fixed = {k: v for k, v in sp.backbones[name][0].items() if k not in ("epochs", "init_from")}
            values = {k: v for k, v in sp.fixed.items() if k not in ("init_from", "freeze", "reset_head")}
            values |= {**own_fixed, "backbone": name, "train_on": "pretrain", "epochs": stage.get("epochs", 10)}
            pre = make_config(values | dict(stage.get("config", {})), where="pipeline pretrain")
            clips = len(ctx.dataset.rows("pretrain"))
            ctx.say(f"[pipeline] pretrain {name}: {pre.epochs} epochs on {clips} clips")
            metrics = train(
                pre,
                ctx.data,
                exp.pretrain_dir(name),
                workers=ctx.cfg.ddp_workers,
                gpus_per_worker=1.0 if res.gpus_per_worker and ctx.cfg.ddp_workers > 1 else res.gpus_per_worker,
                cpus_per_worker=res.cpus_per_worker,
                address=ctx.address,
            )
            ctx.say(f"[pipeline] pretrain {name}: validation macro accuracy {metrics['best']['macro_accuracy']:.4f}")
        return names

    def apply(self, ctx: Context, record: Any) -> None:
        ctx.space = with_pretrained(ctx.space, record, (ctx.cfg.pretrain or {}).get("finetune"))


class Search(Stage):
    """One round's search (``raysc.search``); from round 1 on the previous round's candidates."""

    def __init__(self, round: int) -> None:
        self.round = round
        self.name = f"search-{round}"

    def _started(self, ctx: Context) -> bool:
        return ctx.exp.search_settings(self.round).is_file()

    def skipped(self, ctx: Context) -> str | None:
        r, cfg = self.round, ctx.cfg
        if r == 0 or self._started(ctx) or not ctx.budget.limited:
            return None
        left = ctx.budget.left(ctx.reserve(cfg.rounds - r - 1))
        shortest = min((rec.fit_seconds for rec in ctx.exp.records() if rec.status != "failed"), default=0) / 60
        if left >= max(MIN_SEARCH_MINUTES, shortest):
            return None
        return (
            f"{left:.1f} min left after the inference reserve and a trial took {shortest:.1f} min, so rounds "
            f"{r}-{cfg.rounds - 1} are not searched; the submission uses what is trained"
        )

    def run(self, ctx: Context) -> dict[str, Any]:
        r, cfg, exp = self.round, ctx.cfg, ctx.exp
        started = self._started(ctx)
        turns = cfg.per_backbone and ctx.crossfit > 0
        if started:  # continuing: the same settings as when it started (before turns existed: none)
            stored = exp.read_search_settings(r)
            minutes, turns = stored["time_budget_minutes"], stored.get("backbone_turns", False)
        else:
            minutes = ctx.budget.share(
                cfg.rounds - r, reserve=ctx.reserve(cfg.rounds - r - 1), floor=MIN_SEARCH_MINUTES
            )
        candidates = ctx.outputs.get(f"pseudo-{r - 1}") if r else None
        result = search(
            ctx.space,
            data=ctx.data,
            experiment=exp.root,
            trials=cfg.trials,
            max_epochs=cfg.max_epochs,
            time_budget_minutes=minutes,
            fold=cfg.fold,
            round=r,
            pseudo_candidates=str(exp.root / candidates) if candidates else None,
            seed=cfg.seed + r,
            max_concurrent=cfg.max_concurrent,
            backbone_turns=turns,
            resume=started,
            address=ctx.address,
            progress=ctx.say,
        )
        if result.best is None and r == 0:
            # A trial the round's time limit ended before its first epoch has no error: it is
            # recorded as failed, but what the user must change is the budget, not the trial.
            ended = {
                "failed": sum(rec.status == "failed" and rec.error is not None for rec in result.records),
                "stopped before their first epoch ended": sum(rec.status == "stopped" for rec in result.records),
                "ended by the round's time limit before it": sum(
                    rec.status == "failed" and rec.error is None for rec in result.records
                ),
            }
            how = ", ".join(f"{n} {what}" for what, n in ended.items() if n)
            raise RayscError(
                f"round {r}: no trial finished an epoch ({how}, of {len(result.records)}); "
                f"see {exp.trials_dir(r)} and {exp.search_log(r)}"
            )
        if result.best is None:
            ctx.say(
                f"[pipeline] round {r}: no trial finished an epoch (see {exp.search_log(r)}); the submission "
                "uses the earlier rounds' models"
            )
        return {"trials": len(result.records), "best": result.best.trial_id if result.best else None}


class EnsembleRound(Stage):
    """The ensembles of the trials of rounds 0..r on the validation fold (and a session-smoothed one)."""

    def __init__(self, round: int) -> None:
        self.round = round
        self.name = f"ensemble-{round}"

    def run(self, ctx: Context) -> list[str]:
        cfg = ctx.cfg
        name = f"round{self.round}-{cfg.ensemble_method}{cfg.ensemble_k}"
        kw = {
            "method": cfg.ensemble_method,
            "k": cfg.ensemble_k,
            "rounds": list(range(self.round + 1)),
            "temperature": cfg.temperature,
        }
        built = [build_ensemble(ctx.exp.root, name=name, **kw)]
        if cfg.session_smoothing:
            built.append(build_ensemble(ctx.exp.root, name=f"{name}-session", session_smoothing=True, **kw))
        for e in built:
            ctx.say(
                f"[pipeline] ensemble {e.name}: {len(e.members)} member(s), validation macro accuracy "
                f"{e.metrics['macro_accuracy']:.4f}"
            )
        return [e.name for e in built]


class PseudoCandidates(Stage):
    """Pseudo-label candidates for round r + 1 from the best ensemble so far."""

    def __init__(self, round: int) -> None:
        self.round = round
        self.name = f"pseudo-{round}"

    def run(self, ctx: Context) -> str:
        # The candidates come from the best ensemble so far (the same rule as the final model).
        best = final_ensemble([ctx.exp.load_ensemble(n) for n in ctx.outputs[f"ensemble-{self.round}"]])
        earlier = ctx.outputs.get(f"pseudo-{self.round - 1}") if ctx.cfg.pseudo_agreement else None
        path, summary = write_candidates(
            ctx.exp.root,
            ensemble=best.name,
            agree_with=ctx.exp.root / earlier if earlier else None,
            address=ctx.address,
        )
        # Two-step pseudo-labelling: the second step keeps the clips on which both agree.
        agreed = f", those on which it agrees with {earlier}" if earlier else ""
        ctx.say(
            f"[pipeline] pseudo-label candidates from {best.name}: {summary['candidates'].sum()} clips{agreed} "
            "(each trial of the next round selects its own, by its sampled threshold)"
        )
        return ctx.exp.relative(path)


class Crossfit(Stage):
    """Retrain the best round-0 configurations on every fold; ensembles chosen out of fold."""

    name = "crossfit"

    def run(self, ctx: Context) -> list[str]:
        cfg = ctx.cfg
        _, res = ctx.cluster()
        minutes = None
        if ctx.budget.limited:
            # The pseudo-label rounds retrain up to ensemble_k configurations each: their share.
            share = ctx.crossfit / (ctx.crossfit + cfg.ensemble_k * (cfg.rounds - 1))
            minutes = ctx.after_crossfit_minutes() * share
        try:
            built = crossfit_ensemble(
                ctx.exp.root,
                candidates=ctx.crossfit,
                method=cfg.ensemble_method,
                k=cfg.ensemble_k,
                temperature=cfg.temperature,
                session_smoothing=cfg.session_smoothing,
                cpus=res.cpus_per_worker,
                gpus=res.gpus_per_worker,
                time_budget_minutes=minutes,
                per_backbone=cfg.per_backbone,
                address=ctx.address,
            )
        except RayscError as exc:
            ctx.say(f"[pipeline] cross-fitting skipped: {exc}")
            return []
        for e in built:
            shares = ", ".join(f"{b} {w:.0%}" for b, w in e.metrics["backbones"].items())
            ctx.say(
                f"[pipeline] ensemble {e.name}: {len({m.trial_id for m in e.members})} configuration(s) ({shares}) x "
                f"{len(ctx.dataset.folds())} folds, out-of-fold macro accuracy {e.metrics['macro_accuracy']:.4f} on "
                f"every labelled clip (+- {e.metrics['fold_macro_accuracy_std']:.4f} over folds)"
            )
        return [e.name for e in built]


class Repeats(Stage):
    """Repeated cross-fitting: the cross-fitted ensemble's configurations on more splits of the
    sessions into folds (``crossfit.crossfit_repeats``), one split at a time while the time left
    holds it (and the pseudo-label rounds of the larger ensemble) and the estimate rises; says
    which of the two stopped it.

    A split's time is estimated from the fold runs' epoch times, or, once a split has run, from
    the longest a split took when that is longer (each run's process start-up and data loading).

    The estimate is the bagged ensemble's score on the redrawn splits alone: split 0's out-of-fold
    predictions chose the configurations, so they flatter them, and an estimate that includes them
    would fall as splits are added whether or not accuracy did. The second split is added without
    that comparison (it gives the first such estimate); each ensemble of more splits replaces the
    one of fewer (more bagging of the same configurations), so the last one built is final."""

    name = "repeats"

    def _most(self, ctx: Context) -> int:
        if ctx.cfg.repeats is not None:
            return ctx.cfg.repeats
        return MAX_REPEATS if ctx.budget.limited else 1

    def skipped(self, ctx: Context) -> str | None:
        if not ctx.outputs.get("crossfit"):
            return "no cross-fitted ensemble"
        if ctx.cfg.repeats == 1:
            return "the pipeline file sets `repeats: 1`: prepare's split only"
        if self._most(ctx) < 2:
            return "no --time-budget and no `repeats` in the pipeline file: prepare's split only"
        if ctx.dataset.split_by != "session":
            return f"{ctx.data}'s folds are split by {ctx.dataset.split_by}: there is no other split to draw"
        return None

    def run(self, ctx: Context) -> dict[str, Any]:
        cfg, exp = ctx.cfg, ctx.exp
        _, res = ctx.cluster()
        base = ctx.outputs["crossfit"][0]  # the plain one; its smoothed variant is rebuilt with each split
        slots = parallel_slots(res.cpus_per_worker, res.gpus_per_worker, ctx.address)
        cost = repeat_minutes(exp.root, base, slots)
        built: list[str] = []
        splits, estimate, why = 1, None, f"it reached {self._most(ctx)} splits, the most it takes (`repeats`)"
        for n in range(2, self._most(ctx) + 1):
            if ctx.budget.limited:
                # This split, then each pseudo-label round retraining every fold model of n splits.
                need = cost * (1 + n * (cfg.rounds - 1))
                left = ctx.after_crossfit_minutes(n, pseudo_rounds=cfg.rounds - 1)
                if need > left:
                    why = f"split {n} and the pseudo-label rounds after it need about {need:.1f} min, {left:.1f} left"
                    break
            before = ctx.budget.elapsed()
            ensembles = crossfit_repeats(
                exp.root,
                base,
                repeats=n,
                temperature=cfg.temperature,
                session_smoothing=cfg.session_smoothing,
                cpus=res.cpus_per_worker,
                gpus=res.gpus_per_worker,
                address=ctx.address,
            )
            # The estimate counts the fold runs' epochs only; a split also starts a process and
            # loads the data for each run, so what this split took is the better estimate of the next.
            cost = max(cost, ctx.budget.elapsed() - before)
            built += [e.name for e in ensembles]
            splits, previous = n, estimate
            estimate = max(e.metrics["redrawn_score"] for e in ensembles)
            for e in ensembles:
                ctx.say(
                    f"[pipeline] ensemble {e.name}: {n} splits, out-of-fold macro accuracy "
                    f"{e.metrics['macro_accuracy']:.4f}; score on the redrawn splits {e.metrics['redrawn_score']:.4f}"
                )
            if previous is not None and estimate <= previous:
                why = f"split {n} took the score on the redrawn splits from {previous:.4f} to {estimate:.4f}, no higher"
                break
        ctx.say(f"[pipeline] repeats: {splits} split(s); stopped: {why}")
        return {"splits": splits, "ensembles": built, "stopped": why}


class PseudoRound(Stage):
    """The cross-fitted final ensemble's fold models retrained with its own pseudo-labels."""

    def __init__(self, round: int) -> None:
        self.round = round
        self.name = f"pseudo-round-{round}"

    def skipped(self, ctx: Context) -> str | None:
        return None if ctx.final().fold == OUT_OF_FOLD else "no cross-fitted ensemble to teach"

    def run(self, ctx: Context) -> str | None:
        r, cfg = self.round, ctx.cfg
        teacher = ctx.final()  # the final rule: the best cross-fitted one, or its last round
        _, res = ctx.cluster()
        splits = teacher.metrics.get("splits", 1)
        left = ctx.after_crossfit_minutes(splits, pseudo_rounds=cfg.rounds - r) if ctx.budget.limited else None
        minutes = None if left is None else left / (cfg.rounds - r)
        try:
            built = crossfit_pseudo_round(
                ctx.exp.root,
                teacher.name,
                round=r,
                selection=Selection(threshold=cfg.pseudo_threshold, targets=cfg.pseudo_targets),
                cpus=res.cpus_per_worker,
                gpus=res.gpus_per_worker,
                workers=cfg.ddp_workers,
                time_budget_minutes=minutes,
                address=ctx.address,
            )
        except RayscError as exc:
            ctx.say(f"[pipeline] pseudo-label round {r} skipped: {exc}")
            return None
        ctx.say(
            f"[pipeline] {built.name}: {teacher.name}'s fold models retrained with its pseudo-labels "
            f"({cfg.pseudo_targets}, threshold {cfg.pseudo_threshold:g}); out-of-fold macro accuracy "
            f"{built.metrics['macro_accuracy']:.4f} (optimistic: the teacher saw every fold)"
        )
        return built.name


class Refit(Stage):
    """The final ensemble's members retrained on every labelled clip, when the budget allows."""

    name = "refit"

    def _base(self, ctx: Context) -> Ensemble:
        """The final model before this stage's own refit."""
        return ctx.final(without=ctx.state.done.get(self.name))

    def inputs(self, ctx: Context) -> dict[str, Any]:
        return {"ensemble": self._base(ctx).name}

    def _minutes_needed(self, ctx: Context, final: Ensemble) -> float:
        """Its members' fit times to their best epoch, scaled from the training fold to every clip."""
        records = {r.trial_id: r for r in ctx.exp.records()}
        train_rows, _ = ctx.dataset.split(ctx.cfg.fold)
        scale = (len(ctx.dataset.rows("labelled")) + 1) / (len(train_rows) + 1)
        seconds = 0.0
        for m in final.members:
            rec = records[m.trial_id]
            if rec.epochs:
                seconds += rec.fit_seconds * (rec.best_epoch or 1) / rec.epochs
        return seconds * scale / 60

    def skipped(self, ctx: Context) -> str | None:
        if not ctx.cfg.refit:
            return "the pipeline file sets refit: false"
        final = self._base(ctx)
        if final.refit_of is not None:
            return f"{final.name} is already a retrained ensemble (of {final.refit_of})"
        if final.fold == OUT_OF_FOLD:
            return f"{final.name} is cross-fitted: its fold models between them trained on every labelled clip"
        need, left = self._minutes_needed(ctx, final), ctx.budget.left(ctx.reserve(0))
        return f"about {need:.1f} min needed, {left:.1f} min left" if need > left else None

    def run(self, ctx: Context) -> str:
        final = self._base(ctx)
        _, res = ctx.cluster()  # a refit task gets what one trial's worker gets
        cpus, gpus, workers = res.cpus_per_worker, res.gpus_per_worker, ctx.cfg.ddp_workers
        refit = refit_ensemble(ctx.exp.root, final, cpus=cpus, gpus=gpus, workers=workers, address=ctx.address)
        ctx.say(f"[pipeline] {refit.name}: the members of {final.name} retrained on every labelled clip")
        return refit.name


class Submit(Stage):
    """The final ensemble's eval predictions as a checked challenge submission."""

    name = "submit"

    def inputs(self, ctx: Context) -> dict[str, Any]:
        return {"ensemble": ctx.final().name, "session_labels": ctx.cfg.eval_session_labels}

    def run(self, ctx: Context) -> str:
        final = ctx.final()
        sub = make_submission(
            ctx.exp.root,
            ctx.exp.submission(ctx.cfg.submission),
            ensemble=final.name,
            session_labels=ctx.cfg.eval_session_labels,
            address=ctx.address,
        )
        ctx.say(
            f"[pipeline] submission {sub.csv} from {final.name} (per class: {sub.counts}); "
            f"{sub.session_labelled} eval clip(s) took the label of their development session"
        )
        return ctx.exp.relative(sub.csv)


class Plots(Stage):
    """The final ensemble's confusion matrix, per-city accuracy, learning curves, search history."""

    name = "plots"

    def inputs(self, ctx: Context) -> dict[str, Any]:
        return {"ensemble": ctx.final().name}

    def run(self, ctx: Context) -> list[str]:
        return [ctx.exp.relative(p) for p in write_plots(ctx.exp.root, ctx.final(), ctx.dataset.classes)]
