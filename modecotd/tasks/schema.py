"""What a task is: its answer kind, its examples and its role in the method."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class AnswerKind(str, enum.Enum):
    """How a task's final answer is written and compared."""

    NUMBER = "number"
    CHOICE = "choice"  # a letter A-F
    YES_NO = "yes_no"
    TEXT = "text"


class Role(str, enum.Enum):
    """Seen tasks get an expert; unseen tasks are only mixture targets."""

    SEEN = "seen"
    UNSEEN = "unseen"


@dataclass(frozen=True)
class Example:
    """One question with its gold answer and, where known, a rationale.

    ``question`` is the bare question (choices inline for multiple choice), never a full prompt:
    prompts are built from it by :mod:`modecotd.prompts`, so every split of a task shares one
    prompt format. ``answer`` is in canonical form for the task's kind (see
    :func:`modecotd.tasks.answers.normalize`). ``source`` says where the row came from
    (``file:line`` or ``generator:family:seed:index``).
    """

    question: str
    answer: str
    rationale: str | None = None
    source: str = ""


@dataclass
class TaskData:
    """A task's three splits, loaded and validated."""

    name: str
    kind: AnswerKind
    role: Role
    train: list[Example] = field(default_factory=list)
    fewshot: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
