"""Stage 1 as a library: teacher backends, the correctness filter and rationalization.

A backend turns questions into candidate rationales with the answer each one reaches.
:func:`teach` keeps, per question, the distinct rationales whose answer matches the gold answer
(up to a cap), records every other sample with its reason, records questions the backend could
not do at all as failed, and optionally rationalizes (STaR) the questions no sample got right.
The Ray side (jobs/teacher_stage.py) only moves shards of questions between actors and disk.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from modecotd.backends import TextGenerator
from modecotd.prompts import TeacherPrompts
from modecotd.tasks.answers import extract_teacher_answer, is_correct
from modecotd.tasks.schema import Example

ANSWER_STAGE_TOKENS = 16


@dataclass(frozen=True)
class Candidate:
    """One rationale the teacher wrote and the answer it reached (None: no answer found)."""

    rationale: str
    predicted: str | None
    error: str | None = None


@dataclass
class Outcome:
    """A backend's answer for one question: its candidates, or why it could not do it at all."""

    candidates: list[Candidate] = field(default_factory=list)
    error: str | None = None
    tokens: int = 0
    asked: int = 1  # samples the backend asked its generator for (candidates: what came back)


class TeacherBackend(Protocol):
    name: str

    def candidates(self, examples: list[Example], prompts: TeacherPrompts, *, seed: int,
                   hints: list[str] | None = None) -> list[Outcome]:
        """One Outcome per example, in order; ``hints`` (gold answers) ask for rationalizations."""


class ScriptedTeacher:
    """The task generator's own step-by-step solution: exact, one per question.

    Only for generated tasks; it stands in for a large teacher on a machine that cannot run one.
    """

    name = "scripted"

    def candidates(self, examples, prompts, *, seed, hints=None) -> list[Outcome]:
        return [Outcome([Candidate(ex.rationale, ex.answer)]) if ex.rationale
                else Outcome(error="no scripted rationale") for ex in examples]


class PrecomputedTeacher:
    """Rationales already in the train files, such as the paper's.

    The answer a row states (the paper's ``--> answer``) was read and normalized by our loader; the
    filter re-scores it against the gold answer. (Re-reading the answer out of the rationale text
    instead would drop good rows: most of the paper's multiple-choice rationales never name the
    letter.)
    """

    name = "precomputed"

    def candidates(self, examples, prompts, *, seed, hints=None) -> list[Outcome]:
        return [Outcome([Candidate(ex.rationale, ex.answer)])
                if ex.rationale else Outcome(error="the train row has no rationale") for ex in examples]


class CotTeacher:
    """Two-stage chain of thought on any text generator (transformers, vLLM, an HTTP endpoint).

    Stage 1 samples ``samples`` rationales per question at ``temperature``; stage 2 asks, greedily,
    for the answer each rationale leads to.
    """

    def __init__(self, name: str, generator: TextGenerator, *, samples: int, temperature: float,
                 max_new_tokens: int):
        self.name = name
        self.generator = generator
        self.samples = samples
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens

    def candidates(self, examples, prompts, *, seed, hints=None) -> list[Outcome]:
        hints = hints or [None] * len(examples)
        first = self.generator.generate(
            [prompts.reasoning(ex.question, hint) for ex, hint in zip(examples, hints)],
            samples=self.samples, temperature=self.temperature, max_new_tokens=self.max_new_tokens,
            stop=prompts.reasoning_stop, seed=seed)
        outcomes = [Outcome(error=c.error, tokens=c.tokens, asked=self.samples) for c in first]
        flat = [(i, text.strip()) for i, c in enumerate(first) if c.error is None for text in c.texts]
        second = self.generator.generate(
            [prompts.answer(examples[i].question, text, hints[i]) for i, text in flat],
            samples=1, temperature=0.0, max_new_tokens=ANSWER_STAGE_TOKENS, stop=["\n"], seed=seed)
        for (i, text), answer in zip(flat, second):
            outcomes[i].tokens += answer.tokens
            if answer.error:
                outcomes[i].candidates.append(Candidate(text, None, f"answer stage: {answer.error}"))
                continue
            said = answer.texts[0] if answer.texts else ""
            predicted = extract_teacher_answer(said, prompts.kind) or extract_teacher_answer(text, prompts.kind)
            outcomes[i].candidates.append(Candidate(text, predicted))
        return outcomes


@dataclass
class ShardOutput:
    """What the teacher made of a shard of questions, as rows ready to write."""

    accepted: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    tokens: int = 0
    samples_asked: int = 0
    samples_returned: int = 0

    @property
    def questions(self) -> int:
        return len({r["id"] for r in self.accepted + self.rejected + self.failed})


