"""A pipeline file: its keys (``PipelineConfig``), the built-in pipelines by name, and the checks
that refuse a bad file before anything runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import make_config
from ..crossfit import DEFAULT_SELECTION
from ..errors import ConfigError
from ..fileio import read_yaml_mapping
from ..search_space import parse_section, space_path

# Cross-fitting candidates with a time budget, by default: why 10, measured with
# benchmarks/crossfit.py, is in docs/notes/2026-12-06-budget-runs.md#defaults.
CROSSFIT_CANDIDATES = 10
# Splits of repeated cross-fitting with a time budget, at most (each must also raise the estimate).
MAX_REPEATS = 10


@dataclass(frozen=True)
class PipelineConfig:
    """A pipeline file's keys (all optional; the defaults search all five backbones)."""

    space: str = "default"  # a search space file, or the name of one in search_spaces/
    rounds: int = 2  # round 0 on labelled clips, then rounds - 1 semi-supervised rounds
    trials: int = 16  # per round
    max_epochs: int | None = None  # default: the space's
    # Every network of the space at this width (model.width, e.g. 0.5 for half the channels); the
    # plan then keeps it. Default: the space's, narrowed by the plan under --time-budget where the
    # budget does not hold it.
    width: float | None = None
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
    # Repeated cross-fitting: at most this many splits of the sessions into folds (prepare's and
    # redrawn ones) for the cross-fitted ensemble's configurations; a split is added only while
    # it raises the out-of-fold estimate. Default: with --time-budget, up to MAX_REPEATS while
    # the time left holds them; without one, 1 (prepare's split only).
    repeats: int | None = None
    # A blend of backbones: in round 0's search the space's backbones take turns (ASHA compares a
    # trial with its own backbone's), and the cross-fitted ensemble gives each backbone an equal
    # share (crossfit.crossfit_ensemble's per_backbone). Out-of-fold scores on the development
    # cities favour a head on a pretrained trunk, which can learn those cities' rooms; the blend
    # scored higher on eval than either backbone's ensemble alone (docs/results.md).
    per_backbone: bool = True
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
    # `finetune:` adds settings (values or distributions) to those trials only, e.g.
    # {freeze_low_level: {type: categorical, choices: [false, true]}}.
    pretrain: dict[str, Any] | None = None
    # ASCMamba's two-step pseudo-labelling (searched rounds, without cross-fitting): from the
    # second pseudo-label round on, a clip is a candidate only where the newest ensemble's label
    # agrees with the one before it.
    pseudo_agreement: bool = False
    # Ray Train workers (one GPU each on a GPU cluster) for the large work: pretraining, the
    # pseudo-label rounds' retrainings and the final refits. 1: single-process runs side by side.
    ddp_workers: int = 1

    def space_path(self) -> Path:
        return space_path(self.space)


def _recipes_dir() -> Path:
    """The shipped recipes: inside the installed package (the project's top-level ``recipes/``,
    see pyproject.toml), else the source tree's top-level folder."""
    package = Path(__file__).resolve().parent.parent
    installed = package / "recipes"
    return installed if installed.is_dir() else package.parent / "recipes"


# Pipelines by name (``raysc pipeline NAME``): the default is ``PipelineConfig()``; every other
# name is a recipe file here (the seed systems' and the official baseline's training recipes,
# and the GPU recipe), each with a header naming its source and what it changes.
RECIPES_DIR = _recipes_dir()


def recipe_names() -> list[str]:
    """The built-in pipelines: ``default`` and every shipped recipe."""
    return ["default", *sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))]


