"""Data loaders and paper-format tasks: row validation, bad rows counted, tasks of any name, few-shot rows kept
apart from training, and the released data."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from modecotd.config import TaskConfig
from modecotd.errors import DataError, UserError
from modecotd.prompts import student_prompt
from modecotd.tasks.build import load_task, load_tasks
from modecotd.tasks.loaders import (
    MAX_ROW_BYTES,
    PROMPT_SHAPES,
    UNPARSED_REASONS,
    PaperSplitReader,
    HubSplitReader,
    QAFields,
    infer_kind,
    iter_paper_split,
    iter_qa_jsonl,
    match_prompt,
)
from modecotd.tasks.paper import (
    PAPER_SEEN,
    PAPER_SPECS,
    PAPER_TASKS,
    PAPER_UNSEEN,
    paper_split_path,
)
from modecotd.tasks.schema import AnswerKind, Example, Role

def paper_split(path: Path, kind: AnswerKind) -> list[Example]:
    return list(iter_paper_split(path, kind))


def qa_jsonl(path: Path, kind: AnswerKind, question_field: str = "question", answer_field: str = "answer",
             rationale_field: str | None = None, **reading) -> list[Example]:
    return list(iter_qa_jsonl(path, kind, question_field, answer_field, rationale_field, **reading))


def hub_split(name_or_path, split: str, kind: AnswerKind, question_field: str = "question",
              answer_field: str = "answer", rationale_field: str | None = None, **reading) -> list[Example]:
    return list(HubSplitReader(str(name_or_path), split, kind,
                               QAFields(question_field, answer_field, rationale_field, **reading))())


def paper_task(data_dir: Path, task: str):
    """One of the paper's tasks through the public path: a task config with a paper source."""
    spec = PAPER_SPECS[task]
    return load_task(TaskConfig.model_validate({"name": task, "role": spec.role.value,
                                                "source": {"kind": "paper", "data_dir": str(data_dir)}}))


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
    shape, question = match_prompt(prompt)
    assert (question if shape is not None and question else None) == expected


