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


def test_a_seeded_sample_of_a_file_is_random_fixed_and_disjoint(paper_data):
    """sizes.sample_seed: N rows drawn at random (the same on every load), not the file's first N."""
    def load(seed):
        sizes = {"train": 40, "test": 25, "sample_seed": seed}
        return load_task(task(name="gsm8k", role="seen", source={"kind": "paper", "data_dir": str(paper_data)},
                              sizes=sizes))

    first, again, other = load(7), load(7), load(8)
    head = load_task(task(name="gsm8k", role="seen", source={"kind": "paper", "data_dir": str(paper_data)},
                          sizes={"train": 40, "test": 25}))
    assert (len(first.train), len(first.test)) == (40, 25)
    assert [e.question for e in first.train] == [e.question for e in again.train]
    assert [e.question for e in first.test] == [e.question for e in again.test] and first.train.key == again.train.key
    assert [e.question for e in first.test] != [e.question for e in other.test]
    assert [e.question for e in first.train] != [e.question for e in head.train]
    assert [e.question for e in first.test] != [e.question for e in head.test]
    assert not {e.question for e in first.train} & {e.question for e in first.fewshot}


def test_a_generated_task_refuses_a_sample_seed():
    with pytest.raises(ValueError, match="sample_seed"):
        task(name="coins", role="seen", source={"kind": "generated", "family": "coin_flip"},
             sizes={"train": 4, "sample_seed": 1})
