"""Named recipes (`raysc pipeline alps | mobileascnet | ascmamba | rm3 | baseline`): each file
names its source and its changes, samples its paper's scheme, and runs to a valid submission."""

from __future__ import annotations

import re

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from conftest import tiny_config

from raysc.config import make_config
from raysc.errors import ConfigError
from raysc.experiment import Experiment
from raysc.models import save_model
from raysc.pipeline import (
    RECIPES_DIR,
    at_width,
    load_pipeline,
    recipe_names,
    run_pipeline,
    smoke_sized,
    with_pretrained,
)
from raysc.search_space import load_search_space
from raysc.submission import check_submission_file
from raysc.train import build_model, fit

SEEDS = ["alps", "mobileascnet", "ascmamba", "rm3", "baseline"]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_the_built_in_pipelines_are_the_default_and_one_recipe_file_each():
    assert recipe_names() == ["default", "alps", "ascmamba", "baseline", "gpu", "mobileascnet", "rm3"]
    with pytest.raises(ConfigError, match=r"pipeline 'alsp': not a \.yaml file nor one of default, alps, ascmamba"):
        load_pipeline("alsp")


@pytest.mark.parametrize("name", SEEDS)
def test_each_recipe_names_its_source_and_its_changes_and_samples_its_scheme(name):
    cfg = load_pipeline(name)
    header = (RECIPES_DIR / f"{name}.yaml").read_text().split("\nspace:")[0]
    assert "Changes from the" in header and re.search(r"(19|20)\d\d", header), header  # its source, dated
    space = load_search_space(cfg.space_path())
    # A recipe is the paper's single network (one backbone, one member), its rounds searched.
    assert len(space.backbones) == 1 and cfg.ensemble_k == 1 and cfg.crossfit == 0 and cfg.rounds >= 2
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    later = [make_config(space.suggest(study.ask(), round=1)) for _ in range(8)]
    thresholds = {c.pseudo_threshold for c in later}
    if name in ("baseline", "rm3"):  # every unlabelled clip: the baseline as is, RM3 weighted by confidence
        assert thresholds == {0.0} and all(c.pseudo_confidence_weight == (name == "rm3") for c in later)
    else:  # a threshold the paper does not publish: searched
        assert len(thresholds) == 8 and all(0.5 <= t <= 0.95 for t in thresholds)
    targets = {"mobileascnet": "soft"}.get(name, "hard")
    assert {c.pseudo_targets for c in later} == {targets}
    if name in ("rm3", "baseline"):  # each round fine-tunes the model before it (RM3 with a new head)
        assert all(c.init_from == "previous_round" and c.reset_head == (name == "rm3") for c in later)
    assert cfg.pseudo_agreement == (name == "ascmamba")


