"""The backbone zoo: one parametrised test per behaviour over the whole registry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import FRONTEND, SR

from raysc.errors import ConfigError, RayscError
from raysc.metadata import CLASSES, UNK_CITY, city_indices
from raysc.models import FUSIONS, count_macs, count_parameters, create_model, list_models, load_model, save_model

SMALL_FRONTEND = FRONTEND
# Tiny variants: the same networks at a fraction of the width, on 1 s of 8 kHz audio.
TINY = {
    "setrans": {"width": 0.25, "frontend": SMALL_FRONTEND},
    "resnet_cbam": {"width": 0.125, "depths": [1, 1, 1, 1], "frontend": SMALL_FRONTEND},
    "mobileascnet": {"width": 0.25, "frontend": SMALL_FRONTEND},
    "ascmamba": {"width": 0.125, "blocks": 1, "expand": 2, "frontend": {**SMALL_FRONTEND, "n_mels": 16}},
    "rm3": {"width": 0.25, "wavegram_kernel": 256, "gdc_size": [2, 4], "frontend": SMALL_FRONTEND},
    "stats": {"width": 0.25, "frontend": SMALL_FRONTEND, "modulation": True},  # as the default spaces set it
    "cnn10": {"width": 0.125, "frontend": SMALL_FRONTEND},
    "cnn14": {"width": 0.0625, "frontend": SMALL_FRONTEND},
    "aisfx": {"width": 0.25, "frontend": SMALL_FRONTEND},  # the trunk keeps its size and resamples to 44.1 kHz
    "aisfx_ft": {"width": 0.25, "frontend": SMALL_FRONTEND},  # the same trunk, trainable
}
# Parameter counts of the papers (RM3: 874k reported; ASCMamba: no published size, ours).
PAPER_PARAMS = {"setrans": 0.36e6, "resnet_cbam": 21.6e6, "mobileascnet": 0.37e6, "rm3": 0.874e6}
# PANNs as published (with their 527-class AudioSet classifier; raysc's head takes its place).
PAPER_PARAMS |= {"cnn10": 4.96e6, "cnn14": 80.75e6}


def test_registry_names_every_backbone():
    expected = ["aisfx", "aisfx_ft", "ascmamba", "cnn10", "cnn14", "mobileascnet", "resnet_cbam", "rm3", "setrans"]
    expected += ["stats"]
    assert list_models() == expected
    assert set(TINY) == set(list_models())


def tiny(name: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, **{**TINY[name], **extra})


def batch(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, SR, generator=g) * 0.1, torch.tensor([1, 2, 3][:n]), torch.randn(n, 7, generator=g)


@pytest.fixture(params=list_models())
def name(request) -> str:
    return request.param


def test_forward_backward_shapes_and_metadata_gradients(name):
    model = tiny(name).train()
    wave, city, time = batch()
    target = torch.eye(len(CLASSES))[[0, 4, 9]]
    logits = model(wave, city, time, target)
    assert logits.shape == (3, len(CLASSES)) and torch.isfinite(logits).all()
    emb = model.forward_features(wave, city, time)
    assert emb.ndim == 2 and emb.shape[0] == 3
    torch.nn.functional.cross_entropy(logits, target).backward()
    assert model.meta.city.weight.grad[city].abs().sum() > 0
    assert model.meta.city.weight.grad[5:].abs().sum() == 0  # cities not in the batch
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.meta.time.parameters())


def test_a_backbone_without_embed_audio_or_embed_is_refused_where_it_is_defined():
    from raysc.models.base import ASCModel

    with pytest.raises(TypeError, match="NoTrunk must define embed_audio"):

        class NoTrunk(ASCModel):
            pass


@pytest.mark.parametrize("fusion", ["concat", "film"])
def test_logits_per_city_equal_one_forward_per_city(name, fusion):
    """Validation scores each clip with its city and with <unk> through one trunk pass; the
    logits must be the ones a forward per city gives (ASCMamba's FiLM blocks take the city)."""
    model = tiny(name, fusion=fusion).eval()
    wave, city, time = batch()
    unk = torch.zeros_like(city)
    with torch.no_grad():
        own, withheld = model.logits_per_city(wave, [city, unk], time)
        torch.testing.assert_close(own, model(wave, city, time))
        torch.testing.assert_close(withheld, model(wave, unk, time))
    assert not torch.allclose(own, withheld)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_logits_follow_city_and_time_unless_fusion_is_none(name, fusion):
    model = tiny(name, fusion=fusion).eval()
    wave, city, time = batch()
    with torch.no_grad():
        base = model(wave, city, time)
        other_city = model(wave, city + 3, time)
        other_time = model(wave, city, time + 1.0)
    if fusion == "none":
        assert torch.equal(base, other_city) and torch.equal(base, other_time)
    else:
        assert not torch.allclose(base, other_city) and not torch.allclose(base, other_time)


def test_unseen_city_goes_to_unk(name):
    model = tiny(name).eval()
    idx, unknown = city_indices(["Jinan", "Atlantis", UNK_CITY], model.cfg.cities)
    assert idx.tolist() == [model.cfg.cities.index("Jinan"), 0, 0] and unknown == 1
    wave, _, time = batch(2)
    with torch.no_grad():
        atlantis = model(wave, torch.from_numpy(idx[[1, 1]]), time)
        unk = model(wave, torch.zeros(2, dtype=torch.long), time)
    assert torch.equal(atlantis, unk)


def test_city_dropout_trains_the_unk_embedding(name):
    model = tiny(name, meta={"city_dropout": 1.0}).train()
    wave, city, time = batch()
    model(wave, city, time, torch.eye(len(CLASSES))[[0, 1, 2]]).sum().backward()
    grad = model.meta.city.weight.grad
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0


def test_unseen_rooms_show_training_clips_as_from_an_unknown_city(name, monkeypatch):
    from raysc.models import base

    if name in ("aisfx", "aisfx_ft"):  # a random room acts on a log-mel; a trunk head reads the trunk's embedding
        with pytest.raises(ConfigError, match=rf"{name}: unseen_rooms acts on a log-mel; a trunk head's input is"):
            tiny(name, unseen_rooms=1.0)
        return
    model = tiny(name, unseen_rooms=1.0).train()
    wave, city, time = batch()
    outs = []
    for c in (city, torch.zeros_like(city)):
        torch.manual_seed(0)  # the same rooms (and dropout) for both calls
        outs.append(model(wave, c, time, torch.eye(len(CLASSES))[[0, 1, 2]]))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)  # every clip was shown as <unk>
    # The moved clips' log-mel is the room's: here a stand-in room that mirrors the bands.
    monkeypatch.setattr(base, "random_rooms", lambda s, cfg: s.flip(-1))
    spec, unk = model.frontend.features(wave), torch.zeros_like(city)
    plain = tiny(name).train()
    plain.load_state_dict(model.state_dict())

    def run(net: torch.nn.Module, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)
        if net is plain:
            torch.rand(city.shape)  # the draw that picks the moved clips, so dropout draws the same
        return net(wave, c, time, spec=s)

    moved = run(model, city, spec)
    assert torch.allclose(moved, run(plain, unk, spec.flip(-1)), atol=1e-5)
    assert not torch.allclose(moved, run(plain, unk, spec), atol=1e-3)
    # Inference never moves a clip: the same as the same weights (and BatchNorm statistics)
    # without unseen rooms.
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(wave, city, time), plain.eval()(wave, city, time))
    with pytest.raises(ConfigError, match=r"unseen_rooms must be in \[0, 1\], got 1.5"):
        tiny(name, unseen_rooms=1.5)


