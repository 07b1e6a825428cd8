"""Decoding, the audio index and the FeatureStore (build, reuse, resume, parallel)."""

from __future__ import annotations

import json
import pickle
from collections import namedtuple
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
import soundfile as sf
from conftest import SR, write_wav

from raysc import audio
from raysc.audio import Decoder, FeatureStore, build_store, check_audio_header, index_audio, to_int16
from raysc.errors import DataError, RayscError

shutil_usage = namedtuple("shutil_usage", "total used free")


def _dominant_hz(wave: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spec.argmax()])


def test_stereo_44k_is_downmixed_and_resampled_keeping_pitch(tmp_path):
    path = write_wav(tmp_path / "x.wav", 1.0, rate=44100, channels=2, freq=440.0)
    wave, change = Decoder(16000, 16000)(path)
    assert wave.shape == (16000,) and wave.dtype == np.float32
    assert change == 0
    assert _dominant_hz(wave, 16000) == pytest.approx(440.0, abs=2.0)
    assert np.abs(wave).max() == pytest.approx(0.5, abs=0.02)


def test_channels_are_averaged(tmp_path):
    path = tmp_path / "opposite.wav"
    left = 0.5 * np.sin(2 * np.pi * 300 * np.arange(SR) / SR)
    sf.write(str(path), np.stack([left, 0.5 * left], 1), SR, subtype="FLOAT")
    wave, _ = Decoder(SR, SR)(path)
    assert np.allclose(wave, 0.75 * left, atol=1e-6)


