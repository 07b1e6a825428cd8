"""The main job on a budget, at the challenge's shape: `raysc pipeline` (default) vs the official
baseline's recipe (`raysc pipeline baseline`) vs the logistic-regression floor, side by side.

Synthetic data shaped like the challenge (`raysc synth` at 44.1 kHz, 10 s clips, 1,200
development clips of which 20 % labelled, 600 eval clips, 8 cities of which 2 only in eval) is
prepared once; each pipeline runs as the CLI with the same ``--time-budget`` on a Ray of its own;
its submission, and its best single model (by validation), are scored on the eval clips' true
labels, overall and on the eval-only cities. The floor is also scored session-smoothed and with
the submission's rule (eval clips of labelled development sessions take their session's label);
the final ensemble also as its models predict (no such labels) and with every city withheld.
Wall time per stage comes from the pipeline's own progress lines.

    python benchmarks/budget.py --raw RAW --data DATA --time-budget 60
    python benchmarks/budget.py --raw RAW --data DATA --work W --pipelines default --rescore
    python benchmarks/budget.py --raw RAW --data DATA --time-budget 10 --pipelines default --seeds 0 1 2
    python benchmarks/budget.py --work W --time-budget 10 --pipelines default --without repeats --data-seeds 0 1 2
    python benchmarks/budget.py --smoke-test

``--data-seeds`` synthesises one data set per seed (``W/data-seed-S/``, reused when there) and
summarises every system over all of them. ``--without`` adds ablations of the default pipeline:
a member family left out of its space (trunks, cnns) or a stage turned off (repeats).

``--rescore`` runs no pipeline: it scores what an earlier run left under ``--work`` again, its
final ensemble through this version's submission step (written beside the pipeline's own
submission as ``rescored.csv``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import ray
import yaml
from common import (  # the script folder is on sys.path
    add_challenge_data_options,
    challenge_data,
    md_table,
    write_results,
)
from floor import eval_score, floor_predictions

from raysc.datafolder import PreparedData, load_dataset
from raysc.ensemble import smooth_sessions
from raysc.experiment import Experiment, score_of
from raysc.inference import predict_clips, predict_ensemble
from raysc.metadata import CLASSES
from raysc.pipeline import PipelineConfig
from raysc.search_space import SPACES_DIR
from raysc.submission import apply_session_labels, make_submission
from raysc.synth import EVAL_LABELS
from raysc.train import session_labelled


def run_pipeline(
    name: str, data: Path, exp: Path, budget: float, seed: int
) -> tuple[float, dict[str, float], str | None]:
    """The CLI, timed; returns wall seconds, seconds per stage, and why it failed (None: it
    ended with a submission)."""
    cmd = [
        sys.executable,
        "-m",
        "raysc.cli",
        "pipeline",
        name,
        "--data",
        str(data),
        "--experiment",
        str(exp),
        "--time-budget",
        str(budget),
        "--seed",
        str(seed),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    stages, current, started, lines = {}, "start", t0, []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            lines.append(line)
            print(f"  [{name}] {line}", end="")
            if starts := re.fullmatch(r"\[pipeline\] (\S+) \.\.\.", line.rstrip()):  # a stage begins
                now = time.perf_counter()
                stages[current] = stages.get(current, 0) + now - started
                current, started = starts.group(1), now
    stages[current] = stages.get(current, 0) + time.perf_counter() - started
    # A recipe that cannot run at this budget here is a result too (its row says why), not the
    # end of the benchmark.
    failed = next((line.strip() for line in reversed(lines) if line.strip()), "no output") if proc.returncode else None
    return time.perf_counter() - t0, stages, failed


def score_pipeline(
    name: str, label: str, exp: Path, data_dir: Path, ev: pd.DataFrame, *, budget: float, seed: int, rescore: bool
) -> list[dict]:
    """Run (or, with ``rescore``, re-submit) one pipeline and score it: its submission first, then
    the same ensemble without eval session labels and with every city withheld, and its best
    single model."""
    experiment = Experiment(exp)
    if rescore:
        # This version's submission step on the finished experiment's final ensemble.
        if "submit" not in json.loads(experiment.pipeline_state.read_text())["done"]:
            raise SystemExit(f"--rescore: {exp} holds no finished pipeline")
        seconds, stages, csv = None, {}, experiment.submission("rescored.csv")
        make_submission(exp, csv, ensemble=experiment.load_ensemble().name)
    else:
        seconds, stages, failed = run_pipeline(name, data_dir, exp, budget, seed)
        if failed:
            nothing = {"eval": None, "seen": None, "unseen": None, "stages": {}}
            return [{"system": f"{label}: failed: {failed}", "minutes": round(seconds / 60, 1), **nothing}]
        csv = experiment.submission("submission.csv")
    sub = pd.read_csv(csv).set_index("filename").loc[ev["filename"]]
    records = [r for r in experiment.records() if r.status != "failed"]
    best = max(records, key=lambda r: score_of(r.metrics))
    probs = predict_clips(exp / best.model_path, data_dir, list(ev["filename"]))
    ens = experiment.load_ensemble()
    # The same ensemble with every city withheld (<unk>): how much of the seen cities'
    # score is their city's prior, which eval-only cities cannot have.
    withheld = predict_ensemble(ens, exp, list(ev["filename"]), unknown_city=True)
    as_predicted = predict_ensemble(ens, exp, list(ev["filename"]))  # no eval session labels
    ray.shutdown()  # the next pipeline starts a Ray of its own
    return [
        {
            "system": f"{label}: final ensemble ({ens.name}, {len(ens.members)} members)",
            "minutes": round(seconds / 60, 1) if seconds else None,
            **eval_score(sub["scene_label"].map(CLASSES.index).to_numpy(), ev),
            "trials": len(records),
            "stages": {k: round(v / 60, 2) for k, v in stages.items()},
        },
        {
            "system": f"{label}: final ensemble, no eval session labels",
            "minutes": None,
            **eval_score(as_predicted[list(CLASSES)].to_numpy().argmax(1), ev),
        },
        {
            "system": f"{label}: final ensemble, every city withheld (<unk>)",
            "minutes": None,
            **eval_score(withheld[list(CLASSES)].to_numpy().argmax(1), ev),
        },
        {
            "system": f"{label}: best single model ({best.backbone}, {best.trial_id})",
            "minutes": None,
            **eval_score(probs[list(CLASSES)].to_numpy().argmax(1), ev),
        },
    ]


# Member families of the default space, for ablations: a trunk member reads a pretrained trunk's
# embedding; the CNNs learn from the log-mel; `stats` (the log-mel statistics MLP) stays in each.
FAMILIES = {"trunks": ("aisfx",), "cnns": ("mobileascnet", "setrans")}
# Stages that an ablation can turn off, by the pipeline file's settings that do it.
STAGES = {"repeats": {"repeats": 1}, "blend": {"per_backbone": False}}


def variant(work: Path, name: str, *, space: dict | None = None, **settings) -> Path:
    """A pipeline file ``work/NAME.yaml``: the default pipeline with ``settings`` changed and,
    given, ``space`` (written beside it as ``space-NAME.yaml``) instead of the default space."""
    values = {**dataclasses.asdict(PipelineConfig()), **settings}
    if space is not None:
        space_file = work / f"space-{name}.yaml"
        space_file.write_text(yaml.safe_dump({**space, "name": name}))
        values["space"] = str(space_file)
    pipeline_file = work / f"{name}.yaml"
    pipeline_file.write_text(yaml.safe_dump(values))
    return pipeline_file


def ablation(family: str, work: Path) -> Path:
    """A pipeline file: the default pipeline without ``family``'s members (on the default space
    without them), or without a stage of ``STAGES``."""
    name = f"default-without-{family}"
    if family in STAGES:
        return variant(work, name, **STAGES[family])
    space = yaml.safe_load((SPACES_DIR / "default.yaml").read_text())
    gone = set(FAMILIES[family])
    space["backbones"] = {k: v for k, v in space["backbones"].items() if k not in gone}
    space["start"] = [p for p in space.get("start", []) if p["backbone"] not in gone]
    return variant(work, name, space=space)


def centred(work: Path) -> Path:
    """A pipeline file: the default pipeline with its trunk members' embeddings centred per city
    (``FrontendConfig.city_centred``), for the comparison of that setting."""
    space = yaml.safe_load((SPACES_DIR / "default.yaml").read_text())
    for name in FAMILIES["trunks"]:
        space["backbones"][name]["model.frontend"] = {"city_centred": True}
    return variant(work, "default-centred", space=space)


def floor_rows(data: PreparedData, data_dir: Path, ev: pd.DataFrame) -> list[dict]:
    """The logistic-regression floor's rows: plain, smoothed, with the session rule, audio only,
    with the aisfx embedding (as is and centred per city), with session labels."""
    labelled = data.rows("labelled")
    t0 = time.perf_counter()
    floor = floor_predictions(data.store, labelled, ev, len(data.cities))
    smoothed = smooth_sessions(floor, ev["session"].to_numpy())
    results = [
        {"system": "logistic regression (labelled clips)", "minutes": None, **eval_score(floor.argmax(1), ev)},
        {
            # What session smoothing alone adds: the pipeline's final ensemble smooths too.
            "system": "logistic regression (labelled clips), session-smoothed",
            "minutes": None,
            **eval_score(smoothed.argmax(1), ev),
        },
    ]
    # The floor with the submission's session rule: eval clips of labelled development
    # sessions take their session's label (what the default pipeline's submission does).
    as_probs = pd.DataFrame(smoothed, columns=list(CLASSES))
    as_probs.insert(0, "filename", ev["filename"].to_numpy())
    ruled, hit = apply_session_labels(as_probs, data.manifest, list(CLASSES))
    results.append(
        {
            "system": "logistic regression (labelled clips), session-smoothed + eval session labels",
            "minutes": None,
            **eval_score(ruled[list(CLASSES)].to_numpy().argmax(1), ev),
            "session_labelled": int(hit.sum()),
        }
    )
    results.append(
        {
            # Audio alone: what the floor's seen cities owe to the city and time inputs.
            "system": "logistic regression (labelled clips), audio only",
            "minutes": None,
            **eval_score(floor_predictions(data.store, labelled, ev, len(data.cities), features="audio").argmax(1), ev),
        }
    )
    results.append(
        {
            # The floor with the aisfx trunk's embedding: what one linear model gets from it.
            "system": "logistic regression (labelled clips) + aisfx embedding",
            "minutes": None,
            **eval_score(
                floor_predictions(
                    data.store, labelled, ev, len(data.cities), features="both+aisfx", data_dir=data_dir
                ).argmax(1),
                ev,
            ),
        }
    )
    results.append(
        {
            # The same, the embedding less its city's mean over the data folder (the trunk
            # member's front end, FrontendConfig.city_centred).
            "system": "logistic regression (labelled clips) + aisfx embedding, centred per city",
            "minutes": None,
            **eval_score(
                floor_predictions(
                    data.store, labelled, ev, len(data.cities), features="both+aisfx-centred", data_dir=data_dir
                ).argmax(1),
                ev,
            ),
        }
    )
    with_sessions = pd.concat([labelled, session_labelled(data, -1)])
    results.append(
        {
            "system": "logistic regression (+ session labels)",
            "minutes": None,
            **eval_score(floor_predictions(data.store, with_sessions, ev, len(data.cities)).argmax(1), ev),
        }
    )
    floor_minutes = (time.perf_counter() - t0) / 60
    for f in results:
        f["minutes"] = round(floor_minutes / 5, 2)  # five regressions trained
        f["group"] = f["system"]
    return results


def pipeline_rows(args: argparse.Namespace, work: Path, data_dir: Path, ev: pd.DataFrame) -> list[dict]:
    """Each pipeline (and ablation) once per seed on one data set, experiments under ``work``."""
    results: list[dict] = []
    variants = [str(ablation(f, work)) for f in args.without] + ([str(centred(work))] if args.centred else [])
    for name in [*args.pipelines, *variants]:
        finals = []
        for seed in args.seeds:
            # Seed 0 keeps the folder name of a single run, so --rescore finds earlier runs.
            name_said = Path(name).stem  # an ablation's pipeline file by its name
            exp = work / (f"exp-{name_said}" if seed == 0 else f"exp-{name_said}-seed{seed}")
            label = f"pipeline {name_said}" + (f" (seed {seed})" if len(args.seeds) > 1 else "")
            rows = score_pipeline(
                name, label, exp, data_dir, ev, budget=args.time_budget, seed=seed, rescore=args.rescore
            )
            for r in rows:  # what the row is across runs: its system without the seed or members
                r["group"] = r["system"].replace(label, f"pipeline {name_said}").split(" (")[0]
            if rows[0]["eval"] is not None:
                finals.append(rows[0])
            else:
                rows[0]["group"] = None  # a failed run: its own row, outside the means
            results += rows
        if len(finals) > 1:
            results.append(
                {
                    "system": f"pipeline {name_said}: final ensemble, mean (sample sd) over seeds {args.seeds}",
                    "group": None,  # already a summary
                    "minutes": None if args.rescore else round(statistics.mean(r["minutes"] for r in finals), 1),
                    **{k: statistics.mean(r[k] for r in finals) for k in ("eval", "seen", "unseen")},
                    "sd": {k: statistics.stdev(r[k] for r in finals) for k in ("eval", "seen", "unseen")},
                }
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_challenge_data_options(parser)
    parser.add_argument("--time-budget", type=float, default=60.0, help="minutes per pipeline (default 60)")
    parser.add_argument("--pipelines", nargs="+", default=["default", "baseline"])
    parser.add_argument("--work", type=Path, help="keep the experiments here (default: a temporary folder)")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="no pipeline run: score the finished experiments under --work with this version's submission step",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0],
        help="run each pipeline once per seed (its sampler's and trials'); with several, the mean and spread too",
    )
    parser.add_argument(
        "--without",
        nargs="+",
        default=[],
        choices=sorted([*FAMILIES, *STAGES]),
        help="also run the default pipeline without each of these member families or stages (ablations)",
    )
    parser.add_argument(
        "--centred",
        action="store_true",
        help="also run the default pipeline with its trunk embeddings centred per city (FrontendConfig.city_centred)",
    )
    parser.add_argument(
        "--data-seeds",
        nargs="+",
        type=int,
        default=[0],
        help="synthesise the data once per seed (each in WORK/data-seed-S with several); the summary is the "
        "mean and spread over every data seed and seed",
    )
    parser.add_argument("--smoke-test", action="store_true", help="tiny data, 3-minute budgets, for CI")
    args = parser.parse_args(argv)
    if len(args.data_seeds) > 1 and (args.raw or args.data):
        parser.error("several --data-seeds synthesise their own data: leave out --raw and --data")
    results, shapes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if args.smoke_test:
            args.time_budget = 3.0
        for data_seed in args.data_seeds:
            # One data seed keeps WORK's own layout, so --rescore finds earlier runs' folders.
            here = work if len(args.data_seeds) == 1 else work / f"data-seed-{data_seed}"
            raw, data_dir = challenge_data(args.raw, args.data, here, smoke=args.smoke_test, seed=data_seed)
            data = load_dataset(data_dir)
            ev = data.manifest[data.manifest["subset"] == "eval"].merge(pd.read_csv(raw / EVAL_LABELS), on="filename")
            rows = floor_rows(data, data_dir, ev) + pipeline_rows(args, here, data_dir, ev)
            # Data given with --raw/--data: its seed is not known here.
            results += [r | {"data_seed": "given" if args.raw or args.data else data_seed} for r in rows]
            shapes.append((len(ev), int((ev["city_idx"] == 0).sum()), len(data.rows("labelled"))))
    summary = summarise(results)
    return write_results(
        "budget" + ("_smoke" if args.smoke_test else ""),
        {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "results": results},
        markdown(args, results, summary, shapes),
    )


def summarise(results: list[dict]) -> list[dict]:
    """Per system (its ``group``), the mean and sample sd over every run of it (data seeds and
    seeds); empty when every system ran once."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        if r.get("group"):
            groups.setdefault(r["group"], []).append(r)
    if all(len(runs) == 1 for runs in groups.values()):
        return []
    out = []
    for group, runs in groups.items():
        minutes = [r["minutes"] for r in runs if r.get("minutes") is not None]
        out.append(
            {
                "system": group,
                "runs": len(runs),
                "minutes": round(statistics.mean(minutes), 1) if minutes else None,
                **{k: statistics.mean(r[k] for r in runs) for k in ("eval", "seen", "unseen")},
                "sd": {
                    k: statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0
                    for k in ("eval", "seen", "unseen")
                },
            }
        )
    return out