def test_pseudo_label_agreement_needs_searched_rounds_and_pretraining_settings_are_checked(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("pseudo_agreement: true\n")
    with pytest.raises(ConfigError, match="pseudo_agreement compares the searched rounds' pseudo-labels: set crossf"):
        load_pipeline(bad)
    bad.write_text("crossfit: 0\npretrain: {finetune: {freez_low_level: true}}\n")
    with pytest.raises(ConfigError, match=r"pretrain\.finetune: unknown key 'freez_low_level'"):
        load_pipeline(bad)
    bad.write_text("width: half\n")
    with pytest.raises(ConfigError, match=r"width must be a number > 0 \(1: the paper's network\), got 'half'"):
        load_pipeline(bad)


def test_a_pipeline_width_fixes_every_network_with_one_and_a_smoke_test_keeps_the_recipe():
    space = at_width(load_search_space("default"), 0.5)
    assert {name: own_fixed["model.width"] for name, (own_fixed, _) in space.backbones.items()} == {
        "stats": 0.5,
        "aisfx": 0.5,
        "mobileascnet": 0.5,
        "setrans": 0.5,
    }
    assert at_width(load_search_space("all_backbones"), 0.5).backbones["resnet_cbam"][1].keys() == {
        "model.fusion_dropout"  # its searched width gone
    }
    recipe = load_pipeline("rm3")
    smoke = smoke_sized(recipe)
    assert (smoke.trials, smoke.max_epochs, smoke.width, smoke.pretrain["epochs"]) == (1, 1, 0.125, 1)
    assert (smoke.rounds, smoke.space, smoke.pseudo_agreement) == (recipe.rounds, recipe.space, False)


def test_finetune_settings_reach_only_the_pretrained_backbones_trials():
    space = load_search_space("mobileascnet")
    finetune = load_pipeline("mobileascnet").pretrain["finetune"]
    planned = with_pretrained(space, ["mobileascnet"], finetune)
    own_fixed, own = planned.backbones["mobileascnet"]
    assert own_fixed["init_from"] == "pretrained" and own["freeze_low_level"].choices == (False, True)
    assert with_pretrained(space, [], finetune).backbones == space.backbones


def test_freeze_low_level_keeps_the_pretrained_low_level_blocks_and_trains_the_rest(prepared, tmp_path):
    source = build_model(tiny_config(), prepared)
    save_model(source, tmp_path / "pre.pt", metrics={})
    cfg = tiny_config(init_from=str(tmp_path / "pre.pt"), freeze_low_level=True, epochs=1, lr=1e-2)
    model = fit(cfg, prepared.out).model
    # Its weights stay (batch norm's running statistics still follow the new data).
    before, after = dict(source.named_parameters()), dict(model.named_parameters())
    low = [k for k in after if k.startswith(("blocks.0.", "blocks.1."))]
    assert low and all(torch.equal(before[k], after[k]) for k in low)
    assert not torch.equal(before["blocks.2.entry.0.weight"], after["blocks.2.entry.0.weight"])
    with pytest.raises(ConfigError, match="freeze_low_level keeps blocks as init_from left them: give init_from"):
        tiny_config(freeze_low_level=True)
    with pytest.raises(ConfigError, match=r"freeze_low_level: setrans names no low-level blocks .*\['mobileascnet'\]"):
        other = tiny_config(backbone="setrans", init_from=str(tmp_path / "pre.pt"), freeze_low_level=True)
        build_model(other, prepared)


@pytest.mark.slow
@pytest.mark.parametrize("name", SEEDS)
def test_each_recipe_runs_to_a_submission_under_a_short_budget(name, local_ray, prepared, with_pretrain, tmp_path):
    # MobileASCNet's recipe on a data folder with TAU / CochlScene clips: pretrained, then both
    # fine-tuning variants searched; the others say up front that they run without pretraining.
    data = with_pretrain if name == "mobileascnet" else prepared
    cfg = smoke_sized(load_pipeline(name))
    lines: list[str] = []
    exp = Experiment(tmp_path / "exp")
    result = run_pipeline(cfg, data=data.out, experiment=exp.root, time_budget_minutes=4, progress=lines.append)
    check_submission_file(result.submission, data.out)
    out = "\n".join(lines)
    records = exp.records()
    assert sorted({r.round for r in records}) == list(range(cfg.rounds)), out
    assert result.final.name.startswith(f"round{cfg.rounds - 1}-") and len(result.final.members) == 1, out
    said_missing = "has none (prepare it with --tau and/or --cochlscene): the rest runs without pretraining"
    assert (said_missing in lines[0]) == (cfg.pretrain is not None and name != "mobileascnet"), out
    later = {r.round: exp.train_config(r) for r in records if r.round >= 1}
    for r, train in later.items():
        assert train["pseudo_labels"], out  # every round after 0 trains on pseudo-labels
        if name == "rm3":  # from the round before's model, with a new ArcFace head
            assert f"round-{r - 1}/trials/" in train["init_from"] and train["reset_head"], out
    if name == "mobileascnet":
        assert "[pipeline] pretrain mobileascnet: 1 epochs on" in out
        assert all("mobileascnet/freeze_low_level" in r.params for r in records), out
    if name == "ascmamba":  # step 2 keeps the clips both steps label alike
        step1, step2 = (pd.read_csv(exp.root / train["pseudo_labels"]) for train in (later[1], later[2]))
        both = step2.merge(step1, on="filename", suffixes=("", "_1"))
        assert len(both) == len(step2) and np.array_equal(both["label"], both["label_1"]), out
        assert re.search(r"pseudo-label candidates from round1-topk1\S*: \d+ clips, those on which it agrees", out)
