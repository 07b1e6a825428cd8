"""Pretrained trunks: raysc's aisfx network and front end give the original package's numbers; its
weights come from the package index, checked against their pinned hash; a trunk member trains a
head on the cached embedding with the trunk frozen; without the index the pipeline leaves the
member out and says why."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from raysc import trunks
from raysc.budget import Budget
from raysc.datafolder import PreparedData, load_dataset
from raysc.errors import RayscError
from raysc.experiment import Experiment
from raysc.feature_cache import CACHE_DIR, FeatureCache
from raysc.frontend import FRONTENDS
from raysc.metadata import TIME_FEATURES
from raysc.models import load_model
from raysc.pipeline import PipelineConfig
from raysc.pipeline.stages import Context, Trunks, trunk_members
from raysc.pipeline.state import PipelineState
from raysc.search_space import Resources, load_search_space
from raysc.train import fit
from raysc.trunks.aisfx import AisfxEmbedding

SR = 44100

# Computed once with the aisfx 0.1.2 package's own code on the signal below: its Essentia front
# end (essentia 2.1b6.dev1389: FrameCutter 2048/1024, Windowing hann, Spectrum, MelBands 96 htkMel
# warping unit_sum power, log10(1e4 x + 1)) and its EmbeddingNet with the published weights, on
# the spectrogram divided by 9.457798957824707 in blocks of 100 frames every 50.
REF_FRAMES = 217
REF_LOGMEL_MEAN = 1.1459221
REF_LOGMEL = [  # frames 0, 50, ..., 200; bands 0, 24, 48, 72 (before the division)
    [6.2737, 4.20359, 3.53974, 1.10705],
    [0.302, 0.02375, 0.01534, 0.0],
    [0.31061, 0.02581, 0.02024, 0.0],
    [0.7203, 0.7027, 1.80698, 0.0327],
    [0.27243, 0.0268, 0.0, 4.62952],
]
REF_BLOCKS = [  # the first 6 of 512 values of each block's embedding
    [2.2961, 1.62711, 1.45824, 0.68427, 2.08773, 4.89588],
    [1.9813, 0.64669, 1.61812, 0.38981, 1.95844, 4.95827],
    [1.98297, 1.33353, 1.91045, 0.41373, 1.22304, 5.49588],
]
REF_BLOCK_MEAN = [1.96397, 1.89297, 1.8651]
REF_BLOCK_STD = [1.47581, 1.43689, 1.45399]


def _signal(seconds: float = 5.0) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * (200 + 900 * t) * t)
    x += 0.05 * np.sin(2 * np.pi * 3000 * t) * (t % 1.0 < 0.5)
    x += 0.02 * np.sin(1e5 * t**2)
    return x.astype(np.float32)


def test_the_aisfx_trunk_gives_the_original_packages_numbers():
    net = AisfxEmbedding(SR).eval()
    trunks.load_pretrained(net, "aisfx")  # fetched into the user's cache on first use
    wave = torch.from_numpy(_signal())[None]
    with torch.no_grad():
        logmel = net.logmel(wave)[0].numpy() * net.cfg.input_max
        blocks = net.block_embeddings(wave)[0].numpy()
        clip = net(wave)[0].numpy()
    assert logmel.shape == (REF_FRAMES, 96)
    np.testing.assert_allclose(logmel[::50, ::24], REF_LOGMEL, atol=2e-3)
    assert logmel.mean() == pytest.approx(REF_LOGMEL_MEAN, abs=1e-4)
    assert blocks.shape == (3, 512)
    np.testing.assert_allclose(blocks[:, :6], REF_BLOCKS, atol=2e-3)
    np.testing.assert_allclose(blocks.mean(axis=1), REF_BLOCK_MEAN, atol=1e-3)
    np.testing.assert_allclose(blocks.std(axis=1), REF_BLOCK_STD, atol=1e-3)
    # A clip's embedding: the blocks' mean, then their standard deviation.
    np.testing.assert_allclose(clip, np.concatenate([blocks.mean(0), blocks.std(0)]), rtol=1e-5, atol=1e-6)


def test_a_cached_file_that_is_not_the_pinned_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSC_CACHE", str(tmp_path))
    path = trunks.weights_path("aisfx")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the weights")
    with pytest.raises(RayscError, match=r"not the pinned aisfx weights \(SHA-256 differs\); delete it to fetch again"):
        trunks.load_weights("aisfx")


def _no_index(monkeypatch, tmp_path) -> None:
    """pip with no package index and nothing to find: as on a machine that cannot reach one."""
    monkeypatch.setenv("RAYSC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))


def test_a_trunk_that_cannot_be_fetched_is_one_line_naming_the_package(tmp_path, monkeypatch):
    _no_index(monkeypatch, tmp_path)
    said = []
    with pytest.raises(trunks.TrunkUnavailable, match=r"the aisfx trunk: `pip download aisfx==0.1.2` failed \(.+\)$"):
        trunks.fetch("aisfx", progress=said.append)
    assert said == [
        "fetching the aisfx trunk's weights: aisfx/models/checkpoint.pth from aisfx==0.1.2 on the package index"
    ]
    assert not trunks.weights_path("aisfx").exists()


def _context(data: PreparedData, exp: Path, lines: list[str], budget: Budget) -> Context:
    """The pipeline's context for the trunks stage: the default space, one CPU per trial on a
    2-CPU machine (given, so that nothing starts Ray before the stage needs it)."""
    exp = Experiment(exp)
    res = Resources(workers=1, gpus_per_worker=0.0, cpus_per_worker=1.0)
    return Context(
        cfg=PipelineConfig(),
        exp=exp,
        dataset=data,
        data=str(data.out),
        budget=budget,
        state=PipelineState(exp, {}, {}),
        address=None,
        say=lines.append,
        space=load_search_space("default"),
        crossfit=0,
        _cluster=({"CPU": 2.0}, res),
    )


def test_without_the_index_the_pipeline_leaves_the_trunk_member_out_and_says_why(prepared, tmp_path, monkeypatch):
    _no_index(monkeypatch, tmp_path)
    space = load_search_space("default")
    assert trunk_members(space) == {"aisfx": "aisfx"}  # the default uses the trunk
    lines = []
    ctx = _context(prepared, tmp_path / "exp", lines, Budget(None))
    stage = Trunks()
    record = stage.run(ctx)
    stage.apply(ctx, record)
    assert record["kept"] == [] and set(record["left_out"]) == {"aisfx"}
    assert any(
        line.startswith("[pipeline] trunks: the aisfx trunk: `pip download aisfx==0.1.2` failed (")
        and line.endswith("; the pipeline runs without aisfx")
        for line in lines
    ), lines
    assert "aisfx" not in ctx.space.backbones and set(ctx.space.backbones) == set(space.backbones) - {"aisfx"}
    assert all(p.get("backbone") != "aisfx" for p in ctx.space.start)


def _from_wave_and_cache(model, prepared: PreparedData, cache: FeatureCache) -> tuple[torch.Tensor, torch.Tensor]:
    """A saved trunk member's logits for six clips, computed from their waveforms and read from
    the trunk's cached embedding."""
    names = prepared.store.filenames[:6]
    wave = torch.from_numpy(prepared.store.load(names))
    city, time = torch.zeros(len(names), dtype=torch.long), torch.zeros(len(names), len(TIME_FEATURES))
    with torch.no_grad():
        return model(wave, city, time), model(wave, city, time, spec=torch.from_numpy(cache.load(names)))


