"""Building a task from its config: splits kept apart, few-shot rows never in an expert's train set."""
from __future__ import annotations

import pytest

from modecotd.config import TaskConfig
from modecotd.errors import DataError
from modecotd.tasks.build import load_task


def task(**fields) -> TaskConfig:
    return TaskConfig.model_validate(fields)


def test_generated_task_sizes_and_disjoint_splits():
    data = load_task(task(name="coins", role="seen", source={"kind": "generated", "family": "coin_flip", "size": 3},
                          sizes={"train": 20, "fewshot": 5, "test": 10}))
    assert (len(data.train), len(data.fewshot), len(data.test)) == (20, 5, 10)
    questions = [e.question for e in [*data.train, *data.fewshot, *data.test]]
    assert len(set(questions)) == len(questions)
    assert all(e.rationale for e in data.fewshot)


def test_paper_fewshot_rows_are_removed_from_train(paper_data):
    data = load_task(task(name="multiarith", role="seen", source={"kind": "paper", "data_dir": str(paper_data)}))
    train = {e.question for e in data.train}
    assert not train & {e.question for e in data.fewshot}
    assert not train & {e.question for e in data.test}  # 4 multiarith test questions are in the released train set
    assert len(data.fewshot) == 5


def test_unseen_paper_task_without_fewshot_file_takes_train_rows(paper_data):
    data = load_task(task(name="coin_flip", role="unseen", source={"kind": "paper", "data_dir": str(paper_data)},
                          sizes={"fewshot": 4}))
    assert len(data.fewshot) == 4 and all(e.rationale for e in data.fewshot)
    assert not {e.question for e in data.train} & {e.question for e in data.fewshot}


def test_seen_task_needs_train_rows(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q", "answer": "yes", "rationale": "r"}\n')
    with pytest.raises(DataError, match="train split is empty"):
        load_task(task(name="x", role="seen", answer="yes_no",
                       source={"kind": "jsonl", "test": str(path), "fewshot": str(path)}))


def test_fewshot_rows_need_rationales(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q", "answer": "yes"}\n')
    test = tmp_path / "test.jsonl"
    test.write_text('{"question": "other", "answer": "no"}\n')
    with pytest.raises(DataError, match="few-shot examples need a rationale"):
        load_task(task(name="x", role="unseen", answer="yes_no",
                       source={"kind": "jsonl", "test": str(test), "fewshot": str(path)}))


def test_missing_data_folder():
    with pytest.raises(DataError, match="data folder not found"):
        load_task(task(name="gsm8k", role="seen", source={"kind": "paper", "data_dir": "/nonexistent"}))
