"""fit / evaluate / predict: the one training loop, plain PyTorch (no Ray import).

``fit`` runs in a single process, or in each process of a torch.distributed group (as Ray Train
starts it): it then wraps the model in DDP, shards every loader by rank and gathers validation
predictions from all ranks, so metrics are over the whole validation set.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .audio import FeatureStore
from .codebook import codebook_clips, frame_codebook
from .config import TrainConfig
from .curves import Curves
from .datafolder import PreparedData, load_dataset
from .errors import ConfigError, RayscError
from .experiment import RECORD_METRICS, RUNNING_BEST, score_of
from .feature_cache import FeatureCache
from .fileio import atomic_path, write_csv, write_json
from .loader import Batch, ClipTable, make_loader
from .metrics import classification_report, confusion_matrix, unk_columns
from .models import ASCModel, create_model, list_models, load_model, load_tensors, model_class, save_model
from .models.base import config_to_dict
from .pseudo_labels import Selection, read_candidates, select

log = logging.getLogger(__name__)

PARTIAL = ".partial"  # a checkpoint being written

# report(metrics, checkpoint_dir): called once per epoch by every rank; only rank 0 passes a
# checkpoint directory (model.pt = current weights, best.pt = best so far, state.pt = the rest).
Report = Callable[[dict[str, Any], Path | None], None]
EPOCH_METRICS = RECORD_METRICS  # validation metrics reported every epoch


def read_pseudo_labels(path: str | Path, manifest: pd.DataFrame, cfg: TrainConfig, classes: list[str]) -> pd.DataFrame:
    """Pseudo-labelled clips usable to train fold ``cfg.fold``: candidates outside the validation
    fold, selected with the run's settings. Columns: filename, one target per class, weight."""
    table = read_candidates(path, manifest, classes)
    if cfg.session_labels:  # clips of labelled sessions train with their session's label instead
        has_label = manifest.set_index("filename")["session_label"].reindex(table["filename"]).notna().to_numpy()
        table = table[~has_label].reset_index(drop=True)
    folds = manifest.set_index("filename")["fold"].reindex(table["filename"]).to_numpy()
    sel = Selection(
        threshold=cfg.pseudo_threshold,
        weight=cfg.pseudo_weight,
        adaptive=cfg.pseudo_adaptive,
        balance=cfg.pseudo_balance,
        targets=cfg.pseudo_targets,
        confidence_weight=cfg.pseudo_confidence_weight,
    )
    selected, summary = select(table, classes, sel, exclude=folds == cfg.fold)
    log.info(
        "pseudo-labels: %d of %d clips kept (validation fold %d excluded, threshold %.2f); per class: %s",
        len(selected),
        len(table),
        cfg.fold,
        cfg.pseudo_threshold,
        ", ".join(f"{r['class']} {r['kept']}/{r['candidates']}" for _, r in summary.iterrows()),
    )
    return selected


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device() -> torch.device:
    """The one device choice: this process's CUDA device when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean of -sum_c target_c log p_c (targets may be soft)."""
    per_clip = -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    return (per_clip * weight).sum() / weight.sum().clamp_min(1e-8)


def augment(batch: Batch, cfg: TrainConfig, sample_rate: int, g: torch.Generator, hop_length: int = 1) -> Batch:
    """Circular time shift, then mixup of inputs, targets and weights (the metadata of the
    dominant clip is kept: lambda >= 0.5). A batch of cached log-mels (``batch.spec``) is
    shifted by whole frames of ``hop_length`` samples and mixed in the log-mel domain."""
    wave, spec, target, weight = batch.wave, batch.spec, batch.target, batch.weight
    n = len(batch.filename)
    if cfg.time_shift > 0:
        limit = int(cfg.time_shift * sample_rate)
        shift = torch.randint(-limit, limit + 1, (n, 1), generator=g).to(target.device)
        if spec is None:
            wave = _roll(wave, shift)
        else:
            frames = torch.div(shift, hop_length, rounding_mode="floor")
            spec = _roll(spec.transpose(2, 3), frames).transpose(2, 3)  # [B, 1, T, F]: roll the frames
    if cfg.mixup_alpha > 0 and torch.rand((), generator=g).item() < cfg.mixup_prob:
        lam = torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha).sample().item()
        lam = max(lam, 1 - lam)
        perm = torch.randperm(n, generator=g).to(target.device)
        if spec is None:
            wave = lam * wave + (1 - lam) * wave[perm]
        else:
            spec = lam * spec + (1 - lam) * spec[perm]
        target = lam * target + (1 - lam) * target[perm]
        weight = lam * weight + (1 - lam) * weight[perm]
    return batch._replace(wave=wave, spec=spec, target=target, weight=weight)


