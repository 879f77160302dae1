"""A format-free reading of a student's answer: the option it finds most likely after its own
reasoning.

A small student's strict score on a yes/no or multiple-choice task mostly measures whether it
writes the answer format (the marker, then one option). This reading does not need the format:
for each test question it takes what the student wrote before the answer marker (all it wrote,
when it never wrote the marker), puts the marker after it as the training target does, and ranks
the task's options by their log-probability there (summed over the option's tokens). Every system
is read this way, the base student included, beside the strict and the authors' scorings.
"""
from __future__ import annotations

import re

import torch

from modecotd.losses import IGNORE_INDEX, token_losses
from modecotd.prompts import adds_special_tokens, rendered_prompt
from modecotd.tasks.answers import ANSWER_MARK, END_MARK
from modecotd.tasks.schema import AnswerKind

KINDS = (AnswerKind.YES_NO, AnswerKind.CHOICE)  # the answer kinds with a closed set of options
YES_NO = ("yes", "no")
DEFAULT_LETTERS = "ABCDE"  # a choice question that names no options of the form "(A)"
_LETTER = re.compile(r"\(([A-F])\)")


def options_for(question: str, kind: AnswerKind) -> tuple[str, ...]:
    """The answers a question allows: yes and no, or the letters its choices are labelled with
    ("(A) ... (D) ..."), in order; () for an open answer."""
    if kind == AnswerKind.YES_NO:
        return YES_NO
    if kind != AnswerKind.CHOICE:
        return ()
    letters = sorted(set(_LETTER.findall(question)))
    return tuple(letters) if len(letters) >= 2 else tuple(DEFAULT_LETTERS)


def reasoning_of(output: str) -> str:
    """What a student wrote before its answer: the text before the first answer marker, or all of
    it (up to END) when it wrote no marker."""
    text = output.split(ANSWER_MARK, 1)[0] if ANSWER_MARK in output else output.split(END_MARK, 1)[0]
    return text.strip()


def _option_example(tokenizer, prompt: str, reasoning: str, option: str, encoder_decoder: bool,
                    prompt_format: str = "raw") -> dict:
    """Token ids of prompt + reasoning + marker + option with the option's positions marked: the
    labels hold every target token (a seq2seq decoder reads them), ``option`` flags the option's.
    ``prompt``: rendered in ``prompt_format`` (see :func:`modecotd.prompts.rendered_prompt`)."""
    lead = f" {reasoning}\n\n{ANSWER_MARK}\n\n" if reasoning else f" {ANSWER_MARK}\n\n"
    lead = lead if prompt_format == "raw" else lead.lstrip(" ")  # a chat reply starts without the space
    prompt_ids = tokenizer(prompt, add_special_tokens=adds_special_tokens(prompt_format, encoder_decoder))["input_ids"]
    lead_ids = tokenizer(lead, add_special_tokens=False)["input_ids"]
    joint = tokenizer(lead + option, add_special_tokens=False)["input_ids"]
    if joint[:len(lead_ids)] == lead_ids and len(joint) > len(lead_ids):
        option_ids = joint[len(lead_ids):]  # tokenised together, as training saw it
    else:
        option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
    target = lead_ids + option_ids
    flags = [0] * len(lead_ids) + [1] * len(option_ids)
    if encoder_decoder:
        return {"input_ids": prompt_ids, "labels": target, "option": flags}
    return {"input_ids": prompt_ids + target, "labels": [IGNORE_INDEX] * (len(prompt_ids) + len(lead_ids)) + option_ids,
            "option": [0] * len(prompt_ids) + flags}


def _padded(rows: list[list[int]], fill: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out


@torch.no_grad()
def _option_log_probs(model, tokenizer, examples: list[dict], encoder_decoder: bool) -> list[float]:
    """The summed log-probability of each example's option tokens."""
    device = next(model.parameters()).device
    batch = {"input_ids": _padded([e["input_ids"] for e in examples], tokenizer.pad_token_id),
             "attention_mask": _padded([[1] * len(e["input_ids"]) for e in examples], 0),
             "labels": _padded([e["labels"] for e in examples], IGNORE_INDEX)}
    flags = _padded([e["option"] for e in examples], 0)
    batch = {k: v.to(device) for k, v in batch.items()}
    losses, _ = token_losses(model, batch)
    option = flags.to(device).float() if encoder_decoder else flags[:, 1:].to(device).float()  # causal: next-token
    return (-(losses.float() * option).sum(1)).tolist()


def likelihood_answers(model, tokenizer, questions: list[str], outputs: list[str], kind: AnswerKind, *,
                       batch_size: int, prompt_format: str = "raw") -> list[str | None]:
    """For each question, the option with the highest log-probability after the student's own
    reasoning (``outputs``: what it wrote); None for every question of a kind without options."""
    from modecotd.models import is_encoder_decoder

    if kind not in KINDS:
        return [None] * len(questions)
    encoder_decoder = is_encoder_decoder(model)
    pairs = [(row, option) for row, question in enumerate(questions) for option in options_for(question, kind)]
    examples = [_option_example(tokenizer, rendered_prompt(questions[row], kind, prompt_format, tokenizer),
                                reasoning_of(outputs[row]), option, encoder_decoder, prompt_format)
                for row, option in pairs]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # little padding per batch
    scores = [0.0] * len(examples)
    for start in range(0, len(order), max(1, batch_size)):
        chunk = order[start:start + max(1, batch_size)]
        for i, value in zip(chunk, _option_log_probs(model, tokenizer, [examples[i] for i in chunk], encoder_decoder)):
            scores[i] = value
    best: dict[int, tuple[float, str]] = {}
    for (row, option), score in zip(pairs, scores):
        if row not in best or score > best[row][0]:
            best[row] = (score, option)
    return [best[row][1] if row in best else None for row in range(len(questions))]
