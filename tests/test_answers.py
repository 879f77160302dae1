"""Answer extraction and scoring: hand-made tables and the paper's released rationales."""
from __future__ import annotations

from pathlib import Path

import pytest

from modecotd.tasks.answers import (
    ANSWER_MARK,
    END_MARK,
    extract_answer,
    extract_teacher_answer,
    has_answer_format,
    is_correct,
    normalize,
    partial_credit,
    reference_extract,
    reference_is_correct,
    score,
)
from modecotd.tasks.loaders import iter_paper_split, read_rows
from modecotd.tasks.paper import PAPER_TASKS, paper_split_path
from modecotd.tasks.schema import AnswerKind

NUMBER = AnswerKind.NUMBER
CHOICE = AnswerKind.CHOICE
YES_NO = AnswerKind.YES_NO
TEXT = AnswerKind.TEXT

PAPER_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mode-cotd"
MIN_AGREEMENT = 0.99
"""Share of a task's rationale rows whose strict extraction must equal the loaded gold."""


def paper_data_dir() -> Path:
    """The shared paper data folder, or skip the test when this checkout has none."""
    if not PAPER_DATA.is_dir():
        pytest.skip(f"shared paper data not found at {PAPER_DATA}")
    return PAPER_DATA


@pytest.mark.parametrize(
    ("answer", "kind", "expected"),
    [
        ("43", NUMBER, "43"),
        ("43.0", NUMBER, "43"),
        ("1,000", NUMBER, "1000"),
        ("$1,000.50", NUMBER, "1000.5"),
        ("3.50", NUMBER, "3.5"),
        ("-7", NUMBER, "-7"),
        ("$-7.25", NUMBER, "-7.25"),
        ("12.", NUMBER, "12"),
        ("about 0.625 pints", NUMBER, "0.625"),
        ("2,125 and then 7", NUMBER, "2125"),
        ("no digits", NUMBER, None),
        ("C", CHOICE, "C"),
        ("(C)", CHOICE, "C"),
        ("C)", CHOICE, "C"),
        ("c", CHOICE, "C"),
        (" (e). ", CHOICE, "E"),
        ("the answer is (C)", CHOICE, "C"),
        ("So the answer is D.", CHOICE, "D"),
        ("(B) 20 minutes", CHOICE, "B"),
        ("a car", CHOICE, None),
        ("G", CHOICE, None),
        ("Yes.", YES_NO, "yes"),
        ("No", YES_NO, "no"),
        ("TRUE", YES_NO, "yes"),
        ("false, because", YES_NO, "no"),
        ("Not sure, but yes", YES_NO, "yes"),
        ("maybe", YES_NO, None),
        ('"yajo".', TEXT, "yajo"),
        ("  Yaea  ", TEXT, "yaea"),
        ("new   york!", TEXT, "new york"),
        ('""', TEXT, None),
    ],
)
def test_normalize(answer: str, kind: AnswerKind, expected: str | None) -> None:
    assert normalize(answer, kind) == expected


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("Some steps.\n\n-->\n\n43.0 END", NUMBER, "43"),
        ("-->\n\n43.0 END", NUMBER, "43"),
        ("steps\n\n-->\n\n$1,000.50 END", NUMBER, "1000.5"),
        ("x --> 7 is wrong\n\n-->\n\n9 END", NUMBER, "9"),
        ("step 1: 5 + 7 = 12, so the answer is 12\nthen 99 more", NUMBER, "12"),
        ("The Answer Is 4.", NUMBER, "4"),
        ("reasoning\n\n-->\n\n(C) END", CHOICE, "C"),
        ("reasoning\n\n-->\n\nC) END trailing", CHOICE, "C"),
        ("so the answer is (B).", CHOICE, "B"),
        ("reasoning\n\n-->\n\nYes. END", YES_NO, "yes"),
        ("reasoning\n\n-->\n\nfalse END", YES_NO, "no"),
        ('reasoning\n\n-->\n\n"Yajo" END', TEXT, "yajo"),
        ("reasoning\n\n-->\n\nnryn", TEXT, "nryn"),
        ("garbage with 12 numbers but no marker", NUMBER, None),
        ("just rambling (C) without a marker", CHOICE, None),
        ("reasoning\n\n-->\n\n END", NUMBER, None),
        ("", YES_NO, None),
    ],
)
def test_extract_answer_strict(text: str, kind: AnswerKind, expected: str | None) -> None:
    assert extract_answer(text, kind) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("r\n\n-->\n\n43 END", True),
        ("-->43 END", True),
        ("r\n\n-->\n\n END", False),
        ("r\n\n-->\n\n43", False),
        ("the answer is 43 END", False),
        ("--> 1 END then --> again", False),
        (f"r {ANSWER_MARK} a {END_MARK}", True),
    ],
)
def test_has_answer_format(text: str, expected: bool) -> None:
    assert has_answer_format(text) is expected


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("5 + 7 = 12. Therefore, the answer is 12.", NUMBER, "12"),
        ("First 3 apples, then 4 more, 7 in total.", NUMBER, "7"),
        ("Therefore, the answer (arabic numerals) is 8.", NUMBER, "8"),
        ("A skylight is in the roof, so (E) is best.", CHOICE, "E"),
        ("Therefore, the answer is (D) 11/29/2002.", CHOICE, "D"),
        ("We can rule out A and B, leaving C", CHOICE, "C"),
        ("It is cold, so yes it freezes; true enough. No doubt.", YES_NO, "no"),
        ("So the answer is yes.", YES_NO, "yes"),
        ('So the final answer would be "nryn".', TEXT, "nryn"),
        ("Some thinking without any phrase", TEXT, None),
        ("r\n\n-->\n\nB END", CHOICE, "B"),
    ],
)
def test_extract_teacher_answer(text: str, kind: AnswerKind, expected: str | None) -> None:
    assert extract_teacher_answer(text, kind) == expected


