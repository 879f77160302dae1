"""Seeded procedural tasks with exact gold answers and scripted rationales.

Four families, built the way the originals were: Kojima et al.'s coin flip and last-letter
concatenation, BIG-bench's tracking shuffled objects (three people, balls) and MultiArith-style
multi-step word problems. Each example's rationale is short, correct and deterministic from the
instance; it carries no ``-->``/``END`` markers (the training target adds them).
"""
from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Callable

from modecotd.errors import UserError
from modecotd.tasks.schema import AnswerKind, Example

FAMILIES: dict[str, AnswerKind] = {
    "coin_flip": AnswerKind.YES_NO,
    "last_letter_concatenation": AnswerKind.TEXT,
    "tracking_shuffled_objects": AnswerKind.CHOICE,
    "arithmetic": AnswerKind.NUMBER,
    "arithmetic_comparison": AnswerKind.YES_NO,
}

DEFAULT_SIZES: dict[str, int] = {
    "coin_flip": 4,
    "last_letter_concatenation": 4,
    "tracking_shuffled_objects": 3,
    "arithmetic": 2,
    "arithmetic_comparison": 2,
}
"""Default ``size`` per family: people, words, swaps, steps."""

SIZE_RANGES: dict[str, tuple[int, int]] = {
    "coin_flip": (1, 8),
    "last_letter_concatenation": (1, 8),
    "tracking_shuffled_objects": (1, 6),
    "arithmetic": (1, 3),
    "arithmetic_comparison": (1, 3),
}
"""Inclusive allowed range of ``size`` per family."""

SPLITS = ("train", "fewshot", "test")

FLIP_PROBABILITY = 0.5
MAX_ATTEMPTS_PER_EXAMPLE = 50
"""Draws allowed per requested example before giving up on finding unique questions."""
MIN_ATTEMPTS = 1000

NAMES = (
    "Whitney", "Erika", "Tj", "Benito", "Elise", "Lupe", "Renee", "Noemi", "Colton", "Dexter",
    "Katy", "Brayden", "Beatriz", "Gillian", "Coco", "Vivian", "Lucky", "Mireya", "Jj", "Kc",
    "Caleb", "Chase", "Eleazar", "Chanel", "Myriam", "Cecy", "Faisal", "Svetlana", "Jamie",
    "Jose", "Ariel", "Rosalind", "Omar", "Priya", "Hugo", "Ingrid", "Mateo", "Yusuf", "Zara",
    "Felix", "Greta", "Idris", "Juliet", "Kamal", "Leif", "Marisol", "Nadia", "Otis", "Paloma",
    "Quinn", "Rafael", "Sunny", "Tobias", "Ulrich", "Wendy", "Xavier", "Yolanda", "Ezekiel",
    "Dominik", "Beth",
)
"""Varied first names with varied last letters (coin flip, last letter)."""

PLAYERS = ("Alice", "Bob", "Claire")
COLOURS = (
    "red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "brown",
)
CHOICE_LETTERS = "ABCDEF"

# --------------------------------------------------------------------------- coin flip


def _coin_flip(rng: random.Random, size: int, twin: bool = False) -> tuple[str, str, str]:
    """One coin-flip instance: question, rationale, answer ("yes" iff an even number of flips).
    Its ``twin`` asks the same (is the state unchanged after the toggles?) of a lamp's switch."""
    people = rng.sample(NAMES, size)
    state = True
    words = _LAMP if twin else _COIN
    sentences = [words["start"]]
    lines = []
    for person in people:
        if rng.random() < FLIP_PROBABILITY:
            state = not state
            sentences.append(words["act"].format(person=person))
            lines.append(words["acted"].format(person=person, state=words["states"][state]))
        else:
            sentences.append(words["skip"].format(person=person))
            lines.append(words["skipped"].format(person=person, state=words["states"][state]))
    sentences.append(words["ask"])
    lines.append(words["end"].format(state=words["states"][state]))
    return " ".join(sentences), "\n".join(lines), "yes" if state else "no"


_COIN = {"start": "A coin is heads up.", "act": "{person} flips the coin.", "skip": "{person} does not flip the coin.",
         "acted": "{person} flips the coin, so the coin is now {state} up.",
         "skipped": "{person} does not flip the coin, so the coin is still {state} up.",
         "ask": 'Is the coin still heads up? Note that "flip" here means "reverse".', "end": "So the coin is {state} up.",
         "states": {True: "heads", False: "tails"}}
