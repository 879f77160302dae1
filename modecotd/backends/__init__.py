"""Text generators the teacher can run on: local transformers, vLLM, an OpenAI-compatible endpoint.

Every generator has one contract, :class:`TextGenerator`: prompts in, one :class:`Completion`
per prompt out, in order. A prompt that cannot be done (too long, refused by an endpoint, a
decoding error) gets a Completion with ``error`` set instead of raising, so one bad row never
stops a batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Completion:
    """What a generator made of one prompt: ``samples`` texts, or an error saying why none."""

    texts: list[str] = field(default_factory=list)
    tokens: int = 0  # generated tokens, summed over the texts
    error: str | None = None


Prompt = str | list[dict]
"""A prompt: text, sent as it is (``teacher.prompt_format: raw``), or chat messages (``chat``)."""


def as_texts(prompts: list[Prompt], tokenizer) -> tuple[list[str], bool]:
    """Prompts for a local model: chat messages rendered with the tokenizer's chat template (the
    assistant's turn opened), text as it is; and whether the tokenizer may add its special tokens
    (never to a rendered chat prompt, which holds them)."""
    if prompts and not isinstance(prompts[0], str):
        return [tokenizer.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True)
                for m in prompts], False
    return list(prompts), True


class TextGenerator(Protocol):
    def generate(self, prompts: list[Prompt], *, samples: int, temperature: float, max_new_tokens: int,
                 stop: list[str], seed: int) -> list[Completion]:
        """One Completion per prompt (a :data:`Prompt`: all text or all chat messages), in order.

        Each text is cut before the first stop string (the stop string itself is not kept).
        ``temperature`` 0 means greedy; ``seed`` makes sampling repeatable where the backend can.
        """


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the earliest stop string (all of it when none occurs)."""
    end = len(text)
    for s in stop:
        at = text.find(s)
        if 0 <= at < end:
            end = at
    return text[:end]
