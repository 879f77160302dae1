"""Mixture search: the paper's procedure as its released code runs it, against ours, on several
target tasks in one run.

Experts and targets, one of:
- ``--run RUN`` (e.g. runs/paper-small): the run's seen-task experts (the paper data's ten) and,
  as targets, ``--targets`` (default: two unseen and three seen tasks of that run), each with the
  mixer's few-shot rows and the first ``--test`` test questions as the run drew them;
- no ``--run``: three small q,v LoRA experts trained here on generated tasks (arithmetic,
  last-letter concatenation, object tracking; cached after the first run) and one generated
  unseen target, coin flip;
- ``--quick`` (for the tests; its figures say nothing about speed or quality): every part on the
  tiny random student (``builtin:tiny``), torch on one thread, with 2 few-shot rows, budgets of 10
  evaluations (the reference's and ours), 4 test questions and 8 new tokens. The three experts are
  trained here on each call (16 rows, one epoch; never cached) straight into ``experts/<task>/`` of
  a temporary run folder whose ``config.yaml`` is written as the pipeline's driver writes it (the
  validated config, dumped); that folder is then read back through the ``--run`` path. Targets: the
  generated coin flip, then the folder's unseen task (an arithmetic comparison) and its first seen
  task (``--targets``: others of the folder's), each marked with its ``source`` (generated or run).
  With ``--run``, ``--quick`` keeps the run's student and few-shot rows and makes the rest small.

Reference (LoraHub's released code, step for step): the student in fp32 with a peft LoRA slot;
Nevergrad NGOpt, budget 40, bounds [-3, 3], start at 0; for each candidate, build the combined LoRA
state dict (A and B each summed with the weights), load it with ``set_peft_model_state_dict`` and
take the model's own loss over the few-shot batch; the objective is that loss divided by the
number of few-shot rows plus 0.05 * mean|w| (the authors' code). It records the best objective it
reaches, when, and its wall time.

Ours: :class:`modecotd.mixture.Mixture` (the CPU's native dtype, eager attention on CPUs, logits
only where targets are, weights set in place) with the same objective, searched with
``--optimizer`` (default ``gradient``: a batched initial design of w = 0, the experts' average and
each expert alone, then Adam with exact gradients) until it reaches the reference's best (time to
target) and again for the reference's 40 evaluations (objective at equal evaluations); both scored
again with the reference's own fp32 objective. Then the test accuracy (greedy, strict scoring) of
the reference's weights and of ours after those evaluations, and of w = 0 (the student alone). Where a
trivial start (w = 0, the average, one expert) already beats the reference, the JSON says so.

    python -m benchmarks.mixture_search [--run runs/paper-small] [--targets a,b,c] [--test 50]
    python -m benchmarks.mixture_search --quick      # builtin:tiny: every part, the --run path too

Last line: one JSON object with the figures per target and over all targets.
"""
from __future__ import annotations

import argparse
import json
import statistics
import logging
import os
import tempfile
import time
from pathlib import Path

from modecotd.models import BUILTIN_SMOLLM2, BUILTIN_TINY

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GOAL_RATIO = 5.0
MODEL = BUILTIN_SMOLLM2
EXPERT_FAMILIES = {"arithmetic": "number", "last_letter_concatenation": "text",
                   "tracking_shuffled_objects": "choice"}
TARGET_FAMILY, TARGET_KIND = "coin_flip", "yes_no"
REFERENCE = dict(budget=40, bound=3.0, l1=0.05)
MAX_LENGTH = 512
FULL = dict(test=50, max_new_tokens=128, eval_batch=50, expert_rows=64, expert_epochs=2.0, fewshot=5,
            reference_budget=REFERENCE["budget"], budget_ours=40)
# --quick: every part on a tiny random Llama, small sizes (figures that only show the parts run). Its
# 49,152-token vocabulary makes each few-shot forward cost ~0.1 s per row on one thread: few rows, few
# evaluations, three targets (the generated one, then the run folder's unseen task and one seen task).
QUICK = dict(test=4, max_new_tokens=8, eval_batch=4, expert_rows=16, expert_epochs=1.0, fewshot=2,
             reference_budget=10, budget_ours=10)
