"""Stage 4 on Ray: a pool of named evaluator actors decoding (task, system) pairs greedily.

A system is the base student, a task's own expert, or the task's mixture. Each pair is one unit:
``eval/<task>/<system>/predictions.jsonl`` with the summary in its manifest.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import ray

from modecotd.artifacts import Unit, write_jsonl
from modecotd.config import EVALUATION_BATCH
from modecotd.evaluate import attach_system, load_system, predict, score_rows, summarize
from modecotd.jobs.liveness import LIVENESS_GROUP
from modecotd.jobs.placement import wait_for_resources
from modecotd.jobs.progress import send
from modecotd.jobs.ray_runtime import stop_if_disk_failed
from modecotd.jobs.worker_pool import WorkerPool
from modecotd.likelihood import likelihood_answers
from modecotd.models import load_lm
from modecotd.outcome import Done, Failed, Outcome
from modecotd.plan import Evaluation, SystemSpec
from modecotd.units import EvaluationFiles, EvaluationSummary
from modecotd.tasks.schema import AnswerKind, Example

log = logging.getLogger(__name__)


@ray.remote(concurrency_groups=LIVENESS_GROUP)
class Evaluator:
    """Decodes test questions with one system at a time. The tokenizer and the student are loaded
    once; each system (but a fully fine-tuned copy) is wired into that student for its pair and
    taken off again."""

    def __init__(self, student: str, dtype: str, settings: "DecodeSettings"):
        self.model_ref, self.dtype, self.settings = student, dtype, settings
        self.student_dir = self.tokenizer = None  # resolved on this actor's node at the first pair
        self.student = None  # loaded at the first pair that needs it
        from ray.util.metrics import Counter, Gauge

        self.done = Counter("modecotd_eval_pairs_done", "(task, system) pairs evaluated", ("task", "system"))
        self.accuracy = Gauge("modecotd_eval_accuracy", "strict accuracy of a system on a task", ("task", "system"))

    @ray.method(concurrency_group="liveness")
    def alive(self) -> bool:
        """Answered while a pair runs (see :mod:`modecotd.jobs.liveness`)."""
        return True

    def placed(self) -> bool:
        return True

    def evaluate(self, pair: "PairInput") -> "PairOutput":
        started = time.time()
        if self.tokenizer is None:
            from modecotd.models import load_tokenizer, materialize

            self.student_dir = materialize(self.model_ref)
            self.tokenizer = load_tokenizer(self.student_dir)
        with self._system(pair.system) as model:
            return self._evaluate(model, pair, started)

    @contextlib.contextmanager
    def _system(self, system: SystemSpec):
        """The system's model for one pair; a student left in an unknown state (a system that failed
        to attach or detach) is dropped and loaded afresh for the next pair."""
        if system.kind == "full":
            yield load_system(self.student_dir, self.dtype, system)
            return
        if self.student is None:
            self.student = load_lm(self.student_dir, self.dtype)
        try:
            model, detach = attach_system(self.student, self.student_dir, system)
        except BaseException:
            self.student = None
            raise
        try:
            yield model
        finally:
            try:
                detach()
            except BaseException:
                self.student = None
                raise

    def _evaluate(self, model, pair: "PairInput", started: float) -> "PairOutput":
        batch, kind = list(pair.examples), pair.kind
        unit, done = f"{pair.task} / {pair.name}", 0
        send("evaluate", unit, 0, len(batch), "question")

        def on_batch(count: int) -> None:
            nonlocal done
            done += count
            send("evaluate", unit, done, len(batch), "question", finished=done >= len(batch))

        settings = self.settings
        batch_size = EVALUATION_BATCH.resolve(settings.batch_size, model.device)  # auto: by device
        outputs = predict(model, self.tokenizer, batch, kind, batch_size=batch_size,
                          max_new_tokens=settings.max_new_tokens, on_batch=on_batch, prompt_format=settings.prompt_format)
        likely = (likelihood_answers(model, self.tokenizer, [e.question for e in batch], outputs, kind,
                                     batch_size=batch_size, prompt_format=settings.prompt_format)
                  if settings.likelihood else None)
        rows = score_rows(batch, outputs, kind, likely)
        tags = {"task": pair.task, "system": pair.name}
        self.done.inc(1, tags)
        self.accuracy.set(sum(r["correct"] for r in rows) / max(1, len(rows)), tags)
        return PairOutput(rows, time.time() - started, model.precision.as_dict())


@dataclass(frozen=True)
class DecodeSettings:
    """How every evaluator decodes (the evaluation section's, and the student's prompt format)."""

    batch_size: int | str
    max_new_tokens: int
    likelihood: bool
    prompt_format: str


@dataclass(frozen=True)
class PairInput:
    """What an evaluator gets for one pair: the system to build and the task's test questions."""

    task: str
    name: str  # the system's name (another seed's with its seed)
    system: SystemSpec
    kind: AnswerKind
    examples: tuple[Example, ...]