_LAMP = {"start": "A lamp is switched on.", "act": "{person} presses the lamp's switch.",
         "skip": "{person} leaves the switch alone.",
         "acted": "{person} presses the switch, so the lamp is now {state}.",
         "skipped": "{person} leaves the switch alone, so the lamp is still {state}.",
         "ask": "Is the lamp still on? Each press turns it from on to off or from off to on.",
         "end": "So the lamp is {state}.", "states": {True: "on", False: "off"}}


# --------------------------------------------------------------------------- last letter


def _last_letter(rng: random.Random, size: int, twin: bool = False) -> tuple[str, str, str]:
    """One last-letter instance: question, rationale, answer (lower-case concatenation). Its
    ``twin`` asks for the same letters in other words."""
    words = rng.sample(NAMES, size)
    letters = [word[-1] for word in words]
    answer = "".join(letters).lower()
    if twin:
        question = f'Write down the final character of every word in "{" ".join(words)}" and join them together.'
        lines = [f'"{word}" ends with "{letter}".' for word, letter in zip(words, letters)]
        lines.append(f'Joined together they spell "{answer}".')
        return question, "\n".join(lines), answer
    question = (
        f'Take the last letters of each words in "{" ".join(words)}" and concatenate them.'
    )
    lines = [f'The last letter of "{word}" is "{letter}".' for word, letter in zip(words, letters)]
    lines.append(f'Concatenating them gives "{answer}".')
    return question, "\n".join(lines), answer


# --------------------------------------------------------------------------- tracking


def _swap_ordinals(count: int) -> list[str]:
    """First, Then, ..., Finally for ``count`` swaps (just First for one)."""
    if count == 1:
        return ["First"]
    return ["First"] + ["Then"] * (count - 2) + ["Finally"]


def _holdings_sentence(holding: dict[str, str], players: tuple[str, ...] = PLAYERS, thing: str = "ball",
                       has: str = "has") -> str:
    """'Alice has the blue ball, Bob has ..., Claire has ...'."""
    return ", ".join(f"{player} {has} the {holding[player]} {thing}" for player in players)


TWIN_PLAYERS = ("Dana", "Ravi", "Tomas")


def _tracking(rng: random.Random, size: int, twin: bool = False) -> tuple[str, str, str]:
    """One tracking-shuffled-objects instance with ``size`` swaps: question, rationale, letter.
    Its ``twin`` tracks books passed between three readers, told in other words."""
    players, thing, has = (TWIN_PLAYERS, "book", "holds") if twin else (PLAYERS, "ball", "has")
    colours = rng.sample(COLOURS, len(players))
    holding = dict(zip(players, colours))
    start = ", ".join(f"{player} {has} a {holding[player]} {thing}" for player in players[:-1])
    start += f", and {players[-1]} {has} a {holding[players[-1]]} {thing}"
    swap_sentences = []
    lines = []
    for ordinal in _swap_ordinals(size):
        first, second = rng.sample(players, 2)
        holding[first], holding[second] = holding[second], holding[first]
        if twin:
            swap_sentences.append(f"{ordinal}, {first} and {second} exchange their books.")
            lines.append(f"Once {first} and {second} exchange: {_holdings_sentence(holding, players, thing, has)}.")
        else:
            swap_sentences.append(f"{ordinal}, {first} and {second} swap balls.")
            lines.append(f"After {first} and {second} swap: {_holdings_sentence(holding)}.")
    target = rng.choice(players)
    letter = CHOICE_LETTERS[colours.index(holding[target])]
    choices = ", ".join(
        f"({CHOICE_LETTERS[i]}) {colour} {thing}" for i, colour in enumerate(colours)
    )
    if twin:
        question = (
            f"{', '.join(players[:-1])}, and {players[-1]} sit in a reading club. Each of them starts with one "
            f"book: {start}. During the evening some of them exchange books. {' '.join(swap_sentences)} Which "
            f"book does {target} hold when the evening ends? Answer choices: {choices}."
        )
        lines.append(f"So {target} holds the {holding[target]} book, which is choice ({letter}).")
        return question, "\n".join(lines), letter
    question = (
        f"{', '.join(players[:-1])}, and {players[-1]} are playing a game. At the start of the "
        f"game, they are each holding a ball: {start}. As the game progresses, pairs of players "
        f"trade balls. {' '.join(swap_sentences)} At the end of the game, {target} has the "
        f"Answer choices: {choices}."
    )
    lines.append(f"So {target} has the {holding[target]} ball, which is choice ({letter}).")
    return question, "\n".join(lines), letter