def _roll(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each row of ``x`` [B, ..., L] rolled circularly along its last axis by its own ``shift`` [B, 1]."""
    length = x.shape[-1]
    idx = (torch.arange(length, device=x.device).unsqueeze(0) - shift) % length  # [B, L]
    idx = idx.view(idx.shape[0], *([1] * (x.dim() - 2)), length).expand_as(x)
    return x.gather(-1, idx)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int = 1) -> float:
    """Learning-rate multiplier for optimiser step ``step`` (0-based): linear warm-up, then the
    schedule. The schedule moves every step, not every pass: on a few hundred clips an epoch is
    a handful of steps, and a per-epoch staircase would warm up and decay in coarse jumps.
    ``step_size`` and ``epochs`` are converted with ``steps_per_epoch``. The warm-up takes at most a
    quarter of the run, so a warm-up sized for a large data set still leaves a schedule."""
    warmup = min(cfg.warmup_steps, cfg.epochs * steps_per_epoch // 4)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    s = step - warmup
    if cfg.schedule == "step":
        return cfg.gamma ** (s // (cfg.step_size * steps_per_epoch))
    if cfg.schedule == "cosine":
        span = max(1, cfg.epochs * steps_per_epoch - warmup - 1)
        floor = cfg.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, span) / span))
    return 1.0


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    table: ClipTable,
    store: FeatureStore,
    *,
    batch_size: int = 64,
    device: torch.device | None = None,
    amp: bool = False,
    cache: FeatureCache | None = None,
    unknown_city: bool = False,
    with_unknown_city: bool = False,
) -> pd.DataFrame:
    """Class probabilities for every clip of ``table`` on this rank's share, keyed by filename
    (from cached log-mels when ``cache`` is given). With ``unknown_city``, every clip's city is
    given to the model as ``<unk>``; with ``with_unknown_city``, the ``<unk>`` probabilities come
    too, in the columns ``unk_columns``, from the same pass through the trunk."""
    if unknown_city and with_unknown_city:
        raise ValueError("predict: unknown_city and with_unknown_city exclude each other")
    rank, world = _rank_world()
    device = device or next(model.parameters()).device
    net = _unwrap(model)  # no DDP in inference: each rank predicts its own share
    net.eval()
    classes = list(net.cfg.classes)
    columns = classes + (unk_columns(classes) if with_unknown_city else [])
    names, probs = [], []
    loader = make_loader(
        table, store, batch_size=batch_size, shuffle=False, seed=0, rank=rank, world_size=world, cache=cache
    )
    for batch in loader:
        b = batch.to(device)
        unk = torch.zeros_like(b.city)  # 0 = <unk>
        cities = [unk] if unknown_city else [b.city, unk] if with_unknown_city else [b.city]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net.logits_per_city(b.wave, cities, b.time, spec=b.spec)
        probs.append(torch.cat([torch.softmax(x.float(), dim=-1) for x in logits], dim=-1).cpu().numpy())
        names += b.filename
    return pd.DataFrame(np.concatenate(probs) if probs else np.zeros((0, len(columns))), columns=columns).assign(
        filename=names
    )[["filename", *columns]]


def gather_predictions(local: pd.DataFrame) -> pd.DataFrame:
    """All ranks' predictions, once per filename (evaluation samplers repeat a few clips)."""
    _, world = _rank_world()
    if world == 1:
        return local
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local)
    return pd.concat(parts, ignore_index=True).drop_duplicates("filename")


