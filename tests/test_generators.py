"""Procedural task generators: determinism, disjoint splits and independently checked answers."""
from __future__ import annotations

import re

import pytest

from modecotd.errors import UserError
from modecotd.tasks.answers import extract_answer, has_answer_format
from modecotd.tasks.generators import FAMILIES, MAX_VALUE, generate, generate_splits
from modecotd.tasks.schema import AnswerKind, Example

SAMPLES = 60
BALANCE_SAMPLES = 400
BALANCE_RANGE = (0.35, 0.65)

COIN_PERSON = re.compile(r"(\w+) (flips|does not flip) the coin\.")
LAST_LETTER_WORDS = re.compile(r'words in "([^"]+)"')
TRACKING_START = re.compile(r"(Alice|Bob|Claire) has a (\w+) ball")
TRACKING_SWAP = re.compile(r"(?:First|Then|Finally), (\w+) and (\w+) swap balls\.")
TRACKING_TARGET = re.compile(r"At the end of the game, (\w+) has the Answer choices: (.*)\.$")
TRACKING_CHOICE = re.compile(r"\(([A-F])\) (\w+) ball")
EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
FIRST_NUMBER = re.compile(r"\d+")


# --------------------------------------------------------------------------- independent solvers


def solve_coin_flip(question: str) -> str:
    """Heads up iff an even number of people flip."""
    flips = sum(1 for _, verb in COIN_PERSON.findall(question) if verb == "flips")
    return "yes" if flips % 2 == 0 else "no"


def solve_last_letter(question: str) -> str:
    """Concatenate the words' last letters."""
    match = LAST_LETTER_WORDS.search(question)
    assert match, question
    return "".join(word[-1] for word in match.group(1).split()).lower()


def solve_tracking(question: str) -> str:
    """Replay the swaps and look the target's ball up among the choices."""
    holding = dict(TRACKING_START.findall(question))
    assert len(holding) == 3, question
    for first, second in TRACKING_SWAP.findall(question):
        holding[first], holding[second] = holding[second], holding[first]
    target = TRACKING_TARGET.search(question)
    assert target, question
    choices = {colour: letter for letter, colour in TRACKING_CHOICE.findall(target.group(2))}
    return choices[holding[target.group(1)]]


def check_arithmetic(example: Example) -> str:
    """Re-evaluate every equation of the rationale, check they chain, return the final value."""
    equations = EQUATION.findall(example.rationale or "")
    assert equations, example.rationale
    value = int(FIRST_NUMBER.search(example.question).group())
    for left, operator, right, result in equations:
        left_value, right_value, result_value = int(left), int(right), int(result)
        assert left_value == value, example
        expected = {
            "+": left_value + right_value,
            "-": left_value - right_value,
            "*": left_value * right_value,
        }[operator]
        assert result_value == expected, example
        assert 0 <= result_value <= MAX_VALUE, example
        assert right in example.question, example
        value = result_value
    return str(value)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_deterministic_for_a_seed_and_different_across_seeds(family: str) -> None:
    first = generate(family, SAMPLES, seed=7)
    assert first == generate(family, SAMPLES, seed=7)
    other = generate(family, SAMPLES, seed=8)
    assert [e.question for e in first] != [e.question for e in other]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_questions_unique_and_sources_named(family: str) -> None:
    examples = generate(family, SAMPLES, seed=3)
    assert len(examples) == SAMPLES
    assert len({e.question for e in examples}) == SAMPLES
    assert [e.source for e in examples] == [
        f"generator:{family}:3:{index}" for index in range(SAMPLES)
    ]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_splits_are_disjoint_and_sized(family: str) -> None:
    sizes = {"train": 40, "fewshot": 5, "test": 20}
    splits = generate_splits(family, sizes, seed=11)
    assert {split: len(examples) for split, examples in splits.items()} == sizes
    questions = [{e.question for e in examples} for examples in splits.values()]
    assert not questions[0] & questions[1]
    assert not questions[0] & questions[2]
    assert not questions[1] & questions[2]
    assert generate_splits(family, sizes, seed=11) == splits


