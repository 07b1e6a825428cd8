"""fit / predict without Ray: outputs, determinism, resume, augmentation, pseudo-labels, errors."""

from __future__ import annotations

import json
import shutil
from itertools import pairwise

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FRONTEND, tiny_config

from raysc.config import load_config, make_config, parse_sets
from raysc.distributed import check_run_dir
from raysc.errors import ConfigError, DataError, RayscError
from raysc.loader import Batch, ClipTable
from raysc.metadata import CLASSES
from raysc.metrics import macro_accuracy, objective, unk_columns
from raysc.models import create_model, load_model
from raysc.train import PARTIAL, augment, fit, lr_factor, predict, soft_cross_entropy


def test_fit_writes_a_complete_run(prepared, tmp_path):
    result = fit(tiny_config(epochs=3), prepared.out, out_dir=tmp_path / "run")
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    best = metrics["best"]
    for key in (
        "macro_accuracy",
        "accuracy",
        "log_loss",
        "per_class",
        "per_city",
        "seen_city_macro_accuracy",
        "confusion",
        "epoch",
    ):
        assert key in best
    assert best["score"] == max(h["score"] for h in metrics["history"])  # the best epoch by the objective
    m = prepared.manifest
    val = m[(m["subset"] == "labelled") & (m["fold"] == 0)]
    preds = pd.read_csv(run / "val_predictions.csv")
    assert list(preds.columns) == ["filename", *CLASSES, *unk_columns(list(CLASSES))]
    assert sorted(preds["filename"]) == sorted(val["filename"])
    assert np.allclose(preds[list(CLASSES)].sum(axis=1), 1.0, atol=1e-5)
    assert np.array(best["confusion"]).sum() == len(val)
    model = load_model(run / "model.pt")
    assert model.artefact["metrics"]["macro_accuracy"] == best["macro_accuracy"]
    assert json.loads((run / "config.json").read_text())["train"]["backbone"] == "mobileascnet"
    assert result.best["epoch"] == best["epoch"]
    with pytest.raises(RayscError, match="already holds a finished run"):
        check_run_dir(run)


def test_the_city_held_out_score_is_the_validation_clips_scored_as_unk_and_mixed_into_the_objective(prepared):
    m = prepared.manifest
    dev_cities = set(m.loc[m["subset"] != "eval", "city"])
    ev = m[m["subset"] == "eval"]
    share = (~ev["city"].isin(dev_cities)).mean()
    assert 0 < share < 1  # the tiny data has eval-only cities
    assert prepared.unseen_weight() == pytest.approx(share)
    assert prepared.unseen_weight(0.25) == 0.25

    result = fit(tiny_config(epochs=2, city_dropout=0.5), prepared.out)
    _, val_rows = prepared.split(0)
    table = ClipTable.from_rows(val_rows, prepared.one_hot(val_rows))
    # The <unk> columns are the best model's predictions with every city replaced by <unk>.
    unk = predict(result.model, table, prepared.store, unknown_city=True).set_index("filename")
    saved = result.predictions.set_index("filename").loc[unk.index, unk_columns(list(CLASSES))]
    assert np.allclose(saved.to_numpy(), unk[list(CLASSES)].to_numpy(), atol=1e-5)
    plain = predict(result.model, table, prepared.store).set_index("filename")
    assert not np.allclose(plain[list(CLASSES)].to_numpy(), unk[list(CLASSES)].to_numpy())  # the city counts
    both = predict(result.model, table, prepared.store, with_unknown_city=True).set_index("filename")
    assert np.allclose(both[list(CLASSES)].to_numpy(), plain[list(CLASSES)].to_numpy(), atol=1e-6)
    assert np.allclose(both[unk_columns(list(CLASSES))].to_numpy(), unk[list(CLASSES)].to_numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="exclude each other"):
        predict(result.model, table, prepared.store, unknown_city=True, with_unknown_city=True)

    y = prepared.labels(val_rows)
    best = result.best
    expected = macro_accuracy(y, unk.loc[val_rows["filename"], list(CLASSES)].to_numpy().argmax(1), len(CLASSES))
    assert best["unk_city_macro_accuracy"] == pytest.approx(expected)
    assert best["score"] == pytest.approx(objective(best["macro_accuracy"], expected, share))


