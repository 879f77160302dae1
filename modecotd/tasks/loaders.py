"""Reading data files into :class:`~modecotd.tasks.schema.Example` lists.

Every loader validates each row and raises :class:`~modecotd.errors.DataError` with a one-line
message naming the file, the row (``file:7`` for the 7th line of a JSONL file, ``file:row 7``
for the 7th element of a JSON array) and the field. Each example's ``source`` is that same
locator, so a bad example can always be traced back to its row.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from modecotd.errors import DataError
from modecotd.tasks.answers import ANSWER_MARK, END_MARK, normalize
from modecotd.tasks.schema import AnswerKind, Example

JSON_SUFFIX = ".json"
MAX_QUOTED_CHARS = 60
"""A bad value is quoted in an error message up to this many characters."""

_INSTRUCTION_INPUT = re.compile(
    r"Infer [^\n]*? for the question\.\n\n(?:Q: )?(?P<question>.*)\nA:\s*", re.DOTALL
)
"""Paper prompt (a) ``Infer ... \\n\\nQ: {question}\\nA:`` and (c), the same without ``Q:``."""
_SEPARATOR_INPUT = re.compile(r"(?P<question>.*)\n\n###\n\n", re.DOTALL)
"""Paper prompt (b) ``{question}\\n\\n###\\n\\n`` (strategy_qa, coin_flip train)."""
_END = re.compile(rf"\b{END_MARK}\b")


# --------------------------------------------------------------------------- reading rows


def _read_text(path: Path) -> str:
    """The file's text; DataError if it is missing, unreadable or empty."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason})") from error
    except OSError as error:
        raise DataError(f"{path}: cannot read file ({error.strerror})") from error
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(locator, value) for each non-blank line of a JSONL file, read line by line; locator is
    ``path:line``."""
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: invalid JSON ({error.msg})") from error
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason})") from error


def _json_array_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(locator, value) for each element of a JSON array file; locator is ``path:row N``.

    A JSON array is parsed whole (use JSONL for train sets too large to hold in memory).
    """
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from error
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
    for number, row in enumerate(data, start=1):
        yield f"{path}:row {number}", row


def iter_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(locator, row object) pairs of a ``.json`` array or a JSONL file (any other suffix), streamed.

    Raises DataError when the file is missing, empty, not valid JSON, has no rows, or a row is
    not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    reader = _json_array_rows if path.suffix == JSON_SUFFIX else _jsonl_rows
    count = 0
    for locator, row in reader(path):
        if not isinstance(row, dict):
            raise DataError(f"{locator}: row is not a JSON object")
        count += 1
        yield locator, row
    if not count:
        raise DataError(f"{path}: file has no rows")


def read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """All of :func:`iter_rows` as a list."""
    return list(iter_rows(path))


# --------------------------------------------------------------------------- fields


def _field_text(row: Mapping[str, Any], field: str, locator: str) -> str:
    """A required, non-empty field as a string (numbers are accepted and converted)."""
    if field not in row or row[field] is None:
        raise DataError(f"{locator}: field {field!r} is missing")
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{locator}: field {field!r} must be a string, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise DataError(f"{locator}: field {field!r} is empty")
    return text


def _optional_field_text(row: Mapping[str, Any], field: str, locator: str) -> str | None:
    """An optional string field: None when absent, null or blank."""
    value = row.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{locator}: field {field!r} must be a string, got {type(value).__name__}")
    return value.strip() or None


def _gold(answer: str, kind: AnswerKind, field: str, locator: str) -> str:
    """``answer`` in canonical form; DataError naming the field when it does not parse."""
    canonical = normalize(answer, kind)
    if canonical is None:
        raise DataError(
            f"{locator}: field {field!r}: {answer.strip()[:MAX_QUOTED_CHARS]!r} is not a valid "
            f"{AnswerKind(kind).value} answer"
        )
    return canonical


# --------------------------------------------------------------------------- paper rows


def paper_question(prompt: str) -> str | None:
    """The bare question inside one of the paper's three ``input`` prompt shapes, or None."""
    for pattern in (_INSTRUCTION_INPUT, _SEPARATOR_INPUT):
        match = pattern.fullmatch(prompt)
        if match and match.group("question").strip():
            return match.group("question").strip()
    return None


def _split_output(output: str) -> tuple[str | None, str]:
    """(rationale, raw answer) of a paper ``output``: ``{rationale}\\n\\n-->\\n\\n{answer} END``.

    A bare gold answer (no ``-->``) gives (None, output).
    """
    position = output.rfind(ANSWER_MARK)
    if position < 0:
        return None, output
    rationale = output[:position].strip() or None
    answer = output[position + len(ANSWER_MARK):]
    end = _END.search(answer)
    return rationale, answer[: end.start()] if end else answer


