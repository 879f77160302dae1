"""TaskConfig -> TaskData: the one place each kind of task source is dispatched."""
from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from modecotd.errors import ConfigError, DataError
from modecotd.tasks import generators, loaders, paper
from modecotd.tasks.schema import AnswerKind, Example, Role, TaskData, TrainSplit

DEFAULT_GENERATED_SIZES = {"train": 200, "fewshot": 5, "test": 50}
DEFAULT_FEWSHOT = 5
SPLITS = ("train", "fewshot", "test")
log = logging.getLogger(__name__)


def answer_kind(task) -> AnswerKind:
    """The task's answer kind: explicit in the config, else from its family or paper task, else
    (paper-format files of another task) inferred from its gold answers."""
    if task.answer is not None:
        return task.answer
    source = task.source
    if source.kind == "generated":
        return generators.FAMILIES[source.family]
    if source.kind == "paper":
        return paper.paper_kind(Path(source.data_dir), source.task or task.name)
    raise ConfigError(f"tasks.{task.name}.answer: required for {source.kind} sources "
                      f"(one of: {', '.join(k.value for k in AnswerKind)})")


def _limit(rows: list[Example], n: int | None, seed: int | None = None) -> list[Example]:
    """The first ``n`` rows, or with ``seed`` ``n`` rows drawn at random (kept in file order)."""
    if n is None or n >= len(rows):
        return rows
    if seed is None:
        return rows[:n]
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def _train_split(reader, n: int | None, seed: int | None, elsewhere: set[str]) -> TrainSplit:
    """The train rows, streamed: the first ``n``, or with ``seed`` ``n`` drawn at random from a
    first pass that only notes the positions of rows whose question is in no other split
    (``elsewhere``), so that ``n`` rows remain once the splits are kept apart."""
    if seed is None or n is None:
        return TrainSplit(reader, limit=n)
    positions = [i for i, ex in enumerate(reader()) if ex.question not in elsewhere]
    if n >= len(positions):
        return TrainSplit(reader)
    return TrainSplit(reader, pick=frozenset(random.Random(seed).sample(positions, n)))


def _split_readers(task, kind: AnswerKind) -> dict[str, Callable[[], Iterable[Example]] | None]:
    """For each split, a function that streams its rows from the source (None: no such split)."""
    source = task.source
    if source.kind == "paper":  # readers that count the rows they cannot parse (paper.unparsed_counts)
        return paper.paper_readers(Path(source.data_dir), source.task or task.name, kind, name=task.name)
    fields = loaders.QAFields(source.question_field, source.answer_field, source.rationale_field,
                              source.answer_convention, source.answer_regex, source.choices_field)
    if source.kind == "jsonl":
        return {split: partial(loaders.iter_qa_jsonl, Path(getattr(source, split)), kind, fields.question,
                               fields.answer, fields.rationale, convention=fields.convention, regex=fields.regex,
                               choices=fields.choices)
                if getattr(source, split) else None for split in SPLITS}
    if source.kind == "hf":
        return {split: loaders.HubSplitReader(source.dataset, getattr(source, f"{split}_split"), kind, fields,
                                              source.name, source.revision, source.data_files)
                if getattr(source, f"{split}_split") else None for split in SPLITS}
    raise ConfigError(f"tasks.{task.name}.source.kind: unknown {source.kind!r}")


def load_task(task) -> TaskData:
    """Load (or generate) a task's splits, apply the configured sizes and check them.

    Few-shot and test rows are loaded; train rows are streamed from their source on each pass
    (:class:`TrainSplit`), read once here to validate, count and fingerprint them.
    """
    kind = answer_kind(task)
    sizes = task.sizes
    readers = {}
    if task.source.kind == "generated":
        wanted = {s: getattr(sizes, s) if getattr(sizes, s) is not None else DEFAULT_GENERATED_SIZES[s]
                  for s in SPLITS}
        rows, fewshot, test = generators.streamed_splits(task.source.family, wanted, seed=task.source.seed,
                                                         size=task.source.size, wording=task.source.wording)
        train = TrainSplit(rows)
    else:
        readers = _split_readers(task, kind)
        fewshot, test = ([] if readers[s] is None else _limit(list(readers[s]()), getattr(sizes, s),
                                                              sizes.sample_seed) for s in ("fewshot", "test"))
        train = _train_split(readers["train"] or (lambda: []), sizes.train, sizes.sample_seed,
                             {ex.question for ex in fewshot + test})
        if not fewshot and task.role == Role.UNSEEN and readers["train"]:
            # No expert trains on an unseen task, so its train rows can serve as few-shot examples.
            n = sizes.fewshot if sizes.fewshot is not None else DEFAULT_FEWSHOT
            fewshot = train.head(n)
            train = train.replace(skip=n)
    data = TaskData(name=task.name, kind=kind, role=task.role, train=train, fewshot=fewshot, test=test)
    _drop_overlaps(data)  # reads the train split once: its rows that cannot be parsed are counted then
    data.unparsed = paper.unparsed_counts(readers)
    _check(task, data)
    return data


