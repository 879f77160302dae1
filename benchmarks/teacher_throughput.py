"""Teacher throughput: the Ray teacher stage against plain transformers ``generate`` on the same batches.

Both run the same model (SmolLM2-135M-Instruct by default) on the CPU, in the same process run,
on the same generated arithmetic questions, with the same zero-shot two-stage CoT prompts, in the
same dtype, greedy, with the same ``max_new_tokens`` and stop strings. Ours is
``run_teacher_stage`` (two actors with one CPU each, our cached greedy loop that drops a finished
row from the batch), timed whole: actor start and model loading included. The baseline is what a
competent transformers user writes: one process with all the cores, the model loaded with
``AutoModelForCausalLM`` (its load is timed apart and left out of its rate), and one
``model.generate`` call per batch (``do_sample=False``, ``stop_strings=`` with ``tokenizer=``)
on exactly the stage's left-padded batches: the questions cut into the stage's shards in order,
each shard's prompts sorted by length and cut into batches of the stage's batch size, stage 1
(the rationales) and then stage 2 (the answers) per shard, as the stage's backend does it.

Generated tokens are counted the same way on both sides: a row's tokens up to and including the
one that ends it (EOS, or the one that completes a stop string); the padding ``generate`` writes
after a finished row is not counted (ours is the stage's own count, its summary's
``generated_tokens``, by the same rule: :func:`modecotd.generation.written_tokens`). Generated
tokens per second are compared; the final answers
of the two at temperature 0 must agree on at least 95% of the questions in fp32 (in bf16,
accuracy within 5 points of the baseline's instead: there batch shapes change the rounding).

    python -m benchmarks.teacher_throughput [--questions 48] [--max-new-tokens 64] [--batch-size 24]
    python -m benchmarks.teacher_throughput --quick   # builtin:tiny, 8 questions: every part, under a minute

The last line printed is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from modecotd.models import BUILTIN_SMOLLM2, BUILTIN_TINY

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GOAL_RATIO = 3.0
GOAL_AGREEMENT = 0.95
GOAL_ACCURACY_GAP = 0.05
MODEL = BUILTIN_SMOLLM2
TASK = "arithmetic"
QUICK = dict(model=BUILTIN_TINY, questions=8, max_new_tokens=8, batch_size=4, shard_size=4, actors=2)
TOKEN_RULE = "a row's tokens up to and including the one that ends it (EOS or a completed stop string); no padding"


def config_for(model: str, questions: int, max_new_tokens: int, batch_size: int, shard_size: int, actors: int,
               dtype: str):
    from modecotd.config_loading import parse_config

    return parse_config({
        "name": "teacher-throughput",
        "tasks": [{"name": TASK, "role": "seen",
                   "source": {"kind": "generated", "family": "arithmetic", "size": 2, "seed": 5},
                   "sizes": {"train": questions, "fewshot": 2, "test": 1}}],
        "teacher": {"backend": "transformers", "model": model, "dtype": dtype, "samples": 1, "temperature": 0.0,
                    "max_new_tokens": max_new_tokens, "batch_size": batch_size, "shard_size": shard_size,
                    "actors": actors, "cpus_per_actor": 1},
        "student": {"model": "builtin:tiny"},
    })


def shards_of(count: int, shard_size: int) -> list[list[int]]:
    """The positions of the questions of each of the stage's shards: ``shard_size`` at a time, in order."""
    return [list(range(first, min(count, first + shard_size))) for first in range(0, count, shard_size)]