# --------------------------------------------------------------------------- arithmetic

MAX_VALUE = 100
"""Every intermediate result of an arithmetic problem stays within 0..MAX_VALUE."""
START_RANGE = (2, 30)
MAX_ADDEND = 20
MAX_FACTOR = 4
MIN_FACTOR = 2

PEOPLE = (
    ("Tom", "he", "his"), ("Maria", "she", "her"), ("Sam", "he", "his"), ("Lena", "she", "her"),
    ("Omar", "he", "his"), ("Priya", "she", "her"), ("Jack", "he", "his"), ("Nina", "she", "her"),
    ("Diego", "he", "his"), ("Grace", "she", "her"), ("Ken", "he", "his"), ("Ava", "she", "her"),
)


@dataclass(frozen=True)
class _Template:
    """Phrasings of one word-problem story; ``{a}``/``{k}``/``{r}`` are operand, step, result."""

    items: tuple[str, ...]
    start_q: str
    start_r: str
    add_q: str
    add_r: str
    sub_q: str
    sub_r: str
    mul_q: str
    mul_r: str
    ask: str


TEMPLATES = (
    _Template(
        items=("apples", "oranges", "pears", "plums"),
        start_q="{name} has {start} {item}.",
        start_r="{name} starts with {start} {item}.",
        add_q="{Pron} buys {k} more {item}.",
        add_r="{Pron} buys {k} more: {a} + {k} = {r}.",
        sub_q="{Pron} gives away {k} {item}.",
        sub_r="{Pron} gives away {k}: {a} - {k} = {r}.",
        mul_q="{Pron} ends up with {k} times as many {item} as {pron} had.",
        mul_r="{Pron} ends up with {k} times as many: {a} * {k} = {r}.",
        ask="How many {item} does {name} have now?",
    ),
    _Template(
        items=("stickers", "marbles", "stamps", "baseball cards"),
        start_q="{name} collects {item} and has {start} of them.",
        start_r="{name} has {start} {item} at first.",
        add_q="{Pron} finds {k} more {item}.",
        add_r="{Pron} finds {k} more: {a} + {k} = {r}.",
        sub_q="{Pron} loses {k} {item}.",
        sub_r="{Pron} loses {k}: {a} - {k} = {r}.",
        mul_q="{Poss} collection grows to {k} times its size.",
        mul_r="The collection grows {k} times: {a} * {k} = {r}.",
        ask="How many {item} does {name} have now?",
    ),
    _Template(
        items=("crayons", "pencils", "buttons", "cookies"),
        start_q="A box holds {start} {item}.",
        start_r="The box starts with {start} {item}.",
        add_q="{name} puts {k} more {item} in the box.",
        add_r="{name} puts in {k} more: {a} + {k} = {r}.",
        sub_q="{name} takes {k} {item} out of the box.",
        sub_r="{name} takes out {k}: {a} - {k} = {r}.",
        mul_q="{name} refills the box until it holds {k} times as many {item}.",
        mul_r="The box now holds {k} times as many: {a} * {k} = {r}.",
        ask="How many {item} are in the box now?",
    ),
    _Template(
        items=("passengers",),
        start_q="A bus has {start} {item} on board.",
        start_r="The bus starts with {start} {item}.",
        add_q="At a stop, {k} people get on.",
        add_r="{k} people get on: {a} + {k} = {r}.",
        sub_q="At a stop, {k} people get off.",
        sub_r="{k} people get off: {a} - {k} = {r}.",
        mul_q="The number of {item} becomes {k} times as large.",
        mul_r="The number becomes {k} times as large: {a} * {k} = {r}.",
        ask="How many {item} are on the bus now?",
    ),
    _Template(
        items=("dollars",),
        start_q="{name} has {start} {item}.",
        start_r="{name} starts with {start} {item}.",
        add_q="{Pron} earns {k} {item} by washing cars.",
        add_r="{Pron} earns {k}: {a} + {k} = {r}.",
        sub_q="{Pron} spends {k} {item} on lunch.",
        sub_r="{Pron} spends {k}: {a} - {k} = {r}.",
        mul_q="{Pron} invests the money and ends up with {k} times as much.",
        mul_r="The money grows {k} times: {a} * {k} = {r}.",
        ask="How many {item} does {name} have now?",
    ),
    _Template(
        items=("roses", "tulips", "daisies"),
        start_q="There are {start} {item} in {name}'s garden.",
        start_r="The garden starts with {start} {item}.",
        add_q="{name} plants {k} more {item}.",
        add_r="{name} plants {k} more: {a} + {k} = {r}.",
        sub_q="{name} picks {k} {item} for a bouquet.",
        sub_r="{name} picks {k}: {a} - {k} = {r}.",
        mul_q="{name} plants more until there are {k} times as many {item}.",
        mul_r="There are now {k} times as many: {a} * {k} = {r}.",
        ask="How many {item} are in the garden now?",
    ),
)


