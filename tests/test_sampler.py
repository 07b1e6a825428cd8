"""The search's Optuna searcher: what it tells Optuna, and what it must not tell twice."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from raysc.sampler import StopAwareOptunaSearch


def _searcher() -> StopAwareOptunaSearch:
    def space(trial: optuna.Trial) -> None:
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)

    return StopAwareOptunaSearch(
        space, metric="score", mode="max", sampler=optuna.samplers.RandomSampler(seed=0), study_name="s"
    )


def test_stopped_trials_are_pruned_with_their_values_per_step():
    searcher = _searcher()
    searcher.suggest("a")
    searcher.on_trial_result("a", {"score": 0.3, "steps": 10, "training_iteration": 1})
    searcher.on_trial_result("a", {"score": 0.2, "steps": 10, "training_iteration": 1})  # a retry repeats a step
    searcher.on_trial_result("a", {"score": 0.4, "steps": 20, "training_iteration": 2})
    searcher.on_trial_complete("a", {"score": 0.4, "steps": 20})  # stopped by ASHA: not final
    (trial,) = searcher._ot_study.get_trials()
    assert trial.state == TrialState.PRUNED
    assert trial.intermediate_values == {10: 0.3, 20: 0.4}


def test_a_trial_that_ended_after_the_restored_snapshot_is_not_told_again():
    searcher = _searcher()
    searcher.suggest("a")
    searcher.on_trial_result("a", {"score": 0.5, "steps": 10, "training_iteration": 1})
    # Its last result and its end were told before the kill, after Tune's last snapshot (which
    # knows step 10 only): the resumed Tune runs the trial again, and it reports step 20 again.
    study = searcher._ot_study
    before_the_kill = optuna.trial.Trial(study, study.get_trials()[0]._trial_id)  # the killed driver's
    before_the_kill.report(0.6, 20)
    study.tell(before_the_kill, 0.6)
    searcher.on_trial_result("a", {"score": 0.6, "steps": 20, "training_iteration": 2, "final": True})
    searcher.on_trial_complete("a", {"score": 0.6, "steps": 20, "final": True})
    (trial,) = searcher._ot_study.get_trials()
    assert trial.state == TrialState.COMPLETE and trial.value == 0.6
    assert trial.intermediate_values == {10: 0.5, 20: 0.6}


def test_trials_past_the_startup_ones_wait_until_those_have_ended():
    def space(trial: optuna.Trial) -> None:
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)

    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=2, constant_liar=True)
    searcher = StopAwareOptunaSearch(space, metric="score", mode="max", sampler=sampler, study_name="s", startup_gate=2)
    # Eight trials could start at once: the two start-up trials are asked, the third waits.
    assert searcher.suggest("a") and searcher.suggest("b")
    assert searcher.suggest("c") is None and searcher.suggest("c") is None
    searcher.on_trial_complete("a", {"score": 0.5, "steps": 10, "final": True})
    assert searcher.suggest("c") is None  # one of two ended: still random draws otherwise
    searcher.on_trial_result("b", {"score": 0.4, "steps": 10, "training_iteration": 1})
    searcher.on_trial_complete("b", {"score": 0.4, "steps": 10})  # stopped by ASHA: ended all the same
    assert searcher.suggest("c") and searcher.suggest("d")  # modelled on both, without a limit now
    states = [t.state for t in searcher._ot_study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.RUNNING]
    # Without a gate (random search, or one trial at a time) nothing waits.
    plain = _searcher()
    assert all(plain.suggest(t) for t in "abc")