def test_with_unseen_weight_one_the_best_epoch_is_the_best_city_held_out_one(prepared):
    stats = {"backbone": "stats", "model": {"frontend": FRONTEND}}
    result = fit(tiny_config(epochs=4, unseen_weight=1.0, **stats), prepared.out)
    held_out = [h["unk_city_macro_accuracy"] for h in result.history]
    assert [h["score"] for h in result.history] == held_out
    assert result.best["epoch"] == held_out.index(max(held_out)) + 1
    assert objective(0.8, 0.2, 0.0) == 0.8 and objective(0.8, 0.2, 0.5) == pytest.approx(0.5)
    assert objective(0.8, None, 0.5) == 0.8  # nothing held out: macro accuracy alone


def test_same_seed_same_metrics(prepared):
    cfg = tiny_config(mixup_alpha=0.4, time_shift=0.1, spec_augment=1, city_dropout=0.2)
    a, b = fit(cfg, prepared.out), fit(cfg, prepared.out)
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("epoch_seconds", "finished_at")} for e in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert strip(a.history) != strip(fit(tiny_config(seed=1), prepared.out).history)


def test_a_run_writes_its_curves_for_tensorboard(prepared, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = fit(tiny_config(epochs=2), prepared.out, out_dir=tmp_path / "run")
    curves = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    curves.Reload()
    steps = result.history[-1]["steps"]
    loss = curves.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, steps + 1))  # every optimiser step, once
    assert [e.step for e in curves.Scalars("train/lr")] == list(range(1, steps + 1))
    per_epoch = curves.Scalars("epoch/macro_accuracy")
    assert [e.step for e in per_epoch] == [h["steps"] for h in result.history]
    assert [e.value for e in per_epoch] == pytest.approx([h["macro_accuracy"] for h in result.history])
    assert curves.Scalars("epoch/train_loss")[-1].value == pytest.approx(result.history[-1]["train_loss"])


def test_channels_last_trains_the_same_network(prepared):
    # A CNN's tensors in another memory order: the same losses and the same weights' metrics.
    plain = fit(tiny_config(epochs=1), prepared.out)
    fast = fit(tiny_config(epochs=1, channels_last=True), prepared.out)
    assert fast.history[0]["train_loss"] == pytest.approx(plain.history[0]["train_loss"], rel=1e-3)
    assert fast.best["macro_accuracy"] == pytest.approx(plain.best["macro_accuracy"], abs=0.02)
    for option in ("channels_last", "compile"):
        with pytest.raises(ConfigError, match=rf"{option} must be true or false, got 'yes'"):
            make_config({"backbone": "stats", option: "yes"})


def test_compile_trains_through_the_compiled_module_and_saves_the_plain_one(prepared, tmp_path, monkeypatch):
    # torch.compile itself takes 10-20 s on a CPU (benchmarks/gpu_check.sh measures it on a GPU):
    # here a stand-in records what fit hands it and counts the calls through it.
    compiled, calls = [], []

    class Compiled(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            calls.append(1)
            return self.module(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or Compiled(module))
    result = fit(tiny_config(epochs=1, backbone="stats", compile=True), prepared.out, out_dir=tmp_path / "run")
    assert len(compiled) == 1 and compiled[0] is result.model  # the network itself, not a wrapper of it
    assert len(calls) == result.history[0]["steps"]  # every training step went through it
    saved = load_model(tmp_path / "run" / "model.pt").state_dict()
    assert not any(k.startswith("module.") for k in saved)  # saved under the network's own names


@pytest.mark.parametrize("train_on", ["labelled", "pretrain"])  # raysc train, raysc pretrain
def test_resume_continues_exactly(request, train_on, tmp_path):
    # A killed Ray worker resumes through this path (tests/test_distributed.py kills one).
    data = request.getfixturevalue("prepared" if train_on == "labelled" else "with_pretrain").out
    cfg = lambda epochs: tiny_config(epochs=epochs, mixup_alpha=0.4, train_on=train_on)  # noqa: E731
    straight = fit(cfg(4), data)
    fit(cfg(2), data, checkpoint_dir=tmp_path / "ck")
    (checkpoint,) = sorted((tmp_path / "ck").glob("epoch-*"))
    assert checkpoint.name == "epoch-0002"  # only the latest is kept
    resumed = fit(cfg(4), data, resume=checkpoint, out_dir=tmp_path / "run")
    # "final" marks the last epoch of the 2-epoch run, which the 4-epoch runs continue past.
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("epoch_seconds", "finished_at", "final")} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["resumed_at_epochs"] == [3]


