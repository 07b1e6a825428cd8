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
from .dataset import load_dataset
from .ensemble import build_ensemble
from .errors import ConfigError, RayscError
from .experiment import Ensemble, Experiment, final_ensemble, settings_changes
from .fileio import read_yaml_mapping, write_json
from .leaderboard import leaderboard
from .plots import write_plots
from .search import search
from .search_space import space_path
from .submission import make_submission

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    """A pipeline file's keys (all optional; the defaults search all five backbones)."""

    space: str = "all_backbones"  # a search space file, or the name of one in search_spaces/
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
    submission: str = "submission.csv"

    def space_path(self) -> Path:
        return space_path(self.space)


def load_pipeline(path: str | Path | None) -> PipelineConfig:
    if path is None:
        return PipelineConfig()
    raw = read_yaml_mapping(path, what="pipeline settings")
    names = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} (valid: {', '.join(sorted(names))})")
    cfg = PipelineConfig(**raw)
    if cfg.rounds < 1 or cfg.trials < 1 or cfg.ensemble_k < 1:
        raise ConfigError(f"{path}: rounds, trials and ensemble_k must be >= 1")
    return cfg


@dataclass(frozen=True)
class PipelineResult:
    final: Ensemble
    submission: Path
    leaderboard: pd.DataFrame
    plots: list[Path]
    seconds: float


class _State:
    """``EXP/pipeline.json``: the settings and the stages done with their outputs."""

    def __init__(self, exp: Experiment, settings: dict[str, Any]) -> None:
        self.path = exp.pipeline_state
        if self.path.is_file():
            stored = json.loads(self.path.read_text())
            changes = settings_changes(stored["settings"], settings)
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
    always leaves a reserve for the ensembles, pseudo-labels and the submission."""
    say = progress or log.info
    t0 = time.perf_counter()
    exp = Experiment(Path(experiment).resolve())
    space = cfg.space_path()
    data = str(Path(data).resolve())
    classes = load_dataset(data).classes  # fails early on a wrong folder
    exp.root.mkdir(parents=True, exist_ok=True)
    state = _State(exp, {**dataclasses.asdict(cfg), "space": str(space.resolve()), "data": data})
    reserve = max(1.0, 0.1 * time_budget_minutes) if time_budget_minutes else 0.0

    def run_stage(stage: str, fn: Callable[[], Any]) -> Any:
        if stage in state.done:
            say(f"[pipeline] {stage}: done before, kept")
            return state.done[stage]
        say(f"[pipeline] {stage} ...")
        output = fn()
        state.mark(stage, output)
        return output

    candidates: str | None = None
    ensembles: list[str] = []
    for r in range(cfg.rounds):
        started = exp.search_settings(r).is_file()

        def do_search(r: int = r, started: bool = started, candidates: str | None = candidates) -> dict:
            budget = None
            if started:  # continuing: the same settings as when it started
                budget = exp.read_search_settings(r)["time_budget_minutes"]
            elif time_budget_minutes:
                spent = (time.perf_counter() - t0) / 60
                budget = max(0.5, (time_budget_minutes - reserve - spent) / (cfg.rounds - r))
            result = search(
                space,
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
            if result.best is None:
                raise RayscError(f"round {r}: every trial failed; see {exp.trials_dir(r)} and {exp.search_log(r)}")
            return {"trials": len(result.records), "best": result.best.trial_id}

        run_stage(f"search-{r}", do_search)

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
        if r + 1 < cfg.rounds:
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

    # The final model: the same rule as `raysc submit` without --ensemble (experiment.final_ensemble).
    final = exp.load_ensemble()
    out = exp.submission(cfg.submission)

    def do_submit() -> str:
        sub = make_submission(exp.root, out, ensemble=final.name, address=address)
        say(f"[pipeline] submission {sub.csv} from {final.name} (predicted per class: {sub.counts})")
        return str(sub.csv)

    submission = Path(run_stage("submit", do_submit))
    plots = [Path(p) for p in run_stage("plots", lambda: [str(p) for p in write_plots(exp.root, final, classes)])]
    board = leaderboard(exp.root)
    return PipelineResult(final, submission, board, plots, time.perf_counter() - t0)
