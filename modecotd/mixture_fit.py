"""Stage 3's method: one mixer setting fitted to one target task's few-shot rows.

A setting (method, budget, bound, L1, top-k) is scored by cross-validation over the few-shot rows:
weights fitted on k-1 folds, the loss on the held-out fold, fold after fold (so that a search can
stop a poor setting early); then the weights are fitted on all rows. ``lorahub`` and ``delta``
search one weight per expert (the ``top_k`` experts with the lowest loss alone, the others at 0)
with :func:`modecotd.weight_search.search_weights`; ``gate`` trains per-token routers instead
(on the task's rows, plus the other tasks' rows when they are pooled). Test data never enters.
How the settings are searched in parallel is Ray Tune's part (``tuning/mixture_search.py``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch

from modecotd.config import MIXER_CANDIDATES, WEIGHT_CONTROLS
from modecotd.mixture import Mixture
from modecotd.tasks.schema import AnswerKind
from modecotd.units import JsonRecord
from modecotd.weight_search import OrderedSearch, kept_search, search_in_orders


@dataclass(frozen=True)
class FitOptions:
    """The settings every mixer setting of a run shares."""

    optimizer: str
    start: float
    candidates_per_forward: int | str
    learning_rate: float
    seed: int
    cv_folds: int  # 0: no cross-validation (one setting, nothing to choose)
    max_length: int
    gate_steps: int
    gate_learning_rate: float
    objective: str = "token_mean"  # or per_row: the token mean divided by the rows (the authors' code)
    orders: int = 1  # weight searches per fit, each over the experts in its own seeded order (1: the list's order)


def fold_indices(n: int, k: int) -> list[list[int]]:
    """``k`` interleaved folds of ``n`` rows (at least 2, at most one row each)."""
    k = max(2, min(k, n))
    return [list(range(i, n, k)) for i in range(k)]


def forward_method(method: str) -> str:
    """How the student computes a setting's mixture: a fixed-weight control sums the updates (delta)."""
    return "delta" if method in WEIGHT_CONTROLS else method


def setting_label(setting: dict) -> str:
    """A readable name for one mixer setting (trial names, record files)."""
    if setting["method"] in ("gate", *WEIGHT_CONTROLS):
        return setting["method"]
    top_k = "all" if setting["top_k"] is None else setting["top_k"]
    return f"{setting['method']}-budget={setting['budget']}-bound={setting['bound']}-l1={setting['l1']}-top_k={top_k}"


def top_experts(mixture: Mixture, batch: dict, k: int | None) -> list[int]:
    """Indices of the k experts with the lowest few-shot loss on their own (all when k is None)."""
    n = len(mixture.names)
    if k is None or k >= n:
        return list(range(n))
    alone = mixture.candidate_losses(batch, torch.eye(n))
    return sorted(sorted(range(n), key=lambda i: alone[i])[:k])


def fit_weights(mixture: Mixture, batch: dict, chosen: list[int], setting: dict, options: FitOptions,
                on_evaluations: Callable[[int], None] = lambda count: None) -> list[OrderedSearch]:
    """Search the weights of the ``chosen`` experts (the others stay at 0) on ``batch``, once per
    order (:func:`~modecotd.weight_search.search_in_orders`); ``on_evaluations`` hears how many
    objective evaluations each forward made. Each search's weights are given for every expert."""
    n = len(mixture.names)

    def full(weights) -> torch.Tensor:
        w = torch.zeros(n)
        w[chosen] = torch.as_tensor(weights, dtype=torch.float32)
        return w

    def candidate_losses(candidates):
        losses = mixture.candidate_losses(batch, torch.stack([full(w) for w in candidates]))
        on_evaluations(len(candidates))
        return losses

    def loss_and_gradient(weights):
        loss, gradient = mixture.loss_and_gradient(batch, full(weights))
        on_evaluations(1)
        return loss, [gradient[i] for i in chosen]

    searches = search_in_orders(
        candidate_losses, len(chosen), orders=options.orders, optimizer=options.optimizer, budget=setting["budget"],
        bound=setting["bound"], l1=setting["l1"], seed=options.seed, start=[options.start] * len(chosen),
        batch=MIXER_CANDIDATES.resolve(options.candidates_per_forward, mixture.device),  # auto: by device
        loss_and_gradient=loss_and_gradient, learning_rate=options.learning_rate)
    return [OrderedSearch([chosen[i] for i in s.order], s.result, full(s.weights).tolist()) for s in searches]


