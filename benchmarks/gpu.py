"""GPU: every stage's own code path on a ~1B student, each beside a plain transformers + peft baseline.

One command for one GPU (sized from its FLOP counts for about 5 minutes on an H100, 8 at most),
needing only torch, transformers, peft, DeepSpeed, pydantic and this project's own pure-Python
modules: Ray is never imported (the library modules used here are Ray-free), and no model or
tokenizer is downloaded or unpacked. All of that is checked before anything runs: a missing
package stops the run at once, with one message naming it.

The student is a random-initialised Llama of about 1B parameters (hidden 2048, 20 layers, 32
heads, 8 KV heads, intermediate 5632, tied embeddings, a 49,152-token vocabulary: SmolLM2's
shape) built and saved to a temp folder with a tokenizer built here: a byte-level BPE trained
(with the ``tokenizers`` library, in about a second) on this benchmark's own generated task texts,
its vocabulary filled up to the model's with further merges of those tokens (pseudo-words no task
text uses), wrapped in ``PreTrainedTokenizerFast`` with ``<pad>``, ``<s>`` and ``</s>``. Rows are
generated questions with scripted rationales (:mod:`modecotd.tasks.generators`).

Rows that stop. A random model never writes its EOS token, so every generated row would run to
``max_new_tokens`` and the greedy loop's "finished rows leave the batch" path would never run. So
the student's ``generation_config.eos_token_id`` is a list: ``</s>`` and an evenly spaced
1/``mean_stop`` of the vocabulary (every ~64th token; special tokens aside). A random ~1B
Llama's greedy output wanders over the whole vocabulary, so each row meets one of them after a
geometric spread of lengths (mean about ``mean_stop`` tokens); so would an expert that writes
varied text. Both sides read the same generation config (ours through
:func:`modecotd.generation.stop_token_ids`, transformers' ``generate`` by itself) and stop alike;
the spread is reported (min/median/max generated tokens per row, both sides). The quick student
(``--quick``: hidden 64, 2 layers, a 4,096-token vocabulary, torch on one CPU thread) is
initialised wider (``initializer_range`` 0.3, not 0.02): a 64-wide model at 0.02 repeats its
prompt's last token forever, one at 0.3 wanders as the ~1B one does at 0.02.

Each stage is timed for ours and its baseline in the same run, on the same inputs, in the same
process and dtype; the ratio is ours over the baseline (higher is better). Model loading is
excluded; each side is warmed up first.

1. teacher: :class:`~modecotd.backends.hf_local.TransformersGenerator` (dtype auto: bf16 on a
   GPU), batch 64, zero-shot CoT prompts with the stage's stop strings. Baseline: transformers'
   ``model.generate`` (same dtype, loaded with ``AutoModelForCausalLM``) on the same left-padded
   batches (the same prompts, all of them, sorted by length as ours sorts them, batch 64), greedy,
   the same ``max_new_tokens``, the same stop strings (``stop_strings=``, ``tokenizer=``) and EOS
   list. Generated tokens per second, counted alike on both sides: a row's new tokens up to and
   with the one that ends it, padding not counted.
2. distill: :func:`~modecotd.distill.train_expert` (LoRA, DeepSpeed ZeRO-2 and ZeRO-3, dtype
   auto) on a one-rank group (NCCL on a GPU, gloo on a CPU). Baseline: a plain PyTorch + peft
   loop (fp32 weights under bf16 autocast, AdamW, linear warm-up and decay, the same shuffled
   batches of the same rows (ours' order), padded to their longest row rounded up to 8 as
   ``DataCollatorForSeq2Seq`` does, the model's own loss over full logits, gradient clipping),
   same batch size and max length. Both are timed from the end of optimizer step ``warmup_steps``
   to the end of the last step (ours through ``train_expert``'s ``report`` callback, the baseline
   the same way: the device synchronised at both ends), so start-up, the first kernels' tuning and
   AdamW's state allocation are left out alike. Figures: target tokens per second, peak memory,
   padding share (padded positions over all positions of the batches as fed) and MFU twice: over
   the peak of a square matmul in the compute dtype measured in this run (8192 on a GPU) and over
   the card's spec dense bf16 figure (H100 SXM 989 TFLOP/s, H100 PCIe 756, H200 989, A100 312,
   L40S 362, L4 121; None for any other card and on a CPU). Model FLOPs of the timed steps: 4 x
   (the weights outside the embedding x every real token + the output projection x the target
   tokens: only they need logits), forward and backward through the frozen weights' activations;
   padding and attention scores are not counted, so it is a conservative figure. ZeRO-3 runs
   last: DeepSpeed could swap ``torch.nn.functional.linear`` for its own for the rest of the
   process; it is put back.
3. full fine-tuning: ``DistillSettings(full_finetune=True)`` (ZeRO-2) against the plain loop of 2
   with every weight trainable; timed the same way; MFU with 6 in place of 4.
4. mixture: :meth:`modecotd.mixture.Mixture.candidate_losses` (lorahub, dtype auto) over three
   experts (the two adapters trained in 2 and the baseline's), candidate weight vectors per
   second. Baseline: LoraHub's way (see benchmarks/mixture_search.py) in the same dtype as ours
   (bf16 on a GPU, base and adapter weights alike): the student with a peft slot, per candidate a
   combined state dict, ``set_peft_model_state_dict`` and the model's loss; the same candidates,
   all of them.
5. evaluation: :func:`modecotd.evaluate.predict` (batched greedy, the evaluation config's default
   batch size) on the ZeRO-2 expert loaded by :func:`~modecotd.evaluate.load_system`. Baseline:
   ``model.generate`` on the same peft model (same dtype) over the same left-padded batches (all
   questions, ours' order and batch size), greedy, ``stop_strings=[END_MARK]``, the same
   ``max_new_tokens`` and EOS list. Generated tokens per second, counted alike for both: each
   output text, up to its stop mark, tokenised again.

Goals (one H100): distill LoRA MFU >= 0.40 of the card's spec dense bf16 figure (ZeRO-2; over the
measured matmul peak only on a card with no known figure) and every stage >= 2x its baseline.

    python -m benchmarks.gpu            # the ~1B student on the GPU
    python -m benchmarks.gpu --quick    # a tiny student, small sizes, one CPU thread: under a minute

The last line printed is one JSON object with the figures (``ratio``: the smallest stage ratio).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import os
import random
import re
import resource
import statistics
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
# Sizes per mode: the GPU's fill an H100 for about 5 minutes (8 at most); quick's run on one CPU thread.
# Training runs are sized for tens of seconds each on an H100 (a LoRA step of 32 rows of ~200
# tokens, a full fine-tuning step of 16), the first ``warmup_steps`` optimizer steps left out.
PROFILES = {
    "full": dict(model=ONE_B, init=0.02, vocab=49152, mean_stop=64, family_size="max",
                 teacher_prompts=128, teacher_batch=64, teacher_tokens=128,
                 distill_rows=6144, distill_batch=32, max_length=512, full_rows=3072, full_batch=16,
                 warmup_steps=5, candidates=96, eval_questions=128, eval_tokens=96,
                 peak_size=8192, peak_seconds=3.0),
    "quick": dict(model=TINY, init=0.3, vocab=4096, mean_stop=6, family_size="min",
                  teacher_prompts=16, teacher_batch=64, teacher_tokens=16,
                  distill_rows=48, distill_batch=8, max_length=512, full_rows=32, full_batch=8,
                  warmup_steps=2, candidates=6, eval_questions=16, eval_tokens=16,
                  peak_size=1024, peak_seconds=0.5),
}
FAMILIES = ("coin_flip", "last_letter_concatenation", "tracking_shuffled_objects", "arithmetic")
FEWSHOT_FAMILY = "coin_flip"
EVAL_FAMILY = "arithmetic"
TEACHER_FAMILY = "arithmetic"
LEARNING_RATE = 2e-4
GIB = 2**30
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIALS = (PAD, BOS, EOS)  # ids 0, 1, 2
# Dense bf16 tensor-core TFLOP/s from the vendor's data sheets (without sparsity).
SPEC_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0,
                    "L4": 121.0}
# What the benchmark needs besides the standard library; the project's modules it runs.
REQUIRED_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "peft", "deepspeed", "pydantic")
LIBRARY_MODULES = ("modecotd.precision", "modecotd.models", "modecotd.generation", "modecotd.backends.hf_local",
                   "modecotd.losses", "modecotd.distill", "modecotd.mixture", "modecotd.evaluate", "modecotd.plan",
                   "modecotd.config", "modecotd.prompts", "modecotd.tasks.generators", "modecotd.tasks.answers")


def say(message: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def check_requirements() -> None:
    """Import everything the stages need now, before any of them runs; exit with one message
    naming whatever is missing (or fails to import)."""
    problems: dict[str, str] = {}
    for name in (*REQUIRED_PACKAGES, *LIBRARY_MODULES):
        try:
            importlib.import_module(name)
        except Exception as error:  # ImportError, or a package that breaks while importing
            missing = (getattr(error, "name", None) or "").split(".")[0]
            key = missing if isinstance(error, ImportError) and missing and missing != "modecotd" else name
            problems.setdefault(key, f"{type(error).__name__}: {error}")
    if problems:
        named = "; ".join(f"{k} ({v})" for k, v in problems.items())
        packages = [k for k in problems if k in REQUIRED_PACKAGES]
        hint = f" Install: pip install {' '.join(packages)}." if packages else ""
        raise SystemExit(f"benchmarks.gpu cannot run, nothing has run: missing or broken: {named}. It needs "
                         f"{', '.join(REQUIRED_PACKAGES)} and this project's own modules.{hint}")


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


def spec_bf16_tflops(device_name: str | None) -> tuple[str | None, float | None]:
    """(the card, its spec dense bf16 TFLOP/s) for a known card's CUDA device name; (None, None)
    for a CPU (``None``) or a card not in :data:`SPEC_BF16_TFLOPS` (an H100 or H200 NVL included)."""
    if not device_name:
        return None, None
    name = device_name.lower()

    def has(word: str) -> bool:
        return re.search(rf"\b{word}\b", name) is not None

    if has("nvl"):
        card = None
    elif has("h100"):
        card = "H100 PCIe" if "pcie" in name else "H100 SXM"
    elif has("h200"):
        card = "H200"
    elif has("a100"):
        card = "A100"
    elif has("l40s"):
        card = "L40S"
    elif has("l4"):
        card = "L4"
    else:
        card = None
    return card, SPEC_BF16_TFLOPS.get(card) if card else None


def spread(counts: list[int]) -> dict:
    """Min, median and max of per-row generated-token counts."""
    return {"min": min(counts), "median": statistics.median(counts), "max": max(counts)}


# -- the student and the data -----------------------------------------------------------------------


def family_size(family: str, profile: dict) -> int | None:
    from modecotd.tasks.generators import SIZE_RANGES

    return SIZE_RANGES[family][0 if profile["family_size"] == "min" else 1]


def tokenizer_corpus() -> list[str]:
    """The texts the benchmark's tokenizer learns its merges from: every family's teacher prompts,
    student prompts and training targets, at every size (seeded: the same texts on every run)."""
    from modecotd.prompts import TeacherPrompts, student_prompt, student_target
    from modecotd.tasks.generators import FAMILIES as KINDS
    from modecotd.tasks.generators import SIZE_RANGES, generate

    texts = []
    for family in FAMILIES:
        low, high = SIZE_RANGES[family]
        for size in range(low, high + 1):
            for e in generate(family, 60, seed=99, size=size):
                texts.append(TeacherPrompts(KINDS[family]).reasoning(e.question))
                texts.append(student_prompt(e.question, KINDS[family]) + student_target(e.rationale, e.answer))
    return texts


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens, built here: merges learnt from
    :func:`tokenizer_corpus` (the task texts need about 1,800 tokens), then filler merges of two of
    those tokens each (pseudo-words no task text contains) up to ``vocab_size``, so that the
    student's vocabulary (and its output projection) has a realistic size. Returns it wrapped in
    ``PreTrainedTokenizerFast`` and the id of its first filler token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    spec = json.loads(bpe.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    first_filler = len(vocab)
    # the learnt merges (neither special tokens nor single bytes), by id
    learnt = [t for t, i in sorted(vocab.items(), key=lambda item: item[1]) if i >= len(SPECIALS) + 256]
    tails = [t for t in learnt if not t.startswith("Ġ")]  # a word's continuation
    for head in learnt:
        for tail in tails:
            if len(vocab) >= vocab_size:
                break
            if head + tail not in vocab:
                vocab[head + tail] = len(vocab)
                merges.append([head, tail] if isinstance(merges[0], list) else f"{head} {tail}")
    if len(vocab) != vocab_size:
        raise RuntimeError(f"the benchmark's tokenizer reached {len(vocab)} tokens, not {vocab_size}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=BOS,
                                        eos_token=EOS, pad_token=PAD)
    return tokenizer, first_filler


def stop_ids(vocab_size: int, specials: int, mean_stop: int) -> list[int]:
    """An evenly spaced 1/``mean_stop`` of the vocabulary (the ``specials`` first ids aside): a model
    whose greedy output wanders over the vocabulary meets one after about ``mean_stop`` tokens."""
    count = max(1, round(vocab_size / mean_stop))
    ordinary = vocab_size - specials
    return [specials + (2 * k + 1) * ordinary // (2 * count) for k in range(count)]


def build_student(out: Path, profile: dict, device: str, dtype: str) -> dict:
    """A random-initialised Llama of the profile's shape with the tokenizer of :func:`build_tokenizer`,
    its generation config's EOS list set (see the module's docstring), saved to ``out``. Returns its
    sizes: parameters, the weights a token's forward multiplies outside the embedding and the output
    projection (the "body"), and the output projection's (vocabulary x hidden); and the EOS list."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from modecotd.precision import TORCH_DTYPES

    tokenizer, first_filler = build_tokenizer(profile["vocab"])
    dims = profile["model"]
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         initializer_range=profile["init"], **dims)
    torch.manual_seed(0)
    with torch.device(device):  # a 1B model is initialised on the GPU, not in host memory
        model = AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[dtype])
    ends = [tokenizer.eos_token_id, *stop_ids(len(tokenizer), len(SPECIALS), profile["mean_stop"])]
    model.generation_config.eos_token_id = ends
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    params = sum(p.numel() for p in model.parameters())
    head = config.vocab_size * config.hidden_size
    body = params - head * (1 if config.tie_word_embeddings else 2)  # the embedding lookup is no matmul
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    free()
    return {"params": params, "body_params": body, "head_params": head, "vocab": len(tokenizer),
            "task_tokens": first_filler, "eos_ids": len(ends), "initializer_range": profile["init"]}


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


