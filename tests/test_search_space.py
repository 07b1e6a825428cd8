"""Search spaces: every shipped file validates; conditional sampling; errors name file and key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import optuna
import pytest

from raysc.config import make_config
from raysc.errors import ConfigError
from raysc.models import list_models
from raysc.search_space import SPACES_DIR, load_search_space

SPACES = sorted((Path(__file__).resolve().parent.parent / "search_spaces").glob("*.yaml"))
optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_one_space_per_backbone_and_one_over_all():
    seeds = {"setrans", "resnet_cbam", "mobileascnet", "ascmamba", "rm3", "stats"}  # the seed systems' and stats
    trunks = {"aisfx", "aisfx_ft"}  # the aisfx trunk's head on its frozen embedding, and fine-tuned
    backbones = seeds | {"cnn10", "cnn14"} | trunks  # and PANNs
    assert backbones == set(list_models())
    assert {p.stem for p in SPACES} == backbones | {"all_backbones", "default", "demo", "gpu"}
    assert set(load_search_space(SPACES_DIR / "all_backbones.yaml").backbones) == backbones
    # The GPU recipe: every seed CNN, stats and both uses of the trunk.
    assert set(load_search_space(SPACES_DIR / "gpu.yaml").backbones) == seeds | trunks


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_shipped_spaces_load_and_sample_valid_configs(path):
    space = load_search_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for round_ in (0, 1):
        for _ in range(5):
            trial = study.ask()
            values = space.suggest(trial, round=round_)
            cfg = make_config(values)
            assert cfg.backbone in space.backbones and cfg.epochs == space.scheduler.max_epochs
            study.tell(trial, 0.5)
    required = {"lr", "weight_decay", "mixup_alpha", "spec_augment", "city_dropout", "model.fusion", "batch_size"}
    if space.name in ("aisfx", "aisfx_ft"):  # a trunk's input: SpecAugment has no spectrogram to mask
        required.discard("spec_augment")
    assert required <= set(space.params)
    assert {"pseudo_threshold", "pseudo_weight"} <= set(space.rounds)


def test_conditional_space_never_samples_another_backbones_parameters():
    space = load_search_space(SPACES[[p.stem for p in SPACES].index("all_backbones")])
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=30))
    chosen = set()
    for i in range(60):
        trial = study.ask()
        values = space.suggest(trial)
        backbone = values["backbone"]
        chosen.add(backbone)
        own = {k.split("/", 1)[0] for k in trial.params if "/" in k}
        assert own <= {backbone}, (backbone, trial.params)
        own_fixed, own_dists = space.backbones[backbone]
        allowed = {"backbone", "epochs"} | set(space.fixed) | set(space.params) | set(own_fixed) | set(own_dists)
        assert set(values) <= allowed, set(values) - allowed
        study.tell(trial, float(i % 7))
    assert chosen == set(space.backbones)


def test_round_parameters_only_from_round_one():
    space = load_search_space(SPACES[[p.stem for p in SPACES].index("setrans")])
    trial = optuna.create_study().ask()
    assert "pseudo_threshold" not in space.suggest(trial, round=0)
    values = space.suggest(optuna.create_study().ask(), round=1)
    assert 0.5 <= values["pseudo_threshold"] <= 0.95 and 0.1 <= values["pseudo_weight"] <= 1.0


BASE = """\
backbones:
  setrans:
    model.dropout: {type: float, low: 0.0, high: 0.3}
"""

START = """\
params:
  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  model.fusion: {type: categorical, choices: [concat, film]}
