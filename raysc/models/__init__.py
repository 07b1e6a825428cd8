"""The backbone zoo: ``create_model(name, **overrides)``, ``list_models()``, artefacts.

Importing this package registers every backbone.
"""

from . import (  # noqa: F401  (registration)
    ascmamba,
    mobileascnet,
    panns,
    resnet_cbam,
    rm3,
    setrans,
    stats,
    trunk_finetune,
    trunk_head,
)
from .base import ASCModel, ModelConfig, apply_overrides
from .layers import FUSIONS, MetaConfig
from .registry import (
    count_macs,
    count_parameters,
    create_model,
    list_models,
    load_model,
    load_tensors,
    model_class,
    save_model,
)

__all__ = [
    "FUSIONS",
    "ASCModel",
    "MetaConfig",
    "ModelConfig",
    "apply_overrides",
    "count_macs",
    "count_parameters",
    "create_model",
    "list_models",
    "load_model",
    "load_tensors",
    "model_class",
    "save_model",
]
