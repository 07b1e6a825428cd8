"""A synthetic dataset in the challenge's exact format, with city, time and session structure.

Generative story, so that audio alone is learnable but not trivial and metadata adds
information:

1. A recording session picks a city (some cities record far more than others), a date and an
   hour, then a scene from the city's own scene prior times the scene's hour/weekend profile
   (bars at night, construction on weekdays, parks at weekends...).
2. Each scene is a mix of shared sound sources (noise bed, hums, impulses, chirps, babble,
   pass-bys, music, chimes) at scene-typical levels; scenes overlap (restaurant, bar and mall
   all have babble; bus, metro and street all rumble). Busy hours make events denser.
3. The city adds a fixed device/room signature (an EQ curve and a reverb) and shifts the
   scene's source levels. Eval-only cities have signatures no training clip has.
4. Clips of one session share all of that plus the session's own source settings, which is why
   a clip-level validation split leaks.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from .errors import ConfigError
from .fileio import atomic_path, write_json, write_text
from .metadata import CLASSES, METADATA_HEADER, OFFICIAL_CITIES, TIME_FORMAT

log = logging.getLogger(__name__)

DEV_METADATA = "metadata/APSIPA2025_GC_ASC_dev_metadata.csv"
EVAL_METADATA = "metadata/APSIPA2025_GC_ASC_eval_metadata.csv"
# Ground truth for the synthetic eval clips (the challenge keeps it secret; benchmarks need it).
EVAL_LABELS = "metadata/synth_eval_labels.csv"
SOURCES = ("bed", "hum", "impulses", "chirps", "babble", "passby", "music", "chimes")


@dataclass(frozen=True)
class Scene:
    """Mean source levels (dB, -inf = absent), the bed's spectral tilt and the hour profile."""

    levels: dict[str, float]
    tilt: float  # dB/octave of the noise bed
    hum_hz: tuple[float, float]
    peaks: tuple[float, ...]  # busy hours
    floor: float  # activity outside the busy hours
    weekend: float  # prior multiplier on Saturday/Sunday
    loudness: float  # mean clip level, dBFS


_ABSENT = -math.inf
SCENES: dict[str, Scene] = {
    "Bus": Scene(
        {"bed": 0, "hum": -2, "passby": -8, "babble": -12, "chimes": -14}, -4.5, (80, 140), (8, 18), 0.1, 0.6, -20
    ),
    "Airport": Scene(
        {"bed": -2, "hum": -12, "babble": -5, "chimes": -9, "passby": -14}, -2.5, (180, 400), (7, 14), 0.3, 1.0, -24
    ),
    "Metro": Scene(
        {"bed": 0, "hum": -4, "chirps": -14, "chimes": -10, "babble": -10}, -4.0, (45, 75), (8, 18), 0.1, 0.4, -21
    ),
    "Restaurant": Scene(
        {"bed": -6, "babble": 0, "impulses": -8, "music": -14}, -2.0, (100, 200), (12.5, 19), 0.03, 1.2, -23
    ),
    "Shopping mall": Scene(
        {"bed": -4, "babble": -3, "music": -8, "chimes": -16, "impulses": -16}, -2.5, (120, 300), (15,), 0.05, 2.5, -25
    ),
    "Public square": Scene(
        {"bed": -3, "babble": -6, "chirps": -12, "passby": -10, "impulses": -14}, -3.0, (60, 150), (20,), 0.05, 1.5, -26
    ),
    "Urban park": Scene({"bed": -4, "chirps": -3, "babble": -12, "passby": -14}, -1.0, (60, 150), (7,), 0.05, 3.0, -29),
    "Traffic street": Scene(
        {"bed": -2, "passby": 0, "hum": -9, "chimes": -17}, -3.5, (70, 160), (8, 17.5), 0.1, 0.7, -19
    ),
    "Construction site": Scene(
        {"bed": -4, "impulses": 0, "hum": -4, "passby": -12}, -2.5, (90, 300), (11,), 0.01, 0.1, -18
    ),
    "Bar": Scene({"bed": -6, "music": 0, "babble": -4, "impulses": -12}, -3.0, (50, 120), (23,), 0.01, 2.0, -22),
}
assert tuple(SCENES) == CLASSES

