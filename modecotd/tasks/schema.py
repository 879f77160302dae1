"""What a task is: its answer kind, its examples and its role in the method."""
from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice


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


class TrainSplit:
    """A task's train questions, read from their source on every pass instead of held in memory.

    Train sets can be large (a teacher may be asked 100k questions); few-shot and test splits are
    small and stay lists. A pass reads ``rows()``, keeps rows ``skip`` to ``limit`` and drops the
    questions in ``exclude`` (those of the other splits). :meth:`scan` reads it once to validate
    it, count it and fingerprint it.
    """

    def __init__(self, rows: Callable[[], Iterable[Example]], *, limit: int | None = None, skip: int = 0,
                 exclude: frozenset[str] = frozenset(), pick: frozenset[int] | None = None):
        self._rows = rows
        self.limit = limit
        self.skip = skip
        self.exclude = exclude
        self.pick = pick  # positions in the source to keep (a seeded sample), before skip and limit
        self._scanned: tuple[int, int, str] | None = None

    @classmethod
    def of(cls, examples: Iterable[Example]) -> "TrainSplit":
        rows = list(examples)
        return cls(lambda: rows)

    def replace(self, **changes) -> "TrainSplit":
        settings = dict(limit=self.limit, skip=self.skip, exclude=self.exclude, pick=self.pick) | changes
        return TrainSplit(self._rows, **settings)

    def _window(self) -> Iterator[Example]:
        rows = iter(self._rows())
        if self.pick is not None:
            rows = (ex for position, ex in enumerate(rows) if position in self.pick)
        return islice(rows, self.skip, self.limit)

    def __iter__(self) -> Iterator[Example]:
        return (ex for ex in self._window() if ex.question not in self.exclude)

    def head(self, n: int) -> list[Example]:
        return list(islice(iter(self), n))

    def scan(self) -> tuple[int, int, str]:
        """(rows kept, rows dropped as overlaps, fingerprint of the kept rows), read once."""
        if self._scanned is None:
            kept = dropped = 0
            digest = hashlib.sha256()
            for ex in self._window():
                if ex.question in self.exclude:
                    dropped += 1
                    continue
                kept += 1
                digest.update(json.dumps([ex.question, ex.answer, ex.rationale]).encode() + b"\n")
            self._scanned = (kept, dropped, digest.hexdigest()[:16])
        return self._scanned

    def __len__(self) -> int:
        return self.scan()[0]

    def __bool__(self) -> bool:
        return len(self) > 0

    @property
    def key(self) -> str:
        return self.scan()[2]


@dataclass
class TaskData:
    """A task's three splits, loaded and validated (the train split streamed, see TrainSplit)."""

    name: str
    kind: AnswerKind
    role: Role
    train: TrainSplit = field(default_factory=lambda: TrainSplit.of([]))
    fewshot: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    unparsed: dict[str, dict[str, int]] = field(default_factory=dict)
    """Rows skipped because they could not be parsed: split -> reason -> count, only splits that
    had any (reasons: modecotd.tasks.loaders.UNPARSED_REASONS). The train split's counts are those
    of the pass that validated it (the rows up to its size limit)."""

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainSplit):
            self.train = TrainSplit.of(self.train)