def _unwrap(model: torch.nn.Module) -> ASCModel:
    """The network inside a DDP wrapper and/or torch.compile's module."""
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)


def _init_weights(model: ASCModel, cfg: TrainConfig) -> None:
    """Copy every tensor whose name and shape match from a model artefact (pretrain -> fine-tune)."""
    source = load_model(cfg.init_from).state_dict()
    own = model.state_dict()
    skip = ("head.",) if cfg.reset_head else ()
    copied = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape and not k.startswith(skip)}
    if not copied:
        raise ConfigError(f"init_from {cfg.init_from}: no weight matches the {cfg.backbone} network")
    model.load_state_dict(copied, strict=False)
    log.info(
        "initialised %d of %d tensors from %s%s",
        len(copied),
        len(own),
        cfg.init_from,
        " (head re-initialised)" if cfg.reset_head else "",
    )


def _freeze(model: ASCModel, prefixes: tuple[str, ...]) -> None:
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"freeze: no parameter of {model.name} starts with {prefix!r} (top-level: {tops})")
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)


def check_cache_use(cfg: TrainConfig, model: ASCModel) -> None:
    """A city-centred trunk embedding exists only where the feature cache is read.

    Raises:
        ConfigError: ``city_centred`` with ``cache_features: false``.
    """
    if model.cfg.frontend.city_centred and not cfg.cache_features:
        raise ConfigError(
            f"{model.name}: its front end's city_centred embedding is read from the feature cache; "
            "cache_features: false would train it on the uncentred embedding"
        )


def check_inputs(cfg: TrainConfig, data_dir: str | Path) -> PreparedData:
    """Everything a run needs, checked before any process starts.

    The data folder, the fold, the network (front end at the data's rate, ``init_from`` and
    ``freeze``) and the pseudo-labels: a launcher calls it before it starts Ray.

    Args:
        cfg: the training configuration.
        data_dir: a prepared data folder.

    Returns:
        The data folder, opened.

    Raises:
        DataError: not a prepared data folder, or pseudo-labels that are missing or do not
            fit it.
        ConfigError: a fold the data folder lacks, or a network that cannot be built as
            configured.
    """
    data = load_dataset(data_dir, repeat=cfg.repeat)
    data.check_fold(cfg.fold, subset=cfg.train_on)
    check_cache_use(cfg, build_model(cfg, data))
    if cfg.pseudo_labels:
        read_candidates(cfg.pseudo_labels, data.manifest, data.classes)
    return data


def build_model(cfg: TrainConfig, data: PreparedData) -> ASCModel:
    """The configured network for ``data`` (its classes, cities and sample rate), initialised
    from ``init_from`` and with ``freeze`` applied."""
    overrides = cfg.model_overrides(classes=data.classes, cities=data.cities, sample_rate=data.store.spec.sample_rate)
    model = create_model(cfg.backbone, **overrides)
    model.frontend.load_pretrained()  # a trunk's published weights (fetched once per machine)
    if cfg.init_from:
        _init_weights(model, cfg)
    _freeze(model, cfg.freeze + (_low_level_blocks(model) if cfg.freeze_low_level else ()))
    return model


def _low_level_blocks(model: ASCModel) -> tuple[str, ...]:
    """The parameter prefixes of the backbone's low-level blocks (``freeze_low_level``)."""
    blocks = getattr(model.cfg, "low_level_blocks", ())
    if not blocks:
        having = [n for n in list_models() if any(f.name == "low_level_blocks" for f in _fields(n))]
        raise ConfigError(f"freeze_low_level: {model.name} names no low-level blocks (backbones that do: {having})")
    return tuple(blocks)


