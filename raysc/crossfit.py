"""Cross-fitting: the best configurations trained once per fold, chosen out of fold.

A search scores every trial on one validation fold, about fifty sessions: too few to tell members
at 0.55 and 0.60 apart, and none of its models trains on that fold. Cross-fitting retrains the top
``candidates`` configurations once per fold (that fold held out, as many epochs as the trial's
best epoch, and the last epoch's weights: the held-out fold is only predicted, never used to
choose), in parallel as Ray tasks. Every labelled clip then has one out-of-fold prediction per
configuration, from a model that never saw its session. Ensemble selection (top-k or greedy),
the temperature and session smoothing are scored on those predictions over every labelled clip;
the ensemble's members are the fold models (a configuration's models share its weight), so
between them they train on every label (bagging).

Only configurations trained without pseudo-labels are cross-fitted: a later round's
pseudo-labels come from models that trained on the other folds, so a model of that round
retrained with fold ``f`` held out would learn from a teacher that saw fold ``f``'s labels.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .config import make_config
from .datafolder import PreparedData, load_dataset
from .distributed import fit_all, fit_many, parallel_slots
from .ensemble import apply_temperature, candidate_records, fit_temperature, greedy_selection, smooth_sessions, top_k
from .errors import ConfigError, RayscError
from .experiment import OUT_OF_FOLD, Ensemble, Experiment, Member, TrialRecord, rank_key
from .fileio import write_csv
from .inference import predict_clips
from .metrics import classification_report, confusion_matrix, macro_accuracy, objective, unk_columns
from .pseudo_candidates import write_candidates
from .pseudo_labels import Selection

log = logging.getLogger(__name__)

# The pseudo-label round's selection (benchmarks/semi_supervised.py): hard labels above 0.7.
DEFAULT_SELECTION = Selection(threshold=0.7, targets="hard")
# A per-backbone blend leaves out a backbone whose best configuration scores this far below the
# best backbone's out of fold (a network its budget did not train); why 0.1 is in
# docs/notes/2026-12-06-budget-runs.md#defaults.
BLEND_MARGIN = 0.1


def crossfit_ensemble(
    experiment: str | Path,
    *,
    candidates: int = 10,
    method: str = "topk",
    k: int = 5,
    temperature: bool = True,
    session_smoothing: bool = True,
    cpus: float = 1.0,
    gpus: float = 0.0,
    time_budget_minutes: float | None = None,
    per_backbone: bool = False,
    address: str | None = None,
) -> list[Ensemble]:
    """Cross-fit the best ``candidates`` trials (without pseudo-labels), then select ``k`` of
    them on their out-of-fold predictions.

    Each candidate's configuration is trained once per fold, for its trial's best number of
    epochs, so every labelled clip is predicted by a model that never saw its session. Runs
    that finished are kept, so a rerun continues.

    With ``per_backbone``, the ensemble is a blend of backbones: the candidates are taken from
    each backbone in turn (its best first), the selection runs within each backbone (``k``
    shared out among them, rounded up), and each backbone gets an equal share of the weight,
    leaving out one whose best out-of-fold score is more than ``BLEND_MARGIN`` below the best
    backbone's. Out-of-fold scores come from folds of the development cities, which favour a
    member that learns those cities' rooms and devices (a head on a pretrained trunk) over one
    that carries to other cities; an equal blend hedges against that.

    Args:
        experiment: an experiment folder with finished round-0 trials.
        candidates: the best trials to cross-fit, in rank order.
        method: ``topk`` or ``greedy`` (as ``build_ensemble``), on out-of-fold predictions.
        k: members for ``topk``; selection steps for ``greedy``.
        temperature: fit a temperature on the out-of-fold predictions.
        session_smoothing: also save the session-smoothed variant.
        cpus: CPUs per run.
        gpus: GPUs per run.
        time_budget_minutes: take the candidates in rank order while their runs (estimated
            from each trial's own time for its best epoch's share, with as many runs at once
            as the cluster holds) fit; one that would not fit is passed over for the next
            (None: every candidate).
        per_backbone: blend the backbones with equal weights (above).
        address: a Ray cluster to join (None: a local Ray).

    Returns:
        The ensemble and, with ``session_smoothing``, its smoothed variant (both saved, each
        scored out of fold; ``metrics["backbones"]`` holds each backbone's share).

    Raises:
        ConfigError: ``candidates`` or ``k`` below 1.
        RayscError: no finished trial without pseudo-labels, or none whose cross-fitting fits
            in ``time_budget_minutes``.
    """
    if candidates < 1 or k < 1:
        raise ConfigError(f"candidates and k must be >= 1, got {candidates} and {k}")
    exp = Experiment(experiment)
    with exp.in_use():  # another process writing this experiment is refused
        records = [r for r in candidate_records(exp, None) if not exp.train_config(r).get("pseudo_labels")]
        if not records:
            raise RayscError(f"{exp.root}: no finished trial without pseudo-labels to cross-fit")
        data_dir = exp.read_search_settings(records[0].round)["data"]
        data = load_dataset(data_dir)
        folds = data.folds()
        slots = parallel_slots(cpus, gpus, address) if time_budget_minutes is not None else 1
        top, spent = [], 0.0
        ranked = sorted(records, key=rank_key)
        for r in backbones_in_turn(ranked) if per_backbone else ranked:
            cost = crossfit_minutes(r, len(folds), slots)
            if len(top) < candidates and (time_budget_minutes is None or spent + cost <= time_budget_minutes):
                top.append(r)
                spent += cost
        if not top:
            raise RayscError(f"{exp.root}: no trial's cross-fitting fits in {time_budget_minutes:.1f} min")

        # ---- one run per configuration and fold (a rerun keeps those that finished)
        _fit_folds(exp, top, data_dir, folds, repeat=0, cpus=cpus, gpus=gpus, address=address)

        # ---- out-of-fold predictions over every labelled clip, each from the model without its fold
        rows = pd.concat([data.split(f)[1] for f in folds], ignore_index=True)  # with "seen" per fold
        y = data.labels(rows)
        classes = data.classes
        weight = data.unseen_weight(exp.train_config(top[0]).get("unseen_weight"))
        probs, unk = zip(*(_out_of_fold(exp, r.trial_id, folds, rows, classes) for r in top), strict=True)
        scores = [
            objective(
                macro_accuracy(y, p.argmax(1), len(classes)),
                None if u is None else macro_accuracy(y, u.argmax(1), len(classes)),
                weight,
            )
            for p, u in zip(probs, unk, strict=True)
        ]
        groups = _blended_backbones(top, scores) if per_backbone else [list(range(len(top)))]
        chosen = []
        for group in groups:
            k_group = -(-k // len(groups))  # k shared out, rounded up
            picks = (
                top_k([scores[i] for i in group], k_group)
                if method == "topk"
                else greedy_selection([probs[i] for i in group], y, steps=k_group)
            )
            counts = Counter(group[i] for i in picks)
            total = sum(counts.values()) * len(groups)
            chosen += [(top[i], c / total) for i, c in sorted(counts.items(), key=lambda ic: (-ic[1], ic[0]))]
        return _bagged_ensembles(
            exp,
            data,
            chosen,
            repeats=1,
            name=f"crossfit-{method}{k}",
            method=method,
            temperature=temperature,
            session_smoothing=session_smoothing,
        )


def backbones_in_turn(ranked: list[TrialRecord]) -> list[TrialRecord]:
    """Trial records in rank order re-ordered so that backbones take turns: each one's best,
    then each one's second, and so on (backbones in the order of their best trial)."""
    by_backbone: dict[str, list[TrialRecord]] = {}
    for r in ranked:
        by_backbone.setdefault(r.backbone, []).append(r)
    queues = list(by_backbone.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def _blended_backbones(top: list[TrialRecord], scores: list[float]) -> list[list[int]]:
    """The indices into ``top`` of each backbone that enters the blend: those whose best
    out-of-fold score is within ``BLEND_MARGIN`` of the best backbone's."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(top):
        groups.setdefault(r.backbone, []).append(i)
    best = max(scores)
    return [g for g in groups.values() if max(scores[i] for i in g) >= best - BLEND_MARGIN]


def crossfit_repeats(
    experiment: str | Path,
    ensemble: str,
    *,
    repeats: int,
    temperature: bool = True,
    session_smoothing: bool = True,
    cpus: float = 1.0,
    gpus: float = 0.0,
    address: str | None = None,
) -> list[Ensemble]:
    """Repeated cross-fitting (bag sets, as AutoGluon repeats its bagging): the configurations of
    the cross-fitted ``ensemble``, with their weights, trained again on every fold of
    ``repeats - 1`` redrawn splits of the sessions into folds (``datafolder.load_dataset``).

    Each labelled clip is then predicted by ``repeats`` models, none of which saw its session, so
    the bagged ensemble's out-of-fold score is as honest as one split's, with less variance; its
    members are every fold model of every split. Saved as ``ENSEMBLE-xREPEATS`` (and its
    session-smoothed variant), the temperature fitted again, each marked as the replacement of
    the same ensemble of fewer splits (``refit_of``: the final-model rule takes the most splits)
    and scored also on the redrawn splits alone (``metrics["redrawn_score"]``: split 0 chose the
    configurations, so its out-of-fold score is optimistic). Runs of a split that finished are
    kept, so a rerun continues.

    Args:
        experiment: the experiment folder.
        ensemble: a cross-fitted ensemble of one split (``crossfit_ensemble``), not smoothed.
        repeats: the splits in all, prepare's included (>= 2).
        temperature: fit a temperature on the bagged out-of-fold predictions.
        session_smoothing: also save the session-smoothed variant.
        cpus: CPUs per run.
        gpus: GPUs per run.
        address: a Ray cluster to join (None: a local Ray).

    Returns:
        The bagged ensemble and, with ``session_smoothing``, its smoothed variant.

    Raises:
        ConfigError: ``repeats`` below 2, or an ensemble that is not a plain cross-fitted one of
            one split, or a data folder whose folds are split by city.
    """
    if repeats < 2:
        raise ConfigError(f"repeats must be >= 2 (prepare's split and a redrawn one), got {repeats}")
    exp = Experiment(experiment)
    with exp.in_use():
        base = exp.load_ensemble(ensemble)
        keys = {run_key_of(m) for m in base.members}
        if keys != {m.trial_id for m in base.members}:
            raise ConfigError(f"{ensemble}: already an ensemble of repeated splits ({sorted(keys)})")
        if base.fold != OUT_OF_FOLD or base.refit_of is not None or base.session_smoothing:
            raise ConfigError(f"{ensemble}: repeats start from a plain cross-fitted ensemble (crossfit_ensemble's)")
        data = load_dataset(base.data)
        records = {r.trial_id: r for r in exp.records()}
        shares: dict[str, float] = {}
        for m in base.members:
            shares[m.trial_id] = shares.get(m.trial_id, 0.0) + m.weight
        chosen = [(records[trial_id], w) for trial_id, w in shares.items()]
        for n in range(1, repeats):
            redrawn = load_dataset(base.data, repeat=n)  # refuses folds split by city
            _fit_folds(
                exp, [r for r, _ in chosen], base.data, redrawn.folds(), repeat=n, cpus=cpus, gpus=gpus, address=address
            )
        # It replaces the ensemble of the most splits below it (a chain the final-model rule follows).
        names = {e.name for e in exp.ensembles()}
        fewer = next((f"{ensemble}-x{n}" for n in range(repeats - 1, 1, -1) if f"{ensemble}-x{n}" in names), ensemble)
        return _bagged_ensembles(
            exp,
            data,
            chosen,
            repeats=repeats,
            name=f"{ensemble}-x{repeats}",
            method=base.method,
            temperature=temperature,
            session_smoothing=session_smoothing,
            replaces=fewer,
        )


def repeat_minutes(experiment: str | Path, ensemble: str, slots: int = 1) -> float:
    """The estimated time of one more split of a one-split cross-fitted ``ensemble``'s
    configurations: its fold runs' measured epochs, over ``slots`` runs at once."""
    exp = Experiment(experiment)
    runs = {(exp.root / m.model_path).parent for m in exp.load_ensemble(ensemble).members}
    return sum(_run_seconds(run) for run in runs) / max(1, slots) / 60


def run_key(trial_id: str, repeat: int) -> str:
    """The folder under ``crossfit/`` of a configuration's fold runs on a split (0: prepare's)."""
    return trial_id if repeat == 0 else f"{trial_id}-r{repeat}"


def run_key_of(m: Member) -> str:
    """The ``crossfit/`` folder of a member's fold model (``run_key``, maybe ``-pseudoN`` after)."""
    return Path(m.model_path).parent.parent.name


def _run_seconds(run: Path) -> float:
    """A finished run's training time, from its epochs' measured seconds."""
    history = json.loads((run / "metrics.json").read_text())["history"]
    return sum(h.get("epoch_seconds", 0.0) for h in history)


def _fit_folds(
    exp: Experiment,
    records: list[TrialRecord],
    data_dir: str,
    folds: list[int],
    *,
    repeat: int,
    cpus: float,
    gpus: float,
    address: str | None,
) -> None:
    """Train each configuration once per fold of split ``repeat`` (its trial's best epoch count,
    the last epoch's weights), in parallel; runs that finished before are kept."""
    configs, outs = [], []
    for r in records:
        train = exp.train_config(r)
        epochs = max(1, r.best_epoch or train["epochs"])
        for f in folds:
            out = exp.crossfit_dir(run_key(r.trial_id, repeat), f)
            if not (out / "model.pt").is_file():
                values = {**train, "fold": f, "epochs": epochs, "keep_last": True, "repeat": repeat}
                configs.append(make_config(values, where=f"cross-fit of {r.trial_id}"))
                outs.append(out)
    if configs:
        log.info(
            "cross-fitting split %d: %d configuration(s) x %d folds: %d run(s)",
            repeat,
            len(records),
            len(folds),
            len(configs),
        )
        fit_many(configs, data_dir, outs, cpus=cpus, gpus=gpus, address=address)


def _bagged_ensembles(
    exp: Experiment,
    data: PreparedData,
    chosen: list[tuple[TrialRecord, float]],
    *,
    repeats: int,
    name: str,
    method: str,
    temperature: bool,
    session_smoothing: bool,
    replaces: str | None = None,
) -> list[Ensemble]:
    """The ensemble of ``chosen`` configurations (with their weights) over the fold models of
    ``repeats`` splits, scored out of fold on every labelled clip, saved as ``name`` (and
    ``name-session``, smoothed over sessions). With ``replaces`` (the ensemble of fewer splits,
    its smoothed variant ``replaces-session``), each is marked as its replacement (``refit_of``)
    and also scored on the redrawn splits alone (``metrics["redrawn_score"]``): the configurations
    were chosen on split 0's out-of-fold predictions, so only the others score them without that
    choice's optimism."""
    folds = data.folds()
    rows = pd.concat([data.split(f)[1] for f in folds], ignore_index=True)  # with "seen" per fold
    y = data.labels(rows)
    classes = data.classes
    weight = data.unseen_weight(exp.train_config(chosen[0][0]).get("unseen_weight"))
    # A run key's weight: its configuration's, shared by the splits (then by the folds).
    runs = {run_key(r.trial_id, n): (w / repeats, n) for r, w in chosen for n in range(repeats)}
    shares: dict[str, float] = {}
    for r, w in chosen:
        shares[r.backbone] = round(shares.get(r.backbone, 0.0) + w, 4)
    redrawn = {key: (w * repeats / (repeats - 1), n) for key, (w, n) in runs.items() if n} if replaces else {}
    mean, unk_mean = _weighted_out_of_fold(exp, runs, folds, rows, classes)
    t = fit_temperature(mean, y) if temperature else 1.0
    members = tuple(
        Member(
            r.trial_id,
            r.round,
            r.backbone,
            exp.relative(exp.crossfit_dir(run_key(r.trial_id, n), f) / "model.pt"),
            w / repeats / len(folds),
        )
        for r, w in chosen
        for n in range(repeats)
        for f in folds
    )

    def scored(of: dict[str, tuple[float, int]], smooth: bool) -> tuple[np.ndarray, dict]:
        """The predictions of ``of``'s runs (smoothed over sessions or not) and their report."""
        if smooth:
            session_mean = _session_means(exp, data.out, of, folds, t)
            final, final_unk = session_mean(rows, "plain"), session_mean(rows, "unk")
        else:
            plain, unk = (mean, unk_mean) if of is runs else _weighted_out_of_fold(exp, of, folds, rows, classes)
            final, final_unk = (p if p is None or t == 1.0 else apply_temperature(p, t) for p in (plain, unk))
        return final, _oof_report(final, final_unk, y, rows, data, folds, weight)

    ensembles = []
    for smooth in (False, True) if session_smoothing else (False,):
        final, report = scored(runs, smooth)
        report["splits"] = repeats
        report["backbones"] = shares
        suffix = "-session" if smooth else ""
        if redrawn:
            report["redrawn_score"] = scored(redrawn, smooth)[1]["score"]
        ens = Ensemble(
            name + suffix,
            method,
            members,
            OUT_OF_FOLD,
            str(data.out),
            t,
            smooth,
            report,
            replaces + suffix if replaces else None,
        )
        _save(exp, ens, final, rows, classes)
        log.info(
            "%s: %d configuration(s) x %d folds x %d split(s), out-of-fold macro accuracy %.4f (+- %.4f over folds)",
            ens.name,
            len(chosen),
            len(folds),
            repeats,
            report["macro_accuracy"],
            report["fold_macro_accuracy_std"],
        )
        ensembles.append(ens)
    return ensembles


def _weighted_out_of_fold(
    exp: Experiment, runs: dict[str, tuple[float, int]], folds: list[int], rows: pd.DataFrame, classes: list[str]
) -> tuple[np.ndarray, np.ndarray | None]:
    """The weighted mean of run keys' out-of-fold predictions of ``rows``, plain and with the city
    as ``<unk>`` (None when a run lacks those)."""
    mean, unk_mean = 0.0, 0.0
    for key, (w, _) in runs.items():
        plain, unk = _out_of_fold(exp, key, folds, rows, classes)
        mean = mean + w * plain
        unk_mean = None if unk is None or unk_mean is None else unk_mean + w * unk
    return mean, unk_mean


def crossfit_minutes(r: TrialRecord, folds: int, slots: int = 1) -> float:
    """The estimated time of a trial's cross-fitting: its fit time for its best epoch's share,
    once per fold, over ``slots`` runs at once."""
    share = (r.best_epoch or r.epochs) / max(1, r.epochs)
    return r.fit_seconds * share * folds / max(1, slots) / 60


def crossfit_pseudo_round(
    experiment: str | Path,
    teacher: str,
    *,
    round: int = 1,
    selection: Selection = DEFAULT_SELECTION,
    cpus: float = 1.0,
    gpus: float = 0.0,
    workers: int = 1,
    time_budget_minutes: float | None = None,
    address: str | None = None,
) -> Ensemble:
    """A pseudo-label round of a cross-fitted ensemble: the teacher (every fold model of it)
    scores the unlabelled clips, and each of its fold models is trained again, same configuration
    and fold, on its labelled and session-labelled clips plus the teacher's ``selection`` of the
    clips of sessions without any label. Saved as ``TEACHER-pseudoROUND``, with the teacher's
    weights, temperature and smoothing, and marked as the teacher's replacement (``refit_of``).

    Nothing is chosen on this round's out-of-fold score: the teacher saw every fold's labels, so
    that score is optimistic (``metrics["teacher_saw_folds"]``). Whether the round helps was
    measured on eval data (benchmarks/semi_supervised.py). ``workers`` > 1: each run is a Ray
    Train DDP run (``distributed.fit_all``)."""
    exp = Experiment(experiment)
    with exp.in_use():  # another process writing this experiment is refused
        ens = exp.load_ensemble(teacher)
        if ens.fold != OUT_OF_FOLD:
            raise ConfigError(f"{teacher}: a cross-fitted ensemble is needed as the teacher (fold {ens.fold})")
        data = load_dataset(ens.data)
        folds = data.folds()
        # One run key per configuration and split (``run_key``), with its fold models' summed weight.
        weights: dict[str, float] = {}
        teachers: dict[str, Member] = {}
        for m in ens.members:
            weights[run_key_of(m)] = weights.get(run_key_of(m), 0.0) + m.weight
            teachers[run_key_of(m)] = m
        key = {run: f"{run}-pseudo{round}" for run in weights}
        sources = {(run, f): exp.crossfit_dir(run, f) for run in weights for f in folds}
        trains = {k: json.loads((d / "config.json").read_text())["train"] for k, d in sources.items()}
        todo = [k for k in sources if not (exp.crossfit_dir(key[k[0]], k[1]) / "model.pt").is_file()]
        # Estimated from the teacher's own fold runs (a few more clips each: the pseudo-labels).
        seconds = {k: _run_seconds(d) for k, d in sources.items()}
        slots = parallel_slots(cpus, gpus, address) if time_budget_minutes is not None else 1
        need = sum(seconds[k] for k in todo) / max(1, slots) / 60
        if time_budget_minutes is not None and need > time_budget_minutes:
            raise RayscError(
                f"{exp.root}: the pseudo-label round needs about {need:.1f} min, {time_budget_minutes:.1f} left"
            )
        # Runs with session labels take pseudo-labels only for clips of sessions without a label.
        pool_only = all(t.get("session_labels", True) for t in trains.values())
        path, _ = write_candidates(
            exp.root, ensemble=teacher, selection=selection, without_session_label=pool_only, address=address
        )
        pseudo = {
            "pseudo_labels": str(path),
            "pseudo_threshold": selection.threshold,
            "pseudo_weight": selection.weight,
            "pseudo_targets": selection.targets,
        }
        configs = [make_config({**trains[k], **pseudo}, where=f"pseudo-label round of {k[0]}") for k in todo]
        outs = [exp.crossfit_dir(key[run], f) for run, f in todo]
        if configs:
            log.info("pseudo-label round %d of %s: %d run(s)", round, teacher, len(configs))
            fit_all(configs, ens.data, outs, workers=workers, cpus=cpus, gpus=gpus, address=address)

        rows = pd.concat([data.split(f)[1] for f in folds], ignore_index=True)
        y = data.labels(rows)
        classes = data.classes
        # Each new run on its teacher run's split (the split travels in its training config).
        runs = {key[run]: (w, trains[(run, folds[0])].get("repeat", 0)) for run, w in weights.items()}
        mean, unk = _weighted_out_of_fold(exp, runs, folds, rows, classes)
        final, final_unk = (
            p if p is None or ens.temperature == 1.0 else apply_temperature(p, ens.temperature) for p in (mean, unk)
        )
        if ens.session_smoothing:
            session_mean = _session_means(exp, data.out, runs, folds, ens.temperature)
            final, final_unk = session_mean(rows, "plain"), session_mean(rows, "unk")
        override = exp.member_files(ens.members[0])["config"]["train"].get("unseen_weight")
        report = _oof_report(final, final_unk, y, rows, data, folds, data.unseen_weight(override))
        report["teacher_saw_folds"] = True
        # A member keeps its trial's round: that is where its record lives.
        members = tuple(
            Member(
                teachers[run].trial_id,
                teachers[run].round,
                teachers[run].backbone,
                exp.relative(exp.crossfit_dir(key[run], f) / "model.pt"),
                w / len(folds),
            )
            for run, w in weights.items()
            for f in folds
        )
        name = f"{teacher}-pseudo{round}"
        out = Ensemble(
            name, ens.method, members, OUT_OF_FOLD, ens.data, ens.temperature, ens.session_smoothing, report, teacher
        )
        _save(exp, out, final, rows, classes)
        log.info(
            "%s: %d configuration(s) x %d folds retrained with pseudo-labels from %s (%d candidate clips)",
            name,
            len(weights),
            len(folds),
            teacher,
            len(pd.read_csv(path)),
        )
        return out


def _save(exp: Experiment, ens: Ensemble, final: np.ndarray, rows: pd.DataFrame, classes: list[str]) -> None:
    """An out-of-fold ensemble and its predictions of the labelled ``rows``."""
    preds = pd.DataFrame(final, columns=classes)
    preds.insert(0, "filename", rows["filename"].to_numpy())
    exp.save_ensemble(ens, preds)


def _out_of_fold(
    exp: Experiment, key: str, folds: list[int], rows: pd.DataFrame, classes: list[str]
) -> tuple[np.ndarray, np.ndarray | None]:
    """A configuration's out-of-fold predictions of ``rows`` (each fold's from the model that held
    it out), plain and with the city as ``<unk>`` (None for fold runs from before that existed)."""
    parts = pd.concat([pd.read_csv(exp.crossfit_dir(key, f) / "val_predictions.csv") for f in folds])
    parts = parts.set_index("filename").loc[rows["filename"]]
    has_unk = unk_columns(classes)[0] in parts
    return parts[classes].to_numpy(np.float64), parts[unk_columns(classes)].to_numpy(np.float64) if has_unk else None


def _oof_report(
    final: np.ndarray,
    final_unk: np.ndarray | None,
    y: np.ndarray,
    rows: pd.DataFrame,
    data: PreparedData,
    folds: list[int],
    weight: float,
) -> dict:
    """An out-of-fold ensemble's report over every labelled clip, with its spread over folds."""
    classes = data.classes
    report = classification_report(
        final,
        y,
        classes=classes,
        cities=rows["city"].to_numpy(),
        seen=rows["seen"].to_numpy(),
        unk_probs=final_unk,
        unseen_weight=weight,
    )
    report["confusion"] = confusion_matrix(y, final.argmax(1), len(classes)).tolist()
    per_fold = [
        macro_accuracy(y[mask], final[mask].argmax(1), len(classes))
        for mask in (rows["fold"].to_numpy() == f for f in folds)
    ]
    return report | {"fold_macro_accuracy": per_fold, "fold_macro_accuracy_std": float(np.std(per_fold))}


def _session_means(
    exp: Experiment, data_dir: str | Path, runs: dict[str, tuple[float, int]], folds: list[int], temperature: float
) -> Callable[[pd.DataFrame, str], np.ndarray]:
    """Session smoothing scored out of fold as it will act on the eval clips, over whole sessions:
    every development clip (labelled or not) predicted by the fold model that held its fold out
    (of the run's split), weighted over ``runs`` (run key -> weight, split), with the temperature;
    ``fn(rows, "plain" | "unk")`` gives the labelled ``rows``' session means. Smoothing over the
    labelled clips alone would measure little: a labelled session holds few labelled clips, an
    eval session many clips."""
    splits = {n: load_dataset(data_dir, repeat=n) for n in sorted({n for _, n in runs.values()})}
    data = splits[min(splits)]
    m = data.manifest
    dev = m[m["subset"].isin(["labelled", "unlabelled"])]
    classes = data.classes
    sums = {"plain": 0.0, "unk": 0.0}
    for key, (w, n) in runs.items():
        split = splits[n].manifest
        split_dev = split[split["subset"].isin(["labelled", "unlabelled"])]
        parts = []
        for f in folds:
            run = exp.crossfit_dir(key, f)
            path = run / "fold_predictions.csv"  # the fold's clips, plain and with <unk> cities
            if not path.is_file():
                names = list(split_dev.loc[split_dev["fold"] == f, "filename"])
                write_csv(path, predict_clips(run / "model.pt", data, names, with_unknown_city=True))
            parts.append(pd.read_csv(path))
        table = pd.concat(parts).set_index("filename").loc[dev["filename"]]
        sums["plain"] = sums["plain"] + w * table[classes].to_numpy(np.float64)
        sums["unk"] = sums["unk"] + w * table[unk_columns(classes)].to_numpy(np.float64)
    sessions = dev["session"].to_numpy()
    smoothed = {
        k: pd.DataFrame(
            smooth_sessions(apply_temperature(v, temperature) if temperature != 1.0 else v, sessions),
            index=dev["filename"],
        )
        for k, v in sums.items()
    }
    return lambda rows, kind: smoothed[kind].loc[rows["filename"]].to_numpy()
