"""`raysc pipeline`: the semi-supervised rounds end to end, as stages over one context.

    plan -> pretrain -> search (round 0, labelled clips) -> ensemble -> pseudo-label candidates
    -> search (round 1: + pseudo-labels) -> ... or cross-fitting -> pseudo-label rounds
    -> refit -> submission -> plots

Each stage's outputs stay in the experiment folder and ``EXP/pipeline.json`` lists the stages
done (``state.PipelineState``); run the same command again after a crash and it continues at the
stage it was in (a search continues its own trials). The stages are in ``stages``, the pipeline
file's keys in ``config``, and all time arithmetic in ``raysc.budget``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..budget import Budget, check_budget
from ..datafolder import load_dataset
from ..experiment import Ensemble, Experiment
from ..leaderboard import leaderboard
from ..search_space import load_search_space
from .config import CROSSFIT_CANDIDATES, RECIPES_DIR, PipelineConfig, load_pipeline, recipe_names, smoke_sized
from .stages import Context, at_width, ended_early, execute, missing_data, stage_sequence, with_pretrained
from .state import PipelineState

__all__ = [
    "RECIPES_DIR",
    "PipelineConfig",
    "PipelineResult",
    "at_width",
    "default_experiment",
    "load_pipeline",
    "recipe_names",
    "run_pipeline",
    "smoke_sized",
    "with_pretrained",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineResult:
    """What ``run_pipeline`` returns.

    Attributes:
        final: the final ensemble (``final_ensemble``), the one the submission used.
        submission: the challenge file.
        leaderboard: every trial and ensemble (``leaderboard``).
        plots: the pictures written.
        seconds: wall-clock seconds of this run (not of earlier runs it continued).
    """

    final: Ensemble
    submission: Path
    leaderboard: pd.DataFrame
    plots: list[Path]
    seconds: float


# The default experiment root: the project's top-level results/ folder when run from a checkout.
RESULTS = Path("results")


def default_experiment(data: str | Path, pipeline: str | Path | None) -> Path:
    """The experiment folder of a run given none: ``results/<data folder name>-<pipeline name>``.

    Args:
        data: the prepared data folder.
        pipeline: the pipeline file or recipe name (None: ``default``).

    Returns:
        The folder, relative to the working directory.
    """
    name = Path(pipeline).stem if pipeline is not None else "default"
    return RESULTS / f"{Path(data).resolve().name}-{name}"


def run_pipeline(
    cfg: PipelineConfig,
    *,
    data: str | Path,
    experiment: str | Path,
    time_budget_minutes: float | None = None,
    address: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> PipelineResult:
    """Run (or continue) the pipeline in ``experiment`` on the prepared ``data`` folder.

    The time budget is shared by the rounds' searches and always leaves a reserve for the
    ensembles, pseudo-labels and the submission.

    Args:
        cfg: the pipeline's settings (``load_pipeline``).
        data: a prepared data folder.
        experiment: the experiment folder; made if missing, continued if it holds this pipeline.
        time_budget_minutes: wall-clock minutes for the whole run, or None for no limit.
        address: a Ray cluster to join (None: a local Ray).
        progress: called with each progress line (default: the log).

    Returns:
        The final ensemble, the submission file, the leaderboard and the plots.

    Raises:
        ConfigError: the budget is too small for the pipeline.
        RayscError: a wrong data folder, an experiment with other settings or in use by
            another process, or a round 0 whose trials all failed.
    """
    check_budget(time_budget_minutes, rounds=cfg.rounds)
    exp = Experiment(Path(experiment).resolve())
    dataset = load_dataset(data)  # a wrong data folder fails before the experiment folder is made
    budget = Budget(time_budget_minutes)
    with exp.in_use():
        space = at_width(load_search_space(cfg.space_path()), cfg.width)
        data = str(Path(data).resolve())
        settings = {
            **dataclasses.asdict(cfg),
            "space": str(space.path.resolve()),
            "data": data,
            "time_budget_minutes": time_budget_minutes,
        }
        # An experiment begun before the budget was a setting is taken to have had this one.
        defaults = {**dataclasses.asdict(PipelineConfig()), "time_budget_minutes": time_budget_minutes}
        ctx = Context(
            cfg=cfg,
            exp=exp,
            dataset=dataset,
            data=data,
            budget=budget,
            state=PipelineState(exp, settings, defaults),
            address=address,
            say=progress or log.info,
            space=space,
            crossfit=cfg.crossfit if cfg.crossfit is not None else (CROSSFIT_CANDIDATES if budget.limited else 0),
        )
        if said := missing_data(ctx):
            ctx.say(said)
        for stage in stage_sequence(ctx):
            ctx.outputs[stage.name] = execute(ctx, stage)
        if said := ended_early(ctx):
            ctx.say(said)
        final = ctx.final()
        return PipelineResult(
            final,
            exp.root / ctx.outputs["submit"],
            leaderboard(exp.root),
            [exp.root / p for p in ctx.outputs["plots"]],
            budget.elapsed() * 60,
        )
