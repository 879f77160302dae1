"""Distill throughput: our LoRA loop (DeepSpeed inside) against a plain transformers Trainer + peft.

Both train the same q,v LoRA on the same frozen student (SmolLM2-135M-Instruct by default), on the
same rationales (generated arithmetic, scripted), with the same batch size, learning rate, warm-up
and linear decay, epochs and dtype, in one process run. The baseline is set up like the reference
code's: ``Trainer`` with a ``DataCollatorForSeq2Seq`` padding each random batch to its longest row
(``bf16=True`` is autocast over fp32 weights), our schedule passed in through ``optimizers=``. Ours
is :func:`modecotd.distill.train_expert` on a one-rank gloo group (what each Ray Train worker
runs): shuffled batches, the frozen weights in the compute dtype (bf16 where native) in a DeepSpeed
ZeRO-2 engine, logits only at target positions, freed memory kept by the C allocator
(:mod:`modecotd.allocator`; the baseline runs in a fresh process each time, without it).

Compared: target tokens per second of the training loop in steady state, timed the same way on
both sides: from the end of optimizer step ``--untimed-steps`` (3: the first steps warm up
allocator, kernels and caches) to the end of the last step, over the target tokens of the timed
steps only (ours: the loop's per-step report; the baseline: a ``TrainerCallback`` at each step's
end and the labels of each ``training_step``). Model loading and set-up are outside on both sides.
The whole loop's rate is printed beside it (ours from the loop's start, the baseline from
``trainer.train()``). Then the final loss: the trained adapter's mean target-token loss over all
the training rows, computed the same way for both after training (per-step losses are not
comparable: the two see batches of different make-up), and beside it the loss on 64 questions
neither saw. Given the same LoRA initialisation, batches and no dropout
the two loops give the same losses (1.07428 vs 1.07430 after 4 steps); what separates their final
losses is batch order and make-up, which in a 24-step run moves the final loss by about +-5%
between seeds: each side runs ``--seeds`` times (3), and the figures are pooled (tokens/s over the
summed timed time, losses averaged). MFU is achieved model FLOP/s (4 x parameters x tokens:
forward, and backward through the activations of the frozen weights; the timed steps' prompt and
target tokens, estimated from their target tokens at the training rows' ratio) over a matmul peak
in the run's dtype measured in the same run.

Then two experts trained at once on two single-CPU Ray Train workers against the same two trained
one after the other with two CPUs each (wall-clock ratio, Ray Train start-up included), through the
distill stage's own ``fit_expert``.

    python -m benchmarks.distill_throughput [--rows 96] [--epochs 2] [--seeds 3] [--untimed-steps 3]
                                            [--concurrency-rows 48] [--skip-concurrency]
    python -m benchmarks.distill_throughput --quick   # builtin:tiny, 6 steps, 1 seed: every part, a few minutes

The last line printed is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from modecotd.models import BUILTIN_SMOLLM2, BUILTIN_TINY

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GOAL_RATIO = 1.3
GOAL_LOSS_GAP = 0.05
HELD_OUT_SEED = 99
MODEL = BUILTIN_SMOLLM2
FULL = dict(model=MODEL, rows=96, epochs=2.0, seeds=3, batch_size=8, untimed_steps=3, concurrency_rows=48,
            held_out_rows=64, peak_seconds=3.0)
# --quick: every part on a tiny random Llama, few steps (figures that only show the parts run)
QUICK = dict(model=BUILTIN_TINY, rows=24, epochs=1.0, seeds=1, batch_size=4, untimed_steps=2, concurrency_rows=8,
             held_out_rows=8, peak_seconds=0.3)


def rows_for(count: int, family: str = "arithmetic", seed: int = 3) -> list[dict]:
    from modecotd.tasks.generators import generate

    return [{"question": e.question, "answer": e.answer, "rationale": e.rationale}
            for e in generate(family, count, seed=seed, size=2)]


def settings_for(model_dir: Path | str, rows: list[dict], output_dir: str, args, kind: str = "number"):
    from modecotd.distill import DistillSettings

    return DistillSettings(student_dir=str(model_dir), dtype=args.dtype, kind=kind, rows=rows,
                           output_dir=output_dir, learning_rate=2e-3, epochs=args.epochs,
                           batch_size=args.batch_size, max_length=256, zero_stage=2, seed=0)


def steady_rate(marks: list[tuple[float, int]], untimed: int) -> dict:
    """The rate from the end of optimizer step ``untimed`` to the end of the last step, from
    ``marks``: (time, target tokens trained on so far) at the end of each step, in order."""
    if len(marks) <= untimed:
        raise SystemExit(f"the run took {len(marks)} optimizer steps, not more than --untimed-steps {untimed}: "
                         "nothing is left to time (more rows or epochs, or fewer untimed steps)")
    (t0, n0), (t1, n1) = marks[untimed - 1], marks[-1]
    return {"timed_seconds": t1 - t0, "timed_target_tokens": n1 - n0, "timed_steps": len(marks) - untimed,
            "target_tokens_per_s": (n1 - n0) / (t1 - t0), "steps": len(marks)}


def dataset_loss(model, settings, rows: list[dict] | None = None) -> float:
    """Mean target-token loss of ``model`` over ``rows`` (default: the training rows), in fp32
    without dropout."""
    from modecotd.distill import mean_target_loss, tokenize_rows
    from modecotd.models import load_tokenizer
    from modecotd.tasks.schema import AnswerKind

    tokenizer = load_tokenizer(Path(settings.student_dir), padding_side="right")
    examples, _ = tokenize_rows(rows or settings.rows, AnswerKind(settings.kind), tokenizer, settings.max_length)
    return mean_target_loss(model.float().eval(), examples, 8, tokenizer.pad_token_id)


def losses_of(model, settings, held_out_rows: int) -> dict:
    """The trained model's loss on its training rows and on rows it never saw (other questions)."""
    return {"final_loss": dataset_loss(model, settings),
            "held_out_loss": dataset_loss(model, settings, rows_for(held_out_rows, seed=HELD_OUT_SEED))}