def test_a_trunk_member_trains_its_head_on_the_cached_embedding_with_the_trunk_frozen(prepared_with_aisfx, tmp_path):
    prepared = prepared_with_aisfx
    cfg = dataclasses.replace(
        tiny_config(backbone="aisfx", model={}, epochs=2, lr=1e-2), spec_augment=1, mixup_alpha=0.2
    )
    out = tmp_path / "run"
    fit(cfg, prepared.out, out_dir=out)
    model = load_model(out / "model.pt")
    published = AisfxEmbedding(prepared.store.spec.sample_rate)
    trunks.load_pretrained(published, "aisfx")
    # The trunk kept its published weights and batch-norm statistics; only the head learnt.
    for name, tensor in published.state_dict().items():
        assert torch.equal(model.frontend.trunk.state_dict()[name], tensor), name
    # The embedding of every clip was cached once, [clips, 1, 1024], and the saved model (its
    # trunk included) gives the same probabilities from the waveform as from the cache.
    cache = FeatureCache.existing(prepared.out, prepared.store, model.cfg.frontend)
    assert cache is not None and cache.features.shape == (len(prepared.store), 1, 1024)
    from_wave, from_cache = _from_wave_and_cache(model, prepared, cache)
    torch.testing.assert_close(from_wave, from_cache, rtol=1e-4, atol=1e-4)


