"""Pretraining on the pretraining clips, fine-tuning from it, and weights from other code bases."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import FRONTEND

from raysc.cli import main
from raysc.config import make_config
from raysc.errors import ConfigError, RayscError
from raysc.models import create_model, load_model
from raysc.train import build_model, fit, make_optimizer
from raysc.weights import import_weights, read_state_dict

SMALL = {"model": {"width": 0.25, "frontend": FRONTEND}, "batch_size": 8, "lr": 3e-3}


def _pretrained(data, out):
    cfg = make_config({**SMALL, "backbone": "mobileascnet", "train_on": "pretrain", "epochs": 2})
    return fit(cfg, data.out, out_dir=out)


def test_pretraining_trains_on_the_pretraining_clips_and_records_its_label_set(with_pretrain, tmp_path):
    m = with_pretrain.manifest
    pre = m[m["subset"] == "pretrain"]
    result = _pretrained(with_pretrain, tmp_path / "pre")
    assert result.history[0]["train_clips"] == (pre["fold"] != 0).sum()  # no labelled or session-labelled clip
    val = pd.read_csv(tmp_path / "pre" / "val_predictions.csv")
    assert set(val["filename"]) == set(pre.loc[pre["fold"] == 0, "filename"])
    info = load_model(tmp_path / "pre" / "model.pt").artefact["info"]["pretrained"]
    trained = set(pre.loc[pre["fold"] != 0, "label"])
    assert info == {"subset": "pretrain", "classes": info["classes"], "clips": int((pre["fold"] != 0).sum())}
    assert set(info["classes"]) == trained
    assert "Construction site" not in info["classes"]  # nothing maps to it (the ALPS table)


def test_fine_tuning_copies_every_trunk_tensor_and_reinitialises_the_head(with_pretrain, tmp_path):
    _pretrained(with_pretrain, tmp_path / "pre")
    source = load_model(tmp_path / "pre" / "model.pt").state_dict()
    cfg = make_config(
        {**SMALL, "backbone": "mobileascnet", "init_from": str(tmp_path / "pre" / "model.pt"), "reset_head": True}
    )
    tuned = build_model(cfg, with_pretrain).state_dict()
    trunk = [k for k in tuned if not k.startswith("head.")]
    assert all(torch.equal(tuned[k], source[k]) for k in trunk)
    assert not torch.equal(tuned["head.weight"], source["head.weight"])


def test_frozen_tensors_stay_bit_identical_and_the_trunk_learns_at_its_own_rate(with_pretrain, tmp_path):
    _pretrained(with_pretrain, tmp_path / "pre")
    source = load_model(tmp_path / "pre" / "model.pt").state_dict()
    values = {**SMALL, "backbone": "mobileascnet", "init_from": str(tmp_path / "pre" / "model.pt")}
    cfg = make_config({**values, "reset_head": True, "freeze": ["blocks"], "epochs": 1})
    model = fit(cfg, with_pretrain.out).model
    params = dict(model.named_parameters())
    frozen = [k for k in params if k.startswith("blocks.")]
    assert frozen and all(torch.equal(params[k].detach(), source[k]) for k in frozen)
    assert not torch.equal(params["gru.weight_ih_l0"].detach(), source["gru.weight_ih_l0"])  # not frozen: trained
    # trunk_lr_scale: the head at lr, everything else at lr * scale.
    scaled = make_config({**values, "trunk_lr_scale": 0.1})
    opt = make_optimizer(scaled, build_model(scaled, with_pretrain))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([3e-4, 3e-3])


def test_pretraining_without_pretraining_clips_is_refused_by_name(prepared, tmp_path, caplog):
    cfg = make_config({**SMALL, "backbone": "mobileascnet", "train_on": "pretrain"})
    with pytest.raises(ConfigError, match="has no pretraining clips: prepare it with --tau and/or --cochlscene"):
        fit(cfg, prepared.out)
    out = tmp_path / "run"
    code = main(["pretrain", "--data", str(prepared.out), "--backbone", "stats", "--out", str(out)])
    assert code == 2 and "has no pretraining clips" in caplog.text and not out.exists()
    with pytest.raises(ConfigError, match="train_on 'pretrian' \\(valid: labelled, pretrain\\)"):
        make_config({"backbone": "stats", "train_on": "pretrian"})


def _baseline_named(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under another code base's names (and DataParallel's prefix), plus one
    it has and raysc does not (like the baseline's unused duplicate encoder layer)."""
    renamed = {}
    for k, v in state.items():
        if k.startswith("frontend."):
            continue  # the baseline computes its front end outside the network
        k = k.replace("blocks.", "conv_block").replace("encoder.", "transformer.").replace("head.", "fc_out.")
        renamed[f"module.{k}"] = v.clone()
    renamed["module.unused_layer.weight"] = torch.ones(3, 3)
    return renamed


