"""GPU: every stage's own code path on a ~1B student, each beside a plain transformers + peft baseline.

One command for one GPU (an H100: at most about 8 minutes), needing only torch, transformers,
peft and DeepSpeed: Ray is never imported (the library modules used here are Ray-free). A
random-initialised Llama of about 1B parameters (hidden 2048, 20 layers, 32 heads, 8 KV heads,
intermediate 5632, tied embeddings) with SmolLM2's tokenizer is built and saved to a temp
folder; rows are generated questions with scripted rationales (:mod:`modecotd.tasks.generators`).
Each stage is timed for ours and its baseline in the same run, on the same inputs, in the same
process; the ratio is ours over the baseline (higher is better). Model loading is excluded.

1. teacher: :class:`~modecotd.backends.hf_local.TransformersGenerator` (dtype auto: bf16 on a
   GPU), batch 64, zero-shot CoT prompts with the stage's stop strings, against one
   ``model.generate`` per prompt (same dtype, prompts and stops); generated tokens per second.
   Slow baselines (here and in 4 and 5) run on the first few of the same inputs (a rate).
2. distill: :func:`~modecotd.distill.train_expert` (LoRA, DeepSpeed ZeRO-2 and ZeRO-3, dtype
   auto) on a one-rank group (NCCL on a GPU, gloo on a CPU), against a plain PyTorch + peft loop
   (fp32 weights under bf16 autocast, AdamW, random batches padded to their longest row, the
   model's own loss over full logits, gradient clipping), same rows, batch and max length; target
   tokens per second, MFU, peak memory. MFU is the model FLOPs a step needs over the seconds
   and the peak of a large matmul in the compute dtype measured in this run: 4 x (the weights
   outside the embedding x every token + the output projection x the target tokens: only they
   need logits), forward and backward through the frozen weights' activations. Padding and
   attention scores are not counted, so it is a conservative figure. ZeRO-3 runs last: DeepSpeed
   swaps ``torch.nn.functional.linear`` for its own for the rest of the process; it is put back.
3. full fine-tuning: ``DistillSettings(full_finetune=True)`` (ZeRO-2) for a few steps against a
   plain full fine-tuning loop (same as 2, every weight trainable); MFU with 6 in place of 4.
4. mixture: :meth:`modecotd.mixture.Mixture.candidate_losses` (lorahub, dtype auto) over three
   experts (the two adapters trained in 2 and the baseline's), candidate weight vectors per
   second, against LoraHub's way (see benchmarks/mixture_search.py): fp32 student with a peft
   slot, per candidate a combined state dict, ``set_peft_model_state_dict`` and the model's loss.
5. evaluation: :func:`modecotd.evaluate.predict` (batched greedy, the evaluation config's default
   batch size) on the ZeRO-2 expert loaded by :func:`~modecotd.evaluate.load_system`, against
   one ``generate`` per question on the same peft model; generated tokens per second (tokens
   counted alike for both: each output text, up to its stop mark, tokenised again).

Goals (one H100): distill LoRA MFU >= 0.40 (ZeRO-2) and every stage >= 2x its baseline.

    python -m benchmarks.gpu            # the ~1B student on the GPU
    python -m benchmarks.gpu --quick    # a tiny student, small sizes: the CPU, well under a minute

The last line printed is one JSON object with the figures (``ratio``: the smallest stage ratio).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GOAL_RATIO = 2.0
GOAL_MFU = 0.40
ONE_B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=32,
             num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
# Sizes per mode: the GPU's fill an H100 for about 8 minutes at most; quick's run on 2 CPU cores.
PROFILES = {
    "full": dict(model=ONE_B, family_size="max", teacher_prompts=128, teacher_batch=64, teacher_tokens=128,
                 baseline_prompts=12, distill_rows=1536, distill_batch=32, max_length=512, full_rows=192,
                 full_batch=16, candidates=96, baseline_candidates=24, eval_questions=64, eval_tokens=96,
                 baseline_questions=8, peak_size=8192, peak_seconds=3.0),
    "quick": dict(model=TINY, family_size="min", teacher_prompts=8, teacher_batch=64, teacher_tokens=8,
                  baseline_prompts=2, distill_rows=16, distill_batch=8, max_length=512, full_rows=8,
                  full_batch=8, candidates=6, baseline_candidates=3, eval_questions=8, eval_tokens=8,
                  baseline_questions=2, peak_size=1024, peak_seconds=0.5),
}
FAMILIES = ("coin_flip", "last_letter_concatenation", "tracking_shuffled_objects", "arithmetic")
FEWSHOT_FAMILY = "coin_flip"
EVAL_FAMILY = "arithmetic"
LEARNING_RATE = 2e-4
GIB = 2**30


def say(message: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the device and its measures ---------------------------------------------------------------------


class Meter:
    """Peak memory of a block: the GPU's allocator peak, or on a CPU the process's max RSS
    (monotonic over the process: a later block reports at least an earlier one's)."""

    def __init__(self, device: str):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device == "cuda" else "cpu_process_max_rss"

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def start(self) -> float:
        import torch

        free()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / GIB
        return self.rss()

    def peak(self) -> float:
        import torch

        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / GIB
        return self.rss()

    @staticmethod
    def rss() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def free() -> None:
    """Give a finished stage's GPU memory back (a no-op on a CPU, where a full gc costs ~0.5 s)."""
    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


# -- the student and the data -----------------------------------------------------------------------


def build_student(out: Path, dims: dict, device: str, dtype: str) -> tuple[int, int, int]:
    """A random-initialised Llama of ``dims`` with SmolLM2's tokenizer, saved to ``out`` the way
    ``builtin:tiny`` is (see :func:`modecotd.models._build_tiny`). Returns its parameter count, the
    weights a token's forward multiplies outside the embedding and the output projection (the
    "body"), and the output projection's (vocabulary x hidden)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from modecotd.models import BUILTIN_TINY, materialize
    from modecotd.precision import TORCH_DTYPES

    # SmolLM2's tokenizer as builtin:tiny keeps it: models._smollm2_tokenizer_dir() re-reads the GGUF
    # file on every call (its cache check looks for a config.json a tokenizer folder never has).
    tokenizer = AutoTokenizer.from_pretrained(materialize(BUILTIN_TINY))
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **dims)
    torch.manual_seed(0)
    with torch.device(device):  # a 1B model is initialised on the GPU, not in host memory
        model = AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[dtype])
    params = sum(p.numel() for p in model.parameters())
    head = config.vocab_size * config.hidden_size
    body = params - head * (1 if config.tie_word_embeddings else 2)  # the embedding lookup is no matmul
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    free()
    return params, body, head


def family_size(family: str, profile: dict) -> int | None:
    from modecotd.tasks.generators import SIZE_RANGES

    return SIZE_RANGES[family][0 if profile["family_size"] == "min" else 1]


def training_rows(count: int, profile: dict, seed: int = 3) -> list[dict]:
    """Rows from all four families in turn, each carrying its answer kind (pooled multi-task rows)."""
    from modecotd.tasks.generators import FAMILIES as KINDS
    from modecotd.tasks.generators import generate

    per_family = -(-count // len(FAMILIES))
    pools = {f: generate(f, per_family, seed=seed, size=family_size(f, profile)) for f in FAMILIES}
    rows = []
    for i in range(per_family):
        for family in FAMILIES:
            e = pools[family][i]
            rows.append({"question": e.question, "answer": e.answer, "rationale": e.rationale,
                         "kind": KINDS[family].value})
    return rows[:count]


def model_flops(examples: list[dict], body: int, head: int, factor: int) -> float:
    """FLOPs one pass of training over ``examples`` needs (see the module's docstring)."""
    tokens = sum(len(e["input_ids"]) for e in examples)
    targets = sum(sum(1 for t in e["labels"] if t != -100) for e in examples)
    return factor * (body * tokens + head * targets)


def tokenized(rows: list[dict], model_dir: Path, max_length: int) -> list[dict]:
    from modecotd.distill import tokenize_rows
    from modecotd.models import load_tokenizer
    from modecotd.tasks.schema import AnswerKind

    examples, _ = tokenize_rows(rows, AnswerKind.YES_NO, load_tokenizer(model_dir, "right"), max_length)
    return examples


# -- 1. teacher ---------------------------------------------------------------------------------------


def teacher_stage(model_dir: Path, profile: dict, meter: Meter) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modecotd.backends.hf_local import TransformersGenerator
    from modecotd.prompts import TeacherPrompts
    from modecotd.tasks.generators import FAMILIES as KINDS
    from modecotd.tasks.generators import generate

    family = "arithmetic"
    teacher = TeacherPrompts(KINDS[family])
    questions = generate(family, profile["teacher_prompts"], seed=11, size=family_size(family, profile))
    prompts = [teacher.reasoning(e.question) for e in questions]
    stop, new_tokens = teacher.reasoning_stop, profile["teacher_tokens"]

    generator = TransformersGenerator(model_dir, dtype="auto", batch_size=profile["teacher_batch"])
    dtype = generator.precision.dtype
    run = dict(samples=1, temperature=0.0, stop=stop, seed=0)
    generator.generate(prompts[:2], max_new_tokens=4, **run)  # warm-up, like the baseline's
    meter.sync()
    started = time.perf_counter()
    done = generator.generate(prompts, max_new_tokens=new_tokens, **run)
    meter.sync()
    ours_seconds = time.perf_counter() - started
    errors = [c.error for c in done if c.error]
    if errors:
        raise RuntimeError(f"teacher generation failed: {errors[0]}")
    ours_tokens = sum(c.tokens for c in done)
    del generator
    free()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, _torch_name(dtype)))
    model = model.to(meter.device).eval()

    def one(prompt: str, max_new: int) -> int:
        inputs = tokenizer(prompt, return_tensors="pt").to(meter.device)
        output = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, stop_strings=stop,
                                tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id)
        new = output[0, inputs["input_ids"].shape[1]:]
        return int((new != tokenizer.pad_token_id).sum())

    one(prompts[0], 4)
    meter.sync()
    baseline_prompts = prompts[:profile["baseline_prompts"]]
    started = time.perf_counter()
    base_tokens = sum(one(p, new_tokens) for p in baseline_prompts)
    meter.sync()
    base_seconds = time.perf_counter() - started
    ours_rate, base_rate = ours_tokens / ours_seconds, base_tokens / base_seconds
    return {"ratio": ours_rate / base_rate, "ours_tokens_per_s": ours_rate, "baseline_tokens_per_s": base_rate,
            "ours_tokens": ours_tokens, "baseline_tokens": base_tokens, "ours_seconds": ours_seconds,
            "baseline_seconds": base_seconds, "prompts": len(prompts), "baseline_prompts": len(baseline_prompts),
            "batch_size": profile["teacher_batch"], "max_new_tokens": new_tokens, "dtype": dtype}


