"""The mixture stage's Tune pieces: early stopping within a target task, expert selection."""
from __future__ import annotations

from types import SimpleNamespace

import pytest


class Trial:
    """What the schedulers read of a Tune trial."""

    def __init__(self, trial_id: str, task: str):
        from modecotd.tuning.mixture_search import Cell

        self.trial_id, self.config = trial_id, {"cell": Cell(task, {"method": "gate"}).as_config()}


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
    from modecotd.mixture_fit import top_experts
    from tests.test_mixture import ROWS, make_expert

    experts = {name: make_expert(tiny_model_dir, tmp_path / name, seed) for seed, name in enumerate("xyz")}
    mixture = Mixture(tiny_model_dir, experts, "delta")
    batch = mixture.batch_for(ROWS, AnswerKind.NUMBER, 128)
    alone = mixture.candidate_losses(batch, torch.eye(3))
    best_two = sorted(sorted(range(3), key=lambda i: alone[i])[:2])
    assert top_experts(mixture, batch, 2) == best_two
    assert top_experts(mixture, batch, None) == top_experts(mixture, batch, 5) == [0, 1, 2]


def test_a_setting_is_scored_fold_by_fold_then_fitted_on_every_row(tiny_model_dir, tmp_path):
    """The method alone (modecotd.mixture_fit), without Tune: each fold's loss is that of weights
    fitted without its rows, and the record's weights are those of the fit on every row."""
    import torch

    from modecotd.mixture import Mixture
    from modecotd.mixture_fit import FitOptions, SettingFit
    from modecotd.tasks.schema import AnswerKind
    from tests.test_mixture import ROWS, make_expert

    experts = {name: make_expert(tiny_model_dir, tmp_path / name, seed) for seed, name in enumerate("xy")}
    mixture = Mixture(tiny_model_dir, experts, "lorahub")
    rows = ROWS * 2  # six rows, three folds of two
    options = FitOptions(optimizer="ngopt", start=0.0, candidates_per_forward=4, learning_rate=0.1, seed=0,
                         cv_folds=3, max_length=128, gate_steps=3, gate_learning_rate=0.01)
    setting = {"method": "lorahub", "budget": 6, "bound": 1.5, "l1": 0.05, "top_k": None}
    counted = []
    fit = SettingFit(mixture, "sums", rows, AnswerKind.NUMBER, setting, options, on_evaluations=counted.append)
    assert fit.folds == [[0, 3], [1, 4], [2, 5]] and fit.cv_loss is None
    losses = [fit.fold(i) for i in range(3)]
    assert fit.cv_loss == sum(losses) / 3
    record = fit.final(routers=tmp_path / "unused")
    assert record.fold_losses == losses and record.cv_loss == fit.cv_loss
    assert record.evaluations == sum(counted) and len(record.history) <= sum(counted)
    assert set(record.weights) == {"x", "y"} and all(abs(w) <= 1.5 for w in record.weights.values())
    # the record's weights give the objective the search reports (loss + l1 * mean |w| on all rows)
    weights = [record.weights["x"], record.weights["y"]]
    mixture.set_weights(torch.tensor(weights))
    loss = mixture.few_shot_loss(mixture.batch_for(rows, AnswerKind.NUMBER, 128))
    assert abs(record.objective - (loss + 0.05 * sum(map(abs, weights)) / 2)) < 1e-3
    assert record.zero_weights_loss > 0 and record.experts_mixed == ["x", "y"]


def test_the_per_row_objective_is_the_token_mean_over_the_rows(tiny_model_dir, tmp_path):
    """The authors' few-shot loss: the token-mean cross-entropy of the batch divided by its rows,
    so that the same l1 weighs (rows) times more than under our token mean."""
    import torch

    from modecotd.mixture import Mixture
    from modecotd.tasks.schema import AnswerKind
    from tests.test_mixture import ROWS, make_expert

    experts = {name: make_expert(tiny_model_dir, tmp_path / name, seed) for seed, name in enumerate("xy")}
    mixture = Mixture(tiny_model_dir, experts, "lorahub")
    batch = mixture.batch_for(ROWS, AnswerKind.NUMBER, 128)
    weights = torch.tensor([[0.5, -0.25], [1.0, 0.0]])
    token_mean = mixture.candidate_losses(batch, weights)
    mixture.objective = "per_row"
    per_row = mixture.candidate_losses(batch, weights)
    assert per_row == pytest.approx([loss / len(ROWS) for loss in token_mean], rel=1e-5)
    loss, gradient = mixture.loss_and_gradient(batch, [0.5, -0.25])
    assert loss == pytest.approx(per_row[0], rel=1e-4)


