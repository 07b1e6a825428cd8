"""Ensemble selection, temperature, session smoothing and pseudo-label selection on toy numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raysc.ensemble import apply_temperature, fit_temperature, greedy_selection, smooth_sessions, top_k
from raysc.errors import DataError
from raysc.metrics import log_loss
from raysc.pseudo_labels import Selection, read_candidates, select

CLASSES = ["a", "b", "c"]


def onehot(idx, n=3, p=0.9):
    out = np.full((len(idx), n), (1 - p) / (n - 1))
    out[np.arange(len(idx)), idx] = p
    return out


def test_top_k_takes_the_best_scores_and_breaks_ties_by_order():
    assert top_k([0.5, 0.9, 0.7, 0.9], 2) == [1, 3]
    assert top_k([0.5], 3) == [0]


def test_greedy_selection_finds_the_complementary_pair():
    # Truth 0,1,2,0,1,2. Model A is right on the first half, B on the second, C is always
    # wrong but confident, D is right only on clip 0. A+B together are right everywhere.
    y = np.array([0, 1, 2, 0, 1, 2])
    a = np.vstack([onehot([0, 1, 2]), onehot([1, 2, 0], p=0.6)])
    b = np.vstack([onehot([1, 2, 0], p=0.6), onehot([0, 1, 2])])
    c = onehot([1, 2, 0, 1, 2, 0], p=0.99)
    d = onehot([0, 0, 0, 0, 0, 0], p=0.5)
    picks = greedy_selection([a, b, c, d], y, steps=5)
    assert sorted(set(picks)) == [0, 1]  # never the harmful ones
    mean = np.mean([[a, b, c, d][i] for i in picks], axis=0)
    assert (mean.argmax(1) == y).all()


def test_greedy_keeps_the_best_prefix_not_the_last_step():
    y = np.array([0, 1])
    good = onehot([0, 1])
    bad = onehot([1, 0], p=0.99)
    assert greedy_selection([good, bad], y, steps=4) == [0]


def test_temperature_lowers_log_loss_and_keeps_the_argmax():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    # Overconfident: right 70 % of the time with probability 0.99.
    pred = np.where(rng.random(300) < 0.7, y, (y + 1) % 3)
    p = onehot(pred, p=0.99)
    t = fit_temperature(p, y)
    q = apply_temperature(p, t)
    assert t > 1.5 and log_loss(q, y) < log_loss(p, y) - 0.5
    assert (q.argmax(1) == p.argmax(1)).all() and np.allclose(q.sum(1), 1)


def test_session_smoothing_averages_within_sessions_only():
    p = np.array([[0.9, 0.1, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 1.0]])
    out = smooth_sessions(p, np.array(["s1", "s1", "s2"]))
    assert np.allclose(out[0], [0.6, 0.4, 0.0]) and np.allclose(out[1], out[0]) and np.allclose(out[2], p[2])


def _cands(probs, names=None):
    names = names or [f"u{i}" for i in range(len(probs))]
    return pd.DataFrame(probs, columns=CLASSES).assign(filename=names)[["filename", *CLASSES]]


def test_selection_threshold_balance_targets_and_weights():
    probs = np.array([[0.95, 0.05, 0], [0.9, 0.1, 0], [0.8, 0.2, 0], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    cands = _cands(probs)
    sel, summary = select(cands, CLASSES, Selection(threshold=0.85))
    assert list(sel["filename"]) == ["u0", "u1"] and (sel[CLASSES].to_numpy() == [[1, 0, 0], [1, 0, 0]]).all()
    assert list(summary["kept"]) == [2, 0, 0] and list(summary["candidates"]) == [3, 1, 1]
    # Excluded clips (validation sessions) are never kept, whatever their confidence.
    sel, _ = select(cands, CLASSES, Selection(threshold=0.0), exclude=np.array([True, False, False, False, False]))
    assert "u0" not in set(sel["filename"])
    # Adaptive: classes b and c have mean confidence 0.6 against a's 0.883, so their bar drops
    # below 0.6 while a's stays at 0.85 (u2 at 0.8 is still out).
    sel, summary = select(cands, CLASSES, Selection(threshold=0.85, adaptive=True))
    assert summary.loc[0, "threshold"] == pytest.approx(0.85)
    assert summary.loc[1, "threshold"] == pytest.approx(0.85 * 0.6 / (2.65 / 3))
    assert set(sel["filename"]) == {"u0", "u1", "u3", "u4"}
    # Balance: every class capped at the rarest kept class's count, most confident first.
    sel, summary = select(cands, CLASSES, Selection(threshold=0.5, balance=True))
    assert list(summary["kept"]) == [1, 1, 1] and set(sel["filename"]) == {"u0", "u3", "u4"}
    # Soft targets, confidence weights, the run's weight.
    sel, _ = select(cands, CLASSES, Selection(threshold=0.85, targets="soft", confidence_weight=True, weight=0.5))
    assert np.allclose(sel[CLASSES].to_numpy(), probs[:2]) and np.allclose(sel["weight"], [0.475, 0.45])


def test_candidates_are_checked(prepared, tmp_path):
    m = prepared.manifest
    classes = prepared.info["classes"]
    unl = list(m.loc[m["subset"] == "unlabelled", "filename"][:2])
    lab = m.loc[m["subset"] == "labelled", "filename"].iloc[0]
    probs = np.full((4, len(classes)), 1 / len(classes))
    probs[1, 0] = np.nan
    path = tmp_path / "c.csv"
    pd.DataFrame(probs, columns=classes).assign(filename=[unl[0], unl[1], lab, unl[0]]).to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        read_candidates(path, m, classes)
    text = str(err.value)
    assert "c.csv:3: probabilities are not a distribution" in text
    assert f"c.csv:4: {lab!r} is not an unlabelled development clip" in text
    assert f"clip(s) listed twice: [{unl[0]!r}]" in text
    with pytest.raises(DataError, match="no such file"):
        read_candidates(tmp_path / "none.csv", m, classes)


def test_the_final_ensemble_is_the_best_validated_one_or_its_refit():
    from raysc.experiment import Ensemble, final_ensemble

    def ens(name, acc, refit_of=None):
        return Ensemble(name, "topk", (), 0, "d", 1.0, False, {"macro_accuracy": acc}, refit_of)

    a, b = ens("a", 0.5), ens("b", 0.7)
    assert final_ensemble([a, b]) is b
    b_refit = ens("b-refit", 0.7, refit_of="b")
    assert final_ensemble([a, b, b_refit]) is b_refit
    assert final_ensemble([a, ens("a-refit", 0.5, refit_of="a"), b]) is b  # a refit never outranks by itself
    # Ranked by the objective (macro accuracy mixed with the city-held-out score) where it exists.
    c = Ensemble("c", "topk", (), 0, "d", 1.0, False, {"macro_accuracy": 0.8, "score": 0.6})
    d = Ensemble("d", "topk", (), 0, "d", 1.0, False, {"macro_accuracy": 0.7, "score": 0.65})
    assert final_ensemble([c, d]) is d
