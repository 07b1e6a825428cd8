"""The ``raysc`` command: one subcommand per library call. ``main(argv) -> int``.

Each subcommand imports its library module when it runs: torch and Ray take seconds to import,
and ``raysc --help`` or ``raysc synth`` should not wait for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import RayscError

if TYPE_CHECKING:
    from .search import SearchResult

log = logging.getLogger("raysc")

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130


def _number(kind: type, *, low: float, inclusive: bool = True) -> Callable[[str], float]:
    """An argparse type: a finite number of ``kind`` at least (or above) ``low``."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"{text} must be {'>=' if inclusive else '>'} {low:g}")
        return value

    return parse


COUNT = _number(int, low=1)  # how many: clips, trials, epochs, workers
INDEX = _number(int, low=0)  # a seed, a round
FRACTION = _number(float, low=0.0)
POSITIVE = _number(float, low=0.0, inclusive=False)


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synth import DEV_METADATA, EVAL_METADATA, synthesize

    s = synthesize(
        args.out,
        clips=args.clips,
        eval_clips=args.eval_clips,
        labelled_fraction=args.labelled_fraction,
        sample_rate=args.sample_rate,
        clip_seconds=args.clip_seconds,
        cities=args.cities,
        unseen_cities=args.unseen_cities,
        session_size=args.session_size,
        pretrain_clips=args.pretrain_clips,
        seed=args.seed,
        workers=args.workers,
    )
    print(
        f"wrote {s.dev_clips} dev clips ({s.labelled} labelled, {s.dev_sessions} sessions, "
        f"{len(s.dev_cities)} cities) and {s.eval_clips} eval clips ({s.eval_sessions} sessions, "
        f"{len(s.unseen_cities)} unseen cities) to {s.out}\n"
        f"  dev metadata:  {s.out / DEV_METADATA}\n  eval metadata: {s.out / EVAL_METADATA}"
    )
    return EXIT_OK


def _add_synth(sub: Any) -> None:
    """`raysc synth`: its flags."""
    p = sub.add_parser("synth", help="write a synthetic dataset in the challenge's format")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--clips", type=COUNT, default=2000, help="development clips (default 2000)")
    p.add_argument("--eval-clips", type=INDEX, default=400, help="evaluation clips (default 400)")
    p.add_argument("--labelled-fraction", type=POSITIVE, default=0.2, help="labelled share of dev clips (default 0.2)")
    p.add_argument("--sample-rate", type=COUNT, default=16000, help="Hz (default 16000)")
    p.add_argument("--clip-seconds", type=POSITIVE, default=10.0, help="clip length (default 10)")
    p.add_argument("--cities", type=COUNT, default=8, help="dev cities (default 8)")
    p.add_argument("--unseen-cities", type=INDEX, default=3, help="eval-only cities (default 3)")
    p.add_argument("--session-size", type=COUNT, default=8, help="mean clips per recording session (default 8)")
    p.add_argument("--pretrain-clips", type=INDEX, default=0, help="also write N TAU- and N CochlScene-format clips")
    p.add_argument("--seed", type=INDEX, default=0)
    p.add_argument("--workers", type=COUNT, default=1, help="processes rendering audio (default 1)")
    p.set_defaults(func=_cmd_synth)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare

    result = prepare(
        dev_meta=args.dev_meta,
        eval_meta=args.eval_meta,
        audio_dirs=args.audio,
        out=args.out,
        sample_rate=args.sample_rate,
        clip_seconds=args.clip_seconds,
        folds=args.folds,
        split=args.split,
        seed=args.seed,
        workers=args.workers,
        tau=args.tau,
        cochlscene=args.cochlscene,
        label_map=args.label_map,
        overwrite=args.overwrite,
    )
    counts = result.info["counts"]
    spec = result.store.spec
    print(
        f"prepared {len(result.manifest)} clips in {result.out}: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"\n  {result.info['sessions']} sessions, {args.folds} folds by {args.split}, "
        f"{result.info['session_labels']} unlabelled clips take the label of their session, "
        f"{len(result.cities) - 1} dev cities; eval-only cities: {result.info['eval_cities_not_in_dev'] or 'none'}"
        f"\n  feature store: {spec.count} x {spec.num_samples} int16 at {spec.sample_rate} Hz "
        f"({spec.padded} padded, {spec.trimmed} trimmed, {spec.clipped} clipped)"
    )
    return EXIT_OK