def _fields(backbone: str) -> tuple:
    return fields(model_class(backbone).config_class)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimiser over the trainable tensors: the head at ``lr``, the rest (the trunk) at
    ``lr * trunk_lr_scale`` (fine-tuning a pretrained trunk gently). The schedule scales both."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if n.startswith("head.")]
    trunk = [p for n, p in named if not n.startswith("head.")]
    groups = [g for g in ({"params": trunk, "lr": cfg.lr * cfg.trunk_lr_scale}, {"params": head}) if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def session_labelled(data: PreparedData, fold: int) -> pd.DataFrame:
    """Unlabelled clips that take their session's label, outside validation fold ``fold``
    (folds follow sessions: this only restates that no validation session trains)."""
    m = data.manifest
    rows = m[(m["subset"] == "unlabelled") & m["session_label"].notna() & (m["fold"] != fold)]
    return rows.assign(label=rows["session_label"])


def training_table(cfg: TrainConfig, data: PreparedData, train_rows: pd.DataFrame) -> ClipTable:
    """The labelled training clips, the session-labelled ones, and the pseudo-labels this run
    selects among the rest (never from its validation fold)."""
    tables = [ClipTable.from_rows(train_rows, data.one_hot(train_rows))]
    if cfg.session_labels and cfg.train_on == "labelled":
        rows = session_labelled(data, cfg.fold)
        weight = np.full(len(rows), cfg.session_label_weight, np.float32)
        tables.append(ClipTable.from_rows(rows, data.one_hot(rows), weight))
    if cfg.pseudo_labels:
        pseudo = read_pseudo_labels(cfg.pseudo_labels, data.manifest, cfg, data.classes)
        rows = data.manifest.set_index("filename").loc[pseudo["filename"]].reset_index()
        tables.append(ClipTable.from_rows(rows, pseudo[data.classes].to_numpy(), pseudo["weight"].to_numpy()))
    return ClipTable.concat(tables)


def _copy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state_dict.items()}


