"""student.prompt_format: the paper's raw prompt, or the same prompt as the user's turn of the
student's chat template, laid out the same way by training, the mixer and evaluation."""
from __future__ import annotations

import pytest

from modecotd.distill import IGNORE_INDEX, tokenize_rows
from modecotd.prompts import check_chat_template, rendered_prompt, student_prompt
from modecotd.tasks.schema import AnswerKind, Example

ROW = {"question": "Is 4 even?", "answer": "yes", "rationale": "4 = 2 x 2."}


def test_a_chat_row_is_the_template_around_the_papers_prompt_and_only_the_reply_is_learned(tiny_model_dir):
    from modecotd.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir, padding_side="right")
    [chat], _ = tokenize_rows([ROW], AnswerKind.YES_NO, tokenizer, 512, prompt_format="chat")
    [raw], _ = tokenize_rows([ROW], AnswerKind.YES_NO, tokenizer, 512)
    prompt = [t for t, label in zip(chat["input_ids"], chat["labels"]) if label == IGNORE_INDEX]
    reply = [label for label in chat["labels"] if label != IGNORE_INDEX]
    templated = tokenizer.apply_chat_template([{"role": "user", "content": student_prompt(ROW["question"],
                                                                                           AnswerKind.YES_NO)}],
                                              tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(prompt) == templated  # no second BOS or other special token added
    assert tokenizer.decode(reply) == "4 = 2 x 2.\n\n-->\n\nyes END" + tokenizer.eos_token  # the turn's end
    assert len(chat["input_ids"]) > len(raw["input_ids"]) and chat["input_ids"] != raw["input_ids"]


def test_evaluation_decodes_the_chat_prompt_as_a_plain_generate_would(tiny_model_dir):
    import torch

    from modecotd.evaluate import predict
    from modecotd.models import load_lm, load_tokenizer

    model, tokenizer = load_lm(tiny_model_dir, "fp32"), load_tokenizer(tiny_model_dir)
    examples = [Example("Is 4 even?", "yes"), Example("Is 7 even? Think about it.", "no")]
    got = predict(model, tokenizer, examples, AnswerKind.YES_NO, batch_size=2, max_new_tokens=6, prompt_format="chat")
    for example, text in zip(examples, got):
        ids = tokenizer(rendered_prompt(example.question, AnswerKind.YES_NO, "chat", tokenizer), return_tensors="pt",
                        add_special_tokens=False)
        with torch.inference_mode():
            new = model.generate(**ids, max_new_tokens=6, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:]
        plain = tokenizer.decode(new, skip_special_tokens=True)
        assert text == (plain[: plain.index("END") + 3] if "END" in plain else plain)


def test_chat_needs_a_chat_template(tiny_model_dir):
    from modecotd.errors import ConfigError
    from modecotd.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    check_chat_template(tokenizer, "run.yaml:9: student.prompt_format")
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match=r"run.yaml:9: student.prompt_format: chat needs a tokenizer with a chat"):
        check_chat_template(tokenizer, "run.yaml:9: student.prompt_format")


def test_the_default_format_leaves_earlier_runs_fingerprints_alone_and_chat_changes_them(tmp_path):
    from modecotd.config_loading import parse_config
    from modecotd.jobs.driver import load_tasks
    from modecotd.plan import Plan, RunLayout
    from modecotd.storage import Storage

    base = {"name": "f", "teacher": {"backend": "scripted"}, "student": {"model": "builtin:tiny"},
            "tasks": [{"name": "coins", "role": "seen", "source": {"kind": "generated", "family": "coin_flip",
                                                                    "size": 2},
                       "sizes": {"train": 4, "fewshot": 2, "test": 2}}]}

    def keys(prompt_format: str | None) -> dict[str, str]:
        data = {**base, "student": {**base["student"], **({"prompt_format": prompt_format} if prompt_format else {})}}
        config = parse_config(data)
        return Plan(config, load_tasks(config), RunLayout(Storage(tmp_path))).wanted()

    omitted, raw, chat = keys(None), keys("raw"), keys("chat")
    assert omitted == raw
    assert chat["rationales/coins"] == raw["rationales/coins"]  # the teacher's work does not depend on it
    assert chat["experts/coins"] != raw["experts/coins"] and chat["eval/coins/base"] != raw["eval/coins/base"]