QUICK_RUN_UNSEEN = ("comparison", "arithmetic_comparison")  # the quick run folder's unseen task and its family
QUICK_RUN_TARGETS = [QUICK_RUN_UNSEEN[0], next(iter(EXPERT_FAMILIES))]


def rows(family: str, count: int, seed: int) -> list[dict]:
    from modecotd.tasks.generators import generate

    return [{"question": e.question, "answer": e.answer, "rationale": e.rationale}
            for e in generate(family, count, seed=seed, size=2)]


def trained_experts(model_dir: Path, root: Path | None = None, count: int = 64, epochs: float = 2.0) -> dict[str, Path]:
    """Three small experts (``count`` rows, ``epochs`` epochs each), trained once and kept in the
    model cache (``root``: in that folder instead, e.g. a run folder's ``experts/``)."""
    from modecotd.distill import DistillSettings, one_rank_group, train_expert
    from modecotd.models import cache_dir

    root = root or cache_dir() / "benchmark-experts-v1"
    experts = {family: root / family for family in EXPERT_FAMILIES}
    if all((path / "adapter_model.safetensors").is_file() for path in experts.values()):
        return experts
    with one_rank_group():
        for family, kind in EXPERT_FAMILIES.items():
            experts[family].mkdir(parents=True, exist_ok=True)
            print(f"training the {family} expert ({count} rows, epochs {epochs:g}, once)", flush=True)
            train_expert(DistillSettings(student_dir=str(model_dir), dtype="auto", kind=kind,
                                         rows=rows(family, count, 5), output_dir=str(experts[family]),
                                         learning_rate=2e-3, epochs=epochs, batch_size=8, max_length=256), 0, 1)
    return experts


def reference_search(model, cache: dict, batch: dict, rows: int, budget: int = REFERENCE["budget"]) -> dict:
    """LoraHub's procedure: per candidate, combine the state dicts, load them, compute the loss
    (``budget`` evaluations: the authors' 40 but in --quick)."""
    import nevergrad as ng
    import numpy as np
    import torch
    from peft import set_peft_model_state_dict

    names = list(cache)

    def objective(weights) -> float:
        combined = {key: sum(w * cache[name][key] for w, name in zip(weights, names)) for key in cache[names[0]]}
        set_peft_model_state_dict(model, combined)
        with torch.no_grad():
            loss = float(model(**batch).loss) / rows
        return float(loss + REFERENCE["l1"] * sum(abs(float(w)) for w in weights) / len(weights))

    parametrization = ng.p.Array(init=np.zeros(len(names)), lower=-REFERENCE["bound"], upper=REFERENCE["bound"])
    parametrization.random_state = np.random.RandomState(0)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)
    started = time.time()
    best = (float("inf"), None, 0.0, 0)
    for evaluation in range(1, budget + 1):
        candidate = optimizer.ask()
        value = objective(list(candidate.value))
        optimizer.tell(candidate, value)
        if value < best[0]:
            best = (value, [float(x) for x in candidate.value], time.time() - started, evaluation)
    return {"best_objective": best[0], "weights": best[1], "seconds": time.time() - started,
            "seconds_to_best": best[2], "evaluation_of_best": best[3], "evaluations": budget,
            "objective": objective}


def reference_model(model_dir: Path, experts: dict[str, Path]):
    """The student in fp32 with the first expert's LoRA slot, and every expert's weights."""
    from peft import PeftModel
    from peft.utils import load_peft_weights

    from modecotd.models import load_lm

    model = PeftModel.from_pretrained(load_lm(model_dir, "fp32"), str(next(iter(experts.values())))).eval()
    return model, {name: load_peft_weights(str(path), device="cpu") for name, path in experts.items()}


def reference_batch(model_dir: Path, fewshot: list[dict], kind: str) -> dict:
    from modecotd.distill import collate, tokenize_rows
    from modecotd.models import load_tokenizer
    from modecotd.tasks.schema import AnswerKind

    tokenizer = load_tokenizer(model_dir, padding_side="right")
    examples, _ = tokenize_rows(fewshot, AnswerKind(kind), tokenizer, MAX_LENGTH)
    return collate(examples, tokenizer.pad_token_id)


