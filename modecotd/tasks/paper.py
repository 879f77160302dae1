"""Registry of the MoDE-CoTD paper's twelve released tasks and where their files live.

The released data (``mode-cotd/``) has ``train/{task}_train.json`` (teacher rationales),
``learn/{task}.jsonl`` (the five few-shot examples the mixture is fitted on; none for
coin_flip) and ``evaluation/{task}_test.json`` (gold answers only).
"""
from __future__ import annotations

from pathlib import Path

from modecotd.errors import UserError
from modecotd.tasks.loaders import load_paper_split
from modecotd.tasks.schema import AnswerKind, Role, TaskData

PAPER_TASKS: dict[str, AnswerKind] = {
    "addsub": AnswerKind.NUMBER,
    "gsm8k": AnswerKind.NUMBER,
    "multiarith": AnswerKind.NUMBER,
    "single_eq": AnswerKind.NUMBER,
    "svamp": AnswerKind.NUMBER,
    "aqua": AnswerKind.CHOICE,
    "commonsense_qa": AnswerKind.CHOICE,
    "date_understanding": AnswerKind.CHOICE,
    "tracking_shuffled_objects": AnswerKind.CHOICE,
    "coin_flip": AnswerKind.YES_NO,
    "strategy_qa": AnswerKind.YES_NO,
    "last_letter_concatenation": AnswerKind.TEXT,
}

PAPER_SEEN: tuple[str, ...] = (
    "addsub",
    "aqua",
    "commonsense_qa",
    "date_understanding",
    "gsm8k",
    "last_letter_concatenation",
    "multiarith",
    "single_eq",
    "svamp",
    "tracking_shuffled_objects",
)
"""Tasks that get one LoRA expert each in the paper."""

PAPER_UNSEEN: tuple[str, ...] = ("coin_flip", "strategy_qa")
"""Tasks the paper only targets with the mixture (OpenBookQA and ReClor are not shipped)."""

_SPLIT_FILES: dict[str, str] = {
    "train": "train/{task}_train.json",
    "fewshot": "learn/{task}.jsonl",
    "test": "evaluation/{task}_test.json",
}


def paper_role(task: str) -> Role:
    """Whether ``task`` is seen (has an expert) or unseen in the paper."""
    _check_task(task)
    return Role.SEEN if task in PAPER_SEEN else Role.UNSEEN


def _check_task(task: str) -> None:
    """UserError listing the paper's tasks when ``task`` is not one of them."""
    if task not in PAPER_TASKS:
        raise UserError(f"unknown paper task {task!r}; allowed: {', '.join(sorted(PAPER_TASKS))}")


def paper_split_path(data_dir: Path, task: str, split: str) -> Path | None:
    """Path of ``task``'s ``split`` (train, fewshot or test) under ``data_dir``; None if absent.

    ``data_dir`` is the ``mode-cotd`` folder. Unknown tasks or splits raise UserError.
    """
    _check_task(task)
    if split not in _SPLIT_FILES:
        raise UserError(f"unknown split {split!r}; allowed: {', '.join(_SPLIT_FILES)}")
    path = Path(data_dir) / _SPLIT_FILES[split].format(task=task)
    return path if path.is_file() else None


def load_paper_task(data_dir: Path, task: str) -> TaskData:
    """All three splits of a paper task (a split whose file is absent stays empty)."""
    role = paper_role(task)
    data = TaskData(name=task, kind=PAPER_TASKS[task], role=role)
    for split in _SPLIT_FILES:
        path = paper_split_path(data_dir, task, split)
        if path is not None:
            setattr(data, split, load_paper_split(path, data.kind))
    return data
