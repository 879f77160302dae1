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


# --------------------------------------------------------------------------- orders

def one_expert_is_best(k: int, n: int):
    """Candidate losses where every expert alone helps (most at weight 1), expert ``k`` most, and
    mixing experts hurts: expert k alone at weight 1 is the optimum."""
    def losses(batch):
        out = []
        for w in batch:
            gain = sum((1.0 if i == k else 0.6) * x * (2 - x) for i, x in enumerate(w) if 0 <= x <= 2)
            clash = 0.5 * max(0.0, sum(map(abs, w)) - max(map(abs, w))) ** 2
            out.append(2.0 - 0.5 * gain + clash)
        return out
    return losses


PAPER_SEARCH = dict(optimizer="ngopt", budget=40, bound=3.0, l1=0.05)


def test_one_order_is_the_plain_search_in_the_list_order():
    from modecotd.weight_search import expert_orders, search_in_orders

    assert expert_orders(4, 1, seed=7) == [[0, 1, 2, 3]]
    [single] = search_in_orders(one_expert_is_best(2, 4), 4, orders=1, **PAPER_SEARCH)
    plain = search_weights(one_expert_is_best(2, 4), 4, **PAPER_SEARCH)
    assert single.order == [0, 1, 2, 3] and single.weights == plain.weights
    assert [h["weights"] for h in single.result.history] == [h["weights"] for h in plain.history]


def test_the_authors_single_order_keeps_the_first_expert_whatever_the_best_one_is():
    """The order effect the orders exist for (nevergrad's NGOpt, the paper's budget): in the list's
    order the first expert ends with the largest weight for every placement of the best one."""
    from modecotd.weight_search import search_in_orders

    n = 10
    for k in range(1, n):
        [search] = search_in_orders(one_expert_is_best(k, n), n, orders=1, **PAPER_SEARCH)
        assert max(range(n), key=lambda i: search.weights[i]) == 0, (k, search.weights)


def test_orders_are_seeded_permutations_and_each_search_speaks_the_experts_order():
    """Every order is a permutation drawn from the seed (the same again for the same seed), each
    search's weights come back in the experts' own order, and the kept search has the lowest
    objective. With NGOpt the best expert is found exactly when an order puts it first."""
    from modecotd.weight_search import expert_orders, kept_search, search_in_orders

    n = 6
    orders = expert_orders(n, 4, seed=3)
    assert len(orders) == 4 and all(sorted(o) == list(range(n)) for o in orders)
    assert orders == expert_orders(n, 4, seed=3) and orders != expert_orders(n, 4, seed=4)
    assert len({tuple(o) for o in orders}) == 4
    for k in range(n):
        searches = search_in_orders(one_expert_is_best(k, n), n, orders=4, seed=3, **PAPER_SEARCH)
        assert [s.order for s in searches] == orders
        for s in searches:  # the weights the search reports, mapped back: its history's best point
            best = min(s.result.history, key=lambda h: h["objective"])["weights"]
            assert all(s.weights[i] == best[j] for j, i in enumerate(s.order))
            assert s.result.objective == pytest.approx(one_expert_is_best(k, n)([s.weights])[0]
                                                       + 0.05 * sum(map(abs, s.weights)) / n)
        kept = kept_search(searches)
        assert kept.result.objective == min(s.result.objective for s in searches)
        found = max(range(n), key=lambda i: kept.weights[i]) == k
        assert found == any(order[0] == k for order in orders), (k, orders, kept.weights)


def test_orders_with_exact_gradients_reach_the_same_minimum_in_every_order():
    from modecotd.weight_search import search_in_orders

    target = [0.5, -1.0, 2.0]

    def losses(batch):
        return [sum((a - b) ** 2 for a, b in zip(w, target)) for w in batch]

    def gradient(w):
        return losses([w])[0], [2 * (a - b) for a, b in zip(w, target)]

    for s in search_in_orders(losses, 3, orders=3, seed=1, optimizer="gradient", budget=80, bound=3.0, l1=0.0,
                              loss_and_gradient=gradient, learning_rate=0.3):
        assert s.weights == pytest.approx(target, abs=0.1)
