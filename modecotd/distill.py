"""Stage 2 as a library: tokenised rationale data and the LoRA training loop (DeepSpeed inside).

The loop is plain PyTorch around a DeepSpeed engine; the Ray side (jobs/distill_stage.py) only
starts it on each Ray Train worker and forwards the metrics it reports.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from modecotd import prompts
from modecotd.tasks.schema import AnswerKind

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
GRADIENT_CLIPPING = 1.0
PROGRESS_EVERY_STEPS = 10


@dataclass
class DistillSettings:
    """Everything one expert's training needs; plain data so it travels to Ray workers."""

    student_dir: str
    dtype: str
    kind: str
    rows: list[dict]
    output_dir: str
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    learning_rate: float = 5e-4
    epochs: float = 3.0
    batch_size: int = 8
    max_length: int = 512
    warmup_ratio: float = 0.1
    zero_stage: int = 2
    seed: int = 0


def tokenize_rows(rows: list[dict], kind: AnswerKind, tokenizer, max_length: int) -> tuple[list[dict], int]:
    """Prompt + target token ids with the prompt masked out of the labels.

    Returns the examples and how many rows were dropped for being longer than ``max_length``.
    """
    examples, too_long = [], 0
    for row in rows:
        prompt_ids = tokenizer(prompts.student_prompt(row["question"], kind), add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(prompts.student_target(row["rationale"], row["answer"]),
                               add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt_ids) + len(target_ids) > max_length:
            too_long += 1
            continue
        examples.append({
            "input_ids": prompt_ids + target_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
        })
    return examples, too_long


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded label positions are ignored by the loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def length_bucketed_batches(examples: list[dict], batch_size: int, rng: random.Random) -> list[list[dict]]:
    """Shuffle, then group examples of similar length so that batches pad little."""
    shuffled = examples[:]
    rng.shuffle(shuffled)
    window = batch_size * 8
    batches = []
    for start in range(0, len(shuffled), window):
        chunk = sorted(shuffled[start : start + window], key=lambda e: len(e["input_ids"]))
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def add_lora(model, settings: DistillSettings):
    """Wrap the frozen student with a trainable LoRA (peft)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def deepspeed_config(settings: DistillSettings, world_size: int) -> dict:
    micro = max(1, settings.batch_size // world_size)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": GRADIENT_CLIPPING,
        "zero_optimization": {"stage": settings.zero_stage},
        "bf16": {"enabled": settings.dtype == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def warmup_then_linear(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def train_expert(settings: DistillSettings, rank: int, world_size: int,
                 report: Callable[[dict], None] = lambda metrics: None) -> dict:
    """Train one LoRA expert on this worker's shard; rank 0 saves the peft adapter.

    Expects torch.distributed to be initialised (Ray Train does it); DeepSpeed reuses that group.
    Returns a summary with the loss curve.
    """
    import deepspeed

    from modecotd.models import load_causal_lm, load_tokenizer

    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    kind = AnswerKind(settings.kind)
    tokenizer = load_tokenizer(Path(settings.student_dir), padding_side="right")
    examples, too_long = tokenize_rows(settings.rows, kind, tokenizer, settings.max_length)
    if not examples:
        raise ValueError(f"no training rows fit in max_length={settings.max_length}")
    base = load_causal_lm(Path(settings.student_dir), "fp32")
    model = add_lora(base, settings)
    trainable = [p for p in model.parameters() if p.requires_grad]
    micro = max(1, settings.batch_size // world_size)
    batches_per_epoch = math.ceil(len(examples) / (micro * world_size))
    total_steps = max(1, math.ceil(batches_per_epoch * settings.epochs))
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear(total_steps, settings.warmup_ratio))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(settings, world_size),
    )
    engine.train()
    rng = random.Random(settings.seed)
    losses: list[float] = []
    step, tokens = 0, 0
    started = time.time()
    while step < total_steps:
        batches = length_bucketed_batches(examples, micro * world_size, rng)
        for global_batch in batches:
            if step >= total_steps:
                break
            shard = global_batch[rank::world_size] or global_batch[:1]
            batch = collate(shard, tokenizer.pad_token_id)
            out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            engine.backward(out.loss)
            engine.step()
            loss = float(out.loss.detach())
            losses.append(loss)
            tokens += int((batch["labels"] != IGNORE_INDEX).sum())
            step += 1
            report({"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0], "target_tokens": tokens})
            if rank == 0 and (step % PROGRESS_EVERY_STEPS == 0 or step == total_steps):
                log.info("step %d/%d loss %.3f, %.0f target tokens/s", step, total_steps, loss,
                         tokens / max(1e-9, time.time() - started))
    summary = {"steps": step, "rows": len(settings.rows), "rows_too_long": too_long,
               "examples": len(examples), "target_tokens_rank0": tokens, "losses": losses,
               "first_loss": losses[0], "final_loss": sum(losses[-5:]) / len(losses[-5:]),
               "zero_stage": engine.zero_optimization_stage(), "world_size": world_size,
               "target_tokens_per_s_rank0": tokens / max(1e-9, time.time() - started)}
    save_adapter(engine, settings.output_dir, rank, settings.zero_stage)
    return summary


def save_adapter(engine, output_dir: str, rank: int, zero_stage: int) -> None:
    """Save the LoRA as a standard peft adapter folder (gathering ZeRO-3 partitions first)."""
    import contextlib

    import deepspeed

    model = engine.module
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    gather = (deepspeed.zero.GatheredParameters(lora_params, modifier_rank=None)
              if zero_stage == 3 else contextlib.nullcontext())
    with gather:
        if rank == 0:
            state = {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}
            model.save_pretrained(output_dir, state_dict=state)
    if not any(Path(output_dir).glob("adapter_model.*")) and rank == 0:
        raise RuntimeError(f"{output_dir}: adapter was not written")

