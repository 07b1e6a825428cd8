"""Search spaces: ``search_spaces/*.yaml`` in Optuna's vocabulary, validated before any trial.

A file names, per key of the training config (``lr``, ``model.width``, ...), either a fixed value
or a distribution::

    lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
    batch_size: {type: categorical, choices: [16, 32, 64]}
    spec_augment: {type: int, low: 0, high: 2}

Sections: ``fixed`` (values for every trial), ``params`` (searched in every trial),
``backbones`` (the candidates; each one's own fixed values and distributions, sampled only when
that backbone is chosen: a conditional, define-by-run space), ``rounds`` (searched only in
semi-supervised rounds >= 1: pseudo-label threshold and weight), ``start`` (configurations tried
first, before the sampler draws: a known-good one costs one trial and guards the search against a
bad draw), ``resources`` and ``scheduler``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RENAMED, TrainConfig, make_config
from .errors import ConfigError
from .fileio import read_yaml_mapping
from .models import apply_overrides, list_models, model_class

# The shipped spaces (search_spaces/ at the top of the source tree), found by name by every command.


def _spaces_dir() -> Path:
    """The shipped search spaces: inside the installed package (a wheel or an sdist install puts
    the project's top-level ``search_spaces/`` there, see pyproject.toml), else the source tree's
    top-level folder (a checkout, or an editable install of one)."""
    package = Path(__file__).resolve().parent
    installed = package / "search_spaces"
    return installed if installed.is_dir() else package.parent / "search_spaces"


SPACES_DIR = _spaces_dir()
SECTIONS = ("name", "fixed", "params", "backbones", "rounds", "start", "resources", "scheduler")
DIST_KEYS = {"float": {"low", "high", "step", "log"}, "int": {"low", "high", "step", "log"}, "categorical": {"choices"}}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} - {"model", "backbone"}


@dataclass(frozen=True)
class Distribution:
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any, name: str) -> Any:
        """Ask an Optuna trial (define-by-run) for a value."""
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        """Whether the sampler could draw ``value`` (a start point's check)."""
        if self.kind == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int" and value != int(value):
            return False
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"(choices {list(self.choices)})"
        return f"({self.kind} {self.low:g} to {self.high:g}{', log' if self.log else ''})"

    def extremes(self) -> list[Any]:
        """Values that between them exercise the whole range (for validation)."""
        if self.kind == "categorical":
            return list(self.choices)
        cast = int if self.kind == "int" else float
        return [cast(self.low), cast(self.high)]


@dataclass(frozen=True)
class Resources:
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0


@dataclass(frozen=True)
class Scheduler:
    """ASHA's rungs count optimiser steps, so a trial on 192 clips is judged after as much
    training as one on 8,700; ``max_epochs`` is each trial's length in passes over its data."""

    grace_steps: int = 100
    reduction_factor: int = 2
    max_epochs: int = 20

    def __post_init__(self) -> None:
        for name, low in (("grace_steps", 1), ("reduction_factor", 2), ("max_epochs", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class SearchSpace:
    name: str
    path: Path
    fixed: Mapping[str, Any]
    params: Mapping[str, Distribution]
    backbones: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Distribution]]]  # name -> (fixed, searched)
    rounds: Mapping[str, Distribution]
    rounds_fixed: Mapping[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    scheduler: Scheduler = field(default_factory=Scheduler)
    start: tuple[Mapping[str, Any], ...] = ()  # {"backbone": ..., key: value} in the file's vocabulary

    def searched(self, backbone: str, *, round: int = 0) -> dict[str, tuple[str, Distribution]]:
        """What a trial of ``backbone`` asks the sampler for: key -> (its name there, distribution)."""
        own_fixed, own = self.backbones[backbone]
        keys = {k: (k, d) for k, d in self.params.items() if k not in own_fixed and k not in own}
        keys |= {k: (f"{backbone}/{k}", d) for k, d in own.items()}
        if round >= 1:
            keys |= {k: (k, d) for k, d in self.rounds.items()}
        return keys

    def start_points(self, *, round: int = 0) -> list[dict[str, Any]]:
        """The ``start`` configurations in the sampler's names (Optuna's ``enqueue_trial``). A
        point of a backbone the space no longer holds (the pipeline's plan left it out) is
        dropped, and so is a value the space no longer searches (the plan fixed it)."""
        points = []
        for point in self.start:
            if point["backbone"] not in self.backbones:
                continue
            names = {k: name for k, (name, _) in self.searched(point["backbone"], round=round).items()}
            if len(self.backbones) > 1:
                names["backbone"] = "backbone"
            points.append({names[k]: v for k, v in point.items() if k in names})
        return points

    def suggest(self, trial: Any, *, round: int = 0) -> dict[str, Any]:
        """One trial's training values, asked of ``trial`` define-by-run.

        A backbone's own parameters are asked under ``<backbone>/<key>`` so that each keeps its
        own distribution in the sampler's history, and only when that backbone is chosen. A shared
        parameter that the backbone sets itself is not asked: the trial records only what it uses.
        """
        names = list(self.backbones)
        backbone = trial.suggest_categorical("backbone", names) if len(names) > 1 else names[0]
        own_fixed, own = self.backbones[backbone]
        values: dict[str, Any] = {**self.fixed, "backbone": backbone, "epochs": self.scheduler.max_epochs}
        values |= {k: d.suggest(trial, k) for k, d in self.params.items() if k not in own_fixed and k not in own}
        values |= dict(own_fixed)
        values |= {k: d.suggest(trial, f"{backbone}/{k}") for k, d in own.items()}
        if round >= 1:
            values |= dict(self.rounds_fixed)
            values |= {k: d.suggest(trial, k) for k, d in self.rounds.items()}
        return values


def _parse_distribution(spec: Any, where: str) -> Distribution:
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ConfigError(f"{where}: expected {{type: float|int|categorical, ...}}, got {spec!r}")
    kind = spec["type"]
    if kind not in DIST_KEYS:
        raise ConfigError(f"{where}: unknown distribution type {kind!r} (valid: {', '.join(DIST_KEYS)})")
    extra = set(spec) - DIST_KEYS[kind] - {"type"}
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {sorted(extra)} for a {kind} (valid: {sorted(DIST_KEYS[kind])})")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: categorical needs a non-empty list of choices")
        return Distribution(kind, choices=tuple(choices))
    try:
        low, high = float(spec["low"]), float(spec["high"])
        step = float(spec["step"]) if spec.get("step") is not None else None
    except KeyError as exc:
        raise ConfigError(f"{where}: a {kind} needs low and high (missing {exc})") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: low, high and step must be numbers") from None
    log = bool(spec.get("log", False))
    problems = []
    if not low <= high:
        problems.append(f"low {low:g} is above high {high:g}")
    if log and low <= 0:
        problems.append(f"log scale needs low > 0, got {low:g}")
    if log and step is not None:
        problems.append("step and log cannot be combined")
    if kind == "int" and (low != int(low) or high != int(high)):
        problems.append("an int distribution needs integer low and high")
    if not (math.isfinite(low) and math.isfinite(high)):
        problems.append("low and high must be finite")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return Distribution(kind, low, high, step, log)


def _split(section: Any, where: str) -> tuple[dict[str, Any], dict[str, Distribution]]:
    """A section's entries: distributions (mappings with ``type``) and fixed values (the rest)."""
    if section is None:
        return {}, {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: expected a mapping of training keys")
    fixed, dists = {}, {}
    for key, value in section.items():
        if isinstance(value, Mapping) and "type" in value:
            dists[key] = _parse_distribution(value, f"{where}.{key}")
        else:
            fixed[key] = value
    return fixed, dists


def parse_section(section: Any, where: str) -> tuple[dict[str, Any], dict[str, Distribution]]:
    """A backbone-level section's fixed values and distributions, every key checked (a
    pipeline file's ``pretrain.finetune`` is one)."""
    fixed, dists = _split(section, where)
    _check_keys([*fixed, *dists], where)
    return fixed, dists


def _check_keys(keys: Any, where: str) -> None:
    for key in keys:
        head, _, rest = key.partition(".")
        if head == "model" and rest:
            continue  # checked against the backbone's config below
        if key in ("backbone", "model"):
            raise ConfigError(f"{where}.{key}: list backbones under 'backbones:' and model options as 'model.<key>'")
        if key in RENAMED:
            raise ConfigError(f"{where}: {key!r} is now {RENAMED[key]}")
        if key not in TRAIN_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (valid: {', '.join(sorted(TRAIN_KEYS))}, model.<key>)")


def _section_dataclass(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    names = {f.name for f in dataclasses.fields(cls)}
    if isinstance(raw, Mapping) and "grace_period" in raw and cls is Scheduler:
        raise ConfigError(
            f"{where}: 'grace_period' (epochs) is now 'grace_steps', counted in optimiser steps "
            "(an epoch of 192 clips at batch 32 is 6 steps)"
        )
    if not isinstance(raw, Mapping) or set(raw) - names:
        extra = sorted(set(raw) - names) if isinstance(raw, Mapping) else raw
        raise ConfigError(f"{where}: unknown key(s) {extra} (valid: {', '.join(sorted(names))})")
    try:
        return cls(**raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def space_path(space: str | Path) -> Path:
    """A search space file: a path to a .yaml file, or the name of a shipped space."""
    path = Path(space)
    if path.suffix in (".yaml", ".yml"):
        return path
    builtin = SPACES_DIR / f"{space}.yaml"
    if not builtin.is_file():
        have = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
        raise ConfigError(f"search space {str(space)!r}: not a .yaml file nor one of {have}")
    return builtin


def load_search_space(space: str | Path) -> SearchSpace:
    """Read and validate a search space (a file, or a shipped space by name); every error names
    the file and the key."""
    path = space_path(space)
    raw = read_yaml_mapping(path, what="search space sections")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown} (valid: {', '.join(SECTIONS)})")
    where = str(path)
    fixed, fixed_dists = _split(raw.get("fixed"), f"{where}: fixed")
    if fixed_dists:
        raise ConfigError(f"{where}: fixed.{next(iter(fixed_dists))} is a distribution; put it under params")
    params_fixed, params = _split(raw.get("params"), f"{where}: params")
    if params_fixed:
        raise ConfigError(f"{where}: params.{next(iter(params_fixed))} is not a distribution; put it under fixed")
    rounds_fixed, rounds = _split(raw.get("rounds"), f"{where}: rounds")
    for section, keys in (("fixed", fixed), ("params", params), ("rounds", [*rounds_fixed, *rounds])):
        _check_keys(keys, f"{where}: {section}")
    raw_backbones = raw.get("backbones")
    if not isinstance(raw_backbones, Mapping) or not raw_backbones:
        raise ConfigError(f"{where}: 'backbones' must map at least one backbone (valid: {', '.join(list_models())})")
    backbones = {}
    for name, section in raw_backbones.items():
        if name not in list_models():
            raise ConfigError(f"{where}: backbones.{name}: unknown backbone (valid: {', '.join(list_models())})")
        backbones[name] = parse_section(section, f"{where}: backbones.{name}")
    space = SearchSpace(
        name=str(raw.get("name") or path.stem),
        path=path,
        fixed=fixed,
        params=params,
        backbones=backbones,
        rounds=rounds,
        rounds_fixed=rounds_fixed,
        resources=_section_dataclass(Resources, raw.get("resources"), f"{where}: resources"),
        scheduler=_section_dataclass(Scheduler, raw.get("scheduler"), f"{where}: scheduler"),
    )
    _validate_points(space)
    return dataclasses.replace(space, start=_parse_start(space, raw.get("start"), f"{where}: start"))


def _parse_start(space: SearchSpace, raw: Any, where: str) -> tuple[dict[str, Any], ...]:
    """Each start point names its backbone (where the space has several) and only searched keys,
    each value inside its distribution: a point the sampler could never draw is a typo."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(p, Mapping) for p in raw):
        raise ConfigError(f"{where}: expected a list of configurations ({{backbone: ..., key: value, ...}})")
    points = []
    for i, raw_point in enumerate(raw):
        at = f"{where}[{i}]"
        point = dict(raw_point)
        if "backbone" not in point and len(space.backbones) == 1:
            point["backbone"] = next(iter(space.backbones))
        backbone = point.get("backbone")
        if backbone not in space.backbones:
            raise ConfigError(f"{at}: backbone {backbone!r} is not in the space (valid: {', '.join(space.backbones)})")
        own_fixed = space.backbones[backbone][0]
        dists = {k: d for k, (_, d) in space.searched(backbone).items()}
        for key, value in point.items():
            if key == "backbone":
                continue
            if key not in dists:
                fixed = {**space.fixed, **own_fixed}
                why = f"fixed at {fixed[key]!r} for {backbone}" if key in fixed else f"not searched for {backbone}"
                raise ConfigError(f"{at}.{key}: {why}; a start point sets searched keys ({', '.join(dists)})")
            if not dists[key].contains(value):
                raise ConfigError(f"{at}.{key}: {value!r} is outside its distribution {dists[key].describe()}")
        values = {**space.fixed, **own_fixed, **{k: d.extremes()[0] for k, d in dists.items()}, **point}
        cfg = make_config(values, where=at)
        apply_overrides(model_class(backbone).config_class(), dict(cfg.model), where=f"{at}: model")
        points.append(point)
    return tuple(points)


def _validate_points(space: SearchSpace) -> None:
    """Build the training and model configs at every extreme of every distribution, per backbone,
    so that a bad value (a width of 0, a fusion name typo) fails now, not in trial 17."""
    for name, (own_fixed, own) in space.backbones.items():
        searched = {**space.params, **own, **space.rounds}
        base = {**space.fixed, **space.rounds_fixed, **own_fixed, "backbone": name}
        points = [{}] + [{k: v} for k, d in searched.items() for v in d.extremes()]
        for point in points:
            values = {**base, **{k: d.extremes()[0] for k, d in searched.items()}, **point}
            where = f"{space.path}: backbone {name} with {point or 'the low end'}"
            cfg = make_config(values, where=where)
            apply_overrides(model_class(name).config_class(), dict(cfg.model), where=f"{where}: model")