def sorted_batches(prompts: list[str], batch_size: int) -> list[list[int]]:
    """Indices of ``prompts`` sorted by length (stable), cut into batches: how the stage's backend
    orders one call's prompts so that each batch pads little."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def stage_batch_sizes(count: int, shard_size: int, batch_size: int) -> list[int]:
    """The size of every ``generate`` call the stage makes for ``count`` questions (one sample each):
    per shard, its stage-1 batches, then its stage-2 batches (every question has a rationale)."""
    sizes = []
    for shard in shards_of(count, shard_size):
        one_stage = [min(batch_size, len(shard) - start) for start in range(0, len(shard), batch_size)]
        sizes += one_stage + one_stage
    return sizes


def cut_before_stop(text: str, stops: list[str]) -> str:
    """The text before its earliest stop string (what the stage keeps of a completion)."""
    end = min([text.find(s) for s in stops if s in text] or [len(text)])
    return text[:end]


def baseline(model_dir: Path, config, data, dtype: str) -> dict:
    """Plain transformers on the stage's batches: answers, generated tokens, seconds, batch sizes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modecotd.generation import stop_check, stop_token_ids, written_tokens
    from modecotd.tasks.answers import extract_teacher_answer
    from modecotd.teacher import ANSWER_STAGE_TOKENS, prompts_for

    started = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    load_seconds = time.time() - started
    prompts = prompts_for(config.teacher, config.task(TASK), data.kind, data.fewshot)
    if prompts.chat:
        raise SystemExit("this benchmark writes raw prompts (teacher.prompt_format raw)")
    questions = [ex.question for ex in data.train]
    cfg = config.teacher
    rows: list[tuple[list[int], list[str]]] = []  # every generated row with its stop strings, counted later
    sizes: list[int] = []

    def generate(texts: list[str], max_new_tokens: int, stops: list[str]) -> list[str]:
        """One stage over one shard: its prompts sorted by length, one ``generate`` per batch."""
        out = [""] * len(texts)
        for batch in sorted_batches(texts, cfg.batch_size):
            inputs = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True)
            with torch.inference_mode():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, stop_strings=stops, tokenizer=tokenizer)
            new = output[:, inputs["input_ids"].shape[1]:].tolist()
            for i, row, text in zip(batch, new, tokenizer.batch_decode(new, skip_special_tokens=True)):
                out[i] = cut_before_stop(text, stops)
                rows.append((row, stops))
            sizes.append(len(batch))
        return out

    answers: dict[str, str | None] = {}
    started = time.time()
    for shard in shards_of(len(questions), cfg.shard_size):
        asked = [questions[i] for i in shard]
        rationales = [text.strip() for text in generate([prompts.reasoning(q) for q in asked], cfg.max_new_tokens,
                                                        prompts.reasoning_stop)]
        said = generate([prompts.answer(q, r) for q, r in zip(asked, rationales)], ANSWER_STAGE_TOKENS, ["\n"])
        for question, rationale, text in zip(asked, rationales, said):
            answers[question] = (extract_teacher_answer(text, prompts.kind)
                                 or extract_teacher_answer(rationale, prompts.kind))
    seconds = time.time() - started
    # counted by the stage's own rule (after the clock stopped): what each row wrote, not the padding
    ends = stop_token_ids(model, tokenizer)
    counts = [written_tokens(row, tokenizer.pad_token_id, ends, stop_check(tokenizer, stops)) for row, stops in rows]
    return {"answers": answers, "tokens": sum(counts), "seconds": seconds, "load_seconds": load_seconds,
            "batch_sizes": sizes, "rows": len(rows),
            "rows_ended_by_eos": sum(1 for (row, _), n in zip(rows, counts) if n and row[n - 1] in ends),
            "padding_not_counted": sum(len(row) - n for (row, _), n in zip(rows, counts))}


