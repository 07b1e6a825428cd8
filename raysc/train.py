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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .audio import FeatureStore
from .config import TrainConfig
from .data import read_manifest
from .errors import ConfigError, DataError, RayscError
from .fileio import write_csv, write_json
from .loader import Batch, ClipTable, make_loader
from .metrics import classification_report, confusion_matrix
from .models import ASCModel, create_model, load_model, save_model
from .models.base import config_to_dict
from .pseudo import Selection, read_candidates, select

log = logging.getLogger(__name__)

# report(metrics, checkpoint_dir): called once per epoch by every rank; only rank 0 passes a
# checkpoint directory (model.pt = current weights, best.pt = best so far, state.pt = the rest).
Report = Callable[[dict[str, Any], Path | None], None]


@dataclass(frozen=True)
class Dataset:
    manifest: pd.DataFrame
    store: FeatureStore
    classes: list[str]
    cities: list[str]


def load_dataset(data_dir: str | Path) -> Dataset:
    data_dir = Path(data_dir)
    info_path = data_dir / "dataset.json"
    if not info_path.is_file():
        raise DataError([f"{data_dir}: not a prepared data folder (no dataset.json; run `raysc prepare`)"])
    info = json.loads(info_path.read_text())
    return Dataset(read_manifest(data_dir), FeatureStore.open(data_dir / "store"), info["classes"], info["cities"])


def one_hot(labels: pd.Series, classes: list[str]) -> np.ndarray:
    return np.eye(len(classes), dtype=np.float32)[labels.map(classes.index).to_numpy()]


def read_pseudo_labels(path: str | Path, manifest: pd.DataFrame, cfg: TrainConfig, classes: list[str]) -> pd.DataFrame:
    """Pseudo-labelled clips usable to train fold ``cfg.fold``: candidates outside the validation
    fold, selected with the run's settings. Columns: filename, one target per class, weight."""
    table = read_candidates(path, manifest, classes)
    folds = manifest.set_index("filename")["fold"].reindex(table["filename"]).to_numpy()
    sel = Selection(threshold=cfg.pseudo_threshold, weight=cfg.pseudo_weight, adaptive=cfg.pseudo_adaptive,
                    balance=cfg.pseudo_balance, targets=cfg.pseudo_targets,
                    confidence_weight=cfg.pseudo_confidence_weight)  # fmt: skip
    selected, summary = select(table, classes, sel, exclude=folds == cfg.fold)
    log.info("pseudo-labels: %d of %d clips kept (validation fold %d excluded, threshold %.2f); per class: %s",
             len(selected), len(table), cfg.fold, cfg.pseudo_threshold,
             ", ".join(f"{r['class']} {r['kept']}/{r['candidates']}" for _, r in summary.iterrows()))  # fmt: skip
    return selected


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean of -sum_c target_c log p_c (targets may be soft)."""
    per_clip = -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    return (per_clip * weight).sum() / weight.sum().clamp_min(1e-8)


def augment(batch: Batch, cfg: TrainConfig, sample_rate: int, g: torch.Generator) -> Batch:
    """Circular time shift, then mixup of inputs, targets and weights (the metadata of the
    dominant clip is kept: lambda >= 0.5)."""
    wave, target, weight = batch.wave, batch.target, batch.weight
    n, length = wave.shape
    if cfg.time_shift > 0:
        limit = int(cfg.time_shift * sample_rate)
        shift = torch.randint(-limit, limit + 1, (n, 1), generator=g).to(wave.device)
        idx = (torch.arange(length, device=wave.device).unsqueeze(0) - shift) % length
        wave = wave.gather(1, idx)
    if cfg.mixup_alpha > 0 and torch.rand((), generator=g).item() < cfg.mixup_prob:
        lam = torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha).sample().item()
        lam = max(lam, 1 - lam)
        perm = torch.randperm(n, generator=g).to(wave.device)
        wave = lam * wave + (1 - lam) * wave[perm]
        target = lam * target + (1 - lam) * target[perm]
        weight = lam * weight + (1 - lam) * weight[perm]
    return batch._replace(wave=wave, target=target, weight=weight)


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Learning-rate multiplier for ``epoch`` (0-based): linear warm-up, then the schedule."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    e = epoch - cfg.warmup_epochs
    if cfg.schedule == "step":
        return cfg.gamma ** (e // cfg.step_size)
    if cfg.schedule == "cosine":
        span = max(1, cfg.epochs - cfg.warmup_epochs - 1)
        floor = cfg.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(e, span) / span))
    return 1.0


@torch.no_grad()
def predict(model: torch.nn.Module, table: ClipTable, store: FeatureStore, *, batch_size: int = 64,
            device: torch.device | None = None, amp: bool = False) -> pd.DataFrame:  # fmt: skip
    """Class probabilities for every clip of ``table`` on this rank's share, keyed by filename."""
    rank, world = _rank_world()
    device = device or next(model.parameters()).device
    model.eval()
    names, probs = [], []
    for batch in make_loader(table, store, batch_size=batch_size, shuffle=False, seed=0, rank=rank, world_size=world):
        b = batch.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(b.wave, b.city, b.time)
        probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
        names += b.filename
    classes = list(_unwrap(model).cfg.classes)
    return pd.DataFrame(np.concatenate(probs) if probs else np.zeros((0, len(classes))), columns=classes).assign(
        filename=names
    )[["filename", *classes]]


