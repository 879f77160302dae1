"""Reading data files into :class:`~modecotd.tasks.schema.Example` lists.

Every loader validates each row. A bad row is a :class:`BadRow` (a
:class:`~modecotd.errors.DataError`) with a one-line message naming the file, the row (``file:7``
for the 7th line of a JSONL file, ``file:row 7`` for the 7th element of a JSON array) and the
field, and a ``reason`` (one of :data:`UNPARSED_REASONS`). The question/answer loaders raise it;
the paper-format reader (:class:`PaperSplitReader`) skips the row, counts it by reason and warns.
Each example's ``source`` is that same locator, so an example can always be traced to its row.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modecotd.errors import DataError
from modecotd.tasks.answers import ANSWER_MARK, END_MARK, normalize
from modecotd.tasks.schema import AnswerKind, Example

JSON_SUFFIX = ".json"
MAX_QUOTED_CHARS = 60
"""A bad value is quoted in an error message up to this many characters."""
MAX_REPORTED_ROWS = 3
"""A file's warning about rows it skipped names this many of them."""
log = logging.getLogger(__name__)

# Why a row could not be used (the keys of PaperSplitReader.unparsed and TaskData.unparsed).
BAD_JSON = "bad_json"  # a JSONL line that is not JSON
NOT_OBJECT = "not_object"  # a row that is not a JSON object
MISSING_FIELD = "missing_field"  # a required field absent, null or not a string
EMPTY_QUESTION = "empty_question"  # a blank input, or a known prompt shape around no question
BAD_ANSWER = "bad_answer"  # no gold answer, or one that does not read as the task's answer kind
TOO_LONG = "too_long"  # a line over MAX_ROW_BYTES (never held whole in memory)
DUPLICATE_ID = "duplicate_id"  # a row whose ``id`` an earlier row of the file has
UNPARSED_REASONS = (BAD_JSON, NOT_OBJECT, MISSING_FIELD, EMPTY_QUESTION, BAD_ANSWER, TOO_LONG, DUPLICATE_ID)
MAX_ROW_BYTES = 1 << 20
"""A JSONL row may be at most this long (1 MiB: far beyond any model's context)."""
ID_FIELD = "id"
"""Rows that carry this field must each have their own value in a file."""


class BadRow(DataError):
    """One row that cannot be used; ``reason`` is one of :data:`UNPARSED_REASONS`."""

    def __init__(self, locator: str, reason: str, detail: str):
        super().__init__(f"{locator}: {detail}")
        self.locator = locator
        self.reason = reason


_INSTRUCTION_INPUT = re.compile(
    r"Infer [^\n]*? for the question\.\n\n(?:Q: )?(?P<question>.*)\nA:\s*", re.DOTALL
)
"""Paper prompt (a) ``Infer ... \\n\\nQ: {question}\\nA:`` and (c), the same without ``Q:``."""
_SEPARATOR_INPUT = re.compile(r"(?P<question>.*)\n\n###\n\n", re.DOTALL)
"""Paper prompt (b) ``{question}\\n\\n###\\n\\n`` (strategy_qa, coin_flip train)."""
_COT_INSTRUCTION_INPUT = re.compile(
    r"Infer [^\n]*? for the question\. Q: (?P<question>.*)\nA: Let's think step by step\.\s*", re.DOTALL)
"""Paper prompt (d) ``Infer ... Q: {question}\nA: Let's think step by step.`` (openbook_qa train and learn)."""
_BARE_INPUT = re.compile(r"(?P<question>.*\S.*)", re.DOTALL)
"""Paper prompt (e): the question alone (openbook_qa test)."""
PROMPT_SHAPES: dict[str, re.Pattern[str]] = {"instruction": _INSTRUCTION_INPUT, "separator": _SEPARATOR_INPUT,
                                             "cot_instruction": _COT_INSTRUCTION_INPUT, "bare": _BARE_INPUT}
