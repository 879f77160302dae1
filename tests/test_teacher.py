"""Teacher library: prompts, backends, the correctness filter, caps and rationalization."""
from __future__ import annotations

from modecotd.backends import Completion
from modecotd.config import TeacherConfig
from modecotd.prompts import ANSWER_TRIGGERS, TeacherPrompts
from modecotd.tasks.generators import generate
from modecotd.tasks.schema import AnswerKind, Example
from modecotd.teacher import (Candidate, CotTeacher, Outcome, PrecomputedTeacher, ScriptedTeacher, make_backend,
                              teach)

EXAMPLE = Example(question="What is 2 + 3?", answer="5", source="t:1")
NUMBER = TeacherPrompts(kind=AnswerKind.NUMBER)


class FixedBackend:
    """Returns the given outcomes, whatever it is asked."""

    name = "fixed"

    def __init__(self, outcomes):
        self.outcomes = outcomes

    def candidates(self, examples, prompts, *, seed, hints=None):
        return self.outcomes[: len(examples)]


class ScriptedGenerator:
    """A text generator answering from a function of the prompt; records every call."""

    def __init__(self, reply):
        self.reply = reply
        self.calls = []

    def generate(self, prompts, *, samples, temperature, max_new_tokens, stop, seed):
        self.calls.append({"prompts": list(prompts), "samples": samples, "temperature": temperature, "stop": stop})
        out = []
        for prompt in prompts:
            texts = [self.reply(prompt, k) for k in range(samples)]
            if any(t is None for t in texts):
                out.append(Completion(error="endpoint refused the request (HTTP 400): no"))
            else:
                out.append(Completion(texts=texts, tokens=sum(len(t.split()) for t in texts)))
        return out


def test_filter_keeps_correct_distinct_rationales_and_says_why_others_go():
    outcome = Outcome([
        Candidate("2 + 3 = 5.", "5"),
        Candidate("2 + 3 = 6.", "6"),
        Candidate("I am not sure.", None),
        Candidate("2  +  3 = 5. ", "5"),  # the same text, other spacing
        Candidate("", "5"),
        Candidate("Two plus three is five.", "5.0"),  # same number, other spelling
        Candidate("x", None, error="answer stage: timeout"),
    ])
    out = teach(FixedBackend([outcome]), [EXAMPLE], NUMBER, first_id=7, seed=0)
    assert [r["rationale"] for r in out.accepted] == ["2 + 3 = 5.", "Two plus three is five."]
    assert [r["reason"] for r in out.rejected] == ["wrong answer", "no answer found", "duplicate rationale",
                                                   "empty rationale", "answer stage: timeout"]
    assert {r["id"] for r in out.accepted + out.rejected} == {7}
    assert all(r["source"] == "t:1" and r["rationalized"] is False for r in out.accepted + out.rejected)


def test_cap_per_question_rejects_the_extra_correct_rationales():
    outcome = Outcome([Candidate(f"way {i}: 5", "5") for i in range(4)])
    out = teach(FixedBackend([outcome]), [EXAMPLE], NUMBER, first_id=0, seed=0, max_per_question=2)
    assert len(out.accepted) == 2
    assert [r["reason"] for r in out.rejected] == ["over the per-question cap"] * 2


def test_a_question_the_backend_cannot_do_is_failed_with_its_reason():
    other = Example("What is 1 + 1?", "2", source="t:2")
    out = teach(FixedBackend([Outcome(error="prompt is 900 tokens; the limit is 512"), Outcome([Candidate("2", "2")])]),
                [EXAMPLE, other], NUMBER, first_id=0, seed=0)
    assert [(r["id"], r["reason"]) for r in out.failed] == [(0, "prompt is 900 tokens; the limit is 512")]
    assert [r["id"] for r in out.accepted] == [1]
    assert out.questions == 2


def test_scripted_teacher_gives_the_generator_solution():
    examples = generate("coin_flip", 5, seed=3)
    out = teach(ScriptedTeacher(), examples, TeacherPrompts(kind=AnswerKind.YES_NO), first_id=0, seed=0)
    assert len(out.accepted) == 5 and not out.rejected and not out.failed


def test_precomputed_teacher_fails_rows_without_rationale():
    examples = [Example("q1", "yes", "Because.", "f:1"), Example("q2", "no", None, "f:2")]
    out = teach(PrecomputedTeacher(), examples, TeacherPrompts(kind=AnswerKind.YES_NO), first_id=0, seed=0)
    assert [r["question"] for r in out.accepted] == ["q1"]
    assert out.failed[0]["reason"] == "the train row has no rationale"


def test_zero_shot_cot_is_two_stage_with_the_kinds_answer_trigger():
    def reply(prompt, k):
        if prompt.endswith(ANSWER_TRIGGERS[AnswerKind.NUMBER]):
            return " 5."
        return f"Two and three make five (take {k})."

    generator = ScriptedGenerator(reply)
    teacher = CotTeacher("test", generator, samples=3, temperature=0.7, max_new_tokens=50)
    out = teach(teacher, [EXAMPLE], NUMBER, first_id=0, seed=0)
    first, second = generator.calls
    assert first["prompts"] == ["Q: What is 2 + 3?\nA: Let's think step by step."]
    assert first["samples"] == 3 and first["temperature"] == 0.7
    assert "Therefore, the answer" in first["stop"] and "\nQ:" in first["stop"]
    assert second["temperature"] == 0.0 and len(second["prompts"]) == 3
    assert second["prompts"][0] == ("Q: What is 2 + 3?\nA: Let's think step by step. Two and three make five "
                                    "(take 0).\nTherefore, the answer (arabic numerals) is")
    assert len(out.accepted) == 3 and out.tokens > 0