def test_load_paper_jsonl_with_rationales(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"input": PROMPT_Q.format(question="2 + 3?"), "output": "2 + 3 = 5.\n\n-->\n\n5.0 END"},
            {"input": PROMPT_Q.format(question="10 - 4?"), "output": "6"},
        ],
    )
    assert paper_split(path, AnswerKind.NUMBER) == [
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
    examples = paper_split(path, AnswerKind.YES_NO)
    assert [e.question for e in examples] == [COIN_QUESTION, COIN_QUESTION]
    assert [e.answer for e in examples] == ["no", "yes"]
    assert [e.source for e in examples] == [f"{path}:row 1", f"{path}:row 2"]


GOOD_ROW = {"input": PROMPT_Q.format(question="1 + 1?"), "output": "1 + 1 = 2\n\n-->\n\n2 END"}


def _bad_jsonl(path: Path) -> Path:
    """Two good rows around one bad row of every kind (and a blank line, which is no row)."""
    good = GOOD_ROW["input"]
    lines = [
        json.dumps(GOOD_ROW),  # 1
        '{"input": "oops", ',  # 2 bad_json
        json.dumps(["input", "output"]),  # 3 not_object
        json.dumps({"input": good}),  # 4 missing_field
        json.dumps({"output": "2"}),  # 5 missing_field
        json.dumps({"input": ["a list"], "output": "2"}),  # 6 missing_field (not a string)
        "",  # blank: not a row
        json.dumps({"input": "   ", "output": "2"}),  # 8 empty_question
        json.dumps({"input": PROMPT_Q.format(question=" "), "output": "2"}),  # 9 empty_question
        json.dumps({"input": good, "output": "  "}),  # 10 bad_answer
        json.dumps({"input": good, "output": "because\n\n-->\n\n END"}),  # 11 bad_answer
        json.dumps({"input": good, "output": "thinking\n\n-->\n\nbanana END"}),  # 12 bad_answer
        json.dumps({"input": PROMPT_Q.format(question="2 + 2?"), "output": "so\n\n-->\n\n4 END"}),  # 13
        json.dumps({"id": 7, "input": PROMPT_Q.format(question="3 + 3?"), "output": "6"}),  # 14
        json.dumps({"id": 7, "input": PROMPT_Q.format(question="4 + 4?"), "output": "8"}),  # 15 duplicate_id
        json.dumps({"input": PROMPT_Q.format(question="9" * (MAX_ROW_BYTES + 10)), "output": "9"}),  # 16 too_long
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


BAD_JSONL_COUNTS = {"bad_json": 1, "not_object": 1, "missing_field": 3, "empty_question": 2, "bad_answer": 3,
                    "duplicate_id": 1, "too_long": 1}


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and text in r.getMessage()]


def test_bad_rows_are_counted_by_reason_and_warned_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _bad_jsonl(tmp_path / "x.jsonl")
    reader = PaperSplitReader(path, AnswerKind.NUMBER, task="x")
    examples = list(reader())
    assert [(e.question, e.answer, e.source) for e in examples] == [("1 + 1?", "2", f"{path}:1"),
                                                                    ("2 + 2?", "4", f"{path}:13"),
                                                                    ("3 + 3?", "6", f"{path}:14")]
    assert dict(reader.unparsed) == BAD_JSONL_COUNTS
    assert set(reader.unparsed) == set(UNPARSED_REASONS)
    [warning] = _warnings(caplog, "cannot be parsed")
    assert "skipped 12 row(s)" in warning and "task x" in warning
    for line in (2, 3, 4):  # the first few bad rows, by line
        assert f"{path}:{line}:" in warning
    assert f"{path}:5:" not in warning
    assert len(list(reader())) == 3  # a second pass recounts and does not warn again
    assert dict(reader.unparsed) == BAD_JSONL_COUNTS
    assert len(_warnings(caplog, "cannot be parsed")) == 1


def test_bad_rows_in_a_json_array_are_named_by_index(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [GOOD_ROW, "a string", {"output": "2"}, {"input": GOOD_ROW["input"], "output": "banana"}, GOOD_ROW]
    path = write_json(tmp_path / "x.json", rows)
    reader = PaperSplitReader(path, AnswerKind.NUMBER)
    assert len(list(reader())) == 2
    assert dict(reader.unparsed) == {"not_object": 1, "missing_field": 1, "bad_answer": 1}
    [warning] = _warnings(caplog, "cannot be parsed")
    assert f"{path}:row 2:" in warning and f"{path}:row 4:" in warning and "banana" in warning
    assert paper_split(path, AnswerKind.NUMBER) == list(reader())


def test_question_loaders_stay_strict(tmp_path: Path) -> None:
    """Only the paper-format reader skips bad rows; the question/answer loaders name the first."""
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{"question": \n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path.name}:2: invalid JSON"):
        qa_jsonl(path, AnswerKind.NUMBER)


def _assert_data_error(path: Path, kind: AnswerKind, *parts: str) -> None:
    """Reading one of the paper's split files fails with a DataError whose message contains every part."""
    with pytest.raises(DataError) as caught:
        paper_split(path, kind)
    message = str(caught.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


def test_bad_json_array_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('[\n  {"input": "a",\n   "output": }\n]\n', encoding="utf-8")
    _assert_data_error(path, AnswerKind.NUMBER, f"{path}:3:", "invalid JSON")


@pytest.mark.parametrize(("name", "text"), [("e.jsonl", ""), ("e.json", "  \n"), ("a.json", "[]")])
def test_empty_file(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    _assert_data_error(path, AnswerKind.NUMBER, str(path))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(DataError, match="file not found") as caught:
        paper_split(path, AnswerKind.NUMBER)
    assert str(caught.value) == f"{path}: file not found"


# --------------------------------------------------------------------------- tasks of any name


def write_task(data_dir: Path, task: str, train: list | None = None, learn: list | None = None,
               test: list | None = None) -> Path:
    """A task's files in the release's layout (a None split gets no file)."""
    for split, rows, relative in (("train", train, f"train/{task}_train.json"), ("learn", learn, f"learn/{task}.jsonl"),
                                  ("test", test, f"evaluation/{task}_test.json")):
        if rows is not None:
            (data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            (write_json if relative.endswith(".json") else write_jsonl)(data_dir / relative, rows)
    return data_dir


def rationale_row(question: str, answer: str, prompt: str = PROMPT_Q) -> dict:
    return {"input": prompt.format(question=question), "output": f"Because.\n\n-->\n\n{answer} END"}


def gold_row(question: str, answer: str, prompt: str = PROMPT_Q) -> dict:
    return {"input": prompt.format(question=question), "output": answer}


def paper_config(name: str, role: str, data_dir: Path, **fields) -> TaskConfig:
    source = {"kind": "paper", "data_dir": str(data_dir)}
    return TaskConfig.model_validate({"name": name, "role": role, "source": source, **fields})


CHOICE_PROMPT = "Infer the correct choice for the question.\n\nQ: {question}\nA:"


def _reclor_like(data_dir: Path) -> Path:
    """A task the paper's table does not know (shaped like ReClor, which it does), with letter answers."""
    return write_task(data_dir, "logiqa",
                      train=[rationale_row(f"Argument {i}? Answer choices: (A) x, (B) y.", "AB"[i % 2], CHOICE_PROMPT)
                             for i in range(6)],
                      learn=[rationale_row(f"Claim {i}? Answer choices: (A) x, (B) y.", "B", CHOICE_PROMPT)
                             for i in range(3)],
                      test=[gold_row(f"Case {i}? Answer choices: (A) x, (B) y.", "A", CHOICE_PROMPT) for i in range(4)])


def test_unknown_task_kind_is_inferred_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    data = load_task(paper_config("logiqa", "unseen", _reclor_like(tmp_path)))
    assert (data.kind, data.role) == (AnswerKind.CHOICE, Role.UNSEEN)
    assert (len(data.train), len(data.fewshot), len(data.test)) == (6, 3, 4)
    assert data.test[0].question == "Case 0? Answer choices: (A) x, (B) y." and data.unparsed == {}
    inferred = [r.getMessage() for r in caplog.records if "inferred" in r.getMessage()]
    assert len(inferred) == 1 and "logiqa" in inferred[0] and "'choice'" in inferred[0]


def test_unknown_task_kind_and_role_from_the_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    data = load_task(paper_config("logiqa", "seen", _reclor_like(tmp_path), answer="text"))
    assert (data.kind, data.role) == (AnswerKind.TEXT, Role.SEEN)
    assert data.test[0].answer == "a"  # a text answer, lower-cased
    assert not [r for r in caplog.records if "inferred" in r.getMessage()]


def test_source_task_names_the_files(tmp_path: Path) -> None:
    source = {"kind": "paper", "data_dir": str(_reclor_like(tmp_path)), "task": "logiqa"}
    data = load_task(TaskConfig.model_validate({"name": "my_logiqa", "role": "unseen", "source": source}))
    assert data.name == "my_logiqa" and data.kind == AnswerKind.CHOICE and len(data.test) == 4


@pytest.mark.parametrize(
    ("answers", "kind"),
    [
        (["3", "-2.5", "1,000", "$4", "7."], AnswerKind.NUMBER),
        (["A", "(B)", "F"], AnswerKind.CHOICE),
        (["Yes", "no", "True", "false"], AnswerKind.YES_NO),
        (["nb", "ex"], AnswerKind.TEXT),
        (["3", "A"], AnswerKind.TEXT),
        (["A", "G"], AnswerKind.TEXT),
        ([], AnswerKind.TEXT),
    ],
)
def test_infer_kind(answers: list[str], kind: AnswerKind) -> None:
    assert infer_kind(answers) is kind


@pytest.mark.parametrize(("golds", "kind"), [(["12", "7"], "number"), (["yes", "No"], "yes_no"),
                                              (["bd", "xy"], "text")])
def test_unknown_task_kind_inferred_from_files(tmp_path: Path, golds: list[str], kind: str) -> None:
    write_task(tmp_path, "mine", learn=[rationale_row("Q0?", golds[0])],
               test=[gold_row(f"Q{i}?", g) for i, g in enumerate(golds, start=1)])
    assert load_task(paper_config("mine", "unseen", tmp_path)).kind == AnswerKind(kind)


def test_unknown_prompt_format_is_used_as_given_with_one_warning(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    plain = "{question}"
    write_task(tmp_path, "own_task", train=[rationale_row(f"What is {i} + 1?", str(i + 1), plain) for i in range(4)],
               learn=[rationale_row(f"What is {i} + 2?", str(i + 2), plain) for i in range(2)],
               test=[gold_row(f"What is {i} + 3?", str(i + 3), plain) for i in range(3)])
    data = load_task(paper_config("own_task", "seen", tmp_path, answer="number"))
    assert [e.question for e in data.test] == ["What is 0 + 3?", "What is 1 + 3?", "What is 2 + 3?"]
    assert len(data.train) == 4 and len(data.fewshot) == 2 and data.unparsed == {}
    [warning] = _warnings(caplog, "no known prompt format")
    assert "own_task" in warning


def test_unparsed_counts_are_on_the_task_data(tmp_path: Path) -> None:
    train = [rationale_row(f"Train {i}?", str(i)) for i in range(5)] + [{"input": "x"}, {"output": "1"}]
    test = [gold_row("Test 1?", "1"), gold_row("Test 2?", "lots"), gold_row(" ", "3")]
    write_task(tmp_path, "counted", train=train, learn=[rationale_row("Few?", "2")], test=test)
    learn = tmp_path / "learn" / "counted.jsonl"
    learn.write_text(learn.read_text(encoding="utf-8") + '{"input": \n', encoding="utf-8")
    data = load_task(paper_config("counted", "seen", tmp_path, answer="number"))
    assert data.unparsed == {"train": {"missing_field": 2}, "fewshot": {"bad_json": 1},
                             "test": {"bad_answer": 1, "empty_question": 1}}
    assert (len(data.train), len(data.fewshot), len(data.test)) == (5, 1, 1)


def test_a_split_with_no_usable_row_says_why(tmp_path: Path) -> None:
    write_task(tmp_path, "broken", learn=[rationale_row("Few?", "2")], test=[{"input": "x"}, {"input": "y"}])
    with pytest.raises(DataError, match=r"test split is empty \(2 row\(s\) could not be parsed"):
        load_task(paper_config("broken", "unseen", tmp_path, answer="number"))


# --------------------------------------------------------------------------- few-shot rows


def test_fewshot_rows_in_another_experts_train_rows_are_dropped(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    write_task(tmp_path, "alpha", train=[rationale_row(q, "1") for q in ("Shared?", "A1?", "A2?", "Own few?")],
               learn=[rationale_row("Own few?", "1")], test=[gold_row("A test?", "1")])
    write_task(tmp_path, "beta", learn=[rationale_row(q, "2") for q in ("Shared?", "B1?", "B2?")],
               test=[gold_row("B test?", "2")])
    tasks = load_tasks([paper_config("alpha", "seen", tmp_path), paper_config("beta", "unseen", tmp_path)])
    assert [e.question for e in tasks["beta"].fewshot] == ["B1?", "B2?"]
    assert [e.question for e in tasks["alpha"].fewshot] == ["Own few?"]  # its own train drops it instead
    assert [e.question for e in tasks["alpha"].train] == ["Shared?", "A1?", "A2?"]
    [warning] = _warnings(caplog, "another expert's train rows")
    assert "beta" in warning and "dropped 1 fewshot" in warning


def test_fewshot_rows_all_in_training_fail(tmp_path: Path) -> None:
    write_task(tmp_path, "alpha", train=[rationale_row("Shared?", "1")], learn=[rationale_row("A few?", "1")],
               test=[gold_row("A test?", "1")])
    write_task(tmp_path, "beta", learn=[rationale_row("Shared?", "2")], test=[gold_row("B test?", "2")])
    with pytest.raises(DataError, match="task beta: every few-shot example"):
        load_tasks([paper_config("alpha", "seen", tmp_path), paper_config("beta", "unseen", tmp_path)])


def test_format_table_marks_the_release_prompt_shapes() -> None:
    for name in ("coin_flip", "strategy_qa"):
        assert PAPER_SPECS[name].prompts == {"train": "separator", "fewshot": "separator", "test": "instruction"}
    assert {spec.prompts["test"] for spec in PAPER_SPECS.values()} == {"instruction", "bare"}
    assert PAPER_SPECS["openbook_qa"].prompts == {"train": "cot_instruction", "fewshot": "cot_instruction", "test": "bare"}
    assert all(set(spec.prompts) == {"train", "fewshot", "test"} for spec in PAPER_SPECS.values())
    assert {shape for spec in PAPER_SPECS.values() for shape in spec.prompts.values()} <= set(PROMPT_SHAPES)


def test_the_multiple_choice_unseen_tasks_read_down_to_bare_questions(paper_data: Path) -> None:
    """OpenBookQA's train and learn rows are zero-shot CoT prompts and its test rows bare questions;
    ReClor has learn and test rows only (some learn rows end in a literal backslash-n)."""
    for task in ("openbook_qa", "reclor"):
        data = load_task(paper_config(task, "unseen", paper_data))
        assert data.kind is AnswerKind.CHOICE and len(data.fewshot) == 5 and data.unparsed == {}
        for example in [*data.fewshot, *data.test[:50], *list(data.train)[:50]]:
            assert not example.question.startswith("Infer") and "step by step" not in example.question
            assert not example.question.endswith("\\n") and "(A)" in example.question
        assert all(e.rationale for e in data.fewshot) and {e.answer for e in data.test} <= set("ABCDE")
    assert len(list(load_task(paper_config("openbook_qa", "unseen", paper_data)).train)) > 0


@pytest.mark.parametrize("task", ["coin_flip", "strategy_qa"])
def test_fewshot_rows_render_in_the_test_format(paper_data: Path, task: str) -> None:
    """The release's few-shot (or, for coin_flip, train) rows are separator prompts and its test rows
    instruction prompts; loaded, both render to the same instruction prompt as the test rows."""
    data = load_task(paper_config(task, "unseen", paper_data))
    assert data.fewshot and data.unparsed == {}
    shapes = {match_prompt(student_prompt(ex.question, data.kind))[0] for ex in [*data.fewshot, *data.test]}
    assert shapes == {"instruction"}
    leads = {student_prompt(ex.question, data.kind).split("\n\n")[0] for ex in [*data.fewshot, *data.test]}
    assert leads == {"Infer True(yes) or False(no) for the question."}
    assert not {e.question for e in data.fewshot} & {e.question for e in data.train}


PAPER_TEST_SIZES = {"addsub": 119, "aqua": 254, "coin_flip": 150, "commonsense_qa": 1221, "date_understanding": 111,
                    "gsm8k": 1319, "last_letter_concatenation": 150, "multiarith": 180, "single_eq": 152,
                    "strategy_qa": 687, "svamp": 300, "tracking_shuffled_objects": 225, "openbook_qa": 500,
                    "reclor": 500}


def test_shipped_tasks_load_with_no_unparsed_row(paper_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    configs = [paper_config(name, PAPER_SPECS[name].role.value, paper_data) for name in sorted(PAPER_SPECS)]
    tasks = load_tasks(configs)
    assert {name: data.unparsed for name, data in tasks.items()} == {name: {} for name in PAPER_SPECS}
    assert {name: len(data.test) for name, data in tasks.items()} == PAPER_TEST_SIZES
    assert all(len(data.fewshot) == 5 for data in tasks.values())
    assert not _warnings(caplog, "cannot be parsed") and not _warnings(caplog, "prompt format")
    assert not _warnings(caplog, "another expert's train rows")


# --------------------------------------------------------------------------- generic QA rows


def test_qa_jsonl_custom_fields(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"q": "Is ice cold?", "a": "True", "why": "Ice is frozen water."},
            {"q": "Is fire cold?", "a": "no"},
        ],
    )
    examples = qa_jsonl(path, AnswerKind.YES_NO, "q", "a", rationale_field="why")
    assert examples == [
        Example("Is ice cold?", "yes", "Ice is frozen water.", f"{path}:1"),
        Example("Is fire cold?", "no", None, f"{path}:2"),
    ]


def test_qa_jsonl_numeric_answers_and_defaults(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "6 * 7?", "answer": 42.0}])
    assert qa_jsonl(path, AnswerKind.NUMBER) == [Example("6 * 7?", "42", None, f"{path}:1")]


def test_qa_jsonl_errors_name_the_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "B"}, {"answer": "C"}])
    with pytest.raises(DataError, match=r"qa\.jsonl:2: field 'question' is missing"):
        qa_jsonl(path, AnswerKind.CHOICE)
    path = write_jsonl(tmp_path / "qa2.jsonl", [{"question": "q", "answer": "Z"}])
    with pytest.raises(DataError, match=r"qa2\.jsonl:1: field 'answer'"):
        qa_jsonl(path, AnswerKind.CHOICE)


# --------------------------------------------------------------------------- Hugging Face datasets

HF_ROWS = [
    {"question": "Take the last letters of 'Ann Bob'.", "answer": "NB", "cot": "n then b"},
    {"question": "Take the last letters of 'Eve Max'.", "answer": "ex", "cot": "e then x"},
]


def test_hf_dataset_round_trip(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(HF_ROWS).save_to_disk(str(folder))
    examples = hub_split(
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
    examples = hub_split(str(folder), "test", AnswerKind.TEXT, "question", "answer")
    assert [e.answer for e in examples] == ["nb", "ex"]
    with pytest.raises(DataError, match="no split 'train'"):
        hub_split(str(folder), "train", AnswerKind.TEXT, "question", "answer")
    with pytest.raises(DataError, match=r"row 1: field 'prompt' is missing \(its columns: question, answer, cot\)"):
        hub_split(str(folder), "test", AnswerKind.TEXT, "prompt", "answer")


GSM8K_ROWS = [  # GSM8K's shape: the solution, with calculator notes, then #### and the number
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 1,000"},
    {"question": "A row whose solution lost its final line.", "answer": "She had 3 apples and 4 pears."},
]


def save(tmp_path: Path, rows: list[dict], name: str, test: list[dict] | None = None) -> str:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / name
    splits = {"train": rows} | ({"test": test} if test else {})
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(folder))
    return str(folder)


def test_a_gsm8k_gold_is_the_number_after_the_mark_never_the_first_number(tmp_path: Path) -> None:
    from modecotd.tasks.loaders import QAFields, HubSplitReader

    folder = save(tmp_path, GSM8K_ROWS, "gsm8k")
    with pytest.raises(DataError, match=r"no row's gold reads as a number answer .*answer_convention: gsm8k"):
        hub_split(folder, "train", AnswerKind.NUMBER)  # before: the gold was 48, silently
    reader = HubSplitReader(folder, "train", AnswerKind.NUMBER, QAFields(convention="gsm8k"))
    examples = list(reader())
    assert [e.answer for e in examples] == ["72", "1000"]
    assert examples[0].rationale == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips "
                                     "altogether in April and May.")
    assert reader.unparsed == {"gold not readable": 1}  # the third row: counted, not guessed
    regex = hub_split(folder, "train", AnswerKind.NUMBER, regex=r"####\s*(?P<answer>[\d,]+)")
    assert [e.answer for e in regex] == ["72", "1000"] and regex[0].rationale is None


def test_a_jsonl_number_gold_must_be_a_lone_number_and_reads_gsm8k_solutions(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS[:2])
    with pytest.raises(DataError, match=r"gsm8k\.jsonl:1: field 'answer': .* is not a valid number answer \(more "
                                        r"than a number: .*answer_convention: gsm8k"):
        qa_jsonl(path, AnswerKind.NUMBER)  # before: the gold was 48, silently
    examples = qa_jsonl(path, AnswerKind.NUMBER, convention="gsm8k")
    assert [e.answer for e in examples] == ["72", "1000"] and examples[1].rationale.endswith("she earned 0.2 x 50 = $10.")
    choices = write_jsonl(tmp_path / "mc.jsonl", [{"question": "2 + 2?", "options": ["3", "4"], "answer": "4"}])
    [example] = qa_jsonl(choices, AnswerKind.CHOICE, choices="options")
    assert (example.question, example.answer) == ("2 + 2? Answer choices: (A) 3, (B) 4.", "B")


def test_a_multiple_choice_set_gets_lettered_choices_and_its_gold_letter(tmp_path: Path) -> None:
    rows = [  # CommonsenseQA's shape: choices with labels and texts, answerKey a label
        {"question": "Where would you find a revolving door?", "answerKey": "B",
         "choices": {"label": ["A", "B", "C"], "text": ["a cave", "a bank", "a tent"]}},
        {"question": "What do people aim to do at work?", "answerKey": "",
         "choices": {"label": ["A", "B", "C"], "text": ["complete job", "sleep", "hide"]}},
    ]
    examples = hub_split(save(tmp_path, rows, "csqa"), "train", AnswerKind.CHOICE, answer_field="answerKey",
                               choices="choices")
    assert [(e.question, e.answer) for e in examples] == [
        ("Where would you find a revolving door? Answer choices: (A) a cave, (B) a bank, (C) a tent.", "B")]
    numbered = [{"question": "2 + 2?", "options": ["3", "4", "5"], "label": 1},  # an index
                {"question": "Capital of France?", "options": ["Rome", "Paris"], "label": "Paris"}]  # a text
    examples = hub_split(save(tmp_path, [{**r, "label": str(r["label"])} for r in numbered], "mc"), "train",
                               AnswerKind.CHOICE, answer_field="label", choices="options")
    assert [e.answer for e in examples] == ["B", "B"]


def test_a_yes_no_set_reads_booleans_and_words(tmp_path: Path) -> None:
    rows = [{"question": "Is the sky green?", "answer": False}, {"question": "Is water wet?", "answer": True}]
    assert [e.answer for e in hub_split(save(tmp_path, rows, "strategy"), "train", AnswerKind.YES_NO)] \
        == ["no", "yes"]


def test_a_hub_tasks_unreadable_golds_are_counted_per_split(tmp_path: Path) -> None:
    from modecotd.config_loading import parse_config
    from modecotd.tasks.build import load_task

    test = [{**row, "question": f"{row['question']} ({i})"} for i, row in enumerate(GSM8K_ROWS * 4)]
    folder = save(tmp_path, GSM8K_ROWS, "gsm8k", test=test)
    config = parse_config({"name": "hub", "student": {"model": "builtin:tiny"}, "tasks": [
        {"name": "coins", "role": "seen", "source": {"kind": "generated", "family": "coin_flip"}},
        {"name": "gsm", "role": "unseen", "answer": "number",  # its few-shot rows: its train rows
         "source": {"kind": "hf", "dataset": folder, "answer_convention": "gsm8k"}}]})
    data = load_task(config.tasks[1])
    assert data.unparsed == {"train": {"gold not readable": 1}, "test": {"gold not readable": 4}}
    assert len(data.test) == 8 and {e.answer for e in data.test} == {"72", "1000"}


def test_hf_dataset_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "no_such_dataset")
    with pytest.raises(DataError, match="no_such_dataset"):
        hub_split(missing, "train", AnswerKind.TEXT, "question", "answer")



