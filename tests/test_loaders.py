"""Data loaders and the paper registry: row validation, error messages and the released data."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from modecotd.errors import DataError, UserError
from modecotd.tasks.loaders import (
    load_hf_dataset,
    load_paper_split,
    load_qa_jsonl,
    paper_question,
)
from modecotd.tasks.paper import (
    PAPER_SEEN,
    PAPER_TASKS,
    PAPER_UNSEEN,
    load_paper_task,
    paper_split_path,
)
from modecotd.tasks.schema import AnswerKind, Example, Role

PAPER_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mode-cotd"
COIN_QUESTION = (
    'A coin is heads up. Whitney flips the coin. Is the coin still heads up? Note that "flip" '
    'here means "reverse".'
)
PROMPT_Q = "Infer the correct answer for the question.\n\nQ: {question}\nA:"
PROMPT_SEPARATOR = "{question}\n\n###\n\n"
PROMPT_YES_NO = "Infer True(yes) or False(no) for the question.\n\n{question}\nA:"


def paper_data_dir() -> Path:
    """The shared paper data folder, or skip the test when this checkout has none."""
    if not PAPER_DATA.is_dir():
        pytest.skip(f"shared paper data not found at {PAPER_DATA}")
    return PAPER_DATA


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write one JSON value per line."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows: list[Any]) -> Path:
    """Write a JSON array."""
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- paper rows


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (PROMPT_Q.format(question="What is 2 + 3?"), "What is 2 + 3?"),
        (
            "Infer the correct choice for the question.\n\nQ: Pick one.\n\nAnswer choices: "
            "(A) x, (B) y.\nA:",
            "Pick one.\n\nAnswer choices: (A) x, (B) y.",
        ),
        (PROMPT_SEPARATOR.format(question=COIN_QUESTION), COIN_QUESTION),
        (PROMPT_YES_NO.format(question=COIN_QUESTION), COIN_QUESTION),
        ("Q: no instruction\nA:", None),
        ("What is 2 + 3?", None),
        ("Infer the correct answer for the question.\n\nQ: \nA:", None),
    ],
)
def test_paper_question_shapes(prompt: str, expected: str | None) -> None:
    assert paper_question(prompt) == expected


def test_load_paper_jsonl_with_rationales(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"input": PROMPT_Q.format(question="2 + 3?"), "output": "2 + 3 = 5.\n\n-->\n\n5.0 END"},
            {"input": PROMPT_Q.format(question="10 - 4?"), "output": "6"},
        ],
    )
    assert load_paper_split(path, AnswerKind.NUMBER) == [
        Example("2 + 3?", "5", "2 + 3 = 5.", f"{path}:1"),
        Example("10 - 4?", "6", None, f"{path}:2"),
    ]


def test_load_paper_json_array_and_prompt_shapes(tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "t.json",
        [
            {
                "input": PROMPT_SEPARATOR.format(question=COIN_QUESTION),
                "output": "x\n\n-->\n\nno END",
            },
            {"input": PROMPT_YES_NO.format(question=COIN_QUESTION), "output": "Yes"},
        ],
    )
    examples = load_paper_split(path, AnswerKind.YES_NO)
    assert [e.question for e in examples] == [COIN_QUESTION, COIN_QUESTION]
    assert [e.answer for e in examples] == ["no", "yes"]
    assert [e.source for e in examples] == [f"{path}:row 1", f"{path}:row 2"]


def _assert_data_error(path: Path, kind: AnswerKind, *parts: str) -> None:
    """load_paper_split fails with a DataError whose message contains every part."""
    with pytest.raises(DataError) as caught:
        load_paper_split(path, kind)
    message = str(caught.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


GOOD_ROW = {"input": PROMPT_Q.format(question="1 + 1?"), "output": "1 + 1 = 2\n\n-->\n\n2 END"}


def test_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD_ROW, {"input": GOOD_ROW["input"]}, GOOD_ROW])
    _assert_data_error(path, AnswerKind.NUMBER, f"{path}:2:", "'output'", "missing")


def test_missing_field_in_json_array_names_row(tmp_path: Path) -> None:
    path = write_json(tmp_path / "x.json", [GOOD_ROW, GOOD_ROW, {"output": "2"}])
    _assert_data_error(path, AnswerKind.NUMBER, f"{path}:row 3:", "'input'")


def test_bad_json_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    lines = [json.dumps(GOOD_ROW), json.dumps(GOOD_ROW), '{"input": "oops", ', json.dumps(GOOD_ROW)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _assert_data_error(path, AnswerKind.NUMBER, f"{path}:3:", "invalid JSON")


def test_bad_json_array_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('[\n  {"input": "a",\n   "output": }\n]\n', encoding="utf-8")
    _assert_data_error(path, AnswerKind.NUMBER, f"{path}:3:", "invalid JSON")


def test_unparseable_gold_names_the_field(tmp_path: Path) -> None:
    rows = [GOOD_ROW, {"input": GOOD_ROW["input"], "output": "thinking\n\n-->\n\nbanana END"}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    _assert_data_error(path, AnswerKind.NUMBER, f"{path}:2:", "'output'", "banana")


def test_unknown_input_shape_names_the_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"input": "just a question", "output": "2"}])
    _assert_data_error(path, AnswerKind.NUMBER, f"{path}:1:", "'input'")


def test_non_object_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD_ROW, ["input", "output"]])
    _assert_data_error(path, AnswerKind.NUMBER, f"{path}:2:", "not a JSON object")


@pytest.mark.parametrize(("name", "text"), [("e.jsonl", ""), ("e.json", "  \n"), ("a.json", "[]")])
def test_empty_file(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    _assert_data_error(path, AnswerKind.NUMBER, str(path))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(DataError, match="file not found") as caught:
        load_paper_split(path, AnswerKind.NUMBER)
    assert str(caught.value) == f"{path}: file not found"


# --------------------------------------------------------------------------- generic QA rows


def test_load_qa_jsonl_custom_fields(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"q": "Is ice cold?", "a": "True", "why": "Ice is frozen water."},
            {"q": "Is fire cold?", "a": "no"},
        ],
    )
    examples = load_qa_jsonl(path, AnswerKind.YES_NO, "q", "a", rationale_field="why")
    assert examples == [
        Example("Is ice cold?", "yes", "Ice is frozen water.", f"{path}:1"),
        Example("Is fire cold?", "no", None, f"{path}:2"),
    ]


def test_load_qa_jsonl_numeric_answers_and_defaults(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "6 * 7?", "answer": 42.0}])
    assert load_qa_jsonl(path, AnswerKind.NUMBER) == [Example("6 * 7?", "42", None, f"{path}:1")]


def test_load_qa_jsonl_errors_name_the_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "B"}, {"answer": "C"}])
    with pytest.raises(DataError, match=r"qa\.jsonl:2: field 'question' is missing"):
        load_qa_jsonl(path, AnswerKind.CHOICE)
    path = write_jsonl(tmp_path / "qa2.jsonl", [{"question": "q", "answer": "Z"}])
    with pytest.raises(DataError, match=r"qa2\.jsonl:1: field 'answer'"):
        load_qa_jsonl(path, AnswerKind.CHOICE)


# --------------------------------------------------------------------------- Hugging Face datasets

HF_ROWS = [
    {"question": "Take the last letters of 'Ann Bob'.", "answer": "NB", "cot": "n then b"},
    {"question": "Take the last letters of 'Eve Max'.", "answer": "ex", "cot": "e then x"},
]


def test_hf_dataset_round_trip(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(HF_ROWS).save_to_disk(str(folder))
    examples = load_hf_dataset(
        str(folder), "train", AnswerKind.TEXT, "question", "answer", rationale_field="cot"
    )
    assert [(e.question, e.answer, e.rationale) for e in examples] == [
        (row["question"], row["answer"].lower(), row["cot"]) for row in HF_ROWS
    ]
    assert examples[1].source == f"{folder}[train]:row 2"


def test_hf_dataset_dict_split_and_errors(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dd"
    rows = datasets.Dataset.from_list(HF_ROWS)
    datasets.DatasetDict({"test": rows}).save_to_disk(str(folder))
    examples = load_hf_dataset(str(folder), "test", AnswerKind.TEXT, "question", "answer")
    assert [e.answer for e in examples] == ["nb", "ex"]
    with pytest.raises(DataError, match="no split 'train'"):
        load_hf_dataset(str(folder), "train", AnswerKind.TEXT, "question", "answer")
    with pytest.raises(DataError, match=r"row 1: field 'prompt' is missing"):
        load_hf_dataset(str(folder), "test", AnswerKind.TEXT, "prompt", "answer")


def test_hf_dataset_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "no_such_dataset")
    with pytest.raises(DataError, match="no_such_dataset"):
        load_hf_dataset(missing, "train", AnswerKind.TEXT, "question", "answer")


# --------------------------------------------------------------------------- paper registry


def test_paper_registry() -> None:
    assert len(PAPER_TASKS) == 12
    assert set(PAPER_SEEN) | set(PAPER_UNSEEN) == set(PAPER_TASKS)
    assert not set(PAPER_SEEN) & set(PAPER_UNSEEN)
    assert PAPER_UNSEEN == ("coin_flip", "strategy_qa")
    assert PAPER_TASKS["last_letter_concatenation"] is AnswerKind.TEXT
    assert PAPER_TASKS["date_understanding"] is AnswerKind.CHOICE


def test_paper_split_path_layout(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "gsm8k_train.json").write_text("[]", encoding="utf-8")
    assert paper_split_path(tmp_path, "gsm8k", "train") == tmp_path / "train" / "gsm8k_train.json"
    assert paper_split_path(tmp_path, "gsm8k", "test") is None
    with pytest.raises(UserError, match="allowed"):
        paper_split_path(tmp_path, "gsm8k", "dev")
    with pytest.raises(UserError, match="addsub"):
        paper_split_path(tmp_path, "mnist", "train")


@pytest.mark.parametrize("task", sorted(PAPER_TASKS))
def test_every_paper_file_loads(task: str) -> None:
    data_dir = paper_data_dir()
    kind = PAPER_TASKS[task]
    for split in ("train", "fewshot", "test"):
        path = paper_split_path(data_dir, task, split)
        if path is None:
            assert (task, split) == ("coin_flip", "fewshot")
            continue
        examples = load_paper_split(path, kind)
        assert examples, path
        assert all(e.question and e.answer for e in examples)
        assert all(e.rationale for e in examples) == (split != "test")
        assert not any(e.question.startswith("Infer ") or "###" in e.question for e in examples)
    data = load_paper_task(data_dir, task)
    assert data.role is (Role.SEEN if task in PAPER_SEEN else Role.UNSEEN)
    assert data.train and data.test


@pytest.mark.parametrize("task", ["coin_flip", "strategy_qa"])
def test_train_and_test_questions_share_the_bare_form(task: str) -> None:
    data = load_paper_task(paper_data_dir(), task)
    for example in [*data.train, *data.test]:
        assert "###" not in example.question
        assert "Infer" not in example.question and not example.question.endswith("A:")
        assert example.question == example.question.strip()
    if task == "coin_flip":
        for example in [*data.train, *data.test]:
            assert example.question.startswith("A coin is heads up.")
            assert example.question.endswith('Note that "flip" here means "reverse".')
