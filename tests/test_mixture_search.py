"""The mixture stage's Tune pieces: early stopping within a target task, expert selection."""
from __future__ import annotations

from types import SimpleNamespace

import pytest


class Trial:
    """What the schedulers read of a Tune trial."""

    def __init__(self, trial_id: str, task: str):
        self.trial_id, self.config = trial_id, {"task": task}


@pytest.mark.parametrize("kind", ["asha", "median"])
def test_poor_settings_are_stopped_only_against_their_own_task(kind):
    from ray.tune.schedulers import TrialScheduler

    from modecotd.tuning.mixture_search import make_scheduler

    scheduler = make_scheduler(kind, cv_folds=3)
    trials = {name: Trial(name, task) for name, task in
              [("a1", "easy"), ("a2", "easy"), ("a3", "easy"), ("b1", "hard")]}
    for t in trials.values():
        scheduler.on_trial_add(None, t)
    controller = SimpleNamespace(get_live_trials=lambda: [])
    decisions = {}
    for name, loss in [("a1", 0.1), ("a2", 0.2), ("b1", 5.0), ("a3", 3.0)]:
        for iteration in (1, 2):
            result = {"cv_loss": loss, "training_iteration": iteration, "time_total_s": iteration}
            decisions[name, iteration] = scheduler.on_trial_result(controller, trials[name], result)
            if decisions[name, iteration] == TrialScheduler.STOP:
                break
    # the hard task's only setting is never compared with the easy task's much lower losses
    assert decisions["b1", 1] == decisions["b1", 2] == TrialScheduler.CONTINUE
    # the easy task's worst setting is stopped
    assert TrialScheduler.STOP in (decisions.get(("a3", 1)), decisions.get(("a3", 2)))


def test_no_scheduler_runs_every_setting():
    from ray.tune.schedulers import FIFOScheduler

    from modecotd.tuning.mixture_search import make_scheduler

    assert type(make_scheduler("none", 2)) is FIFOScheduler


def test_top_k_picks_the_experts_with_the_lowest_loss_alone(tiny_model_dir, tmp_path):
    import torch

    from modecotd.mixture import Mixture
    from modecotd.tasks.schema import AnswerKind
    from modecotd.tuning.mixture_search import top_experts
    from tests.test_mixture import ROWS, make_expert

    experts = {name: make_expert(tiny_model_dir, tmp_path / name, seed) for seed, name in enumerate("xyz")}
    mixture = Mixture(tiny_model_dir, experts, "delta")
    batch = mixture.batch_for(ROWS, AnswerKind.NUMBER, 128)
    alone = mixture.candidate_losses(batch, torch.eye(3))
    best_two = sorted(sorted(range(3), key=lambda i: alone[i])[:2])
    assert top_experts(mixture, batch, 2) == best_two
    assert top_experts(mixture, batch, None) == top_experts(mixture, batch, 5) == [0, 1, 2]