def test_a_fine_tuned_trunk_trains_from_the_published_weights_on_waveforms(prepared_with_aisfx, tmp_path):
    prepared = prepared_with_aisfx
    cfg = tiny_config(backbone="aisfx_ft", model={}, epochs=1, lr=1e-2, trunk_lr_scale=0.1, time_shift=0.1)
    out = tmp_path / "run"
    fit(cfg, prepared.out, out_dir=out)
    model = load_model(out / "model.pt")
    published = AisfxEmbedding(prepared.store.spec.sample_rate)
    trunks.load_pretrained(published, "aisfx")
    trained, start = model.frontend.trunk.state_dict(), published.state_dict()
    # It started from the published weights and moved from them (a random start would be far
    # off; a frozen trunk, equal), while its batch norms kept their pretrained statistics.
    for name in ("net.conv_block1.conv1.weight", "net.conv_block4.conv2.weight"):
        moved = (trained[name] - start[name]).norm() / start[name].norm()
        assert 0 < moved < 0.5, (name, float(moved))
    for name in ("net.conv_block1.bn1.running_mean", "net.conv_block4.bn2.running_var"):
        assert torch.equal(trained[name], start[name]), name
    # Its input is the waveform: the cached (frozen) embedding gives other probabilities.
    cache = FeatureCache.existing(
        prepared.out, prepared.store, FRONTENDS["aisfx"].at_rate(prepared.store.spec.sample_rate)
    )
    from_wave, from_frozen = _from_wave_and_cache(model, prepared, cache)
    assert not torch.allclose(from_wave, from_frozen, atol=1e-4)


def test_the_trunks_stage_makes_a_fine_tuned_member_ready_without_embedding_a_clip(prepared, tmp_path):
    # A copy of the data folder without feature caches: the stage must not build one.
    shutil.copytree(prepared.out, tmp_path / "data", ignore=shutil.ignore_patterns(CACHE_DIR))
    prepared = load_dataset(tmp_path / "data")
    lines = []
    ctx = _context(prepared, tmp_path / "exp", lines, Budget(None))
    ctx.space = load_search_space("aisfx_ft")
    assert trunk_members(ctx.space) == {"aisfx_ft": "aisfx"}
    stage = Trunks()
    record = stage.run(ctx)
    stage.apply(ctx, record)
    assert record == {"kept": ["aisfx_ft"], "left_out": {}} and set(ctx.space.backbones) == {"aisfx_ft"}
    assert "[pipeline] trunks: aisfx_ft: fine-tunes the aisfx trunk; its weights are here" in lines
    assert not (prepared.out / CACHE_DIR).exists() or not any((prepared.out / CACHE_DIR).iterdir())


def test_a_trunk_whose_embedding_would_take_too_much_of_the_budget_is_left_out(local_ray, prepared, tmp_path):
    # A copy of the data folder without feature caches (another test may have embedded its clips).
    shutil.copytree(prepared.out, tmp_path / "data", ignore=shutil.ignore_patterns(CACHE_DIR))
    prepared = load_dataset(tmp_path / "data")
    lines = []
    ctx = _context(prepared, tmp_path / "exp", lines, Budget(0.01, clock=lambda: 0.0))  # 0.6 s left, never less
    stage = Trunks()
    record = stage.run(ctx)
    stage.apply(ctx, record)
    assert record["kept"] == [] and "aisfx" not in ctx.space.backbones
    said = [line for line in lines if line.startswith("[pipeline] trunks: aisfx: its embedding of ")]
    assert said and re.search(
        rf"of {len(prepared.store)} clips would take about \d+\.\d min here, more than 25% of the 0\.0 min left; "
        "the pipeline runs without aisfx$",
        said[0],
    ), lines
    # Nothing was built: the estimate came from a few clips.
    frontend = FRONTENDS["aisfx"].at_rate(prepared.store.spec.sample_rate)
    assert FeatureCache.existing(prepared.out, prepared.store, frontend) is None


