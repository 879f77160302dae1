"""The weight optimizers, on functions with a known minimum."""
from __future__ import annotations

import pytest

from modecotd.weight_search import OPTIMIZERS, search_weights

TARGET = [1.0, -2.0]


def quadratic(weights):
    return sum((a - b) ** 2 for a, b in zip(weights, TARGET))


def candidates(batch):
    return [quadratic(w) for w in batch]


def loss_and_gradient(weights):
    return quadratic(weights), [2 * (a - b) for a, b in zip(weights, TARGET)]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("batch", [1, 4])
def test_every_optimizer_starts_at_the_start_point_and_improves(optimizer, batch):
    result = search_weights(candidates, 2, optimizer=optimizer, budget=48, bound=3.0, l1=0.0, seed=0, batch=batch,
                            loss_and_gradient=loss_and_gradient)
    assert result.evaluations == 48
    assert result.history[0]["weights"] == [0.0, 0.0]  # like the paper: the student as it is comes first
    assert result.objective == min(h["objective"] for h in result.history)
    assert result.objective < 0.5 * quadratic([0.0, 0.0])
    assert all(abs(x) <= 3.0 for h in result.history for x in h["weights"])


def test_gradient_descent_gets_close_to_the_minimum():
    result = search_weights(candidates, 2, optimizer="gradient", budget=60, bound=3.0, l1=0.0,
                            loss_and_gradient=loss_and_gradient, learning_rate=0.3)
    assert result.objective < 0.05


def test_l1_penalty_is_added_and_the_search_stops_at_the_target():
    result = search_weights(lambda ws: [0.0 for _ in ws], 1, optimizer="random", budget=5, bound=3.0, l1=0.5)
    for h in result.history:
        assert h["objective"] == pytest.approx(0.5 * abs(h["weights"][0]))
    early = search_weights(candidates, 2, optimizer="random", budget=40, bound=3.0, l1=0.0, target=100.0)
    assert early.evaluations == 1  # w = 0 already reaches the target


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown optimizer"):
        search_weights(candidates, 2, optimizer="sgd", budget=5, bound=3.0, l1=0.0)
    with pytest.raises(ValueError, match="start point"):
        search_weights(candidates, 2, budget=5, bound=1.0, l1=0.0, start=[2.0, 0.0])
    with pytest.raises(ValueError, match="loss_and_gradient"):
        search_weights(candidates, 2, optimizer="gradient", budget=5, bound=1.0, l1=0.0)