# --------------------------------------------------------------------------- teacher.prompt_format


def test_the_teachers_chat_turns_hold_the_raw_prompts_words():
    from modecotd.prompts import TeacherPrompts

    raw, chat = TeacherPrompts(AnswerKind.NUMBER), TeacherPrompts(AnswerKind.NUMBER, chat=True)
    assert chat.reasoning("2 + 3?") == [{"role": "user", "content": raw.reasoning("2 + 3?")}]
    assert raw.answer("2 + 3?", " 2 and 3 make 5. ") == f"{raw.reasoning('2 + 3?')} 2 and 3 make 5.\n{raw.trigger}"
    assert chat.answer("2 + 3?", " 2 and 3 make 5. ", hint="5") == [
        {"role": "user", "content": raw.reasoning("2 + 3?", hint="5")},
        {"role": "assistant", "content": "2 and 3 make 5."},
        {"role": "user", "content": raw.trigger}]


def test_a_local_teacher_renders_chat_turns_with_its_template_and_no_second_special_tokens(tiny_model_dir):
    from modecotd.backends.hf_local import TransformersGenerator
    from modecotd.generation import generate_samples

    generator = TransformersGenerator(tiny_model_dir, dtype="fp32", batch_size=2)
    turns = [[{"role": "user", "content": "Q: 2 + 3?\nA: Let's think step by step."}],
             [{"role": "user", "content": "Q: 7 - 1?\nA: Let's think step by step."}]]
    got = generator.generate(turns, samples=1, temperature=0.0, max_new_tokens=5, stop=[], seed=0)
    texts = [generator.tokenizer.apply_chat_template(t, tokenize=False, add_generation_prompt=True) for t in turns]
    expected = generate_samples(generator.model, generator.tokenizer, texts, max_new_tokens=5, batch_size=2,
                                add_special_tokens=False)
    assert [c.texts for c in got] == [[text for text, _ in row] for row in expected]


@pytest.mark.parametrize("prompt_format", ["raw", "chat"])
def test_an_endpoint_teacher_sends_text_to_completions_and_turns_to_chat(prompt_format):
    from modecotd.config import TeacherConfig
    from modecotd.teacher import make_backend, prompts_for
    from stub_openai import StubServer

    with StubServer(lambda prompt, n: ["2 and 3 make 5."] * n) as stub:
        config = TeacherConfig.model_validate({"backend": "openai", "model": "m", "samples": 1,
                                               "prompt_format": prompt_format,
                                               "endpoint": {"url": stub.url, "api_key_env": None}})
        task = type("Task", (), {"teacher_template": None})()
        backend = make_backend(config, None)
        [outcome] = backend.candidates([Example("2 + 3?", "5")], prompts_for(config, task, AnswerKind.NUMBER, []),
                                       seed=0)
    assert outcome.error is None and outcome.candidates
    paths = [r["path"] for r in stub.requests]
    bodies = [r["body"] for r in stub.requests]
    if prompt_format == "raw":
        assert paths == ["/v1/completions"] * 2
        assert bodies[1]["prompt"].startswith(bodies[0]["prompt"] + " 2 and 3 make 5.\n")
    else:
        assert paths == ["/v1/chat/completions"] * 2
        assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"]
        assert bodies[1]["messages"][:1] == bodies[0]["messages"]


def test_the_endpoints_old_api_key_is_refused_with_what_replaced_it():
    from modecotd.config_loading import parse_config
    from modecotd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"teacher.endpoint: api is gone: teacher.prompt_format decides"):
        parse_config({"name": "x", "teacher": {"backend": "openai", "model": "m",
                                               "endpoint": {"url": "http://127.0.0.1:9/v1", "api": "chat"}},
                      "tasks": [{"name": "c", "role": "seen",
                                 "source": {"kind": "generated", "family": "coin_flip"}}]})
