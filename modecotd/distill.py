"""Stage 2 as a library: tokenised rationale data and the LoRA training loop (DeepSpeed inside).

The loop is plain PyTorch around a DeepSpeed engine; the Ray side (jobs/distill_stage.py) only
starts it on each Ray Train worker and forwards the metrics it reports.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import random
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Protocol

import torch

from modecotd import prompts
from modecotd.losses import IGNORE_INDEX, Targets, host_to_device, target_loss, token_losses
from modecotd.tasks.schema import AnswerKind
from modecotd.units import TrainingSummary

if TYPE_CHECKING:
    from modecotd.precision import Precision

log = logging.getLogger(__name__)

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
    target_modules: list[str] | None = None  # None: the architecture's default (see add_lora)
    learning_rate: float = 5e-4
    epochs: float = 3.0
    batch_size: int = 8
    max_length: int = 512
    warmup_ratio: float = 0.1
    zero_stage: int = 2
    seed: int = 0
    gradient_accumulation: int = 1
    validation_fraction: float = 0.0
    eval_every: int = 0  # optimizer steps between validation losses; 0: once per epoch
    early_stopping_patience: int | None = None
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: none
    offload_optimizer: bool = False
    full_finetune: bool = False  # train every student weight instead of a LoRA (a baseline)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory)
    student: str = ""  # the student's reference as the config gives it (recorded in the adapter); "": student_dir
    prompt_format: str = "raw"  # student.prompt_format (see modecotd.prompts.rendered_prompt)

    @classmethod
    def from_section(cls, section, **decided) -> "DistillSettings":
        """Every field the config's distill section has under the same name, then ``decided``."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: getattr(section, name) for name in names & set(type(section).model_fields)} | decided)


def tokenize_rows(rows: list[dict], kind: AnswerKind, tokenizer, max_length: int,
                  encoder_decoder: bool = False, prompt_format: str = "raw") -> tuple[list[dict], int]:
    """Token ids of each row's prompt and target, the target (ending in EOS) as the labels.

    A causal LM reads prompt + target as one sequence with the prompt masked out of the labels; an
    encoder-decoder reads the prompt (tokenised as at generation time) and decodes the target.
    Returns the examples and how many rows were dropped for being longer than ``max_length``
    (prompt + target for a causal LM, either side for an encoder-decoder).
    """
    examples, too_long = [], 0
    for row in rows:
        row_kind = AnswerKind(row["kind"]) if "kind" in row else kind  # pooled multi-task rows carry their own
        prompt_ids = tokenizer(prompts.rendered_prompt(row["question"], row_kind, prompt_format, tokenizer),
                               add_special_tokens=prompts.adds_special_tokens(prompt_format, encoder_decoder))["input_ids"]
        target_ids = tokenizer(prompts.rendered_target(row["rationale"], row["answer"], prompt_format),
                               add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if encoder_decoder:
            if max(len(prompt_ids), len(target_ids)) > max_length:
                too_long += 1
                continue
            examples.append({"input_ids": prompt_ids, "labels": target_ids})
            continue
        if len(prompt_ids) + len(target_ids) > max_length:
            too_long += 1
            continue
        examples.append({
            "input_ids": prompt_ids + target_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
        })
    return examples, too_long


def _right_padded(rows: list[list[int]], fill: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out


def collate(examples: list[dict], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Right-pad a batch (on ``device``, default the CPU); padded label positions are ignored by
    the loss. Labels are padded to their own width: an encoder-decoder's targets are not as long
    as its inputs."""
    ids = _right_padded([e["input_ids"] for e in examples], pad_id)
    mask = _right_padded([[1] * len(e["input_ids"]) for e in examples], 0)
    labels = _right_padded([e["labels"] for e in examples], IGNORE_INDEX)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return batch if device is None else to_device(batch, device)


def to_device(tensors: dict, device) -> dict:
    """``tensors`` on ``device`` (see :func:`modecotd.losses.host_to_device`)."""
    return {k: host_to_device(v, device) for k, v in tensors.items()}


def shuffled_batches(examples: list[dict], batch_size: int, rng: random.Random) -> list[list[dict]]:
    """The examples shuffled and cut into batches, each padded to its longest row when collated.

    Batches of similar length would pad less, but they fit worse: on SmolLM2-135M with 96
    arithmetic rationales (24 steps of 8, fp32, three seeds each) the final training loss was 0.095
    with windows of 8 batches sorted by length, 0.085 with windows of 2, 0.082 with shuffled batches
    and 0.079 for a Trainer's random batches (padding 2.5%, 6.3%, 10.5% of the tokens), and
    weighing every target token of an epoch alike instead of by its batch's mean changed none of
    that. Sorted batches gather rows of one kind; the cost of shuffled ones is ~6% of tokens/s."""
    shuffled = examples[:]
    rng.shuffle(shuffled)
    return [shuffled[start : start + batch_size] for start in range(0, len(shuffled), batch_size)]


def training_device() -> str:
    """This worker's device: the GPU Ray Train reserved and pinned for it (use_gpu), else the CPU,
    even on a node whose GPUs it can see (see :func:`modecotd.precision.default_device`)."""
    from modecotd.precision import default_device

    return f"cuda:{torch.cuda.current_device()}" if default_device() == "cuda" else "cpu"


def training_attention() -> str:
    """Eager attention on CPUs, SDPA on GPUs. For LoRA training of SmolLM2-135M on 2 CPU cores,
    eager ran 20-35% more tokens/s than SDPA's CPU flash kernel at 100-480 tokens per row (its
    backward dominated); on a GPU SDPA's fused kernels win."""
    return "sdpa" if training_device() != "cpu" else "eager"


def add_lora(model, settings: DistillSettings):
    """Wrap the frozen student with a trainable LoRA (peft). Without ``target_modules``, peft's
    default for the architecture: the attention query and value projections (q_proj, v_proj for
    Llama; q, v for T5), as in the reference."""
    from peft import LoraConfig, get_peft_model

    from modecotd.models import is_encoder_decoder

    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.target_modules) if settings.target_modules else None,
        task_type="SEQ_2_SEQ_LM" if is_encoder_decoder(model) else "CAUSAL_LM",
    )
    return get_peft_model(model, config)