def test_a_half_written_checkpoint_is_never_resumed_from_and_is_cleared(prepared, tmp_path):
    from raysc.search import _latest_checkpoint

    ck = tmp_path / "ck"
    fit(tiny_config(epochs=2), prepared.out, checkpoint_dir=ck)
    # A kill while epoch 3 was written: its folder holds a newer history, under the partial name.
    partial = ck / f"epoch-0003{PARTIAL}"
    shutil.copytree(ck / "epoch-0002", partial)
    m = json.loads((partial / "metrics.json").read_text())
    (partial / "metrics.json").write_text(json.dumps({**m, "history": [*m["history"], m["history"][-1]]}))
    (partial / "state.pt").write_bytes(b"cut short")
    assert _latest_checkpoint(ck) == ck / "epoch-0002"
    again = fit(tiny_config(epochs=3), prepared.out, resume=_latest_checkpoint(ck), checkpoint_dir=ck)
    assert [h["epoch"] for h in again.history] == [1, 2, 3]
    assert sorted(p.name for p in ck.iterdir()) == ["epoch-0003"]  # the partial one renamed over, the old gone


def test_a_run_resumed_from_its_final_checkpoint_reports_its_last_result_and_trains_no_more(prepared, tmp_path):
    # What Tune does to a trial that ended after its last saved state: it starts it again.
    done = fit(tiny_config(epochs=2), prepared.out, checkpoint_dir=tmp_path / "ck")
    (checkpoint,) = sorted((tmp_path / "ck").glob("epoch-*"))
    reports = []
    again = fit(tiny_config(epochs=2), prepared.out, resume=checkpoint, report=lambda m, p: reports.append((m, p)))
    assert len(again.history) == 2 and again.best == done.best
    ((metrics, path),) = reports  # the last result once more, without a new checkpoint
    assert path is None and metrics["final"] and metrics["epoch"] == 2
    assert metrics["best_score"] == done.best["score"]


def test_early_stopping_counts_optimiser_steps(prepared):
    result = fit(tiny_config(epochs=30, patience_steps=1, lr=1e-6), prepared.out)
    assert len(result.history) < 30
    assert len(result.history) == result.best["epoch"] + 1  # stopped at the first epoch without a better score
    steps = result.history[0]["steps"]  # steps per epoch on this data
    patient = fit(tiny_config(epochs=30, patience_steps=2 * steps + 1, lr=1e-6), prepared.out)
    assert len(patient.history) == patient.best["epoch"] + 3  # 3 epochs of steps past the best


def _batch(n=6, length=100):
    wave = torch.arange(n * length, dtype=torch.float32).reshape(n, length)
    target = torch.eye(len(CLASSES))[torch.arange(n) % len(CLASSES)]
    return Batch(
        wave, torch.zeros(n, dtype=torch.long), torch.zeros(n, 7), target, torch.ones(n), [str(i) for i in range(n)]
    )


def test_mixup_mixes_inputs_targets_and_weights():
    b = _batch()
    out = augment(b, tiny_config(mixup_alpha=1.0, mixup_prob=1.0), 8000, torch.Generator().manual_seed(0))
    assert not torch.equal(out.wave, b.wave)
    lam = out.target.max(dim=1).values
    mixed = lam < 1  # a clip the permutation paired with itself stays as it was
    assert mixed.sum() >= 4
    assert torch.allclose(lam[mixed], lam[mixed][0].expand(int(mixed.sum()))) and lam[mixed][0] >= 0.5
    partner = out.target.argsort(dim=1)[:, -2]  # the other clip's class; clip j has class j here
    for i in range(6):
        j = int(partner[i]) if mixed[i] else i
        expect = lam[i] * b.wave[i] + (1 - lam[i]) * b.wave[j]
        assert torch.allclose(out.wave[i], expect), i
    assert torch.allclose(out.target.sum(1), torch.ones(6))
    unchanged = augment(b, tiny_config(mixup_alpha=1.0, mixup_prob=0.0), 8000, torch.Generator().manual_seed(0))
    assert torch.equal(unchanged.wave, b.wave)


def test_time_shift_is_circular():
    b = _batch()
    out = augment(b, tiny_config(time_shift=0.005), 8000, torch.Generator().manual_seed(1))  # up to 40 samples
    shifted = 0
    for i in range(6):
        rolls = [k for k in range(-40, 41) if torch.equal(torch.roll(b.wave[i], k), out.wave[i])]
        assert len(rolls) == 1
        shifted += rolls[0] != 0
    assert shifted > 0