backbones:
  stats:
    batch_size: 64
    model.hidden: {type: categorical, choices: [128, 256]}
  mobileascnet:
    model.dropout: {type: float, low: 0.0, high: 0.3}
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + "params:\n  lrr: {type: float, low: 0.1, high: 0.2}\n", "params: unknown key 'lrr' (valid: amp,"),
        (BASE + "params:\n  lr: {type: float, low: 0.2, high: 0.1}\n", "params.lr: low 0.2 is above high 0.1"),
        (BASE + "params:\n  lr: {type: float, low: 0.0, high: 0.1, log: true}\n", "params.lr: log scale needs low > 0"),
        (
            BASE + "params:\n  lr: {type: floaty, low: 0.0, high: 0.1}\n",
            "params.lr: unknown distribution type 'floaty'",
        ),
        (BASE + "params:\n  lr: {type: float, low: 0.1, hi: 0.2}\n", "params.lr: unknown key(s) ['hi'] for a float"),
        (BASE + "params:\n  batch_size: {type: categorical, choices: []}\n", "needs a non-empty list of choices"),
        (BASE + "params:\n  lr: 0.1\n", "params.lr is not a distribution; put it under fixed"),
        (
            BASE + "fixed:\n  lr: {type: float, low: 0.1, high: 0.2}\n",
            "fixed.lr is a distribution; put it under params",
        ),
        (BASE + "sampler: tpe\n", "unknown section(s) ['sampler'] (valid: name, fixed, params"),
        (
            BASE + "resources: {gpus: 1}\n",
            "resources: unknown key(s) ['gpus'] (valid: cpus_per_worker, gpus_per_worker",
        ),
        (BASE + "params:\n  model.width: {type: float, low: 0.0, high: 1.0}\n", "width must be > 0"),
        (BASE + "params:\n  model.fusion: {type: categorical, choices: [concat, sum]}\n", "unknown fusion 'sum'"),
        (BASE + "params:\n  model.widht: {type: float, low: 0.5, high: 1.0}\n", "unknown option(s) ['widht'] for"),
        (
            BASE + "scheduler: {grace_period: 3}\n",
            "scheduler: 'grace_period' (epochs) is now 'grace_steps', counted in",
        ),
        (BASE + "scheduler: {grace_steps: 0}\n", "scheduler: grace_steps must be an integer >= 1, got 0"),
        (BASE + "fixed:\n  patience: 10\n", "'patience' is now 'patience_steps', counted in optimiser steps"),
        (BASE + "fixed:\n  warmup_epochs: 1\n", "'warmup_epochs' is now 'warmup_steps'"),
        (START + "start: {lr: 1.0e-3}\n", "start: expected a list of configurations"),
        (
            START + "start:\n  - {lr: 1.0e-3}\n",
            "start[0]: backbone None is not in the space (valid: stats, mobileascnet)",
        ),
        (START + "start:\n  - {backbone: setrans}\n", "start[0]: backbone 'setrans' is not in the space"),
        (
            START + "start:\n  - {backbone: stats, lrr: 1.0e-3}\n",
            "start[0].lrr: not searched for stats; a start point sets",
        ),
        (START + "start:\n  - {backbone: stats, batch_size: 32}\n", "start[0].batch_size: fixed at 64 for stats;"),
        (
            START + "start:\n  - {backbone: stats, lr: 0.5}\n",
            "start[0].lr: 0.5 is outside its distribution (float 0.0001 to",
        ),
        (START + "start:\n  - {backbone: stats, lr: fast}\n", "start[0].lr: 'fast' is outside its distribution"),
        (START + "start:\n  - {backbone: mobileascnet, model.fusion: sum}\n", "model.fusion: 'sum' is outside"),
        (
            START + "start:\n  - {backbone: stats, model.dropout: 0.1}\n",
            "start[0].model.dropout: not searched for stats",
        ),
    ],
)
def test_errors_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_search_space(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_unknown_or_missing_backbones(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("backbones:\n  resnet50: {}\n")
    with pytest.raises(ConfigError, match=re.escape("backbones.resnet50: unknown backbone (valid: aisfx, aisfx_ft,")):
        load_search_space(path)
    path.write_text("params: {}\n")
    with pytest.raises(ConfigError, match="'backbones' must map at least one backbone"):
        load_search_space(path)


def test_gpu_spaces_resolve_to_whole_cpus_on_a_cluster_without_gpus():
    from raysc.search import resolve_resources
    from raysc.search_space import Resources

    gpu = Resources(workers=1, gpus_per_worker=0.5, cpus_per_worker=1)
    assert resolve_resources(gpu, {"CPU": 2.0}, None) == Resources(workers=1, gpus_per_worker=0.0, cpus_per_worker=1)
    assert resolve_resources(gpu, {"CPU": 2.0, "GPU": 1.0}, None) == gpu  # GPUs there: kept
    assert resolve_resources(gpu, {"CPU": 2.0}, 8) == gpu  # autoscaling (--max-concurrent): GPUs will come
    big = Resources(workers=1, gpus_per_worker=0.5, cpus_per_worker=4)  # the gpu recipe's: no more CPUs than there are
    assert resolve_resources(big, {"CPU": 2.0}, None) == Resources(workers=1, gpus_per_worker=0.0, cpus_per_worker=2)
    assert resolve_resources(big, {"CPU": 16.0}, None).cpus_per_worker == 4
    for path in SPACES_DIR.glob("*.yaml"):  # every shipped space runs on a CPU machine
        res = resolve_resources(load_search_space(path).resources, {"CPU": 2.0}, None)
        assert res.gpus_per_worker == 0 and res.workers * res.cpus_per_worker <= 2, path


def test_the_gpu_recipe_runs_trials_by_the_cpus_and_gpus_of_the_node_met():
    from raysc.search import SearchSettings, _concurrency, resolve_resources

    space = load_search_space(SPACES_DIR / "gpu.yaml")
    node = {"CPU": 8.0, "GPU": 2.0}  # half a 4-GPU node of cluster.yaml
    res = resolve_resources(space.resources, node, None)
    assert res == space.resources and (res.cpus_per_worker, res.gpus_per_worker) == (4, 0.5)
    assert _concurrency(node, res, space, SearchSettings(trials=32)) == 2  # the CPUs bind: 8 / 4 (GPUs: 2 / 0.5)
    assert _concurrency({"CPU": 48.0, "GPU": 4.0}, res, space, SearchSettings(trials=32)) == 8  # the GPUs bind


def test_a_value_the_config_refuses_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("params:\n  batch_size: {type: int, low: 0, high: 8}\nbackbones: {stats: {}}\n")
    with pytest.raises(ConfigError, match=r"s.yaml: backbone stats with the low end: .*batch_size must be > 0, got 0"):
        load_search_space(path)
    path.write_text(
        "params:\n  lr: {type: float, low: 1.0e-4, high: 1.0e-2}\n  lr: {type: float, low: 1, high: 2}\n"
        "backbones: {stats: {}}\n"
    )
    with pytest.raises(ConfigError, match=r"s.yaml: duplicate key 'lr' \(lines 2 and 3\)"):
        load_search_space(path)


def test_a_backbones_own_values_override_the_shared_ones(tmp_path):
    # The default space relies on it: the statistics MLP trains without SpecAugment, mixup or FiLM
    # while the networks keep searching them.
    path = tmp_path / "s.yaml"
    path.write_text(
        "params:\n  spec_augment: {type: int, low: 1, high: 2}\n"
        "  model.fusion: {type: categorical, choices: [film]}\n"
        "backbones:\n  stats:\n    spec_augment: 0\n    model.fusion: {type: categorical, choices: [concat, gated]}\n"
        "  rm3: {}\n"
    )
    space = load_search_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(30):
        trial = study.ask()
        values = space.suggest(trial)
        seen.setdefault(values["backbone"], set()).add((values["spec_augment"], values["model.fusion"]))
        if values["backbone"] == "stats":  # the shared values it overrides are not asked (nor logged)
            assert {"spec_augment", "model.fusion"}.isdisjoint(trial.params), trial.params
    assert seen["stats"] <= {(0, "concat"), (0, "gated")} and len(seen["stats"]) == 2
    assert {s for s, _ in seen["rm3"]} == {1, 2} and {f for _, f in seen["rm3"]} == {"film"}


def test_start_points_are_the_first_trials_and_the_rest_is_sampled(tmp_path):
    path = tmp_path / "s.yaml"
    points = "start:\n  - {backbone: stats, lr: 3.0e-3, model.hidden: 256}\n  - {backbone: mobileascnet}\n"
    path.write_text(START + points)
    space = load_search_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for point in space.start_points():
        study.enqueue_trial(point)
    first, second = (space.suggest(study.ask()) for _ in range(2))
    # The sampler's names differ from the file's (a backbone's own keys are "stats/model.hidden"):
    # the trial gets exactly the values the file gives, and a draw for the key it leaves out.
    assert (first["backbone"], first["lr"], first["model.hidden"], first["batch_size"]) == ("stats", 3e-3, 256, 64)
    assert first["model.fusion"] in ("concat", "film")
    assert second["backbone"] == "mobileascnet" and 1e-4 <= second["lr"] <= 1e-2
    # The pipeline's plan keeps only some backbones and fixes some values: those points and
    # values are dropped, not enqueued under names the trial never asks for.
    stats_fixed = {**space.backbones["stats"][0], "model.hidden": 128}
    planned = dataclasses.replace(space, backbones={"stats": (stats_fixed, {})})
    assert planned.start_points() == [{"lr": 3e-3}]


def test_the_default_space_starts_from_its_known_good_member():
    space = load_search_space("default")
    study = optuna.create_study()
    study.enqueue_trial(space.start_points()[0])
    values = space.suggest(study.ask())
    assert {k: values[k] for k in space.start[0]} == dict(space.start[0])
    assert values["backbone"] == "stats" and values["spec_augment"] == 0 and values["mixup_alpha"] == 0.0


def test_backbones_take_turns_from_their_start_points_then_with_the_rest_sampled():
    from raysc.search import backbone_turns

    space = load_search_space("default")
    planned = dataclasses.replace(space, backbones={k: space.backbones[k] for k in ("stats", "aisfx")})
    points = backbone_turns(planned.start_points(), list(planned.backbones), 7)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2))
    for point in points:
        study.enqueue_trial(point)
    trials = []
    for _ in range(7):
        trial = study.ask()
        trials.append(planned.suggest(trial))
        study.tell(trial, 0.9 if trials[-1]["backbone"] == "aisfx" else 0.5)  # TPE would favour aisfx
    assert [t["backbone"] for t in trials] == ["stats", "aisfx"] * 3 + ["stats"]
    # Each backbone's start point is its first turn; its later turns are drawn.
    assert trials[0]["lr"] == 3e-3 and trials[1]["model.input_dropout"] == 0.1
    assert len({t["lr"] for t in trials[2:]} - {3e-3}) == 5
    # A given point that names no backbone is not lost: it takes the next turn without a point.
    stats_start = planned.start_points()[0]
    assert backbone_turns([stats_start, {"lr": 1e-3}], ["stats", "aisfx"], 3) == [
        stats_start,
        {"lr": 1e-3, "backbone": "aisfx"},
        {"backbone": "stats"},
    ]
    # One backbone: no turns to take, the points as given.
    alone = dataclasses.replace(space, backbones={"stats": space.backbones["stats"]})
    assert backbone_turns(alone.start_points(), ["stats"], 7) == alone.start_points()