def gather_predictions(local: pd.DataFrame) -> pd.DataFrame:
    """All ranks' predictions, once per filename (evaluation samplers repeat a few clips)."""
    _, world = _rank_world()
    if world == 1:
        return local
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local)
    return pd.concat(parts, ignore_index=True).drop_duplicates("filename")


def _unwrap(model: torch.nn.Module) -> ASCModel:
    return model.module if hasattr(model, "module") else model


def _init_weights(model: ASCModel, cfg: TrainConfig) -> None:
    """Copy every tensor whose name and shape match from a model artefact (pretrain -> fine-tune)."""
    source = load_model(cfg.init_from).state_dict()
    own = model.state_dict()
    skip = ("head.",) if cfg.reset_head else ()
    copied = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape and not k.startswith(skip)}
    if not copied:
        raise ConfigError(f"init_from {cfg.init_from}: no weight matches the {cfg.backbone} network")
    model.load_state_dict(copied, strict=False)
    log.info("initialised %d of %d tensors from %s%s", len(copied), len(own), cfg.init_from,
             " (head re-initialised)" if cfg.reset_head else "")  # fmt: skip


def _freeze(model: ASCModel, prefixes: tuple[str, ...]) -> None:
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"freeze: no parameter of {model.name} starts with {prefix!r} (top-level: {tops})")
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)


@dataclass(frozen=True)
class FitResult:
    best: dict[str, Any]  # validation report of the best epoch (empty without validation)
    history: list[dict[str, Any]]
    model: ASCModel  # best weights
    predictions: pd.DataFrame | None  # validation predictions of the best epoch


