"""The likelihood reading of yes/no and multiple-choice answers (modecotd.likelihood), on tiny models."""
from __future__ import annotations

import pytest
import torch

from modecotd.evaluate import score_rows, summarize
from modecotd.likelihood import _option_example, likelihood_answers, options_for, reasoning_of
from modecotd.prompts import student_prompt
from modecotd.tasks.schema import AnswerKind, Example

TRACKING = ("Alice, Bob, and Claire are playing a game. First, Alice and Bob swap balls. At the end of the game, "
            "Bob has the Answer choices: (A) red ball, (B) blue ball, (C) green ball.")


def test_the_options_of_a_question():
    assert options_for("Is 2 even?", AnswerKind.YES_NO) == ("yes", "no")
    assert options_for(TRACKING, AnswerKind.CHOICE) == ("A", "B", "C")
    assert options_for("Which is right? (D) x (B) y", AnswerKind.CHOICE) == ("B", "D")
    assert options_for("Pick one of them.", AnswerKind.CHOICE) == tuple("ABCDE")
    assert options_for("How many?", AnswerKind.NUMBER) == () and options_for("Join them.", AnswerKind.TEXT) == ()


def test_the_reasoning_is_what_came_before_the_marker_or_everything():
    assert reasoning_of(" 2 is even.\n\n-->\n\nyes END") == "2 is even."
    assert reasoning_of(" It is even, so yes END and more") == "It is even, so yes"
    assert reasoning_of("") == ""


def brute_force_log_prob(model, tokenizer, prompt: str, reasoning: str, option: str, encoder_decoder: bool) -> float:
    """log p(option | prompt, reasoning, marker) from the model's plain logits, token by token."""
    example = _option_example(tokenizer, prompt, reasoning, option, encoder_decoder)
    flags = example["option"]
    if encoder_decoder:
        labels = torch.tensor([example["labels"]])
        logits = model(input_ids=torch.tensor([example["input_ids"]]), labels=labels).logits[0]
        targets, positions = labels[0], [i for i, f in enumerate(flags) if f]
        return sum(torch.log_softmax(logits[i].float(), -1)[targets[i]].item() for i in positions)
    ids = torch.tensor([example["input_ids"]])
    logits = model(input_ids=ids).logits[0]
    return sum(torch.log_softmax(logits[i - 1].float(), -1)[ids[0, i]].item() for i, f in enumerate(flags) if f)


@pytest.mark.parametrize("seq2seq", [False, True], ids=["causal", "seq2seq"])
def test_the_chosen_option_is_the_most_probable_one_by_the_models_own_logits(seq2seq, request):
    from modecotd.models import load_lm, load_tokenizer

    folder = request.getfixturevalue("tiny_t5_dir" if seq2seq else "tiny_model_dir")
    model, tokenizer = load_lm(folder, "fp32"), load_tokenizer(folder)
    questions = ["Is 4 even?", "Is 7 even?", TRACKING]
    outputs = [" 4 ends in 4, so it is even.\n\n-->\n\nno END", " 7 is odd", " Bob ends with the red ball."]
    kinds = [AnswerKind.YES_NO, AnswerKind.YES_NO, AnswerKind.CHOICE]
    for question, output, kind in zip(questions, outputs, kinds):
        [chosen] = likelihood_answers(model, tokenizer, [question], [output], kind, batch_size=2)
        scores = {option: brute_force_log_prob(model, tokenizer, student_prompt(question, kind), reasoning_of(output),
                                               option, seq2seq) for option in options_for(question, kind)}
        assert chosen == max(scores, key=scores.get), scores
    # batched and padded with rows of other lengths, the same choices
    batched = likelihood_answers(model, tokenizer, questions[:2], outputs[:2], AnswerKind.YES_NO, batch_size=4)
    single = [likelihood_answers(model, tokenizer, [q], [o], AnswerKind.YES_NO, batch_size=1)[0]
              for q, o in zip(questions[:2], outputs[:2])]
    assert batched == single
    assert likelihood_answers(model, tokenizer, ["How many?"], ["3"], AnswerKind.NUMBER, batch_size=2) == [None]


def test_the_reading_is_scored_and_summarised_beside_the_others():
    examples = [Example("Is 2 even?", "yes"), Example("Is 3 even?", "no"), Example("Is 5 even?", "no")]
    outputs = [" 2 is even.\n\n-->\n\nyes END", " 3 is odd", " 5 is odd.\n\n-->\n\nno END"]
    rows = score_rows(examples, outputs, AnswerKind.YES_NO, ["yes", "no", "yes"])
    assert [r["correct"] for r in rows] == [True, False, True]  # the second wrote no answer
    assert [r["correct_likelihood"] for r in rows] == [True, True, False]
    summary = summarize(rows)
    assert summary["accuracy_strict"] == pytest.approx(2 / 3) and summary["accuracy_likelihood"] == pytest.approx(2 / 3)
    assert summarize(score_rows(examples, outputs, AnswerKind.YES_NO))["accuracy_likelihood"] is None
