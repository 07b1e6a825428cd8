"""Named recipes (`raysc pipeline alps | mobileascnet | ascmamba | rm3 | baseline`): each file
names its source and its changes, samples its paper's scheme, and runs to a valid submission."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from conftest import tiny_config

from raysc.config import make_config
from raysc.datafolder import PreparedData
from raysc.errors import ConfigError
from raysc.experiment import Experiment
from raysc.models import load_model, save_model
from raysc.pipeline import (
    RECIPES_DIR,
    PipelineConfig,
    at_width,
    load_pipeline,
    recipe_names,
    run_pipeline,
    smoke_sized,
    with_pretrained,
)
from raysc.search_space import load_search_space
from raysc.submission import check_submission_file, make_submission
from raysc.train import build_model, fit

SEEDS = ["alps", "mobileascnet", "ascmamba", "rm3", "baseline"]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_the_built_in_pipelines_are_the_default_and_one_recipe_file_each():
    assert recipe_names() == ["default", "alps", "ascmamba", "baseline", "gpu", "mobileascnet", "rm3"]
    from raysc.cli import build_parser

    usage = build_parser()._subparsers._group_actions[0].choices["pipeline"].format_help()
    assert all(name in usage for name in recipe_names())  # `raysc pipeline --help` lists them
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


def _run_recipe(name: str, data: PreparedData, tmp_path: Path) -> tuple[PipelineConfig, Experiment, Any, str]:
    """``raysc pipeline NAME --smoke-test --time-budget 4`` in-process: its submission valid, and
    at its start the word on pretraining data it lacks. Returns its settings, experiment, result
    and progress lines."""
    cfg = smoke_sized(load_pipeline(name))
    lines: list[str] = []
    exp = Experiment(tmp_path / "exp")
    result = run_pipeline(cfg, data=data.out, experiment=exp.root, time_budget_minutes=4, progress=lines.append)
    out = "\n".join(lines)
    check_submission_file(result.submission, data.out)
    said_missing = "has none (prepare it with --tau and/or --cochlscene): the rest runs without pretraining"
    assert (said_missing in lines[0]) == (cfg.pretrain is not None and data.rows("pretrain").empty), out
    return cfg, exp, result, out


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SEEDS if n != "alps"])  # ALPS: the test after this one
def test_each_recipe_runs_to_a_submission_under_a_short_budget(
    name, local_ray, prepared, with_pretrain, prepared_short, tmp_path
):
    # MobileASCNet's recipe on a data folder with TAU / CochlScene clips: pretrained, then both
    # fine-tuning variants searched; the others say up front that they run without pretraining.
    # ASCMamba's on 0.25 s clips: its scan costs seconds a step even on 1 s clips at width 0.125.
    data = {"mobileascnet": with_pretrain, "ascmamba": prepared_short}.get(name, prepared)
    cfg, exp, result, out = _run_recipe(name, data, tmp_path)
    records = exp.records()
    assert sorted({r.round for r in records}) == list(range(cfg.rounds)), out
    assert result.final.name.startswith(f"round{cfg.rounds - 1}-") and len(result.final.members) == 1, out
    later = {r.round: exp.train_config(r) for r in records if r.round >= 1}
    for r, train in later.items():
        assert train["pseudo_labels"], out  # every round after 0 trains on pseudo-labels
        if name == "rm3":  # from the round before's model, with a new ArcFace head
            assert f"round-{r - 1}/trials/" in train["init_from"] and train["reset_head"], out
    if name == "mobileascnet":  # every trial starts from the trunk pretrained here, frozen or not
        trunk = exp.pretrained_model("mobileascnet")
        assert load_model(trunk).artefact["info"]["pretrained"]["subset"] == "pretrain"
        assert all(exp.train_config(r)["init_from"] == str(trunk) for r in records), out
        assert all("mobileascnet/freeze_low_level" in r.params for r in records), out
    if name == "ascmamba":  # step 2 keeps the clips both steps label alike
        step1, step2 = (pd.read_csv(exp.root / train["pseudo_labels"]) for train in (later[1], later[2]))
        both = step2.merge(step1, on="filename", suffixes=("", "_1"))
        assert len(both) == len(step2) and np.array_equal(both["label"], both["label_1"]), out
        assert re.search(r"pseudo-label candidates from round1-topk1\S*: \d+ clips, those on which it agrees", out)


@pytest.mark.slow
def test_alps_runs_to_a_submission_when_its_last_round_trains_nothing(local_ray, prepared, tmp_path, monkeypatch):
    from raysc import pipeline
    from raysc.leaderboard import leaderboard
    from raysc.search import SearchResult

    real = pipeline.stages.search

    def last_round_gets_nothing(space, **kw):
        # What a budget that runs out in the middle of a round leaves: no trial with a finished epoch.
        if kw["round"] == 2:
            return SearchResult(tmp_path / "exp" / "round-2", [], None, 0.0)
        return real(space, **kw)

    monkeypatch.setattr(pipeline.stages, "search", last_round_gets_nothing)
    _, exp, result, out = _run_recipe("alps", prepared, tmp_path)
    assert "[pipeline] round 2: no trial finished an epoch" in out
    # The final model: the best of rounds 0 and 1, round 1's trial trained on hard pseudo-labels.
    assert {r.round for r in exp.records()} == {0, 1} and result.final.name.startswith("round1-topk1")
    (trial,) = [r for r in exp.records() if r.round == 1]
    train = exp.train_config(trial)
    assert train["pseudo_labels"] and train["pseudo_targets"] == "hard" and 0.5 <= train["pseudo_threshold"] <= 0.95
    board = leaderboard(exp.root)
    assert (board["kind"] == "trial").sum() == 2 and (board["kind"] == "ensemble").sum() >= 2
    assert board["unk_city_macro_accuracy"].notna().all()  # every row has its city-held-out score
    assert list(board["score"]) == sorted(board["score"], reverse=True)  # ranked by the objective

    # A driver killed while it writes the submission: half the file is written, then SIGKILL.
    sub = result.submission
    before = sub.read_bytes()
    script = tmp_path / "dies_writing.py"
    script.write_text(
        "import os, signal, sys\n"
        "import pandas as pd\n"
        "from raysc.submission import make_submission\n"
        "real = pd.DataFrame.to_csv\n"
        "def dying(self, path=None, *a, **k):\n"
        "    if path is not None and '.submission.csv.' in str(path):\n"
        "        text = real(self, None, index=False)\n"
        "        open(path, 'w').write(text[: len(text) // 2])\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(self, path, *a, **k)\n"
        "pd.DataFrame.to_csv = dying\n"
        "make_submission(sys.argv[1], sys.argv[2], address=sys.argv[3])\n"
    )
    address = local_ray.get_runtime_context().gcs_address
    killed = subprocess.run([sys.executable, str(script), str(exp.root), str(sub), address], timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert sub.read_bytes() == before  # the complete file from before, never half of the new one
    assert list(sub.parent.glob(".submission.csv.*.tmp"))  # the half-written copy under another name
    # The rerun: a complete file, by default with the session rule the recipe's own submission left out.
    again = make_submission(exp.root, sub, address=address)
    check_submission_file(again.csv, prepared.out)

    # `raysc submit --no-session-labels`: every eval clip as the ensemble predicts it, where the
    # default gives the clips of labelled development sessions their session's label.
    from raysc import cli

    off = tmp_path / "off.csv"
    argv = ["submit", str(exp.root), "--out", str(off), "--no-session-labels", "--address", address]
    assert cli.main(argv) == 0
    check_submission_file(off, prepared.out)
    on_info = json.loads(again.info.read_text())["session_labels"]
    assert json.loads(off.with_name("off_info.json").read_text())["session_labels"] == {"on": False, "clips": 0}
    assert on_info["on"] and on_info["clips"] == again.session_labelled > 0
    top_on = pd.read_csv(again.probabilities).drop(columns="filename").max(axis=1)
    top_off = pd.read_csv(off.with_name("off_probabilities.csv")).drop(columns="filename").max(axis=1)
    assert (top_on == 1.0).sum() == on_info["clips"] and (top_off < 1.0).all()