# How strongly session, clip and city vary the mix: the knobs of the task's difficulty.
SESSION_LEVEL_DB = 6.0
CLIP_LEVEL_DB = 2.0
CITY_LEVEL_DB = 4.0
CITY_EQ_DB = 6.0
ACTIVITY_HOURS = 2.0  # width of a scene's busy-hour bump
CITY_SCENE_PRIOR = 0.35  # Dirichlet concentration of a city's scene prior (lower = more peaked)


@dataclass(frozen=True)
class City:
    name: str
    eq_db: np.ndarray  # gains at log-spaced frequencies
    reverb_s: float  # RT60
    reverb_mix: float
    level_shift: dict[str, float]
    scene_prior: np.ndarray
    weight: float  # how often it records


def _make_city(name: str, rng: np.random.Generator, weight: float) -> City:
    return City(
        name=name,
        eq_db=rng.normal(0, CITY_EQ_DB, size=8),
        reverb_s=float(rng.uniform(0.1, 1.0)),
        reverb_mix=float(rng.uniform(0.05, 0.4)),
        level_shift={s: float(rng.normal(0, CITY_LEVEL_DB)) for s in SOURCES},
        scene_prior=rng.dirichlet(np.full(len(CLASSES), CITY_SCENE_PRIOR)),
        weight=weight,
    )


def activity(scene: Scene, hour: float) -> float:
    """How busy a scene is at this hour, in [floor, 1]: circular bumps around its peak hours."""
    bumps = [math.exp(-(((hour - p + 12) % 24 - 12) ** 2) / (2 * ACTIVITY_HOURS**2)) for p in scene.peaks]
    return scene.floor + (1 - scene.floor) * max(bumps)


def scene_probabilities(city: City, when: datetime) -> np.ndarray:
    hour = when.hour + when.minute / 60
    weekend = when.weekday() >= 5
    w = np.array([activity(s, hour) * (s.weekend if weekend else 1.0) for s in SCENES.values()])
    p = city.scene_prior * w
    return p / p.sum()


# ---------------------------------------------------------------- sound sources


def _smooth_envelope(rng: np.random.Generator, n: int, sr: int, rate_hz: float, depth: float) -> np.ndarray:
    """A random, slowly varying gain around 1 (``depth`` = relative swing)."""
    knots = max(2, int(n / sr * rate_hz) + 2)
    values = 1 + depth * rng.uniform(-1, 1, size=knots)
    return np.interp(np.arange(n), np.linspace(0, n, knots), values)


def _filter(x: np.ndarray, gain: np.ndarray, size: int) -> np.ndarray:
    """Multiply the spectrum of ``x`` (zero-padded to ``size``) by ``gain``; float32 torch FFTs
    are about twice as fast as numpy's here and the audio ends up 16-bit anyway."""
    spec = torch.fft.rfft(torch.from_numpy(np.asarray(x, dtype=np.float32)), n=size)
    gain = np.asarray(gain)
    gain_t = torch.from_numpy(gain.astype(np.complex64 if np.iscomplexobj(gain) else np.float32))
    return torch.fft.irfft(spec * gain_t, n=size).numpy()


def _filter_spectrum(impulse_response: np.ndarray) -> np.ndarray:
    return torch.fft.rfft(torch.from_numpy(impulse_response.astype(np.float32))).numpy()


def _shaped_noise(rng: np.random.Generator, n: int, sr: int, shape, envelope: np.ndarray | None = None) -> np.ndarray:
    """White noise (times ``envelope``) filtered in the frequency domain by ``shape(freqs)``."""
    noise = rng.standard_normal(n)
    if envelope is not None:
        noise *= envelope
    freqs = np.fft.rfftfreq(n, 1 / sr)
    return _filter(noise, shape(np.maximum(freqs, 1.0)), n)


def _place(out: np.ndarray, starts: np.ndarray, make) -> None:
    for s in starts:
        ev = make()
        end = min(len(out), s + len(ev))
        out[s:end] += ev[: end - s]


def _event_starts(rng: np.random.Generator, n: int, sr: int, rate_hz: float) -> np.ndarray:
    count = rng.poisson(rate_hz * n / sr)
    return np.sort(rng.integers(0, n, size=count))


def _bed(rng, n, sr, p):
    return _shaped_noise(rng, n, sr, lambda f: (f / 1000) ** (p["tilt"] / 6.02) / (1 + (f / p["bed_cut"]) ** 2))


