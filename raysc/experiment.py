"""THE experiment folder: every path inside it, the trial records and the ensemble records.

No other module spells a path inside an experiment; they ask this one::

    EXP/pipeline.json                 the pipeline's settings and the stages it has done
    EXP/trials.csv                    every TrialRecord of every round, best first
    EXP/round-R/search.json           the search's settings (a --resume must match them)
    EXP/round-R/space.yaml            a copy of the search space
    EXP/round-R/study.journal         the Optuna study (file journal: survives the driver)
    EXP/round-R/tune/                 Tune's own state, for --resume
    EXP/round-R/tune-state/           the last complete copy of Tune's experiment state
    EXP/round-R/train/train-ID/       Ray Train checkpoints of trial ID (storage_path)
    EXP/round-R/trials/ID/            the trial's run folder (model.pt, metrics.json,
                                      val_predictions.csv, config.json) + record.json, train.log
    EXP/round-R/search.log            Ray's, Tune's and Optuna's log lines
    EXP/ensembles/NAME/               ensemble.json, val_predictions.csv
    EXP/pseudo/NAME/                  candidates.csv, summary.csv (pseudo-label candidates)
    EXP/refit/ID/                     trial ID's configuration retrained on every labelled clip
    EXP/plots/                        PNG plots
    EXP/submission/                   the challenge submission

A trial's run folder is the layout ``fit`` writes (``raysc.train``); model and prediction paths in
records are relative to the experiment folder, so a moved experiment still loads.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pandas as pd

from .errors import RayscError
from .fileio import write_csv, write_json

# The validation metrics a record keeps, the trials table's columns and the leaderboard's.
RECORD_METRICS = (
    "score",
    "macro_accuracy",
    "accuracy",
    "log_loss",
    "seen_city_macro_accuracy",
    "unseen_city_macro_accuracy",
    "unk_city_macro_accuracy",
)
# What a run reports every epoch as its best so far: ASHA and TPE judge a trial by its best epoch.
RUNNING_BEST = "best_score"


def settings_changes(stored: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None) -> str:
    """The keys of ``current`` whose value differs from ``stored``, as text ('' when none): a
    resumed search or pipeline must run with the settings it started with. Keys that only
    ``stored`` has (settings an older raysc had) do not count; a key ``stored`` lacks (a setting
    a newer raysc added) is compared with its value in ``defaults``."""
    was = {**(defaults or {}), **stored}
    changed = {k: (was.get(k), v) for k, v in current.items() if was.get(k) != v}
    return ", ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in changed.items())


@dataclass(frozen=True)
class TrialRecord:
    """What a finished trial leaves behind (one row of the trials table).

    Attributes:
        trial_id: the trial's id in its round.
        round: the search round (0 without pseudo-labels).
        status: ``completed``, ``stopped`` (by ASHA) or ``failed``.
        backbone: the trial's network.
        params: the sampled values, as Optuna named them.
        epochs: epochs trained.
        best_epoch: the epoch of the best validation score, or None.
        metrics: the validation metrics of the best epoch.
        parameters: the network's parameters, or None.
        macs: multiply-accumulates per 10-second clip, or None.
        fit_seconds: wall-clock seconds of training.
        started: the Unix time the trial started (orders a sequential search), or None.
        predict_seconds: seconds of validation inference at the best epoch, or None.
        fold: the validation fold.
        model_path: the best epoch's model, relative to the experiment folder, or None.
        predictions_path: its validation predictions, relative to the folder, or None.
        error: why a failed trial failed, or None.
    """

    trial_id: str
    round: int
    status: str
    backbone: str
    params: dict[str, Any]
    epochs: int
    best_epoch: int | None
    metrics: dict[str, float | None]
    parameters: int | None
    macs: int | None
    fit_seconds: float
    started: float | None
    predict_seconds: float | None
    fold: int
    model_path: str | None
    predictions_path: str | None
    error: str | None = None

    def row(self) -> dict[str, Any]:
        """A flat row for CSV: params as JSON, metrics as columns."""
        d = dataclasses.asdict(self)
        d["params"] = json.dumps(self.params, sort_keys=True)
        return {**{k: v for k, v in d.items() if k != "metrics"}, **self.metrics}


def score_of(metrics: dict[str, Any]) -> float:
    """The objective (``metrics.objective``) of a trial's or an ensemble's validation metrics;
    macro accuracy for those written before it existed."""
    value = metrics.get("score", metrics.get("macro_accuracy"))
    return -1.0 if value is None else float(value)


def rank_key(r: TrialRecord) -> tuple:
    """Best validation score first, failed trials last."""
    return (r.status == "failed", -score_of(r.metrics), r.trial_id)


@dataclass(frozen=True)
class Member:
    """One model of an ensemble.

    Attributes:
        trial_id: the trial whose configuration it trained (refit and fold models keep it;
            their ``model_path`` tells them apart).
        round: the trial's search round.
        backbone: its network.
        model_path: its model file, relative to the experiment folder.
        weight: its share of the ensemble's averaged probabilities.
    """

    trial_id: str
    round: int
    backbone: str
    model_path: str
    weight: float


@dataclass(frozen=True)
class Ensemble:
    """A weighted average of models' probabilities, saved in ``ensembles/NAME/``.

    Attributes:
        name: its folder name (``round0-topk5``, ``crossfit-topk5-session``...).
        method: how its members were chosen: ``topk`` or ``greedy``.
        members: its models and their weights.
        fold: the validation fold, or ``OUT_OF_FOLD`` (-1) for a cross-fitted ensemble scored
            on every labelled clip.
        data: the prepared data folder it was built on.
        temperature: T of softmax(log p / T) over its averaged probabilities p (1.0: none).
        session_smoothing: whether clips of one recording session share their mean
            probabilities.
        metrics: the validation report of its predictions.
        refit_of: the ensemble whose members this one retrained and which it replaces as the
            final model: on every labelled clip (a refit: same weights, temperature and
            smoothing; its metrics are that ensemble's validation, which a model trained on
            the validation fold cannot have), or with pseudo-labels (``crossfit_pseudo_round``);
            None for an ensemble chosen on validation.
    """

    name: str
    method: str
    members: tuple[Member, ...]
    fold: int
    data: str
    temperature: float
    session_smoothing: bool
    metrics: dict[str, Any]
    refit_of: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ensemble:
        return cls(**{**d, "members": tuple(Member(**m) for m in d["members"])})


# Experiment folders this process holds (see ``Experiment.in_use``): the open lock file and depth.
_HELD: dict[Path, tuple[IO[str], int]] = {}


class Experiment:
    """An experiment folder: its paths, records and ensembles.

    The one owner of the folder's layout (docs/architecture.md): every path in it comes from a
    method here. Made without touching the disk; ``existing`` checks that it is there.

    Args:
        root: the folder.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def existing(cls, root: str | Path) -> Experiment:
        """The experiment folder at ``root``, which must exist (commands that read one).

        Args:
            root: the folder.

        Returns:
            The experiment.

        Raises:
            RayscError: ``root`` is not a folder.
        """
        if not Path(root).is_dir():
            what = "is a file, not an experiment folder" if Path(root).exists() else "does not exist"
            raise RayscError(f"{root} {what} (an experiment folder is made by `raysc search` or `raysc pipeline`)")
        return cls(root)

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Hold the folder for this process while it writes into it. Two processes writing one
        experiment delete each other's checkpoints and interleave one Optuna study, so another
        raysc process asking for a held folder is refused, naming the holder. Reentrant within a
        process (a pipeline runs searches); released by the kernel when the process ends, so a
        killed run leaves nothing to clean up."""
        key = self.root.resolve()
        if key in _HELD:
            f, depth = _HELD[key]
            _HELD[key] = (f, depth + 1)
        else:
            f = self._open_lock(key)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise RayscError(
                    f"{self.root} is in use by {holder}; two runs in one experiment folder would overwrite "
                    "each other. Wait for it to end, or stop it and continue with the same command "
                    "(an interrupted run resumes), or choose another folder"
                ) from None
            f.seek(0)
            f.truncate()
            command = " ".join(["raysc", *sys.argv[1:]]) if sys.argv[0].endswith("raysc") else "a Python process"
            f.write(f"{command} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            f.flush()
            _HELD[key] = (f, 1)
        try:
            yield
        finally:
            f, depth = _HELD[key]
            if depth > 1:
                _HELD[key] = (f, depth - 1)
            else:
                del _HELD[key]
                f.close()  # closing releases the lock

    def _open_lock(self, key: Path) -> IO[str]:
        """The folder's lock file, opened for writing; the folder is made if missing. A path
        that is a file, or a folder raysc cannot write, is refused in one line."""
        if key.exists() and not key.is_dir():
            raise RayscError(f"{self.root} is a file, not an experiment folder: give a folder's path")
        try:
            key.mkdir(parents=True, exist_ok=True)
            return (key / ".in-use").open("a+")
        except OSError as exc:
            raise RayscError(
                f"{self.root}: cannot write the experiment folder there ({exc.strerror}); an experiment needs a "
                "writable folder: choose another, or copy this one somewhere writable (it resumes there)"
            ) from None

    # ---- the pipeline and the tables
    @property
    def pipeline_state(self) -> Path:
        return self.root / "pipeline.json"

    @property
    def trials_table(self) -> Path:
        return self.root / "trials.csv"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    def submission(self, filename: str) -> Path:
        return self.root / "submission" / filename

    # ---- pretraining (one run per backbone, before round 0)
    def pretrain_dir(self, backbone: str) -> Path:
        return self.root / "pretrain" / backbone

    def pretrained_model(self, backbone: str) -> Path:
        return self.pretrain_dir(backbone) / "model.pt"

    # ---- rounds (one search each)
    def round_dir(self, round: int) -> Path:
        return self.root / f"round-{round}"

    def search_settings(self, round: int) -> Path:
        return self.round_dir(round) / "search.json"

    def read_search_settings(self, round: int) -> dict[str, Any]:
        path = self.search_settings(round)
        if not path.is_file():
            raise RayscError(f"{self.round_dir(round)}: no search (no {path.name}); run `raysc search` first")
        return json.loads(path.read_text())

    def space_copy(self, round: int) -> Path:
        return self.round_dir(round) / "space.yaml"

    def study_name(self, round: int) -> str:
        """The Optuna study of a round, inside its journal."""
        return self.round_dir(round).name

    def study_journal(self, round: int) -> Path:
        return self.round_dir(round) / "study.journal"

    def tune_dir(self, round: int) -> Path:
        return self.round_dir(round) / "tune"

    def tune_backup_dir(self, round: int) -> Path:
        return self.round_dir(round) / "tune-state"

    def train_storage(self, round: int) -> Path:
        return self.round_dir(round) / "train"

    def train_run(self, round: int, trial_id: str) -> Path:
        """Ray Train's folder of one trial's run (its checkpoints)."""
        return self.train_storage(round) / train_run_name(trial_id)

    def search_log(self, round: int) -> Path:
        return self.round_dir(round) / "search.log"

    def trials_dir(self, round: int) -> Path:
        return self.round_dir(round) / "trials"

    def trial_dir(self, round: int, trial_id: str) -> Path:
        return self.trials_dir(round) / trial_id

    def trial_log(self, round: int, trial_id: str) -> Path:
        return self.trial_dir(round, trial_id) / "train.log"

    def train_config(self, r: TrialRecord) -> dict[str, Any]:
        """The training config a trial ran with (its run folder's config.json)."""
        return json.loads((self.root / r.model_path).with_name("config.json").read_text())["train"]

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    # ---- trial records
    def record_path(self, round: int, trial_id: str) -> Path:
        return self.trial_dir(round, trial_id) / "record.json"

    def write_record(self, record: TrialRecord) -> None:
        write_json(self.record_path(record.round, record.trial_id), dataclasses.asdict(record))

    def read_record(self, round: int, trial_id: str) -> TrialRecord | None:
        path = self.record_path(round, trial_id)
        return TrialRecord(**json.loads(path.read_text())) if path.is_file() else None

    def records(self) -> list[TrialRecord]:
        """Every trial of every round, read from its ``record.json``.

        Returns:
            The records, in folder order (``rank_key`` sorts them best first).
        """
        paths = sorted(self.root.glob("round-*/trials/*/record.json"))
        return [TrialRecord(**json.loads(p.read_text())) for p in paths]

    def best_model(self, round: int, backbone: str) -> Path | None:
        """The model of the best trial of ``backbone`` in ``round`` (by validation), if any."""
        done = [r for r in self.records() if r.round == round and r.backbone == backbone and r.model_path]
        return self.root / min(done, key=rank_key).model_path if done else None

    def write_trials_table(self) -> Path:
        """``trials.csv``: every record of every round, best validation score first."""
        records = sorted(self.records(), key=rank_key)
        write_csv(self.trials_table, pd.DataFrame([r.row() for r in records]))
        return self.trials_table

    def member_files(self, member: Member) -> dict[str, Any]:
        """A member's trial record and the training config of its model (what a submission's
        info lists; a refit model has its own config)."""
        return {
            "record": json.loads(self.record_path(member.round, member.trial_id).read_text()),
            "config": json.loads((self.root / member.model_path).with_name("config.json").read_text()),
        }

    # ---- ensembles
    def ensemble_dir(self, name: str) -> Path:
        return self.root / "ensembles" / name

    def ensemble_predictions(self, name: str) -> Path:
        """An ensemble's validation predictions."""
        return self.ensemble_dir(name) / "val_predictions.csv"

    def save_ensemble(self, ens: Ensemble, predictions: pd.DataFrame) -> None:
        write_csv(self.ensemble_predictions(ens.name), predictions)
        write_json(self.ensemble_dir(ens.name) / "ensemble.json", ens.to_dict())

    def ensembles(self) -> list[Ensemble]:
        """Every saved ensemble, read from its ``ensemble.json``.

        Returns:
            The ensembles, by name.
        """
        paths = sorted(self.root.glob("ensembles/*/ensemble.json"))
        return [Ensemble.from_dict(json.loads(p.read_text())) for p in paths]

    def load_ensemble(self, name: str | None = None) -> Ensemble:
        """An ensemble by name, or the final one.

        Args:
            name: the ensemble's name (None: the final one, by ``final_ensemble``).

        Returns:
            The ensemble.

        Raises:
            RayscError: the folder holds no ensemble, or none of that name (those it holds
                named).
        """
        found = {e.name: e for e in self.ensembles()}
        if not found:
            raise RayscError(f"{self.root}: no ensemble yet (run `raysc ensemble` first)")
        if name is None:
            return final_ensemble(list(found.values()))
        if name not in found:
            raise RayscError(f"{self.root}: no ensemble {name!r} (have: {', '.join(sorted(found))})")
        return found[name]

    # ---- pseudo-label candidates
    def pseudo_dir(self, ensemble: str) -> Path:
        return self.root / "pseudo" / ensemble

    def pseudo_candidates(self, ensemble: str) -> Path:
        return self.pseudo_dir(ensemble) / "candidates.csv"

    def pseudo_summary(self, ensemble: str) -> Path:
        return self.pseudo_dir(ensemble) / "summary.csv"

    # ---- members retrained on every labelled clip
    def refit_dir(self, trial_id: str) -> Path:
        return self.root / "refit" / trial_id

    def crossfit_dir(self, trial_id: str, fold: int) -> Path:
        """Trial ``trial_id``'s configuration trained with ``fold`` held out (cross-fitting)."""
        return self.root / "crossfit" / trial_id / f"fold-{fold}"


# ``Ensemble.fold`` of a cross-fitted ensemble: validated out of fold on every labelled clip.
OUT_OF_FOLD = -1


def train_run_name(trial_id: str) -> str:
    """A stable Ray Train run name per trial: a restarted trial finds its own checkpoints."""
    return f"train-{trial_id}"


def final_ensemble(ensembles: list[Ensemble]) -> Ensemble:
    """The one rule for the final model, shared by the pipeline and ``raysc submit``.

    The cross-fitted ensembles when there are any (chosen on every labelled clip, out of fold;
    their fold models between them trained on every label), else the single-fold ones; among
    those not retrained from another, the best validation score (``score_of``; ties: the
    name); then its retrained version when there is one (``refit_of``: on every labelled clip,
    or with the pseudo-labels of a pseudo-label round), and that one's, down the chain.

    Args:
        ensembles: an experiment's ensembles (at least one).

    Returns:
        The final ensemble.
    """
    crossfitted = [e for e in ensembles if e.fold == OUT_OF_FOLD]
    pool = crossfitted or ensembles
    validated = [e for e in pool if e.refit_of is None] or pool
    best = max(validated, key=lambda e: (score_of(e.metrics), e.name))
    while (retrained := next((e for e in ensembles if e.refit_of == best.name), None)) is not None:
        best = retrained
    return best