def our_search(mixture, batch: dict, n: int, target: float | None, budget: int, args):
    import torch

    from modecotd.weight_search import search_weights

    return search_weights(
        lambda candidates: mixture.candidate_losses(batch, torch.tensor(candidates)), n,
        optimizer=args.optimizer, budget=budget, bound=REFERENCE["bound"], l1=REFERENCE["l1"], seed=0,
        batch=args.candidates_per_forward, loss_and_gradient=lambda w: mixture.loss_and_gradient(batch, w),
        learning_rate=args.learning_rate, target=target)


def trivial_starts(objective, names: list[str]) -> dict[str, float]:
    """The reference's objective at the starts anyone would try first."""
    n = len(names)
    starts = {"zero": [0.0] * n, "average": [1.0 / n] * n}
    starts.update({f"alone:{name}": [1.0 if i == j else 0.0 for j in range(n)] for i, name in enumerate(names)})
    return {label: objective(weights) for label, weights in starts.items()}


def accuracy_on_test(mixture, test, kind: str, weights: list[float], args) -> float | None:
    """Strict accuracy of greedy decoding with these lorahub weights on the test questions."""
    from modecotd.evaluate import predict, score_rows
    from modecotd.tasks.schema import AnswerKind

    if not test:
        return None
    mixture.set_weights(weights)
    outputs = predict(mixture.model, mixture.tokenizer, test, AnswerKind(kind), batch_size=args.eval_batch,
                      max_new_tokens=args.max_new_tokens)
    rows = score_rows(test, outputs, AnswerKind(kind))
    return sum(r["correct"] for r in rows) / len(rows)


def run_target(name: str, target: dict, model_dir: Path, reference: tuple, mixture, args) -> dict:
    """One target task: the reference's search, ours to its best and for its budget, the trivial
    starts, and the test accuracy of the weights found."""
    from modecotd.tasks.schema import AnswerKind

    fewshot, kind = target["fewshot"], target["kind"]
    model, cache = reference
    budget = getattr(args, "reference_budget", None) or REFERENCE["budget"]
    found = reference_search(model, cache, reference_batch(model_dir, fewshot, kind), len(fewshot), budget)
    objective = found["objective"]
    batch = mixture.batch_for(fewshot, AnswerKind(kind), MAX_LENGTH)
    reached = our_search(mixture, batch, len(cache), found["best_objective"], args.budget_ours, args)
    equal = our_search(mixture, batch, len(cache), None, budget, args)
    reached_objective, equal_objective = objective(reached.weights), objective(equal.weights)
    starts = trivial_starts(objective, list(cache))
    best_start = min(starts, key=starts.get)
    print(f"{name}: reference {found['best_objective']:.5f} in {found['seconds']:.1f} s; ours "
          f"{reached_objective:.5f} after {reached.evaluations} evaluations in {reached.seconds:.1f} s; "
          f"at {budget} evaluations {equal_objective:.5f}; best trivial start {best_start} {starts[best_start]:.5f}",
          flush=True)
    accuracy = {label: accuracy_on_test(mixture, target["test"], kind, weights, args) for label, weights in
                (("reference", found["weights"]), ("ours", equal.weights), ("zero", [0.0] * len(cache)))}
    return {
        "kind": kind, "role": target["role"], "source": target.get("source"), "fewshot": len(fewshot),
        "test": len(target["test"]),
        "reference": {"best_objective": round(found["best_objective"], 5), "evaluations": found["evaluations"],
                      "seconds": round(found["seconds"], 2),
                      "seconds_to_best": round(found["seconds_to_best"], 2),
                      "evaluation_of_best": found["evaluation_of_best"],
                      "weights": [round(w, 3) for w in found["weights"]]},
        "ours_to_target": {"reached": reached_objective <= found["best_objective"],
                           "objective": round(reached_objective, 5), "evaluations": reached.evaluations,
                           "seconds": round(reached.seconds, 2)},
        "ours_equal_evaluations": {"objective": round(equal_objective, 5), "evaluations": equal.evaluations,
                                   "seconds": round(equal.seconds, 2), "weights": [round(w, 3) for w in equal.weights]},
        "trivial_starts": {label: round(value, 5) for label, value in starts.items()},
        "trivial_start_beats_reference": starts[best_start] <= found["best_objective"], "best_trivial_start": best_start,
        "test_accuracy": accuracy,
    }


