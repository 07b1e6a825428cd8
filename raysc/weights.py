"""Weights from elsewhere: a plain PyTorch state dict mapped onto a raysc network.

A tensor is matched by name (after the wrappers' prefixes ``module.`` and ``model.``). A file
whose names match less than ``MIN_BY_NAME`` of the network's tensors is refused: it is most
likely another network's weights, and pairing tensors by position would make garbage.

Another code base may name its layers its own way (the official baseline's SE-Trans is the case
in point) but register the same tensors in the same order. For it, ``by_order=True`` (the CLI's
``--match-by-order``) pairs what is left by order and shape, the next unmatched tensor of the file
with the same shape, and every such pair is reported; at least ``MIN_MATCHED`` of the network's
tensors must then come from the file. Either way the network must give finite outputs with them.
(By name, a pretrained trunk under a new head is the usual case: PANNs' CNN14 with raysc's head.)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .datafolder import load_dataset
from .errors import ConfigError, RayscError
from .metadata import CLASSES, TIME_FEATURES
from .models import ASCModel, apply_overrides, create_model, load_tensors, model_class, save_model

log = logging.getLogger(__name__)

PREFIXES = ("module.", "model.")  # DataParallel / DDP, and Lightning-style wrappers
COUNTER = "num_batches_tracked"  # BatchNorm's step counters are not weights: never matched nor reported
WRAPPERS = ("state_dict", "model_state_dict", "model")  # checkpoints that hold the state dict under a key
MIN_BY_NAME = 0.5  # the share of the network's tensors that must match by name without --match-by-order
MIN_MATCHED = 0.8  # the share that must come from the file when pairing by order


@dataclass
class ImportReport:
    """What ``import_weights`` copied.

    Attributes:
        by_name: (network tensor, file tensor) pairs matched by name.
        by_shape: (network tensor, file tensor) pairs matched by order and shape.
        missing: network tensors left as initialised.
        unused: file tensors not copied.
    """

    by_name: list[tuple[str, str]] = field(default_factory=list)
    by_shape: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

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
    raw = load_tensors(path, what="PyTorch state dict")
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


def _weights(model: torch.nn.Module) -> list[str]:
    """The network's tensors a file may supply: not the front end's buffers (window, mel filters:
    computed from its config) nor BatchNorm's step counters."""
    return [k for k in model.state_dict() if not k.startswith("frontend.") and not k.endswith(COUNTER)]


def map_state_dict(
    source: Mapping[str, torch.Tensor], model: torch.nn.Module, *, by_order: bool = False
) -> tuple[dict, ImportReport]:
    """The tensors of ``source`` that fit ``model`` by name (and, with ``by_order``, the rest by
    order and shape), and the report. BatchNorm's step counters are only copied by name, and the
    front end's buffers are the network's own."""
    own = model.state_dict()
    report = ImportReport()
    mapped: dict[str, torch.Tensor] = {}
    left = [k for k in source if not (k in own and own[k].shape == source[k].shape)]
    for name, tensor in own.items():
        if name in source and source[name].shape == tensor.shape:
            mapped[name] = source[name]
            report.by_name.append((name, name))
    pointer = 0
    for name in _weights(model):
        if name in mapped:
            continue
        tensor = own[name]
        for i in range(pointer if by_order else len(left), len(left)):
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
    by_order: bool = False,
) -> ImportReport:
    """Map the state dict at ``path`` onto a ``backbone`` network and write a raysc model file.

    Args:
        path: a state dict saved with ``torch.save`` (also under a checkpoint's ``state_dict``).
        backbone: the raysc backbone to map it onto.
        out: the raysc model file to write; must not exist.
        data: build the network for this data folder's classes, cities and sample rate.
        model: model options (``width`` ...), as ``--set`` gives them.
        by_order: pair the tensors that no name matches by order and shape.

    Returns:
        What matched (by name, by order), what the file lacks and what it holds beyond.

    Raises:
        ConfigError: the file does not fit the network: too few tensors by name (without
            ``by_order``) or in all (with it), or outputs that are not finite.
        RayscError: ``out`` exists, or the file is not a readable state dict of tensors.
    """
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
    mapped, report = map_state_dict(source, net, by_order=by_order)
    _check_match(path, backbone, source, net, report, by_order=by_order)
    net.load_state_dict(mapped, strict=False)
    _check_outputs(path, backbone, net)
    save_model(net, out, imported_from=str(path), imported={"by_name": report.by_name, "by_shape": report.by_shape})
    log.info("imported %d tensors from %s into %s", report.matched, path, out)
    return report


def _check_match(
    path: str | Path,
    backbone: str,
    source: Mapping[str, torch.Tensor],
    net: torch.nn.Module,
    report: ImportReport,
    *,
    by_order: bool,
) -> None:
    """Refuse a file that does not hold this network's weights (see the module's docstring)."""
    wanted = len(_weights(net))
    named = sum(1 for own, _ in report.by_name if not own.endswith(COUNTER))
    if not by_order and named < MIN_BY_NAME * wanted:
        theirs = ", ".join(list(source)[:3])
        raise ConfigError(
            f"{path}: only {named} of the {wanted} tensors of the {backbone} network match the file by name (its "
            f"names begin {theirs}): most likely another network's weights. If it is this network under other "
            "names (e.g. the official baseline's SE-Trans), pass --match-by-order: the rest are then paired by "
            "order and shape, and every pair is printed"
        )
    matched = sum(1 for own, _ in report.by_name + report.by_shape if not own.endswith(COUNTER))
    if by_order and matched < MIN_MATCHED * wanted:
        raise ConfigError(
            f"{path}: only {matched} of the {wanted} tensors of the {backbone} network fit the file, by name or by "
            f"order and shape; it does not hold this network's weights ({report.describe()})"
        )


def _check_outputs(path: str | Path, backbone: str, net: ASCModel) -> None:
    """The imported network must give finite class scores on a fixed input."""
    rate = net.cfg.frontend.sample_rate
    g = torch.Generator().manual_seed(0)
    wave = torch.randn(2, rate, generator=g) * 0.1
    city = torch.zeros(2, dtype=torch.long)  # <unk>: the one city every network knows
    times = torch.zeros(2, len(TIME_FEATURES))
    net.eval()
    with torch.no_grad():
        logits = net(wave, city, times)
    if not torch.isfinite(logits).all():
        raise ConfigError(f"{path}: the {backbone} network with these weights gives non-finite outputs")