ORDER_KEYS = ("orders", "weight_range", "largest_by_order", "kept_order", "order_agreement")  # order_summary's


def order_summary(names: list[str], searches: list[OrderedSearch]) -> dict:
    """How much the mixture depends on the order the search saw the experts in: each order's
    weights and objective, each expert's lowest and highest weight over the orders, the expert with
    the largest weight in each order, and the share of orders whose largest agrees with the kept
    search's."""
    largest = [names[max(range(len(s.weights)), key=lambda i: s.weights[i])] for s in searches]
    kept = largest[searches.index(kept_search(searches))]
    return {
        "orders": [{"order": [names[i] for i in s.order], "weights": dict(zip(names, s.weights)),
                    "objective": s.result.objective} for s in searches],
        "weight_range": {name: [min(s.weights[i] for s in searches), max(s.weights[i] for s in searches)]
                         for i, name in enumerate(names)},
        "largest_by_order": largest,
        "kept_order": searches.index(kept_search(searches)),
        "order_agreement": sum(name == kept for name in largest) / len(largest),
    }


@dataclass
class SettingRecord(JsonRecord):
    """What fitting one mixer setting to one target task found: its scores, the weights of its fit
    on every few-shot row and the search that led there (a gate's routers are saved beside it). The
    mix stage keeps the best setting's as its mixture and every setting's in ``search.json``."""

    task: str
    method: str  # as the student computes it: a fixed-weight control's is delta
    budget: int | None
    bound: float | None
    l1: float | None
    top_k: int | None
    setting: str  # its label (setting_label)
    cv_loss: float | None  # None: no folds (a control, or cross-validation off)
    fold_losses: list[float]
    objective: float  # the lowest objective of the fit on every row
    loss: str  # the objective's kind (FitOptions.objective)
    experts_mixed: list[str]
    history: list[dict]  # every objective evaluation of the final fit
    search_seconds: float
    evaluations: int
    precision: dict
    weights: dict[str, float]  # a gate's: its mean weights on the few-shot rows
    zero_weights_loss: float  # the student as it is, on every few-shot row
    control: str | None = None  # uniform | best_expert
    orders: list[dict] | None = None  # order_summary's, for a searched mixture
    weight_range: dict[str, list[float]] | None = None
    largest_by_order: list[str] | None = None
    kept_order: int | None = None
    order_agreement: float | None = None
    worker_pid: int | None = None  # set by the Tune trial that fitted it
    load_seconds: float = 0.0
    context_key: str = ""

    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ("control", *ORDER_KEYS)

    @property
    def score(self) -> float:
        """What settings are compared by: the CV loss, or the objective without folds."""
        return self.objective if self.cv_loss is None else self.cv_loss


