"""The backbone registry, model artefacts (save/load), and size counters."""

from __future__ import annotations

import hashlib
import pickle
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import __version__
from ..errors import ConfigError, RayscError
from ..fileio import atomic_path
from .base import ASCModel, apply_overrides, config_to_dict

ARTEFACT_FORMAT = 1
_REGISTRY: dict[str, type[ASCModel]] = {}
M = TypeVar("M", bound=type[ASCModel])


def register(name: str) -> Callable[[M], M]:
    def deco(cls: M) -> M:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_models() -> list[str]:
    """Every registered backbone's name, sorted (the names ``create_model`` takes).

    Returns:
        The backbone names.
    """
    return sorted(_REGISTRY)


def model_class(name: str) -> type[ASCModel]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backbone {name!r} (valid: {', '.join(list_models())})")
    return _REGISTRY[name]


def create_model(name: str, /, **overrides: Any) -> ASCModel:
    """The paper-default network ``name`` with ``overrides``.

    Args:
        name: a backbone (``list_models``).
        **overrides: fields of the backbone's config dataclass, as dotted keys
            (``"frontend.n_mels"``) or nested mappings; ``width``, ``classes``, ``cities``...

    Returns:
        The network, untrained.

    Raises:
        ConfigError: an unknown backbone or an unknown or invalid override.
    """
    cls = model_class(name)
    return cls(apply_overrides(cls.config_class(), overrides, where=name))


def save_model(model: ASCModel, path: str | Path, **info: Any) -> None:
    """Write one self-describing file: backbone, config (front end, classes, cities included),
    weights and their SHA-256, ``info`` and versions. Written atomically.

    Args:
        model: the network.
        path: the file to write.
        **info: anything to keep with it; ``metrics=`` is kept apart (``model.artefact``).
    """
    cfg = config_to_dict(model.cfg)
    payload = {
        "format": ARTEFACT_FORMAT,
        "backbone": model.name,
        "config": cfg,
        "frontend": cfg["frontend"],
        "classes": list(model.cfg.classes),
        "cities": list(model.cfg.cities),
        "state_dict": (state := {k: v.detach().cpu() for k, v in model.state_dict().items()}),
        "weights_sha256": weights_hash(state),
        "metrics": info.pop("metrics", {}),
        "info": info,
        "versions": {"raysc": __version__, "torch": str(torch.__version__), "python": platform.python_version()},
    }
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:  # torch's writer reports a full disk this way
            raise OSError(str(exc)) from exc


# What torch.load raises on a file that is not a PyTorch file, or is cut short or damaged (a text
# file's first byte is read as an unknown pickle opcode: KeyError).
UNREADABLE = (OSError, RuntimeError, EOFError, KeyError, ValueError, IndexError, TypeError, AttributeError)


def load_tensors(path: str | Path, *, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, with one clear line for a file it refuses.

    Raises:
        RayscError: the file holds Python objects beyond tensors and plain values (a pickle
            that could run code is refused, and never retried another way), or it is not a
            readable PyTorch file (damaged, cut short, or another format).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names what it refused as a "GLOBAL" (a class or function the pickle would call);
        # without one, the bytes are no pickle it can read.
        found = [line.strip().rstrip(".") for line in str(exc).splitlines() if "GLOBAL" in line]
        if not found:
            raise RayscError(f"{path}: not a readable {what} (damaged, cut short, or not a PyTorch file)") from None
        raise RayscError(
            f"{path}: refused: it holds Python objects beyond tensors and plain values ({found[0]}); loading it "
            f"could run code, so raysc reads a {what} only as plain tensors"
        ) from None
    except UNREADABLE:
        raise RayscError(f"{path}: not a readable {what} (damaged, cut short, or not a PyTorch file)") from None


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu") -> ASCModel:
    """Rebuild the network saved by ``save_model``, loaded with ``weights_only=True``.

    Args:
        path: a file ``save_model`` wrote.
        map_location: where the tensors go (``torch.load``'s ``map_location``).

    Returns:
        The network in eval mode; its ``artefact`` holds the rest of the file (metrics, info,
        versions).

    Raises:
        RayscError: not a raysc model file, one that lacks a part, damaged weights (their hash),
            or weights that do not fit the network its config builds.
    """
    payload = load_tensors(path, what="raysc model file", map_location=map_location)
    if not isinstance(payload, dict) or payload.get("format") != ARTEFACT_FORMAT:
        raise RayscError(f"{path}: not a raysc model file of format {ARTEFACT_FORMAT}")
    missing = [k for k in ("backbone", "config", "state_dict", "metrics", "info", "versions") if k not in payload]
    if missing:
        raise RayscError(f"{path}: a raysc model file without {missing}")
    cls = model_class(payload["backbone"])
    model = cls(apply_overrides(cls.config_class(), payload["config"], where=str(path)))
    if "weights_sha256" in payload and weights_hash(payload["state_dict"]) != payload["weights_sha256"]:
        raise RayscError(f"{path}: its weights do not match their recorded hash: the file is damaged")
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:  # names or shapes that do not match the network its config builds
        raise RayscError(f"{path}: its weights do not fit its {payload['backbone']} network ({exc})") from None
    model.artefact = {k: payload[k] for k in ("metrics", "info", "versions")}
    return model.eval()


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: ASCModel, *, seconds: float = 10.0) -> int:
    """Multiply-accumulates of one forward pass on one clip (matmuls and convolutions, counted
    by ``torch.utils.flop_counter``; the STFT and elementwise work are not counted)."""
    sr = model.cfg.frontend.sample_rate
    wave = torch.zeros(1, round(sr * seconds))
    city, time = torch.zeros(1, dtype=torch.long), torch.zeros(1, 7)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(wave, city, time)
    model.train(was_training)
    return counter.get_total_flops() // 2