def teach(backend: TeacherBackend, examples: list[Example], prompts: TeacherPrompts, *, first_id: int,
          seed: int, max_per_question: int | None = None, rationalize: bool = False) -> ShardOutput:
    """Ask the teacher about ``examples`` (ids ``first_id``...) and sort every sample into a row."""
    out = ShardOutput()
    outcomes = backend.candidates(examples, prompts, seed=seed)
    unanswered = []
    for offset, (ex, outcome) in enumerate(zip(examples, outcomes)):
        kept = _label(out, first_id + offset, ex, outcome, prompts, max_per_question, rationalized=False)
        if kept == 0 and outcome.error is None:
            unanswered.append(offset)
    if rationalize and unanswered:
        retry = [examples[i] for i in unanswered]
        hinted = backend.candidates(retry, prompts, seed=seed + 1, hints=[ex.answer for ex in retry])
        for offset, outcome in zip(unanswered, hinted):
            _label(out, first_id + offset, examples[offset], outcome, prompts, max_per_question, rationalized=True)
    return out


def failed_shard(examples: list[Example], prompts: TeacherPrompts, *, first_id: int, reason: str) -> ShardOutput:
    """Every question of a shard recorded as failed with ``reason`` (the teacher broke on it)."""
    out = ShardOutput()
    for offset, ex in enumerate(examples):
        _label(out, first_id + offset, ex, Outcome(error=reason), prompts, None, rationalized=False)
    return out


def _label(out: ShardOutput, qid: int, ex: Example, outcome: Outcome, prompts: TeacherPrompts,
           cap: int | None, *, rationalized: bool) -> int:
    """Append one question's rows to ``out``; returns how many rationales were accepted."""
    base = {"id": qid, "question": ex.question, "answer": ex.answer, "source": ex.source,
            "rationalized": rationalized}
    out.tokens += outcome.tokens
    out.samples_asked += outcome.asked
    out.samples_returned += len(outcome.candidates)
    if outcome.error:
        out.failed.append({**base, "reason": outcome.error})
        return 0
    seen: set[str] = set()
    for sample, cand in enumerate(outcome.candidates):
        row = {**base, "rationale": cand.rationale, "predicted": cand.predicted, "sample": sample}
        reason = rejection_reason(cand, ex.answer, prompts, seen, rationalized=rationalized)
        if reason is None and cap is not None and len(seen) >= cap:
            reason = "over the per-question cap"
        if reason:
            out.rejected.append({**row, "reason": reason})
        else:
            seen.add(_normal(cand.rationale))
            out.accepted.append(row)
    return len(seen)


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def rejection_reason(cand: Candidate, gold: str, prompts: TeacherPrompts, seen: set[str], *,
                     rationalized: bool = False) -> str | None:
    """Why a candidate is not kept, or None when it is."""
    if cand.error:
        return cand.error
    if not cand.rationale.strip():
        return "empty rationale"
    if cand.predicted is None:
        return "no answer found"
    if not is_correct(cand.predicted, gold, prompts.kind):
        return "wrong answer"
    if _normal(cand.rationale) in seen:
        return "duplicate rationale"
    if rationalized and "hint" in cand.rationale.lower():
        return "mentions the hint"  # the student never sees a hint, so it must not learn to cite one
    return None


def reasons(rows: list[dict]) -> Counter:
    return Counter(r["reason"] for r in rows)


def make_backend(config, model_dir: Path | None, api_key: str | None = None) -> TeacherBackend:
    """The one place a backend is built from the teacher config section."""
    if config.backend == "scripted":
        return ScriptedTeacher()
    if config.backend == "precomputed":
        return PrecomputedTeacher()
    if config.backend == "transformers":
        from modecotd.backends.hf_local import TransformersGenerator

        generator = TransformersGenerator(model_dir, dtype=config.dtype, batch_size=config.batch_size,
                                          max_prompt_tokens=config.max_prompt_tokens)
    elif config.backend == "vllm":
        from modecotd.backends.vllm_local import VLLMGenerator
        from modecotd.config import VLLMSettings

        engine = config.vllm or VLLMSettings()
        generator = VLLMGenerator(model_dir, dtype=config.dtype, tensor_parallel_size=config.tensor_parallel_size,
                                  gpu_memory_utilization=engine.gpu_memory_utilization,
                                  max_model_len=engine.max_model_len)
    elif config.backend == "openai":
        from modecotd.backends.openai_api import OpenAIGenerator

        endpoint = config.endpoint
        generator = OpenAIGenerator(endpoint.url, config.model, api_key=api_key,
                                    concurrency=endpoint.concurrency, timeout_s=endpoint.timeout_s,
                                    max_retries=endpoint.max_retries, backoff_s=endpoint.backoff_s)
    else:
        raise ValueError(f"unknown teacher backend {config.backend!r}")
    return CotTeacher(config.backend, generator, samples=config.samples, temperature=config.temperature,
                      max_new_tokens=config.max_new_tokens)


def prompts_for(config, task_config, kind, fewshot: list[Example]) -> TeacherPrompts:
    """A task's teacher prompts from the teacher section and the task's own template."""
    from modecotd.prompts import DEFAULT_TEACHER_TEMPLATE

    demos = ()
    if config.prompting == "few_shot":
        demos = tuple((ex.question, ex.rationale, ex.answer) for ex in fewshot[: config.fewshot_examples])
    return TeacherPrompts(kind=kind, template=task_config.teacher_template or DEFAULT_TEACHER_TEMPLATE,
                          cot_trigger=config.cot_trigger, answer_trigger=config.answer_trigger, demos=demos,
                          chat=config.prompt_format == "chat")