def test_the_fixed_weight_controls_choose_nothing_by_cross_validation(tiny_model_dir, tmp_path):
    """uniform is every expert's update at weight 1/n; best_expert is the one expert with the lowest
    few-shot loss alone, at weight 1. Both sum the updates (delta) and have no folds to score."""
    import torch

    from modecotd.mixture import Mixture
    from modecotd.mixture_fit import FitOptions, SettingFit
    from modecotd.tasks.schema import AnswerKind
    from tests.test_mixture import ROWS, make_expert

    experts = {name: make_expert(tiny_model_dir, tmp_path / name, seed) for seed, name in enumerate("xyz")}
    mixture = Mixture(tiny_model_dir, experts, "lorahub")
    options = FitOptions(optimizer="ngopt", start=0.0, candidates_per_forward=4, learning_rate=0.1, seed=0,
                         cv_folds=3, max_length=128, gate_steps=3, gate_learning_rate=0.01, orders=3)
    batch = mixture.batch_for(ROWS, AnswerKind.NUMBER, 128)
    mixture.use_method("delta")
    alone = mixture.candidate_losses(batch, torch.eye(3))
    records = {}
    for control in ("uniform", "best_expert"):
        setting = {"method": control, "budget": None, "bound": None, "l1": None, "top_k": None}
        counted = []
        fit = SettingFit(mixture, "sums", ROWS, AnswerKind.NUMBER, setting, options, on_evaluations=counted.append)
        assert fit.folds == [] and fit.evaluations_per_fit == (3 if control == "best_expert" else 1)
        records[control] = fit.final(routers=tmp_path / "unused")
        assert records[control].method == "delta" and records[control].control == control
        assert records[control].setting == control and records[control].cv_loss is None
        assert sum(counted) == fit.evaluations_per_fit and "orders" not in records[control].to_json()
    assert records["uniform"].weights == pytest.approx({"x": 1 / 3, "y": 1 / 3, "z": 1 / 3})
    best = "xyz"[min(range(3), key=lambda i: alone[i])]
    assert records["best_expert"].weights == {n: float(n == best) for n in "xyz"}
    assert records["best_expert"].objective == pytest.approx(min(alone), rel=1e-5)


def test_a_tie_goes_to_the_setting_listed_first_whatever_order_the_trials_finished_in():
    from modecotd.mixture_fit import SettingRecord
    from modecotd.tuning.mixture_search import best_record

    def scored(setting, cv_loss, objective=1.0):
        return SettingRecord(task="t", method=setting.split("-")[0], budget=None, bound=None, l1=None, top_k=None,
                             setting=setting, cv_loss=cv_loss, fold_losses=[], objective=objective, loss="token_mean",
                             experts_mixed=[], history=[], search_seconds=0.0, evaluations=0, precision={},
                             weights={}, zero_weights_loss=0.0)

    order = ["lorahub-b4", "delta-b4", "gate"]
    equal = [scored("gate", 10.646644592285156), scored("delta-b4", 10.646644592285156 + 2e-6),  # last bits differ
             scored("lorahub-b4", 10.646644592285156)]
    for records in (equal, equal[::-1], equal[1:] + equal[:1]):
        assert best_record(records, order).setting == "lorahub-b4"
    lower = [*equal, scored("delta-b8", 10.5)]
    assert best_record(lower, order).setting == "delta-b8"  # a real difference still decides
    no_folds = [scored("gate", None, 2.0), scored("delta-b4", None, 3.0)]
    assert best_record(no_folds, order).setting == "gate"


def test_a_trial_stopped_early_leaves_a_checkpoint_that_holds_no_record(tmp_path):
    """Tune checkpoints a trial its scheduler stopped too (checkpoint_at_end): that checkpoint is not
    empty (an object store keeps no empty folder) and is read as no scored setting."""
    from ray import tune

    from modecotd.tuning.mixture_search import STOPPED, MixtureTrial, Scored

    folder = tmp_path / "checkpoint_000000"
    folder.mkdir()
    MixtureTrial.save_checkpoint(SimpleNamespace(record=None), str(folder))
    assert [p.name for p in folder.iterdir()] == [STOPPED]
    stopped = SimpleNamespace(error=None, checkpoint=tune.Checkpoint.from_directory(str(folder)))
    assert Scored.of(stopped) is None
    assert Scored.of(SimpleNamespace(error=None, checkpoint=None)) is None
