"""`raysc demo`: the main job on an embedded default, small enough for a 2-core laptop:
synthesise a dataset, prepare it, run the two-round pipeline, return the leaderboard."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .pipeline import PipelineConfig, PipelineResult, run_pipeline
from .prepare import prepare
from .synth import DEV_METADATA, EVAL_METADATA, synthesize

DEMO = PipelineConfig(space="demo", rounds=2, trials=6, max_epochs=8, ensemble_k=3)
SAMPLE_RATE, SECONDS = 8000, 2.0


def run_demo(
    out: str | Path,
    *,
    clips: int = 800,
    seed: int = 0,
    time_budget_minutes: float | None = None,
    address: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> PipelineResult:
    """The whole product on a small synthetic dataset (``raysc demo``).

    Everything goes under ``out``: raw/ (audio + metadata), data/ (prepared), experiment/. A
    rerun reuses what is there and continues the pipeline where it stopped.

    Args:
        out: the demo's folder.
        clips: development clips to synthesise.
        seed: the data's and the pipeline's seed.
        time_budget_minutes: the pipeline's budget (None: no limit).
        address: a Ray cluster to join (None: a local Ray).
        progress: called with each progress line (None: the demo's own lines are not shown and
            the pipeline's go to the log).

    Returns:
        The pipeline's result.
    """
    out = Path(out)
    say = progress or (lambda _: None)
    raw = out / "raw"
    if not (raw / "synth.json").is_file():
        say(f"[demo] synthesising {clips} development + {clips // 4} eval clips into {raw}")
        synthesize(
            raw,
            clips=clips,
            eval_clips=clips // 4,
            labelled_fraction=0.3,
            sample_rate=SAMPLE_RATE,
            clip_seconds=SECONDS,
            cities=6,
            unseen_cities=2,
            session_size=6,
            seed=seed,
            workers=2,
        )
    say(f"[demo] preparing {out / 'data'}")
    prepare(
        dev_meta=raw / DEV_METADATA,
        eval_meta=raw / EVAL_METADATA,
        audio_dirs=[raw / "audio"],
        out=out / "data",
        sample_rate=SAMPLE_RATE,
        clip_seconds=SECONDS,
        folds=4,
        seed=seed,
        workers=2,
    )
    return run_pipeline(
        DEMO,
        data=out / "data",
        experiment=out / "experiment",
        time_budget_minutes=time_budget_minutes,
        address=address,
        progress=progress,
    )
