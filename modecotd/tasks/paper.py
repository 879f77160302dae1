"""Tasks in the MoDE-CoTD release's format, the paper's own twelve and any other.

A task ``T`` in that format is three files under a data folder: ``train/T_train.json`` (teacher
rationales), ``learn/T.jsonl`` (the few-shot examples the mixture is fitted on) and
``evaluation/T_test.json`` (gold answers only); any of them may be absent. Each row is
``{"input": prompt, "output": ...}``.

Everything known about the paper's tasks is in one table, :data:`PAPER_SPECS`: answer kind, role
and the prompt shape of each split's inputs. The release writes coin_flip's and strategy_qa's
train and learn inputs as ``{question}\\n\\n###\\n\\n`` but their test inputs as ``Infer True(yes)
or False(no) for the question.\\n\\n{question}\\nA:``. Every split is read down to the bare
question, and every stage renders a question with :func:`modecotd.prompts.student_prompt`, so
the few-shot rows the mixture is fitted on are seen in the same format as the test rows.

A task not in the table is read with every known prompt shape (an input in none of them is
used as given, with one warning); its answer kind is given by the caller (the task config's
``answer``) or inferred from its gold answers, and its role comes from the caller.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from modecotd.errors import DataError, UserError
from modecotd.tasks.loaders import GUESSED_SHAPES, PaperSplitReader, infer_kind, paper_answers
from modecotd.tasks.schema import AnswerKind, Role

log = logging.getLogger(__name__)

SPLIT_FILES: dict[str, str] = {
    "train": "train/{task}_train.json",
    "fewshot": "learn/{task}.jsonl",
    "test": "evaluation/{task}_test.json",
}


@dataclass(frozen=True)
class PaperTask:
    """One of the paper's tasks: its answer kind, its role and each split's prompt shape (a name
    in :data:`modecotd.tasks.loaders.PROMPT_SHAPES`)."""

    kind: AnswerKind
    role: Role
    prompts: dict[str, str]


_INSTRUCTION = {"train": "instruction", "fewshot": "instruction", "test": "instruction"}
_SEPARATOR_TEST_INSTRUCTION = {"train": "separator", "fewshot": "separator", "test": "instruction"}

PAPER_SPECS: dict[str, PaperTask] = {
    "addsub": PaperTask(AnswerKind.NUMBER, Role.SEEN, _INSTRUCTION),
    "gsm8k": PaperTask(AnswerKind.NUMBER, Role.SEEN, _INSTRUCTION),
    "multiarith": PaperTask(AnswerKind.NUMBER, Role.SEEN, _INSTRUCTION),
    "single_eq": PaperTask(AnswerKind.NUMBER, Role.SEEN, _INSTRUCTION),
    "svamp": PaperTask(AnswerKind.NUMBER, Role.SEEN, _INSTRUCTION),
    "aqua": PaperTask(AnswerKind.CHOICE, Role.SEEN, _INSTRUCTION),
    "commonsense_qa": PaperTask(AnswerKind.CHOICE, Role.SEEN, _INSTRUCTION),
    "date_understanding": PaperTask(AnswerKind.CHOICE, Role.SEEN, _INSTRUCTION),
    "tracking_shuffled_objects": PaperTask(AnswerKind.CHOICE, Role.SEEN, _INSTRUCTION),
    "last_letter_concatenation": PaperTask(AnswerKind.TEXT, Role.SEEN, _INSTRUCTION),
    "coin_flip": PaperTask(AnswerKind.YES_NO, Role.UNSEEN, _SEPARATOR_TEST_INSTRUCTION),  # no learn file
    "strategy_qa": PaperTask(AnswerKind.YES_NO, Role.UNSEEN, _SEPARATOR_TEST_INSTRUCTION),
    # zero-shot CoT prompts in train and learn, the bare question in test
    "openbook_qa": PaperTask(AnswerKind.CHOICE, Role.UNSEEN, {"train": "cot_instruction", "fewshot": "cot_instruction",
                                                              "test": "bare"}),
    "reclor": PaperTask(AnswerKind.CHOICE, Role.UNSEEN, _INSTRUCTION),  # no train file: learn and test only
}
"""The paper's fourteen released tasks: ten seen, four unseen."""

