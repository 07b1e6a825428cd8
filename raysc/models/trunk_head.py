"""A small head on a frozen pretrained trunk's clip embedding (``raysc.trunks``), with the
city/time fusion: the ensemble member that brings what the trunk learnt from large audio
collections. The trunk is the front end (``frontend.trunk``), so its embedding of every clip is
computed once per data folder by the feature cache; training and inference of the head then
cost next to nothing.

``aisfx``: the aisfx sound-effects CNN's mean and standard deviation of its block embeddings
(1024 values), batch-normalised, one hidden layer, then the fusion and a linear classifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..frontend import FRONTENDS, FrontendConfig
from .base import ASCModel, ModelConfig
from .layers import Fusion, scaled
from .registry import register


@dataclass(frozen=True)
class TrunkHeadConfig(ModelConfig):
    frontend: FrontendConfig = field(default_factory=lambda: FRONTENDS["aisfx"])
    hidden: int = 256
    dropout: float = 0.3
    input_dropout: float = 0.1  # of embedding values, before the hidden layer
    # Whether the backbone trains its trunk (``aisfx_ft``) or reads its frozen, cached embedding
    # (``aisfx``): the front end must say the same, or a frozen member would hold trainable
    # weights no step reaches, and a fine-tuned one would read the frozen cache.
    trunk_trainable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.frontend.trunk:
            raise ConfigError("a trunk head needs a front end with a trunk (frontend.trunk)")
        if self.frontend.trunk_trainable != self.trunk_trainable:
            raise ConfigError(
                "fine-tuning the trunk is aisfx_ft; aisfx reads its frozen, cached embedding"
                if self.frontend.trunk_trainable
                else "aisfx_ft fine-tunes its trunk (frontend.trunk_trainable); the frozen trunk's head is aisfx"
            )
        if self.unseen_rooms:
            raise ConfigError("unseen_rooms acts on a log-mel; a trunk head's input is the trunk's embedding")
        for name in ("dropout", "input_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")


@register("aisfx")
class TrunkHead(ASCModel):
    config_class = TrunkHeadConfig

    def __init__(self, cfg: TrunkHeadConfig) -> None:
        super().__init__(cfg)
        hidden = scaled(cfg.hidden, cfg.width)
        self.mlp = nn.Sequential(
            nn.BatchNorm1d(cfg.frontend.bins),  # the embedding's values differ in scale by dimension
            nn.Dropout(cfg.input_dropout),
            nn.Linear(cfg.frontend.bins, hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
        )
        self.fusion = Fusion(cfg.fusion, hidden, self.meta.out_dim)
        self.head = nn.Linear(self.fusion.out_dim, len(cfg.classes))

    def embed_audio(self, spec: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
        return self.mlp(spec.flatten(1))
