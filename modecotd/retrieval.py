"""The expert-retrieval check: does a mixer find the expert a new task needs, wherever it stands
in the list of experts?

K seen tasks, one expert each; for each a twin target, an unseen task that needs that expert's
skill told in other words (:data:`modecotd.tasks.generators.WORDINGS`), so the expert it should
lean on is known. For each mixer, each twin and each placement of the matching expert in the list
the mixer is given (first, second, ..., last; the others keep their cyclic order), the mixture is
fitted on the twin's few-shot rows. Retrieved: the largest weight is the matching expert's. A
mixer that works retrieves in every placement; the paper's search (one order, NGOpt from w = 0)
keeps the first expert of the list instead. Optionally the mixture's test accuracy beside the
matching expert alone, the base student and the uniform average.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from modecotd.mixture import Mixture
from modecotd.mixture_fit import FitOptions, fit_weights
from modecotd.tasks.schema import AnswerKind

# Mixers the check compares, each one way to weigh the experts from the few-shot rows.
AUTHORS = "lorahub, 1 order (the authors')"


@dataclass(frozen=True)
class Mixer:
    """One way to weigh the experts: a weight search (``method`` lorahub or delta with ``options``
    and ``setting``), the best expert alone by few-shot loss (``best_expert``) or the gate."""

    label: str
    method: str  # lorahub | delta | best_expert | gate
    setting: dict = field(default_factory=dict)  # budget, bound, l1 of a weight search
    options: FitOptions | None = None


@dataclass(frozen=True)
class Twin:
    """A target task whose matching expert is known."""

    name: str
    expert: str
    kind: AnswerKind
    fewshot: list[dict]
    test: list[dict] = field(default_factory=list)


def placements(names: list[str], expert: str) -> list[list[str]]:
    """The expert lists a mixer is given: ``expert`` first, second, ..., last, the others in the
    cyclic order of ``names`` after it."""
    others = names[names.index(expert) + 1:] + names[:names.index(expert)]
    return [others[:position] + [expert] + others[position:] for position in range(len(names))]


def mixer_weights(mixture: Mixture, mixer: Mixer, rows: list[dict], kind: AnswerKind, order: list[int],
                  max_length: int, seed: int = 0) -> tuple[list[float], int]:
    """The weight of every expert (in the mixture's order) that ``mixer`` gives on ``rows`` when
    the experts are listed in ``order`` (indices), and how many objective evaluations it made."""
    batch = mixture.batch_for(rows, kind, max_length)
    n = len(mixture.names)
    if mixer.method == "best_expert":
        mixture.use_method("delta")
        losses = mixture.candidate_losses(batch, torch.eye(n))
        best = min(order, key=lambda i: losses[i])  # ties: the first listed
        return [float(i == best) for i in range(n)], n
    if mixer.method == "gate":
        mixture.fit_gate(batch, steps=mixer.options.gate_steps, learning_rate=mixer.options.gate_learning_rate,
                         seed=seed)
        return mixture.mean_gate_weights(batch), mixer.options.gate_steps
    mixture.use_method(mixer.method)
    mixture.objective = mixer.options.objective
    searches = fit_weights(mixture, batch, order, mixer.setting, mixer.options)
    kept = min(searches, key=lambda s: s.result.objective)
    return kept.weights, sum(s.result.evaluations for s in searches)


ORDER_FREE = ("gate",)  # mixers whose result cannot depend on the list's order: fitted once per twin


def run_check(mixture: Mixture, mixers: list[Mixer], twins: list[Twin], *, max_length: int,
              accuracy: Callable[[Mixer, list[float], Twin], dict] | None = None,
              say: Callable[[str], None] = lambda line: None) -> dict:
    """Every mixer on every twin in every placement of its expert: the weights, whether the
    matching expert got the largest, and (with ``accuracy``: the test accuracy of a mixer's weight
    vector on a twin, called right after the fit) each distinct mixture's accuracy. Returns the rows
    and the retrieval rate per mixer and per placement."""
    names = mixture.names
    rows, scored, fitted = [], {}, {}
    for twin in twins:
        for position, listed in enumerate(placements(names, twin.expert)):
            order = [names.index(name) for name in listed]
            for mixer in mixers:
                started = time.time()
                once = (twin.name, mixer.label) if mixer.method in ORDER_FREE else None
                if once in fitted:
                    weights, evaluations = fitted[once]
                else:
                    weights, evaluations = mixer_weights(mixture, mixer, twin.fewshot, twin.kind, order, max_length)
                    if once:
                        fitted[once] = weights, evaluations
                largest = names[max(range(len(names)), key=lambda i: weights[i])]
                row = {"twin": twin.name, "expert": twin.expert, "position": position, "mixer": mixer.label,
                       "weights": dict(zip(names, weights)), "largest": largest, "retrieved": largest == twin.expert,
                       "first_listed": listed[0], "evaluations": evaluations, "seconds": time.time() - started}
                if accuracy is not None and twin.test:
                    key = (twin.name, mixer.label if once else mixer.method, tuple(round(w, 4) for w in weights))
                    if key not in scored:
                        scored[key] = accuracy(mixer, weights, twin)
                    row["accuracy"] = scored[key]
                rows.append(row)
                say(f"{twin.name} ({twin.expert} at position {position + 1}) {mixer.label}: largest {largest}"
                    f"{' (retrieved)' if row['retrieved'] else ''}" +
                    (f", accuracy {_readings(row['accuracy'])}" if "accuracy" in row else ""))
    return {"rows": rows, "summary": summarize_check(rows, [m.label for m in mixers], len(names))}


def _readings(accuracy: dict) -> str:
    return ", ".join(f"{key} {'–' if value is None else f'{100 * value:.1f}'}" for key, value in accuracy.items())


def summarize_check(rows: list[dict], mixers: list[str], experts: int) -> dict:
    """Retrieval rate per mixer overall and per placement of the matching expert, how often the
    first listed expert got the largest weight, and the mean of each accuracy reading where it was
    measured (``accuracy``: a dict of readings, e.g. strict and likelihood)."""
    out = {}
    for mixer in mixers:
        mine = [r for r in rows if r["mixer"] == mixer]
        if not mine:
            continue
        by_position = {p: [r["retrieved"] for r in mine if r["position"] == p] for p in range(experts)}
        accuracies = [r["accuracy"] for r in mine if "accuracy" in r]
        readings = {key: [a[key] for a in accuracies if a.get(key) is not None] for a in accuracies for key in a}
        out[mixer] = {
            "retrieval_rate": sum(r["retrieved"] for r in mine) / len(mine),
            "retrieval_by_position": {p + 1: sum(v) / len(v) for p, v in by_position.items() if v},
            "first_listed_largest": sum(r["largest"] == r["first_listed"] for r in mine) / len(mine),
            "fits": len(mine),
            "mean_accuracy": {key: sum(v) / len(v) for key, v in readings.items() if v} if accuracies else None,
            "evaluations_per_fit": sum(r["evaluations"] for r in mine) / len(mine),
        }
    return out


def authors_and_ours(budget: int = 40, orders: int = 3, seed: int = 0, gate_steps: int = 15,
                     max_length: int = 256) -> list[Mixer]:
    """The mixers the check compares by default: the paper's search as its authors ran it (NGOpt,
    budget 40, bounds 3, L1 0.05 on their per-row loss, one order), the same over ``orders``
    seeded orders, the exact weighted sum searched with gradients, the best expert alone and the
    gate."""
    def options(optimizer: str, n_orders: int, objective: str) -> FitOptions:
        return FitOptions(optimizer=optimizer, start=0.0, candidates_per_forward="auto", learning_rate=0.2,
                          seed=seed, cv_folds=0, max_length=max_length, gate_steps=gate_steps,
                          gate_learning_rate=1e-2, objective=objective, orders=n_orders)

    search = {"budget": budget, "bound": 3.0, "l1": 0.05, "top_k": None}
    return [Mixer(AUTHORS, "lorahub", {**search, "method": "lorahub"}, options("ngopt", 1, "per_row")),
            Mixer(f"lorahub, {orders} orders", "lorahub", {**search, "method": "lorahub"},
                  options("ngopt", orders, "per_row")),
            Mixer("delta, gradient", "delta", {**search, "method": "delta"}, options("gradient", 1, "token_mean")),
            Mixer("best expert", "best_expert", {}, options("ngopt", 1, "token_mean")),
            Mixer("gate", "gate", {}, options("ngopt", 1, "token_mean"))]


def load_mixture(student_dir: Path, experts: dict[str, Path], dtype: str = "auto") -> Mixture:
    return Mixture(Path(student_dir), {name: Path(path) for name, path in experts.items()}, "lorahub", dtype)