def _torch_name(dtype: str) -> str:
    return {"bf16": "bfloat16", "fp32": "float32"}[dtype]


# -- 2. and 3. distillation ---------------------------------------------------------------------------


def ours_training(model_dir: Path, rows: list[dict], out: Path, batch: int, max_length: int, zero_stage: int,
                  full: bool, meter: Meter) -> dict:
    """:func:`train_expert` as each Ray Train worker runs it; timing from its own summary."""
    from modecotd.distill import DistillSettings, train_expert

    settings = DistillSettings(student_dir=str(model_dir), dtype="auto", kind="yes_no", rows=rows,
                               output_dir=str(out), learning_rate=LEARNING_RATE, epochs=1, batch_size=batch,
                               max_length=max_length, zero_stage=zero_stage, full_finetune=full, seed=0)
    held = meter.start()
    summary = train_expert(settings, 0, 1)
    peak = meter.peak()
    seconds = summary.target_tokens_rank0 / summary.target_tokens_per_s_rank0
    free()
    return {"target_tokens_per_s": summary.target_tokens_per_s_rank0,
            "target_tokens": summary.target_tokens_rank0, "seconds": seconds, "steps": summary.steps,
            "first_loss": summary.first_loss, "final_loss": summary.final_loss,
            "zero_stage": summary.zero_stage,
            "dtype": summary.precision.get("dtype", "?"), "peak_memory_gib": peak,
            "memory_held_before_gib": held}