def test_soft_cross_entropy_weights_and_soft_targets():
    logits = torch.randn(4, 10)
    hard = torch.eye(10)[[1, 2, 3, 4]]
    assert torch.allclose(
        soft_cross_entropy(logits, hard, torch.ones(4)), torch.nn.functional.cross_entropy(logits, hard.argmax(1))
    )
    w = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(
        soft_cross_entropy(logits, hard, w), torch.nn.functional.cross_entropy(logits[:1], hard[:1].argmax(1))
    )
    soft = torch.full((4, 10), 0.1)
    expected = -(torch.log_softmax(logits, -1) * 0.1).sum(-1).mean()
    assert torch.allclose(soft_cross_entropy(logits, soft, torch.ones(4)), expected)


def test_schedules():
    step = tiny_config(schedule="step", step_size=2, gamma=0.9, epochs=10)
    assert [round(lr_factor(step, e), 4) for e in range(5)] == [1.0, 1.0, 0.9, 0.9, 0.81]
    cos = tiny_config(schedule="cosine", epochs=5, lr=1e-3, min_lr=1e-4)
    assert lr_factor(cos, 0) == pytest.approx(1.0) and lr_factor(cos, 4) == pytest.approx(0.1)
    warm = tiny_config(schedule="constant", warmup_steps=3, epochs=20)
    assert [lr_factor(warm, e) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    # A warm-up longer than a quarter of the run is cut there: 2 epochs of 4 steps warm up for 2.
    short = tiny_config(schedule="constant", warmup_steps=100, epochs=2)
    assert [lr_factor(short, s, 4) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    # Per optimiser step: 4 steps an epoch, a 4-step warm-up, cosine to the floor at the very last step.
    steps = tiny_config(schedule="cosine", epochs=4, warmup_steps=4, lr=1e-3, min_lr=1e-4)
    factors = [lr_factor(steps, s, 4) for s in range(16)]
    assert factors[:4] == [0.2, 0.4, 0.6, 0.8] and factors[4] == pytest.approx(1.0)
    assert factors[15] == pytest.approx(0.1) and all(a > b for a, b in pairwise(factors[4:]))


def _pseudo_csv(path, names, probs=None):
    probs = np.full((len(names), len(CLASSES)), 1 / len(CLASSES)) if probs is None else probs
    pd.DataFrame(probs, columns=list(CLASSES)).assign(filename=names)[["filename", *CLASSES]].to_csv(path, index=False)
    return path


def test_pseudo_labels_from_validation_sessions_never_train(prepared, tmp_path):
    m = prepared.manifest
    unl = m[m["subset"] == "unlabelled"]
    probs = np.eye(len(CLASSES))[np.arange(len(unl)) % len(CLASSES)] * 0.9 + 0.01
    path = _pseudo_csv(tmp_path / "p.csv", list(unl["filename"]), probs)
    # Session labels off: here every unlabelled clip is a pseudo-label candidate.
    result = fit(tiny_config(epochs=1, pseudo_labels=str(path), pseudo_weight=0.5, session_labels=False), prepared.out)
    train_labelled = ((m["subset"] == "labelled") & (m["fold"] != 0)).sum()
    assert result.history[0]["train_clips"] == train_labelled + (unl["fold"] != 0).sum()
    high = fit(
        tiny_config(epochs=1, pseudo_labels=str(path), pseudo_threshold=0.95, session_labels=False), prepared.out
    )
    assert high.history[0]["train_clips"] == train_labelled  # 0.91 < 0.95: none kept
    pd.DataFrame({"filename": ["x"], "Bus": [1.0]}).to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(DataError, match=r"cols.csv: missing column\(s\) \['Airport'"):
        fit(tiny_config(epochs=1, pseudo_labels=str(tmp_path / "cols.csv")), prepared.out)
    bad = _pseudo_csv(tmp_path / "bad.csv", [m[m["subset"] == "labelled"]["filename"].iloc[0], "nope"])
    with pytest.raises(DataError) as err:
        fit(tiny_config(epochs=1, pseudo_labels=str(bad)), prepared.out)
    assert "is not an unlabelled development clip" in str(err.value) and "'nope'" in str(err.value)


def test_session_labels_train_outside_the_validation_fold_and_leave_pseudo_labels_the_rest(prepared, tmp_path):
    m = prepared.manifest
    labelled, unl = m[m["subset"] == "labelled"], m[m["subset"] == "unlabelled"]
    has = unl[unl["session_label"].notna()]
    assert 0 < len(has) < len(unl) and prepared.info["session_labels"] == len(has)
    assert m.loc[m["subset"] != "unlabelled", "session_label"].isna().all()
    scene = labelled.groupby("session")["label"].first()
    assert (has["session_label"] == has["session"].map(scene)).all()  # the session's own scene
    assert set(unl.loc[unl["session_label"].isna(), "session"]).isdisjoint(labelled["session"])
    fold_of = labelled.groupby("session")["fold"].first()
    assert (has["fold"] == has["session"].map(fold_of)).all()  # never in another fold than its session
    with_sessions = fit(tiny_config(epochs=1), prepared.out)
    train_labelled = (labelled["fold"] != 0).sum()
    assert with_sessions.history[0]["train_clips"] == train_labelled + (has["fold"] != 0).sum()
    assert fit(tiny_config(epochs=1, session_labels=False), prepared.out).history[0]["train_clips"] == train_labelled
    # Pseudo-labels cover only the clips of sessions without any label.
    probs = np.eye(len(CLASSES))[np.arange(len(unl)) % len(CLASSES)] * 0.9 + 0.01
    path = _pseudo_csv(tmp_path / "p.csv", list(unl["filename"]), probs)
    both = fit(tiny_config(epochs=1, pseudo_labels=str(path)), prepared.out)
    no_label = unl[unl["session_label"].isna() & (unl["fold"] != 0)]
    assert both.history[0]["train_clips"] == train_labelled + (has["fold"] != 0).sum() + len(no_label)


def test_init_from_reset_head_and_freeze(prepared, tmp_path):
    fit(tiny_config(epochs=1), prepared.out, out_dir=tmp_path / "pre")
    pre = load_model(tmp_path / "pre" / "model.pt").state_dict()
    cfg = tiny_config(
        epochs=1, init_from=str(tmp_path / "pre" / "model.pt"), reset_head=True, freeze=["blocks.0", "blocks.1"], lr=0.1
    )
    tuned = fit(cfg, prepared.out).model.state_dict()
    for name in pre:
        if name.startswith(("blocks.0.", "blocks.1.")) and "running" not in name and "num_batches" not in name:
            assert torch.equal(tuned[name], pre[name]), name  # frozen
    assert not torch.equal(tuned["blocks.2.entry.0.weight"], pre["blocks.2.entry.0.weight"])  # trained


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"backbone": "resnet50"}, "unknown backbone 'resnet50'"),
        ({"backbone": "setrans", "learning_rate": 1e-3}, "unknown key 'learning_rate' (valid: amp, backbone"),
        ({"backbone": "setrans", "optimizer": "lamb"}, "optimizer 'lamb' (valid: adam, adamw, sgd)"),
        ({"backbone": "setrans", "lr": "fast"}, "lr must be a number, got 'fast'"),
        ({"backbone": "setrans", "epochs": 2.5}, "epochs must be an integer, got 2.5"),
        ({"backbone": "setrans", "mixup_prob": 1.5}, "mixup_prob must be in [0, 1], got 1.5"),
        ({"backbone": "setrans", "unseen_weight": -0.1}, "unseen_weight must be in [0, 1], got -0.1"),
    ],
)
def test_config_errors_name_the_key(values, message):
    with pytest.raises(ConfigError) as err:
        make_config(values)
    assert message in str(err.value)