# --------------------------------------------------------------------------- paper registry


def test_paper_registry() -> None:
    assert len(PAPER_TASKS) == 14
    assert set(PAPER_SEEN) | set(PAPER_UNSEEN) == set(PAPER_TASKS)
    assert not set(PAPER_SEEN) & set(PAPER_UNSEEN)
    assert PAPER_UNSEEN == ("coin_flip", "openbook_qa", "reclor", "strategy_qa")
    assert PAPER_TASKS["last_letter_concatenation"] is AnswerKind.TEXT
    assert PAPER_TASKS["date_understanding"] is AnswerKind.CHOICE
    assert PAPER_SPECS["gsm8k"].role is Role.SEEN


def test_paper_split_path_layout(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "gsm8k_train.json").write_text("[]", encoding="utf-8")
    (tmp_path / "train" / "openbook_qa_train.json").write_text("[]", encoding="utf-8")
    assert paper_split_path(tmp_path, "gsm8k", "train") == tmp_path / "train" / "gsm8k_train.json"
    assert paper_split_path(tmp_path, "openbook_qa", "train") == tmp_path / "train" / "openbook_qa_train.json"
    assert paper_split_path(tmp_path, "gsm8k", "test") is None
    assert paper_split_path(tmp_path, "mnist", "train") is None
    with pytest.raises(UserError, match="allowed"):
        paper_split_path(tmp_path, "gsm8k", "dev")
    with pytest.raises(UserError, match="file name"):
        paper_split_path(tmp_path, "../gsm8k", "train")


