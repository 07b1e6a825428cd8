"""`prepare`: validation before decoding, the data folder it writes, pretraining sources."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from conftest import SR, write_metadata, write_wav

from raysc import audio
from raysc import prepare as prepare_module
from raysc.datafolder import load_dataset
from raysc.errors import ConfigError, DataError, RayscError
from raysc.metadata import CLASSES, MANIFEST_COLUMNS, UNK_CITY, read_manifest
from raysc.prepare import prepare
from raysc.pretrain_sources import load_label_map
from raysc.synth import EVAL_LABELS


def test_prepared_synthetic_data_is_complete_and_consistent(prepared, synth_dir):
    raw, summary = synth_dir
    m = read_manifest(prepared.out)
    assert list(m.columns) == list(MANIFEST_COLUMNS)
    assert len(m) == summary.dev_clips + summary.eval_clips
    assert (m["subset"] == "labelled").sum() == summary.labelled
    assert set(m.loc[m["subset"] == "eval", "fold"]) == {-1}
    dev = m[m["subset"] != "eval"]
    assert set(dev["fold"]) == {0, 1, 2}
    assert (dev.groupby("session")["fold"].nunique() == 1).all()
    # Eval-only cities get <unk>; every other city its own index.
    unseen = m["city"].isin(summary.unseen_cities)
    assert (m.loc[unseen, "city_idx"] == 0).all() and (m.loc[~unseen, "city_idx"] > 0).all()
    info = json.loads((prepared.out / "dataset.json").read_text())
    assert info["cities"][0] == UNK_CITY and sorted(info["eval_cities_not_in_dev"]) == sorted(summary.unseen_cities)
    assert info["classes"] == list(CLASSES)
    # The store holds every clip at the target rate; rows decode to the source audio.
    store = prepared.store
    assert len(store) == len(m) and store.spec.sample_rate == SR and store.spec.num_samples == SR
    name, path = m.iloc[7][["filename", "audio_path"]]
    expect, _ = audio.Decoder(SR, SR)(path)
    assert np.allclose(store.load([name])[0], expect, atol=1 / 32768)
    truth = pd.read_csv(raw / EVAL_LABELS)
    assert set(truth["filename"]) == set(m.loc[m["subset"] == "eval", "filename"])


def test_valid_small_inputs(small_inputs):
    result = prepare(**small_inputs)
    m = result.manifest.set_index("filename")
    assert m.loc["e2_1", "city_idx"] == 0  # Sanya is eval-only
    assert result.info["counts"] == {"labelled": 4, "unlabelled": 2, "eval": 2}
    assert m.loc["a1_1", "fold"] == m.loc["a2_1", "fold"]


def test_every_problem_is_reported_at_once_and_nothing_is_written(small_inputs, tmp_path):
    write_metadata(
        small_inputs["dev_meta"],
        [
            "a1_1,Xi'an,2023-06-18 18:44:34,Airport",
            "a1_1,Xi'an,2023-06-18 18:44:34,Airport",
            "b1_1,Jinan,2023-06-19 8:00:00,Bus",
            "c1_1,Hefei,2023-06-20 12:30:00,Subway",
            "zz_1,Hefei,2023-06-20 12:30:00,Metro",
            "e1_1,Xi'an,2023-06-21 05:51:23,",
        ],
    )
    (small_inputs["audio_dirs"][0] / "c2_1.wav").write_bytes(b"not a wav file")
    write_metadata(small_inputs["eval_meta"], ["e1_1,Xi'an,2023-06-21 05:51:23,", "c2_1,Hefei,2023-06-21 05:51:23,"])
    with pytest.raises(DataError) as err:
        prepare(**small_inputs)
    dev, ev = small_inputs["dev_meta"], small_inputs["eval_meta"]
    problems = err.value.problems
    assert f"{dev}:3: duplicate filename 'a1_1' (first on line 2)" in problems
    assert f"{dev}:4: record_time '2023-06-19 8:00:00' is not in the format YYYY-MM-DD HH:MM:SS" in problems
    assert any(p.startswith(f"{dev}:5: unknown scene_label 'Subway'") for p in problems)
    assert f"{dev}:6: no audio file zz_1.wav under {small_inputs['audio_dirs'][0]}" in problems
    assert f"{ev}:2: filename 'e1_1' is also in {dev} (line 7)" in problems
    assert any(p.startswith(f"{small_inputs['audio_dirs'][0] / 'c2_1.wav'}: cannot be read as audio") for p in problems)
    assert "nothing was written" in str(err.value)
    assert not small_inputs["out"].exists()


def test_audio_without_metadata_is_a_warning(small_inputs, caplog):
    write_wav(small_inputs["audio_dirs"][0] / "stray_1.wav")
    with caplog.at_level(logging.WARNING):
        result = prepare(**small_inputs)
    assert "stray_1" not in set(result.manifest["filename"])
    assert result.info["audio_without_metadata"] == 1
    assert any(
        "1 audio file(s) have no metadata row" in r.getMessage() and "stray_1.wav" in r.getMessage()
        for r in caplog.records
    )


def test_resampling_and_length_changes_are_counted(small_inputs):
    write_wav(small_inputs["audio_dirs"][0] / "a1_1.wav", 0.5, rate=44100, channels=2)
    write_wav(small_inputs["audio_dirs"][0] / "b1_1.wav", 2.0, rate=22050)
    result = prepare(**small_inputs)
    assert result.store.spec.padded == 1 and result.store.spec.trimmed == 1


def test_short_and_implausibly_loud_clips_are_named_in_the_report(small_inputs, caplog):
    import csv

    import soundfile as sf

    from raysc.audio import REPORT

    audio = small_inputs["audio_dirs"][0]
    write_wav(audio / "a1_1.wav", 0.1)  # a tenth of the 1 s clip
    write_wav(audio / "a2_1.wav", 0.8)  # padded, but mostly audio
    # 8-bit samples in a file whose header says 16-bit: full-scale noise once read.
    noise = np.random.default_rng(0).integers(-32768, 32767, SR, dtype=np.int16)
    sf.write(str(audio / "b1_1.wav"), noise, SR, subtype="PCM_16")
    result = prepare(**small_inputs)
    rows = list(csv.DictReader((result.store.path / REPORT).open()))
    by_clip = {(r["filename"], r["issue"]): r["detail"] for r in rows}
    short, padded = int(0.1 * SR), int(0.8 * SR)
    assert by_clip[("a1_1", "short")] == f"{short} of {SR} samples; the rest zero-padded"
    assert by_clip[("a2_1", "padded")] == f"{padded} of {SR} samples; the rest zero-padded"
    assert by_clip[("b1_1", "loud")].startswith("RMS -4.")  # uniform full-scale noise: -4.8 dBFS
    assert len(rows) == 3  # the clips of normal length and level are not listed
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith("1 clip(s) shorter than 50% of the clip length, zero-padded: a1_1; see") for m in said)
    assert any(m.startswith("1 clip(s) louder than -6 dBFS RMS") and "b1_1" in m for m in said)


def test_rerun_reuses_and_other_inputs_need_overwrite(small_inputs, monkeypatch):
    started = []
    real_pool = prepare_module.decoding_pool

    def pool(workers):
        started.append(workers)
        return real_pool(workers)

    monkeypatch.setattr(prepare_module, "decoding_pool", pool)
    first = prepare(**{**small_inputs, "workers": 2})
    again = prepare(**{**small_inputs, "workers": 2})
    assert started == [2, 1]  # a new store's decoders start early; a rerun that reuses it starts none
    assert again.store.spec == first.store.spec
    assert again.manifest.equals(first.manifest)
    with pytest.raises(
        RayscError, match="prepared from other inputs or options; choose another --out or pass --overwrite"
    ):
        prepare(**{**small_inputs, "folds": 3})
    assert read_manifest(small_inputs["out"])["fold"].max() == 1  # untouched
    prepare(**{**small_inputs, "folds": 3, "overwrite": True})


def test_bad_options_are_errors(small_inputs):
    with pytest.raises(RayscError, match="sample rate must be >= 1000 Hz"):
        prepare(**{**small_inputs, "sample_rate": 10})
    with pytest.raises(DataError, match="unknown split 'clip'"):
        prepare(**{**small_inputs, "split": "clip"})


def test_city_held_out_split(small_inputs):
    result = prepare(**{**small_inputs, "split": "city"})
    m = result.manifest
    dev = m[m["subset"] != "eval"]
    assert (dev.groupby("city")["fold"].nunique() == 1).all()
    # Folds split by city are fixed: there is no other split for repeated cross-fitting to draw.
    with pytest.raises(ConfigError, match=r"prepared with folds split by city: they are fixed, so a repeat"):
        load_dataset(result.out, repeat=1)


def test_a_repeat_redraws_the_development_folds_by_session_and_keeps_the_rest(small_inputs):
    result = prepare(**small_inputs)
    m = load_dataset(result.out).manifest
    again = load_dataset(result.out, repeat=2).manifest
    assert again.drop(columns="fold").equals(m.drop(columns="fold"))
    dev = again["subset"].isin(["labelled", "unlabelled"])
    assert (again.loc[~dev, "fold"] == m.loc[~dev, "fold"]).all()  # eval (and pretraining) keep theirs
    assert (again[dev].groupby("session")["fold"].nunique() == 1).all()  # a session stays in one fold
    labelled = again[again["subset"] == "labelled"]
    assert sorted(labelled["fold"].unique()) == sorted(m.loc[m["subset"] == "labelled", "fold"].unique())
    assert load_dataset(result.out, repeat=2).manifest.equals(again)  # the same repeat, the same folds
    with pytest.raises(ConfigError, match="repeat must be >= 0, got -1"):
        load_dataset(result.out, repeat=-1)


def test_pretraining_sources_are_mapped_and_unmapped_labels_counted(synth_dir, small_inputs):
    raw, _ = synth_dir
    result = prepare(**small_inputs, tau=raw / "pretrain" / "tau", cochlscene=raw / "pretrain" / "cochlscene")
    pre = result.manifest[result.manifest["subset"] == "pretrain"]
    # 12 TAU clips over 10 labels (2 unmapped: street_pedestrian, tram), 12 CochlScene clips
    # over 13 scene folders (6 unmapped).
    assert result.info["pretrain_dropped"] == {
        "tau:street_pedestrian": 1,
        "tau:tram": 1,
        "cochlscene:Car": 1,
        "cochlscene:CrowdedIndoor": 1,
        "cochlscene:Elevator": 1,
        "cochlscene:Kitchen": 1,
        "cochlscene:ResidentialArea": 1,
        "cochlscene:Restroom": 1,
    }
    assert len(pre) == 24 - 8
    labels = dict(zip(pre["filename"], pre["label"], strict=True))
    assert labels[next(f for f in labels if f.startswith("tau__metro_station-"))] == "Metro"
    assert labels[next(f for f in labels if "__Cafe__" in f)] == "Bar"
    assert (pre["city_idx"] == 0).all() and (pre["fold"] >= 0).all()
    assert (pre[["tod_sin", "tod_cos", "weekend"]] == 0).all().all()
    assert len(result.store) == len(result.manifest)


def test_label_map_errors(tmp_path):
    bad = tmp_path / "map.yaml"
    bad.write_text("tau:\n  bus: Buss\nfreesound:\n  x: Bus\n")
    with pytest.raises(ConfigError) as err:
        load_label_map(bad)
    assert "tau.bus: 'Buss' is not a challenge class" in str(err.value)
    assert "unknown source 'freesound' (valid: tau, cochlscene)" in str(err.value)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"expected a mapping of label tables per source \(tau, cochlscene\)"):
        load_label_map(bad)
    with pytest.raises(ConfigError, match="cannot read label tables per source"):
        load_label_map(tmp_path / "missing.yaml")
    assert load_label_map()["tau"]["metro_station"] == "Metro"


def test_missing_pretraining_folders_are_problems(small_inputs, tmp_path):
    with pytest.raises(DataError) as err:
        prepare(**small_inputs, tau=tmp_path / "no-tau", cochlscene=tmp_path / "no-cochl")
    assert f"{tmp_path / 'no-tau' / 'meta.csv'}: TAU meta.csv not found" in err.value.problems
    assert f"{tmp_path / 'no-cochl'}: CochlScene folder not found" in err.value.problems


def test_prepare_never_writes_into_a_folder_it_did_not_create(small_inputs, tmp_path):
    out = tmp_path / "theirs"
    (out / "store").mkdir(parents=True)
    (out / "store" / "precious.txt").write_text("precious")
    (out / "manifest.csv").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(RayscError, match=r"already holds files that raysc did not write \(manifest.csv, store\)"):
            prepare(**{**small_inputs, "out": out, "overwrite": overwrite})
    assert (out / "store" / "precious.txt").read_text() == "precious" and (out / "manifest.csv").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv", "store"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RayscError, match="is a file, not a folder"):
        prepare(**{**small_inputs, "out": tmp_path / "afile"})
    data = prepare(**small_inputs)  # a new folder: raysc's own, and a rerun may replace what it wrote
    assert (data.out / ".raysc-data").is_file()
    prepare(**small_inputs)


def test_more_folds_than_labelled_sessions_is_refused(small_inputs):
    with pytest.raises(DataError, match=r"--folds 5: only 3 labelled recording session\(s\).*use at most 3"):
        prepare(**{**small_inputs, "folds": 5})
    assert not small_inputs["out"].exists()


def test_cities_with_stray_spaces_or_quotes_are_warned_about_with_a_suggestion(small_inputs, caplog):
    from conftest import write_metadata

    rows = [
        "a1_1,Xi'an ,2023-06-18 18:44:34,Airport",
        "a2_1,Xi'an,2023-06-18 18:44:34,",
        "b1_1,Jinan,2023-06-19 08:00:00,Bus",
        "b2_1,Jinan,2023-06-19 08:00:00,Bus",
        'c1_1,"Hefei",2023-06-20 12:30:00,Metro',
        "c2_1,Hefei,2023-06-20 12:30:00,",
    ]
    write_metadata(small_inputs["dev_meta"], rows)
    prepare(**small_inputs)
    assert 'dev.csv:2: location "Xi\'an " has stray spaces or quotes; did you mean "Xi\'an"?' in caplog.text
    assert "dev.csv:6: location '\"Hefei\"' has stray spaces or quotes; did you mean 'Hefei'? (kept" in caplog.text


def test_a_folder_given_as_metadata_is_named(small_inputs, tmp_path):
    with pytest.raises(DataError, match=r"meta-dir: a folder, not a metadata file"):
        prepare(**{**small_inputs, "dev_meta": (tmp_path / "meta-dir").mkdir() or tmp_path / "meta-dir"})