def enable_gradient_checkpointing(model, lora: bool) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them. The
    non-reentrant implementation replays the RNG state, so dropout masks and losses stay the same.
    With a LoRA on frozen weights, the embeddings' output is made to require grad so that the
    checkpointed layers have something to backpropagate through. (transformers 5 renamed
    ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``; either is used.)"""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if lora:
        model.enable_input_require_grads()


def micro_batch_size(settings: DistillSettings, world_size: int) -> int:
    """Rows per worker per forward pass: the batch is split over workers and accumulation steps."""
    return max(1, settings.batch_size // (world_size * settings.gradient_accumulation))


def deepspeed_config(settings: DistillSettings, world_size: int, dtype: str) -> dict:
    """DeepSpeed's settings for one job; ``dtype`` is the resolved compute dtype (bf16 or fp32)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size(settings, world_size),
        "gradient_accumulation_steps": settings.gradient_accumulation,
        "gradient_clipping": GRADIENT_CLIPPING,
        # memory_efficient_linear (on by default under ZeRO-3) swaps torch.nn.functional.linear for the
        # rest of the process, which would leak into the other models of a reused worker.
        "zero_optimization": {"stage": settings.zero_stage, "memory_efficient_linear": False,
                              **({"offload_optimizer": {"device": "cpu"}} if settings.offload_optimizer else {})},
        # Our torch AdamW (no compiled ops) may run on offloaded states too.
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": dtype == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def optimizer_steps(batches_per_epoch: int, epochs: float, accumulation: int = 1) -> int:
    """How many optimizer steps a training of ``epochs`` makes (at least one)."""
    return max(1, math.ceil(batches_per_epoch * epochs / accumulation))


