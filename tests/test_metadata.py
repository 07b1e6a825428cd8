"""Metadata parsing, time features, sessions, folds and the city vocabulary."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import write_metadata

from raysc.errors import DataError
from raysc.metadata import (
    CLASSES,
    TIME_FEATURES,
    UNK_CITY,
    SourceRows,
    assign_folds,
    build_manifest,
    parse_metadata,
    parse_record_time,
    read_manifest,
    time_features,
)


def test_reads_official_format_with_bom_bare_apostrophe_and_empty_label(tmp_path):
    path = write_metadata(
        tmp_path / "dev.csv",
        [
            "217e22297e0c42adb380cffc58dfa63260_2,Xi'an,2023-06-21 05:51:23,Airport",
            "40c8570776704268be56bc0d1fa8a16f60_1,Xi'an,2023-06-18 18:44:34,",
        ],
    )
    rows, problems = parse_metadata(path, subset="dev")
    assert problems == []
    assert list(rows["filename"]) == ["217e22297e0c42adb380cffc58dfa63260_2", "40c8570776704268be56bc0d1fa8a16f60_1"]
    assert list(rows["city"]) == ["Xi'an", "Xi'an"]
    assert rows["label"].iloc[0] == "Airport" and pd.isna(rows["label"].iloc[1])
    assert list(rows["line"]) == [2, 3]


def test_file_without_bom_and_with_crlf_is_read_too(tmp_path):
    path = tmp_path / "dev.csv"
    path.write_bytes(b"filename,location,record_time,scene_label\r\na_1,Jinan,2023-06-21 05:51:23,Bus\r\n")
    rows, problems = parse_metadata(path, subset="dev")
    assert problems == [] and rows["label"].tolist() == ["Bus"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("a_1,Jinan,2023-06-21 05:51:23,bus", "unknown scene_label 'bus'; did you mean 'Bus'?"),
        ("a_1,Jinan,2023-06-21 05:51:23,Forest", "unknown scene_label 'Forest' (valid: Bus, Airport"),
        (
            "a_1,Jinan,2023-06-21 5:51:23,Bus",
            "record_time '2023-06-21 5:51:23' is not in the format YYYY-MM-DD HH:MM:SS",
        ),
        ("a_1,Jinan,2023-06-21T05:51:23,Bus", "record_time '2023-06-21T05:51:23' is not in the format"),
        ("a_1,Jinan,2023-02-30 05:51:23,Bus", "record_time '2023-02-30 05:51:23' is not a valid date and time"),
        ("a_1,Jinan,2023-06-21 25:00:00,Bus", "record_time '2023-06-21 25:00:00' is not a valid date and time"),
        ("a_1,,2023-06-21 05:51:23,Bus", "empty location for 'a_1'"),
        ("sub/a_1,Jinan,2023-06-21 05:51:23,Bus", "filename 'sub/a_1' is not a plain name"),
        ("..,Jinan,2023-06-21 05:51:23,Bus", "filename '..' is not a plain name"),
        ("a_1.wav,Jinan,2023-06-21 05:51:23,Bus", "filename 'a_1.wav' has an extension"),
        (",Jinan,2023-06-21 05:51:23,Bus", "empty filename"),
        ("a_1,Jinan,2023-06-21 05:51:23", "expected 4 comma-separated fields, found 3"),
        ("a_1,Jinan,Extra,2023-06-21 05:51:23,Bus", "expected 4 comma-separated fields, found 5"),
    ],
)
def test_each_bad_row_is_named_with_file_line_and_value(tmp_path, row, message):
    path = write_metadata(tmp_path / "dev.csv", ["ok_1,Jinan,2023-06-21 05:51:23,Bus", row])
    _, problems = parse_metadata(path, subset="dev")
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:3: ")
    assert message in problems[0]


def test_duplicate_filename_names_both_lines(tmp_path):
    path = write_metadata(tmp_path / "dev.csv", ["a_1,Jinan,2023-06-21 05:51:23,Bus"] * 2)
    _, problems = parse_metadata(path, subset="dev")
    assert problems == [f"{path}:3: duplicate filename 'a_1' (first on line 2)"]


def test_wrong_header_is_reported_and_no_rows_are_trusted(tmp_path):
    path = write_metadata(
        tmp_path / "dev.csv", ["a_1,Jinan,2023-06-21 05:51:23,Bus"], header="filename,city,time,label"
    )
    rows, problems = parse_metadata(path, subset="dev")
    assert rows.empty
    assert problems == [
        f"{path}:1: header is 'filename,city,time,label', expected 'filename,location,record_time,scene_label'"
    ]


def test_eval_rows_must_be_unlabelled(tmp_path):
    path = write_metadata(tmp_path / "eval.csv", ["e_1,Jinan,2023-06-21 05:51:23,Bus"])
    _, problems = parse_metadata(path, subset="eval")
    assert problems == [f"{path}:2: scene_label 'Bus' given, but evaluation rows must be unlabelled"]


def test_missing_empty_and_non_utf8_files(tmp_path):
    _, problems = parse_metadata(tmp_path / "nope.csv", subset="dev")
    assert problems == [f"{tmp_path / 'nope.csv'}: metadata file not found"]
    empty = write_metadata(tmp_path / "empty.csv", [])
    assert parse_metadata(empty, subset="dev")[1] == [f"{empty}: no data rows"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"filename,location,record_time,scene_label\na_1,J\xe9nan,2023-06-21 05:51:23,Bus\n")
    (problem,) = parse_metadata(latin, subset="dev")[1]
    assert problem.startswith(f"{latin}: not UTF-8 text")


def test_all_problems_of_a_file_are_collected(tmp_path):
    rows = [f"a{i}_1,Jinan,2023-13-01 00:00:00,Bus" for i in range(30)]
    _, problems = parse_metadata(write_metadata(tmp_path / "dev.csv", rows), subset="dev")
    assert len(problems) == 30
    err = DataError(problems, what="the inputs")
    assert str(err).startswith("30 problem(s) in the inputs:")
    assert "... and 10 more" in str(err)


def test_parse_record_time_is_exact():
    assert parse_record_time("2023-06-18 18:44:34")[0].hour == 18
    assert parse_record_time("2023-06-18 18:44")[0] is None
    assert parse_record_time(" 2023-06-18 18:44:34")[0] is None


def test_time_features_are_cyclic_and_flag_weekends():
    times = pd.Series(["2023-06-17 00:00:00", "2023-06-17 06:00:00", "2023-06-19 12:00:00", "2024-12-31 18:00:00", ""])
    f = time_features(times)
    assert list(f.columns) == list(TIME_FEATURES)
    # 2023-06-17 is a Saturday, 2023-06-19 a Monday.
    assert f["weekend"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert f["tod_sin"].iloc[0] == pytest.approx(0.0, abs=1e-6) and f["tod_cos"].iloc[0] == pytest.approx(1.0)
    assert f["tod_sin"].iloc[1] == pytest.approx(1.0) and f["tod_cos"].iloc[2] == pytest.approx(-1.0)
    assert f["dow_sin"].iloc[2] == pytest.approx(0.0, abs=1e-6)  # Monday = weekday 0
    # Dec 31 of a leap year is day 366: just short of a full turn.
    assert f["doy_sin"].iloc[3] == pytest.approx(math.sin(2 * math.pi * 365 / 366), abs=1e-6)
    assert f.iloc[4].tolist() == [0.0] * len(TIME_FEATURES)  # no timestamp: no signal
    assert np.allclose(f["tod_sin"] ** 2 + f["tod_cos"] ** 2, [1, 1, 1, 1, 0])


def _random_sessions(seed: int, n_sessions: int = 120) -> tuple[pd.Series, pd.Series]:
    rng = np.random.default_rng(seed)
    groups, labels = [], []
    for s in range(n_sessions):
        label = CLASSES[rng.integers(len(CLASSES))]
        for _ in range(int(rng.integers(1, 12))):
            groups.append(f"s{s}")
            labels.append(label if rng.random() < 0.3 else None)
    return pd.Series(groups), pd.Series(labels, dtype=object)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folds_never_split_a_session_and_balance_every_class(seed):
    groups, labels = _random_sessions(seed)
    folds = assign_folds(groups, labels, n_folds=5, seed=seed)
    assert (folds.groupby(groups).nunique() == 1).all()
    assert set(folds) == set(range(5))
    df = pd.DataFrame({"g": groups, "y": labels, "f": folds})
    lab = df.dropna(subset=["y"])
    for cls, part in lab.groupby("y"):
        per_fold = part.groupby("f").size().reindex(range(5), fill_value=0)
        largest = part.groupby("g").size().max()
        # Greedy least-loaded assignment: the spread is at most one (the largest) session.
        assert per_fold.max() - per_fold.min() <= largest, (cls, per_fold.tolist())
    sizes = df.groupby("f").size()
    assert sizes.max() - sizes.min() <= df.groupby("g").size().max() * 2


def test_folds_are_deterministic_by_seed():
    groups, labels = _random_sessions(0)
    a = assign_folds(groups, labels, n_folds=5, seed=3)
    assert a.equals(assign_folds(groups, labels, n_folds=5, seed=3))
    assert not a.equals(assign_folds(groups, labels, n_folds=5, seed=4))


def test_fewer_than_two_folds_is_an_error():
    groups, labels = _random_sessions(0, 5)
    with pytest.raises(DataError, match="--folds must be at least 2, got 1"):
        assign_folds(groups, labels, n_folds=1, seed=0)


def _rows(specs):
    return pd.DataFrame(
        [(f, c, t, lab, i + 2) for i, (f, c, t, lab) in enumerate(specs)],
        columns=["filename", "city", "record_time", "label", "line"],
    )


def _src():
    dev = _rows(
        [
            ("a_1", "Xi'an", "2023-06-18 18:44:34", "Airport"),
            ("a_2", "Xi'an", "2023-06-18 18:44:34", None),
            ("b_1", "Jinan", "2023-06-19 08:00:00", "Bus"),
            ("c_1", "Hefei", "2023-06-20 09:00:00", "Bus"),
            ("d_1", "Hefei", "2023-06-21 10:00:00", None),
        ]
    )
    ev = _rows([("e_1", "Sanya", "2023-06-22 10:00:00", None), ("e_2", "Jinan", "2023-06-19 08:00:00", None)])
    paths = {f: f"/audio/{f}.wav" for f in [*dev["filename"], *ev["filename"]]}
    return SourceRows(dev=dev, eval=ev, audio_paths=paths)


def test_manifest_columns_subsets_cities_and_sessions():
    m, vocab = build_manifest(_src(), n_folds=2, seed=0)
    assert vocab == [UNK_CITY, "Hefei", "Jinan", "Xi'an"]
    by = m.set_index("filename")
    assert by.loc["a_1", "subset"] == "labelled" and by.loc["a_2", "subset"] == "unlabelled"
    assert by.loc["e_1", "subset"] == "eval" and by.loc["e_1", "fold"] == -1
    # Eval-only city -> <unk> (index 0), never a trained city's index.
    assert by.loc["e_1", "city_idx"] == 0 and by.loc["e_2", "city_idx"] == vocab.index("Jinan")
    assert by.loc["a_1", "session"] == by.loc["a_2", "session"] == "Xi'an|2023-06-18 18:44:34"
    # The unlabelled clip of a labelled session shares its fold (its pseudo-label must not leak).
    assert by.loc["a_1", "fold"] == by.loc["a_2", "fold"]
    assert by.loc["a_1", "audio_path"] == "/audio/a_1.wav"


def test_city_split_holds_out_whole_cities():
    m, _ = build_manifest(_src(), n_folds=2, split="city", seed=0)
    dev = m[m["subset"] != "eval"]
    assert (dev.groupby("city")["fold"].nunique() == 1).all()
    assert dev["fold"].nunique() == 2


def test_city_split_needs_enough_labelled_cities():
    with pytest.raises(DataError, match="at most one fold per labelled city: 3 cities, --folds 4"):
        build_manifest(_src(), n_folds=4, split="city")


def test_read_manifest_errors(tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("filename,subset\na,b\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['label'"):
        read_manifest(tmp_path)
