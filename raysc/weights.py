"""Weights from elsewhere: a plain PyTorch state dict mapped onto a raysc network.

Another code base names its layers its own way (the official baseline's SE-Trans is the case in
point) but registers the same tensors in much the same order. A tensor is matched by name first
(after the wrappers' prefixes ``module.`` and ``model.``), then, for what is left, by order and
shape: the next unmatched tensor of the file with the same shape. What matched, what did not and
what the file holds beyond the network is reported, never guessed silently.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import CLASSES
from .dataset import load_dataset
from .errors import ConfigError, RayscError
from .models import ASCModel, apply_overrides, create_model, model_class, save_model

log = logging.getLogger(__name__)

PREFIXES = ("module.", "model.")  # DataParallel / DDP, and Lightning-style wrappers
COUNTER = "num_batches_tracked"  # BatchNorm's step counters are not weights: never matched nor reported
WRAPPERS = ("state_dict", "model_state_dict", "model")  # checkpoints that hold the state dict under a key


@dataclass
class ImportReport:
    by_name: list[tuple[str, str]] = field(default_factory=list)  # (network tensor, file tensor)
    by_shape: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # network tensors left as initialised
    unused: list[str] = field(default_factory=list)  # file tensors not copied

    @property
    def matched(self) -> int:
        return len(self.by_name) + len(self.by_shape)

    def describe(self) -> str:
        total = self.matched + len(self.missing)
        lines = [
            f"matched {self.matched} of {total} network tensors: {len(self.by_name)} by name, "
            f"{len(self.by_shape)} by order and shape"
        ]
        lines += [f"  {own} <- {theirs}" for own, theirs in self.by_shape]
        if self.missing:
            lines.append(f"not in the file (left as initialised): {', '.join(self.missing)}")
        if self.unused:
            lines.append(f"in the file but not used: {', '.join(self.unused)}")
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict file (also under a checkpoint's ``state_dict`` / ``model`` key).
    Loaded with ``weights_only=True``: a file that is not plain tensors is refused."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise RayscError(f"{path}: not a readable PyTorch state dict ({exc})") from None
    for key in WRAPPERS:
        if isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping):
            raw = raw[key]
            break
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        kind = type(raw).__name__ if not isinstance(raw, Mapping) else "a mapping without only tensors"
        raise RayscError(f"{path}: not a state dict of tensors (it holds {kind})")
    return {_strip(str(k)): v for k, v in raw.items()}


def _strip(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def map_state_dict(source: Mapping[str, torch.Tensor], model: torch.nn.Module) -> tuple[dict, ImportReport]:
    """The tensors of ``source`` that fit ``model`` (by name, then by order and shape), and the
    report. BatchNorm's step counters are only copied by name, and the front end's buffers (window,
    mel filters) are the network's own, computed from its config."""
    own = model.state_dict()
    report = ImportReport()
    mapped: dict[str, torch.Tensor] = {}
    left = [k for k in source if not (k in own and own[k].shape == source[k].shape)]
    for name, tensor in own.items():
        if name in source and source[name].shape == tensor.shape:
            mapped[name] = source[name]
            report.by_name.append((name, name))
    pointer = 0
    for name, tensor in own.items():
        if name in mapped or name.startswith("frontend."):  # the front end's buffers follow its config
            continue
        if name.endswith(COUNTER):  # a BatchNorm step counter, not a weight: left as it is
            continue
        for i in range(pointer, len(left)):
            if source[left[i]].shape == tensor.shape and not left[i].endswith(COUNTER):
                mapped[name] = source[left[i]]
                report.by_shape.append((name, left[i]))
                pointer = i + 1
                break
        else:
            report.missing.append(name)
    used = {theirs for _, theirs in report.by_name + report.by_shape}
    report.unused = [k for k in source if k not in used and not k.endswith(COUNTER)]
    return mapped, report


def import_weights(
    path: str | Path,
    *,
    backbone: str,
    out: str | Path,
    data: str | Path | None = None,
    model: Mapping[str, Any] | None = None,
) -> ImportReport:
    """Map the state dict at ``path`` onto a ``backbone`` network (built for ``data``'s classes,
    cities and sample rate when given) and write it as a raysc model file at ``out``."""
    cls = model_class(backbone)
    if Path(out).exists():
        raise RayscError(f"{out} already exists; choose another --out (raysc replaces no file it did not write)")
    source = read_state_dict(path)
    overrides = dict(model or {})
    if data is not None:
        d = load_dataset(data)
        overrides |= {"classes": d.classes, "cities": d.cities}
        fe = apply_overrides(cls.config_class(), dict(model or {}), where="--set").frontend
        overrides["frontend"] = dataclasses.asdict(fe.at_rate(d.store.spec.sample_rate))
    else:
        overrides.setdefault("classes", list(CLASSES))
    net: ASCModel = create_model(backbone, **overrides)
    mapped, report = map_state_dict(source, net)
    if not mapped:
        raise ConfigError(f"{path}: no tensor of the file fits the {backbone} network ({report.describe()})")
    net.load_state_dict(mapped, strict=False)
    save_model(net, out, imported_from=str(path), imported={"by_name": report.by_name, "by_shape": report.by_shape})
    log.info("imported %d tensors from %s into %s", report.matched, path, out)
    return report
