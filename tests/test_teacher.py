"""Teacher backends and the correctness filter."""
from __future__ import annotations

from modecotd.tasks.generators import generate
from modecotd.tasks.schema import AnswerKind, Example
from modecotd.teacher import Candidate, PrecomputedTeacher, ScriptedTeacher, TransformersTeacher, label_candidates

EXAMPLE = Example(question="What is 2 + 3?", answer="5", source="t:1")


def test_filter_keeps_correct_distinct_rationales_and_says_why_others_go():
    candidates = [[
        Candidate("2 + 3 = 5.", "5"),
        Candidate("2 + 3 = 6.", "6"),
        Candidate("I am not sure.", None),
        Candidate("2 + 3 = 5.", "5"),  # same text again
        Candidate("", "5"),
        Candidate("Two plus three is five.", "5.0"),  # same number, other spelling
        Candidate("x", None, error="prompt too long"),
    ]]
    accepted, rejected = label_candidates([EXAMPLE], candidates, AnswerKind.NUMBER)
    assert [r["rationale"] for r in accepted] == ["2 + 3 = 5.", "Two plus three is five."]
    assert [r["reason"] for r in rejected] == ["wrong answer", "no answer found", "duplicate rationale",
                                               "empty rationale", "prompt too long"]
    assert all(r["source"] == "t:1" for r in accepted + rejected)


def test_scripted_teacher_gives_the_generator_solution():
    examples = generate("coin_flip", 5, seed=3)
    candidates = ScriptedTeacher().candidates(examples, AnswerKind.YES_NO)
    accepted, rejected = label_candidates(examples, candidates, AnswerKind.YES_NO)
    assert len(accepted) == 5 and not rejected


def test_precomputed_teacher_rejects_rows_without_rationale():
    examples = [Example("q1", "yes", "Because.", "f:1"), Example("q2", "no", None, "f:2")]
    accepted, rejected = label_candidates(examples, PrecomputedTeacher().candidates(examples, AnswerKind.YES_NO),
                                          AnswerKind.YES_NO)
    assert [r["question"] for r in accepted] == ["q1"]
    assert rejected[0]["reason"] == "the train row has no rationale"


def test_transformers_teacher_samples_k_rationales_per_question(tiny_model_dir):
    teacher = TransformersTeacher(tiny_model_dir, dtype="fp32", samples=3, temperature=0.7, max_new_tokens=6,
                                  batch_size=2, seed=0)
    examples = [EXAMPLE, Example("What is 1 + 1?", "2", source="t:2"), Example("What is 9 - 4?", "5", source="t:3")]
    candidates = teacher.candidates(examples, AnswerKind.NUMBER)
    assert [len(c) for c in candidates] == [3, 3, 3]
    accepted, rejected = label_candidates(examples, candidates, AnswerKind.NUMBER)
    assert len(accepted) + len(rejected) == 9  # every sample is accounted for
    assert all(r["reason"] for r in rejected)
