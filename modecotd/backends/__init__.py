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


class TextGenerator(Protocol):
    def generate(self, prompts: list[str], *, samples: int, temperature: float, max_new_tokens: int,
                 stop: list[str], seed: int) -> list[Completion]:
        """One Completion per prompt, in order.

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