def test_few_shot_prompts_show_worked_examples_in_the_tasks_template():
    config = TeacherConfig(backend="transformers", prompting="few_shot", fewshot_examples=1)
    from types import SimpleNamespace

    from modecotd.teacher import prompts_for

    task = SimpleNamespace(teacher_template="Question: {question}\nAnswer:")
    demos = [Example("What is 1 + 1?", "2", "One and one is two.", "f:1"), Example("unused", "0", "r", "f:2")]
    prompts = prompts_for(config, task, AnswerKind.NUMBER, demos)
    text = prompts.reasoning("What is 2 + 3?")
    assert text == ("Question: What is 1 + 1?\nAnswer: One and one is two. Therefore, the answer (arabic numerals) "
                    "is 2.\n\nQuestion: What is 2 + 3?\nAnswer:")
    assert "unused" not in text and "step by step" not in text
    assert "\nQuestion:" in prompts.reasoning_stop


def test_rationalization_retries_unanswered_questions_with_the_gold_answer_as_hint():
    def reply(prompt, k):
        hinted = "Hint: the answer is 5" in prompt
        if prompt.endswith("is"):
            return " 5." if hinted else " 6."
        return "Count: two, then three more, five." if hinted and k == 0 else (
            "The hint says so." if hinted else "Two and three make six.")

    generator = ScriptedGenerator(reply)
    teacher = CotTeacher("test", generator, samples=2, temperature=0.7, max_new_tokens=50)
    plain = teach(teacher, [EXAMPLE], NUMBER, first_id=0, seed=0)
    assert not plain.accepted
    out = teach(teacher, [EXAMPLE], NUMBER, first_id=0, seed=0, rationalize=True)
    assert [r["rationale"] for r in out.accepted] == ["Count: two, then three more, five."]
    assert out.accepted[0]["rationalized"] is True
    assert "mentions the hint" in [r["reason"] for r in out.rejected]
    hinted_prompts = generator.calls[-2]["prompts"]
    assert hinted_prompts == ["Q: What is 2 + 3?\n(Hint: the answer is 5.)\nA: Let's think step by step."]


def test_an_endpoint_refusal_fails_only_that_question():
    def reply(prompt, k):
        return None if "refuse me" in prompt else (" 5." if prompt.endswith("is") else "2 + 3 = 5")

    teacher = CotTeacher("test", ScriptedGenerator(reply), samples=1, temperature=0.0, max_new_tokens=20)
    out = teach(teacher, [EXAMPLE, Example("refuse me", "1")], NUMBER, first_id=0, seed=0)
    assert [r["id"] for r in out.accepted] == [0]
    assert out.failed[0]["id"] == 1 and "HTTP 400" in out.failed[0]["reason"]


def test_transformers_teacher_samples_k_rationales_and_fails_overlong_prompts(tiny_model_dir):
    config = TeacherConfig(backend="transformers", dtype="fp32", samples=3, temperature=0.7, max_new_tokens=6,
                           batch_size=2, max_prompt_tokens=40)
    teacher = make_backend(config, tiny_model_dir)
    long = Example("What is " + " + ".join(["1"] * 40) + "?", "40", source="t:9")
    examples = [EXAMPLE, Example("What is 1 + 1?", "2", source="t:2"), long]
    out = teach(teacher, examples, NUMBER, first_id=0, seed=0)
    assert len(out.accepted) + len(out.rejected) == 6  # three samples for each of the two short questions
    assert all(r["reason"] for r in out.rejected)
    assert [r["id"] for r in out.failed] == [2]
    assert out.failed[0]["reason"].startswith("prompt is ") and "the limit is 40" in out.failed[0]["reason"]
    assert out.tokens > 0


def test_transformers_teacher_batch_size_auto_is_resolved_on_the_models_device(tiny_model_dir):
    from modecotd.config import TEACHER_BATCH

    assert make_backend(TeacherConfig(backend="transformers", dtype="fp32", batch_size=3),
                        tiny_model_dir).generator.batch_size == 3
    teacher = make_backend(TeacherConfig(backend="transformers", dtype="fp32"), tiny_model_dir)  # auto
    assert teacher.generator.model.device.type == "cpu"
    assert teacher.generator.batch_size == TEACHER_BATCH.cpu == 8


def test_the_vllm_backend_is_selected_by_config_and_says_what_is_missing(tiny_model_dir):
    import importlib.util

    import pytest

    from modecotd.errors import ModelError

    config = TeacherConfig(backend="vllm", gpus_per_actor=1)
    expected = "not installed" if importlib.util.find_spec("vllm") is None else "no CUDA GPU"
    with pytest.raises(ModelError, match=expected):
        make_backend(config, tiny_model_dir)


def test_a_shard_the_teacher_broke_on_fails_every_question_with_the_reason():
    from modecotd.teacher import failed_shard

    out = failed_shard([EXAMPLE, Example("What is 1 + 1?", "2", source="t:2")], NUMBER, first_id=10,
                       reason="teacher error: ValueError: boom")
    assert not out.accepted and not out.rejected
    assert [(r["id"], r["reason"], r["rationalized"]) for r in out.failed] == [
        (10, "teacher error: ValueError: boom", False), (11, "teacher error: ValueError: boom", False)]