def plain_training(model_dir: Path, rows: list[dict], batch: int, max_length: int, dtype: str, full: bool,
                   meter: Meter, save_to: Path | None = None) -> dict:
    """A plain PyTorch loop as one writes it with transformers + peft: fp32 weights under autocast,
    AdamW with linear warm-up and decay, random batches padded to their longest row (to a multiple of
    8, as ``DataCollatorForSeq2Seq`` does), the model's own loss, gradient clipping."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from modecotd.distill import GRADIENT_CLIPPING, DistillSettings, warmup_then_linear
    from modecotd.losses import IGNORE_INDEX
    from modecotd.models import load_tokenizer

    defaults = DistillSettings(student_dir="", dtype=dtype, kind="yes_no", rows=[], output_dir="")
    tokenizer = load_tokenizer(model_dir, "right")
    examples = tokenized(rows, model_dir, max_length)
    held = meter.start()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(meter.device)
    if full:
        trainable_model = model
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        trainable_model = get_peft_model(model, LoraConfig(r=defaults.lora_r, lora_alpha=defaults.lora_alpha,
                                                           lora_dropout=defaults.lora_dropout,
                                                           task_type="CAUSAL_LM"))
    trainable_model.train()
    params = [p for p in trainable_model.parameters() if p.requires_grad]
    rng = random.Random(0)
    order = examples[:]
    rng.shuffle(order)
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear(len(batches), defaults.warmup_ratio))
    autocast = torch.autocast(meter.device, dtype=torch.bfloat16, enabled=dtype == "bf16")
    losses, target_tokens = [], 0
    meter.sync()
    started = time.perf_counter()
    for chunk in batches:
        width = -(-max(len(e["input_ids"]) for e in chunk) // 8) * 8
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
        ids, labels, mask = ids.to(meter.device), labels.to(meter.device), mask.to(meter.device)
        with autocast:
            loss = trainable_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRADIENT_CLIPPING)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        target_tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
    meter.sync()
    seconds = time.perf_counter() - started
    peak = meter.peak()
    if save_to is not None:
        trainable_model.save_pretrained(str(save_to))
    del trainable_model, model, optimizer, params
    free()
    return {"target_tokens_per_s": target_tokens / seconds, "target_tokens": target_tokens, "seconds": seconds,
            "steps": len(batches), "first_loss": losses[0], "final_loss": sum(losses[-5:]) / len(losses[-5:]),
            "dtype": f"fp32 weights, {'bf16 autocast' if dtype == 'bf16' else 'no autocast'}",
            "peak_memory_gib": peak, "memory_held_before_gib": held}


def distill_stages(model_dir: Path, sizes: tuple[int, int, int], profile: dict, dtype: str, peak_flops: float,
                   meter: Meter, work: Path) -> tuple[dict, dict, dict[str, Path]]:
    """LoRA under ZeRO-2 and ZeRO-3 against the plain loop, then full fine-tuning against its plain
    loop; returns both stages' figures and the three LoRA adapters (the mixture's experts)."""
    import torch

    from modecotd.distill import one_rank_group

    _, body, head = sizes
    rows = training_rows(profile["distill_rows"], profile)
    examples = tokenized(rows, model_dir, profile["max_length"])
    if len(examples) != len(rows):
        raise RuntimeError(f"{len(rows) - len(examples)} rows are longer than max_length")
    all_tokens = sum(len(e["input_ids"]) for e in examples)
    full_rows = rows[:profile["full_rows"]]
    full_examples = examples[:profile["full_rows"]]
    full_tokens = sum(len(e["input_ids"]) for e in full_examples)
    experts = {name: work / name for name in ("zero2", "zero3", "plain")}
    batch, length = profile["distill_batch"], profile["max_length"]
    backend = "nccl" if meter.device == "cuda" else "gloo"
    linear = torch.nn.functional.linear
    with one_rank_group(backend):  # DeepSpeed keeps the first group it sees: one for every run
        say(f"distill: LoRA, ZeRO-2 ({len(rows)} rows, batch {batch})")
        zero2 = ours_training(model_dir, rows, experts["zero2"], batch, length, 2, False, meter)
        say("distill: plain PyTorch + peft LoRA loop")
        plain = plain_training(model_dir, rows, batch, length, dtype, False, meter, save_to=experts["plain"])
        say(f"full fine-tuning: ours, ZeRO-2 ({len(full_rows)} rows, batch {profile['full_batch']})")
        full_ours = ours_training(model_dir, full_rows, work / "full", profile["full_batch"], length, 2, True, meter)
        say("full fine-tuning: plain loop")
        full_plain = plain_training(model_dir, full_rows, profile["full_batch"], length, dtype, True, meter)
        say("distill: LoRA, ZeRO-3")
        zero3 = ours_training(model_dir, rows, experts["zero3"], batch, length, 3, False, meter)
    # DeepSpeed's ZeRO-3 swaps torch.nn.functional.linear for its own (memory_efficient_linear, on
    # by default) for the rest of the process; put it back so that later stages run plain torch.
    zero3["left_linear_patched"] = torch.nn.functional.linear is not linear
    torch.nn.functional.linear = linear
    for run in (zero2, zero3, plain):
        run["mfu"] = model_flops(examples, body, head, 4) / run["seconds"] / peak_flops
    for run in (full_ours, full_plain):
        run["mfu"] = model_flops(full_examples, body, head, 6) / run["seconds"] / peak_flops
    base = plain["target_tokens_per_s"]
    distill = {"ratio_zero2": zero2["target_tokens_per_s"] / base, "ratio_zero3": zero3["target_tokens_per_s"] / base,
               "ours_zero2": zero2, "ours_zero3": zero3, "baseline": plain, "rows": len(rows), "batch_size": batch,
               "max_length": length, "all_tokens_per_epoch": all_tokens, "memory_measure": meter.kind}
    full = {"ratio": full_ours["target_tokens_per_s"] / full_plain["target_tokens_per_s"], "ours": full_ours,
            "baseline": full_plain, "rows": len(full_rows), "batch_size": profile["full_batch"],
            "all_tokens_per_epoch": full_tokens, "memory_measure": meter.kind}
    return distill, full, experts


# -- 4. mixture ---------------------------------------------------------------------------------------


def mixture_stage(model_dir: Path, experts: dict[str, Path], profile: dict, meter: Meter) -> dict:
    import torch
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers import AutoModelForCausalLM

    from modecotd.distill import collate, tokenize_rows
    from modecotd.mixture import Mixture
    from modecotd.models import load_tokenizer
    from modecotd.tasks.generators import FAMILIES as KINDS
    from modecotd.tasks.generators import generate

    kind = KINDS[FEWSHOT_FAMILY]
    fewshot = [{"question": e.question, "answer": e.answer, "rationale": e.rationale}
               for e in generate(FEWSHOT_FAMILY, 5, seed=21, size=2)]
    names = list(experts)
    candidates = (torch.rand(profile["candidates"], len(names), generator=torch.Generator().manual_seed(0)) * 3 - 1.5)

    mixture = Mixture(model_dir, experts, "lorahub", "auto")
    batch = mixture.batch_for(fewshot, kind, 512)
    mixture.candidate_losses(batch, candidates[:2])  # warm-up, like the baseline's
    meter.sync()
    started = time.perf_counter()
    ours_losses = mixture.candidate_losses(batch, candidates)
    ours_seconds = time.perf_counter() - started
    dtype = mixture.precision.dtype
    del mixture
    free()

    tokenizer = load_tokenizer(model_dir, "right")
    examples, _ = tokenize_rows(fewshot, kind, tokenizer, 512)
    reference_batch = collate(examples, tokenizer.pad_token_id, meter.device)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(meter.device)
    model = PeftModel.from_pretrained(base, str(experts[names[0]])).eval()
    cache = {n: load_peft_weights(str(experts[n]), device=meter.device) for n in names}

    def objective(weights) -> float:
        combined = {key: sum(float(w) * cache[n][key] for w, n in zip(weights, names, strict=True))
                    for key in cache[names[0]]}
        set_peft_model_state_dict(model, combined)
        with torch.no_grad():
            return float(model(**reference_batch).loss)

    objective(candidates[0])
    meter.sync()
    shown = candidates[:profile["baseline_candidates"]]
    started = time.perf_counter()
    base_losses = [objective(c) for c in shown]
    base_seconds = time.perf_counter() - started
    ours_rate, base_rate = len(candidates) / ours_seconds, len(shown) / base_seconds
    gap = max(abs(a - b) for a, b in zip(ours_losses[:len(shown)], base_losses, strict=True))
    return {"ratio": ours_rate / base_rate, "ours_candidates_per_s": ours_rate,
            "baseline_candidates_per_s": base_rate, "ours_candidates": len(candidates),
            "baseline_candidates": len(shown), "ours_seconds": ours_seconds, "baseline_seconds": base_seconds,
            "max_loss_gap": gap, "mean_baseline_loss": sum(base_losses) / len(base_losses),
            "experts": names, "fewshot_rows": len(examples), "dtype": dtype, "baseline_dtype": "fp32"}


# -- 5. evaluation ------------------------------------------------------------------------------------


def evaluation_stage(model_dir: Path, adapter: Path, profile: dict, meter: Meter) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from modecotd.evaluate import load_system, predict
    from modecotd.plan import SystemSpec
    from modecotd.models import load_tokenizer
    from modecotd.prompts import student_prompt
    from modecotd.tasks.answers import END_MARK
    from modecotd.tasks.generators import FAMILIES as KINDS
    from modecotd.tasks.generators import generate

    kind = KINDS[EVAL_FAMILY]
    examples = generate(EVAL_FAMILY, profile["eval_questions"], seed=31, size=family_size(EVAL_FAMILY, profile))
    batch_size = evaluation_batch_size(meter.device)
    new_tokens = profile["eval_tokens"]
    tokenizer = load_tokenizer(model_dir)
    loaded = load_system(model_dir, "auto", SystemSpec("expert", adapter=str(adapter)))
    dtype = loaded.get_base_model().precision.dtype  # load_lm's choice for dtype auto
    predict(loaded, tokenizer, examples[:2], kind, batch_size=batch_size, max_new_tokens=4)  # warm-up
    meter.sync()
    started = time.perf_counter()
    outputs = predict(loaded, tokenizer, examples, kind, batch_size=batch_size, max_new_tokens=new_tokens)
    meter.sync()
    ours_seconds = time.perf_counter() - started
    del loaded
    free()

    def tokens(texts: list[str]) -> int:
        """Tokens written, counted the same way on both sides: the texts (up to the stop mark) re-tokenised."""
        return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)

    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, _torch_name(dtype)))
    model = PeftModel.from_pretrained(plain.to(meter.device), str(adapter)).eval()
    plain_tokenizer = load_tokenizer(model_dir)

    def one(question: str, max_new: int) -> str:
        inputs = plain_tokenizer(student_prompt(question, kind), return_tensors="pt").to(meter.device)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, stop_strings=[END_MARK],
                                    tokenizer=plain_tokenizer, pad_token_id=plain_tokenizer.pad_token_id)
        new = output[0, inputs["input_ids"].shape[1]:]
        text = plain_tokenizer.decode(new, skip_special_tokens=True)
        return text[:text.index(END_MARK) + len(END_MARK)] if END_MARK in text else text

    one(examples[0].question, 4)
    meter.sync()
    asked = examples[:profile["baseline_questions"]]
    started = time.perf_counter()
    base_outputs = [one(e.question, new_tokens) for e in asked]
    meter.sync()
    base_seconds = time.perf_counter() - started
    base_tokens, ours_tokens = tokens(base_outputs), tokens(outputs)
    agree = sum(a == b for a, b in zip(outputs[:len(asked)], base_outputs, strict=True)) / len(asked)
    ours_rate, base_rate = ours_tokens / ours_seconds, base_tokens / base_seconds
    return {"ratio": ours_rate / base_rate, "ours_tokens_per_s": ours_rate, "baseline_tokens_per_s": base_rate,
            "ours_tokens": ours_tokens, "baseline_tokens": base_tokens, "ours_seconds": ours_seconds,
            "baseline_seconds": base_seconds, "questions": len(examples), "baseline_questions": len(asked),
            "batch_size": batch_size, "max_new_tokens": new_tokens, "output_agreement": agree, "dtype": dtype}


def evaluation_batch_size(device: str) -> int:
    """The evaluation stage's default batch size (``auto``) on ``device``."""
    from modecotd.config import EVALUATION_BATCH

    return EVALUATION_BATCH.resolve("auto", device)


