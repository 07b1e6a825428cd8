"""Throughput of `raysc prepare` against the floor of decoding + resampling the same files.

Synthesises clips at 48 kHz, then measures side by side on the same cores:
- floor, 1 process: read + downmix + resample to 44.1 kHz in a bare loop, nothing written;
- floor, N processes: the same loop split over N processes (what `prepare` could at best do);
- `raysc prepare --workers N`: validation, audio header checks, folds, decoding into the
  memory-mapped FeatureStore, hashing, manifest, and starting its worker processes.
The floors are timed on warm processes; the ratio is against the faster floor.

    python benchmarks/prepare.py               # 480 clips of 10 s
    python benchmarks/prepare.py --smoke-test
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import md_table, write_results  # the script folder is on sys.path

from raysc.audio import Decoder
from raysc.prepare import prepare
from raysc.synth import DEV_METADATA, EVAL_METADATA, synthesize

TARGET_RATE = 44100


def _decode_all(paths: list[str], num_samples: int) -> int:
    import torch

    torch.set_num_threads(1)
    decode = Decoder(TARGET_RATE, num_samples)
    for p in paths:
        decode(p)
    return len(paths)


def floor(paths: list[str], num_samples: int, workers: int) -> float:
    """Seconds to decode + resample ``paths`` on ``workers`` processes, started and warmed
    (torch imported) before the clock starts: the floor has no fixed costs."""
    if workers == 1:
        _decode_all(paths[:1], num_samples)
        t = time.perf_counter()
        _decode_all(paths, num_samples)
        return time.perf_counter() - t
    parts = [paths[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_decode_all, [paths[:1]] * workers, [num_samples] * workers))
        t = time.perf_counter()
        list(pool.map(_decode_all, parts, [num_samples] * workers))
        return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.clips, args.clip_seconds = 30, 1.0
    eval_clips = max(1, args.clips // 5)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        synthesize(
            raw,
            clips=args.clips,
            eval_clips=eval_clips,
            sample_rate=48000,
            clip_seconds=args.clip_seconds,
            workers=args.workers,
            seed=0,
        )
        paths = sorted(str(p) for p in (raw / "audio").rglob("*.wav"))
        num_samples = round(TARGET_RATE * args.clip_seconds)
        # Warm the page cache so every measurement reads from memory, as a rerun would.
        for p in paths:
            Path(p).read_bytes()
        t_floor1 = floor(paths, num_samples, 1)
        t_floorn = floor(paths, num_samples, args.workers)

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
    result = {
        "clips": n,
        "clip_seconds": args.clip_seconds,
        "source_rate": 48000,
        "target_rate": TARGET_RATE,
        "workers": args.workers,
        "seconds": {"floor_1": t_floor1, f"floor_{args.workers}": t_floorn, "prepare": t_prepare, "rerun": t_rerun},
        "clips_per_s": {"floor_1": n / t_floor1, f"floor_{args.workers}": n / t_floorn, "prepare": n / t_prepare},
        "prepare_over_floor": t_prepare / min(t_floor1, t_floorn),
    }
    cmd = "python benchmarks/prepare.py" + (" --smoke-test" if args.smoke_test else "")
    best = min(t_floor1, t_floorn)
    rows = [
        ["bare decode + resample, 1 warm process", f"{t_floor1:.1f}", f"{n / t_floor1:.1f}", f"{t_floor1 / best:.2f}"],
        [
            f"bare decode + resample, {args.workers} warm processes",
            f"{t_floorn:.1f}",
            f"{n / t_floorn:.1f}",
            f"{t_floorn / best:.2f}",
        ],
        [
            f"raysc prepare --workers {args.workers} (process start included)",
            f"{t_prepare:.1f}",
            f"{n / t_prepare:.1f}",
            f"{t_prepare / best:.2f}",
        ],
        ["raysc prepare again (same inputs: store reused)", f"{t_rerun:.1f}", "", ""],
    ]
    md = (
        f"# `raysc prepare` throughput\n\n`{cmd}`: {n} clips of {args.clip_seconds:g} s, 48 kHz mono WAV -> "
        f"{TARGET_RATE} Hz, measured in one run on this machine.\n\n"
        + md_table(["what", "seconds", "clips/s", "time / best floor"], rows)
    )
    return write_results("prepare" + ("_smoke" if args.smoke_test else ""), result, md)


if __name__ == "__main__":
    raise SystemExit(main())
