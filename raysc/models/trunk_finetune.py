"""The aisfx pretrained trunk fine-tuned end to end, with the trunk head's city/time fusion on top
(``aisfx_ft``): where the hardware affords it, the member that adapts what the trunk learnt from
sound-effects libraries to the scenes, instead of reading its frozen, cached embedding
(``aisfx``).

The trunk runs on every batch (no feature cache), starts from the published weights
(``raysc.trunks``, loaded when training starts) and trains at ``lr * trunk_lr_scale`` with the
rest of the network (a small ``trunk_lr_scale`` fine-tunes it gently); its batch norms keep
their pretrained statistics. A training step costs far more than the frozen
member's (measured in docs/results.md#training-speed); the plan measures it and leaves it out where the
budget does not hold its schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

from ..frontend import FRONTENDS, FrontendConfig
from .registry import register
from .trunk_head import TrunkHead, TrunkHeadConfig


@dataclass(frozen=True)
class TrunkFinetuneConfig(TrunkHeadConfig):
    frontend: FrontendConfig = field(default_factory=lambda: replace(FRONTENDS["aisfx"], trunk_trainable=True))
    trunk_trainable: ClassVar[bool] = True


@register("aisfx_ft")
class TrunkFinetune(TrunkHead):
    config_class = TrunkFinetuneConfig
    uses_wave = True  # the trunk trains: its input is the waveform, never a cached embedding