def test_import_weights_maps_another_code_bases_names_by_name_and_shape(tmp_path, capsys):
    theirs = create_model("setrans", width=0.25)
    torch.nn.init.normal_(theirs.head.weight)  # not a default initialisation
    path = tmp_path / "SE-Trans_pretrained_model.pth"
    torch.save(_baseline_named(theirs.state_dict()), path)
    out = tmp_path / "imported.pt"
    argv = ["import-weights", str(path), "--backbone", "setrans", "--out", str(out), "--set", "width=0.25"]
    # Other names: refused unless pairing by order is asked for.
    assert main(argv) == 2 and not out.exists()
    assert main([*argv, "--match-by-order"]) == 0
    text = capsys.readouterr().out
    assert "by order and shape" in text and "unused_layer.weight" in text  # what did not fit is named
    assert "  head.weight <- fc_out.weight" in text.splitlines()  # every pair by order is printed
    imported = load_model(out)
    ours = imported.state_dict()
    for k, v in theirs.state_dict().items():
        if not k.startswith("frontend.") and not k.endswith("num_batches_tracked"):
            assert torch.equal(ours[k], v), k
    # The imported network computes what the source network computes.
    g = torch.Generator().manual_seed(0)
    wave, city, times = torch.randn(2, 16000, generator=g) * 0.1, torch.tensor([1, 2]), torch.randn(2, 7, generator=g)
    with torch.no_grad():
        assert torch.allclose(imported(wave, city, times), theirs.eval()(wave, city, times), atol=1e-5)
    with pytest.raises(RayscError, match=r"imported\.pt already exists; choose another --out"):
        import_weights(path, backbone="setrans", out=out, model={"width": 0.25}, by_order=True)
    report = import_weights(path, backbone="setrans", out=tmp_path / "again.pt", model={"width": 0.25}, by_order=True)
    assert report.unused == ["unused_layer.weight"] and report.missing == []


def test_import_weights_refuses_another_networks_weights(tmp_path, caplog):
    other = tmp_path / "resnet.pth"
    torch.save(create_model("resnet_cbam", width=0.25).state_dict(), other)
    with pytest.raises(
        ConfigError, match=r"resnet\.pth: only \d+ of the \d+ tensors of the setrans network match the file by name"
    ) as caught:
        import_weights(other, backbone="setrans", out=tmp_path / "a.pt", model={"width": 0.25})
    assert "most likely another network's weights" in str(caught.value) and "--match-by-order" in str(caught.value)
    # Asked to pair by order, it still does not fit: most of the network would be left as initialised.
    with pytest.raises(ConfigError, match=r"tensors of the setrans network fit the file, by name or by order and sha"):
        import_weights(other, backbone="setrans", out=tmp_path / "a.pt", model={"width": 0.25}, by_order=True)
    plain = tmp_path / "sequential.pth"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 10)).state_dict(), plain)
    argv = ["import-weights", str(plain), "--backbone", "setrans", "--out", str(tmp_path / "b.pt")]
    assert main(argv) == 2 and main([*argv, "--match-by-order"]) == 2
    assert "its names begin 0.weight, 0.bias, 1.weight" in caplog.text
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()


def test_import_weights_on_a_text_file_or_a_pickle_that_runs_code_is_one_clear_line(tmp_path, caplog):
    text = tmp_path / "h.pth"
    text.write_text("hello\n")
    argv = ["import-weights", str(text), "--backbone", "setrans", "--out", str(tmp_path / "o.pt")]
    assert main(argv) == 2
    assert "h.pth: not a readable PyTorch state dict (damaged, cut short, or not a PyTorch file" in caplog.text
    evil = tmp_path / "evil.pth"
    torch.save(_RunsCode(tmp_path / "pwned"), evil)
    with pytest.raises(RayscError) as caught:
        read_state_dict(evil)
    said = str(caught.value)
    assert said.startswith(f"{evil}: refused: it holds Python objects beyond tensors and plain values")
    assert "posix.system" in said and "weights_only" not in said  # never the advice to load it unsafely
    assert not (tmp_path / "pwned").exists()


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


def test_import_weights_refuses_what_is_not_a_state_dict(tmp_path):
    path = tmp_path / "not.pth"
    torch.save({"epoch": 3, "note": "no tensors"}, path)
    with pytest.raises(RayscError, match="not a state dict of tensors"):
        read_state_dict(path)
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a torch file")
    with pytest.raises(RayscError, match=r"garbage\.pth: not a readable PyTorch state dict \(damaged, cut short"):
        read_state_dict(tmp_path / "garbage.pth")
    torch.save({"x": torch.zeros(7, 7)}, path)
    with pytest.raises(ConfigError, match=r"only 0 of the \d+ tensors of the setrans network match the file by name"):
        import_weights(path, backbone="setrans", out=tmp_path / "out.pt")