def test_splits_may_be_empty() -> None:
    splits = generate_splits("coin_flip", {"train": 0, "fewshot": 5, "test": 0}, seed=1)
    assert [len(splits[name]) for name in ("train", "fewshot", "test")] == [0, 5, 0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rationale_plus_marker_round_trips(family: str) -> None:
    kind = FAMILIES[family]
    for example in generate(family, SAMPLES, seed=5):
        assert example.rationale and "-->" not in example.rationale
        assert "END" not in example.rationale
        target = f"{example.rationale}\n\n-->\n\n{example.answer} END"
        assert has_answer_format(target)
        assert extract_answer(target, kind) == example.answer


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_coin_flip_answers_recomputed(size: int) -> None:
    for example in generate("coin_flip", SAMPLES, seed=size, size=size):
        assert len(COIN_PERSON.findall(example.question)) == size
        assert example.answer == solve_coin_flip(example.question)
        assert example.question.startswith("A coin is heads up. ")
        assert example.question.endswith(
            'Is the coin still heads up? Note that "flip" here means "reverse".'
        )
        final = "heads" if example.answer == "yes" else "tails"
        assert example.rationale.splitlines()[-1] == f"So the coin is {final} up."
        assert len(example.rationale.splitlines()) == size + 1


def test_coin_flip_yes_no_balanced() -> None:
    examples = generate("coin_flip", BALANCE_SAMPLES, seed=2024)
    share_yes = sum(e.answer == "yes" for e in examples) / len(examples)
    assert BALANCE_RANGE[0] <= share_yes <= BALANCE_RANGE[1]


@pytest.mark.parametrize("size", [1, 4, 8])
def test_last_letter_answers_recomputed(size: int) -> None:
    for example in generate("last_letter_concatenation", SAMPLES, seed=size, size=size):
        assert example.answer == solve_last_letter(example.question)
        assert len(example.answer) == size
        assert example.rationale.endswith(f'Concatenating them gives "{example.answer}".')


@pytest.mark.parametrize("size", [1, 2, 3, 6])
def test_tracking_answers_recomputed(size: int) -> None:
    for example in generate("tracking_shuffled_objects", SAMPLES, seed=size, size=size):
        assert example.answer in "ABC"
        assert len(TRACKING_SWAP.findall(example.question)) == size
        assert example.answer == solve_tracking(example.question)
        assert example.rationale.endswith(f"which is choice ({example.answer}).")
        assert len(example.rationale.splitlines()) == size + 1


def test_tracking_ordinals() -> None:
    three = generate("tracking_shuffled_objects", 1, seed=0)[0].question
    assert re.search(r"First, .* Then, .* Finally, .* At the end", three)
    five = generate("tracking_shuffled_objects", 1, seed=0, size=5)[0].question
    assert [m.group(0).split(",")[0] for m in re.finditer(r"(First|Then|Finally), ", five)] == [
        "First", "Then", "Then", "Then", "Finally",
    ]


def test_tracking_choices_in_initial_order() -> None:
    for example in generate("tracking_shuffled_objects", SAMPLES, seed=9):
        start = [colour for _, colour in TRACKING_START.findall(example.question)]
        choices = [colour for _, colour in TRACKING_CHOICE.findall(example.question)]
        assert choices == start


@pytest.mark.parametrize("size", [1, 2, 3])
def test_arithmetic_equations_recomputed(size: int) -> None:
    examples = generate("arithmetic", SAMPLES, seed=size, size=size)
    for example in examples:
        assert check_arithmetic(example) == example.answer
        assert len(EQUATION.findall(example.rationale)) == size
    assert len({e.question.split()[0] for e in examples}) >= 5  # varied templates and names


@pytest.mark.parametrize(
    ("family", "size"),
    [
        ("coin_flip", 0),
        ("coin_flip", 9),
        ("last_letter_concatenation", 9),
        ("tracking_shuffled_objects", 7),
        ("arithmetic", 4),
        ("arithmetic", 0),
    ],
)
def test_size_out_of_range_is_a_user_error(family: str, size: int) -> None:
    with pytest.raises(UserError, match="allowed"):
        generate(family, 1, seed=0, size=size)


def test_unknown_family_lists_allowed_ones() -> None:
    with pytest.raises(UserError, match="coin_flip"):
        generate("sudoku", 1, seed=0)


def test_space_too_small_is_a_user_error() -> None:
    # one person: 60 names x flip or not = 120 distinct questions
    assert len(generate("coin_flip", 120, seed=0, size=1)) == 120
    with pytest.raises(UserError, match="distinct"):
        generate("coin_flip", 121, seed=0, size=1)


def test_bad_split_requests() -> None:
    with pytest.raises(UserError, match="valid"):
        generate_splits("coin_flip", {"valid": 3}, seed=0)
    with pytest.raises(UserError, match=">= 0"):
        generate_splits("coin_flip", {"train": -1}, seed=0)


def test_families_and_kinds() -> None:
    assert FAMILIES == {
        "coin_flip": AnswerKind.YES_NO,
        "last_letter_concatenation": AnswerKind.TEXT,
        "tracking_shuffled_objects": AnswerKind.CHOICE,
        "arithmetic": AnswerKind.NUMBER,
        "arithmetic_comparison": AnswerKind.YES_NO,
    }


def test_a_comparison_question_is_the_arithmetic_story_with_a_yes_no_question() -> None:
    """The unseen family of the quickstart: arithmetic's skill, coin flip's kind of answer; yes and
    no about equally often, and the answer follows from the story's result."""
    import re

    from modecotd.tasks.generators import generate

    examples = generate("arithmetic_comparison", 400, seed=5)
    assert 160 <= sum(e.answer == "yes" for e in examples) <= 240
    for example in examples:
        result = int(example.rationale.splitlines()[-2].rsplit("= ", 1)[1].rstrip("."))
        threshold = int(re.search(r"more than (\d+)\?$", example.question).group(1))
        assert threshold != result and example.answer == ("yes" if result > threshold else "no")
        assert example.rationale.endswith(f"than {threshold}.")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_twin_tells_the_same_instances_in_other_words(family):
    """With the same seed the twin asks the same instances (same answers, same number of reasoning
    steps) with no question, and no rationale line, in common with the original."""
    original = generate(family, 30, seed=5, size=2)
    twin = generate(family, 30, seed=5, size=2, wording="twin")
    assert [e.answer for e in twin] == [e.answer for e in original]
    assert [e.rationale.count("\n") for e in twin] == [e.rationale.count("\n") for e in original]
    assert not {e.question for e in twin} & {e.question for e in original}
    original_lines = {line for e in original for line in e.rationale.splitlines()}
    assert not original_lines & {line for e in twin for line in e.rationale.splitlines()}
    assert all(e.source.startswith(f"generator:{family}:twin:") for e in twin)
    with pytest.raises(UserError, match="wording"):
        generate(family, 1, seed=0, wording="paraphrase")