"""The release's prompt shapes by name; which task uses which in which split: paper.PAPER_SPECS."""
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
    ``path:line``; the value of a line that is not JSON, or longer than :data:`MAX_ROW_BYTES`
    (read past, never held whole), is a BadRow. Bytes that are not UTF-8 are a DataError naming
    the line."""
    with open(path, "rb") as handle:
        number = 0
        while line := handle.readline(MAX_ROW_BYTES + 1):
            number += 1
            locator = f"{path}:{number}"
            if len(line) > MAX_ROW_BYTES:
                size = len(line)
                while not line.endswith(b"\n") and (line := handle.readline(MAX_ROW_BYTES)):
                    size += len(line)
                yield locator, BadRow(locator, TOO_LONG, f"the line is {size / 2**20:.1f} MB; a row may be at "
                                                         f"most {MAX_ROW_BYTES / 2**20:.0f} MB")
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{locator}: not UTF-8 text ({error.reason} at byte {error.start + 1} of the "
                                "line); save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                value = BadRow(locator, BAD_JSON, f"invalid JSON ({error.msg})")
            yield locator, value


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


def iter_rows(path: Path, strict: bool = True) -> Iterator[tuple[str, Any]]:
    """(locator, row object) pairs of a ``.json`` array or a JSONL file (any other suffix), streamed.

    Raises DataError when the file is missing, empty, not valid JSON as a whole (a JSON array) or
    has no rows. A bad row (a JSONL line that is not JSON, a row that is not an object) raises a
    BadRow when ``strict``, else comes as a BadRow in place of the row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    reader = _json_array_rows if path.suffix == JSON_SUFFIX else _jsonl_rows
    count = 0
    ids: dict[Any, str] = {}  # id -> the locator of the row that has it
    for locator, row in reader(path):
        count += 1
        if not isinstance(row, (dict, BadRow)):
            row = BadRow(locator, NOT_OBJECT, "row is not a JSON object")
        elif isinstance(row, dict) and row.get(ID_FIELD) is not None:
            key = json.dumps(row[ID_FIELD], sort_keys=True)
            if key in ids:
                row = BadRow(locator, DUPLICATE_ID, f"field {ID_FIELD!r}: {row[ID_FIELD]!r} is also the id of "
                                                    f"{ids[key].rsplit(':', 1)[-1].strip()} (ids must be unique)")
            else:
                ids[key] = locator
        if strict and isinstance(row, BadRow):
            raise row
        yield locator, row
    if not count:
        raise DataError(f"{path}: file has no rows (it is empty or blank)")


def read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """All of :func:`iter_rows` as a list."""
    return list(iter_rows(path))


# --------------------------------------------------------------------------- fields