class SettingFit:
    """One mixer setting on one target task: :meth:`fold` scores it fold by fold, :meth:`final`
    fits it on every few-shot row and returns its record."""

    def __init__(self, mixture: Mixture, task: str, rows: list[dict], kind: AnswerKind, setting: dict,
                 options: FitOptions, pooled: list[dict] = (),
                 on_evaluations: Callable[[int], None] = lambda count: None):
        self.mixture, self.task, self.rows, self.kind = mixture, task, rows, kind
        self.setting, self.options, self.on_evaluations = setting, options, on_evaluations
        self.gate = setting["method"] == "gate"
        self.control = setting["method"] if setting["method"] in WEIGHT_CONTROLS else None
        self.pooled = list(pooled) if self.gate else []
        mixture.use_method(forward_method(setting["method"]))
        mixture.objective = options.objective
        # a control has one setting and chooses nothing: no folds to score it on
        self.folds = fold_indices(len(rows), options.cv_folds) if options.cv_folds and not self.control else []
        self.every_row = list(range(len(rows)))
        self.all_rows = self._batch(self.every_row)  # tokenised once: expert choice, zero-weight loss, gate means
        self.chosen = (list(range(len(mixture.names))) if self.gate
                       else top_experts(mixture, self.all_rows, setting["top_k"]))
        self.held_out: list[float] = []
        self.evaluations = 0

    @property
    def evaluations_per_fit(self) -> int:
        if self.control:
            return len(self.mixture.names) if self.control == "best_expert" else 1
        return self.options.gate_steps if self.gate else self.setting["budget"] * max(1, self.options.orders)

    @property
    def cv_loss(self) -> float | None:
        return sum(self.held_out) / len(self.held_out) if self.held_out else None

    def fold(self, index: int) -> float:
        """Fit on every fold but ``index``; the loss on that one."""
        held = self.folds[index]
        weights, history, _, _ = self._fit([i for i in self.every_row if i not in held])
        self.evaluations += len(history)
        if not self.gate:
            self.mixture.set_weights(weights)
        self.held_out.append(self.mixture.few_shot_loss(self._batch(held)))
        return self.held_out[-1]

    def final(self, routers: Path) -> SettingRecord:
        """Fit on every few-shot row; the setting's record (a gate's routers are saved to ``routers``)."""
        weights, history, seconds, orders = self._fit(self.every_row)
        self.evaluations += len(history)
        mixture = self.mixture
        if self.gate:
            mixture.save_routers(routers)
            # for the heat map: the gate's mean weights on the few-shot rows
            weights = mixture.mean_gate_weights(self.all_rows)
            mixture.use_method("delta")  # for the loss of the student as it is (w = 0)
        searched = order_summary(mixture.names, orders) if orders else {}  # a control searches nothing
        mixture.set_weights(torch.zeros(len(mixture.names)))
        return SettingRecord(
            task=self.task, setting=setting_label(self.setting), method="delta" if self.control else self.setting["method"],
            **{k: self.setting[k] for k in ("budget", "bound", "l1", "top_k")}, cv_loss=self.cv_loss,
            fold_losses=self.held_out, objective=min(h["objective"] for h in history), loss=self.options.objective,
            experts_mixed=[mixture.names[i] for i in self.chosen], history=history, search_seconds=seconds,
            evaluations=self.evaluations, precision=mixture.precision.as_dict(),
            weights=dict(zip(mixture.names, weights)), zero_weights_loss=mixture.few_shot_loss(self.all_rows),
            control=self.control, **searched)

    def _control_weights(self, batch: dict) -> tuple[list[float], list[tuple[list[float], float]]]:
        """A fixed-weight control's weights on ``batch`` and the (weights, loss) pairs it looked at:
        1/n each (uniform), or the expert with the lowest loss alone at weight 1 (best_expert)."""
        n = len(self.mixture.names)
        if self.control == "uniform":
            candidates = [[1.0 / n] * n]
        else:
            candidates = torch.eye(n).tolist()
        losses = self.mixture.candidate_losses(batch, torch.tensor(candidates))
        self.on_evaluations(len(candidates))
        best = min(range(len(candidates)), key=lambda i: losses[i])
        return candidates[best], list(zip(candidates, losses))

    def _batch(self, indices, extra=()) -> dict:
        return self.mixture.batch_for([self.rows[i] for i in indices] + list(extra), self.kind,
                                      self.options.max_length)

    def _fit(self, indices: list[int]):
        """Fit on these few-shot rows; returns (weights or None for a gate, history, seconds, the
        searches of every order: none for a gate). The history holds every order's evaluations, each
        marked with its order's place."""
        started = time.time()
        if self.control:
            weights, losses = self._control_weights(self._batch(indices))
            return weights, [{"evaluation": i, "loss": loss, "objective": loss, "weights": w}
                             for i, (w, loss) in enumerate(losses)], time.time() - started, []
        if self.gate:
            losses = self.mixture.fit_gate(self._batch(indices, self.pooled), steps=self.options.gate_steps,
                                           learning_rate=self.options.gate_learning_rate, seed=self.options.seed,
                                           on_step=lambda: self.on_evaluations(1))
            return None, [{"evaluation": i, "loss": loss, "objective": loss} for i, loss in enumerate(losses)], \
                time.time() - started, []
        searches = fit_weights(self.mixture, self._batch(indices), self.chosen, self.setting, self.options,
                               self.on_evaluations)
        history = [{**h, "order": place} for place, s in enumerate(searches) for h in s.result.history]
        return kept_search(searches).weights, history, time.time() - started, searches