def _record(exp, round_, trial_id, backbone, acc):
    from raysc.experiment import TrialRecord

    rec = TrialRecord(
        trial_id, round_, "completed", backbone, {}, 1, 1, {"macro_accuracy": acc}, 1, 1, 1.0, None, 0.1, 0,
        f"round-{round_}/trials/{trial_id}/model.pt", None,
    )  # fmt: skip
    exp.write_record(rec)


def test_init_from_names_the_experiments_pretrained_trunk_or_the_previous_rounds_best(prepared, tmp_path):
    from raysc.experiment import Experiment
    from raysc.pipeline import with_pretrained
    from raysc.search import resolve_init, search
    from raysc.search_space import load_search_space

    exp = Experiment(tmp_path / "exp")
    _record(exp, 0, "aaaa0000", "setrans", 0.4)
    _record(exp, 0, "bbbb1111", "setrans", 0.6)
    _record(exp, 0, "cccc2222", "mobileascnet", 0.9)
    values = {"backbone": "setrans", "init_from": "previous_round"}
    assert resolve_init(values, exp, 1)["init_from"] == str(exp.root / "round-0/trials/bbbb1111/model.pt")
    assert resolve_init({**values, "backbone": "stats"}, exp, 1)["init_from"] is None  # none there: from scratch
    assert resolve_init({**values, "init_from": "pretrained"}, exp, 0)["init_from"] == str(
        exp.pretrained_model("setrans")
    )
    # The pipeline's pretrain stage: pretrained backbones start from their trunk, unless searched.
    space_file = tmp_path / "s.yaml"
    space_file.write_text(
        "fixed: {model.width: 0.25}\n"
        "backbones:\n  setrans: {}\n  mobileascnet:\n"
        "    init_from: {type: categorical, choices: [null, pretrained]}\n"
    )
    space = load_search_space(space_file)
    planned = with_pretrained(space, ["setrans", "mobileascnet"])
    assert planned.backbones["setrans"][0] == {"init_from": "pretrained", "reset_head": True}
    assert planned.backbones["mobileascnet"] == space.backbones["mobileascnet"]  # it searches init_from
    # A search that may start from a pretrained trunk the experiment does not hold stops first.
    with pytest.raises(ConfigError, match=r"mobileascnet may start from init_from: pretrained, but .* does not exist"):
        search(space, data=prepared.out, experiment=tmp_path / "exp2")


def _official_panns(blocks: list[int]) -> dict[str, torch.Tensor]:
    """A state dict under the names and shapes of the PANNs authors' CNN10 / CNN14 (their STFT
    and mel buffers, bn0, conv_block1.., fc1, the 527-class fc_audioset), random values."""
    g = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple[int, ...]] = {
        "spectrogram_extractor.stft.conv_real.weight": (513, 1, 1024),
        "spectrogram_extractor.stft.conv_imag.weight": (513, 1, 1024),
        "logmel_extractor.melW": (513, 64),
    }

    def bn(name: str, c: int) -> None:
        shapes.update({f"{name}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")})

    bn("bn0", 64)
    c_in = 1
    for i, c in enumerate(blocks, start=1):
        shapes[f"conv_block{i}.conv1.weight"] = (c, c_in, 3, 3)
        shapes[f"conv_block{i}.conv2.weight"] = (c, c, 3, 3)
        bn(f"conv_block{i}.bn1", c)
        bn(f"conv_block{i}.bn2", c)
        c_in = c
    shapes |= {"fc1.weight": (c_in, c_in), "fc1.bias": (c_in,), "fc_audioset.weight": (527, c_in)}
    shapes["fc_audioset.bias"] = (527,)
    state = {k: torch.rand(s, generator=g) + 0.5 for k, s in shapes.items()}
    state |= {k.replace("running_mean", "num_batches_tracked"): torch.tensor(7) for k in shapes if "running_mean" in k}
    return state


@pytest.mark.parametrize(
    ("backbone", "blocks"), [("cnn10", [64, 128, 256, 512]), ("cnn14", [64, 128, 256, 512, 1024, 2048])]
)
def test_the_panns_authors_checkpoints_load_by_name(tmp_path, capsys, backbone, blocks):
    official = _official_panns(blocks)
    path = tmp_path / f"{backbone}_official.pth"
    torch.save({"model": official}, path)  # the authors save the state dict under "model"
    out = tmp_path / f"{backbone}.pt"
    assert main(["import-weights", str(path), "--backbone", backbone, "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "0 by order and shape" in report  # nothing paired by position
    ours = load_model(out).state_dict()
    trunk = [k for k in official if not k.startswith(("spectrogram_extractor", "logmel_extractor", "fc_audioset"))]
    for k in trunk:
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(ours[k], official[k]), k  # every tensor of the network, by its name
    unused = report.split("in the file but not used: ")[1].splitlines()[0].split(", ")
    assert sorted(unused) == sorted(k for k in official if k not in trunk)  # the authors' buffers and classifier
