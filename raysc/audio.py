"""Decode, downmix, resample; the FeatureStore of cached waveforms.

The FeatureStore holds every clip as one row of an int16 ``.npy`` array at one sample rate,
memory-mapped, so that every trial on every node reads the decoded audio instead of decoding it
again. It is built in parallel into ``<store>.partial`` with one marker per finished chunk; a
killed build continues where it stopped, and only a finished build is renamed into place.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from .errors import DataError, RayscError
from .fileio import size_text, write_json, write_text
from .malloc import tune_malloc
from .metadata import AUDIO_EXTENSIONS

log = logging.getLogger(__name__)

STORE_FORMAT = 1
CHUNK_SIZE = 32
_INT16_SCALE = 32768.0
HASH_STRIDE = 16  # samples between those the content hash reads


def index_audio(dirs: Sequence[str | Path]) -> tuple[dict[str, Path], list[str]]:
    """Map clip name (file stem) -> path for every WAV/FLAC file under ``dirs``.

    One walk of each folder, not a glob per clip. A name found twice is a problem (returned),
    since the metadata could not say which file it means.
    """
    found: dict[str, Path] = {}
    problems: list[str] = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            problems.append(f"{d}: audio folder not found")
            continue
        for root, _, files in os.walk(d, followlinks=True):
            for name in files:
                stem, ext = os.path.splitext(name)
                if ext.lower() not in AUDIO_EXTENSIONS:
                    continue
                path = Path(root) / name
                if stem in found:
                    problems.append(f"{path}: clip {stem!r} found twice (also {found[stem]})")
                    continue
                found[stem] = path
    return found, problems


def check_audio_header(path: Path) -> str | None:
    """Read only the header: return why the file cannot be used, or None."""
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        return f"{path}: cannot be read as audio ({exc})"
    if info.frames == 0:
        return f"{path}: audio file is empty (0 samples)"
    return None


class Decoder:
    """Decode any rate and channel count to mono float32 at ``sample_rate``, ``num_samples`` long."""

    def __init__(self, sample_rate: int, num_samples: int) -> None:
        self.sample_rate = sample_rate
        self.num_samples = num_samples
        self._resamplers: dict[int, object] = {}

    def _resample(self, wave: np.ndarray, rate: int) -> np.ndarray:
        if rate == self.sample_rate:
            return wave
        # lazy: prepare's parent process validates and never decodes; only decoding workers import torch
        import torch
        import torchaudio

        if rate not in self._resamplers:  # the filter kernel is the costly part: build it once
            self._resamplers[rate] = torchaudio.transforms.Resample(rate, self.sample_rate)
        with torch.no_grad():
            return self._resamplers[rate](torch.from_numpy(wave)).numpy()

    def __call__(self, path: str | Path) -> tuple[np.ndarray, int]:
        """Return (wave, length change): >0 samples padded, <0 samples trimmed."""
        try:
            data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, OSError) as exc:
            raise DataError([f"{path}: cannot be decoded ({exc})"], what="audio") from exc
        if data.shape[0] == 0:
            raise DataError([f"{path}: audio file is empty (0 samples)"], what="audio")
        bad = int((~np.isfinite(data)).sum())
        if bad:  # a float file can hold NaN or infinity: it would become silence or a full-scale square
            raise DataError([f"{path}: {bad} of {data.size} samples are NaN or infinite"], what="audio")
        mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)  # the challenge's files are mono
        wave = self._resample(np.ascontiguousarray(mono), rate)
        change = self.num_samples - wave.shape[0]
        if change > 0:
            wave = np.pad(wave, (0, change))
        return wave[: self.num_samples], change


def to_int16(wave: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """Scale [-1, 1) float32 audio to int16 (into ``out`` when given); also say whether anything
    had to be clipped. ``wave`` is scaled in place: no temporary copies of a 10 s clip."""
    scaled = np.multiply(wave, np.float32(_INT16_SCALE), out=wave)
    np.rint(scaled, out=scaled)
    clipped = bool(scaled.max(initial=0) > 32767 or scaled.min(initial=0) < -32768)
    if clipped:
        np.clip(scaled, -32768, 32767, out=scaled)
    if out is None:
        return scaled.astype(np.int16), clipped
    out[...] = scaled  # exact: every value is already a whole number in int16's range
    return out, clipped


@dataclass(frozen=True)
class StoreSpec:
    """What a FeatureStore holds and how it was made."""

    sample_rate: int
    num_samples: int
    count: int
    inputs_fingerprint: str
    content_hash: str
    padded: int
    trimmed: int
    clipped: int
    dtype: str = "int16"
    format: int = STORE_FORMAT


class FeatureStore:
    """Memory-mapped int16 waveforms plus the index ``filename -> row``. Open with ``open``."""

    def __init__(self, path: Path, spec: StoreSpec, filenames: list[str]) -> None:
        self.path = path
        self.spec = spec
        self.filenames = filenames
        self.index = {f: i for i, f in enumerate(filenames)}
        self._waves: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        path = Path(path)
        spec_file = path / "spec.json"
        if not spec_file.is_file():
            raise DataError([f"{path}: not a finished feature store (no spec.json)"], what="feature store")
        spec = StoreSpec(**json.loads(spec_file.read_text()))
        filenames = (path / "index.txt").read_text().splitlines()
        if len(filenames) != spec.count:
            raise DataError([f"{path}/index.txt: {len(filenames)} names for {spec.count} rows"], what="feature store")
        return cls(path, spec, filenames)

    @property
    def waves(self) -> np.ndarray:
        """The [count, num_samples] int16 array, opened read-only on first use (per process)."""
        if self._waves is None:
            self._waves = np.load(self.path / "waves.npy", mmap_mode="r")
        return self._waves

    def __len__(self) -> int:
        return self.spec.count

    def __getstate__(self) -> dict:
        # A pickled store (sent to a Ray worker) reopens its memory map where it lands.
        return {**self.__dict__, "_waves": None}

    def rows(self, filenames: Iterable[str]) -> np.ndarray:
        names = list(filenames)
        missing = [f for f in names if f not in self.index]
        if missing:
            raise DataError(
                [f"clip {f!r} is not in the feature store {self.path}" for f in missing], what="feature store"
            )
        return np.fromiter((self.index[f] for f in names), dtype=np.int64, count=len(names))

    def load(self, filenames: Iterable[str]) -> np.ndarray:
        """Float32 waveforms in [-1, 1) for ``filenames``, in that order: [B, num_samples]."""
        rows = self.rows(filenames)
        order = np.argsort(rows)  # sorted reads are sequential on disk
        out = np.empty((len(rows), self.spec.num_samples), dtype=np.float32)
        out[order] = self.waves[rows[order]]
        return out / np.float32(_INT16_SCALE)


def inputs_fingerprint(files: Sequence[tuple[str, Path]], sample_rate: int, num_samples: int) -> str:
    """A hash of what a store is built from: names, paths, sizes, mtimes, rate, length."""
    h = hashlib.sha256(f"{STORE_FORMAT}|{sample_rate}|{num_samples}|{CHUNK_SIZE}".encode())
    for name, path in files:
        st = os.stat(path)
        h.update(f"\n{name}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class _ChunkResult:
    start: int
    digest: str
    padded: int
    trimmed: int
    clipped: int
    errors: tuple[str, ...]
    notes: tuple[tuple[str, str, str], ...] = ()  # (filename, what, detail) for the store's report


# A clip shorter than this share of the clip length is mostly zero padding: named in the report
# and warned about. A clip louder than this RMS (-6 dBFS) is no field recording: most likely a
# header that does not match its data (8-bit samples read as 16-bit become full-scale noise).
SHORT_SHARE = 0.5
LOUD_RMS = 0.5


def clip_notes(name: str, wave: np.ndarray, change: int, num_samples: int) -> list[tuple[str, str, str]]:
    """What the prepare report says of one decoded clip (``wave`` before padding is undone:
    ``change`` > 0 samples were padded)."""
    notes = []
    if change > 0:
        kept = num_samples - change
        what = "short" if kept < SHORT_SHARE * num_samples else "padded"
        notes.append((name, what, f"{kept} of {num_samples} samples; the rest zero-padded"))
    level = float(np.sqrt(np.mean(np.square(wave[: num_samples - max(change, 0)], dtype=np.float64))))
    if level > LOUD_RMS:
        detail = f"RMS {20 * np.log10(level):.1f} dBFS: does its header's sample format match its data?"
        notes.append((name, "loud", detail))
    return notes


def _init_worker() -> None:
    tune_malloc()  # before torch starts threads; each clip's arrays are reused instead of mapped anew
    import torch  # lazy: see Decoder._resample

    torch.set_num_threads(1)  # one process per core already


def _started() -> None:
    """A task that only makes the pool start a process (after its initializer)."""


@contextlib.contextmanager
def decoding_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """The processes that decode for :func:`build_store`, started now (None for one worker).

    Each imports torch (1-2 s); a caller that starts them before its own work overlaps the
    two (``prepare`` checks every audio header meanwhile). Leaving on an error does not wait for
    them.
    """
    if workers <= 1:
        yield None
        return
    # spawn, not fork: a forked copy of a process that already ran torch ops can deadlock.
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker)
    for _ in range(workers):  # the pool starts one process per waiting task, up to ``workers``
        pool.submit(_started)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _decode_chunk(
    waves_path: str, start: int, names: Sequence[str], paths: Sequence[str], sample_rate: int, num_samples: int
) -> _ChunkResult:
    decode = Decoder(sample_rate, num_samples)
    block = np.zeros((len(paths), num_samples), dtype=np.int16)  # the chunk, hashed before it is stored
    padded = trimmed = clipped = 0
    errors = []
    notes: list[tuple[str, str, str]] = []
    for i, (name, path) in enumerate(zip(names, paths, strict=True)):
        try:
            wave, change = decode(path)
        except DataError as exc:
            errors.extend(exc.problems)
            continue
        notes += clip_notes(name, wave, change, num_samples)
        _, was_clipped = to_int16(wave, out=block[i])
        padded += change > 0
        trimmed += change < 0
        clipped += was_clipped
    # One copy into the shared mapping, no msync: a killed worker's writes are already in the
    # page cache, and the parent marks the chunk done only after this returns.
    np.load(waves_path, mmap_mode="r+")[start : start + len(paths)] = block
    # The content hash keys the feature caches built from this store. Every HASH_STRIDE-th
    # sample of every clip tells stores apart (another decoder or file changes nearly all of
    # them) at a sixteenth of the cost (docs/notes/2026-12-06-budget-runs.md#defaults).
    digest = hashlib.blake2b(memoryview(np.ascontiguousarray(block[:, ::HASH_STRIDE]))).hexdigest()
    return _ChunkResult(start, digest, padded, trimmed, clipped, tuple(errors), tuple(notes))


def build_store(
    path: str | Path,
    files: Sequence[tuple[str, Path]],
    *,
    sample_rate: int,
    num_samples: int,
    workers: int = 1,
    pool: ProcessPoolExecutor | None = None,
) -> FeatureStore:
    """Decode ``files`` (name, path) into a FeatureStore at ``path``, or reuse one built from them.

    A store made from the same inputs (names, paths, sizes, modification times, rate and
    length) is reused as it is. A partial build from the same inputs is continued; anything else
    is rebuilt. Decoding errors are collected and raised together; the partial build is kept.
    ``pool`` (from :func:`decoding_pool`) decodes if given; otherwise ``workers`` processes are
    started when there is more than one chunk to decode.
    """
    path = Path(path)
    fingerprint = inputs_fingerprint(files, sample_rate, num_samples)
    if (path / "spec.json").is_file():
        store = FeatureStore.open(path)
        if store.spec.inputs_fingerprint == fingerprint:
            log.info("reusing feature store %s (%d clips, same inputs)", path, len(store))
            return store
        log.info("feature store %s was built from other inputs: rebuilding", path)

    partial = path.with_name(path.name + ".partial")
    if (partial / "spec.json").is_file() and _spec_fingerprint(partial) == fingerprint:
        return _swap_in(partial, path)  # a previous build finished but was not renamed
    done_dir = partial / "done"
    build_file = partial / "build.json"
    if not (build_file.is_file() and json.loads(build_file.read_text())["inputs_fingerprint"] == fingerprint):
        shutil.rmtree(partial, ignore_errors=True)
        done_dir.mkdir(parents=True)
        np.lib.format.open_memmap(partial / "waves.npy", mode="w+", dtype=np.int16, shape=(len(files), num_samples))
        write_json(build_file, {"inputs_fingerprint": fingerprint})

    results: dict[int, _ChunkResult] = {}
    for marker in done_dir.glob("*.json"):
        done = json.loads(marker.read_text())
        r = _ChunkResult(**{**done, "errors": (), "notes": tuple(map(tuple, done.get("notes", ())))})
        results[r.start] = r
    todo = [s for s in range(0, len(files), CHUNK_SIZE) if s not in results]
    if results:
        log.info("continuing feature store build: %d of %d chunks already done", len(results), len(results) + len(todo))
    _check_free_space(partial / "waves.npy", len(files) * num_samples * 2)

    waves_path = str(partial / "waves.npy")
    jobs = [
        (
            waves_path,
            s,
            [name for name, _ in files[s : s + CHUNK_SIZE]],
            [str(p) for _, p in files[s : s + CHUNK_SIZE]],
            sample_rate,
            num_samples,
        )
        for s in todo
    ]
    errors: list[str] = []

    def record(r: _ChunkResult) -> None:
        if r.errors:
            errors.extend(r.errors)
            return
        results[r.start] = r
        write_json(done_dir / f"{r.start:09d}.json", {k: v for k, v in asdict(r).items() if k != "errors"})

    with contextlib.ExitStack() as stack:
        if pool is None and len(jobs) > 1:
            pool = stack.enter_context(decoding_pool(workers))
        if pool is None or not jobs:
            decoded = (_decode_chunk(*job) for job in jobs)
        else:
            decoded = pool.map(_decode_chunk, *zip(*jobs, strict=True))
        try:
            for r in decoded:
                record(r)
        except BrokenProcessPool as exc:
            raise RayscError(
                f"a process decoding into the feature store {path} died (killed, out of memory, or the disk "
                f"full); the {len(results)} finished chunks of {-(-len(files) // CHUNK_SIZE)} are kept and the same "
                "command continues from them"
            ) from exc
    if errors:
        raise DataError(errors, what="audio files")

    ordered = [results[s] for s in sorted(results)]
    content = hashlib.sha256("".join(r.digest for r in ordered).encode()).hexdigest()
    spec = StoreSpec(
        sample_rate=sample_rate,
        num_samples=num_samples,
        count=len(files),
        inputs_fingerprint=fingerprint,
        content_hash=content,
        padded=sum(r.padded for r in ordered),
        trimmed=sum(r.trimmed for r in ordered),
        clipped=sum(r.clipped for r in ordered),
    )
    (partial / "index.txt").write_text("".join(f"{name}\n" for name, _ in files))
    _write_report(partial / REPORT, [note for r in ordered for note in r.notes])
    write_json(partial / "spec.json", asdict(spec))
    shutil.rmtree(done_dir)
    build_file.unlink()
    log.info(
        "feature store %s: %d clips at %d Hz, %d padded, %d trimmed, %d clipped",
        path,
        spec.count,
        sample_rate,
        spec.padded,
        spec.trimmed,
        spec.clipped,
    )
    return _swap_in(partial, path)


REPORT = "report.csv"  # in the store: the clips that were padded or look wrong, one line each


def _write_report(path: Path, notes: list[tuple[str, str, str]]) -> None:
    """Write the store's report and warn about the clips that are mostly padding or too loud."""
    rows = io.StringIO()
    csv.writer(rows, lineterminator="\n").writerows([("filename", "issue", "detail"), *notes])
    write_text(path, rows.getvalue())
    short = [name for name, what, _ in notes if what == "short"]
    loud = [name for name, what, _ in notes if what == "loud"]
    for names, said in (
        (short, f"shorter than {SHORT_SHARE:.0%} of the clip length, zero-padded"),
        (loud, f"louder than {20 * np.log10(LOUD_RMS):.0f} dBFS RMS (a header that does not match its data?)"),
    ):
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            log.warning("%d clip(s) %s: %s%s; see %s", len(names), said, ", ".join(names[:5]), more, path)


def _check_free_space(waves: Path, size: int) -> None:
    """Refuse to decode into a store the disk cannot hold: a worker writing into a full disk
    through the memory map is killed (SIGBUS), with no word of why."""
    missing = size - os.stat(waves).st_blocks * 512  # a continued build already holds its chunks
    free = shutil.disk_usage(waves.parent).free
    if missing > free:
        raise RayscError(
            f"the feature store {waves.parent} needs {size_text(missing)} more and its disk has {size_text(free)} "
            "free; free some space or prepare into another --out (a rerun continues what is built)"
        )


def _spec_fingerprint(path: Path) -> str:
    return json.loads((path / "spec.json").read_text())["inputs_fingerprint"]


def _swap_in(partial: Path, path: Path) -> FeatureStore:
    """Replace ``path`` by the finished build. A crash between the two renames leaves a
    finished ``.partial`` (it has spec.json), which the next run renames."""
    if path.exists():
        stale = path.with_name(path.name + ".stale")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(path, stale)
        shutil.rmtree(stale)
    os.replace(partial, path)
    return FeatureStore.open(path)