def warmup_then_linear(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


class Checkpoints(Protocol):
    """Where training state is saved and found again (Ray Train's checkpoints on the Ray side)."""

    def latest(self) -> ContextManager[Path | None]:
        """The newest checkpoint folder, if training is being resumed."""

    def save(self, metrics: dict, write: Callable[[Path], None]) -> None:
        """Have ``write`` fill a fresh folder, then persist it as the newest checkpoint."""


def split_validation(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded held-out share of the examples (at least one when ``fraction`` > 0)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


@dataclass
class LoopState:
    """Everything besides model, optimizer and scheduler that a resumed run needs."""

    micro_step: int = 0
    target_tokens: int = 0
    losses: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (optimizer step, loss)
    best_validation: float = math.inf
    evaluations_without_gain: int = 0
    stopped_early: bool = False
    resumed_from_step: int | None = None


@dataclass
class TrainingSetup:
    """What :func:`set_up_training` builds on one rank and the loop reads."""

    settings: DistillSettings
    rank: int
    world_size: int
    tokenizer: object
    examples: list[dict]
    held_out: list[dict]
    rows_too_long: int
    precision: Precision
    engine: object  # a DeepSpeed engine
    scheduler: torch.optim.lr_scheduler.LRScheduler
    micro: int  # rows per rank per micro-step
    batches_per_epoch: int
    total_steps: int  # optimizer steps
    eval_every: int
    encoder_decoder: bool

    @property
    def accumulation(self) -> int:
        return self.settings.gradient_accumulation


@dataclass
class Clock:
    """When the loop started and how many target tokens it had then (a resumed run counts from there)."""

    started: float
    tokens_at_start: int

    def tokens_per_s(self, state: LoopState) -> float:
        return (state.target_tokens - self.tokens_at_start) / max(1e-9, time.time() - self.started)


def train_expert(settings: DistillSettings, rank: int, world_size: int,
                 report: Callable[[dict], None] = lambda metrics: None,
                 checkpoints: Checkpoints | None = None) -> TrainingSummary:
    """Train one LoRA expert on this worker's share of every batch; rank 0 saves the peft adapter.

    Expects torch.distributed to be initialised (Ray Train does it); DeepSpeed reuses that group.
    With ``checkpoints``, the adapter, optimizer, scheduler, data position and RNG states are
    saved every ``checkpoint_every`` optimizer steps and training resumes from the newest one.
    Returns a summary with the loss curves.
    """
    setup = set_up_training(settings, rank, world_size)
    state = resumed_state(setup, checkpoints)
    setup.engine.train()
    clock = Clock(time.time(), state.target_tokens)
    best_state = run_training_loop(setup, state, clock, report, checkpoints)
    summary = training_summary(setup, state, clock)
    save_adapter(setup.engine, settings.output_dir, rank, settings.zero_stage, settings.student_dir, state=best_state,
                 full_finetune=settings.full_finetune, student=settings.student)
    return summary


def set_up_training(settings: DistillSettings, rank: int, world_size: int) -> TrainingSetup:
    """Seeds, the tokenised rows (a validation share held out), the student with its LoRA (or every
    weight trainable), the optimizer and schedule, and the DeepSpeed engine around them."""
    import deepspeed

    from modecotd.allocator import keep_freed_memory
    from modecotd.cpu_collectives import prepare_shm_op
    from modecotd.models import is_encoder_decoder, load_lm, load_tokenizer
    from modecotd.precision import resolve_dtype

    keep_freed_memory()
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(Path(settings.student_dir), padding_side="right")
    encoder_decoder = is_encoder_decoder(settings.student_dir)
    examples, too_long = tokenize_rows(settings.rows, AnswerKind(settings.kind), tokenizer, settings.max_length,
                                       encoder_decoder, settings.prompt_format)
    if not examples:
        raise ValueError(f"no training rows fit in max_length={settings.max_length}")
    examples, held_out = split_validation(examples, settings.validation_fraction, settings.seed)
    device = training_device()
    precision = resolve_dtype(settings.dtype, device)
    if rank == 0:
        log.info("training in %s", precision.describe())
    config = deepspeed_config(settings, world_size, precision.dtype)
    # fp32 master weights; DeepSpeed casts the module to bf16 when that is the compute dtype. Under
    # ZeRO-3 the student is built partitioned: no rank loads it whole onto its device first.
    model = load_lm(Path(settings.student_dir), "fp32", attention=training_attention(), device=device,
                    zero3=config if settings.zero_stage == 3 else None)
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(model, lora=not settings.full_finetune)
    if settings.full_finetune:
        model.requires_grad_(True)
    else:
        model = add_lora(model, settings)
    micro = micro_batch_size(settings, world_size)
    batches_per_epoch = math.ceil(len(examples) / (micro * world_size))
    total_steps = optimizer_steps(batches_per_epoch, settings.epochs, settings.gradient_accumulation)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate,
                                  weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear(total_steps, settings.warmup_ratio))
    prepare_shm_op()  # a first start on this machine compiles it: quietly, or without it where it cannot be built
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return TrainingSetup(settings, rank, world_size, tokenizer, examples, held_out, too_long, precision, engine,
                         scheduler, micro, batches_per_epoch, total_steps,
                         settings.eval_every or max(1, batches_per_epoch // settings.gradient_accumulation),
                         encoder_decoder)


def resumed_state(setup: TrainingSetup, checkpoints: Checkpoints | None) -> LoopState:
    """The newest checkpoint's loop state (its weights, optimizer and RNG loaded), or a new one."""
    if checkpoints is None:
        return LoopState()
    with checkpoints.latest() as folder:
        if folder is None:
            return LoopState()
        state = load_training_state(setup.engine, Path(folder), setup.rank)
    state.resumed_from_step = state.micro_step // setup.accumulation
    log.info("resumed at optimizer step %d from %s", state.resumed_from_step, folder)
    return state


def run_training_loop(setup: TrainingSetup, state: LoopState, clock: Clock, report: Callable[[dict], None],
                      checkpoints: Checkpoints | None) -> dict[str, torch.Tensor] | None:
    """Micro-steps from where ``state`` is to the planned end (or an early stop); returns the
    weights at the best validation loss, None without validation."""
    engine, settings, world_size = setup.engine, setup.settings, setup.world_size
    total_micro = setup.total_steps * setup.accumulation
    unread: list[tuple[torch.Tensor, int]] = []  # (loss on the device, target tokens) per micro-step
    best_state = None
    while state.micro_step < total_micro and not state.stopped_early:
        epoch, position = divmod(state.micro_step, setup.batches_per_epoch)
        for global_batch in epoch_batches(setup.examples, setup.micro * world_size, settings.seed, epoch)[position:]:
            if state.micro_step >= total_micro:
                break
            shard = global_batch[setup.rank::world_size] or global_batch[:1]
            # built on the host, where its targets are counted and found without waiting on the device
            batch = collate(shard, setup.tokenizer.pad_token_id)
            target_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
            targets = None if setup.encoder_decoder else Targets.of(batch["labels"]).to(engine.device)
            loss = target_loss(engine, to_device(batch, engine.device), targets)
            engine.backward(loss)
            engine.step()
            state.micro_step += 1
            unread.append((loss.detach(), target_tokens))
            if state.micro_step % setup.accumulation:
                continue
            read_back(unread, state)  # one host sync per optimizer step
            improved = after_optimizer_step(setup, state, clock, report, checkpoints)
            if improved is not None:
                best_state = improved
            if state.stopped_early:
                break
    read_back(unread, state)  # nothing is left unread at an optimizer step's end; kept for safety
    return best_state


def after_optimizer_step(setup: TrainingSetup, state: LoopState, clock: Clock, report: Callable[[dict], None],
                         checkpoints: Checkpoints | None) -> dict[str, torch.Tensor] | None:
    """An optimizer step's metrics (and validation loss when due) reported, a checkpoint when due,
    progress logged; returns the weights when the validation loss is the best so far."""
    settings, accumulation = setup.settings, setup.accumulation
    step = state.micro_step // accumulation
    metrics = {"step": step, "loss": sum(state.losses[-accumulation:]) / accumulation,
               "lr": setup.scheduler.get_last_lr()[0], "target_tokens": state.target_tokens,
               "total_steps": setup.total_steps, "target_tokens_per_s": clock.tokens_per_s(state)}
    best_state = None
    if setup.held_out and (step % setup.eval_every == 0 or step == setup.total_steps):
        metrics["validation_loss"] = validation_loss(setup.engine, setup.held_out, setup.micro,
                                                     setup.tokenizer.pad_token_id)
        state.validation.append((step, metrics["validation_loss"]))
        if metrics["validation_loss"] < state.best_validation - 1e-4:
            state.best_validation, state.evaluations_without_gain = metrics["validation_loss"], 0
            best_state = trained_state(setup.engine, settings.zero_stage, setup.rank)
        else:
            state.evaluations_without_gain += 1
            patience = settings.early_stopping_patience
            state.stopped_early = patience is not None and state.evaluations_without_gain >= patience
    report(metrics)
    if checkpoints is not None and settings.checkpoint_every and (
            step % settings.checkpoint_every == 0 and step < setup.total_steps):
        checkpoints.save(metrics, lambda folder: save_training_state(setup.engine, folder, setup.rank, state))
    if setup.rank == 0 and (step % PROGRESS_EVERY_STEPS == 0 or step == setup.total_steps):
        log.info("step %d/%d loss %.3f, %.0f target tokens/s", step, setup.total_steps, metrics["loss"],
                 clock.tokens_per_s(state))
    if state.stopped_early:
        log.info("early stop at step %d: validation loss has not improved for %d evaluations",
                 step, state.evaluations_without_gain)
    return best_state


def training_summary(setup: TrainingSetup, state: LoopState, clock: Clock) -> TrainingSummary:
    """What training.json records: sizes, the loss curves, the stop, the precision, the speed."""
    losses, accumulation = state.losses, setup.accumulation
    tail = losses[-5 * accumulation:]
    return TrainingSummary(
        steps=state.micro_step // accumulation, planned_steps=setup.total_steps, rows=len(setup.settings.rows),
        rows_too_long=setup.rows_too_long, examples=len(setup.examples), validation_examples=len(setup.held_out),
        target_tokens_rank0=state.target_tokens, losses=losses, validation_losses=state.validation,
        stopped_early=state.stopped_early,
        best_validation_loss=None if math.isinf(state.best_validation) else state.best_validation,
        first_loss=losses[0], final_loss=sum(tail) / len(tail), zero_stage=setup.engine.zero_optimization_stage(),
        world_size=setup.world_size, gradient_accumulation=accumulation, resumed_from_step=state.resumed_from_step,
        precision=setup.precision.as_dict(), started_at=clock.started, finished_at=time.time(),
        target_tokens_per_s_rank0=clock.tokens_per_s(state))


def read_back(unread: list[tuple[torch.Tensor, int]], state: LoopState) -> None:
    """Move the micro-steps' losses, kept on the device while the GPU works ahead, into ``state`` in
    one transfer, with their target-token counts (counted on the host), and clear ``unread``."""
    if not unread:
        return
    state.losses.extend(torch.stack([loss for loss, _ in unread]).double().tolist())
    state.target_tokens += sum(count for _, count in unread)
    unread.clear()


def epoch_batches(examples: list[dict], batch_size: int, seed: int, epoch: int) -> list[list[dict]]:
    """The batches of one epoch: the same for a given seed and epoch, so a resumed run continues
    exactly where it stopped."""
    rng = random.Random(seed)
    for _ in range(epoch):
        shuffled_batches(examples, batch_size, rng)
    return shuffled_batches(examples, batch_size, rng)


def mean_target_loss(model, examples: list[dict], batch_size: int, pad_id: int, device=None) -> float:
    """Mean target-token loss of ``model`` over ``examples`` (no gradients, model mode as it is)."""
    total, count = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            losses, mask = token_losses(model, collate(examples[start:start + batch_size], pad_id, device))
            total += float((losses * mask).sum())
            count += float(mask.sum())
    return total / max(1.0, count)


def validation_loss(engine, held_out: list[dict], micro: int, pad_id: int) -> float:
    """Mean target-token loss on the held-out examples (every rank computes it alike)."""
    engine.eval()
    try:
        return mean_target_loss(engine, held_out, micro, pad_id, engine.device)
    finally:
        engine.train()


@contextlib.contextmanager
def rank_zero_env(port: int):
    """The variables torch.distributed's env:// start-up (and DeepSpeed) read for rank 0 of a
    one-rank group, set only inside the block."""
    env = dict(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def init_one_rank_group(backend: str = "gloo") -> int:
    """Start a one-rank process group in this process, as Ray Train makes for each worker (gloo;
    ``nccl`` for a GPU); returns its port (for :func:`rank_zero_env`)."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with rank_zero_env(port):
        dist.init_process_group(backend, rank=0, world_size=1)
    return port


@contextlib.contextmanager
def one_rank_group(backend: str = "gloo"):
    """A one-rank group (gloo, or ``nccl`` on a GPU) for the block, to run :func:`train_expert`
    outside Ray (benchmarks)."""
    import torch.distributed as dist

    port = init_one_rank_group(backend)
    try:
        with rank_zero_env(port):
            yield
    finally:
        dist.destroy_process_group()


TRAINER_STATE = "trainer_state_rank{rank}.pt"
DEEPSPEED_TAG = "state"


def save_training_state(engine, folder: Path, rank: int, state: LoopState) -> None:
    """DeepSpeed's own checkpoint (LoRA weights, optimizer, scheduler) plus this rank's loop
    position and RNG states: CPU, Python and, on a GPU, the CUDA generator of this worker's device
    (LoRA dropout draws from it there)."""
    engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    # plain containers and tensors only, so that it loads with torch.load(weights_only=True): no pickle
    saved = {"loop": asdict(state), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.device(engine.device).type == "cuda":
        saved["cuda_rng"] = torch.cuda.get_rng_state()  # the current device: the one Ray Train gave this rank
    torch.save(saved, Path(folder) / TRAINER_STATE.format(rank=rank))


# The only classes besides tensors and plain containers in DeepSpeed's own checkpoint files (found
# by loading ZeRO-1/2/3 checkpoints with weights_only=True): plain data, no code runs to build them.
DEEPSPEED_CHECKPOINT_CLASSES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                                "deepspeed.runtime.zero.config.ZeroStageEnum",
                                "deepspeed.utils.tensor_fragment.fragment_address")


def load_without_pickle(engine) -> None:
    """Make ``engine`` read its checkpoint files with ``torch.load(weights_only=True)``: tensors,
    plain containers and the data classes of :data:`DEEPSPEED_CHECKPOINT_CLASSES` only. DeepSpeed
    itself unpickles them, and a pickle runs whatever code it names: anyone who can write the run's
    storage could run code on the next resume. A file that holds anything else is refused."""
    import importlib

    from modecotd.errors import UserError

    def resolve(name: str):
        module, _, attribute = name.rpartition(".")
        return getattr(importlib.import_module(module), attribute)

    allowed = [resolve(name) for name in DEEPSPEED_CHECKPOINT_CLASSES]
    checkpoint_engine = engine.checkpoint_engine

    def load(path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            raise UserError(f"{path}: the checkpoint holds more than tensors and DeepSpeed's known data classes "
                            f"({str(error).splitlines()[0][:200]}); it is not loaded, since loading it would run "
                            "pickled code. Delete the expert's checkpoints (<run>/ray/distill-<name>-*) to train "
                            "it from the start") from None

    checkpoint_engine.load = load


def load_training_state(engine, folder: Path, rank: int) -> LoopState:
    """Restore what :func:`save_training_state` wrote, without unpickling anything (see
    :func:`load_without_pickle`). A checkpoint without a CUDA RNG state (written on a CPU, or by an
    older version) still loads; a CUDA state is restored only where there is a GPU."""
    load_without_pickle(engine)
    engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_module_strict=False)
    saved = torch.load(Path(folder) / TRAINER_STATE.format(rank=rank), weights_only=True)
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(saved["python_rng"])
    cuda_rng = saved.get("cuda_rng")
    if cuda_rng is not None:
        if torch.device(engine.device).type == "cuda":
            torch.cuda.set_rng_state(cuda_rng)
        else:
            log.warning("%s holds a CUDA RNG state but this worker trains on no GPU; dropout after resuming will "
                        "not repeat the interrupted run's", folder)
    loop = saved["loop"]
    loop["validation"] = [tuple(pair) for pair in loop["validation"]]
    return LoopState(**loop)


def trained_state(engine, zero_stage: int, rank: int) -> dict[str, torch.Tensor]:
    """A copy of the trained weights (the LoRA, or every weight when fine-tuning fully) in host
    memory on rank 0, the one that saves them; an empty dict on the other ranks, which take part in
    gathering ZeRO-3's partitions (one weight at a time, so no device ever holds a whole model)."""
    import deepspeed

    copy = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param]) if zero_stage == 3 else contextlib.nullcontext():
            if rank == 0:
                copy[name] = param.detach().float().cpu().clone()
    return copy


def save_adapter(engine, output_dir: str, rank: int, zero_stage: int, student_dir: str,
                 state: dict | None = None, full_finetune: bool = False, student: str = "") -> None:
    """Save what was trained (``state``, or the current weights): a standard peft adapter folder
    whose base model is named as another machine can load it (``student``, the config's reference:
    see :func:`modecotd.models.record_base_model`), or for full fine-tuning a whole model folder with
    the student's tokenizer; then check it (see :func:`check_adapter` and :func:`check_model`)."""
    state = state if state is not None else trained_state(engine, zero_stage, rank)
    if rank != 0:
        return
    engine.module.save_pretrained(output_dir, state_dict=state)
    if full_finetune:
        from modecotd.models import load_tokenizer

        load_tokenizer(Path(student_dir)).save_pretrained(output_dir)
        check_model(output_dir, state)
    else:
        from modecotd.models import record_base_model

        record_base_model(Path(output_dir), student or student_dir, Path(student_dir))
        check_adapter(output_dir, student_dir, len(state))


def check_model(output_dir: str, state: dict) -> None:
    """A fully fine-tuned model folder loads with ``from_pretrained`` and carries the trained weights."""
    from modecotd.models import load_lm

    loaded = dict(load_lm(Path(output_dir), device="cpu").named_parameters())
    name, tensor = next(iter(state.items()))
    if name not in loaded or not torch.allclose(loaded[name].float().cpu(), tensor.cpu()):
        raise RuntimeError(f"{output_dir}: the fine-tuned model does not load back with from_pretrained")


def check_adapter(output_dir: str, student_dir: str, expected_tensors: int) -> None:
    """The saved adapter holds every LoRA tensor, not all zero, and fits the student as
    ``PeftModel.from_pretrained`` would apply it: its config wraps the student's architecture and
    every saved tensor lands in a LoRA slot of its name and shape, none left over. The student is
    built on the meta device for this (its shapes, no weights: nothing the size of a model is
    loaded, on any device)."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(output_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise RuntimeError(f"{output_dir}: adapter was not written")
    saved = load_file(str(path))
    if len(saved) != expected_tensors or not any(bool(t.abs().sum() > 0) for t in saved.values()):
        raise RuntimeError(f"{output_dir}: the saved adapter is empty or incomplete "
                           f"({len(saved)} of {expected_tensors} LoRA tensors)")
    model = get_peft_model(student_skeleton(student_dir), PeftConfig.from_pretrained(output_dir), low_cpu_mem_usage=True)
    slots = {name.replace(".default", ""): p.shape for name, p in model.named_parameters() if "lora_" in name}
    misfits = sorted(name for name, tensor in saved.items() if slots.get(name) != tensor.shape)
    if not misfits:
        misfits = set_peft_model_state_dict(model, saved, low_cpu_mem_usage=True).unexpected_keys
    if misfits or len(slots) != expected_tensors:
        raise RuntimeError(f"{output_dir}: the adapter does not fit the student {student_dir} "
                           f"({len(slots)} LoRA slots for {expected_tensors} tensors; not fitting: {misfits[:3]})")


def student_skeleton(student_dir: str):
    """The student's architecture on the meta device: every module and shape, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from modecotd.models import is_encoder_decoder

    auto = AutoModelForSeq2SeqLM if is_encoder_decoder(student_dir) else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(AutoConfig.from_pretrained(student_dir, trust_remote_code=False))