def _paper_example(row: Mapping[str, Any], kind: AnswerKind, locator: str) -> Example:
    """One paper row as an Example (bare question, canonical answer, rationale if any)."""
    question = paper_question(_field_text(row, "input", locator))
    if question is None:
        raise DataError(f"{locator}: field 'input' is not in a known paper prompt format")
    rationale, answer = _split_output(_field_text(row, "output", locator))
    if not answer.strip():
        raise DataError(f"{locator}: field 'output' has no answer after {ANSWER_MARK!r}")
    return Example(question, _gold(answer, kind, "output", locator), rationale, locator)


def iter_paper_split(path: Path, kind: AnswerKind) -> Iterator[Example]:
    """Examples of one of the paper's ``{"input", "output"}`` files (JSON array or JSONL), streamed."""
    return (_paper_example(row, kind, locator) for locator, row in iter_rows(Path(path)))


def load_paper_split(path: Path, kind: AnswerKind) -> list[Example]:
    return list(iter_paper_split(path, kind))


# --------------------------------------------------------------------------- generic QA rows


def _qa_example(
    row: Mapping[str, Any],
    kind: AnswerKind,
    locator: str,
    question_field: str,
    answer_field: str,
    rationale_field: str | None,
) -> Example:
    """One question/answer row as an Example."""
    question = _field_text(row, question_field, locator).strip()
    answer = _gold(_field_text(row, answer_field, locator), kind, answer_field, locator)
    rationale = None
    if rationale_field is not None:
        rationale = _optional_field_text(row, rationale_field, locator)
    return Example(question, answer, rationale, locator)


def iter_qa_jsonl(
    path: Path,
    kind: AnswerKind,
    question_field: str = "question",
    answer_field: str = "answer",
    rationale_field: str | None = None,
) -> Iterator[Example]:
    """Examples of a JSONL file of question/answer(/rationale) objects, streamed.

    The question is taken as is; the answer is normalized for ``kind``; the rationale (when a
    field is named) may be absent or null on some rows.
    """
    return (
        _qa_example(row, kind, locator, question_field, answer_field, rationale_field)
        for locator, row in iter_rows(Path(path))
    )


def load_qa_jsonl(path: Path, kind: AnswerKind, question_field: str = "question", answer_field: str = "answer",
                  rationale_field: str | None = None) -> list[Example]:
    return list(iter_qa_jsonl(path, kind, question_field, answer_field, rationale_field))


def _open_hf_dataset(name_or_path: str, split: str) -> Any:
    """The ``split`` of a local ``save_to_disk`` folder or of a hub/builder dataset."""
    import datasets  # lazy: heavy import, only needed for this loader

    local = Path(name_or_path)
    if local.is_dir() and _is_saved_dataset(local):
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(
                    f"{name_or_path}: no split {split!r}; available: {', '.join(sorted(loaded))}"
                )
            return loaded[split]
        return loaded
    return datasets.load_dataset(name_or_path, split=split)


def _is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` was written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def iter_hf_dataset(
    name_or_path: str,
    split: str,
    kind: AnswerKind,
    question_field: str,
    answer_field: str,
    rationale_field: str | None = None,
) -> Iterator[Example]:
    """Examples of a Hugging Face dataset (a ``save_to_disk`` folder or a hub name), streamed
    from its memory-mapped table.

    Sources are ``{name_or_path}[{split}]:row N``. Loading failures become DataError.
    """
    try:
        dataset = _open_hf_dataset(name_or_path, split)
    except DataError:
        raise
    except Exception as error:  # datasets raises many unrelated types; all mean "cannot load"
        raise DataError(
            f"{name_or_path}: cannot load dataset split {split!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no details'})"
        ) from error
    count = 0
    for number, row in enumerate(dataset, start=1):
        locator = f"{name_or_path}[{split}]:row {number}"
        count += 1
        yield _qa_example(row, kind, locator, question_field, answer_field, rationale_field)
    if not count:
        raise DataError(f"{name_or_path}: split {split!r} has no rows")


def load_hf_dataset(name_or_path: str, split: str, kind: AnswerKind, question_field: str, answer_field: str,
                    rationale_field: str | None = None) -> list[Example]:
    return list(iter_hf_dataset(name_or_path, split, kind, question_field, answer_field, rationale_field))