@dataclass
class TrainState:
    """Where a run stands after ``epoch`` epochs: what a checkpoint holds besides the current
    weights, the optimiser and the schedule."""

    epoch: int  # epochs done
    best: dict[str, Any]  # validation report of the best epoch (empty without validation)
    best_weights: dict[str, torch.Tensor]
    best_predictions: pd.DataFrame | None
    history: list[dict[str, Any]]
    best_step: int = 0  # optimiser steps done at the best epoch (early stopping)
    resumed: list[int] = field(default_factory=list)  # epochs at which the run was resumed

    def keep_as_best(self, report: dict[str, Any], predictions: pd.DataFrame, model: ASCModel, *, step: int) -> None:
        """The epoch just done (``self.epoch``) becomes the run's result: its validation report,
        predictions and a copy of its weights."""
        self.best = {**report, "epoch": self.epoch}
        self.best_weights = _copy(model.state_dict())
        self.best_predictions = predictions
        self.best_step = step

    def save(
        self, path: Path, model: ASCModel, opt: torch.optim.Optimizer, sched: Any, cfg: TrainConfig, *, final: bool
    ) -> Path:
        """A checkpoint is also a readable run so far: metrics.json (``final`` says whether
        training ended there) and the best epoch's val_predictions.csv, so a run stopped from
        outside (by a scheduler) still leaves a usable result."""
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / "metrics.json", {**self.metrics(), "final": final})
        if self.best_predictions is not None:
            write_csv(path / "val_predictions.csv", self.best_predictions)
        save_model(model, path / "model.pt", metrics={}, train_config=cfg.to_dict())
        current = _copy(model.state_dict())
        model.load_state_dict(self.best_weights)
        save_model(model, path / "best.pt", metrics=_scalars(self.best), train_config=cfg.to_dict())
        model.load_state_dict(current)
        state = {
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": self.epoch - 1,
            "best_step": self.best_step,
            "best": json.dumps(self.best),
            "history": json.dumps(self.history),
            "resumed": json.dumps(self.resumed),
            "torch_rng": torch.get_rng_state(),
        }
        with atomic_path(path / "state.pt") as tmp:
            try:
                torch.save(state, tmp)
            except RuntimeError as exc:  # torch's writer reports a full disk this way
                raise OSError(str(exc)) from exc
        return path

    @classmethod
    def load(
        cls, path: Path, model: ASCModel, opt: torch.optim.Optimizer, sched: Any, device: torch.device
    ) -> TrainState:
        """Restore a checkpoint into ``model``, ``opt`` and ``sched``; the RNG continues as if the
        run had never stopped (dropout, mixup)."""
        try:
            raw = load_tensors(path / "state.pt", what="training state", map_location=device)
            current = load_model(path / "model.pt")
        except RayscError as exc:
            # Never train from scratch silently: the run stops, naming the checkpoint.
            raise RayscError(
                f"{path}: the checkpoint to resume from is damaged ({exc}); delete that folder and resume again: "
                "the run then continues from the checkpoint before it, or starts over where none is kept"
            ) from None
        model.load_state_dict(current.state_dict())
        opt.load_state_dict(raw["optimizer"])
        sched.load_state_dict(raw["scheduler"])
        predictions = path / "val_predictions.csv"
        epoch = raw["epoch"] + 1
        state = cls(
            epoch=epoch,
            best=json.loads(raw["best"]),
            best_weights=load_model(path / "best.pt").state_dict(),
            best_predictions=pd.read_csv(predictions) if predictions.is_file() else None,
            history=json.loads(raw["history"]),
            best_step=raw.get("best_step", 0),
            resumed=[*json.loads(raw.get("resumed", "[]")), epoch + 1],
        )
        torch.set_rng_state(raw["torch_rng"].cpu())  # last: building the models above draws random numbers
        return state

    def metrics(self) -> dict[str, Any]:
        return {"best": self.best, "history": self.history, "resumed_at_epochs": self.resumed}


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` returns.

    Attributes:
        best: the validation report of the best epoch (``classification_report``; empty
            without validation).
        history: every epoch's metrics, in order.
        model: the network with the best epoch's weights.
        predictions: the best epoch's validation predictions, or None without validation.
    """

    best: dict[str, Any]
    history: list[dict[str, Any]]
    model: ASCModel
    predictions: pd.DataFrame | None


@dataclass
class Step:
    """What one optimiser step needs: the network to train (DDP-wrapped or compiled), its
    parameters, optimiser and schedule, where it runs, and the curves it writes to."""

    net: torch.nn.Module
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: Any
    device: torch.device
    amp: bool
    curves: Curves


def _train_epoch(
    step: Step, loader: Any, cfg: TrainConfig, g: torch.Generator, sample_rate: int, hop_length: int
) -> float:
    """One pass over the training clips; returns the mean training loss per clip."""
    step.net.train()
    loss_sum, clips = torch.zeros((), device=step.device), 0
    for batch in loader:
        b = augment(batch.to(step.device), cfg, sample_rate, g, hop_length)
        with torch.autocast(device_type=step.device.type, dtype=torch.bfloat16, enabled=step.amp):
            logits = step.net(b.wave, b.city, b.time, b.target, spec=b.spec)
        target = b.target * (1 - cfg.label_smoothing) + cfg.label_smoothing / b.target.shape[1]
        loss = soft_cross_entropy(logits, target, b.weight)
        step.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(step.params, cfg.grad_clip)
        step.opt.step()
        step.curves.step(step.sched.last_epoch + 1, loss.item(), step.opt.param_groups[-1]["lr"])
        step.sched.step()
        loss_sum += loss.detach() * len(b.filename)
        clips += len(b.filename)
    return loss_sum.item() / max(clips, 1)


def _save_checkpoint(
    state: TrainState,
    ckpt_dir: Path,
    model: ASCModel,
    opt: torch.optim.Optimizer,
    sched: Any,
    cfg: TrainConfig,
    *,
    final: bool,
) -> Path:
    """The epoch's checkpoint, written under a temporary name and renamed (a kill mid-write
    leaves the previous checkpoint as the latest whole one); only the latest is kept, since a
    reporter has taken its copy of the earlier ones."""
    written = ckpt_dir / f"epoch-{state.epoch:04d}"
    partial = state.save(written.with_name(written.name + PARTIAL), model, opt, sched, cfg, final=final)
    shutil.rmtree(written, ignore_errors=True)
    partial.rename(written)
    for old in ckpt_dir.glob("epoch-*"):
        if old != written:
            shutil.rmtree(old, ignore_errors=True)
    return written


def _build(
    cfg: TrainConfig, data: PreparedData, dev: torch.device, *, amp: bool, world: int, clips: int, resume: Any
) -> tuple[ASCModel, FeatureCache | None, Step, int]:
    """The network on ``dev`` (its frame codebook fitted when new), the log-mel cache it reads,
    what an optimiser step needs (DDP over ``world`` ranks, compiled on request), and the batch
    each rank takes."""
    model = build_model(cfg, data).to(dev)
    check_cache_use(cfg, model)
    # The log-mel of every clip, computed once per data folder and front end (not for a network
    # that also reads the waveform).
    use_cache = cfg.cache_features and not model.uses_wave
    cache = FeatureCache.ensure(data.out, data.store, model.cfg.frontend) if use_cache else None
    if model.codebook_size and not resume and not model.codebook.any():
        # Unsupervised, so the unlabelled clips count; no clip of a validation session does. A
        # pretrained network (init_from) keeps the codebook its later layers were trained with.
        frames = codebook_clips(data.manifest, cfg.fold, cfg.train_on)
        centroids_from = cache or FeatureCache.ensure(data.out, data.store, model.cfg.frontend)
        model.codebook.copy_(frame_codebook(centroids_from, frames, model.codebook_size).to(dev))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, model)
    per_rank_batch = max(1, cfg.batch_size // world)  # batch_size is the global batch
    per_rank = math.ceil(clips / world)  # the same on every rank (the sampler pads)
    steps_per_epoch = per_rank // per_rank_batch + (per_rank % per_rank_batch > 1)  # see make_loader
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg, step, steps_per_epoch))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The compiled module trains; ``model`` (the same parameters) is what is saved and validated.
    fast = torch.compile(model) if cfg.compile else model
    # With fusion "none" the metadata encoder gets no gradient; DDP must be told.
    unused = model.cfg.fusion == "none"
    net = torch.nn.parallel.DistributedDataParallel(fast, find_unused_parameters=unused) if world > 1 else fast
    step = Step(net=net, params=params, opt=opt, sched=sched, device=dev, amp=amp, curves=Curves(None))
    return model, cache, step, per_rank_batch


def _said(metrics: dict[str, Any]) -> str:
    """An epoch's float metrics as one log line's ``key=value`` pairs."""
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "finished_at")


def _trunk_info(cfg: TrainConfig, data: PreparedData, train_rows: pd.DataFrame) -> dict[str, Any] | None:
    """What a fine-tuning run needs to know about a pretrained trunk: the pretraining classes and
    clips it trained on (None for a run that is not pretraining)."""
    if cfg.train_on != "pretrain":
        return None
    trained = sorted(set(train_rows["label"]), key=data.classes.index)
    return {"subset": "pretrain", "classes": trained, "clips": len(train_rows)}


def _start_state(
    resume: str | Path | None, model: ASCModel, opt: torch.optim.Optimizer, sched: Any, dev: torch.device
) -> TrainState:
    """A new run's state, or the state of the checkpoint it resumes from (loaded into ``model``,
    ``opt`` and ``sched``)."""
    if not resume:
        return TrainState(epoch=0, best={}, best_weights=_copy(model.state_dict()), best_predictions=None, history=[])
    state = TrainState.load(Path(resume), model, opt, sched, dev)
    log.info("resuming at epoch %d from %s", state.epoch + 1, resume)
    return state


def _best_predictions(
    state: TrainState,
    net: torch.nn.Module,
    val: ClipTable,
    val_rows: pd.DataFrame,
    data: PreparedData,
    *,
    evaluate_again: bool,
    **eval_kw: Any,
) -> None:
    """The best epoch's validation predictions (evaluated again, with the best weights loaded,
    for a resumed run whose checkpoint did not keep them) and its confusion matrix, in ``state``."""
    if state.best_predictions is None and evaluate_again:
        state.best_predictions, _ = evaluate(net, val, val_rows, data, **eval_kw)
    if state.best_predictions is not None:
        pred = state.best_predictions.set_index("filename").loc[val_rows["filename"], data.classes].to_numpy()
        state.best["confusion"] = confusion_matrix(data.labels(val_rows), pred.argmax(1), len(data.classes)).tolist()


def fit(
    cfg: TrainConfig,
    data_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    report: Report | None = None,
    resume: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
) -> FitResult:
    """Train ``cfg`` on a prepared data folder; validate on fold ``cfg.fold`` every epoch (in one
    process, or as one rank of a DDP group: the loop is the same).

    Args:
        cfg: the training configuration.
        data_dir: a prepared data folder.
        out_dir: where rank 0 writes config.json, model.pt (the best epoch), metrics.json and
            val_predictions.csv; None writes nothing.
        report: called after each epoch with its metrics and a checkpoint directory (Ray
            Tune's and Ray Train's report).
        resume: a checkpoint directory to continue from.
        checkpoint_dir: where each epoch's checkpoint goes (default ``out_dir/checkpoint``).

    Returns:
        The best epoch's validation report, the history, its weights and its predictions.

    Raises:
        DataError: not a prepared data folder, or unreadable pseudo-labels.
        ConfigError: a fold the data folder lacks, or a network it cannot build.
    """
    rank, world = _rank_world()
    dev = device()
    use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and dev.type == "cuda")
    log.info("training on %s, rank %d of %d, bf16 autocast %s", dev, rank, world, "on" if use_amp else "off")
    seed_everything(cfg.seed)  # the same on every rank: identical initial weights

    # ---- data: the training folds (+ pseudo-labels), the validation fold
    data = load_dataset(data_dir, repeat=cfg.repeat)
    data.check_fold(cfg.fold, subset=cfg.train_on)
    train_rows, val_rows = data.split(cfg.fold, cfg.train_on)
    train = training_table(cfg, data, train_rows)
    val = ClipTable.from_rows(val_rows, data.one_hot(val_rows)) if len(val_rows) else None
    # The score that picks the best epoch (and that a search maximises) mixes in the validation
    # clips scored with their city as <unk>, in the share of eval clips from unseen cities.
    unseen_weight = data.unseen_weight(cfg.unseen_weight)
    if val is not None:
        log.info("objective: macro accuracy, %.2f of it from the city held out (<unk>)", unseen_weight)

    # ---- model, optimiser, schedule
    model, cache, step, per_rank_batch = _build(
        cfg, data, dev, amp=use_amp, world=world, clips=len(train), resume=resume
    )
    net, opt, sched = step.net, step.opt, step.sched

    state = _start_state(resume, model, opt, sched, dev)
    out_dir = Path(out_dir) if out_dir else None
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else (out_dir / "checkpoint" if out_dir else None)

    # A run resumed from its final checkpoint (Tune restarts a trial that ended after its last
    # saved state) trains no more, but tells its reporter the last result again: a trial that
    # reports nothing has no metric for the scheduler and the sampler.
    patience_spent = 0 < cfg.patience_steps <= sched.last_epoch - state.best_step
    finished = bool(state.history) and (state.epoch >= cfg.epochs or (patience_spent and val is not None))
    if finished and report is not None:
        report({**{k: v for k, v in state.history[-1].items() if v is not None}, "final": True}, None)
    step.curves = curves = Curves(out_dir if rank == 0 and not finished else None, resumed_at_step=sched.last_epoch)

    # ---- the loop
    shard = {"batch_size": per_rank_batch, "seed": cfg.seed, "rank": rank, "world_size": world, "cache": cache}
    eval_kw = {"batch_size": per_rank_batch, "device": dev, "amp": use_amp, "cache": cache}
    for epoch in range(state.epoch, state.epoch if finished else cfg.epochs):
        t0 = time.perf_counter()
        loader = make_loader(train, data.store, shuffle=True, epoch=epoch, workers=cfg.loader_workers, **shard)
        g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 31 + rank)
        train_loss = _train_epoch(step, loader, cfg, g, data.store.spec.sample_rate, model.cfg.frontend.hop_length)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "lr": opt.param_groups[-1]["lr"],  # the head's (the trunk's is scaled by trunk_lr_scale)
            "train_clips": len(train),
            "steps": sched.last_epoch,  # optimiser steps so far (LambdaLR counts them as its "epochs")
            "ranks": world,  # DDP processes that trained it (1: one process)
        }
        state.epoch = epoch + 1

        # Validation every epoch: the best epoch's weights and predictions are the run's result.
        if val is not None:
            preds, rep = evaluate(net, val, val_rows, data, unseen_weight=unseen_weight, **eval_kw)
            if cfg.keep_last or not state.best or rep["score"] > score_of(state.best):
                state.keep_as_best(rep, preds, model, step=sched.last_epoch)
            metrics |= {k: rep[k] for k in EPOCH_METRICS}
            metrics[RUNNING_BEST] = score_of(state.best)
        else:
            state.best_weights = _copy(model.state_dict())
        metrics["epoch_seconds"] = time.perf_counter() - t0
        metrics["finished_at"] = time.time()  # successive epochs' difference: the loop's whole cost per epoch
        state.history.append(metrics)
        curves.epoch(sched.last_epoch, metrics)
        log.info("epoch %d/%d %s", epoch + 1, cfg.epochs, _said(metrics))

        stop = val is not None and 0 < cfg.patience_steps <= sched.last_epoch - state.best_step
        metrics["final"] = stop or epoch + 1 == cfg.epochs  # the run ends here (a scheduler's stop is not final)
        written = None
        if rank == 0 and ckpt_dir is not None:
            written = _save_checkpoint(state, ckpt_dir, model, opt, sched, cfg, final=metrics["final"])
        if report is not None:
            report({k: v for k, v in metrics.items() if v is not None}, written)
        if stop:
            log.info("early stop: no better validation macro accuracy for %d steps", cfg.patience_steps)
            break

    # ---- the result: the best epoch's weights, its predictions and confusion matrix
    curves.close()
    model.load_state_dict(state.best_weights)
    if val is not None:
        _best_predictions(state, net, val, val_rows, data, evaluate_again=bool(resume), **eval_kw)
    if rank == 0 and out_dir is not None:
        _write_outputs(
            out_dir, cfg, model, state.metrics(), state.best_predictions, pretrained=_trunk_info(cfg, data, train_rows)
        )
    return FitResult(best=state.best, history=state.history, model=model.eval(), predictions=state.best_predictions)


def evaluate(
    net: torch.nn.Module,
    val: ClipTable,
    val_rows: pd.DataFrame,
    data: PreparedData,
    *,
    batch_size: int,
    device: torch.device,
    amp: bool,
    cache: FeatureCache | None = None,
    unseen_weight: float = 0.0,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Validation predictions over every rank's share, in ``val_rows``' order, with the same
    clips predicted with their city as ``<unk>`` (columns ``unk_columns``), and their report (with
    ``predict_seconds``: the time of that one pass)."""
    kw = {"batch_size": batch_size, "device": device, "amp": amp, "cache": cache}
    t0 = time.perf_counter()
    preds = gather_predictions(predict(net, val, data.store, with_unknown_city=True, **kw))
    seconds = time.perf_counter() - t0
    preds = preds.set_index("filename").loc[val_rows["filename"]].reset_index()
    rep = classification_report(
        preds[data.classes].to_numpy(),
        data.labels(val_rows),
        classes=data.classes,
        cities=val_rows["city"].to_numpy(),
        seen=val_rows["seen"].to_numpy(),
        unk_probs=preds[unk_columns(data.classes)].to_numpy(),
        unseen_weight=unseen_weight,
    )
    return preds, {**rep, "predict_seconds": seconds}


def _scalars(report: dict) -> dict:
    return {k: v for k, v in report.items() if isinstance(v, int | float) or v is None}


def _write_outputs(
    out_dir: Path,
    cfg: TrainConfig,
    model: ASCModel,
    metrics: dict,
    predictions: pd.DataFrame | None,
    *,
    pretrained: dict | None = None,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", {"train": cfg.to_dict(), "model": config_to_dict(model.cfg)})
    extra = {"pretrained": pretrained} if pretrained else {}
    save_model(model, out_dir / "model.pt", metrics=_scalars(metrics["best"]), train_config=cfg.to_dict(), **extra)
    write_json(out_dir / "metrics.json", metrics)
    if predictions is not None:
        write_csv(out_dir / "val_predictions.csv", predictions)