def run_targets(run_dir: Path, names: list[str] | None, test: int) -> tuple[Path, dict[str, Path], dict[str, dict]]:
    """A pipeline run's student, experts and target tasks (few-shot and test rows as it drew them)."""
    from modecotd.config_loading import load_config
    from modecotd.models import materialize
    from modecotd.tasks.build import load_tasks

    config = load_config(run_dir / "config.yaml")
    experts = {t.name: run_dir / "experts" / t.name for t in config.seen_tasks}
    missing = [n for n, path in experts.items() if not (path / "adapter_model.safetensors").is_file()]
    if missing:
        raise SystemExit(f"{run_dir}: no trained expert for {', '.join(missing)}; run its distill stage first")
    tasks = load_tasks(config.tasks)
    unseen = [n for n, t in tasks.items() if t.role.value == "unseen"]
    seen = [n for n in tasks if n not in unseen]
    names = names or (unseen + seen)[:max(5, len(unseen))]
    targets = {name: {"kind": tasks[name].kind.value, "role": tasks[name].role.value, "source": "run",
                      "fewshot": [{"question": e.question, "answer": e.answer, "rationale": e.rationale}
                                  for e in tasks[name].fewshot], "test": tasks[name].test[:test]} for name in names}
    return materialize(config.student.model), experts, targets


def generated_targets(test: int, model: str = MODEL, root: Path | None = None, count: int = 64,
                      epochs: float = 2.0, fewshot: int = 5) -> tuple[Path, dict[str, Path], dict[str, dict]]:
    from modecotd.models import materialize
    from modecotd.tasks.generators import generate

    model_dir = materialize(model)
    return model_dir, trained_experts(model_dir, root, count, epochs), {TARGET_FAMILY: {
        "kind": TARGET_KIND, "role": "unseen", "source": "generated", "fewshot": rows(TARGET_FAMILY, fewshot, 21),
        "test": generate(TARGET_FAMILY, test, seed=22, size=2)}}


