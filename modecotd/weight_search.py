"""Searching a mixture's weights: minimise ``loss(w) + l1 * mean|w|`` over ``[-bound, bound]^n``.

Every optimizer is driven through ask/tell, asking ``batch`` candidates at a time so that they
are evaluated together (one batched forward, see :meth:`modecotd.mixture.Mixture.candidate_losses`):

- ``ngopt``: Nevergrad's NGOpt, the paper's; one candidate at a time (for a few weights and a
  budget of tens it runs COBYLA, which is sequential; told of parallel candidates it switches to
  its MetaModel, which fails under numpy 2 in nevergrad 1.0.12);
- ``tpe`` and ``cmaes``: Optuna's samplers;
- ``random``: uniform candidates;
- ``gradient``: first a batched initial design (the start point, the experts' plain average, each
  expert alone), then Adam on the weights from the best of those that is not all zero, with the
  loss's exact gradient (one forward and backward per step) and the L1 term's subgradient, kept
  inside the bounds. (At w = 0 the lorahub update, bilinear in w, has a zero gradient.)

All evaluate ``start`` first (the paper's is w = 0: the student as it is).
"""
from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

OPTIMIZERS = ("ngopt", "tpe", "cmaes", "random", "gradient")

Candidates = Callable[[list[list[float]]], list[float]]  # losses of candidate weight vectors
LossAndGradient = Callable[[list[float]], tuple[float, list[float]]]


@dataclass
class SearchResult:
    weights: list[float]
    objective: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def evaluations(self) -> int:
        return len(self.history)


class _Search:
    """Bookkeeping shared by every optimizer: the objective, the history, the best so far, the
    budget and the early stop at ``target``."""

    def __init__(self, budget: int, l1: float, target: float | None):
        self.budget, self.l1, self.target = budget, l1, target
        self.history: list[dict] = []
        self.best: tuple[float, list[float]] | None = None
        self.started = time.time()

    def record(self, weights: list[float], loss: float) -> float:
        value = loss + self.l1 * sum(abs(x) for x in weights) / len(weights)
        self.history.append({"evaluation": len(self.history), "loss": loss, "objective": value, "weights": weights,
                             "seconds": time.time() - self.started})
        if self.best is None or value < self.best[0]:
            self.best = (value, weights)
        return value

    @property
    def left(self) -> int:
        return self.budget - len(self.history)

    @property
    def finished(self) -> bool:
        reached = self.target is not None and self.best is not None and self.best[0] <= self.target
        return self.left <= 0 or reached

    def result(self) -> SearchResult:
        assert self.best is not None
        return SearchResult(weights=self.best[1], objective=self.best[0], history=self.history,
                            seconds=time.time() - self.started)