@pytest.mark.parametrize(
    ("prediction", "gold", "kind", "expected"),
    [
        ("43", "43.0", NUMBER, True),
        ("43.0000001", "43", NUMBER, True),
        ("43.01", "43", NUMBER, False),
        ("12", "2", NUMBER, False),
        (None, "2", NUMBER, False),
        ("c", "C", CHOICE, True),
        ("B", "C", CHOICE, False),
        ("True", "yes", YES_NO, True),
        ("Yajo", "yajo", TEXT, True),
        ("yaj", "yajo", TEXT, False),
    ],
)
def test_is_correct(prediction: str | None, gold: str, kind: AnswerKind, expected: bool) -> None:
    assert is_correct(prediction, gold, kind) is expected


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("r\n\n-->\n\n12 END", NUMBER, "\n\n12 END"),
        ("x --> 7 END\n-->  9 END tail", NUMBER, "  9 END tail"),
        ("r -->  Yes, indeed  ", YES_NO, "yes"),
        ("r --> maybe END", YES_NO, "no"),
        ("I add 3 and 9 to get 12 apples", NUMBER, "12"),
        ("it costs $1,000.", NUMBER, "000."),
        ("from 3 to -4", NUMBER, "-4"),
        ("so it must be option B or maybe D, not x", CHOICE, "D"),
        ("Option (B). END", CHOICE, "D"),
        ("the letters are y, a, j, o, so yajo (Claire)", TEXT, "C"),
        ("it is true, no wait, it is true", YES_NO, "yes"),
        ("Yes, though I cannot be sure", YES_NO, "no"),
        ("YES", YES_NO, "no"),
        ("nothing here", NUMBER, "None"),
        ("nothing here", CHOICE, "None"),
    ],
)
def test_reference_extract(text: str, kind: AnswerKind, expected: str) -> None:
    assert reference_extract(text, kind) == expected