TWIN_TEMPLATES = (  # the same arithmetic told as other stories, for the twin wording
    _Template(
        items=("books", "magazines"),
        start_q="A library owns {start} {item}.",
        start_r="The library owns {start} {item} at first.",
        add_q="It receives {k} more {item} as a gift.",
        add_r="It receives {k}: {a} + {k} = {r}.",
        sub_q="Readers borrow {k} {item} and never return them.",
        sub_r="{k} are never returned: {a} - {k} = {r}.",
        mul_q="After a donation drive it owns {k} times as many {item}.",
        mul_r="It now owns {k} times as many: {a} * {k} = {r}.",
        ask="How many {item} does the library own now?",
    ),
    _Template(
        items=("cars",),
        start_q="A parking lot holds {start} {item} in the morning.",
        start_r="The lot holds {start} {item} in the morning.",
        add_q="Then {k} more {item} drive in.",
        add_r="{k} drive in: {a} + {k} = {r}.",
        sub_q="Then {k} {item} drive away.",
        sub_r="{k} drive away: {a} - {k} = {r}.",
        mul_q="By noon the lot holds {k} times as many {item}.",
        mul_r="It holds {k} times as many: {a} * {k} = {r}.",
        ask="How many {item} are in the parking lot now?",
    ),
    _Template(
        items=("coins",),
        start_q="{name} keeps {start} {item} in a jar.",
        start_r="The jar holds {start} {item} at first.",
        add_q="{Pron} drops {k} more {item} into it.",
        add_r="{Pron} drops in {k}: {a} + {k} = {r}.",
        sub_q="{Pron} takes {k} {item} out to buy a snack.",
        sub_r="{Pron} takes out {k}: {a} - {k} = {r}.",
        mul_q="{Pron} saves until the jar holds {k} times as many {item}.",
        mul_r="The jar holds {k} times as many: {a} * {k} = {r}.",
        ask="How many {item} are in the jar now?",
    ),
    _Template(
        items=("apple trees", "cherry trees"),
        start_q="{name}'s orchard has {start} {item}.",
        start_r="The orchard has {start} {item} at first.",
        add_q="{Pron} adds {k} young {item}.",
        add_r="{Pron} adds {k}: {a} + {k} = {r}.",
        sub_q="A storm knocks down {k} {item}.",
        sub_r="The storm takes {k}: {a} - {k} = {r}.",
        mul_q="Over the years the orchard grows to {k} times as many {item}.",
        mul_r="It grows {k} times: {a} * {k} = {r}.",
        ask="How many {item} are in the orchard now?",
    ),
)