def _add_prepare(sub: Any) -> None:
    """`raysc prepare`: its flags."""
    p = sub.add_parser(
        "prepare",
        help="challenge metadata + audio -> manifest + feature store",
        description="Validate the challenge's metadata and audio (every problem reported at once, nothing written "
        "when there is one), then write a data folder: manifest.csv, dataset.json and the FeatureStore. Metadata: "
        "UTF-8 (a BOM is accepted), header filename,location,record_time,scene_label, record_time as "
        "YYYY-MM-DD HH:MM:SS, an empty scene_label for unlabelled clips; audio: <filename>.wav or .flac anywhere "
        "under the --audio folders, any rate and channel count.",
        epilog="example: raysc prepare --dev-meta APSIPA2025_GC_ASC_dev_metadata.csv --eval-meta "
        "APSIPA2025_GC_ASC_eval_metadata.csv --audio /data/cas2023/audio --out data/apsipa2025",
    )
    p.add_argument("--dev-meta", type=Path, required=True, help="development metadata CSV")
    p.add_argument("--eval-meta", type=Path, required=True, help="evaluation metadata CSV")
    p.add_argument("--audio", type=Path, action="append", required=True, help="audio folder (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="data folder to write")
    p.add_argument("--sample-rate", type=COUNT, default=44100, help="target rate in Hz (default 44100)")
    p.add_argument("--clip-seconds", type=POSITIVE, default=10.0, help="pad or trim to this length (default 10)")
    p.add_argument("--folds", type=_number(int, low=2), default=5, help="validation folds (default 5)")
    p.add_argument(
        "--split",
        choices=["session", "city"],
        default="session",
        help="group folds by recording session (default) or hold out whole cities",
    )
    p.add_argument("--seed", type=INDEX, default=0, help="fold assignment seed")
    p.add_argument("--workers", type=COUNT, default=None, help="decoding processes (default: all cores)")
    p.add_argument("--tau", type=Path, help="TAU Urban Acoustic Scenes 2020 Mobile folder (pretraining)")
    p.add_argument("--cochlscene", type=Path, help="CochlScene folder (pretraining)")
    p.add_argument("--label-map", type=Path, help="YAML mapping of pretraining labels (default: ALPS table)")
    p.add_argument("--overwrite", action="store_true", help="replace a data folder prepared from other inputs")
    p.set_defaults(func=_cmd_prepare)


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models
    from .models.summary import summarize

    unknown = sorted(set(args.names) - set(list_models()))
    if unknown:
        raise RayscError(f"unknown backbone(s) {unknown} (valid: {', '.join(list_models())})")
    rows = summarize(args.names or None, width=args.width, bench=args.bench, batch=args.batch)
    header = f"{'backbone':<14}{'params':>12}{'MMACs/clip':>12}"
    header += f"{'train clips/s':>15}" if args.bench else ""
    print(header)
    for r in rows:
        line = f"{r.name:<14}{r.params:>12,}{r.macs / 1e6:>12,.0f}"
        line += f"{r.train_clips_per_s:>15.2f}" if args.bench else ""
        print(line)
    print(
        f"(width {args.width:g}; MACs of one forward pass on a 10 s clip, matmuls and convolutions only"
        + (f"; training = forward + backward + SGD step, batch {args.batch}, on this machine)" if args.bench else ")")
    )
    return EXIT_OK


def _add_models(sub: Any) -> None:
    """`raysc models`: its flags."""
    p = sub.add_parser("models", help="list the backbones with their size and cost")
    p.add_argument("names", nargs="*", help="backbones to show (default: all)")
    p.add_argument("--width", type=POSITIVE, default=1.0, help="channel multiplier (default 1: the papers' sizes)")
    p.add_argument("--bench", action="store_true", help="also measure training clips/s on this machine")
    p.add_argument("--batch", type=COUNT, default=8, help="batch size for --bench (default 8)")
    p.set_defaults(func=_cmd_models)


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config, make_config, parse_sets
    from .distributed import train
    from .train import check_inputs

    values = load_config(args.config) if args.config else {}
    if args.backbone:
        values["backbone"] = args.backbone
    if "backbone" not in values:
        raise RayscError("give --backbone NAME or a --config file that sets backbone")
    values |= parse_sets(args.set)
    for key in ("epochs", "fold"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.train_on == "pretrain":
        values["train_on"] = "pretrain"
    cfg = make_config(values, where=str(args.config or "options"))
    check_inputs(cfg, args.data)  # before --out is created and before Ray starts
    metrics = train(
        cfg,
        args.data,
        args.out,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        address=args.address,
        max_failures=args.max_failures,
    )
    best = metrics["best"]
    if best:
        print(
            f"best epoch {best['epoch']}: macro accuracy {best['macro_accuracy']:.4f}, accuracy "
            f"{best['accuracy']:.4f}, log loss {best['log_loss']:.4f}; city held out (<unk>) "
            f"{best['unk_city_macro_accuracy']:.4f}, score {best['score']:.4f}"
        )
    print(f"run written to {args.out} (model.pt, metrics.json, val_predictions.csv, config.json)")
    if cfg.train_on == "pretrain":
        print(f"fine-tune from it with: init_from={args.out / 'model.pt'} reset_head=true")
    return EXIT_OK


def _add_train(sub: Any) -> None:
    """`raysc train`: its flags."""
    p = sub.add_parser("train", help="train one model with Ray Train (one or more workers)")
    _add_train_args(p)
    p.set_defaults(func=_cmd_train, train_on="labelled")


def _add_pretrain(sub: Any) -> None:
    """`raysc pretrain`: its flags."""
    p = sub.add_parser(
        "pretrain",
        help="pretrain a network on the data folder's TAU / CochlScene clips (then fine-tune with init_from)",
        description="Train on the pretraining clips (prepared with --tau / --cochlscene) with their own "
        "session-grouped folds; same launcher, flags and fault tolerance as `raysc train`. The clips have no city "
        "or time: the metadata branch gets <unk> and zeros. The model.pt it writes records that it is a "
        "pretrained trunk and its label set; fine-tune with init_from=RUN/model.pt reset_head=true.",
    )
    _add_train_args(p)
    p.set_defaults(func=_cmd_train, train_on="pretrain")


def _cmd_import_weights(args: argparse.Namespace) -> int:
    from .config import parse_sets
    from .weights import import_weights

    report = import_weights(
        args.weights,
        backbone=args.backbone,
        out=args.out,
        data=args.data,
        model=parse_sets(args.set),
        by_order=args.match_by_order,
    )
    print(report.describe())
    print(f"written to {args.out}; fine-tune from it with: init_from={args.out} reset_head=true")
    return EXIT_OK


def _add_import_weights(sub: Any) -> None:
    """`raysc import-weights`: its flags."""
    p = sub.add_parser(
        "import-weights",
        help="map a plain PyTorch state dict onto a raysc network by name (or, asked, by order and shape)",
        description="Copy every tensor of a state dict that matches the raysc network by name; with "
        "--match-by-order (a .pth of another code base, e.g. the official baseline's SE-Trans checkpoint), pair "
        "the rest by order and shape and print every pair. A file that does not hold the network's weights is "
        "refused. Report what matched and what did not, and write a raysc model file for init_from.",
    )
    p.add_argument("weights", type=Path, help="a state dict saved with torch.save (loaded with weights_only=True)")
    p.add_argument("--backbone", required=True, help="the raysc backbone to map it onto")
    p.add_argument("--out", type=Path, required=True, help="the raysc model file to write")
    p.add_argument("--data", type=Path, help="build the network for this data folder (classes, cities, rate)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a model option, e.g. width=0.5 (repeatable)"
    )
    p.add_argument(
        "--match-by-order",
        action="store_true",
        help="pair the tensors that no name matches by order and shape (another code base's names)",
    )
    p.set_defaults(func=_cmd_import_weights)


def describe(result: SearchResult) -> str:
    """A short text summary of a finished search."""
    from .experiment import Experiment

    counts = {k: sum(r.status == k for r in result.records) for k in ("completed", "stopped", "failed")}
    lines = [
        f"{len(result.records)} trials in {result.seconds / 60:.1f} min: "
        + ", ".join(f"{v} {k}" for k, v in counts.items())
    ]
    for r in result.records[:5]:
        acc, unk = r.metrics.get("macro_accuracy"), r.metrics.get("unk_city_macro_accuracy")
        outcome = f"macro acc {acc:.4f}" if acc is not None else f"error: {r.error}"
        outcome += f", city held out {unk:.4f}" if unk is not None else ""
        outcome += f" (ended by an error: {r.error})" if acc is not None and r.error else ""
        lines.append(f"  {r.trial_id}  {r.backbone:<13} {r.status:<9} {outcome}")
    lines.append(f"trials table: {Experiment(result.round_dir.parent).trials_table}")
    return "\n".join(lines)


def _cmd_search(args: argparse.Namespace) -> int:
    from .search import SearchOptions, search

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(SearchOptions)}
    result = search(
        args.space,
        data=args.data,
        experiment=args.experiment,
        resume=args.resume,
        address=args.address,
        progress=lambda line: print(line, flush=True),
        **options,
    )
    print(describe(result))
    return EXIT_OK


def _add_search(sub: Any) -> None:
    """`raysc search`: its flags."""
    p = sub.add_parser("search", help="hyperparameter search: Ray Tune + Optuna (TPE) + ASHA, one round")
    p.add_argument("space", type=Path, help="search space YAML (see search_spaces/)")
    p.add_argument("--data", type=Path, required=True, help="prepared data folder")
    p.add_argument("--experiment", type=Path, required=True, help="experiment folder (rounds, trials, ensembles)")
    p.add_argument("--trials", type=COUNT, default=8, help="trials to run (default 8)")
    p.add_argument("--max-epochs", type=COUNT, help="epochs of a trial that is never stopped (default: the space's)")
    p.add_argument(
        "--time-budget",
        dest="time_budget_minutes",
        type=POSITIVE,
        metavar="MINUTES",
        help="start no trial after this long",
    )
    p.add_argument("--fold", type=int, default=0, help="validation fold (default 0)")
    p.add_argument("--round", type=INDEX, default=0, help="semi-supervised round (default 0: labelled clips only)")
    p.add_argument("--pseudo-candidates", type=Path, metavar="CSV", help="pseudo-label candidates (round >= 1)")
    p.add_argument("--seed", type=INDEX, default=0, help="seed of the sampler and of every trial (default 0)")
    p.add_argument("--max-concurrent", type=COUNT, help="trials at once (default: what the cluster's CPUs/GPUs fit)")
    p.add_argument("--sampler", choices=["tpe", "random"], default="tpe", help="Optuna sampler (default tpe)")
    p.add_argument(
        "--no-early-stopping", dest="early_stopping", action="store_false", help="no ASHA: every trial runs its epochs"
    )
    p.add_argument(
        "--ray-train",
        choices=["auto", "always"],
        default="auto",
        help="auto (default): a one-worker trial trains in its own, reused Tune process; always: every trial "
        "through a Ray Train TorchTrainer (multi-worker trials always are)",
    )
    p.add_argument(
        "--backbone-turns",
        action="store_true",
        help="the space's backbones take turns (trial i trains the i-th in turn) and ASHA compares a trial only "
        "with its own backbone's: each backbone gets its share of the trials",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --experiment")
    _add_address(p)
    p.set_defaults(func=_cmd_search)


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from .ensemble import build_ensemble
    from .experiment import Experiment

    if args.repeats > 1 and not args.crossfit:
        raise RayscError("--repeats repeats cross-fitting: give --crossfit N too")
    if args.per_backbone and not args.crossfit:
        raise RayscError("--per-backbone blends cross-fitted configurations: give --crossfit N too")
    if args.crossfit:
        from .crossfit import crossfit_ensemble, crossfit_repeats

        if args.rounds or args.name:
            raise RayscError("--crossfit takes its candidates from every round and names its ensembles itself")
        built = crossfit_ensemble(
            args.experiment,
            candidates=args.crossfit,
            method=args.method,
            k=args.k,
            temperature=args.temperature,
            session_smoothing=args.session_smoothing,
            cpus=args.cpus,
            time_budget_minutes=args.time_budget,
            per_backbone=args.per_backbone,
            address=args.address,
        )
        if args.repeats > 1:
            built += crossfit_repeats(
                args.experiment,
                built[0].name,
                repeats=args.repeats,
                temperature=args.temperature,
                session_smoothing=args.session_smoothing,
                cpus=args.cpus,
                address=args.address,
            )
    else:
        built = [
            build_ensemble(
                args.experiment,
                name=args.name,
                method=args.method,
                k=args.k,
                rounds=args.rounds,
                temperature=args.temperature,
                session_smoothing=args.session_smoothing,
            )
        ]
    for ens in built:
        m = ens.metrics
        where = "out of fold on" if args.crossfit else "validation"
        print(
            f"ensemble {ens.name} ({ens.method}, temperature {ens.temperature:.3g}): {where} macro accuracy "
            f"{m['macro_accuracy']:.4f}, accuracy {m['accuracy']:.4f}, log loss {m['log_loss']:.4f} "
            f"on {m['clips']} clips"
            + (f" (+- {m['fold_macro_accuracy_std']:.4f} over folds)" if args.crossfit else "")
            + (f"; city held out (<unk>) {unk:.4f}" if (unk := m.get("unk_city_macro_accuracy")) is not None else "")
        )
        weights: dict[tuple, float] = {}  # a cross-fitted configuration's fold models share its weight
        for mb in ens.members:
            key = (mb.trial_id, mb.round, mb.backbone)
            weights[key] = weights.get(key, 0.0) + mb.weight
        for (trial_id, round_, backbone), weight in weights.items():
            print(f"  {trial_id}  round {round_}  {backbone:<13} weight {weight:.3f}")
        print(f"written to {Experiment(args.experiment).ensemble_dir(ens.name)}")
    return EXIT_OK


def _add_ensemble(sub: Any) -> None:
    """`raysc ensemble`: its flags."""
    p = sub.add_parser("ensemble", help="ensemble the best trials (top-k mean or greedy selection)")
    p.add_argument("experiment", type=Path, help="experiment folder")
    p.add_argument("--method", choices=["topk", "greedy"], default="topk", help="default topk")
    p.add_argument("--k", type=COUNT, default=5, help="members (topk) or selection steps (greedy); default 5")
    p.add_argument("--rounds", type=INDEX, nargs="+", help="rounds to draw members from (default: all)")
    p.add_argument("--temperature", action="store_true", help="fit one temperature after averaging")
    p.add_argument("--session-smoothing", action="store_true", help="average predictions over each session")
    p.add_argument("--name", help="ensemble name (default: from the settings)")
    p.add_argument(
        "--crossfit",
        type=COUNT,
        metavar="N",
        help="retrain the best N trials (without pseudo-labels) once per fold on Ray and select on their "
        "out-of-fold predictions over every labelled clip",
    )
    p.add_argument(
        "--repeats",
        type=COUNT,
        default=1,
        metavar="N",
        help="with --crossfit: also train the chosen configurations on N - 1 redrawn splits of the sessions into "
        "folds, and save the ensemble of all N splits (ENSEMBLE-xN); default 1",
    )
    p.add_argument(
        "--per-backbone",
        action="store_true",
        help="with --crossfit: candidates from each backbone in turn, the members chosen within each backbone, "
        "and an equal share of the weight for each backbone within 0.1 of the best one out of fold",
    )
    p.add_argument("--cpus", type=POSITIVE, default=1.0, help="CPUs per cross-fitting run (default 1)")
    p.add_argument(
        "--time-budget", type=POSITIVE, metavar="MINUTES", help="cross-fit only the candidates that fit (estimated)"
    )
    _add_address(p)
    p.set_defaults(func=_cmd_ensemble)


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from .fileio import write_text
    from .leaderboard import leaderboard, render

    fmt = args.format or (args.out.suffix.lstrip(".") if args.out and args.out.suffix else "md")
    text = render(leaderboard(args.experiment, round=args.round), fmt, title=f"raysc leaderboard: {args.experiment}")
    if args.out:
        write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return EXIT_OK


def _add_leaderboard(sub: Any) -> None:
    """`raysc leaderboard`: its flags."""
    p = sub.add_parser("leaderboard", help="every trial and ensemble, ranked by validation macro accuracy")
    p.add_argument("experiment", type=Path, help="experiment folder")
    p.add_argument("--round", type=INDEX, help="only this round")
    p.add_argument("--format", choices=["csv", "md", "html"], help="default: from --out's suffix, else md")
    p.add_argument("--out", type=Path, help="write to a file instead of the terminal")
    p.set_defaults(func=_cmd_leaderboard)


def _cmd_pseudo_label(args: argparse.Namespace) -> int:
    from .pseudo_candidates import write_candidates
    from .pseudo_labels import Selection

    sel = Selection(threshold=args.summary_threshold, adaptive=args.adaptive, balance=args.balance)
    path, summary = write_candidates(args.experiment, ensemble=args.ensemble, selection=sel, address=args.address)
    print(summary.to_string(index=False))
    print(
        f"{summary['candidates'].sum()} candidates written to {path} ({summary['kept'].sum()} kept at this selection)"
    )
    return EXIT_OK


def _add_pseudo_label(sub: Any) -> None:
    """`raysc pseudo-label`: its flags."""
    p = sub.add_parser("pseudo-label", help="score unlabelled clips with an ensemble (pseudo-label candidates)")
    p.add_argument("experiment", type=Path, help="experiment folder")
    p.add_argument("--ensemble", help="ensemble name (default: the best by validation)")
    p.add_argument(
        "--summary-threshold",
        type=FRACTION,
        default=0.9,
        help="confidence the summary counts as kept (default 0.9); training runs select their own",
    )
    p.add_argument("--adaptive", action="store_true", help="per-class thresholds for the summary")
    p.add_argument("--balance", action="store_true", help="class-balanced selection for the summary")
    _add_address(p)
    p.set_defaults(func=_cmd_pseudo_label)


def _cmd_check_submission(args: argparse.Namespace) -> int:
    from .submission import check_submission_file

    check_submission_file(args.file, args.data)
    print(f"{args.file}: a valid submission for the eval clips of {args.data}")
    return EXIT_OK


def _add_check_submission(sub: Any) -> None:
    """`raysc check-submission`: its flags."""
    p = sub.add_parser("check-submission", help="check a submission file against a data folder before uploading it")
    p.add_argument("file", type=Path, help="submission CSV")
    p.add_argument("--data", type=Path, required=True, help="the prepared data folder of its eval clips")
    p.set_defaults(func=_cmd_check_submission)


def _cmd_submit(args: argparse.Namespace) -> int:
    from .submission import make_submission

    sub = make_submission(
        args.experiment, args.out, ensemble=args.ensemble, session_labels=args.session_labels, address=args.address
    )
    print(f"wrote {sub.csv} ({sum(sub.counts.values())} eval clips), {sub.probabilities}, {sub.info}")
    if args.session_labels:
        print(f"{sub.session_labelled} eval clip(s) took the label of their development session")
    return EXIT_OK


def _add_submit(sub: Any) -> None:
    """`raysc submit`: its flags."""
    p = sub.add_parser("submit", help="predict the eval clips and write the challenge submission")
    p.add_argument("experiment", type=Path, help="experiment folder")
    p.add_argument("--ensemble", help="ensemble name (default: the best by validation)")
    p.add_argument("--out", type=Path, required=True, help="submission CSV to write")
    p.add_argument(
        "--no-session-labels",
        dest="session_labels",
        action="store_false",
        help="predict every eval clip with the ensemble, also those recorded in a labelled development session",
    )
    _add_address(p)
    p.set_defaults(func=_cmd_submit)


def _print_result(result) -> None:
    from .leaderboard import render

    print(render(result.leaderboard.head(15), "md"), end="")
    print(f"final ensemble {result.final.name}: validation macro accuracy {result.final.metrics['macro_accuracy']:.4f}")
    print(f"submission: {result.submission}\nplots: {result.plots[0].parent}\ndone in {result.seconds / 60:.1f} min")


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from .pipeline import default_experiment, load_pipeline, run_pipeline, smoke_sized

    cfg = load_pipeline(args.pipeline)
    if args.smoke_test:
        cfg = smoke_sized(cfg)
    if args.experiment is None:
        args.experiment = default_experiment(args.data, args.pipeline)
        print(f"experiment folder: {args.experiment} (give --experiment to choose another)", flush=True)
    if args.max_concurrent:
        cfg = dataclasses.replace(cfg, max_concurrent=args.max_concurrent)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    result = run_pipeline(
        cfg,
        data=args.data,
        experiment=args.experiment,
        time_budget_minutes=args.time_budget,
        address=args.address,
        progress=lambda line: print(line, flush=True),
    )
    _print_result(result)
    return EXIT_OK


def _add_pipeline(sub: Any) -> None:
    """`raysc pipeline`: its flags."""
    p = sub.add_parser("pipeline", help="search -> ensemble -> pseudo-label rounds -> submission, resumable")
    p.add_argument(
        "pipeline",
        type=Path,
        nargs="?",
        help="pipeline YAML, or a built-in: default (the default), or a recipe: alps, ascmamba, baseline, gpu, "
        "mobileascnet, rm3 (the seed systems' and the official baseline's training, and the GPU recipe)",
    )
    p.add_argument("--data", type=Path, required=True, help="prepared data folder")
    p.add_argument(
        "--experiment", type=Path, help="experiment folder (default: results/<data folder name>-<pipeline name>)"
    )
    p.add_argument("--time-budget", type=POSITIVE, metavar="MINUTES", help="shared by the rounds' searches")
    p.add_argument("--max-concurrent", type=COUNT, help="trials at once (overrides the file; for autoscaling clusters)")
    p.add_argument("--seed", type=INDEX, help="seed of the searches' sampler and trials (overrides the file's)")
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help="one trial of one epoch a round, networks at width 0.125 (the stages as they are): checks that it "
        "runs to a submission",
    )
    _add_address(p)
    p.set_defaults(func=_cmd_pipeline)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(
        args.out,
        clips=args.clips,
        time_budget_minutes=args.time_budget,
        address=args.address,
        progress=lambda line: print(line, flush=True),
    )
    _print_result(result)
    return EXIT_OK


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="Ray cluster address (default: RAY_ADDRESS, else a private local Ray; auto: the Ray running here)",
    )


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="prepared data folder")
    p.add_argument("--out", type=Path, required=True, help="run folder to write (must not hold a finished run)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--backbone", help="a registered backbone, with its paper defaults")
    what.add_argument("--config", type=Path, help="training config YAML (TrainConfig keys)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. lr=3e-4 or model.width=0.5 (repeatable)",
    )
    p.add_argument("--epochs", type=COUNT, help="shortcut for --set epochs=N")
    p.add_argument("--fold", type=int, help="validation fold (-1: train on every labelled clip)")
    p.add_argument("--workers", type=COUNT, default=1, help="data-parallel workers (default 1)")
    p.add_argument("--gpus-per-worker", type=FRACTION, default=0.0, help="GPUs per worker (default 0: CPU)")
    p.add_argument(
        "--cpus-per-worker", type=POSITIVE, default=1.0, help="CPUs per worker; also its torch threads (default 1)"
    )
    p.add_argument("--max-failures", type=INDEX, default=1, help="worker restarts allowed (default 1)")
    _add_address(p)


def _add_demo(sub: Any) -> None:
    """`raysc demo`: its flags."""
    p = sub.add_parser("demo", help="synthesise a small dataset and run the whole pipeline on it")
    p.add_argument("--out", type=Path, default=Path("raysc-demo"), help="folder to write (default raysc-demo)")
    p.add_argument("--clips", type=COUNT, default=800, help="development clips to synthesise (default 800)")
    p.add_argument("--time-budget", type=POSITIVE, metavar="MINUTES", help="limit the searches")
    _add_address(p)
    p.set_defaults(func=_cmd_demo)


# Every subcommand, in the order --help lists them; each one's flags are set beside its handler.
COMMANDS = (
    _add_synth,
    _add_prepare,
    _add_models,
    _add_train,
    _add_pretrain,
    _add_import_weights,
    _add_search,
    _add_ensemble,
    _add_leaderboard,
    _add_pseudo_label,
    _add_submit,
    _add_check_submission,
    _add_pipeline,
    _add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysc",
        description="City- and time-aware semi-supervised acoustic scene classification on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"raysc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except RayscError as exc:
        log.error("%s", exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
