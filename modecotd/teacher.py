"""Stage 1 as a library: teacher backends and the correctness filter.

A backend turns questions into candidate rationales with the answer each one reaches;
:func:`label_candidates` keeps the rationales whose answer matches the gold answer and records
every other one with its reason. The Ray side (jobs/teacher_stage.py) only spreads batches of
questions over actors that each hold one backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from modecotd import prompts
from modecotd.tasks.answers import extract_teacher_answer, is_correct
from modecotd.tasks.schema import AnswerKind, Example

ANSWER_STAGE_TOKENS = 16


@dataclass(frozen=True)
class Candidate:
    """One rationale the teacher wrote and the answer it reached (None: no answer found)."""

    rationale: str
    predicted: str | None
    error: str | None = None


class TeacherBackend(Protocol):
    name: str

    def candidates(self, examples: list[Example], kind: AnswerKind) -> list[list[Candidate]]:
        """Candidate rationales for each example, in order."""


class ScriptedTeacher:
    """The task generator's own step-by-step solution: exact, one per question.

    Only for generated tasks; it stands in for a large teacher on a machine that cannot run one.
    """

    name = "scripted"

    def candidates(self, examples: list[Example], kind: AnswerKind) -> list[list[Candidate]]:
        return [
            [Candidate(ex.rationale, ex.answer)] if ex.rationale else [Candidate("", None, "no scripted rationale")]
            for ex in examples
        ]


class PrecomputedTeacher:
    """Rationales already in the train files (such as the paper's), re-scored by our extractor."""

    name = "precomputed"

    def candidates(self, examples: list[Example], kind: AnswerKind) -> list[list[Candidate]]:
        out = []
        for ex in examples:
            if not ex.rationale:
                out.append([Candidate("", None, "the train row has no rationale")])
            else:
                out.append([Candidate(ex.rationale, ex.answer)])
        return out


class TransformersTeacher:
    """A causal LM prompted with zero-shot CoT, several samples per question, two-stage answer."""

    name = "transformers"

    def __init__(self, model_dir: Path, *, dtype: str, samples: int, temperature: float,
                 max_new_tokens: int, batch_size: int, seed: int):
        from modecotd.models import load_causal_lm, load_tokenizer

        self.model = load_causal_lm(model_dir, dtype)
        self.tokenizer = load_tokenizer(model_dir)
        self.samples = samples
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.seed = seed

    def candidates(self, examples: list[Example], kind: AnswerKind) -> list[list[Candidate]]:
        from modecotd.generation import generate_texts

        questions = [ex.question for ex in examples]
        reasoning = generate_texts(
            self.model, self.tokenizer, [prompts.teacher_prompt(q) for q in questions],
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
            temperature=self.temperature, num_samples=self.samples, seed=self.seed,
        )
        flat = [(i, text.strip()) for i, texts in enumerate(reasoning) for text in texts]
        answers = generate_texts(
            self.model, self.tokenizer, [prompts.answer_prompt(questions[i], text) for i, text in flat],
            max_new_tokens=ANSWER_STAGE_TOKENS, batch_size=self.batch_size * self.samples,
        )
        out: list[list[Candidate]] = [[] for _ in examples]
        for (i, text), answer_texts in zip(flat, answers):
            predicted = extract_teacher_answer(answer_texts[0], kind) or extract_teacher_answer(text, kind)
            out[i].append(Candidate(text, predicted))
        return out


def label_candidates(examples: list[Example], candidates: list[list[Candidate]], kind: AnswerKind
                     ) -> tuple[list[dict], list[dict]]:
    """Split candidates into accepted rows (right answer, distinct rationale) and rejected rows."""
    accepted, rejected = [], []
    for ex, options in zip(examples, candidates):
        seen: set[str] = set()
        for sample, cand in enumerate(options):
            row = {"question": ex.question, "answer": ex.answer, "rationale": cand.rationale,
                   "predicted": cand.predicted, "sample": sample, "source": ex.source}
            reason = _rejection_reason(cand, ex.answer, kind, seen)
            if reason:
                rejected.append({**row, "reason": reason})
            else:
                seen.add(cand.rationale.strip())
                accepted.append(row)
    return accepted, rejected


def _rejection_reason(cand: Candidate, gold: str, kind: AnswerKind, seen: set[str]) -> str | None:
    if cand.error:
        return cand.error
    if not cand.rationale.strip():
        return "empty rationale"
    if cand.predicted is None:
        return "no answer found"
    if not is_correct(cand.predicted, gold, kind):
        return "wrong answer"
    if cand.rationale.strip() in seen:
        return "duplicate rationale"
    return None


def make_backend(name: str, model_dir: Path | None, **settings) -> TeacherBackend:
    """The one place a backend is chosen from the config's name."""
    if name == "scripted":
        return ScriptedTeacher()
    if name == "precomputed":
        return PrecomputedTeacher()
    if name == "transformers":
        assert model_dir is not None, "the transformers teacher needs a model folder"
        return TransformersTeacher(model_dir, **settings)
    raise ValueError(f"unknown teacher backend {name!r}")
