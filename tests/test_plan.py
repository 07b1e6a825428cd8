"""The pipeline's plan: measured step times, networks shrunk or left out when they cannot fit."""

from __future__ import annotations

import yaml
from conftest import FRONTEND

from raysc import plan
from raysc.datafolder import load_dataset
from raysc.search_space import load_search_space


def _space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "fixed": {"model.frontend": FRONTEND, "batch_size": 16},
                "backbones": {"stats": {}, "setrans": {"model.width": 1.0}, "mobileascnet": {}},
                "scheduler": {"grace_steps": 2, "reduction_factor": 2, "max_epochs": 4},
            }
        )
    )
    return load_search_space(path)


def test_seconds_per_step_is_measured_once_per_config_and_machine(prepared):
    data = load_dataset(prepared.out)
    values = {"backbone": "stats", "model.frontend": FRONTEND, "batch_size": 16}
    first = plan.seconds_per_step(values, data, threads=1)
    assert first > 0
    assert plan.seconds_per_step(values, data, threads=1) == first  # remembered, not measured again
    assert list((prepared.out / "features").glob("step-seconds-*.json"))


def test_a_network_that_cannot_reach_the_grace_period_is_shrunk_or_left_out(prepared, tmp_path, monkeypatch):
    # Planted step times: stats is cheap, setrans (width fixed) costly, mobileascnet fits at half width.
    cost = {"stats": 0.001, "setrans": 10.0, "mobileascnet": {1.0: 10.0, 0.5: 0.002, 0.25: 0.001}}

    def planted(values, data, *, threads, steps=3):
        c = cost[values["backbone"]]
        return c[values["model.width"]] if isinstance(c, dict) else c

    monkeypatch.setattr(plan, "seconds_per_step", planted)
    space = _space(tmp_path)
    plans = plan.plan_space(space, load_dataset(prepared.out), budget_minutes=1.0, concurrency=1, threads=1)
    by = {p.backbone: p for p in plans}
    assert by["stats"].fits and not by["setrans"].fits
    assert by["mobileascnet"].fits and by["mobileascnet"].width == 0.5
    steps = by["setrans"].steps_per_epoch
    assert f"holds 0 epoch(s) of {steps} steps, short of 2x ASHA's grace period (2 steps)" in by["setrans"].reason
    lines = plan.describe(plans)
    assert any("setrans" in line and "left out" in line for line in lines)
    planned = plan.restore_space(space, plan.kept(plans))
    assert set(planned.backbones) == {"stats", "mobileascnet"}
    assert planned.backbones["mobileascnet"][0]["model.width"] == 0.5
    # Each kept backbone's schedule is what a quarter of the round's trial time holds, at most max_epochs.
    assert by["stats"].epochs == 4 and planned.backbones["stats"][0]["epochs"] == 4
    share = 60 / plan.TRIAL_SHARE  # one minute of budget, one trial at once
    assert by["mobileascnet"].epochs == min(4, int(share // by["mobileascnet"].epoch_seconds))
    # A round of one trial (the baseline's) gives it the whole round, whatever the slots: setrans
    # at 25 s an epoch gets two epochs of the one minute, not an eighth of it.
    cost["setrans"] = 25 / (by["setrans"].epoch_seconds / by["setrans"].seconds_per_step)
    one = plan.plan_space(space, load_dataset(prepared.out), budget_minutes=1.0, concurrency=2, threads=1, trials=1)
    (alone,) = [p for p in one if p.backbone == "setrans"]
    assert alone.epochs == 2 and "1.0 min a trial (1/1 of the round's trial time)" in alone.reason


def test_a_planned_schedule_reaches_the_trials(tmp_path):
    from raysc.search import SearchSettings, _trial_values

    planned = plan.restore_space(_space(tmp_path), {"stats": {"width": None, "epochs": 3}, "setrans": None})
    settings = SearchSettings(max_epochs=4)
    assert _trial_values(planned, {"backbone": "stats"}, settings)["epochs"] == 3
    assert _trial_values(planned, {"backbone": "setrans"}, settings)["epochs"] == 4  # the search's max_epochs