def write_run_config(run_dir: Path, model: str, test: int, fewshot: int) -> None:
    """``config.yaml`` of a run whose seen tasks are the experts' families (generated) and whose
    unseen task is an arithmetic comparison, written as the pipeline's driver writes it: the
    validated config, dumped. With its experts in ``experts/<task>/`` it is what ``--run`` reads."""
    import yaml

    from modecotd.config_loading import parse_config

    def task(name: str, role: str, family: str, train: int) -> dict:
        return {"name": name, "role": role, "source": {"kind": "generated", "family": family, "size": 2},
                "sizes": {"train": train, "fewshot": fewshot, "test": max(test, 1)}}

    unseen, family = QUICK_RUN_UNSEEN
    config = parse_config({
        "name": "mixture-search-quick", "seed": 0,
        "tasks": [task(f, "seen", f, 8) for f in EXPERT_FAMILIES] + [task(unseen, "unseen", family, 0)],
        "teacher": {"backend": "scripted"}, "student": {"model": model},
    })
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def quick_targets(run_dir: Path, names: list[str] | None, args) -> tuple[Path, dict[str, Path], dict[str, dict]]:
    """--quick: the tiny student's experts trained into ``run_dir/experts``, the generated target,
    then ``run_dir`` read back as a pipeline run (the ``--run`` path) for its targets (default: its
    unseen task and its first seen task)."""
    model_dir, experts, targets = generated_targets(args.test, BUILTIN_TINY, run_dir / "experts",
                                                    args.expert_rows, args.expert_epochs, args.fewshot)
    write_run_config(run_dir, BUILTIN_TINY, args.test, args.fewshot)
    run_model, run_experts, from_run = run_targets(run_dir, names or QUICK_RUN_TARGETS, args.test)
    if run_model != model_dir or run_experts != experts:
        raise SystemExit(f"{run_dir}: read back another student or other experts than were trained "
                         f"({run_model}, {run_experts}; trained {model_dir}, {experts})")
    clash = set(targets) & set(from_run)
    if clash:
        raise SystemExit(f"{run_dir}: a run task has the generated target's name: {', '.join(clash)}")
    return model_dir, experts, {**targets, **from_run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a pipeline run whose experts and tasks to use")
    parser.add_argument("--targets", help="comma list of the run's tasks (default: its unseen tasks, then seen, 5+; "
                        f"--quick without --run: of its run folder's, default {','.join(QUICK_RUN_TARGETS)})")
    parser.add_argument("--test", type=int, default=None, help="test questions per target (default 50, --quick 4; "
                        "0: no accuracy)")
    parser.add_argument("--optimizer", default="gradient", choices=["ngopt", "tpe", "cmaes", "random", "gradient"])
    parser.add_argument("--budget-ours", type=int, default=None, help="default 40 (--quick 10)")
    parser.add_argument("--candidates-per-forward", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=0.2)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (--quick 8)")
    parser.add_argument("--eval-batch", type=int, default=None, help="default 50 (--quick 4)")
    parser.add_argument("--quick", action="store_true",
                        help=f"every part on {BUILTIN_TINY} with small sizes and one torch thread; without --run, "
                        "the experts are trained into a temporary run folder that is then read as --run reads one "
                        "(for the tests; its figures say nothing about speed)")
    args = parser.parse_args()
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    logging.basicConfig(level=logging.WARNING)

    if args.quick:
        import torch

        torch.set_num_threads(1)  # a tiny model: more threads only contend (on a shared machine, 10x slower)
    if args.quick and not args.run:
        with tempfile.TemporaryDirectory(prefix="mixture-search-quick-") as tmp:
            result = measure(args, Path(tmp) / "run")
    else:
        result = measure(args, None)
    print(json.dumps(result))


def measure(args, quick_run: Path | None) -> dict:
    """Every target's figures and the summary over them (``quick_run``: where --quick without
    --run makes its run folder)."""
    from modecotd.distill import training_attention
    from modecotd.mixture import Mixture
    from modecotd.precision import hardware_summary

    names = args.targets and args.targets.split(",")
    if args.run:
        model_dir, experts, targets = run_targets(args.run, names, args.test)
    elif args.quick:
        model_dir, experts, targets = quick_targets(quick_run, names, args)
    else:
        model_dir, experts, targets = generated_targets(args.test, MODEL, None, args.expert_rows, args.expert_epochs,
                                                        args.fewshot)
    reference = reference_model(model_dir, experts)
    mixture = Mixture(model_dir, experts, "lorahub", "auto", attention=training_attention())
    mixture.objective = "per_row"
    results = {name: run_target(name, target, model_dir, reference, mixture, args) for name, target in targets.items()}
    ratios = [r["reference"]["seconds"] / r["ours_to_target"]["seconds"] for r in results.values()
              if r["ours_to_target"]["reached"]]
    reached = sum(r["ours_to_target"]["reached"] for r in results.values())
    ratio = statistics.median(ratios) if ratios else 0.0
    return {
        "benchmark": "mixture_search", "mode": "quick" if args.quick else "full", "ratio": round(ratio, 2),
        "goal": f"median ratio >= {GOAL_RATIO} (the reference's wall time over ours to its best objective), "
                "reaching it on every target",
        "met": ratio >= GOAL_RATIO and reached == len(results), "targets_reached": f"{reached}/{len(results)}",
        "trivial_start_beats_reference_on": [n for n, r in results.items() if r["trivial_start_beats_reference"]],
        "ours_better_at_equal_evaluations_on": [n for n, r in results.items() if r["ours_equal_evaluations"]
                                                ["objective"] <= r["reference"]["best_objective"]],
        "mean_test_accuracy": {label: round(statistics.mean(r["test_accuracy"][label] for r in results.values()), 4)
                               for label in ("reference", "ours", "zero") if args.test},
        **({"note": f"quick mode: budgets of {args.reference_budget} evaluations, {args.test} test questions"
                    + ("" if args.run else f", {BUILTIN_TINY} (tiny, random) with barely trained experts")
                    + "; its figures only show that every part ran"} if args.quick else {}),
        "targets": results, "experts": list(experts),
        "model": str(args.run or (BUILTIN_TINY if args.quick else MODEL)), "optimizer_ours": args.optimizer,
        "dtype_ours": mixture.precision.dtype, **hardware_summary(),
    }


if __name__ == "__main__":
    main()
