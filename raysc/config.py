"""TrainConfig: everything one training run needs, loaded strictly (an unknown key is an error)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .fileio import read_yaml_mapping
from .models import apply_overrides, model_class

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("step", "cosine", "constant")
TRAIN_ON = ("labelled", "pretrain")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults follow the official baseline (Adam 1e-4, StepLR x0.9 / 2 epochs,
    batch 64); ``model`` holds overrides of the backbone's own config. Warm-up and early stopping
    count optimiser steps, not passes: on 192 clips a pass is 6 steps, on 8,700 it is 136."""

    backbone: str = "setrans"  # a name in the registry (`raysc models`)
    model: Mapping[str, Any] = field(default_factory=dict)  # overrides of the backbone's config (width, fusion, ...)
    # Optimisation
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.0  # L2 penalty (decoupled with adamw)
    momentum: float = 0.9  # SGD only
    schedule: str = "step"  # step (StepLR), cosine (to min_lr, per optimiser step), constant; after warm-up
    step_size: int = 2  # epochs between StepLR decays
    gamma: float = 0.9  # StepLR's decay factor
    min_lr: float = 0.0  # cosine floor
    warmup_steps: int = 0  # linear warm-up over this many optimiser steps
    epochs: int = 20  # passes over the training clips
    batch_size: int = 64  # clips per optimiser step, over all DDP workers together
    grad_clip: float | None = None  # largest gradient norm; None: no clipping
    label_smoothing: float = 0.0  # cross-entropy's label smoothing
    patience_steps: int = 0  # stop after this many steps without a better validation score; 0 = never
    # Augmentation
    mixup_alpha: float = 0.0  # 0 = off; lambda ~ Beta(alpha, alpha)
    mixup_prob: float = 1.0  # share of batches that are mixed
    time_shift: float = 0.0  # largest circular shift, seconds
    spec_augment: int = 0  # masks per axis (frequency and time); widths come from the front end
    city_dropout: float = 0.0  # probability that a training clip's city is replaced by <unk>
    # Data
    fold: int = 0  # validation fold; -1 trains on every labelled clip without validation
    # Which split of the sessions into folds (datafolder.load_dataset): 0, prepare's; n > 0, the
    # n-th redrawn one (repeated cross-fitting).
    repeat: int = 0  # which split into folds: 0 prepare's, n > 0 the n-th redrawn one
    keep_last: bool = False  # the last epoch's weights, not the best by validation (the fold only scores)
    # Share of the city-held-out score in the objective (metrics.objective); None: the data's share
    # of eval clips from cities absent in development.
    unseen_weight: float | None = None  # share of the city-held-out score in the objective; None: the data's
    session_labels: bool = True  # unlabelled clips of labelled sessions train with their session's scene
    session_label_weight: float = 1.0  # their loss weight relative to a labelled clip
    seed: int = 0  # seeds torch, numpy, Python and the loader
    loader_workers: int = 0  # DataLoader worker processes (0: in the training process)
    cache_features: bool = True  # train on the front end's log-mel computed once per data folder
    # Pseudo-labels: candidates (filename + one probability column per class) of unlabelled clips,
    # selected per run (raysc.pseudo_labels).
    pseudo_labels: str | None = None  # a candidates CSV (filename + a probability per class)
    pseudo_threshold: float = 0.0  # keep clips whose top probability reaches it
    pseudo_weight: float = 1.0  # loss weight of a pseudo-labelled clip
    pseudo_adaptive: bool = False  # per-class thresholds scaled by each class's mean confidence
    pseudo_balance: bool = False  # cap every class at the rarest kept class's count
    pseudo_targets: str = "hard"  # hard (top class) or soft (the ensemble's probabilities)
    pseudo_confidence_weight: bool = False  # weight each clip by its confidence
    # What to train on: the labelled development clips, or the pretraining clips (TAU / CochlScene
    # rows of a data folder; no city or time: the metadata branch gets <unk> and zeros).
    train_on: str = "labelled"  # labelled | pretrain (the TAU / CochlScene rows)
    # Initialisation from a model artefact (pretrain -> fine-tune)
    init_from: str | None = None  # a model file to start from (pretrain -> fine-tune)
    reset_head: bool = False  # a new classifier head instead of the one init_from has
    freeze: tuple[str, ...] = ()  # parameter name prefixes kept fixed
    # Keep the backbone's low-level blocks (its config's ``low_level_blocks``) as ``init_from``
    # left them: MobileASCNet's fine-tuning variant that freezes the pretrained low-level convs
    # (their weights; batch norm's running statistics still follow the new data).
    freeze_low_level: bool = False  # keep the backbone's low-level blocks as init_from left them
    trunk_lr_scale: float = 1.0  # learning rate of every tensor but the head's, relative to lr
    amp: str = "auto"  # auto = bf16 autocast on CUDA, none on CPU; "bf16" or "none" to force
    # Speed options for GPUs, off until benchmarks/gpu_check.sh shows a gain: the network's
    # tensors in channels-last memory order (cuDNN's fast convolution layout), and torch.compile.
    channels_last: bool = False  # channels-last memory order (GPUs)
    compile: bool = False  # torch.compile the network (GPUs)

    def __post_init__(self) -> None:
        problems = []
        model_class(self.backbone)  # raises on an unknown backbone, listing the valid ones
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} (valid: {', '.join(OPTIMIZERS)})")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule {self.schedule!r} (valid: {', '.join(SCHEDULES)})")
        if self.pseudo_targets not in ("hard", "soft"):
            problems.append(f"pseudo_targets {self.pseudo_targets!r} (valid: hard, soft)")
        if self.train_on not in TRAIN_ON:
            problems.append(f"train_on {self.train_on!r} (valid: {', '.join(TRAIN_ON)})")
        elif self.train_on == "pretrain" and self.pseudo_labels:
            problems.append("pseudo_labels: pretraining trains on the pretraining clips only")
        if self.freeze_low_level and not self.init_from:
            problems.append("freeze_low_level keeps blocks as init_from left them: give init_from (a pretrained model)")
        if self.amp not in ("auto", "bf16", "none"):
            problems.append(f"amp {self.amp!r} (valid: auto, bf16, none)")
        for f in dataclasses.fields(self):
            if isinstance(f.default, bool) and not isinstance(getattr(self, f.name), bool):
                problems.append(f"{f.name} must be true or false, got {getattr(self, f.name)!r}")
        for name in ("lr", "epochs", "batch_size", "step_size", "trunk_lr_scale"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("mixup_prob", "city_dropout", "label_smoothing", "pseudo_threshold", "unseen_weight"):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in (
            "mixup_alpha",
            "time_shift",
            "weight_decay",
            "warmup_steps",
            "patience_steps",
            "pseudo_weight",
            "spec_augment",
            "session_label_weight",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    def model_overrides(self, *, classes: Sequence[str], cities: Sequence[str], sample_rate: int) -> dict[str, Any]:
        """Backbone overrides: the user's, plus the data's classes, cities and sample rate, and
        the augmentation settings that live in the model (SpecAugment, city dropout)."""
        cls = model_class(self.backbone)
        user = apply_overrides(cls.config_class(), dict(self.model), where=f"model ({self.backbone})")
        fe = user.frontend
        frontend = dict(self.model.get("frontend", {}))
        if fe.sample_rate != sample_rate:
            # The backbone's front end follows the data unless the config asks for another rate.
            if "sample_rate" in frontend or "frontend.sample_rate" in self.model:
                raise ConfigError(
                    f"the {self.backbone} front end expects {fe.sample_rate} Hz audio but the data is at {sample_rate} "
                    f"Hz: prepare the data with --sample-rate {fe.sample_rate}, or remove model.frontend.sample_rate "
                    "so that the front end follows the data"
                )
            frontend = {**asdict(fe.at_rate(sample_rate)), **frontend, "sample_rate": sample_rate}
        if self.spec_augment:
            frontend |= {"freq_masks": self.spec_augment, "time_masks": self.spec_augment}
        return {
            **dict(self.model),
            "classes": list(classes),
            "cities": list(cities),
            "frontend": frontend,
            "meta": {**dict(self.model.get("meta", {})), "city_dropout": self.city_dropout},
        }

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = _plain(self.model)
        d["freeze"] = list(self.freeze)
        return d


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


# Keys of earlier versions, and what replaced them.
RENAMED = {
    "warmup_epochs": "'warmup_steps', counted in optimiser steps (an epoch of 192 clips at batch 32 is 6 steps)",
    "patience": "'patience_steps', counted in optimiser steps (0 = no early stopping)",
}


def make_config(values: Mapping[str, Any], *, where: str = "training config") -> TrainConfig:
    """A TrainConfig from a mapping, its values coerced and checked.

    Args:
        values: the options, flat (``lr``, ``model.width``) or with a nested ``model`` mapping;
            the keys are in the configuration reference (docs/reference/configuration.md).
        where: what the values came from, named in every error.

    Returns:
        The checked training configuration.

    Raises:
        ConfigError: an unknown or renamed key (the valid ones named), or a value the
            configuration rejects.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    flat: dict[str, Any] = {}
    model: dict[str, Any] = dict(values.get("model", {}) or {})
    for key, value in values.items():
        if key == "model":
            continue
        head, _, rest = key.partition(".")
        if head == "model" and rest:
            model[rest] = value
        elif key in names:
            flat[key] = _coerce(key, value, where)
        elif key in RENAMED:
            raise ConfigError(f"{where}: {key!r} is now {RENAMED[key]}")
        else:
            raise ConfigError(f"{where}: unknown key {key!r} (valid: {', '.join(sorted(names))})")
    try:
        return TrainConfig(**flat, model=model)
    except (TypeError, ConfigError) as exc:  # the config's own checks, with where the values came from
        raise ConfigError(f"{where}: {exc}") from None


_FLOAT_FIELDS = {f.name for f in dataclasses.fields(TrainConfig) if isinstance(f.default, float)} | {"grad_clip"}
_INT_FIELDS = {f.name for f in dataclasses.fields(TrainConfig) if type(f.default) is int}


def _coerce(key: str, value: Any, where: str) -> Any:
    """Numbers written as YAML 1.1 reads them ('1e-4' is a string there) become numbers."""
    if value is None:
        return value
    try:
        if key in _FLOAT_FIELDS and not isinstance(value, bool):
            return float(value)
        if key in _INT_FIELDS and not isinstance(value, bool):
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
    except (TypeError, ValueError):
        kind = "a number" if key in _FLOAT_FIELDS else "an integer"
        raise ConfigError(f"{where}: {key} must be {kind}, got {value!r}") from None
    if key == "freeze":
        return (value,) if isinstance(value, str) else tuple(value)
    return value


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML file of training options (``raysc train --config``).

    Args:
        path: the YAML file, a mapping of options.

    Returns:
        The options as written, for ``make_config``.

    Raises:
        ConfigError: the file is unreadable, not YAML, or not a mapping.
    """
    return read_yaml_mapping(path, what="training options")


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """Options given as ``key=value`` (``--set``), each value read as a YAML scalar.

    ``["lr=3e-4", "model.width=0.5"]`` gives ``{"lr": 0.0003, "model.width": 0.5}``.

    Args:
        items: ``key=value`` strings; an empty value gives None.

    Returns:
        The options by key, for ``make_config``.

    Raises:
        ConfigError: an item without ``=`` or without a key.
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out
