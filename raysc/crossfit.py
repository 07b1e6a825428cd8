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
    address: str | None = None,
) -> list[Ensemble]:
    """Cross-fit the best ``candidates`` trials (without pseudo-labels), then select ``k`` of
    them on their out-of-fold predictions; returns the ensemble and, with ``session_smoothing``,
    its session-smoothed variant (both saved, each scored out of fold).

    ``time_budget_minutes``: take the candidates in rank order while their runs (estimated from
    each trial's own time for its best epoch's share, with as many runs at once as the cluster
    holds) fit; one that would not fit is passed over for the next."""
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
        for r in sorted(records, key=rank_key):
            cost = crossfit_minutes(r, len(folds), slots)
            if len(top) < candidates and (time_budget_minutes is None or spent + cost <= time_budget_minutes):
                top.append(r)
                spent += cost
        if not top:
            raise RayscError(f"{exp.root}: no trial's cross-fitting fits in {time_budget_minutes:.1f} min")

        # ---- one run per configuration and fold (a rerun keeps those that finished)
        configs, outs = [], []
        for r in top:
            train = exp.train_config(r)
            epochs = max(1, r.best_epoch or train["epochs"])
            for f in folds:
                if not (exp.crossfit_dir(r.trial_id, f) / "model.pt").is_file():
                    values = {**train, "fold": f, "epochs": epochs, "keep_last": True}
                    configs.append(make_config(values, where=f"cross-fit of {r.trial_id}"))
                    outs.append(exp.crossfit_dir(r.trial_id, f))
        if configs:
            log.info("cross-fitting %d configuration(s) x %d folds: %d run(s)", len(top), len(folds), len(configs))
            fit_many(configs, data_dir, outs, cpus=cpus, gpus=gpus, address=address)

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
        picks = top_k(scores, k) if method == "topk" else greedy_selection(probs, y, steps=k)
        counts = Counter(picks)
        total = sum(counts.values())
        members = tuple(
            Member(r.trial_id, r.round, r.backbone, exp.relative(exp.crossfit_dir(r.trial_id, f) / "model.pt"), w)
            for i, c in sorted(counts.items(), key=lambda ic: (-ic[1], ic[0]))
            for r, w in [(top[i], c / total / len(folds))]
            for f in folds
        )
        mean = sum(probs[i] * c for i, c in counts.items()) / total
        has_unk = all(unk[i] is not None for i in counts)
        unk_mean = sum(unk[i] * c for i, c in counts.items()) / total if has_unk else None
        t = fit_temperature(mean, y) if temperature else 1.0
        calibrated = apply_temperature(mean, t) if t != 1.0 else mean
        if session_smoothing:
            session_mean = _session_means(exp, data, {top[i].trial_id: c / total for i, c in counts.items()}, folds, t)

        ensembles = []
        for smooth in (False, True) if session_smoothing else (False,):
            final = session_mean(rows, "plain") if smooth else calibrated
            final_unk = None
            if smooth:
                final_unk = session_mean(rows, "unk")
            elif unk_mean is not None:  # the same temperature
                final_unk = apply_temperature(unk_mean, t) if t != 1.0 else unk_mean
            report = _oof_report(final, final_unk, y, rows, data, folds, weight)
            name = f"crossfit-{method}{k}" + ("-session" if smooth else "")
            ens = Ensemble(name, method, members, OUT_OF_FOLD, data_dir, t, smooth, report)
            _save(exp, ens, final, rows, classes)
            log.info(
                "%s: %d configuration(s) x %d folds, out-of-fold macro accuracy %.4f (+- %.4f over folds)",
                name,
                len(counts),
                len(folds),
                report["macro_accuracy"],
                report["fold_macro_accuracy_std"],
            )
            ensembles.append(ens)
        return ensembles


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
        # One configuration per teacher trial, with its fold models' summed weight.
        weights: dict[str, float] = {}
        teachers: dict[str, Member] = {}
        for m in ens.members:
            weights[m.trial_id] = weights.get(m.trial_id, 0.0) + m.weight
            teachers[m.trial_id] = m
        key = {tid: f"{tid}-pseudo{round}" for tid in weights}
        sources = {(tid, f): exp.crossfit_dir(tid, f) for tid in weights for f in folds}
        trains = {k: json.loads((d / "config.json").read_text())["train"] for k, d in sources.items()}
        todo = [k for k in sources if not (exp.crossfit_dir(key[k[0]], k[1]) / "model.pt").is_file()]
        # Estimated from the teacher's own fold runs (a few more clips each: the pseudo-labels).
        seconds = {
            k: sum(h.get("epoch_seconds", 0.0) for h in json.loads((d / "metrics.json").read_text())["history"])
            for k, d in sources.items()
        }
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
        outs = [exp.crossfit_dir(key[tid], f) for tid, f in todo]
        if configs:
            log.info("pseudo-label round %d of %s: %d run(s)", round, teacher, len(configs))
            fit_all(configs, ens.data, outs, workers=workers, cpus=cpus, gpus=gpus, address=address)

        rows = pd.concat([data.split(f)[1] for f in folds], ignore_index=True)
        y = data.labels(rows)
        classes = data.classes
        mean = unk = 0.0
        for tid, w in weights.items():
            plain, held_out = _out_of_fold(exp, key[tid], folds, rows, classes)
            mean, unk = mean + w * plain, unk + w * held_out
        final, final_unk = (apply_temperature(p, ens.temperature) if ens.temperature != 1.0 else p for p in (mean, unk))
        if ens.session_smoothing:
            by_trial = {key[tid]: w for tid, w in weights.items()}
            session_mean = _session_means(exp, data, by_trial, folds, ens.temperature)
            final, final_unk = session_mean(rows, "plain"), session_mean(rows, "unk")
        override = exp.member_files(ens.members[0])["config"]["train"].get("unseen_weight")
        report = _oof_report(final, final_unk, y, rows, data, folds, data.unseen_weight(override))
        report["teacher_saw_folds"] = True
        # A member keeps its trial's round: that is where its record lives.
        members = tuple(
            Member(
                tid,
                teachers[tid].round,
                teachers[tid].backbone,
                exp.relative(exp.crossfit_dir(key[tid], f) / "model.pt"),
                w / len(folds),
            )
            for tid, w in weights.items()
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
    exp: Experiment, data: PreparedData, weights: dict[str, float], folds: list[int], temperature: float
) -> Callable[[pd.DataFrame, str], np.ndarray]:
    """Session smoothing scored out of fold as it will act on the eval clips, over whole sessions:
    every development clip (labelled or not) predicted by the fold model that held its fold out,
    weighted over configurations, with the temperature; ``fn(rows, "plain" | "unk")`` gives the
    labelled ``rows``' session means. Smoothing over the labelled clips alone would measure
    little: a labelled session holds few labelled clips, an eval session many clips."""
    m = data.manifest
    dev = m[m["subset"].isin(["labelled", "unlabelled"])]
    classes = data.classes
    sums = {"plain": 0.0, "unk": 0.0}
    for key, w in weights.items():
        parts = []
        for f in folds:
            run = exp.crossfit_dir(key, f)
            path = run / "fold_predictions.csv"  # the fold's clips, plain and with <unk> cities
            if not path.is_file():
                names = list(dev.loc[dev["fold"] == f, "filename"])
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