def _hum(rng, n, sr, p):
    f0 = p["hum_hz"] * (1 + 0.01 * np.cumsum(rng.standard_normal(n)) / math.sqrt(sr))
    base = np.exp(1j * (2 * np.pi * np.cumsum(f0) / sr))
    # Harmonic k is base**k: complex products instead of a sine per harmonic.
    out, z = np.zeros(n, dtype=np.float32), np.ones(n, dtype=np.complex64)
    base = base.astype(np.complex64)
    for k in range(1, 7):
        z *= base
        out += (z * np.exp(1j * rng.uniform(0, 6.3))).imag / k ** p["hum_decay"]
    return out * _smooth_envelope(rng, n, sr, 0.5, 0.5)


def _impulses(rng, n, sr, p):
    out = np.zeros(n)
    length = int(0.08 * sr)
    decay = np.exp(-np.arange(length) / (p["impulse_ms"] / 1000 * sr))

    def make():
        burst = rng.standard_normal(length) * decay
        return np.diff(burst, prepend=0) if p["bright"] else burst

    _place(out, _event_starts(rng, n, sr, p["impulse_rate"]), make)
    return out


def _chirps(rng, n, sr, p):
    out = np.zeros(n)
    lo, hi = p["chirp_band"]

    def make():
        dur = rng.uniform(0.05, 0.25)
        m = int(dur * sr)
        f = np.linspace(rng.uniform(lo, hi), rng.uniform(lo, hi), m)
        return np.sin(2 * np.pi * np.cumsum(f) / sr) * np.hanning(m)

    _place(out, _event_starts(rng, n, sr, p["chirp_rate"]), make)
    return out


def _babble(rng, n, sr, p):
    # Independent talkers sum to noise whose variance is the sum of their squared syllabic
    # envelopes: one noise draw instead of one per talker. Envelopes are built at 1/32 rate.
    m = n // 32 + 2
    power = sum(
        np.clip(_smooth_envelope(rng, m, sr / 32, rng.uniform(3, 6), 1.0), 0, None) ** 4 for _ in range(p["talkers"])
    )
    envelope = np.sqrt(np.interp(np.arange(n) / 32, np.arange(m), power))
    return _shaped_noise(rng, n, sr, lambda f: 1 / (1 + (300 / f) ** 2) / (1 + (f / 3000) ** 2), envelope)


def _passby(rng, n, sr, p):
    env = np.full(n, 0.1)
    for s in _event_starts(rng, n, sr, p["passby_rate"]):
        width = rng.uniform(0.5, 2.0) * sr
        lo, hi = max(0, int(s - 4 * width)), min(n, int(s + 4 * width))
        env[lo:hi] += np.exp(-0.5 * ((np.arange(lo, hi) - s) / width) ** 2)
    return _shaped_noise(rng, n, sr, lambda f: 1 / (1 + (f / p["passby_cut"]) ** 2), env)


def _music(rng, n, sr, p):
    t = np.arange(n, dtype=np.float32) / sr
    beat = 60 / p["tempo"]
    gate = np.exp(-((t % beat) / (0.3 * beat)))
    w = np.float32(2 * np.pi * p["music_root"])
    chord = np.sin(w * t) + np.sin(w * 1.26 * t) + np.sin(w * 1.5 * t)
    return 0.5 * chord * (0.6 + 0.4 * gate) + 1.5 * np.sin(w / 4 * t) * gate


def _chimes(rng, n, sr, p):
    out = np.zeros(n)
    f = p["chime_hz"]

    def make():
        m = int(0.6 * sr)
        tt = np.arange(m) / sr
        half = m // 2
        tone = np.where(np.arange(m) < half, np.sin(2 * np.pi * f * tt), np.sin(2 * np.pi * f * 0.8 * tt))
        return tone * np.exp(-3 * (tt % 0.3))

    _place(out, _event_starts(rng, n, sr, p["chime_rate"]), make)
    return out


_RENDER = {
    "bed": _bed,
    "hum": _hum,
    "impulses": _impulses,
    "chirps": _chirps,
    "babble": _babble,
    "passby": _passby,
    "music": _music,
    "chimes": _chimes,
}