def markdown(args: argparse.Namespace, results: list[dict], summary: list[dict], shapes: list[tuple]) -> str:
    """The command, the summary over runs (when there are several), every run, and the stages."""

    def cells(r: dict) -> list[str]:
        if r["eval"] is None:
            return ["failed", "", ""]
        return [f"{r[k]:.3f}" + (f" ± {r['sd'][k]:.3f}" if "sd" in r else "") for k in ("eval", "seen", "unseen")]

    cmd = (
        "python benchmarks/budget.py"
        + (
            " --smoke-test"
            if args.smoke_test
            else " --rescore"
            if args.rescore
            else f" --time-budget {args.time_budget:g}"
        )
        + (f" --data-seeds {' '.join(map(str, args.data_seeds))}" if len(args.data_seeds) > 1 else "")
        + (f" --seeds {' '.join(map(str, args.seeds))}" if len(args.seeds) > 1 else "")
        + (f" --without {' '.join(args.without)}" if args.without else "")
        + (" --centred" if args.centred else "")
    )
    n_eval, n_unseen, n_labelled = shapes[0]
    md = (
        f"`{cmd}`: per data set {n_eval} eval clips ({n_unseen} from eval-only cities), {n_labelled} labelled "
        "development clips; eval macro accuracy (chance 0.100).\n\n"
    )
    header = ["system", "wall min", "eval macro acc", "seen cities", "eval-only cities"]
    if summary:
        md += (
            f"Mean ± sample sd over data seeds {args.data_seeds} and seeds {args.seeds}:\n\n"
            + md_table(["runs", *header], [[r["runs"], r["system"], r["minutes"] or "", *cells(r)] for r in summary])
            + "\nEvery run:\n\n"
        )
    rows = [[r["data_seed"], r["system"], r["minutes"] if r["minutes"] is not None else "", *cells(r)] for r in results]
    stage_rows = [
        [r["data_seed"], r["system"].split(":")[0], ", ".join(f"{k} {v}" for k, v in r["stages"].items())]
        for r in results
        if r.get("stages")
    ]
    return (
        md
        + md_table(["data seed", *header], rows)
        + "\nMinutes per pipeline stage:\n\n"
        + md_table(["data seed", "pipeline", "stages (min)"], stage_rows)
    )


if __name__ == "__main__":
    raise SystemExit(main())
