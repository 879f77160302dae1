"""Prompt and target formats shared by every stage.

One prompt format per answer kind for every split of a task (train, few-shot, test), which is
what the released data lacks for coin_flip and strategy_qa (see shared/data/README.md).
"""
from __future__ import annotations

from modecotd.tasks.answers import ANSWER_MARK, END_MARK
from modecotd.tasks.schema import AnswerKind

INSTRUCTIONS = {
    AnswerKind.NUMBER: "Infer the correct answer for the question.",
    AnswerKind.CHOICE: "Infer the correct choice for the question.",
    AnswerKind.YES_NO: "Infer True(yes) or False(no) for the question.",
    AnswerKind.TEXT: "Infer the correct answer for the question.",
}

COT_TRIGGER = "Let's think step by step."
ANSWER_TRIGGER = "Therefore, the answer is"


def student_prompt(question: str, kind: AnswerKind) -> str:
    """The student's input, as in the paper's released data."""
    return f"{INSTRUCTIONS[kind]}\n\nQ: {question}\nA:"


def student_target(rationale: str, answer: str) -> str:
    """What the student learns to write after its prompt: rationale, marker, answer, END."""
    return f" {rationale.strip()}\n\n{ANSWER_MARK}\n\n{answer} {END_MARK}"


def teacher_prompt(question: str) -> str:
    """Zero-shot chain-of-thought prompt (Kojima et al. 2022)."""
    return f"Q: {question}\nA: {COT_TRIGGER}"


def answer_prompt(question: str, rationale: str) -> str:
    """The second, answer-extraction stage of zero-shot CoT."""
    return f"{teacher_prompt(question)} {rationale.strip()}\n{ANSWER_TRIGGER}"