def _session_params(scene: Scene, busy: float, rng: np.random.Generator) -> dict:
    """Source settings shared by every clip of one session."""
    return {
        "tilt": scene.tilt + rng.normal(0, 1.0),
        "bed_cut": float(np.exp(rng.uniform(np.log(1500), np.log(8000)))),
        "hum_hz": float(rng.uniform(*scene.hum_hz)),
        "hum_decay": float(rng.uniform(0.5, 2.0)),
        "impulse_ms": float(rng.uniform(3, 30)),
        "impulse_rate": float(rng.uniform(0.5, 4) * (0.3 + busy)),
        "bright": bool(rng.random() < 0.5),
        "chirp_band": (lo := float(rng.uniform(1500, 3500)), lo + float(rng.uniform(500, 3000))),
        "chirp_rate": float(rng.uniform(0.5, 4) * (0.3 + busy)),
        "talkers": int(max(1, round(rng.uniform(2, 10) * busy))),
        "passby_cut": float(rng.uniform(200, 1500)),
        "passby_rate": float(rng.uniform(0.1, 0.6) * (0.3 + busy)),
        "tempo": float(rng.uniform(70, 140)),
        "music_root": float(rng.uniform(180, 450)),
        "chime_hz": float(rng.uniform(500, 1500)),
        "chime_rate": float(rng.uniform(0.05, 0.4)),
        "levels": {s: scene.levels.get(s, _ABSENT) + rng.normal(0, SESSION_LEVEL_DB) for s in SOURCES},
        "loudness": scene.loudness + rng.normal(0, 3) + 4 * (busy - 0.5),
    }


@dataclass(frozen=True)
class ClipJob:
    path: str
    seed: int
    sample_rate: int
    num_samples: int
    params: dict  # the session's source settings
    city: City


def render_clip(job: ClipJob) -> np.ndarray:
    """One clip: the session's sources at jittered levels, through the city's EQ and reverb."""
    rng = np.random.default_rng(job.seed)
    n, sr, p = job.num_samples, job.sample_rate, job.params
    mix = np.zeros(n)
    for source in SOURCES:
        level = p["levels"][source] + job.city.level_shift[source] + rng.normal(0, CLIP_LEVEL_DB)
        if not np.isfinite(level) or level < -30:
            continue
        x = _RENDER[source](rng, n, sr, p)
        mix += x / (np.sqrt(np.mean(x**2)) + 1e-12) * 10 ** (level / 20)
    # City signature: a smooth EQ over log frequency and an exponential-decay reverb, one FFT.
    ir_len = int(min(job.city.reverb_s, n / sr / 2) * sr)
    ir = rng.standard_normal(ir_len) * np.exp(-6.9 * np.arange(ir_len) / max(ir_len, 1))
    ir = ir / (np.sqrt(np.sum(ir**2)) + 1e-12) * job.city.reverb_mix
    size = _fast_size(n + int(min(1.0, n / sr / 2) * sr))  # one size per clip length: FFT plans are reused
    freqs = np.maximum(np.fft.rfftfreq(size, 1 / sr), 20.0)
    anchors = np.geomspace(50, sr / 2, len(job.city.eq_db))
    eq = 10 ** (np.interp(np.log(freqs), np.log(anchors), job.city.eq_db) / 20)
    ir_full = np.zeros(size)
    ir_full[0] = 1.0
    ir_full[1 : ir_len + 1] += ir[: size - 1]
    out = _filter(mix, _filter_spectrum(ir_full) * eq, size)[:n]
    out += rng.standard_normal(n) * 10 ** (-65 / 20)  # a device noise floor
    rms = np.sqrt(np.mean(out**2)) + 1e-12
    out *= 10 ** (p["loudness"] / 20) / rms
    peak = np.max(np.abs(out))
    if peak > 0.99:
        out *= 0.99 / peak
    return out.astype(np.float32)