def test_an_unknown_trunk_or_a_head_without_one_is_refused_by_name():
    from raysc.errors import ConfigError
    from raysc.frontend import FrontendConfig
    from raysc.models import create_model

    with pytest.raises(ConfigError, match=r"unknown trunk 'panns' \(valid: aisfx\)"):
        FrontendConfig(trunk="panns")
    with pytest.raises(ConfigError, match=r"aisfx: a trunk head needs a front end with a trunk \(frontend.trunk\)"):
        create_model("aisfx", frontend={"trunk": None})
    with pytest.raises(ConfigError, match=r"^trunk_trainable fine-tunes a trunk: the front end has no trunk$"):
        FrontendConfig(trunk_trainable=True)
    with pytest.raises(ConfigError, match=r"aisfx: fine-tuning the trunk is aisfx_ft; aisfx reads its frozen, cached"):
        create_model("aisfx", frontend={"trunk_trainable": True})
    with pytest.raises(ConfigError, match=r"aisfx_ft: aisfx_ft fine-tunes its trunk \(frontend.trunk_trainable\); the"):
        create_model("aisfx_ft", frontend={"trunk_trainable": False})
    with pytest.raises(
        ConfigError, match=r"aisfx_ft.frontend: city_centred is applied to a cached embedding; a trainable trunk.s is"
    ):
        create_model("aisfx_ft", frontend={"city_centred": True})


def test_a_city_centred_embedding_takes_out_each_citys_own_mean_and_inference_reads_it(prepared_with_aisfx, tmp_path):
    from raysc.inference import predict_clips

    prepared = prepared_with_aisfx
    frontend = FRONTENDS["aisfx"].at_rate(prepared.store.spec.sample_rate)
    raw = FeatureCache.existing(prepared.out, prepared.store, dataclasses.replace(frontend, city_centred=False))
    centred = FeatureCache.existing(prepared.out, prepared.store, dataclasses.replace(frontend, city_centred=True))
    assert raw is not None and centred is not None and centred.path == raw.path  # one cache, centred on reading
    m = prepared.manifest
    eval_only = set(m.loc[m["subset"] == "eval", "city"]) - set(m.loc[m["subset"] != "eval", "city"])
    assert eval_only  # each eval-only city is centred by its own mean, not merged into <unk>
    for _, rows in m.groupby("city"):
        names = list(rows["filename"])
        embedding = raw.load(names)
        np.testing.assert_allclose(centred.load(names), embedding - embedding.mean(0), atol=1e-5)
    # A centred member trains on the centred embedding, and raysc's inference feeds it the same.
    cfg = tiny_config(backbone="aisfx", model={"frontend": {"city_centred": True}}, epochs=1, lr=1e-2)
    fit(cfg, prepared.out, out_dir=tmp_path / "run")
    model = load_model(tmp_path / "run" / "model.pt").eval()
    assert model.cfg.frontend.city_centred
    names = list(m.loc[m["city"].isin(eval_only), "filename"][:3]) + list(
        m.loc[m["subset"] == "labelled", "filename"][:3]
    )
    rows = m.set_index("filename").loc[names]
    city = torch.from_numpy(rows["city_idx"].to_numpy().copy())
    time = torch.from_numpy(rows[list(TIME_FEATURES)].to_numpy(np.float32))
    wave = torch.from_numpy(prepared.store.load(names))
    with torch.no_grad():
        expected = torch.softmax(model(wave, city, time, spec=torch.from_numpy(centred.load(names))), 1)
        uncentred = torch.softmax(model(wave, city, time, spec=torch.from_numpy(raw.load(names))), 1)
    got = predict_clips(tmp_path / "run" / "model.pt", prepared, names)[prepared.classes].to_numpy()
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    assert not np.allclose(got, uncentred.numpy(), atol=1e-3)


def test_city_centring_without_a_trunk_or_without_the_feature_cache_is_refused(prepared):
    from raysc.errors import ConfigError
    from raysc.frontend import FrontendConfig
    from raysc.train import check_inputs

    with pytest.raises(ConfigError, match=r"city_centred applies to a trunk's embedding: the front end has no trunk"):
        FrontendConfig(city_centred=True)
    cfg = tiny_config(backbone="aisfx", model={"frontend": {"city_centred": True}}, cache_features=False)
    with pytest.raises(
        ConfigError, match=r"aisfx: its front end's city_centred embedding is read from the feature cache"
    ):
        check_inputs(cfg, prepared.out)