def _field_text(row: Mapping[str, Any], field: str, locator: str, empty_reason: str) -> str:
    """A required, non-empty field as a string (numbers are accepted and converted); a blank one
    is a BadRow with ``empty_reason``."""
    if field not in row or row[field] is None:
        raise BadRow(locator, MISSING_FIELD, f"field {field!r} is missing")
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRow(locator, MISSING_FIELD, f"field {field!r} must be a string, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise BadRow(locator, empty_reason, f"field {field!r} is empty")
    return text


def _optional_field_text(row: Mapping[str, Any], field: str, locator: str) -> str | None:
    """An optional string field: None when absent, null or blank."""
    value = row.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRow(locator, MISSING_FIELD, f"field {field!r} must be a string, got {type(value).__name__}")
    return value.strip() or None


def _gold(answer: str, kind: AnswerKind, field: str, locator: str) -> str:
    """``answer`` in canonical form; DataError naming the field when it does not parse."""
    canonical = normalize(answer, kind)
    if canonical is None:
        raise BadRow(locator, BAD_ANSWER, f"field {field!r}: {answer.strip()[:MAX_QUOTED_CHARS]!r} is not a "
                     f"valid {AnswerKind(kind).value} answer")
    return canonical


# --------------------------------------------------------------------------- paper rows


GUESSED_SHAPES = ("instruction", "separator", "cot_instruction")  # tried on a task not in paper.PAPER_SPECS


def match_prompt(prompt: str, shapes: Iterable[str] = GUESSED_SHAPES) -> tuple[str | None, str]:
    """(name of the first of ``shapes`` that ``prompt`` has, bare question); (None, the prompt
    stripped) when it has none of them. A literal ``\n`` left at the question's end (some of
    ReClor's released rows) is dropped."""
    for name in shapes:
        match = PROMPT_SHAPES[name].fullmatch(prompt)
        if match:
            return name, match.group("question").strip().removesuffix("\\n").strip()
    return None, prompt.strip()


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


def _paper_example(row: Mapping[str, Any], kind: AnswerKind, locator: str,
                   shapes: Iterable[str]) -> tuple[Example, bool]:
    """One paper row as an Example (bare question, canonical answer, rationale if any), and
    whether its input had one of ``shapes`` (if not, the input is the question as given)."""
    shape, question = match_prompt(_field_text(row, "input", locator, EMPTY_QUESTION), shapes)
    if not question:
        raise BadRow(locator, EMPTY_QUESTION, f"field 'input' is a {shape} prompt around no question")
    rationale, answer = _split_output(_field_text(row, "output", locator, BAD_ANSWER))
    if not answer.strip():
        raise BadRow(locator, BAD_ANSWER, f"field 'output' has no answer after {ANSWER_MARK!r}")
    return Example(question, _gold(answer, kind, "output", locator), rationale, locator), shape is not None


class PaperSplitReader:
    """One paper-format file (``{"input", "output"}`` rows, a JSON array or JSONL), streamed as
    Examples by calling it; every call is one pass over the file.

    A row that cannot be used is skipped and counted by reason in ``unparsed`` (recounted on every
    pass; a pass that stops early has counted the rows it read); the first pass that meets any
    logs one warning naming the file and its first few bad rows. An input in none of ``shapes``
    (names in PROMPT_SHAPES, tried in order) is used as given as the question, with one warning
    naming the task; readers sharing one ``warned`` set (a task's splits) warn once between them.
    """

    def __init__(self, path: Path, kind: AnswerKind, task: str = "", shapes: Iterable[str] = GUESSED_SHAPES,
                 warned: set[str] | None = None):
        self.path = Path(path)
        self.kind = AnswerKind(kind)
        self.task = task or self.path.stem
        self.shapes = tuple(shapes)
        self.unparsed: Counter[str] = Counter()
        self.unknown_format = 0
        self._warned = set() if warned is None else warned

    def __call__(self) -> Iterator[Example]:
        self.unparsed, self.unknown_format = Counter(), 0
        first_bad: list[str] = []
        try:
            for locator, row in iter_rows(self.path, strict=False):
                try:
                    if isinstance(row, BadRow):
                        raise row
                    example, known_shape = _paper_example(row, self.kind, locator, self.shapes)
                except BadRow as bad:
                    self.unparsed[bad.reason] += 1
                    if len(first_bad) < MAX_REPORTED_ROWS:
                        first_bad.append(str(bad))
                    continue
                self.unknown_format += not known_shape
                yield example
        finally:
            self._warn(first_bad)

    def _warn(self, first_bad: list[str]) -> None:
        """The pass's warnings, each logged once per reader (once per task for prompt formats)."""
        if self.unparsed and f"rows:{self.path}" not in self._warned:
            self._warned.add(f"rows:{self.path}")
            reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.unparsed.items()))
            log.warning("task %s: %s: skipped %d row(s) that cannot be parsed (%s); first: %s", self.task,
                        self.path, sum(self.unparsed.values()), reasons, " | ".join(first_bad))
        if self.unknown_format and f"format:{self.task}" not in self._warned:
            self._warned.add(f"format:{self.task}")
            log.warning("task %s: %d input(s) of %s are in no known prompt format (%s); each input is used as "
                        "given as the question", self.task, self.unknown_format, self.path, ", ".join(self.shapes))


