"""Expert retrieval: does a mixer put the largest weight on the expert a new task needs, wherever
that expert stands in the list? (:mod:`modecotd.retrieval`)

K experts trained here on generated families (coin flip, last-letter concatenation, object
tracking, arithmetic; cached in the model cache after the first run), and for each family its
twin (the same skill told in other words, :data:`modecotd.tasks.generators.WORDINGS`) as an
unseen target with 5 few-shot rows. Every mixer is fitted on every twin with its matching expert
listed first, second, ..., last. Mixers: the paper's search as its authors ran it (NGOpt, budget
40, bounds 3, L1 0.05 on their per-row loss, one order), the same over ``--orders`` seeded orders
(this project's default), the exact weighted sum with gradients, the best expert alone by
few-shot loss, and the gate. With ``--test N``: the strict and likelihood accuracy of each distinct
mixture on N twin test questions, beside the matching expert alone and the base student.

    python -m benchmarks.expert_retrieval [--test 30] [--families coin_flip,arithmetic,...]
    python -m benchmarks.expert_retrieval --quick      # a tiny random student, 3 families, small budgets

Last line: one JSON object: ``ratio`` is the retrieval rate of ``lorahub, N orders`` over the
authors' single order (higher is better), ``goal`` 1.0 retrieval for the default mixer, and per
mixer the retrieval rate overall and by the matching expert's position in the list.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("coin_flip", "last_letter_concatenation", "tracking_shuffled_objects", "arithmetic")
TRAIN_SEED, FEWSHOT_SEED, TEST_SEED = 1, 99, 123  # the twins' rows are other instances than the experts' rows
MAX_LENGTH = 320  # a tracking question with its rationale is ~250 tokens


def family_rows(family: str, count: int, seed: int, wording: str = "original") -> list[dict]:
    from modecotd.tasks.generators import generate

    return [{"question": e.question, "answer": e.answer, "rationale": e.rationale}
            for e in generate(family, count, seed=seed, size=2, wording=wording)]


def trained_experts(student: str, student_dir: Path, families: list[str], steps: int, quick: bool) -> dict[str, Path]:
    """One expert per family: ``steps`` steps of 4 rows (the quickstart's recipe: a LoRA on every
    linear layer of a Llama), trained once per student and recipe and kept in the model cache."""
    from modecotd.distill import DistillSettings, one_rank_group, train_expert
    from modecotd.models import cache_dir
    from modecotd.tasks.generators import FAMILIES as KINDS

    recipe = dict(lora_r=4 if quick else 16, lora_alpha=8 if quick else 32, lora_dropout=0.0,
                  learning_rate=1e-2 if quick else 2e-3, epochs=1, batch_size=4, max_length=MAX_LENGTH,
                  target_modules=None if quick else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
    tag = hashlib.sha256(json.dumps([student, steps, recipe], sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir() / "retrieval-experts" / tag
    experts = {family: root / family for family in families}
    todo = [f for f, path in experts.items() if not (path / "adapter_model.safetensors").is_file()]
    if todo:
        with one_rank_group():
            for family in todo:
                print(f"training the {family} expert ({steps} steps, once)", flush=True)
                train_expert(DistillSettings(student_dir=str(student_dir), dtype="auto", kind=KINDS[family].value,
                                             rows=family_rows(family, 4 * steps, TRAIN_SEED),
                                             output_dir=str(experts[family]), **recipe), 0, 1)
    return experts


def test_accuracy(mixture, eval_batch: int, max_new_tokens: int):
    """The strict and likelihood accuracy of a mixer's weights on a twin's test rows (a gate:
    its routers as just fitted; None weights: the base student)."""
    from modecotd.evaluate import predict, score_rows, summarize
    from modecotd.likelihood import likelihood_answers
    from modecotd.tasks.schema import Example

    def accuracy(mixer, weights, twin) -> dict:
        if mixer is not None and mixer.method == "gate":
            mixture.use_method("gate")
        else:
            mixture.use_method("lorahub" if mixer is not None and mixer.method == "lorahub" else "delta")
            mixture.set_weights([0.0] * len(mixture.names) if weights is None else weights)
        test = [Example(r["question"], r["answer"], r["rationale"]) for r in twin.test]
        outputs = predict(mixture.model, mixture.tokenizer, test, twin.kind, batch_size=eval_batch,
                          max_new_tokens=max_new_tokens)
        likely = likelihood_answers(mixture.model, mixture.tokenizer, [e.question for e in test], outputs, twin.kind,
                                    batch_size=eval_batch)
        summary = summarize(score_rows(test, outputs, twin.kind, likely))
        return {"strict": summary["accuracy_strict"], "likelihood": summary["accuracy_likelihood"],
                "format": summary["format_rate"]}

    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default=None, help="default: builtin:smollm2-135m-instruct (--quick: builtin:tiny)")
    parser.add_argument("--families", help=f"comma list, default all of {', '.join(FAMILIES)} (--quick: three)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per expert (default 32; --quick 20)")
    parser.add_argument("--budget", type=int, default=None, help="weight-search budget (default 40, the paper's)")
    parser.add_argument("--orders", type=int, default=3)
    parser.add_argument("--gate-steps", type=int, default=15)
    parser.add_argument("--test", type=int, default=0, help="twin test questions for accuracy (0: retrieval only)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="a tiny random student, three families, small budgets")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from modecotd.models import BUILTIN_SMOLLM2, BUILTIN_TINY, materialize
    from modecotd.precision import hardware_summary
    from modecotd.retrieval import AUTHORS, Twin, authors_and_ours, load_mixture, run_check
    from modecotd.tasks.generators import FAMILIES as KINDS

    student = args.student or (BUILTIN_TINY if args.quick else BUILTIN_SMOLLM2)
    families = args.families.split(",") if args.families else list(FAMILIES[:3] if args.quick else FAMILIES)
    steps = args.steps or (20 if args.quick else 32)
    budget = args.budget or (8 if args.quick else 40)
    started = time.time()
    student_dir = materialize(student)
    experts = trained_experts(student, student_dir, families, steps, args.quick)
    trained = time.time()
    mixture = load_mixture(student_dir, experts, "auto")
    twins = [Twin(f"{f}-twin", f, KINDS[f], family_rows(f, 5, FEWSHOT_SEED, "twin"),
                  family_rows(f, args.test, TEST_SEED, "twin") if args.test else []) for f in families]
    mixers = authors_and_ours(budget=budget, orders=args.orders, gate_steps=args.gate_steps, max_length=MAX_LENGTH)
    accuracy = test_accuracy(mixture, args.eval_batch, args.max_new_tokens) if args.test else None
    result = run_check(mixture, mixers, twins, max_length=MAX_LENGTH, accuracy=accuracy,
                       say=lambda line: print(line, flush=True))
    references = {}
    if accuracy is not None:  # the matching expert alone and the base student on each twin
        for twin in twins:
            alone = [float(name == twin.expert) for name in mixture.names]
            references[twin.name] = {"expert_alone": accuracy(None, alone, twin), "base": accuracy(None, None, twin)}
            print(f"{twin.name}: its expert alone {references[twin.name]['expert_alone']}, base "
                  f"{references[twin.name]['base']}", flush=True)
    summary = result["summary"]
    ours = f"lorahub, {args.orders} orders"
    authors_rate = summary[AUTHORS]["retrieval_rate"]
    print(json.dumps({
        "benchmark": "expert_retrieval", "ratio": summary[ours]["retrieval_rate"] / max(authors_rate, 1e-9),
        "goal": f"{ours}: retrieval 1.0 in every placement", "met": summary[ours]["retrieval_rate"] == 1.0,
        "student": student, "experts": families, "steps_per_expert": steps, "budget": budget, "orders": args.orders,
        "mixers": summary, "twin_references": references, "test_questions": args.test,
        "rows": result["rows"], "device": "cpu", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "precision": mixture.precision.as_dict(), "hardware": hardware_summary(),
        "seconds": {"training": round(trained - started, 1), "check": round(time.time() - trained, 1)},
    }, default=str))


if __name__ == "__main__":
    main()