def ours(settings, untimed: int, held_out_rows: int) -> dict:
    """Our loop, inside the one-rank group that the caller holds (DeepSpeed keeps the group it first
    saw, so every run of a process shares one); timed from the end of step ``untimed``."""
    from peft import PeftModel

    from modecotd.distill import train_expert
    from modecotd.models import load_lm

    marks: list[tuple[float, int]] = []
    summary = train_expert(settings, 0, 1,
                           report=lambda metrics: marks.append((time.perf_counter(), metrics["target_tokens"])))
    trained = PeftModel.from_pretrained(load_lm(Path(settings.student_dir)), settings.output_dir)
    return {**steady_rate(marks, untimed), **losses_of(trained, settings, held_out_rows),
            "whole_loop_target_tokens_per_s": summary.target_tokens_per_s_rank0,
            "target_tokens": summary.target_tokens_rank0}


def baseline(settings, untimed: int, held_out_rows: int) -> dict:
    """A plain transformers Trainer + peft run, like the reference code's; timed from the end of
    step ``untimed``, as ours."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from modecotd.distill import add_lora, optimizer_steps, tokenize_rows, warmup_then_linear
    from modecotd.losses import IGNORE_INDEX
    from modecotd.models import load_lm, load_tokenizer
    from modecotd.tasks.schema import AnswerKind

    tokenizer = load_tokenizer(Path(settings.student_dir), padding_side="right")
    examples, _ = tokenize_rows(settings.rows, AnswerKind(settings.kind), tokenizer, settings.max_length)
    for e in examples:
        e["attention_mask"] = [1] * len(e["input_ids"])
    model = add_lora(load_lm(Path(settings.student_dir), "fp32"), settings)
    step_tokens: list[int] = []  # target tokens of each training step's batch
    marks: list[tuple[float, int]] = []  # (time, target tokens so far) at the end of each optimizer step

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, *args, **kwargs):
            step_tokens.append(int((inputs["labels"] != IGNORE_INDEX).sum()))
            return super().training_step(model, inputs, *args, **kwargs)

    class MarkSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), sum(step_tokens)))

    total_steps = optimizer_steps(math.ceil(len(examples) / settings.batch_size), settings.epochs)  # as ours
    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(
            output_dir=out, per_device_train_batch_size=settings.batch_size, learning_rate=settings.learning_rate,
            max_steps=total_steps, weight_decay=0.0, max_grad_norm=1.0, bf16=settings.dtype == "bf16", logging_steps=1,
            save_strategy="no", report_to=[], seed=settings.seed, use_cpu=True, dataloader_num_workers=0,
            disable_tqdm=True)
        # Our loop's warm-up and linear decay, step for step (the Trainer's own "linear" schedule
        # starts at lr 0 and counts warm-up steps differently, which shows in the final loss of a short run).
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate,
                                      weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear(total_steps, settings.warmup_ratio))
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8,
                                          label_pad_token_id=IGNORE_INDEX)
        trainer = CountingTrainer(model=model, args=arguments, train_dataset=examples,
                                  optimizers=(optimizer, scheduler), data_collator=collator, callbacks=[MarkSteps()])
        started = time.perf_counter()
        trainer.train()
        whole = time.perf_counter() - started
    torch.set_grad_enabled(True)
    return {**steady_rate(marks, untimed), **losses_of(model, settings, held_out_rows),
            "whole_loop_target_tokens_per_s": sum(step_tokens) / whole, "target_tokens": sum(step_tokens)}


def baseline_alone(settings, untimed: int, held_out_rows: int) -> dict:
    """:func:`baseline` in a process of its own, outside our one-rank group (whose variables it inherits)."""
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    return baseline(settings, untimed, held_out_rows)


def pooled(runs: list[dict]) -> dict:
    """One side's figures over its seeds: timed tokens/s over the summed timed time, losses averaged."""
    seconds = sum(r["timed_seconds"] for r in runs)
    tokens = sum(r["timed_target_tokens"] for r in runs)
    return {"seconds": seconds, "target_tokens": tokens, "target_tokens_per_s": tokens / seconds,
            "timed_steps": sum(r["timed_steps"] for r in runs), "steps": sum(r["steps"] for r in runs),
            "final_loss": sum(r["final_loss"] for r in runs) / len(runs),
            "held_out_loss": sum(r["held_out_loss"] for r in runs) / len(runs)}