def ours(config, run_dir: Path) -> dict:
    """Answers, generated tokens and wall seconds of the teacher stage on a local Ray."""
    from modecotd.artifacts import read_jsonl
    from modecotd.jobs import ray_runtime
    from modecotd.jobs.driver import load_tasks
    from modecotd.jobs.teacher_stage import run_teacher_stage
    from modecotd.plan import RunLayout
    from modecotd.storage import Storage

    ray_runtime.connect(None, num_cpus=2, dashboard=False)
    try:
        tasks = load_tasks(config)
        layout = RunLayout(Storage(run_dir))
        units = {TASK: layout.unit(layout.rationales(TASK), "bench")}
        started = time.time()
        summary = run_teacher_stage(config, layout, tasks, units)[TASK].summary
        seconds = time.time() - started
    finally:
        ray_runtime.shutdown()
    answers = {}
    for name in ("accepted", "rejected"):
        for row in read_jsonl(units[TASK].local() / f"{name}.jsonl"):
            answers[row["question"]] = row["predicted"]
    return {"answers": answers, "tokens": summary.generated_tokens, "seconds": seconds,
            "failed": summary.failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"teacher model reference (default {MODEL}; --quick: "
                        f"{QUICK['model']}, a tiny random Llama: figures that only show every part runs)")
    parser.add_argument("--questions", type=int, default=None, help="default 48 (--quick 8)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (--quick 8)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="prompts per generate call, on both sides (default 24, --quick 4); a shard smaller "
                        "than that is one batch")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="questions per shard of the stage (default: questions / (2 x actors), so each actor "
                        "gets two; --quick 4); the baseline cuts the same shards")
    parser.add_argument("--actors", type=int, default=None, help="default 2")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: as the teacher stage picks it (bf16 where native, fp32 elsewhere); in bf16 "
                        "the rounding turns greedy decoding onto other paths when batch shapes change the sums, "
                        "so there quality is judged by accuracy instead of answer agreement (see RESULTS.md)")
    parser.add_argument("--quick", action="store_true",
                        help="every part on a tiny random model with few, short generations (for the tests)")
    args = parser.parse_args()
    defaults = QUICK if args.quick else dict(model=MODEL, questions=48, max_new_tokens=64, batch_size=24,
                                             shard_size=None, actors=2)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.shard_size = args.shard_size or max(1, args.questions // (2 * args.actors))
    logging.basicConfig(level=logging.WARNING)

    import torch

    from modecotd.jobs.driver import load_tasks
    from modecotd.models import materialize
    from modecotd.precision import hardware_summary, resolve_dtype

    precision = resolve_dtype(args.dtype, "cpu")
    args.dtype = precision.dtype
    print(f"dtype {precision.describe()}", flush=True)
    model_dir = materialize(args.model)
    config = config_for(args.model, args.questions, args.max_new_tokens, args.batch_size, args.shard_size,
                        args.actors, args.dtype)
    data = load_tasks(config)[TASK]
    examples = list(data.train)
    with tempfile.TemporaryDirectory() as tmp:
        mine = ours(config, Path(tmp))
    base = baseline(model_dir, config, data, args.dtype)
    planned = stage_batch_sizes(len(examples), args.shard_size, args.batch_size)
    if base["batch_sizes"] != planned:
        raise SystemExit(f"the baseline's batches {base['batch_sizes']} are not the stage's {planned}")
    n = len(examples)
    agree = sum(mine["answers"].get(ex.question) == base["answers"][ex.question] for ex in examples) / n
    accuracy_ours = sum(mine["answers"].get(ex.question) == ex.answer for ex in examples) / n
    accuracy_base = sum(base["answers"][ex.question] == ex.answer for ex in examples) / n
    ours_speed, base_speed = mine["tokens"] / mine["seconds"], base["tokens"] / base["seconds"]
    ratio = ours_speed / base_speed
    if precision.dtype == "fp32":  # the same batches decoded greedily write the same tokens, up to rounding
        goal = f"ratio >= {GOAL_RATIO} and answer agreement >= {GOAL_AGREEMENT}"
        quality = agree >= GOAL_AGREEMENT
    else:
        goal = f"ratio >= {GOAL_RATIO} and accuracy within {GOAL_ACCURACY_GAP} of the baseline's (bf16)"
        quality = accuracy_ours >= accuracy_base - GOAL_ACCURACY_GAP
    result = {
        "benchmark": "teacher_throughput", "mode": "quick" if args.quick else "full", "ratio": round(ratio, 2),
        "goal": goal, "met": ratio >= GOAL_RATIO and quality,
        "ours_tokens_per_s": round(ours_speed, 1), "baseline_tokens_per_s": round(base_speed, 1),
        "answer_agreement": round(agree, 3), "accuracy_ours": round(accuracy_ours, 3),
        "accuracy_baseline": round(accuracy_base, 3), "questions": n,
        "ours_tokens": mine["tokens"], "baseline_tokens": base["tokens"], "ours_failed_questions": mine["failed"],
        "ours_seconds": round(mine["seconds"], 2), "baseline_seconds": round(base["seconds"], 2),
        "baseline_load_seconds": round(base["load_seconds"], 2),
        "batch_size": args.batch_size, "shard_size": args.shard_size, "stage_batch_sizes": planned,
        "baseline_batch_sizes": base["batch_sizes"],
        "ours_setup": f"run_teacher_stage: {args.actors} actors x 1 CPU, shards of {args.shard_size}, "
                      f"batch {min(args.batch_size, args.shard_size)}, timed with actor start and model load",
        "baseline_setup": "one process, all cores: transformers model.generate (greedy, stop_strings) once per "
                          "batch, on the stage's left-padded length-sorted batches; model load timed apart, "
                          "not in its rate",
        "token_count_rule": TOKEN_RULE, "baseline_rows_ended_by_eos": base["rows_ended_by_eos"],
        "baseline_padding_not_counted": base["padding_not_counted"],
        "model": args.model, "dtype": config.teacher.dtype, "dtype_reason": precision.reason, **hardware_summary(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "max_new_tokens": args.max_new_tokens,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
