"""The contract every backbone follows, and config handling (defaults, overrides, round trips)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..frontend import Frontend, FrontendConfig, random_rooms
from ..metadata import CLASSES, OFFICIAL_CITIES, UNK_CITY
from .layers import FUSIONS, MetaConfig, MetaEncoder

DEFAULT_CITIES: tuple[str, ...] = (UNK_CITY, *OFFICIAL_CITIES)


@dataclass(frozen=True)
class ModelConfig:
    """Fields every backbone config has. Backbone configs add their own, with paper defaults."""

    classes: tuple[str, ...] = CLASSES
    cities: tuple[str, ...] = DEFAULT_CITIES  # index 0 must be <unk>
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    fusion: str = "concat"
    width: float = 1.0  # channel multiplier: small, fast variants for tests and quick searches
    # Share of training clips shown as from a city never seen: through a random room and device
    # (``features.random_rooms``), with the city <unk>. Trains <unk> for what eval-only cities sound like.
    unseen_rooms: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.unseen_rooms <= 1.0:
            raise ConfigError(f"unseen_rooms must be in [0, 1], got {self.unseen_rooms}")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"unknown fusion {self.fusion!r} (valid: {', '.join(FUSIONS)})")
        if not self.cities or self.cities[0] != UNK_CITY:
            raise ConfigError(f"the city vocabulary must start with {UNK_CITY!r}")
        if self.width <= 0:
            raise ConfigError(f"width must be > 0, got {self.width}")


class ASCModel(nn.Module):
    """waveform + city + time -> logits. Subclasses build ``fusion`` and ``head``, and either
    ``embed_audio`` (the metadata enters at the fusion only) or, when the metadata conditions the
    trunk itself, ``embed``.

    ``forward_features`` returns the embedding the head classifies; ``forward`` the logits.
    ``target`` (soft or one-hot, [B, classes]) is used only by heads with a training-time
    margin (RM3's ArcFace); other heads ignore it.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]]
    uses_wave: ClassVar[bool] = False  # embed() reads the waveform too: cached log-mels are not enough

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.frontend = Frontend(cfg.frontend)
        self.meta = MetaEncoder(len(cfg.cities), cfg.meta)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # embed_audio(spec [B, 1, T, F], wave) -> audio embedding [B, D], before the fusion.
        if cls.embed is ASCModel.embed and not callable(getattr(cls, "embed_audio", None)):
            raise TypeError(f"{cls.__name__} must define embed_audio (or embed, when the metadata enters its trunk)")

    @property
    def codebook_size(self) -> int:
        """Centroids of the frame codebook in the buffer ``codebook`` [k, n_mels], which ``fit``
        fits without labels before the first epoch while it is all zeros (``raysc.codebook``);
        0: the network has none."""
        return 0

    def embed(self, spec: torch.Tensor, meta: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
        """Log-mel [B, 1, T, F] + metadata vector (+ waveform) -> fused embedding [B, D]."""
        return self.fusion(self.embed_audio(spec, wave), meta)

    def forward_features(
        self, wave: torch.Tensor, city: torch.Tensor, time: torch.Tensor, spec: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``spec``: the front end's log-mel of ``wave`` when it is already known (a feature
        cache); only SpecAugment is then applied here."""
        spec = self.frontend(wave) if spec is None else self.frontend.augment(spec)
        if self.training and self.cfg.unseen_rooms > 0:
            moved = torch.rand(city.shape, device=city.device) < self.cfg.unseen_rooms
            if moved.any():
                spec = spec.clone()
                spec[moved] = random_rooms(spec[moved], self.frontend.cfg)
                city = city.masked_fill(moved, 0)  # 0 = <unk>
        return self.embed(spec, self.meta(city, time), wave)

    def forward(
        self,
        wave: torch.Tensor,
        city: torch.Tensor,
        time: torch.Tensor,
        target: torch.Tensor | None = None,
        spec: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.head(self.forward_features(wave, city, time, spec))

    def logits_per_city(
        self,
        wave: torch.Tensor,
        cities: list[torch.Tensor],
        time: torch.Tensor,
        spec: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Logits of the same clips under each city tensor of ``cities`` (e.g. their own and
        ``<unk>``; call it in eval mode for inference). Where the metadata enters at the fusion
        only, the trunk runs once: validation scores every clip twice, and the trunk is nearly all
        of the cost."""
        spec = self.frontend(wave) if spec is None else self.frontend.augment(spec)
        if type(self).embed is not ASCModel.embed:  # the metadata conditions the trunk
            return [self.head(self.embed(spec, self.meta(c, time), wave)) for c in cities]
        audio = self.embed_audio(spec, wave)
        return [self.head(self.fusion(audio, self.meta(c, time))) for c in cities]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _number(value: Any, kind: type, where: str) -> Any:
    try:
        number = float(value)
        if kind is int and number != int(number):
            raise ValueError
        return kind(number)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def apply_overrides(cfg: Any, overrides: Mapping[str, Any], *, where: str = "config") -> Any:
    """A copy of dataclass ``cfg`` with ``overrides`` applied.

    Keys may be dotted (``"meta.city_dropout"``) or nested mappings (``{"meta": {...}}``); lists
    become tuples where the field holds a tuple. An unknown key raises a ConfigError that names it
    and lists the valid ones.
    """
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted((set(flat) | set(nested)) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {where} (valid: {', '.join(sorted(names))})")
    changes: dict[str, Any] = {}
    for key, value in flat.items():
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            value = apply_overrides(current, value, where=f"{where}.{key}")
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        elif isinstance(current, float) and isinstance(value, int | str) and not isinstance(value, bool):
            value = _number(value, float, f"{where}.{key}")  # YAML 1.1 reads '1e-4' as a string
        elif type(current) is int and isinstance(value, str | float):
            value = _number(value, int, f"{where}.{key}")
        changes[key] = value
    for key, sub in nested.items():
        base = changes.get(key, getattr(cfg, key))
        if not dataclasses.is_dataclass(base):
            raise ConfigError(f"{where}.{key} has no sub-options (got {sorted(sub)})")
        changes[key] = apply_overrides(base, sub, where=f"{where}.{key}")
    try:
        return dataclasses.replace(cfg, **changes)
    except (TypeError, ValueError, ConfigError) as exc:  # the config's own checks, with where it came from
        raise ConfigError(f"{where}: {exc}") from exc