def iter_paper_split(path: Path, kind: AnswerKind) -> Iterator[Example]:
    """Examples of one of the paper's ``{"input", "output"}`` files (JSON array or JSONL), streamed
    (rows that cannot be parsed are skipped with a warning; :class:`PaperSplitReader` counts them)."""
    return PaperSplitReader(path, kind)()


# --------------------------------------------------------------------------- inferring the answer kind

_KIND_PATTERNS: tuple[tuple[AnswerKind, re.Pattern[str]], ...] = (
    (AnswerKind.NUMBER, re.compile(r"[-+]?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")),
    (AnswerKind.CHOICE, re.compile(r"\(?[A-F]\)?")),
    (AnswerKind.YES_NO, re.compile(r"yes|no|true|false", re.IGNORECASE)),
)


def infer_kind(answers: Iterable[str]) -> AnswerKind:
    """number if every answer is a number, choice if every one is a letter A-F, yes_no if every
    one is yes/no (or true/false), else text (also when there is no answer at all)."""
    answers = [a.strip().rstrip(".").strip() for a in answers if a.strip()]
    for kind, pattern in _KIND_PATTERNS:
        if answers and all(pattern.fullmatch(a) for a in answers):
            return kind
    return AnswerKind.TEXT


def paper_answers(path: Path) -> Iterator[str]:
    """The raw gold answers of a paper-format file (the text after ``-->``, or the whole output),
    skipping rows without a usable output."""
    for _, row in iter_rows(Path(path), strict=False):
        output = row.get("output") if isinstance(row, dict) else None
        if isinstance(output, (str, int, float)) and not isinstance(output, bool):
            yield _split_output(str(output))[1]


# --------------------------------------------------------------------------- generic QA rows


def _qa_example(row: Mapping[str, Any], kind: AnswerKind, locator: str, fields: QAFields) -> Example:
    """One question/answer row as an Example; a gold that cannot be read (see :func:`read_gold`) is
    a BadRow naming the field."""
    question = _field_text(row, fields.question, locator, EMPTY_QUESTION).strip()
    text = _field_text(row, fields.answer, locator, BAD_ANSWER)
    gold, carried = read_gold(row, kind, fields)
    if gold is None:
        hint = ""
        if kind == AnswerKind.NUMBER and normalize(text, kind) is not None and fields.convention == "plain":
            hint = " (more than a number: for a solution ending in '#### 72' set answer_convention: gsm8k, or answer_regex)"
        raise BadRow(locator, BAD_ANSWER, f"field {fields.answer!r}: {text.strip()[:MAX_QUOTED_CHARS]!r} is not a "
                     f"valid {AnswerKind(kind).value} answer{hint}")
    if fields.choices:
        question = _with_choices(question, row.get(fields.choices))
    rationale = carried
    if fields.rationale is not None and fields.rationale != fields.answer:
        rationale = _optional_field_text(row, fields.rationale, locator)
    return Example(question, gold, rationale, locator)


def iter_qa_jsonl(path: Path, kind: AnswerKind, question_field: str = "question", answer_field: str = "answer",
                  rationale_field: str | None = None, **reading) -> Iterator[Example]:
    """Examples of a JSONL file of question/answer(/rationale) objects, streamed.

    The question is taken as is; the gold is read as :func:`read_gold` says (``reading``: the
    :class:`QAFields` convention, regex and choices); the rationale (when a field is named) may be
    absent or null on some rows. The first row that cannot be read is a DataError naming its line.
    """
    fields = QAFields(question_field, answer_field, rationale_field, **reading)
    return (_qa_example(row, kind, locator, fields) for locator, row in iter_rows(Path(path)))