@dataclass(frozen=True)
class PairOutput:
    """What an evaluator returns for one pair: each test question's row (modecotd.evaluate.score_rows),
    how long the pair took, and the precision the system ran in."""

    rows: list[dict]
    seconds: float
    precision: dict


MAX_ACTOR_LOSSES = 2  # a pair whose actor died is tried again on a new actor up to this many times


def run_evaluate_stage(config, tasks, evaluations: list[Evaluation]) -> dict[str, Outcome]:
    """Run every evaluation whose unit is not done; returns each pair's outcome by "task/system". A dead actor is
    replaced and its pair tried again (up to :data:`MAX_ACTOR_LOSSES` times); a pair that fails
    otherwise (its system does not load) is recorded as failed and the other pairs go on."""
    cfg = config.evaluation
    todo = [e for e in evaluations if not e.unit.done()]
    log.info("evaluate: %d of %d (task, system) pairs to run", len(todo), len(evaluations))
    if not todo:
        return {}
    needs = {"CPU": cfg.cpus_per_actor, "GPU": cfg.gpus_per_actor}
    wait_for_resources(needs, "an evaluator actor", config.resources.placement_timeout_s,
                       "evaluation.cpus_per_actor / gpus_per_actor")
    settings = DecodeSettings(cfg.batch_size, cfg.max_new_tokens, cfg.likelihood, config.student.prompt_format)

    def make(name: str):
        return Evaluator.options(name=name, num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor).remote(
            config.student.model, config.student.dtype, settings)

    pool = WorkerPool("evaluator actor", min(cfg.actors, len(todo)), make, prefix="eval",
                      retries_per_item=MAX_ACTOR_LOSSES, stall_s=config.resources.stall_timeout_s,
                      start_s=config.resources.placement_timeout_s, label=lambda pair: f"{pair.task} / {pair.name}")
    # a cluster may hold the CPUs in total but on no single node
    pool.wait_until_placed("evaluator actors", needs, config.resources.placement_timeout_s,
                           "evaluation.actors / cpus_per_actor / gpus_per_actor")
    results: dict[str, Outcome] = {}

    def done(pair: Pair, output: PairOutput) -> None:
        summary = EvaluationSummary(**summarize(output.rows, cfg.scoring), precision=output.precision)
        with pair.unit.writing(summary.to_json()) as staging:
            write_jsonl(staging / EvaluationFiles.ROWS, output.rows)
        results[pair.key] = Done(summary)
        log.info("evaluate: %s / %s: accuracy %.3f (format %.2f) in %.0f s", pair.task, pair.name,
                 summary.accuracy, summary.format_rate, output.seconds)

    def failed(pair: Pair, reason: str, error: Exception) -> None:
        stop_if_disk_failed(reason, f"evaluate {pair.task} / {pair.name}")
        results[pair.key] = Failed(reason)
        send("evaluate", f"{pair.task} / {pair.name}", 0, None, "question", note="failed", finished=True)
        log.error("evaluate: %s / %s failed: %s", pair.task, pair.name, reason)

    pool.run([Pair.of(e, tasks) for e in todo], submit=lambda actor, pair: actor.evaluate.remote(pair.input),
             done=done, failed=failed)
    return results


@dataclass
class Pair:
    """One (task, system) evaluation as the pool hands it to an evaluator actor."""

    unit: Unit
    task: str
    name: str  # the system's name; another seed's system with its seed (in logs, progress and metrics)
    input: PairInput  # what the evaluator gets

    @property
    def key(self) -> str:
        return f"{self.task}/{self.name}"

    @classmethod
    def of(cls, evaluation: Evaluation, tasks) -> "Pair":
        e, data = evaluation, tasks[evaluation.task]
        name = e.system.name if e.seed is None else f"{e.system.name}@seed{e.seed}"
        return cls(e.unit, e.task, name, PairInput(e.task, name, e.system.spec(), data.kind, tuple(data.test)))