def test_save_load_gives_identical_outputs(name, tmp_path):
    model = tiny(name).eval()
    save_model(model, tmp_path / "m.pt", metrics={"macro_accuracy": 0.5}, fold=2)
    loaded = load_model(tmp_path / "m.pt")
    wave, city, time = batch()
    with torch.no_grad():
        assert torch.equal(model(wave, city, time), loaded(wave, city, time))
    assert loaded.cfg == model.cfg and type(loaded) is type(model)
    assert loaded.artefact["metrics"] == {"macro_accuracy": 0.5} and loaded.artefact["info"] == {"fold": 2}
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["backbone"] == name and raw["classes"] == list(CLASSES) and raw["cities"][0] == UNK_CITY
    assert raw["frontend"]["sample_rate"] == SR and "torch" in raw["versions"]


@pytest.mark.slow
def test_paper_sized_parameter_counts(name):
    params = count_parameters(create_model(name))
    if name in PAPER_PARAMS:
        assert abs(params - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.10, params
    elif name == "stats":
        assert params < 0.2e6, params  # a small MLP on 448 statistics, not a network
    elif name in ("aisfx", "aisfx_ft"):  # the published trunk (4.69 M) and a head of about 0.3 M
        trunk = count_parameters(create_model(name).frontend.trunk)
        assert abs(trunk - 4.69e6) / 4.69e6 < 0.01 and params - trunk < 0.5e6, (trunk, params)
    else:
        assert 0.5e6 < params < 3e6, params  # ASCMamba at C 64, 4 blocks, expand 4


def test_width_multiplier_shrinks_the_network(name):
    assert count_parameters(tiny(name)) < count_parameters(create_model(name, **{**TINY[name], "width": 1.0}))


def test_macs_are_counted(name):
    small = count_macs(tiny(name), seconds=1.0)
    longer = count_macs(tiny(name), seconds=4.0)  # aisfx: 2 blocks of 2.3 s instead of 1
    assert 0 < small < longer


def test_bad_overrides_are_named():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['widht'\] for setrans \(valid: .*width"):
        create_model("setrans", widht=0.5)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['city_drop'\] for setrans.meta"):
        create_model("setrans", **{"meta.city_drop": 0.1})
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet' \(valid: aisfx, aisfx_ft, ascmamba, cnn10,"):
        create_model("resnet")
    with pytest.raises(ConfigError, match="unknown fusion 'sum'"):
        create_model("setrans", fusion="sum")
    with pytest.raises(ConfigError, match="must start with '<unk>'"):
        create_model("setrans", cities=["Jinan"])


def test_load_model_rejects_other_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(RayscError, match="not a readable raysc model file"):
        load_model(tmp_path / "junk.pt")
    torch.save({"format": 99}, tmp_path / "other.pt")
    with pytest.raises(RayscError, match="not a raysc model file of format 1"):
        load_model(tmp_path / "other.pt")


def test_paper_defaults():
    assert create_model("mobileascnet").cfg.fusion == "gated"
    assert create_model("ascmamba").cfg.fusion == "film"
    rm3 = create_model("rm3").cfg
    assert (rm3.frontend.sample_rate, rm3.frontend.n_mels, rm3.frontend.mel_scale) == (16000, 128, "htk")
    assert (rm3.arcface_scale, rm3.arcface_margin) == (8.0, 0.2)
    base = create_model("setrans").cfg
    assert dataclasses.asdict(base.frontend)["hop_length"] == 882 and len(base.cities) == 23
    assert np.isclose(create_model("resnet_cbam").cfg.fusion_dropout, 0.3)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_band_statistics_match_torch_reductions(requires_grad):
    """The fast path (numpy's sort for a plain CPU tensor) and the autograd path both give
    mean, std, linearly interpolated quantiles and delta statistics over time, per band."""
    from raysc.models.stats import band_statistics

    spec = (torch.randn(3, 1, 57, 8, generator=torch.Generator().manual_seed(0)) * 10 - 40).requires_grad_(
        requires_grad
    )
    got = band_statistics(spec, (0.1, 0.5, 0.9), deltas=True)
    x = spec.detach().squeeze(1)  # [B, T, F]
    d = x[:, 1:] - x[:, :-1]
    expected = torch.cat(
        [
            x.mean(1),
            x.std(1, unbiased=False),
            *torch.quantile(x, torch.tensor([0.1, 0.5, 0.9]), dim=1),
            d.abs().mean(1),
            d.std(1, unbiased=False),
        ],
        dim=-1,
    )
    assert got.shape == (3, 8 * 7) and got.requires_grad == requires_grad
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-4)


def _modulated_bands(rate: float, frames: int, hz: dict[int, float], seed: int = 0) -> torch.Tensor:
    """[1, 1, T, 8] log-mel-like input: noise, plus a sinusoidal level swing at ``hz[band]``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(frames) / rate
    spec = torch.randn(1, 1, frames, 8, generator=g) * 0.5 - 40
    for band, f in hz.items():
        spec[0, 0, :, band] += 6 * torch.sin(2 * torch.pi * f * t)
    return spec


def test_modulation_energies_find_the_modulation_rate_and_ignore_a_band_gain():
    from raysc.models.stats import modulation_energies

    rate, edges = 50.0, (0.5, 1.5, 3.0, 6.0, 12.0, 24.0)
    spec = _modulated_bands(rate, 500, {2: 4.0, 5: 0.8})  # babble-like 4 Hz, pass-by-like 0.8 Hz
    got = modulation_energies(spec, edges, groups=8, frame_rate=rate).reshape(5, 8).T  # [group, band]
    assert got[2].argmax() == 2  # 4 Hz lies in 3-6 Hz
    assert got[5].argmax() == 0  # 0.8 Hz lies in 0.5-1.5 Hz
    assert (got[2, 2] - got[0, 2]) > 2.0  # far above an unmodulated band's noise (log scale)
    # A device or room that scales each band by a constant adds a constant to its log-mel.
    gain = torch.linspace(-12, 12, 8)
    torch.testing.assert_close(modulation_energies(spec + gain, edges, 8, rate).reshape(5, 8).T, got, atol=1e-3, rtol=0)


def test_modulation_energies_of_a_clip_too_short_for_a_band_stay_finite():
    from raysc.models.stats import modulation_energies

    spec = _modulated_bands(50.0, 12, {0: 4.0})  # 0.24 s: bins 4.2 Hz apart, none in 0.5-1.5 Hz
    got = modulation_energies(spec, (0.5, 1.5, 3.0), groups=4, frame_rate=50.0)
    assert got.shape == (1, 4 * 2) and torch.isfinite(got).all()


@pytest.mark.parametrize("groups", [2, 4, 8, 16, 3, 5])  # 3 and 5 do not divide 16 bands
def test_modulation_groups_pool_as_adaptive_pooling_does(groups):
    from raysc.models.stats import _pool_groups

    x = torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(0)) * 10 - 40
    torch.testing.assert_close(_pool_groups(x, groups), torch.nn.functional.adaptive_avg_pool1d(x, groups))


def test_bad_modulation_settings_are_named():
    with pytest.raises(ConfigError, match=r"modulation_edges reach 40.0 Hz, above the front end's frame-rate Nyquist"):
        create_model("stats", modulation=True, modulation_edges=[1.0, 40.0])
    with pytest.raises(ConfigError, match=r"modulation_edges must be at least two increasing values"):
        create_model("stats", modulation=True, modulation_edges=[3.0, 1.0])
    with pytest.raises(ConfigError, match=r"modulation_groups must be in \[1, n_mels=64\], got 65"):
        create_model("stats", modulation=True, modulation_groups=65)
    # Off, the edges are not checked against the front end (nothing uses them).
    assert not create_model("stats", modulation_edges=[1.0, 40.0]).cfg.modulation