def load_pipeline(path: str | Path | None) -> PipelineConfig:
    """A pipeline file's settings, a built-in pipeline by name, or the default.

    Args:
        path: a pipeline file (docs/reference/pipeline-file.md), a recipe's name
            (``recipe_names``: ``alps``, ``baseline``...), or None or ``default`` for the
            default pipeline.

    Returns:
        The pipeline's settings.

    Raises:
        ConfigError: no such file or built-in, an unknown key, or a value out of range.
    """
    if path is None or str(path) == "default":
        return PipelineConfig()
    path = Path(path)
    if not path.is_file() and path.suffix not in (".yaml", ".yml"):
        builtin = RECIPES_DIR / f"{path}.yaml"
        if not builtin.is_file():
            raise ConfigError(f"pipeline {str(path)!r}: not a .yaml file nor one of {', '.join(recipe_names())}")
        path = builtin
    raw = read_yaml_mapping(path, what="pipeline settings")
    names = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} (valid: {', '.join(sorted(names))})")
    cfg = PipelineConfig(**raw)
    flags = ("temperature", "session_smoothing", "refit", "eval_session_labels", "pseudo_agreement", "per_backbone")
    not_bool = {k: getattr(cfg, k) for k in flags if not isinstance(getattr(cfg, k), bool)}
    if not_bool:
        raise ConfigError(f"{path}: true or false expected, got {not_bool}")
    counts = {k: getattr(cfg, k) for k in ("rounds", "trials", "ensemble_k", "ddp_workers")}
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in counts.values()):
        raise ConfigError(f"{path}: rounds, trials, ensemble_k and ddp_workers must be integers >= 1, got {counts}")
    if cfg.repeats is not None and (
        not isinstance(cfg.repeats, int) or isinstance(cfg.repeats, bool) or cfg.repeats < 1
    ):
        raise ConfigError(f"{path}: repeats must be an integer >= 1 (1: prepare's split only), got {cfg.repeats!r}")
    if not 0.0 <= cfg.pseudo_threshold <= 1.0 or cfg.pseudo_targets not in ("hard", "soft"):
        raise ConfigError(
            f"{path}: pseudo_threshold must be in [0, 1] and pseudo_targets hard or soft, got "
            f"{cfg.pseudo_threshold!r} and {cfg.pseudo_targets!r}"
        )
    number = isinstance(cfg.width, int | float) and not isinstance(cfg.width, bool)
    if cfg.width is not None and (not number or cfg.width <= 0):
        raise ConfigError(f"{path}: width must be a number > 0 (1: the paper's network), got {cfg.width!r}")
    if cfg.pseudo_agreement and cfg.crossfit != 0:
        raise ConfigError(
            f"{path}: pseudo_agreement compares the searched rounds' pseudo-labels: set crossfit: 0 (with "
            "cross-fitting the pseudo-label rounds retrain the cross-fitted fold models instead)"
        )
    if cfg.pretrain is not None:
        _check_pretrain(cfg.pretrain, f"{path}: pretrain")
    return cfg


def smoke_sized(cfg: PipelineConfig) -> PipelineConfig:
    """The pipeline at a smoke test's size (``raysc pipeline --smoke-test``).

    Its rounds, stages and recipe as they are, with one trial of one epoch a round, networks at
    an eighth width, at most two splits of repeated cross-fitting and one epoch of pretraining:
    a check, in minutes, that it runs to a submission on your data and machine, not a model to
    submit.

    Args:
        cfg: the pipeline's settings.

    Returns:
        The same settings at a smoke test's size.
    """
    pretrain = None if cfg.pretrain is None else {**cfg.pretrain, "epochs": 1}
    repeats = 1 if cfg.repeats == 1 else 2
    width = min(cfg.width or SMOKE_WIDTH, SMOKE_WIDTH)
    return dataclasses.replace(cfg, trials=1, max_epochs=1, width=width, repeats=repeats, pretrain=pretrain)


SMOKE_WIDTH = 0.125


PRETRAIN_KEYS = ("backbones", "epochs", "config", "finetune")


def _check_pretrain(stage: Any, where: str) -> None:
    if not isinstance(stage, dict) or set(stage) - set(PRETRAIN_KEYS):
        extra = sorted(set(stage) - set(PRETRAIN_KEYS)) if isinstance(stage, dict) else stage
        raise ConfigError(f"{where}: unknown key(s) {extra} (valid: {', '.join(PRETRAIN_KEYS)})")
    epochs = stage.get("epochs", 10)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ConfigError(f"{where}.epochs must be an integer >= 1, got {epochs!r}")
    make_config({**stage.get("config", {}), "train_on": "pretrain"}, where=f"{where}.config")
    parse_section(stage.get("finetune"), f"{where}.finetune")