def test_yaml_numbers_and_sets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("backbone: rm3\nlr: 1e-4\nmodel:\n  width: 5e-1\nfreeze: blocks.0\n")
    cfg = make_config(load_config(path))
    assert cfg.lr == 1e-4 and cfg.freeze == ("blocks.0",)
    assert parse_sets(["lr=3e-4", "model.width=0.5", "pseudo_labels="]) == {
        "lr": "3e-4",
        "model.width": 0.5,
        "pseudo_labels": None,
    }
    assert make_config({"backbone": "rm3", **parse_sets(["lr=3e-4"])}).lr == 3e-4
    with pytest.raises(ConfigError, match="--set expects key=value, got 'lr'"):
        parse_sets(["lr"])
    path.write_text("- a\n")
    with pytest.raises(ConfigError, match="expected a mapping of training options"):
        load_config(path)


def test_every_backbone_front_end_follows_the_data_rate_unless_set(prepared):
    from raysc.models import list_models

    for name in list_models():
        over = make_config({"backbone": name}).model_overrides(classes=CLASSES, cities=["<unk>"], sample_rate=8000)
        fe = create_model(name, **over).cfg.frontend
        paper = create_model(name).cfg.frontend
        assert fe.sample_rate == 8000 and fe.f_max <= 4000, name
        # Windows and hops keep their duration; the FFT holds the window.
        assert abs(fe.hop_length / 8000 - paper.hop_length / paper.sample_rate) < 1 / 8000, name
        assert abs(fe.win_length / 8000 - paper.win_length / paper.sample_rate) < 1 / 8000, name
        assert fe.n_fft >= fe.win_length and fe.n_mels == paper.n_mels, name
    result = fit(make_config({"backbone": "stats", "epochs": 1, "batch_size": 16}), prepared.out)
    assert result.model.cfg.frontend.sample_rate == 8000 and result.history[0]["train_clips"] > 0