def concurrency(args) -> dict:
    """Two experts at once (1 CPU each) against one after the other (2 CPUs each), each a Ray Train
    job run by the distill stage's ``fit_expert`` (as the pipeline runs it)."""
    import ray

    from modecotd.artifacts import Unit
    from modecotd.jobs import ray_runtime
    from modecotd.jobs.distill_stage import fit_expert
    from modecotd.storage import Storage

    rows = {"arithmetic": rows_for(args.concurrency_rows, "arithmetic"),
            "letters": rows_for(args.concurrency_rows, "last_letter_concatenation")}
    kinds = {"arithmetic": "number", "letters": "text"}
    ray_runtime.connect(None, num_cpus=2, dashboard=False)
    walls, experts = {}, {}
    try:
        env = {"env_vars": ray_runtime.this_cluster_env()}
        with tempfile.TemporaryDirectory() as tmp:
            storage = Storage(tmp)
            for mode, cpus in (("concurrent", 1), ("sequential", 2)):
                started = time.time()
                refs = []
                for name in rows:
                    # each worker resolves the student and its output folder on its node (fit_expert fills them in)
                    settings = replace(settings_for("", rows[name], "", args, kinds[name]), checkpoint_every=0)
                    unit = Unit(storage, f"experts/{mode}/{name}", f"bench-{mode}-{name}")
                    ref = fit_expert.options(name=f"bench:{mode}:{name}", runtime_env=env).remote(
                        name, unit, args.model, settings, 1, cpus, (storage, "ray"), f"bench-{mode}-{name}", 0)
                    if mode == "sequential":
                        ray.get(ref)
                    refs.append(ref)
                summaries = ray.get(refs)
                walls[mode] = time.time() - started
                experts[mode] = {name: {"steps": s.steps, "target_tokens": s.target_tokens_rank0,
                                        "target_tokens_per_s": round(s.target_tokens_per_s_rank0, 1)}
                                 for name, s in zip(rows, summaries)}
    finally:
        ray_runtime.shutdown()
    return {"concurrent_two_experts_s": round(walls["concurrent"], 2),
            "sequential_two_experts_s": round(walls["sequential"], 2),
            "concurrency_wall_ratio": round(walls["sequential"] / walls["concurrent"], 2),
            "concurrency_rows": args.concurrency_rows, "concurrency_experts": experts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=f"the student (default {MODEL}; --quick: {BUILTIN_TINY})")
    parser.add_argument("--rows", type=int,
                        help="default 96: 24 optimizer steps at batch 8 and 2 epochs, 21 of them timed; with fewer, "
                             "the final losses depend on each side's batch order more than on the loop (3 seeds "
                             "in fp32: about 11 minutes on a 2-core AVX2 CPU, before the concurrency part)")
    parser.add_argument("--epochs", type=float, help="default 2")
    parser.add_argument("--seeds", type=int,
                        help="runs per side (default 3), each seed its own LoRA initialisation and batch order: one "
                             "run's final loss moves about +-5%% with the seed, as much as the goal's tolerance")
    parser.add_argument("--batch-size", type=int, help="default 8")
    parser.add_argument("--untimed-steps", type=int,
                        help="optimizer steps left out of the timed rate on both sides (warm-up; default 3, "
                             "--quick 2; at least 1)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: as the pipeline picks it (bf16 where native, fp32 elsewhere)")
    parser.add_argument("--concurrency-rows", type=int, help="rows per expert in the concurrency part (default 48: "
                        "12 steps each at batch 8 and 2 epochs, so that training, not Ray Train's start, dominates)")
    parser.add_argument("--skip-concurrency", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help=f"every part, concurrency included, on {BUILTIN_TINY} with few rows and steps and one "
                             "seed (for the tests; its figures say nothing about speed)")
    args = parser.parse_args()
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.untimed_steps < 1:
        parser.error("--untimed-steps must be at least 1 (the timed window starts at the end of a step)")
    logging.basicConfig(level=logging.WARNING)

    import torch

    from modecotd.distill import one_rank_group, tokenize_rows
    from modecotd.losses import IGNORE_INDEX
    from modecotd.models import load_lm, load_tokenizer, materialize
    from modecotd.precision import hardware_summary, matmul_peak, resolve_dtype
    from modecotd.tasks.schema import AnswerKind

    precision = resolve_dtype(args.dtype, "cpu")
    args.dtype = precision.dtype  # the baseline runs in the same dtype
    print(f"dtype {precision.describe()}", flush=True)
    model_dir = materialize(args.model)
    params = sum(p.numel() for p in load_lm(model_dir).parameters())
    rows = rows_for(args.rows)
    examples, _ = tokenize_rows(rows, AnswerKind.NUMBER, load_tokenizer(model_dir), 256)
    # prompt and target tokens per target token over the training rows, for MFU over the timed steps
    tokens_per_target = (sum(len(e["input_ids"]) for e in examples)
                         / sum(sum(1 for t in e["labels"] if t != IGNORE_INDEX) for e in examples))
    peak = matmul_peak(args.dtype, seconds=args.peak_seconds, device="cpu")
    runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
    # The baseline runs in a fresh process each time, with the C allocator's defaults (ours keeps
    # freed memory, a process-wide setting that would carry over to a baseline run after it).
    fresh = multiprocessing.get_context("spawn")
    with one_rank_group(), fresh.Pool(1, maxtasksperchild=1) as pool:
        for seed in range(args.seeds):
            for side in ("baseline", "ours"):
                with tempfile.TemporaryDirectory() as tmp:
                    settings = replace(settings_for(model_dir, rows, tmp, args), seed=seed)
                    job = (settings, args.untimed_steps, args.held_out_rows)
                    runs[side].append(pool.apply(baseline_alone, job) if side == "baseline" else ours(*job))
                run = runs[side][-1]
                print(f"seed {seed} {side}: {run['target_tokens_per_s']:.1f} target tokens/s over steps "
                      f"{args.untimed_steps + 1}-{run['steps']} ({run['whole_loop_target_tokens_per_s']:.1f} from "
                      f"step 1), final loss {run['final_loss']:.4f}", flush=True)
    base, mine = pooled(runs["baseline"]), pooled(runs["ours"])
    mfu = 4 * params * mine["target_tokens"] * tokens_per_target / mine["seconds"] / peak
    ratio = mine["target_tokens_per_s"] / base["target_tokens_per_s"]
    gap = abs(mine["final_loss"] - base["final_loss"]) / base["final_loss"]
    whole = {side: sum(r["target_tokens"] for r in runs[side])
             / sum(r["target_tokens"] / r["whole_loop_target_tokens_per_s"] for r in runs[side]) for side in runs}
    result = {
        "benchmark": "distill_throughput", "mode": "quick" if args.quick else "full", "ratio": round(ratio, 2),
        "goal": f"ratio >= {GOAL_RATIO} with final losses within {int(GOAL_LOSS_GAP * 100)}%",
        "met": ratio >= GOAL_RATIO and gap <= GOAL_LOSS_GAP,
        "ours_target_tokens_per_s": round(mine["target_tokens_per_s"], 1),
        "baseline_target_tokens_per_s": round(base["target_tokens_per_s"], 1),
        "timing": f"steady state on both sides: from the end of optimizer step {args.untimed_steps} to the end of "
                  "the last, over the timed steps' target tokens",
        "untimed_steps": args.untimed_steps, "ours_timed_steps": mine["timed_steps"],
        "baseline_timed_steps": base["timed_steps"], "ours_steps": mine["steps"], "baseline_steps": base["steps"],
        "ours_timed_target_tokens": mine["target_tokens"], "baseline_timed_target_tokens": base["target_tokens"],
        "ours_seconds": round(mine["seconds"], 2), "baseline_seconds": round(base["seconds"], 2),
        "ours_whole_loop_target_tokens_per_s": round(whole["ours"], 1),
        "baseline_whole_loop_target_tokens_per_s": round(whole["baseline"], 1),
        "loss_ours": round(mine["final_loss"], 4), "loss_baseline": round(base["final_loss"], 4),
        "loss_gap": round(gap, 4), "held_out_loss_ours": round(mine["held_out_loss"], 4),
        "held_out_loss_baseline": round(base["held_out_loss"], 4),
        "mfu": round(mfu, 4), "matmul_peak_gflops": round(peak / 1e9, 1),
        "loss_per_seed_ours": [round(r["final_loss"], 4) for r in runs["ours"]],
        "loss_per_seed_baseline": [round(r["final_loss"], 4) for r in runs["baseline"]],
        "baseline_setup": "transformers Trainer + peft (DataCollatorForSeq2Seq, our warm-up and linear decay via "
                          "optimizers=), fp32 weights (bf16: autocast), a fresh process per seed",
        "allocator": "ours keeps freed memory (modecotd.allocator); the baseline runs with glibc's defaults",
        "seeds": args.seeds, "rows": len(rows), "epochs": args.epochs, "batch_size": args.batch_size,
        "dtype": args.dtype, "dtype_reason": precision.reason, **hardware_summary(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "model": args.model,
    }
    if not args.skip_concurrency:
        result.update(concurrency(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