@pytest.mark.parametrize(
    ("text", "gold", "kind", "reference", "strict"),
    [
        # marked answers: the reference keeps everything after the last --> (END included)
        ("r\n\n-->\n\n43 END", "43", NUMBER, True, True),
        ("r\n\n-->\n\n12 END", "2", NUMBER, True, False),  # substring: "2" in "12"
        ("r\n\n-->\n\n43.0 END", "43", NUMBER, True, True),
        ("r\n\n-->\n\n43 END", "43.0", NUMBER, False, True),  # the gold is not normalized
        ("r -->12 END", " 12", NUMBER, False, True),  # nor stripped
        ("r --> 9 END and 7 more", "7", NUMBER, True, False),  # not cut at END
        ("r\n\n-->\n\nA END", "A", CHOICE, True, True),
        ("r\n\n-->\n\nA END", "E", CHOICE, True, False),  # "e" in "end"
        ("r\n\n-->\n\nA END", "D", CHOICE, True, False),  # "d" in "end"
        ("r\n\n-->\n\nA END", "B", CHOICE, False, False),
        ("r\n\n-->\n\nA", "E", CHOICE, False, False),  # no END, no free E
        ("r\n\n-->\n\nyajo END", "yajo", TEXT, True, True),
        ("r\n\n-->\n\nxyajox END", "yajo", TEXT, True, False),
        ("r\n\n-->\n\nyaj END", "yajo", TEXT, False, False),
        ("r\n\n-->\n\nYES END", "yes", YES_NO, True, True),
        ("r\n\n-->\n\nmaybe END", "no", YES_NO, True, False),  # "no" by default
        ("r\n\n-->\n\n END", "no", YES_NO, True, False),
        ("r\n\n-->\n\nNo, that is true END", "no", YES_NO, False, True),  # "true" wins
        ("r\n\n-->\n\nuntrue END", "yes", YES_NO, True, False),  # substring "true"
        # no marker: number fallback, the last raw digit run
        ("I add 3 and 9 to get 12 apples", "12", NUMBER, True, False),
        ("the answer is 12. Check: 12 - 3 = 9", "12", NUMBER, False, True),
        ("the answer is 1,000", "1000", NUMBER, False, True),  # "1,000" read as "000"
        ("So the answer is $5.50", "5.5", NUMBER, True, True),
        ("no numbers at all", "12", NUMBER, False, False),
        # no marker: letter fallback, the last capital A-F anywhere, or "None"
        ("The answer is (B). END", "B", CHOICE, False, True),  # the D of "END" is read
        ("The answer is (B). END", "D", CHOICE, True, False),
        ("the answer is b", "B", CHOICE, False, True),  # lower-case letters are not seen
        ("no letter here", "E", CHOICE, True, False),  # "e" in "None"
        ('So the answer is "yajo".', "yajo", TEXT, False, True),  # text read as a letter
        ("I guess the answer is A", "a", TEXT, True, True),
        ("I guess it is A", "a", TEXT, True, False),
        ("the letters spell none", "one", TEXT, True, False),  # "one" in "None"
        # no marker: yes/no fallback, case-sensitive and without word boundaries
        ("So it is True.", "yes", YES_NO, True, False),
        ("The answer is yes; I cannot say more", "yes", YES_NO, False, True),  # "no" of "cannot"
        ("The answer is YES", "yes", YES_NO, False, True),  # upper case is not seen ...
        ("The answer is YES", "no", YES_NO, True, False),  # ... so it reads as "no"
        ("eyes closed", "yes", YES_NO, True, False),  # "yes" of "eyes"
        ("maybe", "no", YES_NO, True, False),
    ],
)
def test_reference_verdicts_against_strict(
    text: str, gold: str, kind: AnswerKind, reference: bool, strict: bool
) -> None:
    assert reference_is_correct(text, gold, kind) is reference
    assert score(text, gold, kind, mode="reference") is reference
    assert score(text, gold, kind, mode="strict") is strict
    assert score(text, gold, kind) is strict  # strict stays the default


def test_score_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="lenient"):
        score("-->\n\n1 END", "1", NUMBER, mode="lenient")


@pytest.mark.parametrize(
    ("prediction", "gold", "kind", "expected"),
    [
        ("yajo", "yajo", TEXT, 1.0),
        ("yaxo", "yajo", TEXT, 0.75),
        ("ya", "yajo", TEXT, 0.5),
        ("yajoyajo", "yajo", TEXT, 1.0),
        ("ajo", "yajo", TEXT, 0.0),
        ('"YAJ".', "yajo", TEXT, 0.75),
        (None, "yajo", TEXT, 0.0),
        ("12", "12", NUMBER, None),
        ("A", "A", CHOICE, None),
        ("yes", "yes", YES_NO, None),
    ],
)
def test_partial_credit(
    prediction: str | None, gold: str, kind: AnswerKind, expected: float | None
) -> None:
    assert partial_credit(prediction, gold, kind) == expected


# --------------------------------------------------------------------------- over the paper data


def _rationale_files() -> list[tuple[str, str]]:
    """(task, split) pairs whose files carry teacher rationales (coin_flip ships no few-shot file,
    reclor no train file)."""
    return [(task, split) for task in sorted(PAPER_TASKS) for split in ("train", "fewshot")
            if (task, split) not in {("coin_flip", "fewshot"), ("reclor", "train")}]


@pytest.mark.parametrize(("task", "split"), _rationale_files())
def test_strict_extraction_agrees_with_gold_on_paper_rationales(task: str, split: str) -> None:
    path = paper_split_path(paper_data_dir(), task, split)
    assert path is not None, f"{task} has no {split} file"
    kind = PAPER_TASKS[task]
    rows = read_rows(path)
    examples = list(iter_paper_split(path, kind))
    assert len(rows) == len(examples)
    failures = [
        f"{example.source}: extracted {extract_answer(row['output'], kind)!r}, "
        f"gold {example.answer!r}"
        for (_, row), example in zip(rows, examples)
        if extract_answer(row["output"], kind) != example.answer
    ]
    agreement = 1 - len(failures) / len(examples)
    assert agreement >= MIN_AGREEMENT, "\n".join(failures[:20])
    not_reference = [
        example.source
        for (_, row), example in zip(rows, examples)
        if not reference_is_correct(row["output"], example.answer, kind)
    ]
    assert not not_reference, not_reference[:20]
    assert all(has_answer_format(row["output"]) for _, row in rows)
    assert all(example.rationale for example in examples)