def load_tasks(tasks, locate: Callable[[int], str] | None = None) -> dict[str, TaskData]:
    """Every task of a run by name, and no task's few-shot row among another seen task's train rows
    (see :func:`drop_fewshot_seen_by_experts`). ``locate(index)`` names the config key of the task
    at ``index``; an error about a task as a whole (not about one row of a file) starts with it."""
    loaded = {}
    for index, task in enumerate(tasks):
        try:
            loaded[task.name] = load_task(task)
        except loaders.BadRow:
            raise  # it names its file, line and field
        except (DataError, ConfigError) as error:
            if locate is None:
                raise
            raise type(error)(f"{locate(index)}: {error}") from None
    drop_fewshot_seen_by_experts(loaded)
    return loaded


def drop_fewshot_seen_by_experts(tasks: dict[str, TaskData]) -> None:
    """Drop each task's few-shot rows whose question is in another seen task's train rows (an
    expert trained on a few-shot question makes the mixture search pick it for the wrong reason;
    a task's own train split already leaves its few-shot questions out, see ``_drop_overlaps``)."""
    # Train splits are streamed and may be large: look for the (few) few-shot questions in them,
    # never hold a train split's questions.
    fewshot = {ex.question for data in tasks.values() for ex in data.fewshot}
    trained_on: dict[str, set[str]] = {}  # few-shot question -> seen tasks whose train rows hold it
    for name, data in tasks.items():
        if data.role == Role.SEEN and fewshot:
            for ex in data.train:
                if ex.question in fewshot:
                    trained_on.setdefault(ex.question, set()).add(name)
    for name, data in tasks.items():
        kept = [ex for ex in data.fewshot if not trained_on.get(ex.question, set()) - {name}]
        if len(kept) == len(data.fewshot):
            continue
        log.warning("task %s: dropped %d fewshot row(s) whose question is in another expert's train rows",
                    name, len(data.fewshot) - len(kept))
        data.fewshot = kept
        if not kept:
            raise DataError(f"task {name}: every few-shot example is in another expert's train rows")


def _empty(data: TaskData, split: str) -> str:
    """Why ``split`` is empty, for an error message."""
    skipped = sum(data.unparsed.get(split, {}).values())
    return f"the {split} split is empty" + (f" ({skipped} row(s) could not be parsed, see the warnings)"
                                            if skipped else "")


def _check(task, data: TaskData) -> None:
    if not data.test:
        raise DataError(f"task {task.name}: {_empty(data, 'test')}")
    if data.role == Role.SEEN and not data.train:
        raise DataError(f"task {task.name}: a seen task needs train questions; {_empty(data, 'train')}")
    if not data.fewshot:
        raise DataError(f"task {task.name}: no few-shot examples for the mixture (give a fewshot split)")
    missing = [ex.source for ex in data.fewshot if not ex.rationale]
    if missing:
        raise DataError(f"task {task.name}: few-shot examples need a rationale; none in {missing[0]}")


def _drop_overlaps(data: TaskData) -> None:
    """Keep the splits apart: no train or few-shot question in the test split, and no few-shot
    question in the train split (the paper's released few-shot rows are copies of train rows; an
    expert trained on them would make the mixture search pick it for the wrong reason)."""
    test = {ex.question for ex in data.test}
    kept = [ex for ex in data.fewshot if ex.question not in test]
    if len(kept) < len(data.fewshot):
        log.warning("task %s: dropped %d fewshot row(s) whose question is in the test split",
                    data.name, len(data.fewshot) - len(kept))
        data.fewshot = kept
    data.train = data.train.replace(exclude=frozenset(test | {ex.question for ex in data.fewshot}))
    dropped = data.train.scan()[1]
    if dropped:
        log.warning("task %s: dropped %d train row(s) whose question is in the test or fewshot split",
                    data.name, dropped)