def test_short_clips_are_padded_and_long_ones_trimmed(tmp_path):
    short = write_wav(tmp_path / "short.wav", 0.5)
    long = write_wav(tmp_path / "long.wav", 1.5)
    dec = Decoder(SR, SR)
    w, change = dec(short)
    assert change == SR // 2 and w.shape == (SR,) and np.all(w[SR // 2 :] == 0)
    w, change = dec(long)
    assert change == -(SR // 2) and w.shape == (SR,)


def test_corrupt_and_empty_files_are_named(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros((0, 1)), SR)
    with pytest.raises(DataError, match=f"{bad}: cannot be decoded"):
        Decoder(SR, SR)(bad)
    with pytest.raises(DataError, match=f"{empty}: audio file is empty"):
        Decoder(SR, SR)(empty)
    assert check_audio_header(bad).startswith(f"{bad}: cannot be read as audio")
    assert check_audio_header(empty) == f"{empty}: audio file is empty (0 samples)"
    assert check_audio_header(write_wav(tmp_path / "ok.wav")) is None


def test_int16_conversion_reports_clipping():
    ok, clipped = to_int16(np.array([0.0, 0.5, -1.0], dtype=np.float32))
    assert ok.tolist() == [0, 16384, -32768] and not clipped
    loud, clipped = to_int16(np.array([1.5, -2.0], dtype=np.float32))
    assert loud.tolist() == [32767, -32768] and clipped
    row = np.zeros(3, np.int16)
    got, clipped = to_int16(np.array([0.25, -0.5, 1.0], dtype=np.float32), out=row)
    assert got is row and row.tolist() == [8192, -16384, 32767] and clipped


def test_index_finds_wav_and_flac_in_subfolders_and_flags_duplicates(tmp_path):
    write_wav(tmp_path / "a" / "x_1.wav")
    write_wav(tmp_path / "a" / "deep" / "y_1.WAV")
    (tmp_path / "b").mkdir()
    sf.write(str(tmp_path / "b" / "z_1.flac"), np.zeros(10), SR)
    (tmp_path / "a" / "notes.txt").write_text("not audio")
    found, problems = index_audio([tmp_path / "a", tmp_path / "b"])
    assert sorted(found) == ["x_1", "y_1", "z_1"] and problems == []
    write_wav(tmp_path / "b" / "x_1.wav")
    found, problems = index_audio([tmp_path / "a", tmp_path / "b", tmp_path / "missing"])
    assert any("clip 'x_1' found twice" in p for p in problems)
    assert f"{tmp_path / 'missing'}: audio folder not found" in problems


def _files(tmp_path, n=70):
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        path = tmp_path / "in" / f"c{i:03d}.wav"
        path.parent.mkdir(exist_ok=True)
        sf.write(str(path), rng.uniform(-0.5, 0.5, size=SR // 4 + i), SR, subtype="PCM_16")
        files.append((f"c{i:03d}", path))
    return files


def test_store_round_trip_matches_decoder(tmp_path):
    files = _files(tmp_path)
    store = build_store(tmp_path / "store", files, sample_rate=SR, num_samples=SR // 4 + 10, workers=1)
    assert len(store) == 70 and store.spec.padded == 10 and store.spec.trimmed == 59
    names = ["c005", "c000", "c069"]
    got = store.load(names)
    dec = Decoder(SR, SR // 4 + 10)
    for name, row in zip(names, got, strict=True):
        expect, _ = dec(tmp_path / "in" / f"{name}.wav")
        assert np.allclose(row, expect, atol=1 / 32768)
    reopened = FeatureStore.open(tmp_path / "store")
    assert reopened.spec == store.spec and np.array_equal(reopened.load(names), got)
    assert not (tmp_path / "store.partial").exists()
    with pytest.raises(DataError, match="clip 'nope' is not in the feature store"):
        store.load(["nope"])


def test_store_with_a_damaged_index_is_refused(tmp_path):
    build_store(tmp_path / "store", _files(tmp_path, 3), sample_rate=SR, num_samples=SR // 4, workers=1)
    (tmp_path / "store" / "index.txt").write_text("c000\n")
    with pytest.raises(DataError, match=r"index\.txt: 1 names for 3 rows"):
        FeatureStore.open(tmp_path / "store")


def test_store_pickles_without_its_memory_map(tmp_path):
    store = build_store(tmp_path / "store", _files(tmp_path, 3), sample_rate=SR, num_samples=SR // 4, workers=1)
    store.load(["c000"])
    clone = pickle.loads(pickle.dumps(store))
    assert clone._waves is None and np.array_equal(clone.load(["c001"]), store.load(["c001"]))


def test_same_inputs_reuse_the_store_and_changed_inputs_rebuild_it(tmp_path, monkeypatch):
    files = _files(tmp_path, 5)
    first = build_store(tmp_path / "store", files, sample_rate=SR, num_samples=SR // 4, workers=1)
    calls = []
    monkeypatch.setattr(audio, "_decode_chunk", lambda *a: calls.append(a) or pytest.fail("decoded again"))
    again = build_store(tmp_path / "store", files, sample_rate=SR, num_samples=SR // 4, workers=1)
    assert again.spec == first.spec and calls == []
    monkeypatch.undo()
    sf.write(str(files[2][1]), np.zeros(SR // 4), SR, subtype="PCM_16")  # new content, new size/mtime
    rebuilt = build_store(tmp_path / "store", files, sample_rate=SR, num_samples=SR // 4, workers=1)
    assert rebuilt.spec.content_hash != first.spec.content_hash
    assert np.all(rebuilt.load(["c002"]) == 0)


def test_killed_build_leaves_no_store_and_the_rerun_continues(tmp_path, monkeypatch):
    files = _files(tmp_path, 100)  # 4 chunks of 32
    real = audio._decode_chunk
    done = []

    def dies_after_two(*args):
        if len(done) == 2:
            raise KeyboardInterrupt  # what a kill looks like from here
        done.append(args[1])
        return real(*args)

    monkeypatch.setattr(audio, "_decode_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_store(tmp_path / "store", files, sample_rate=SR, num_samples=SR // 4, workers=1)
    assert not (tmp_path / "store").exists()
    with pytest.raises(DataError, match="not a finished feature store"):
        FeatureStore.open(tmp_path / "store.partial")

    second = []
    monkeypatch.setattr(audio, "_decode_chunk", lambda *a: second.append(a[1]) or real(*a))
    store = build_store(tmp_path / "store", files, sample_rate=SR, num_samples=SR // 4, workers=1)
    assert sorted(second) == [64, 96]  # only the chunks not finished before the kill
    fresh = build_store(tmp_path / "fresh", files, sample_rate=SR, num_samples=SR // 4, workers=1)
    assert store.spec.content_hash == fresh.spec.content_hash
    assert np.array_equal(store.waves, fresh.waves)


def test_finished_but_unrenamed_build_is_swapped_in(tmp_path):
    files = _files(tmp_path, 3)
    built = build_store(tmp_path / "store", files, sample_rate=SR, num_samples=SR // 4, workers=1)
    (tmp_path / "store").rename(tmp_path / "store.partial")  # crash between the two renames
    again = build_store(tmp_path / "store", files, sample_rate=SR, num_samples=SR // 4, workers=1)
    assert again.spec == built.spec and not (tmp_path / "store.partial").exists()


def test_decode_errors_are_collected_across_files(tmp_path):
    files = _files(tmp_path, 40)
    for i in (3, 35):
        files[i][1].write_bytes(b"garbage")
    with pytest.raises(DataError) as err:
        build_store(tmp_path / "store", files, sample_rate=SR, num_samples=SR // 4, workers=1)
    assert err.value.problems[0].startswith(f"{files[3][1]}: cannot be decoded")
    assert err.value.problems[1].startswith(f"{files[35][1]}: cannot be decoded")
    assert not (tmp_path / "store").exists()


@pytest.mark.slow
def test_parallel_build_equals_serial_build(tmp_path):
    files = _files(tmp_path, 70)
    serial = build_store(tmp_path / "s", files, sample_rate=16000, num_samples=4000, workers=1)
    parallel = build_store(tmp_path / "p", files, sample_rate=16000, num_samples=4000, workers=2)
    assert serial.spec.content_hash == parallel.spec.content_hash
    spec = json.loads((tmp_path / "p" / "spec.json").read_text())
    assert spec["sample_rate"] == 16000 and spec["count"] == 70
    with audio.decoding_pool(2) as pool:  # started before the build, as prepare does
        pooled = build_store(tmp_path / "q", files, sample_rate=16000, num_samples=4000, pool=pool)
    assert pooled.spec.content_hash == serial.spec.content_hash
    np.testing.assert_array_equal(pooled.waves, serial.waves)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(print)


def test_decoding_pool_is_shut_down_when_its_caller_fails(tmp_path):
    with pytest.raises(DataError), audio.decoding_pool(2) as pool:
        raise DataError(["a problem found while the workers start"], what="the inputs")
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(print)
    with audio.decoding_pool(1) as none:
        assert none is None  # one worker decodes in the calling process


def test_non_finite_samples_are_an_input_problem_named_with_the_file(tmp_path):
    wave = np.zeros(SR, np.float32)
    nan, inf = tmp_path / "nan.wav", tmp_path / "inf.wav"
    sf.write(str(nan), np.full(SR, np.nan, np.float32), SR, subtype="FLOAT")
    wave[10:20] = np.inf
    sf.write(str(inf), wave, SR, subtype="FLOAT")
    for path, count in ((nan, SR), (inf, 10)):
        with pytest.raises(DataError, match=rf"{path.name}: {count} of {SR} samples are NaN or infinite"):
            Decoder(SR, SR)(path)
    with pytest.raises(DataError) as err:
        build_store(tmp_path / "store", [("nan", nan), ("inf", inf)], sample_rate=SR, num_samples=SR, workers=1)
    assert len(err.value.problems) == 2 and not (tmp_path / "store").exists()


def test_a_store_the_disk_cannot_hold_is_refused_before_decoding(tmp_path, monkeypatch):
    files = _files(tmp_path, 3)
    decoded = []
    monkeypatch.setattr(audio, "_decode_chunk", lambda *job: decoded.append(job))
    monkeypatch.setattr(audio.shutil, "disk_usage", lambda p: shutil_usage(total=10**9, used=10**9 - 1000, free=1000))
    # 3 clips of 2,000 int16 samples (12 kB, less what the new file already holds): said in kB, not as "0.0 GB".
    with pytest.raises(RayscError, match=r"needs \d+(\.\d+)? kB more and its disk has 1 kB free; free some space"):
        build_store(tmp_path / "store", files, sample_rate=SR, num_samples=SR // 4, workers=1)
    assert not decoded and not (tmp_path / "store").exists()


def test_a_decoding_process_that_dies_is_reported_and_the_build_can_continue(tmp_path):
    class DyingPool:  # what ProcessPoolExecutor.map raises once a worker was killed
        def map(self, fn, *jobs):
            yield fn(*(job[0] for job in jobs))
            raise BrokenProcessPool("A process in the process pool was terminated abruptly")

    files = _files(tmp_path, 70)
    died = r"store died \(killed, out of memory, or the disk full\); the 1 finished chunks of 3 are kept"
    with pytest.raises(RayscError, match=died):
        build_store(tmp_path / "store", files, sample_rate=SR, num_samples=SR // 4, pool=DyingPool())
    store = build_store(tmp_path / "store", files, sample_rate=SR, num_samples=SR // 4, workers=1)
    assert len(store) == 70