def _fast_size(n: int) -> int:
    """The smallest 2^a * 3^b * 5^c >= n: FFTs of such sizes are fast, prime sizes are not."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p235 = p35 * (1 << max(0, (-(-n // p35) - 1).bit_length()))
            best = min(best, p235)
            p35 *= 3
        p5 *= 5
    return best


def _write_clip(job: ClipJob) -> None:
    with atomic_path(job.path) as tmp:
        sf.write(str(tmp), render_clip(job), job.sample_rate, subtype="PCM_16", format="WAV")


def _run_jobs(jobs: Sequence[ClipJob], workers: int) -> None:
    if workers <= 1:
        for job in jobs:
            _write_clip(job)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_write_clip, jobs, chunksize=8))


# ---------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class Session:
    city: City
    when: datetime
    scene: str
    size: int
    params: dict
    seed: int


def _draw_sessions(
    cities: Sequence[City], n_clips: int, start: datetime, days: int, rng: np.random.Generator, mean_size: int
) -> list[Session]:
    weights = np.array([c.weight for c in cities])
    sessions, total = [], 0
    while total < n_clips:
        city = cities[rng.choice(len(cities), p=weights / weights.sum())]
        when = start + timedelta(days=int(rng.integers(0, days)), seconds=int(rng.integers(5 * 3600, 86400)))
        scene = CLASSES[rng.choice(len(CLASSES), p=scene_probabilities(city, when))]
        size = int(min(rng.integers(1, 2 * mean_size), n_clips - total))
        busy = activity(SCENES[scene], when.hour + when.minute / 60)
        params = _session_params(SCENES[scene], busy, rng)
        sessions.append(Session(city, when, scene, size, params, int(rng.integers(2**62))))
        total += size
    return sessions


def _clip_name(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        name = f"{rng.bytes(16).hex()}{rng.integers(1, 100)}_{rng.integers(1, 3)}"
        if name not in taken:
            taken.add(name)
            return name


# Pretraining sources in their own layouts; each source label is rendered like the challenge
# scene it resembles. Labels the default mapping drops (tram, Car, Elevator...) are included so
# that the "unmapped labels are dropped and counted" path is exercised.
TAU_SCENES = {
    "airport": "Airport",
    "bus": "Bus",
    "metro": "Metro",
    "metro_station": "Metro",
    "park": "Urban park",
    "public_square": "Public square",
    "shopping_mall": "Shopping mall",
    "street_pedestrian": "Public square",
    "street_traffic": "Traffic street",
    "tram": "Bus",
}
COCHLSCENE_SCENES = {
    "Bus": "Bus",
    "Cafe": "Bar",
    "Car": "Traffic street",
    "CrowdedIndoor": "Shopping mall",
    "Elevator": "Metro",
    "Kitchen": "Restaurant",
    "Park": "Urban park",
    "ResidentialArea": "Public square",
    "Restaurant": "Restaurant",
    "Restroom": "Shopping mall",
    "Street": "Traffic street",
    "Subway": "Metro",
    "SubwayStation": "Metro",
}
TAU_CITIES = ("barcelona", "helsinki", "lisbon", "london", "lyon", "milan", "prague", "paris", "stockholm", "vienna")


def _pretrain_jobs(out: Path, n: int, sample_rate: int, num_samples: int, rng: np.random.Generator) -> list[ClipJob]:
    """Clip jobs for ``n`` TAU-format and ``n`` CochlScene-format clips under ``out``; also writes
    TAU's tab-separated meta.csv."""
    jobs = []
    places = {c: _make_city(c, rng, 1.0) for c in TAU_CITIES}
    meta = ["filename\tscene_label\tidentifier\tsource_label"]
    tau_labels = list(TAU_SCENES)
    for i in range(n):
        label = tau_labels[i % len(tau_labels)]
        city = TAU_CITIES[int(rng.integers(len(TAU_CITIES)))]
        device = ("a", "b", "c", "s1", "s2", "s3")[int(rng.integers(6))]
        identifier = f"{city}-{int(rng.integers(0, 1000))}"
        name = f"audio/{label}-{identifier}-{i}-{device}.wav"
        meta.append(f"{name}\t{label}\t{identifier}\t{device}")
        c = places[city]
        params = _session_params(SCENES[TAU_SCENES[label]], 0.5, rng)
        jobs.append(ClipJob(str(out / "tau" / name), int(rng.integers(2**62)), sample_rate, num_samples, params, c))
    (out / "tau" / "audio").mkdir(parents=True, exist_ok=True)
    write_text(out / "tau" / "meta.csv", "\n".join(meta) + "\n")
    cochl_labels = list(COCHLSCENE_SCENES)
    for i in range(n):
        label = cochl_labels[i % len(cochl_labels)]
        split = ("Train", "Val", "Test")[i % 3]
        folder = out / "cochlscene" / split / label
        folder.mkdir(parents=True, exist_ok=True)
        c = places[TAU_CITIES[int(rng.integers(len(TAU_CITIES)))]]
        params = _session_params(SCENES[COCHLSCENE_SCENES[label]], 0.5, rng)
        path = str(folder / f"{label}_{i:04d}.wav")
        jobs.append(ClipJob(path, int(rng.integers(2**62)), sample_rate, num_samples, params, c))
    return jobs


