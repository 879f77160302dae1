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
    from modecotd.config import parse_config
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