@pytest.mark.parametrize("task", sorted(PAPER_TASKS))
def test_every_paper_file_loads(task: str) -> None:
    data_dir = paper_data_dir()
    kind = PAPER_TASKS[task]
    for split in ("train", "fewshot", "test"):
        path = paper_split_path(data_dir, task, split)
        if path is None:
            assert (task, split) in {("coin_flip", "fewshot"), ("reclor", "train")}
            continue
        reader = PaperSplitReader(path, kind, task, (PAPER_SPECS[task].prompts[split],))
        examples = list(reader())
        assert examples, path
        assert not reader.unparsed and not reader.unknown_format  # every row in the table's prompt shape
        assert all(e.question and e.answer for e in examples)
        assert all(e.rationale for e in examples) == (split != "test")
        assert not any(e.question.startswith("Infer ") or "###" in e.question for e in examples)
    data = paper_task(data_dir, task)
    assert data.role is (Role.SEEN if task in PAPER_SEEN else Role.UNSEEN)
    assert (data.train or task == "reclor") and data.test and data.unparsed == {}


@pytest.mark.parametrize("task", ["coin_flip", "strategy_qa"])
def test_train_and_test_questions_share_the_bare_form(task: str) -> None:
    data = paper_task(paper_data_dir(), task)
    for example in [*data.train, *data.test]:
        assert "###" not in example.question
        assert "Infer" not in example.question and not example.question.endswith("A:")
        assert example.question == example.question.strip()
    if task == "coin_flip":
        for example in [*data.train, *data.test]:
            assert example.question.startswith("A coin is heads up.")
            assert example.question.endswith('Note that "flip" here means "reverse".')
