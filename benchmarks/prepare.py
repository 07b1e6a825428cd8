"""Throughput of `raysc prepare` against the floor of decoding + resampling the same files.

Synthesises clips at 48 kHz, then measures side by side on the same cores:
- decode floor, 1 process: read + downmix + resample to 44.1 kHz in a bare loop, nothing written;
- decode floor, N processes: the same loop split over N processes (what `prepare` could at best
  do), with the malloc settings raysc's decoding processes get, and again with glibc's defaults;
- stored floor, N processes: the same, plus the conversion to int16 into a new memory-mapped .npy
  file (what any tool that keeps the decoded audio pays);
- `raysc prepare --workers N`: validation, audio header checks, folds, decoding into the
  memory-mapped FeatureStore, hashing, manifest, and starting its worker processes.
The floors are timed on warm processes; the ratios are against the fastest decode floor and
against the stored floor.

    python benchmarks/prepare.py               # 480 clips of 10 s
    python benchmarks/prepare.py --clips 8167 --distinct 817   # the challenge's 9,800 clips
    python benchmarks/prepare.py --smoke-test

``--distinct N`` synthesises N development clips (and N / 5 eval clips) and copies each file
under new names (and metadata rows) until there are at least ``--clips`` development clips
(each clip the same number of times: ``--clips`` a multiple of N gives exactly that many).
Decoding costs the same whatever a clip holds, and synthesising 9,800 clips of 10 s takes about
half an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from common import md_table, write_results  # the script folder is on sys.path

from raysc.audio import Decoder, to_int16
from raysc.malloc import tune_malloc
from raysc.prepare import prepare
from raysc.synth import DEV_METADATA, EVAL_METADATA, synthesize

TARGET_RATE = 44100


def replicate(raw: Path, copies: int) -> None:
    """Every clip of a `raysc synth` folder ``copies - 1`` more times, under new names, with
    metadata rows to match (a copy keeps its clip's city, time and label)."""
    for meta, subset in ((raw / DEV_METADATA, "dev"), (raw / EVAL_METADATA, "eval")):
        lines = meta.read_text(encoding="utf-8-sig").splitlines()
        header, rows = lines[0], lines[1:]
        out = list(rows)
        for k in range(1, copies):
            for row in rows:
                name, rest = row.split(",", 1)
                shutil.copyfile(raw / "audio" / subset / f"{name}.wav", raw / "audio" / subset / f"{name}r{k}.wav")
                out.append(f"{name}r{k},{rest}")
        meta.write_text("\ufeff" + "\n".join([header, *out]) + "\n", encoding="utf-8")


def _decode_all(paths: list[str], num_samples: int, store: str | None = None, rows: list[int] | None = None) -> int:
    """Decode + resample ``paths``; with ``store``, also convert to int16 into those ``rows`` of
    that .npy file (memory-mapped), as ``prepare`` stores them."""
    import torch

    torch.set_num_threads(1)
    decode = Decoder(TARGET_RATE, num_samples)
    waves = np.load(store, mmap_mode="r+") if store else None
    for i, p in enumerate(paths):
        wave, _ = decode(p)
        if waves is not None:
            to_int16(wave, out=waves[rows[i]])
    return len(paths)


def floor(paths: list[str], num_samples: int, workers: int, *, malloc: bool = True, store: Path | None = None) -> float:
    """Seconds to decode + resample ``paths`` (and store them, with ``store``) on ``workers``
    processes, started and warmed (torch imported) before the clock starts: the floor has no
    fixed costs. ``malloc``: the processes get the malloc settings raysc's decoders get."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=tune_malloc if malloc else None) as pool:
        list(pool.map(_decode_all, [paths[:1]] * workers, [num_samples] * workers))
        target = None
        if store is not None:
            np.lib.format.open_memmap(store, mode="w+", dtype=np.int16, shape=(len(paths), num_samples))
            target = str(store)
        rows = list(range(len(paths)))
        t = time.perf_counter()
        list(
            pool.map(
                _decode_all,
                [paths[i::workers] for i in range(workers)],
                [num_samples] * workers,
                [target] * workers,
                [rows[i::workers] for i in range(workers)],
            )
        )
        seconds = time.perf_counter() - t
    if store is not None:
        store.unlink()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--distinct", type=int, default=None, help="synthesise N clips, copy to at least --clips")
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.clips, args.clip_seconds = 30, 1.0
        if args.distinct:  # 30 clips synthesised (enough labelled sessions for 5 folds), copied once
            args.clips, args.distinct = 60, 30
    distinct = min(args.distinct or args.clips, args.clips)
    copies = math.ceil(args.clips / distinct)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        synthesize(
            raw,
            clips=distinct,
            eval_clips=max(1, distinct // 5),
            sample_rate=48000,
            clip_seconds=args.clip_seconds,
            workers=args.workers,
            seed=0,
        )
        if copies > 1:
            replicate(raw, copies)
        paths = sorted(str(p) for p in (raw / "audio").rglob("*.wav"))
        num_samples = round(TARGET_RATE * args.clip_seconds)
        # Warm the page cache so every measurement reads from memory, as a rerun would.
        for p in paths:
            Path(p).read_bytes()
        t_floor1 = floor(paths, num_samples, 1)
        t_floorn = floor(paths, num_samples, args.workers)
        t_default = floor(paths, num_samples, args.workers, malloc=False)
        t_store = floor(paths, num_samples, args.workers, store=Path(tmp) / "floor.npy")

        def timed_prepare() -> float:
            t = time.perf_counter()
            prepare(
                dev_meta=raw / DEV_METADATA,
                eval_meta=raw / EVAL_METADATA,
                audio_dirs=[raw / "audio"],
                out=Path(tmp) / "data",
                sample_rate=TARGET_RATE,
                clip_seconds=args.clip_seconds,
                workers=args.workers,
            )
            return time.perf_counter() - t

        t_prepare = timed_prepare()
        t_rerun = timed_prepare()  # same inputs: validation only, the store is reused
    n = len(paths)
    w = args.workers
    seconds = {
        "floor_1": t_floor1,
        f"floor_{w}": t_floorn,
        f"floor_{w}_default_malloc": t_default,
        f"floor_{w}_stored": t_store,
        "prepare": t_prepare,
        "rerun": t_rerun,
    }
    best = min(t_floor1, t_floorn, t_default)
    result = {
        "clips": n,
        "distinct_clips": len(paths) // copies,
        "clip_seconds": args.clip_seconds,
        "source_rate": 48000,
        "target_rate": TARGET_RATE,
        "workers": w,
        "seconds": seconds,
        "clips_per_s": {k: n / v for k, v in seconds.items() if k != "rerun"},
        "prepare_over_floor": t_prepare / best,
        "prepare_over_stored_floor": t_prepare / t_store,
    }
    cmd = " ".join(["python benchmarks/prepare.py", *(argv if argv is not None else sys.argv[1:])])

    def row(what: str, t: float, ratios: bool = True) -> list[str]:
        if not ratios:
            return [what, f"{t:.1f}", "", "", ""]
        return [what, f"{t:.1f}", f"{n / t:.1f}", f"{t / best:.2f}", f"{t / t_store:.2f}"]

    rows = [
        row("bare decode + resample, 1 warm process", t_floor1),
        row(f"bare decode + resample, {w} warm processes", t_floorn),
        row(f"bare decode + resample, {w} warm processes, glibc's default malloc settings", t_default),
        row(f"decode + resample + int16 into a new memory-mapped .npy, {w} warm processes", t_store),
        row(f"raysc prepare --workers {w} (process start included)", t_prepare),
        row("raysc prepare again (same inputs: store reused)", t_rerun, ratios=False),
    ]
    md = (
        f"# `raysc prepare` throughput\n\n`{cmd}`: {n} clips of {args.clip_seconds:g} s, 48 kHz mono WAV -> "
        f"{TARGET_RATE} Hz"
        + (f" ({len(paths) // copies} synthesised, each in {copies} copies)" if copies > 1 else "")
        + ", measured in one run on this machine.\n\n"
        + md_table(["what", "seconds", "clips/s", "time / best decode floor", "time / stored floor"], rows)
    )
    return write_results("prepare" + ("_smoke" if args.smoke_test else ""), result, md)


if __name__ == "__main__":
    raise SystemExit(main())