def tokenized(rows: list[dict], model_dir: Path, max_length: int) -> list[dict]:
    from modecotd.distill import tokenize_rows
    from modecotd.models import load_tokenizer
    from modecotd.tasks.schema import AnswerKind

    examples, _ = tokenize_rows(rows, AnswerKind.YES_NO, load_tokenizer(model_dir, "right"), max_length)
    return examples


# -- batched greedy generation, as a transformers user writes it --------------------------------------


def plain_generate(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int,
                   stops: list[str], device: str) -> list[tuple[str, int]]:
    """transformers' ``model.generate`` on left-padded batches of ``batch_size`` prompts, in the
    order :func:`modecotd.generation.generate_samples` makes them (sorted by length), greedy, with
    ``stop_strings`` and the model's own EOS list. Returns each prompt's (new text, new tokens): the
    tokens up to and with the one that ends the row, the padding after it not counted."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    tokenizer.padding_side = "left"
    out: list[tuple[str, int]] = [("", 0)] * len(prompts)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        batch = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, stop_strings=stops,
                                    tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id)
        new = output[:, batch["input_ids"].shape[1]:]
        counts = (new != tokenizer.pad_token_id).sum(1).tolist()
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for i, text, count in zip(indices, texts, counts, strict=True):
            out[i] = (text, int(count))
    return out


def load_plain(model_dir: Path, dtype: str, device: str):
    """The student as a transformers user loads it: ``AutoModelForCausalLM`` in ``dtype``, on ``device``."""
    from transformers import AutoModelForCausalLM

    from modecotd.precision import TORCH_DTYPES

    extra = {"device_map": {"": device}} if device != "cpu" else {}
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=TORCH_DTYPES[dtype], **extra).eval()


# -- 1. teacher ---------------------------------------------------------------------------------------


def teacher_stage(model_dir: Path, profile: dict, meter: Meter) -> dict:
    from modecotd.backends import cut_at_stop
    from modecotd.backends.hf_local import TransformersGenerator
    from modecotd.models import load_tokenizer
    from modecotd.prompts import TeacherPrompts
    from modecotd.tasks.generators import FAMILIES as KINDS
    from modecotd.tasks.generators import generate

    teacher = TeacherPrompts(KINDS[TEACHER_FAMILY])
    questions = generate(TEACHER_FAMILY, profile["teacher_prompts"], seed=11,
                         size=family_size(TEACHER_FAMILY, profile))
    prompts = [teacher.reasoning(e.question) for e in questions]
    stop, new_tokens, batch = teacher.reasoning_stop, profile["teacher_tokens"], profile["teacher_batch"]

    generator = TransformersGenerator(model_dir, dtype="auto", batch_size=batch)
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
    ours_rows = [c.tokens for c in done]
    del generator
    free()

    tokenizer = load_tokenizer(model_dir)
    model = load_plain(model_dir, dtype, meter.device)
    settings = dict(batch_size=batch, stops=stop, device=meter.device)
    plain_generate(model, tokenizer, prompts[:2], max_new_tokens=4, **settings)  # warm-up
    meter.sync()
    started = time.perf_counter()
    base = plain_generate(model, tokenizer, prompts, max_new_tokens=new_tokens, **settings)
    meter.sync()
    base_seconds = time.perf_counter() - started
    del model
    free()
    base_rows = [n for _, n in base]
    agree = sum(c.texts[0] == cut_at_stop(text, stop) for c, (text, _) in zip(done, base, strict=True)) / len(done)
    ours_tokens, base_tokens = sum(ours_rows), sum(base_rows)
    ours_rate, base_rate = ours_tokens / ours_seconds, base_tokens / base_seconds
    return {"ratio": ours_rate / base_rate, "ours_tokens_per_s": ours_rate, "baseline_tokens_per_s": base_rate,
            "ours_tokens": ours_tokens, "baseline_tokens": base_tokens, "ours_seconds": ours_seconds,
            "baseline_seconds": base_seconds, "prompts": len(prompts), "baseline_prompts": len(base),
            "batch_size": batch, "baseline_batch_size": batch, "max_new_tokens": new_tokens,
            "ours_length_spread": spread(ours_rows), "baseline_length_spread": spread(base_rows),
            "ours_rows_at_max_new_tokens": sum(n >= new_tokens for n in ours_rows),
            "baseline_rows_at_max_new_tokens": sum(n >= new_tokens for n in base_rows), "output_agreement": agree,
            "dtype": dtype, "baseline_dtype": dtype,
            "baseline": "model.generate on the same left-padded length-sorted batches, greedy, stop_strings"}


# -- 2. and 3. distillation ---------------------------------------------------------------------------


def batch_plan(examples: list[dict], batch: int, seed: int = 0) -> list[list[dict]]:
    """One epoch's batches: the examples shuffled by ``random.Random(seed)`` and cut in order, as
    :func:`modecotd.distill.epoch_batches` cuts epoch 0 (checked against ours' reported target tokens)."""
    order = examples[:]
    random.Random(seed).shuffle(order)
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def fed(chunk: list[dict], multiple: int) -> dict:
    """A batch as fed: real tokens, target tokens and positions (rows x the longest row, rounded up
    to ``multiple``)."""
    width = -(-max(len(e["input_ids"]) for e in chunk) // multiple) * multiple
    return {"tokens": sum(len(e["input_ids"]) for e in chunk), "positions": width * len(chunk),
            "targets": sum(sum(1 for t in e["labels"] if t != -100) for e in chunk)}


def timed_figures(batches: list[list[dict]], multiple: int, warmup: int, seconds: float, sizes: dict,
                  factor: int, peak: float, spec: float | None) -> dict:
    """Throughput, MFU (over the measured peak and the spec one) and padding of the steps after
    ``warmup``, and the padding share over every batch as fed."""
    every = [fed(chunk, multiple) for chunk in batches]
    timed = every[warmup:]
    targets = sum(b["targets"] for b in timed)
    flops = factor * (sizes["body_params"] * sum(b["tokens"] for b in timed) + sizes["head_params"] * targets)
    positions = sum(b["positions"] for b in every)
    return {"target_tokens_per_s": targets / seconds, "seconds": seconds, "timed_steps": len(timed),
            "timed_target_tokens": targets, "mfu": flops / seconds / peak,
            "mfu_spec": None if spec is None else flops / seconds / (spec * 1e12),
            "padding_share": 1 - sum(b["tokens"] for b in every) / positions, "positions": positions}


class StepClock:
    """The clock of a training run: after each optimizer step, its cumulative target tokens; at the
    end of step ``warmup`` and of the last step, the device synchronised and the time taken."""

    def __init__(self, warmup: int, meter: Meter):
        self.warmup, self.meter = warmup, meter
        self.targets: list[int] = []
        self.marks: dict[str, float] = {}

    def step(self, step: int, total: int, target_tokens: int) -> None:
        if total <= self.warmup:
            raise ValueError(f"{total} optimizer steps leave none to time after {self.warmup} warm-up steps")
        self.targets.append(target_tokens)
        if step in (self.warmup, total):
            self.meter.sync()
            self.marks["start" if step == self.warmup else "end"] = time.perf_counter()

    @property
    def seconds(self) -> float:
        if set(self.marks) != {"start", "end"}:
            raise RuntimeError(f"the training reported {len(self.targets)} optimizer steps; the clock needs the "
                               f"end of step {self.warmup} and of the last one")
        return self.marks["end"] - self.marks["start"]

    def per_step(self) -> list[int]:
        return [b - a for a, b in zip([0, *self.targets], self.targets)]


def ours_training(model_dir: Path, rows: list[dict], examples: list[dict], out: Path, batch: int, max_length: int,
                  zero_stage: int, full: bool, meter: Meter, profile: dict, sizes: dict, peak: float,
                  spec: float | None) -> dict:
    """:func:`train_expert` as each Ray Train worker runs it, timed through its ``report`` callback."""
    from modecotd.distill import DistillSettings, train_expert

    settings = DistillSettings(student_dir=str(model_dir), dtype="auto", kind="yes_no", rows=rows,
                               output_dir=str(out), learning_rate=LEARNING_RATE, epochs=1, batch_size=batch,
                               max_length=max_length, zero_stage=zero_stage, full_finetune=full, seed=0)
    clock = StepClock(profile["warmup_steps"], meter)
    held = meter.start()
    summary = train_expert(settings, 0, 1, report=lambda m: clock.step(m["step"], m["total_steps"],
                                                                         m["target_tokens"]))
    peak_memory = meter.peak()
    free()
    plan = batch_plan(examples, batch)
    as_planned = clock.per_step() == [fed(chunk, 1)["targets"] for chunk in plan]
    figures = timed_figures(plan, 1, profile["warmup_steps"], clock.seconds, sizes, 6 if full else 4, peak, spec)
    if not as_planned:  # the library batches otherwise now: rate from its own reports, FLOPs pro rata
        timed = clock.targets[-1] - clock.targets[profile["warmup_steps"] - 1]
        scale = timed / figures["timed_target_tokens"]
        figures.update(target_tokens_per_s=timed / clock.seconds, timed_target_tokens=timed,
                       mfu=figures["mfu"] * scale, mfu_spec=figures["mfu_spec"] and figures["mfu_spec"] * scale)
    return {**figures, "batches_as_planned": as_planned, "steps": summary.steps,
            "warmup_steps": profile["warmup_steps"], "target_tokens": summary.target_tokens_rank0,
            "first_loss": summary.first_loss, "final_loss": summary.final_loss, "zero_stage": summary.zero_stage,
            "dtype": summary.precision.get("dtype", "?"), "peak_memory_gib": peak_memory,
            "memory_held_before_gib": held}


def plain_training(model_dir: Path, examples: list[dict], batch: int, dtype: str, full: bool, meter: Meter,
                   profile: dict, sizes: dict, peak: float, spec: float | None, save_to: Path | None = None) -> dict:
    """A plain PyTorch loop as one writes it with transformers + peft: fp32 weights under autocast,
    AdamW with linear warm-up and decay, the same shuffled batches as ours (see :func:`batch_plan`)
    padded to their longest row (rounded up to 8, as ``DataCollatorForSeq2Seq`` does), the model's
    own loss, gradient clipping; timed like ours (see :class:`StepClock`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from modecotd.distill import GRADIENT_CLIPPING, DistillSettings, warmup_then_linear
    from modecotd.losses import IGNORE_INDEX
    from modecotd.models import load_tokenizer

    defaults = DistillSettings(student_dir="", dtype=dtype, kind="yes_no", rows=[], output_dir="")
    tokenizer = load_tokenizer(model_dir, "right")
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
    batches = batch_plan(examples, batch)
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear(len(batches), defaults.warmup_ratio))
    autocast = torch.autocast(meter.device, dtype=torch.bfloat16, enabled=dtype == "bf16")
    clock = StepClock(profile["warmup_steps"], meter)
    losses, target_tokens = [], 0
    for step, chunk in enumerate(batches, start=1):
        width = -(-max(len(e["input_ids"]) for e in chunk) // 8) * 8
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
        target_tokens += int((labels != IGNORE_INDEX).sum())
        ids, labels, mask = ids.to(meter.device), labels.to(meter.device), mask.to(meter.device)
        with autocast:
            loss = trainable_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRADIENT_CLIPPING)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        clock.step(step, len(batches), target_tokens)
    peak_memory = meter.peak()
    if save_to is not None:
        trainable_model.save_pretrained(str(save_to))
    del trainable_model, model, optimizer, params
    free()
    figures = timed_figures(batches, 8, profile["warmup_steps"], clock.seconds, sizes, 6 if full else 4, peak, spec)
    return {**figures, "steps": len(batches), "warmup_steps": profile["warmup_steps"], "target_tokens": target_tokens,
            "first_loss": losses[0], "final_loss": sum(losses[-5:]) / len(losses[-5:]),
            "dtype": f"fp32 weights, {'bf16 autocast' if dtype == 'bf16' else 'no autocast'}",
            "peak_memory_gib": peak_memory, "memory_held_before_gib": held}


def distill_stages(model_dir: Path, sizes: dict, profile: dict, dtype: str, peak: float, spec: float | None,
                   meter: Meter, work: Path) -> tuple[dict, dict, dict[str, Path]]:
    """LoRA under ZeRO-2 and ZeRO-3 against the plain loop, then full fine-tuning against its plain
    loop; returns both stages' figures and the three LoRA adapters (the mixture's experts)."""
    import torch

    from modecotd.distill import one_rank_group

    rows = training_rows(profile["distill_rows"], profile)
    examples = tokenized(rows, model_dir, profile["max_length"])
    if len(examples) != len(rows):
        raise RuntimeError(f"{len(rows) - len(examples)} rows are longer than max_length")
    full_rows, full_examples = rows[:profile["full_rows"]], examples[:profile["full_rows"]]
    experts = {name: work / name for name in ("zero2", "zero3", "plain")}
    batch, length, full_batch = profile["distill_batch"], profile["max_length"], profile["full_batch"]
    common = dict(meter=meter, profile=profile, sizes=sizes, peak=peak, spec=spec)
    backend = "nccl" if meter.device == "cuda" else "gloo"
    linear = torch.nn.functional.linear
    with one_rank_group(backend):  # DeepSpeed keeps the first group it sees: one for every run
        say(f"distill: LoRA, ZeRO-2 ({len(rows)} rows, batch {batch})")
        zero2 = ours_training(model_dir, rows, examples, experts["zero2"], batch, length, 2, False, **common)
        say("distill: plain PyTorch + peft LoRA loop")
        plain = plain_training(model_dir, examples, batch, dtype, False, save_to=experts["plain"], **common)
        say(f"full fine-tuning: ours, ZeRO-2 ({len(full_rows)} rows, batch {full_batch})")
        full_ours = ours_training(model_dir, full_rows, full_examples, work / "full", full_batch, length, 2, True,
                                  **common)
        say("full fine-tuning: plain loop")
        full_plain = plain_training(model_dir, full_examples, full_batch, dtype, True, **common)
        say("distill: LoRA, ZeRO-3")
        zero3 = ours_training(model_dir, rows, examples, experts["zero3"], batch, length, 3, False, **common)
    # DeepSpeed's ZeRO-3 may swap torch.nn.functional.linear for its own (memory_efficient_linear) for
    # the rest of the process; put it back so that later stages run plain torch.
    zero3["left_linear_patched"] = torch.nn.functional.linear is not linear
    torch.nn.functional.linear = linear
    base = plain["target_tokens_per_s"]
    distill = {"ratio_zero2": zero2["target_tokens_per_s"] / base, "ratio_zero3": zero3["target_tokens_per_s"] / base,
               "ours_zero2": zero2, "ours_zero3": zero3, "baseline": plain, "rows": len(rows), "batch_size": batch,
               "baseline_batch_size": batch, "max_length": length,
               "all_tokens_per_epoch": sum(len(e["input_ids"]) for e in examples), "memory_measure": meter.kind}
    full = {"ratio": full_ours["target_tokens_per_s"] / full_plain["target_tokens_per_s"], "ours": full_ours,
            "baseline": full_plain, "rows": len(full_rows), "batch_size": full_batch,
            "baseline_batch_size": full_batch,
            "all_tokens_per_epoch": sum(len(e["input_ids"]) for e in full_examples), "memory_measure": meter.kind}
    return distill, full, experts


# -- 4. mixture ---------------------------------------------------------------------------------------


def mixture_stage(model_dir: Path, experts: dict[str, Path], profile: dict, meter: Meter) -> dict:
    import torch
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights

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
    meter.sync()
    ours_seconds = time.perf_counter() - started
    dtype = mixture.precision.dtype
    del mixture
    free()

    tokenizer = load_tokenizer(model_dir, "right")
    examples, _ = tokenize_rows(fewshot, kind, tokenizer, 512)
    reference_batch = collate(examples, tokenizer.pad_token_id, meter.device)
    # The same dtype as ours, adapters included (peft would otherwise keep them in fp32).
    model = PeftModel.from_pretrained(load_plain(model_dir, dtype, meter.device), str(experts[names[0]]),
                                      autocast_adapter_dtype=False).eval()
    adapter_dtype = str(next(p for n, p in model.named_parameters() if "lora_" in n).dtype).removeprefix("torch.")
    cache = {n: load_peft_weights(str(experts[n]), device=meter.device) for n in names}

    def objective(weights) -> float:
        combined = {key: sum(float(w) * cache[n][key] for w, n in zip(weights, names, strict=True))
                    for key in cache[names[0]]}
        set_peft_model_state_dict(model, combined)
        with torch.no_grad():
            return float(model(**reference_batch).loss)

    objective(candidates[0])  # warm-up
    meter.sync()
    started = time.perf_counter()
    base_losses = [objective(c) for c in candidates]
    meter.sync()
    base_seconds = time.perf_counter() - started
    del model, cache
    free()
    ours_rate, base_rate = len(candidates) / ours_seconds, len(candidates) / base_seconds
    gap = max(abs(a - b) for a, b in zip(ours_losses, base_losses, strict=True))
    return {"ratio": ours_rate / base_rate, "ours_candidates_per_s": ours_rate,
            "baseline_candidates_per_s": base_rate, "ours_candidates": len(candidates),
            "baseline_candidates": len(candidates), "ours_seconds": ours_seconds, "baseline_seconds": base_seconds,
            "max_loss_gap": gap, "mean_baseline_loss": sum(base_losses) / len(base_losses),
            "experts": names, "fewshot_rows": len(examples), "dtype": dtype, "baseline_dtype": dtype,
            "baseline_adapter_dtype": {"bfloat16": "bf16", "float32": "fp32"}.get(adapter_dtype, adapter_dtype)}


# -- 5. evaluation ------------------------------------------------------------------------------------


def evaluation_stage(model_dir: Path, adapter: Path, profile: dict, meter: Meter) -> dict:
    from peft import PeftModel

    from modecotd.evaluate import load_system, predict
    from modecotd.generation import cut_at_first_stop
    from modecotd.models import load_tokenizer
    from modecotd.plan import SystemSpec
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

    def tokens(text: str) -> int:
        """Tokens written, counted the same way on both sides: the text (up to the stop mark) re-tokenised."""
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # The same peft model as load_system builds (unmerged, peft's own adapter dtype), loaded plainly.
    model = PeftModel.from_pretrained(load_plain(model_dir, dtype, meter.device), str(adapter)).eval()
    plain_tokenizer = load_tokenizer(model_dir)
    prompts = [student_prompt(e.question, kind) for e in examples]
    settings = dict(batch_size=batch_size, stops=[END_MARK], device=meter.device)
    plain_generate(model, plain_tokenizer, prompts[:2], max_new_tokens=4, **settings)  # warm-up
    meter.sync()
    started = time.perf_counter()
    base = plain_generate(model, plain_tokenizer, prompts, max_new_tokens=new_tokens, **settings)
    meter.sync()
    base_seconds = time.perf_counter() - started
    del model
    free()
    base_outputs = [cut_at_first_stop(text, [END_MARK]) for text, _ in base]
    ours_rows, base_rows = [tokens(t) for t in outputs], [tokens(t) for t in base_outputs]
    ours_tokens, base_tokens = sum(ours_rows), sum(base_rows)
    agree = sum(a == b for a, b in zip(outputs, base_outputs, strict=True)) / len(outputs)
    ours_rate, base_rate = ours_tokens / ours_seconds, base_tokens / base_seconds
    return {"ratio": ours_rate / base_rate, "ours_tokens_per_s": ours_rate, "baseline_tokens_per_s": base_rate,
            "ours_tokens": ours_tokens, "baseline_tokens": base_tokens, "ours_seconds": ours_seconds,
            "baseline_seconds": base_seconds, "questions": len(examples), "baseline_questions": len(base),
            "batch_size": batch_size, "baseline_batch_size": batch_size, "max_new_tokens": new_tokens,
            "ours_length_spread": spread(ours_rows), "baseline_length_spread": spread(base_rows),
            "output_agreement": agree, "dtype": dtype, "baseline_dtype": dtype,
            "baseline": "model.generate on the same peft model and left-padded length-sorted batches, greedy, "
                        "stop_strings"}


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
                        help="run the ~1B student without a GPU (a day or more on a few cores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    wall = time.perf_counter()
    check_requirements()

    import torch

    from modecotd.precision import default_device, hardware_summary, matmul_peak, resolve_dtype

    profile = PROFILES["quick" if args.quick else "full"]
    if args.quick:
        # The tiny student's ops gain nothing from a second CPU thread, and on a shared machine a
        # thread waiting for a busy core made its training steps ~20x slower (0.1 s -> 2 s).
        torch.set_num_threads(1)
    device = default_device()
    if device == "cpu" and not (args.quick or args.allow_cpu):
        parser.error("no GPU is visible: the ~1B student is for one GPU; use --quick (or --allow-cpu)")
    precision = resolve_dtype("auto", device)
    meter = Meter(device)
    card, spec = spec_bf16_tflops(torch.cuda.get_device_name() if device == "cuda" else None)
    seconds: dict[str, float] = {}
    say(f"device {device}, dtype {precision.describe()}, {'quick' if args.quick else 'full'} mode")

    with tempfile.TemporaryDirectory(prefix="modecotd-gpu-bench-") as tmp:
        work = Path(tmp)
        model_dir = work / "student"
        clock = time.perf_counter()
        sizes = build_student(model_dir, profile, device, precision.dtype)
        seconds["build"] = time.perf_counter() - clock
        say(f"student: {sizes['params'] / 1e6:.1f}M parameters, {sizes['vocab']}-token vocabulary")
        clock = time.perf_counter()
        peak = matmul_peak(precision.dtype, seconds=profile["peak_seconds"], size=profile["peak_size"], device=device)
        seconds["matmul_peak"] = time.perf_counter() - clock
        say(f"{precision.dtype} matmul peak {peak / 1e12:.2f} TFLOP/s (spec: "
            f"{f'{spec:g} TFLOP/s, {card}' if spec else 'unknown'})")

        clock = time.perf_counter()
        say("teacher")
        teacher = teacher_stage(model_dir, profile, meter)
        free()  # the stage's models, once it has returned
        seconds["teacher"] = time.perf_counter() - clock
        clock = time.perf_counter()
        distill, full, experts = distill_stages(model_dir, sizes, profile, precision.dtype, peak, spec, meter, work)
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
    mfu, mfu_spec = distill["ours_zero2"]["mfu"], distill["ours_zero2"]["mfu_spec"]
    goal_mfu = mfu if mfu_spec is None else mfu_spec  # the card's spec where it is known (the goal)
    hardware = hardware_summary()
    result = {
        "benchmark": "gpu", "ratio": round(min(ratios.values()), 3),
        "goal": f"on one H100: distill LoRA MFU (ZeRO-2, over the card's spec dense bf16 figure; over the measured "
                f"matmul peak where the card is unknown) >= {GOAL_MFU} on the ~1B student, and every stage >= "
                f"{GOAL_RATIO}x its plain baseline",
        "met": goal_mfu >= GOAL_MFU and min(ratios.values()) >= GOAL_RATIO,
        "goal_applies": device == "cuda" and not args.quick,
        **({"note": f"quick mode: a {sizes['params'] / 1e6:.1f}M-parameter student on small inputs; its ratios "
                    "and MFU say nothing about the GPU goals"} if args.quick else {}),
        "stage_ratios": {k: round(v, 3) for k, v in ratios.items()},
        "stage_met": {k: v >= GOAL_RATIO for k, v in ratios.items()},
        "mfu_lora_zero2": round(mfu, 4), "mfu_met": goal_mfu >= GOAL_MFU,
        "mfu_lora_zero2_spec": None if mfu_spec is None else round(mfu_spec, 4),
        "spec_card": card, "spec_bf16_tflops": spec,
        "mode": "quick" if args.quick else "full", "device": hardware.get("gpu", hardware["cpu"]),
        "device_type": device, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dtype": precision.dtype, "precision": precision.as_dict(), "hardware": hardware,
        "torch": torch.__version__,
        "model": {**sizes, **profile["model"]},
        "matmul_peak_tflops": peak / 1e12, "matmul_peak_size": profile["peak_size"],
        "matmul_peak_dtype": precision.dtype,
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