def search_weights(candidate_losses: Candidates, n: int, *, optimizer: str = "ngopt", budget: int, bound: float,
                   l1: float, seed: int = 0, start: Sequence[float] | None = None, batch: int = 1,
                   loss_and_gradient: LossAndGradient | None = None, learning_rate: float = 0.2,
                   target: float | None = None) -> SearchResult:
    """Minimise the objective with ``optimizer`` in at most ``budget`` evaluations (stopping early
    once the objective is at or below ``target``, when given)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; one of {', '.join(OPTIMIZERS)}")
    if budget < 1:
        raise ValueError("budget must be at least 1")
    start = [float(x) for x in (start if start is not None else [0.0] * n)]
    if len(start) != n or any(abs(x) > bound for x in start):
        raise ValueError(f"start point must have {n} weights within [-{bound}, {bound}]")
    search = _Search(budget, l1, target)
    batch = 1 if optimizer == "ngopt" else max(1, batch)
    if optimizer == "gradient":
        if loss_and_gradient is None:
            raise ValueError("the gradient optimizer needs loss_and_gradient")
        design = [start, [min(bound, 1.0 / n)] * n] + [[min(bound, 1.0) if j == i else 0.0 for j in range(n)]
                                                      for i in range(n)]
        design = design[:budget]
        values = [search.record(w, loss) for w, loss in zip(design, candidate_losses(design))]
        moving = [(value, w) for value, w in zip(values, design) if any(design_w != 0 for design_w in w)]
        if moving and not search.finished:
            _adam(search, loss_and_gradient, min(moving)[1], bound, learning_rate)
        return search.result()
    ask, tell = _ask_tell(optimizer, n, budget, bound, seed, start)
    while not search.finished:
        asked = ask(min(batch, search.left))
        weights = [[max(-bound, min(bound, float(x))) for x in w] for w, _ in asked]
        for w, (_, token), loss in zip(weights, asked, candidate_losses(weights)):
            tell(token, search.record(w, loss))
    return search.result()


def expert_orders(n: int, orders: int, seed: int) -> list[list[int]]:
    """The orders a search sees ``n`` experts in: their own order for one search (the authors'
    setting, where the result depends on it: NGOpt's first step moves the first weight only), else
    ``orders`` permutations drawn with ``seed`` (the same on every run and machine)."""
    if orders <= 1:
        return [list(range(n))]
    drawn = []
    for index in range(orders):
        order = list(range(n))
        random.Random(seed * 1_000_003 + index).shuffle(order)
        drawn.append(order)
    return drawn


@dataclass
class OrderedSearch:
    """One search over the experts in one order (``order[j]``: the expert the search's j-th weight
    is), its result in the search's own coordinates, and the weights in the experts' order."""

    order: list[int]
    result: SearchResult
    weights: list[float]


def search_in_orders(candidate_losses: Candidates, n: int, *, orders: int, seed: int = 0,
                     start: Sequence[float] | None = None, loss_and_gradient: LossAndGradient | None = None,
                     **search) -> list[OrderedSearch]:
    """:func:`search_weights` once per order of :func:`expert_orders`, each with the whole budget.
    ``candidate_losses``, ``loss_and_gradient`` and ``start`` speak in the experts' own order; each
    search sees the weights permuted. Returns the searches in the order they ran (the kept one:
    :func:`kept_search`)."""
    start = [float(x) for x in (start if start is not None else [0.0] * n)]
    out = []
    for order in expert_orders(n, orders, seed):
        def unpermute(w, order=order) -> list[float]:
            full = [0.0] * n
            for j, i in enumerate(order):
                full[i] = w[j]
            return full

        def permuted_losses(candidates, unpermute=unpermute):
            return candidate_losses([unpermute(w) for w in candidates])

        permuted_gradient = None
        if loss_and_gradient is not None:
            def permuted_gradient(w, unpermute=unpermute, order=order):
                loss, gradient = loss_and_gradient(unpermute(w))
                return loss, [gradient[i] for i in order]

        result = search_weights(permuted_losses, n, seed=seed, start=[start[i] for i in order],
                                loss_and_gradient=permuted_gradient, **search)
        out.append(OrderedSearch(order, result, unpermute(result.weights)))
    return out


def kept_search(searches: list[OrderedSearch]) -> OrderedSearch:
    """The search whose weights a mixture keeps: the lowest objective (the first such one)."""
    return min(searches, key=lambda s: s.result.objective)


def _ask_tell(optimizer: str, n: int, budget: int, bound: float, seed: int, start: list[float]):
    """``ask(k) -> [(weights, token)]`` and ``tell(token, value)`` for a gradient-free optimizer."""
    if optimizer == "ngopt":
        import nevergrad as ng
        import numpy as np

        warnings.filterwarnings("ignore", message="COBYLA", category=UserWarning)  # NGOpt's own settings
        parametrization = ng.p.Array(init=np.array(start), lower=-bound, upper=bound)
        parametrization.random_state = np.random.RandomState(seed)
        ng_optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)

        def ask(k):
            return [(list(c.value), c) for c in (ng_optimizer.ask() for _ in range(k))]

        return ask, lambda token, value: ng_optimizer.tell(token, value)
    if optimizer in ("tpe", "cmaes"):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        names = [f"w{i}" for i in range(n)]
        # CMA-ES centres on the middle of the bounds (w = 0) with sigma bound / 3; the start point is
        # the first trial for both samplers.
        sampler = (optuna.samplers.TPESampler(seed=seed) if optimizer == "tpe" else
                   optuna.samplers.CmaEsSampler(seed=seed))
        study = optuna.create_study(direction="minimize", sampler=sampler)
        study.enqueue_trial(dict(zip(names, start)))

        def ask(k):
            trials = [study.ask() for _ in range(k)]
            return [([t.suggest_float(name, -bound, bound) for name in names], t) for t in trials]

        return ask, lambda token, value: study.tell(token, value)
    import random

    rng = random.Random(seed)
    first = [True]

    def ask(k):
        out = []
        for _ in range(k):
            out.append((start if first[0] else [rng.uniform(-bound, bound) for _ in range(n)], None))
            first[0] = False
        return out

    return ask, lambda token, value: None


def _adam(search: _Search, loss_and_gradient: LossAndGradient, start: list[float], bound: float,
          learning_rate: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """Projected Adam on the objective: the loss's gradient plus the L1 term's subgradient."""
    n = len(start)
    w, m, v = list(start), [0.0] * n, [0.0] * n
    step = 0
    while not search.finished:
        loss, gradient = loss_and_gradient(w)
        search.record(list(w), loss)
        step += 1
        for i in range(n):
            sign = (w[i] > 0) - (w[i] < 0)
            g = gradient[i] + search.l1 * sign / n
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            update = learning_rate * (m[i] / (1 - betas[0] ** step)) / ((v[i] / (1 - betas[1] ** step)) ** 0.5 + eps)
            w[i] = max(-bound, min(bound, w[i] - update))