def _open_hf_dataset(name_or_path: str, split: str, name: str | None = None, revision: str | None = None,
                     data_files: Any = None) -> Any:
    """The ``split`` of a local ``save_to_disk`` folder or of a hub/builder dataset (its subset
    ``name``, at ``revision``, from ``data_files``)."""
    import datasets  # lazy: heavy import, only needed for this loader

    local = Path(name_or_path)
    if local.is_dir() and _is_saved_dataset(local):
        if name or revision or data_files:
            raise DataError(f"{name_or_path}: a save_to_disk folder has no subset, revision or data_files; "
                            "leave name, revision and data_files out")
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(
                    f"{name_or_path}: no split {split!r}; available: {', '.join(sorted(loaded))}"
                )
            return loaded[split]
        return loaded
    return datasets.load_dataset(name_or_path, name, split=split, revision=revision, data_files=data_files)


def _is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` was written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


GSM8K_MARK = "####"
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations inside its solutions
_LONE_NUMBER = re.compile(r"[-+]?\s*\$?\s*[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?\s*%?\.?")
CHOICE_LETTERS = "ABCDEF"  # what a choice answer can be (modecotd.tasks.answers)


@dataclass(frozen=True)
class QAFields:
    """How a question/answer row (a hub dataset's, a JSONL file's) becomes an example: which fields hold what, and how the gold is
    taken out of its field (``convention`` "gsm8k": after the last ``####``, the text before it
    being the rationale; or ``regex``: its ``answer`` group, else its first group, else the match)
    and mapped to a letter through ``choices`` (a list of texts, or ``{label: [...], text: [...]}``)."""

    question: str = "question"
    answer: str = "answer"
    rationale: str | None = None
    convention: str = "plain"
    regex: str | None = None
    choices: str | None = None

    def required(self) -> list[str]:
        return [self.question, self.answer] + [f for f in (self.rationale, self.choices) if f]


def read_gold(row: Mapping[str, Any], kind: AnswerKind, fields: QAFields) -> tuple[str | None, str | None]:
    """(canonical gold, or None when it cannot be read; the rationale the answer field carries)."""
    value = row.get(fields.answer)
    rationale = None
    if value is None or isinstance(value, (list, dict)):
        return None, None
    text = str(value).strip()
    if fields.convention == "gsm8k":
        if GSM8K_MARK not in text:
            return None, None
        rationale, text = (part.strip() for part in text.rsplit(GSM8K_MARK, 1))
        rationale = _CALCULATOR.sub("", rationale).strip() or None
    if fields.regex:
        match = re.search(fields.regex, text)
        if match is None:
            return None, rationale
        groups = match.groupdict()
        text = groups.get("answer") if "answer" in groups else match.group(1) if match.re.groups else match.group(0)
        text = (text or "").strip()
    if fields.choices:
        return _choice_gold(text, value, row.get(fields.choices)), rationale
    if isinstance(value, bool):
        text = "yes" if value else "no"
    if kind == AnswerKind.NUMBER and not (_LONE_NUMBER.fullmatch(text) and any(c.isdigit() for c in text)):
        return None, rationale  # more than a number: its first number would be a guess
    return normalize(text, kind), rationale


def _choice_list(choices: Any) -> tuple[list[str], list[str]] | None:
    """(labels, texts) of a choices value, or None when it has neither shape."""
    if isinstance(choices, Mapping) and isinstance(choices.get("text"), list):
        texts = [str(t) for t in choices["text"]]
        labels = [str(label) for label in (choices.get("label") or CHOICE_LETTERS[:len(texts)])]
        return (labels, texts) if len(labels) == len(texts) else None
    if isinstance(choices, list) and all(isinstance(c, (str, int, float)) for c in choices):
        return list(CHOICE_LETTERS[:len(choices)]), [str(c) for c in choices]
    return None


def _choice_gold(text: str, value: Any, choices: Any) -> str | None:
    """The letter of the right choice: the gold is one of the labels, else a 0-based index, else a
    choice's text."""
    found = _choice_list(choices)
    if found is None or not 0 < len(found[0]) <= len(CHOICE_LETTERS):
        return None
    labels, texts = found
    if text in labels:
        return CHOICE_LETTERS[labels.index(text)]
    if text.isdigit() and not isinstance(value, bool) and int(text) < len(labels):  # a 0-based index
        return CHOICE_LETTERS[int(text)]
    lowered = [t.strip().lower() for t in texts]
    return CHOICE_LETTERS[lowered.index(text.lower())] if text.lower() in lowered else None


def _with_choices(question: str, choices: Any) -> str:
    """The question with its choices, as the paper's multiple-choice prompts give them."""
    found = _choice_list(choices)
    if found is None:
        return question
    listed = ", ".join(f"({letter}) {text}" for letter, text in zip(CHOICE_LETTERS, found[1]))
    return f"{question} Answer choices: {listed}."


class HubSplitReader:
    """One split of a Hugging Face dataset (a ``save_to_disk`` folder or a hub name), streamed as
    Examples by calling it; every call is one pass over its memory-mapped table.

    A field the rows do not have is a DataError. A row whose gold cannot be read (:func:`read_gold`:
    absent, not of the task's kind, more than a number where a number is wanted, no ``####`` under
    the gsm8k convention, not one of the choices) or whose question is empty is skipped and counted
    in ``unparsed``, never guessed; a split where no row can be read is a DataError that says what
    to set. Sources are ``{dataset}[{split}]:row N``."""

    def __init__(self, dataset: str, split: str, kind: AnswerKind, fields: QAFields = QAFields(),
                 name: str | None = None, revision: str | None = None, data_files: Any = None):
        self.dataset, self.split, self.kind, self.fields = dataset, split, AnswerKind(kind), fields
        self.name, self.revision, self.data_files = name, revision, data_files
        self.unparsed: Counter[str] = Counter()

    def _table(self) -> Any:
        try:
            table = _open_hf_dataset(self.dataset, self.split, self.name, self.revision, self.data_files)
        except DataError:
            raise
        except Exception as error:  # datasets raises many unrelated types; all mean "cannot load"
            raise DataError(
                f"{self.dataset}: cannot load dataset split {self.split!r} ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else 'no details'})"
            ) from error
        columns = list(getattr(table, "column_names", None) or [])
        missing = [field for field in self.fields.required() if columns and field not in columns]
        if missing:
            raise DataError(f"{self.dataset}[{self.split}]:row 1: field {missing[0]!r} is missing (its columns: "
                            f"{', '.join(columns)})")
        return table

    def __call__(self) -> Iterator[Example]:
        table = self._table()
        self.unparsed = Counter()
        count, first_bad = 0, None
        for number, row in enumerate(table, start=1):
            locator = f"{self.dataset}[{self.split}]:row {number}"
            count += 1
            question = str(row.get(self.fields.question) or "").strip()
            gold, carried = read_gold(row, self.kind, self.fields)
            if not question:
                self.unparsed["empty question"] += 1
                continue
            if gold is None:
                self.unparsed["gold not readable"] += 1
                first_bad = first_bad or (locator, row.get(self.fields.answer))
                continue
            if self.fields.choices:
                question = _with_choices(question, row.get(self.fields.choices))
            rationale = (_optional_field_text(row, self.fields.rationale, locator)
                         if self.fields.rationale and self.fields.rationale != self.fields.answer else carried)
            yield Example(question, gold, rationale, locator)
        if not count:
            raise DataError(f"{self.dataset}: split {self.split!r} has no rows")
        if first_bad and self.unparsed["gold not readable"] + self.unparsed["empty question"] == count:
            raise DataError(
                f"{first_bad[0]}: field {self.fields.answer!r}: no row's gold reads as a {self.kind.value} answer "
                f"(first: {str(first_bad[1])[:MAX_QUOTED_CHARS]!r}); say how to take it out of the field: "
                "answer_convention: gsm8k (the number after ####), answer_regex, or choices_field")
        if first_bad:
            log.warning("%s[%s]: %d of %d rows skipped, their gold not readable as a %s answer (first: %s %r)",
                        self.dataset, self.split, self.unparsed["gold not readable"], count, self.kind.value,
                        first_bad[0], str(first_bad[1])[:MAX_QUOTED_CHARS])