def _metadata_text(rows: Sequence[tuple[str, str, str, str]]) -> str:
    """The challenge's CSV: UTF-8 with a BOM, no quoting, empty last field when unlabelled."""
    lines = [",".join(METADATA_HEADER)] + [",".join(r) for r in rows]
    return "\ufeff" + "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SynthSummary:
    """What ``synthesize`` wrote.

    Attributes:
        out: the dataset folder.
        dev_clips: development clips written.
        eval_clips: eval clips written.
        labelled: development clips that carry a label.
        dev_sessions: recording sessions of the development clips.
        eval_sessions: recording sessions of the eval clips.
        dev_cities: the cities of the development clips.
        eval_cities: the cities of the eval clips.
        unseen_cities: the eval cities no development clip comes from.
    """

    out: Path
    dev_clips: int
    eval_clips: int
    labelled: int
    dev_sessions: int
    eval_sessions: int
    dev_cities: list[str]
    eval_cities: list[str]
    unseen_cities: list[str]


def _check_options(
    clips: int,
    eval_clips: int,
    labelled_fraction: float,
    cities: int,
    unseen_cities: int,
    sample_rate: int,
    clip_seconds: float,
    session_size: int,
) -> None:
    """``synthesize``'s options, every problem named in one ConfigError."""
    problems = []
    if clips < len(CLASSES) or eval_clips < 1:
        problems.append(f"need at least {len(CLASSES)} dev clips and 1 eval clip (got {clips}, {eval_clips})")
    if not 0 < labelled_fraction <= 1:
        problems.append(f"labelled fraction must be in (0, 1], got {labelled_fraction}")
    if cities < 1 or unseen_cities < 0 or cities + unseen_cities > len(OFFICIAL_CITIES):
        problems.append(
            f"need 1 <= cities and cities + unseen cities <= {len(OFFICIAL_CITIES)} (got {cities} + {unseen_cities})"
        )
    if sample_rate < 8000 or clip_seconds <= 0:
        problems.append(f"sample rate must be >= 8000 and clip length > 0 (got {sample_rate}, {clip_seconds})")
    if session_size < 1:
        problems.append(f"session size must be >= 1, got {session_size}")
    if problems:
        raise ConfigError("; ".join(problems))


def _eval_sessions(
    dev_sessions: list[Session],
    seen_in_eval: list[City],
    new_cities: list[City],
    eval_clips: int,
    start: datetime,
    rng: np.random.Generator,
    session_size: int,
) -> list[Session]:
    """The eval sessions: about a third from cities no dev clip has, and, as in the real data,
    some of the seen cities' continuing a dev session (same city, time and scene)."""
    unseen_share = 0.36 if new_cities else 0.0
    n_unseen = round(eval_clips * unseen_share)
    eval_sessions = _draw_sessions(seen_in_eval, eval_clips - n_unseen, start, 90, rng, session_size)
    if n_unseen:
        eval_sessions += _draw_sessions(new_cities, n_unseen, start, 90, rng, session_size)
    seen_names = {c.name for c in seen_in_eval}
    donors = [s for s in dev_sessions if s.city.name in seen_names]
    for i, s in enumerate(eval_sessions):
        if s.city.name in seen_names and donors and rng.random() < 0.35:
            d = donors[int(rng.integers(len(donors)))]
            eval_sessions[i] = Session(d.city, d.when, d.scene, s.size, d.params, s.seed)
    return eval_sessions