PAPER_TASKS: dict[str, AnswerKind] = {name: spec.kind for name, spec in PAPER_SPECS.items()}
PAPER_SEEN: tuple[str, ...] = tuple(sorted(n for n, s in PAPER_SPECS.items() if s.role == Role.SEEN))
"""Tasks that get one LoRA expert each in the paper."""
PAPER_UNSEEN: tuple[str, ...] = tuple(sorted(n for n, s in PAPER_SPECS.items() if s.role == Role.UNSEEN))
"""Tasks the paper only targets with the mixture."""


def _check_name(task: str) -> None:
    """UserError unless ``task`` can be a file stem in the data folder."""
    if not task or task.strip() != task or any(c in task for c in "/\\") or task.startswith("."):
        raise UserError(f"paper task name {task!r} cannot be a file name in the data folder")


def paper_split_path(data_dir: Path, task: str, split: str) -> Path | None:
    """Path of ``task``'s ``split`` (train, fewshot or test) under ``data_dir``; None if absent.

    Any task name is accepted; an unknown split raises UserError.
    """
    _check_name(task)
    if split not in SPLIT_FILES:
        raise UserError(f"unknown split {split!r}; allowed: {', '.join(SPLIT_FILES)}")
    path = Path(data_dir) / SPLIT_FILES[split].format(task=task)
    return path if path.is_file() else None


def _split_paths(data_dir: Path, task: str) -> dict[str, Path | None]:
    if not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: data folder not found (task {task})")
    paths = {split: paper_split_path(data_dir, task, split) for split in SPLIT_FILES}
    if not any(paths.values()):
        expected = ", ".join(SPLIT_FILES[split].format(task=task) for split in SPLIT_FILES)
        known = ", ".join(sorted(PAPER_TASKS))
        raise DataError(f"{data_dir}: no file of paper task {task!r} ({expected}); the release's tasks: {known}")
    return paths


def paper_kind(data_dir: Path, task: str, kind: AnswerKind | None = None) -> AnswerKind:
    """``kind`` when given, else the paper's kind for one of its tasks, else the kind every gold
    answer in the task's files has (logged)."""
    if kind is not None:
        return AnswerKind(kind)
    if task in PAPER_SPECS:
        return PAPER_SPECS[task].kind
    paths = [p for p in _split_paths(data_dir, task).values() if p is not None]
    answers = list(chain.from_iterable(paper_answers(p) for p in paths))
    inferred = infer_kind(answers)
    log.info("task %s: answer kind %r inferred from %d gold answer(s) in %s (set the task's 'answer' to choose "
             "it)", task, inferred.value, len(answers), data_dir)
    return inferred


def paper_readers(data_dir: Path, task: str, kind: AnswerKind, name: str | None = None
                  ) -> dict[str, PaperSplitReader | None]:
    """A reader per split of ``task`` (None where its file is absent), with each split's prompt
    shape from :data:`PAPER_SPECS` tried first. ``name`` (default ``task``) names the task in
    warnings; the readers share their warnings, so an unknown prompt format is reported once."""
    spec = PAPER_SPECS.get(task)
    warned: set[str] = set()
    readers: dict[str, PaperSplitReader | None] = {}
    for split, path in _split_paths(data_dir, task).items():
        first = (spec.prompts[split],) if spec else ()
        shapes = first + tuple(s for s in GUESSED_SHAPES if s not in first)  # "bare" only where the table says
        readers[split] = None if path is None else PaperSplitReader(path, kind, name or task, shapes, warned)
    return readers


def unparsed_counts(readers: dict[str, object]) -> dict[str, dict[str, int]]:
    """split -> reason -> rows skipped, from the last pass of each reader that counts them (a paper
    file's, a hub dataset's), for the splits with any."""
    return {split: dict(sorted(counts.items())) for split, reader in readers.items()
            if (counts := getattr(reader, "unparsed", None))}