def test_data_problems_stop_before_training(prepared, tmp_path):
    explicit = {"backbone": "setrans", "epochs": 1, "model": {"frontend": {"sample_rate": 44100}}}
    with pytest.raises(
        ConfigError,
        match=r"expects 44100 Hz audio but the data is at 8000 Hz: prepare the data with "
        r"--sample-rate 44100, or remove model\.frontend\.sample_rate so that the front end follows",
    ):
        fit(make_config(explicit), prepared.out)
    with pytest.raises(ConfigError, match=r"fold 7 does not exist .* \(folds: \[0, 1, 2\], or -1\)"):
        fit(tiny_config(fold=7), prepared.out)
    with pytest.raises(ConfigError, match="freeze: no parameter of mobileascnet starts with 'encoder'"):
        fit(tiny_config(freeze=["encoder"]), prepared.out)
    with pytest.raises(DataError, match="not a prepared data folder"):
        fit(tiny_config(), tmp_path)


def test_fold_minus_one_trains_on_everything(prepared, tmp_path):
    result = fit(tiny_config(fold=-1, epochs=1), prepared.out, out_dir=tmp_path / "all")
    assert result.best == {} and result.predictions is None
    every = (prepared.manifest["subset"] == "labelled").sum() + prepared.manifest["session_label"].notna().sum()
    assert result.history[0]["train_clips"] == every
    assert (tmp_path / "all" / "model.pt").is_file() and not (tmp_path / "all" / "val_predictions.csv").exists()


def test_a_last_batch_of_one_clip_is_dropped_in_training(prepared):
    from raysc.loader import ClipTable, make_loader

    m = prepared.manifest
    rows = m[m["subset"] == "labelled"].iloc[:17]
    table = ClipTable.from_rows(rows, np.eye(len(CLASSES), dtype=np.float32)[np.zeros(17, int)])
    sizes = [len(b.filename) for b in make_loader(table, prepared.store, batch_size=8, shuffle=True, seed=0)]
    assert sizes == [8, 8]  # BatchNorm cannot train on the 17th clip alone
    assert [len(b.filename) for b in make_loader(table, prepared.store, batch_size=8, shuffle=False, seed=0)] == [
        8,
        8,
        1,
    ]
    # The stats network (BatchNorm1d) trains whatever the remainder.
    fit(make_config({"backbone": "stats", "epochs": 1, "batch_size": 8}), prepared.out)


def test_a_full_disk_stops_the_write_by_name_and_keeps_what_was_there(tmp_path, monkeypatch):
    import errno
    import os

    from raysc import fileio
    from raysc.fileio import write_json

    path = tmp_path / "record.json"
    write_json(path, {"kept": True})

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "replace", full)
    with pytest.raises(RayscError, match=r"record.json: could not be written \(No space left on device\)"):
        write_json(path, {"kept": False})
    assert json.loads(path.read_text()) == {"kept": True} and [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_corrupt_checkpoint_is_refused_by_name_never_trained_over(prepared, tmp_path):
    fit(tiny_config(epochs=1), prepared.out, checkpoint_dir=tmp_path / "ck")
    (checkpoint,) = (tmp_path / "ck").glob("epoch-*")
    state = checkpoint / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # cut short, as by a crash mid-write
    with pytest.raises(RayscError) as caught:
        fit(tiny_config(epochs=2), prepared.out, resume=checkpoint)
    assert str(caught.value) == (
        f"{checkpoint}: the checkpoint to resume from is damaged ({state}: not a readable training state (damaged, "
        "cut short, or not a PyTorch file)); delete that folder and resume again: the run then continues from the "
        "checkpoint before it, or starts over where none is kept"
    )
