"""Frame codebooks: k-means without labels, never on a validation session, fitted once, and the
bag-of-frames histogram that `stats` builds from them."""

from __future__ import annotations

import pytest
import torch
from conftest import FRONTEND, tiny_config

from raysc import codebook as cb
from raysc.datafolder import load_dataset
from raysc.errors import ConfigError
from raysc.feature_cache import FeatureCache
from raysc.frontend import FrontendConfig
from raysc.models import create_model, load_model
from raysc.models.stats import frame_histogram
from raysc.train import fit


def test_kmeans_finds_separated_clusters_and_refills_an_empty_one():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([m + 0.3 * torch.randn(200, 2, generator=g) for m in means])
    c = cb.kmeans(x, 3, seed=1)
    # Every true mean has a centroid within noise of it (in some order).
    assert torch.cdist(means, c).min(1).values.max() < 0.2
    # Two identical rows and k = 2: one cluster empties and takes the row farthest from its centroid.
    duplicated = torch.tensor([[1.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    assert sorted(cb.kmeans(duplicated, 2).tolist()) == [[1.0, 1.0], [5.0, 5.0]]
    with pytest.raises(ValueError, match="k-means needs at least k=4 rows, got 3"):
        cb.kmeans(duplicated, 4)


def test_codebook_clips_leave_out_every_clip_of_a_validation_session(prepared):
    m = prepared.manifest
    clips = set(cb.codebook_clips(m, 0))
    val_sessions = set(m.loc[(m["subset"] == "labelled") & (m["fold"] == 0), "session"])
    held_out = m[m["session"].isin(val_sessions)]
    assert (held_out["subset"] == "unlabelled").any()  # the rule has unlabelled clips to leave out
    assert clips.isdisjoint(held_out["filename"])
    dev = m[m["subset"].isin(["labelled", "unlabelled"])]
    assert clips == set(dev.loc[~dev["session"].isin(val_sessions), "filename"])  # the rest, labelled or not
    assert set(cb.codebook_clips(m, -1)) == set(dev["filename"])  # no fold: every development clip, no eval


def test_frame_codebook_is_fitted_once_per_clip_set_and_k(prepared, monkeypatch):
    data = load_dataset(prepared.out)
    cache = FeatureCache.ensure(prepared.out, data.store, FrontendConfig(**FRONTEND))
    calls = []
    real = cb.kmeans
    monkeypatch.setattr(cb, "kmeans", lambda x, k, **kw: calls.append(len(x)) or real(x, k, **kw))
    clips = cb.codebook_clips(data.manifest, 1)
    first = cb.frame_codebook(cache, clips, 8)
    again = cb.frame_codebook(cache, list(reversed(clips)), 8)  # the same set: read back
    assert len(calls) == 1 and torch.equal(first, again) and first.shape == (8, FRONTEND["n_mels"])
    cb.frame_codebook(cache, clips[1:], 8)
    cb.frame_codebook(cache, clips, 4)
    assert len(calls) == 3
    # Fitted on the clips' frames minus each clip's mean: the centroids average to about zero.
    assert first.mean(0).abs().max() < 3.0 and first.abs().max() > 3.0


def test_frame_histogram_counts_frames_by_shape_not_by_gain():
    codebook = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # 6 frames around a clip mean of (-40, -50, -60): 3 like centroid 0, 2 like centroid 1, 1 flat.
    shapes = torch.tensor([[1.0, -1, 0], [1, -1, 0], [1, -1, 0], [-1, 1, 0], [-1, 1, 0], [0, 0, 0]])
    shapes = shapes - shapes.mean(0)
    spec = (shapes + torch.tensor([-40.0, -50, -60]))[None, None]
    shares = frame_histogram(spec, codebook).exp() - 1e-3
    torch.testing.assert_close(shares, torch.tensor([[3 / 6, 2 / 6, 1 / 6]]))
    # A device or room that scales each band by a constant changes nothing.
    torch.testing.assert_close(
        frame_histogram(spec + torch.tensor([12.0, -7.0, 3.0]), codebook), frame_histogram(spec, codebook)
    )


def test_fit_fits_the_codebook_on_its_training_sessions_and_saves_it(prepared, tmp_path):
    cfg = tiny_config(backbone="stats", model={"frontend": FRONTEND, "codebook": 8, "hidden": 16}, epochs=1)
    fit(cfg, prepared.out, out_dir=tmp_path / "run")
    saved = load_model(tmp_path / "run" / "model.pt")
    cache = FeatureCache.existing(prepared.out, prepared.store, saved.cfg.frontend)
    want = cb.frame_codebook(cache, cb.codebook_clips(prepared.manifest, 0), 8)
    torch.testing.assert_close(saved.codebook, want)
    assert saved.codebook.abs().sum() > 0
    # Another fold, another codebook; the same fold again, the same one (no label is involved).
    other = tiny_config(backbone="stats", model={"frontend": FRONTEND, "codebook": 8, "hidden": 16}, epochs=1, fold=1)
    fit(other, prepared.out, out_dir=tmp_path / "fold1")
    assert not torch.equal(load_model(tmp_path / "fold1" / "model.pt").codebook, want)


def test_a_pretrained_codebook_is_kept_and_stats_without_one_saves_none(prepared, tmp_path):
    base = {"frontend": FRONTEND, "codebook": 4, "hidden": 16}
    fit(tiny_config(backbone="stats", model=base, epochs=1), prepared.out, out_dir=tmp_path / "pre")
    pre = load_model(tmp_path / "pre" / "model.pt").codebook
    tuned = tiny_config(backbone="stats", model=base, epochs=1, fold=1, init_from=str(tmp_path / "pre" / "model.pt"))
    fit(tuned, prepared.out, out_dir=tmp_path / "tuned")
    torch.testing.assert_close(load_model(tmp_path / "tuned" / "model.pt").codebook, pre)
    assert "codebook" not in create_model("stats").state_dict()  # models saved before codebooks still load
    with_k = create_model("stats", frontend=FRONTEND, codebook=4).input_norm.num_features
    assert with_k == create_model("stats", frontend=FRONTEND).input_norm.num_features + 4


def test_a_negative_codebook_is_named():
    with pytest.raises(ConfigError, match=r"codebook must be >= 0 \(0: no bag of frames\), got -1"):
        create_model("stats", codebook=-1)