# -- the run ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", "--tiny", action="store_true",
                        help="a tiny student and small sizes (the CPU, well under a minute), for tests")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run the ~1B student without a GPU (hours on a few cores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    wall = time.perf_counter()

    import torch

    from modecotd.precision import hardware_summary, matmul_peak, resolve_dtype

    profile = PROFILES["quick" if args.quick else "full"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not (args.quick or args.allow_cpu):
        parser.error("no GPU is visible: the ~1B student is for one GPU; use --quick (or --allow-cpu)")
    precision = resolve_dtype("auto", device)
    meter = Meter(device)
    seconds: dict[str, float] = {}
    say(f"device {device}, dtype {precision.describe()}, {'quick' if args.quick else 'full'} mode")

    with tempfile.TemporaryDirectory(prefix="modecotd-gpu-bench-") as tmp:
        work = Path(tmp)
        model_dir = work / "student"
        clock = time.perf_counter()
        sizes = build_student(model_dir, profile["model"], device, precision.dtype)
        params = sizes[0]
        seconds["build"] = time.perf_counter() - clock
        say(f"student: {params / 1e6:.1f}M parameters")
        clock = time.perf_counter()
        peak = matmul_peak(precision.dtype, seconds=profile["peak_seconds"], size=profile["peak_size"], device=device)
        seconds["matmul_peak"] = time.perf_counter() - clock
        say(f"{precision.dtype} matmul peak {peak / 1e12:.2f} TFLOP/s")

        clock = time.perf_counter()
        say("teacher")
        teacher = teacher_stage(model_dir, profile, meter)
        free()  # the stage's models, once it has returned
        seconds["teacher"] = time.perf_counter() - clock
        clock = time.perf_counter()
        distill, full, experts = distill_stages(model_dir, sizes, profile, precision.dtype, peak, meter, work)
        seconds["distill_and_full_finetune"] = time.perf_counter() - clock
        clock = time.perf_counter()
        say("mixture")
        mixture = mixture_stage(model_dir, experts, profile, meter)
        free()  # the stage's models, once it has returned
        seconds["mixture"] = time.perf_counter() - clock
        clock = time.perf_counter()
        say("evaluation")
        evaluation = evaluation_stage(model_dir, experts["zero2"], profile, meter)
        free()  # the stage's models, once it has returned
        seconds["evaluation"] = time.perf_counter() - clock

    ratios = {"teacher": teacher["ratio"], "distill_lora_zero2": distill["ratio_zero2"],
              "distill_lora_zero3": distill["ratio_zero3"], "full_finetune": full["ratio"],
              "mixture": mixture["ratio"], "evaluation": evaluation["ratio"]}
    mfu = distill["ours_zero2"]["mfu"]
    hardware = hardware_summary()
    result = {
        "benchmark": "gpu", "ratio": round(min(ratios.values()), 3),
        "goal": f"on one H100: distill LoRA MFU (ZeRO-2) >= {GOAL_MFU} on the ~1B student, and every stage "
                f">= {GOAL_RATIO}x its plain baseline",
        "met": mfu >= GOAL_MFU and min(ratios.values()) >= GOAL_RATIO,
        "goal_applies": device == "cuda" and not args.quick,
        **({"note": "quick mode: a 3M-parameter student whose 49k-token vocabulary dominates, on small "
                    "inputs; its ratios and MFU say nothing about the GPU goals"} if args.quick else {}),
        "stage_ratios": {k: round(v, 3) for k, v in ratios.items()},
        "stage_met": {k: v >= GOAL_RATIO for k, v in ratios.items()},
        "mfu_lora_zero2": round(mfu, 4), "mfu_met": mfu >= GOAL_MFU,
        "mode": "quick" if args.quick else "full", "device": hardware.get("gpu", hardware["cpu"]),
        "device_type": device, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dtype": precision.dtype, "precision": precision.as_dict(), "hardware": hardware,
        "torch": torch.__version__,
        "model": {"params": params, "body_params": sizes[1], "head_params": sizes[2], **profile["model"]},
        "matmul_peak_tflops": peak / 1e12, "matmul_peak_size": profile["peak_size"],
        "teacher": teacher, "distill": distill, "full_finetune": full, "mixture": mixture, "evaluation": evaluation,
        "stage_seconds": seconds, "wall_seconds": time.perf_counter() - wall,
        "ray_imported": "ray" in sys.modules,
    }
    print(json.dumps(_rounded(result)), flush=True)
    return result


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


if __name__ == "__main__":
    main()