def _feasible_steps(value: int) -> dict[str, Callable[[random.Random], int]]:
    """Operations keeping the result in 0..MAX_VALUE from ``value``, each with an operand draw."""
    steps: dict[str, Callable[[random.Random], int]] = {}
    if value < MAX_VALUE:
        steps["add"] = lambda rng: rng.randint(1, min(MAX_ADDEND, MAX_VALUE - value))
    if value >= 2:
        steps["sub"] = lambda rng: rng.randint(1, min(MAX_ADDEND, value - 1))
    if value * MIN_FACTOR <= MAX_VALUE:
        steps["mul"] = lambda rng: rng.randint(MIN_FACTOR, min(MAX_FACTOR, MAX_VALUE // value))
    return steps


def _apply(operation: str, value: int, operand: int) -> int:
    """Result of one arithmetic step."""
    if operation == "add":
        return value + operand
    if operation == "sub":
        return value - operand
    return value * operand


def _arithmetic(rng: random.Random, size: int, twin: bool = False) -> tuple[str, str, str]:
    """One word problem of ``size`` steps: question, rationale (one equation a step), answer. Its
    ``twin`` tells other stories (:data:`TWIN_TEMPLATES`)."""
    sentences, lines, value, template, fields = _story(rng, size, twin)
    sentences.append(template.ask.format(**fields))
    return " ".join(sentences), "\n".join(lines), str(value)


COMPARISON_MARGIN = (1, 10)
"""How far the threshold of a comparison question lies from the true result."""


def _arithmetic_comparison(rng: random.Random, size: int, twin: bool = False) -> tuple[str, str, str]:
    """A word problem of ``size`` steps that asks a yes/no question about its result (is it more
    than a threshold?): the arithmetic family's skill with the coin flip's kind of answer. Yes and
    no are equally likely; the threshold is never the result itself."""
    sentences, lines, value, _, fields = _story(rng, size, twin)
    threshold = max(0, value + rng.choice((-1, 1)) * rng.randint(*COMPARISON_MARGIN))
    if threshold == value:
        threshold = value + 1
    more = value > threshold
    if twin:
        sentences.append(f"Are there now more than {threshold} {fields['item']}?")
        lines.append(f"{value} is {'above' if more else 'not above'} {threshold}.")
    else:
        sentences.append(f"Is the number of {fields['item']} now more than {threshold}?")
        lines.append(f"{value} is {'more' if more else 'not more'} than {threshold}.")
    return " ".join(sentences), "\n".join(lines), "yes" if more else "no"


def _story(rng: random.Random, size: int, twin: bool = False):
    """The shared part of the arithmetic families: question sentences, rationale lines, the
    result, the template and its fields."""
    template = rng.choice(TEMPLATES)
    name, pronoun, possessive = rng.choice(PEOPLE)
    fields = {
        "name": name, "pron": pronoun, "Pron": pronoun.capitalize(),
        "Poss": possessive.capitalize(),
        "item": rng.choice(template.items),
    }
    if twin:  # the original's draws, told as the twin story in the same place: the same instances
        told = TWIN_TEMPLATES[TEMPLATES.index(template) % len(TWIN_TEMPLATES)]
        fields["item"] = told.items[template.items.index(fields["item"]) % len(told.items)]
        template = told
    value = rng.randint(*START_RANGE)
    sentences = [template.start_q.format(start=value, **fields)]
    lines = [template.start_r.format(start=value, **fields)]
    for _ in range(size):
        steps = _feasible_steps(value)
        operation = rng.choice(sorted(steps))
        operand = steps[operation](rng)
        result = _apply(operation, value, operand)
        numbers = {"a": value, "k": operand, "r": result}
        sentences.append(getattr(template, f"{operation}_q").format(**numbers, **fields))
        lines.append(getattr(template, f"{operation}_r").format(**numbers, **fields))
        value = result
    return sentences, lines, value, template, fields


# --------------------------------------------------------------------------- public API

WORDINGS = ("original", "twin")
"""How a family's questions are told: as the original task, or as its twin, which needs the same skill
(the same steps, the same kind of answer) told in other words: a lamp's switch for the coin, books
passed between readers for the balls, other stories for the arithmetic, other phrasing for the
letters. A twin is a new task for an expert trained on the original (see benchmarks/expert_retrieval.py)."""

_BUILDERS: dict[str, Callable[[random.Random, int, bool], tuple[str, str, str]]] = {
    "coin_flip": _coin_flip,
    "last_letter_concatenation": _last_letter,
    "tracking_shuffled_objects": _tracking,
    "arithmetic": _arithmetic,
    "arithmetic_comparison": _arithmetic_comparison,
}


def _space_size(family: str, size: int) -> int | None:
    """How many distinct questions the family can produce at ``size``; None if not counted."""
    if family == "coin_flip":
        return math.perm(len(NAMES), size) * 2**size
    if family == "last_letter_concatenation":
        return math.perm(len(NAMES), size)
    if family == "tracking_shuffled_objects":
        ordered_pairs = math.perm(len(PLAYERS), 2)
        return math.perm(len(COLOURS), len(PLAYERS)) * ordered_pairs**size * len(PLAYERS)
    return None


def _check_request(family: str, n: int, size: int | None) -> int:
    """Validate family, n and size; return the size to use."""
    if family not in FAMILIES:
        raise UserError(
            f"unknown generator family {family!r}; allowed: {', '.join(sorted(FAMILIES))}"
        )
    if n < 0:
        raise UserError(f"number of examples must be >= 0, got {n}")
    low, high = SIZE_RANGES[family]
    chosen = DEFAULT_SIZES[family] if size is None else size
    if not low <= chosen <= high:
        raise UserError(
            f"size {chosen} out of range for {family!r}; allowed: {low} to {high}"
        )
    space = _space_size(family, chosen)
    if space is not None and n > space:
        raise UserError(
            f"cannot generate {n} distinct {family!r} questions at size {chosen}: "
            f"only {space} exist"
        )
    return chosen


def generate(family: str, n: int, seed: int, size: int | None = None, wording: str = "original") -> list[Example]:
    """``n`` distinct examples of ``family``, deterministic for ``seed``.

    ``size`` is the number of people (coin_flip, 1-8, default 4), words (last-letter, 1-8,
    default 4), swaps (tracking, 1-6, default 3) or steps (arithmetic, 1-3, default 2).
    Raises UserError on an unknown family, a size out of range or too small a question space.
    """
    return list(stream(family, n, seed, size, wording))


def stream(family: str, n: int, seed: int, size: int | None = None, wording: str = "original") -> Iterator[Example]:
    """The examples of :func:`generate`, one at a time: only an 8-byte digest of each question is
    kept (to keep them distinct), so that a large train split is never held in memory."""
    chosen = _check_request(family, n, size)
    if wording not in WORDINGS:
        raise UserError(f"unknown wording {wording!r}; allowed: {', '.join(WORDINGS)}")
    build, twin = _BUILDERS[family], wording == "twin"
    rng = random.Random(seed)
    made = 0
    seen: set[int] = set()
    attempts_left = max(MIN_ATTEMPTS, MAX_ATTEMPTS_PER_EXAMPLE * n)
    while made < n:
        if attempts_left == 0:
            raise UserError(
                f"could not find {n} distinct {family!r} questions at size {chosen}; "
                f"ask for fewer or a larger size"
            )
        attempts_left -= 1
        question, rationale, answer = build(rng, chosen, twin)
        digest = int.from_bytes(hashlib.blake2b(question.encode(), digest_size=8).digest(), "big")
        if digest in seen:
            continue
        seen.add(digest)
        yield Example(question, answer, rationale, f"generator:{family}{'' if not twin else ':twin'}:{seed}:{made}")
        made += 1


def generate_splits(
    family: str, sizes: dict[str, int], seed: int, size: int | None = None, wording: str = "original"
) -> dict[str, list[Example]]:
    """Disjoint train/fewshot/test splits of ``family`` drawn from one pool (train first).

    ``sizes`` maps split names (train, fewshot, test) to counts; a missing split gets 0.
    """
    train, fewshot, test = streamed_splits(family, sizes, seed, size, wording)
    return {"train": list(train()), "fewshot": fewshot, "test": test}


def streamed_splits(family: str, sizes: dict[str, int], seed: int, size: int | None = None, wording: str = "original"
                    ) -> tuple[Callable[[], Iterator[Example]], list[Example], list[Example]]:
    """The splits of :func:`generate_splits` as (a function that streams the train split anew on
    every call, the few-shot list, the test list): the train split is never held whole."""
    unknown = sorted(set(sizes) - set(SPLITS))
    if unknown:
        raise UserError(f"unknown split(s) {', '.join(unknown)}; allowed: {', '.join(SPLITS)}")
    counts = {split: sizes.get(split, 0) for split in SPLITS}
    negative = [split for split, count in counts.items() if count < 0]
    if negative:
        raise UserError(f"split size must be >= 0 for {', '.join(negative)}")
    total = sum(counts.values())
    pool = stream(family, total, seed, size, wording)
    for _ in islice(pool, counts["train"]):  # past the train split, to the others
        pass
    fewshot = list(islice(pool, counts["fewshot"]))
    test = list(islice(pool, counts["test"]))

    def train() -> Iterator[Example]:
        return islice(stream(family, total, seed, size, wording), counts["train"])

    return train, fewshot, test