def fit(
    cfg: TrainConfig,
    data_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    report: Report | None = None,
    resume: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
) -> FitResult:
    """Train ``cfg`` on a prepared data folder; validate on fold ``cfg.fold`` every epoch.

    ``out_dir`` (rank 0 writes it): config.json, model.pt (best), metrics.json,
    val_predictions.csv. ``report`` receives each epoch's metrics and a checkpoint directory
    (``checkpoint_dir``, default ``out_dir/checkpoint``); ``resume`` continues from one.
    """
    rank, world = _rank_world()
    device = _device()
    use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    seed_everything(cfg.seed)  # the same on every rank: identical initial weights

    # ---- data: the training fold, its validation fold, optional pseudo-labels
    data = load_dataset(data_dir)
    m = data.manifest
    labelled = m[m["subset"] == "labelled"]
    if cfg.fold != -1 and cfg.fold not in set(labelled["fold"]):
        raise ConfigError(
            f"fold {cfg.fold} does not exist in {data_dir} (folds: {sorted(set(labelled['fold']))}, or -1)"
        )
    train_rows = labelled[labelled["fold"] != cfg.fold]
    val_rows = labelled[labelled["fold"] == cfg.fold].copy()
    tables = [ClipTable.from_rows(train_rows, one_hot(train_rows["label"], data.classes))]
    if cfg.pseudo_labels:
        pseudo = read_pseudo_labels(cfg.pseudo_labels, m, cfg, data.classes)
        rows = m.set_index("filename").loc[pseudo["filename"]].reset_index()
        tables.append(ClipTable.from_rows(rows, pseudo[data.classes].to_numpy(), pseudo["weight"].to_numpy()))
    train = ClipTable.concat(tables)
    # A validation clip from a city no training clip comes from is scored as <unk>: that is how
    # the model will meet unseen eval cities, and what makes city-held-out folds honest.
    train_cities = set(train_rows["city_idx"])
    val_rows["seen"] = val_rows["city_idx"].isin(train_cities)
    val_rows.loc[~val_rows["seen"], "city_idx"] = 0
    val = ClipTable.from_rows(val_rows, one_hot(val_rows["label"], data.classes)) if len(val_rows) else None
    sample_rate = data.store.spec.sample_rate

    # ---- model, optimiser, schedule
    overrides = cfg.model_overrides(classes=data.classes, cities=data.cities, sample_rate=sample_rate)
    model = create_model(cfg.backbone, **overrides)
    if cfg.init_from:
        _init_weights(model, cfg)
    _freeze(model, cfg.freeze)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        opt = kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(cfg, e))
    # With fusion "none" the metadata encoder gets no gradient; DDP must be told.
    unused = model.cfg.fusion == "none"
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused) if world > 1 else model
    per_rank_batch = max(1, cfg.batch_size // world)  # batch_size is the global batch

    # ---- resume: weights, optimiser, schedule, progress
    start_epoch, best, history, bad_epochs, resumed = 0, {}, [], 0, []
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if resume:
        state = torch.load(Path(resume) / "state.pt", map_location=device, weights_only=True)
        model.load_state_dict(load_model(Path(resume) / "model.pt").state_dict())
        best_state = load_model(Path(resume) / "best.pt").state_dict()
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, bad_epochs = state["epoch"] + 1, state["bad_epochs"]
        best, history = json.loads(state["best"]), json.loads(state["history"])
        resumed = [*json.loads(state.get("resumed", "[]")), start_epoch + 1]
        torch.set_rng_state(state["torch_rng"].cpu())  # dropout and mixup continue as if never stopped
        log.info("resuming at epoch %d from %s", start_epoch + 1, resume)
    out_dir = Path(out_dir) if out_dir else None
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else (out_dir / "checkpoint" if out_dir else None)

    best_predictions = None
    if resume and (Path(resume) / "val_predictions.csv").is_file():
        best_predictions = pd.read_csv(Path(resume) / "val_predictions.csv")

    # ---- the loop
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        net.train()
        g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 31 + rank)
        loss_sum, clips = torch.zeros((), device=device), 0
        loader = make_loader(train, data.store, batch_size=per_rank_batch, shuffle=True, seed=cfg.seed, epoch=epoch,
                             rank=rank, world_size=world, workers=cfg.loader_workers)  # fmt: skip
        for batch in loader:
            b = augment(batch.to(device), cfg, sample_rate, g)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = net(b.wave, b.city, b.time, b.target)
            target = b.target * (1 - cfg.label_smoothing) + cfg.label_smoothing / b.target.shape[1]
            loss = soft_cross_entropy(logits, target, b.weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            loss_sum += loss.detach() * len(b.filename)
            clips += len(b.filename)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum.item() / max(clips, 1),
                                   "lr": opt.param_groups[0]["lr"], "train_clips": len(train)}  # fmt: skip
        sched.step()
        improved = False
        if val is not None:
            t_pred = time.perf_counter()
            preds = gather_predictions(predict(net, val, data.store, batch_size=per_rank_batch, device=device,
                                               amp=use_amp))  # fmt: skip
            predict_seconds = time.perf_counter() - t_pred
            preds = preds.set_index("filename").loc[val_rows["filename"]].reset_index()
            rep = classification_report(
                preds[data.classes].to_numpy(), val_rows["label"].map(data.classes.index).to_numpy(),
                classes=data.classes, cities=val_rows["city"].to_numpy(), seen=val_rows["seen"].to_numpy(),
            )  # fmt: skip
            improved = not best or rep["macro_accuracy"] > best["macro_accuracy"]
            if improved:
                best = {**rep, "epoch": epoch + 1, "predict_seconds": predict_seconds}
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best_predictions = preds
            bad_epochs = 0 if improved else bad_epochs + 1
            metrics |= {k: rep[k] for k in ("macro_accuracy", "accuracy", "log_loss", "seen_city_macro_accuracy",
                                            "unseen_city_macro_accuracy")}  # fmt: skip
            metrics["best_macro_accuracy"] = best["macro_accuracy"]
        else:
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        metrics["epoch_seconds"] = time.perf_counter() - t0
        history.append(metrics)
        log.info("epoch %d/%d %s", epoch + 1, cfg.epochs,
                 " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))  # fmt: skip

        stop = val is not None and bad_epochs >= cfg.patience
        final = stop or epoch + 1 == cfg.epochs
        metrics["final"] = final  # the run ends here (a scheduler's stop is not a final epoch)
        written = None
        if rank == 0 and ckpt_dir is not None:
            written = _write_checkpoint(ckpt_dir / f"epoch-{epoch + 1:04d}", model, best_state, opt, sched, epoch,
                                        bad_epochs, best, history, resumed, cfg, best_predictions, final)  # fmt: skip
            for old in ckpt_dir.glob("epoch-*"):  # keep the latest only; a reporter has taken its copy
                if old != written:
                    shutil.rmtree(old, ignore_errors=True)
        if report is not None:
            report({k: v for k, v in metrics.items() if v is not None}, written)
        if stop:
            log.info("early stop: no better validation macro accuracy for %d epochs", cfg.patience)
            break

    model.load_state_dict(best_state)
    if best_predictions is None and val is not None and resume:
        best_predictions = gather_predictions(predict(net, val, data.store, batch_size=per_rank_batch, device=device))
    if val is not None and best_predictions is not None:
        y = val_rows["label"].map(data.classes.index).to_numpy()
        pred = best_predictions.set_index("filename").loc[val_rows["filename"], data.classes].to_numpy().argmax(1)
        best["confusion"] = confusion_matrix(y, pred, len(data.classes)).tolist()
    if rank == 0 and out_dir is not None:
        _write_outputs(out_dir, cfg, model, {"best": best, "history": history, "resumed_at_epochs": resumed},
                       best_predictions)  # fmt: skip
    return FitResult(best=best, history=history, model=model.eval(), predictions=best_predictions)


def _write_checkpoint(path: Path, model: ASCModel, best_state: dict, opt, sched, epoch: int, bad_epochs: int,
                      best: dict, history: list, resumed: list, cfg: TrainConfig, best_predictions: pd.DataFrame | None,
                      final: bool) -> Path:  # fmt: skip
    """A checkpoint is also a readable run so far: metrics.json (``final`` says whether training
    ended there) and the best epoch's val_predictions.csv, so a run stopped from outside (by a
    scheduler) still leaves a usable result."""
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "metrics.json", {"best": best, "history": history, "resumed_at_epochs": resumed, "final": final})
    if best_predictions is not None:
        write_csv(path / "val_predictions.csv", best_predictions)
    save_model(model, path / "model.pt", metrics={}, train_config=cfg.to_dict())
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    save_model(model, path / "best.pt", metrics=_scalars(best), train_config=cfg.to_dict())
    model.load_state_dict(current)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch, "bad_epochs": bad_epochs,
             "best": json.dumps(best), "history": json.dumps(history), "resumed": json.dumps(resumed),
             "torch_rng": torch.get_rng_state()}  # fmt: skip
    torch.save(state, path / "state.pt")
    return path


def _scalars(report: dict) -> dict:
    return {k: v for k, v in report.items() if isinstance(v, int | float) or v is None}


def _write_outputs(out_dir: Path, cfg: TrainConfig, model: ASCModel, metrics: dict,
                   predictions: pd.DataFrame | None) -> None:  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", {"train": cfg.to_dict(), "model": config_to_dict(model.cfg)})
    save_model(model, out_dir / "model.pt", metrics=_scalars(metrics["best"]), train_config=cfg.to_dict())
    write_json(out_dir / "metrics.json", metrics)
    if predictions is not None:
        write_csv(out_dir / "val_predictions.csv", predictions)


def check_run_dir(out_dir: str | Path) -> None:
    """A run never overwrites another run's results."""
    if (Path(out_dir) / "metrics.json").exists():
        raise RayscError(f"{out_dir} already holds a finished run; choose another --out")