def synthesize(
    out: str | Path,
    *,
    clips: int = 2000,
    eval_clips: int = 400,
    labelled_fraction: float = 0.2,
    sample_rate: int = 16000,
    clip_seconds: float = 10.0,
    cities: int = 8,
    unseen_cities: int = 3,
    session_size: int = 8,
    pretrain_clips: int = 0,
    seed: int = 0,
    workers: int = 1,
) -> SynthSummary:
    """Write a challenge-format dataset under ``out`` (audio, both metadata CSVs, eval truth).

    Deterministic by ``seed``, whatever the number of ``workers``; the generative story is in
    the ``raysc synth`` guide (docs/guides/synth.md).

    Args:
        out: the folder to write (``audio/{dev,eval}``, ``metadata/``, ``synth.json``).
        clips: development clips.
        eval_clips: eval clips.
        labelled_fraction: the share of development clips that carry a label, in (0, 1].
        sample_rate: Hz, at least 8000.
        clip_seconds: the length of every clip.
        cities: development cities (eval also holds up to six of them).
        unseen_cities: cities that appear only in eval.
        session_size: clips per recording session are 1 to ``2 * session_size - 1``.
        pretrain_clips: also write this many clips in the TAU layout and as many in the
            CochlScene layout under ``out/pretrain`` (0: none).
        seed: the random seed of everything drawn.
        workers: processes that render the audio.

    Returns:
        The counts, sessions and cities written.

    Raises:
        ConfigError: a count, fraction, rate or size out of range (every problem named).
    """
    _check_options(clips, eval_clips, labelled_fraction, cities, unseen_cities, sample_rate, clip_seconds, session_size)

    out = Path(out)
    rng = np.random.default_rng(seed)
    num_samples = round(sample_rate * clip_seconds)
    names = list(OFFICIAL_CITIES)
    # Dev cities record very unevenly (Xi'an holds almost half of the real dev set).
    dev_cities = [_make_city(names[i], rng, weight=1 / (i + 1)) for i in range(cities)]
    new_cities = [_make_city(names[cities + i], rng, weight=1.0) for i in range(unseen_cities)]
    seen_in_eval = dev_cities[: max(1, min(cities, 6))]
    start = datetime(2023, 5, 1)

    dev_sessions = _draw_sessions(dev_cities, clips, start, 90, rng, session_size)
    eval_sessions = _eval_sessions(dev_sessions, seen_in_eval, new_cities, eval_clips, start, rng, session_size)

    taken: set[str] = set()
    jobs: list[ClipJob] = []

    def expand(sessions: Sequence[Session], folder: str) -> list[tuple[str, str, str, str]]:
        rows = []
        for s in sessions:
            sub = np.random.default_rng(s.seed)
            for _ in range(s.size):
                name = _clip_name(rng, taken)
                path = str(out / "audio" / folder / f"{name}.wav")
                jobs.append(ClipJob(path, int(sub.integers(2**62)), sample_rate, num_samples, s.params, s.city))
                rows.append((name, s.city.name, s.when.strftime(TIME_FORMAT), s.scene))
        return rows

    dev_rows = expand(dev_sessions, "dev")
    eval_rows = expand(eval_sessions, "eval")
    order = rng.permutation(len(dev_rows))
    dev_rows = [dev_rows[i] for i in order]
    n_labelled = max(len(CLASSES), round(labelled_fraction * len(dev_rows)))
    labelled = set(rng.choice(len(dev_rows), size=min(n_labelled, len(dev_rows)), replace=False).tolist())
    dev_meta = [(f, c, t, lab if i in labelled else "") for i, (f, c, t, lab) in enumerate(dev_rows)]
    eval_meta = [(f, c, t, "") for f, c, t, _ in eval_rows]

    if pretrain_clips:
        jobs += _pretrain_jobs(out / "pretrain", pretrain_clips, sample_rate, num_samples, rng)

    for folder in ("audio/dev", "audio/eval"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    log.info("rendering %d clips at %d Hz with %d worker(s)", len(jobs), sample_rate, workers)
    _run_jobs(jobs, workers)

    write_text(out / DEV_METADATA, _metadata_text(dev_meta))
    write_text(out / EVAL_METADATA, _metadata_text(eval_meta))
    truth = pd.DataFrame(eval_rows, columns=list(METADATA_HEADER))[["filename", "scene_label"]]
    write_text(out / EVAL_LABELS, truth.to_csv(index=False, lineterminator="\n"))
    summary = SynthSummary(
        out=out,
        dev_clips=len(dev_meta),
        eval_clips=len(eval_meta),
        labelled=len(labelled),
        dev_sessions=len({(c, t) for _, c, t, _ in dev_meta}),
        eval_sessions=len({(c, t) for _, c, t, _ in eval_meta}),
        dev_cities=[c.name for c in dev_cities],
        eval_cities=sorted({c for _, c, _, _ in eval_meta}),
        unseen_cities=[c.name for c in new_cities],
    )
    write_json(
        out / "synth.json",
        {
            **{k: v for k, v in summary.__dict__.items() if k != "out"},
            "seed": seed,
            "sample_rate": sample_rate,
            "clip_seconds": clip_seconds,
            "labelled_fraction": labelled_fraction,
            "pretrain_clips": pretrain_clips,
        },
    )
    return summary
