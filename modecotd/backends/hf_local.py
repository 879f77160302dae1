"""Teacher generation with a local transformers model, causal or seq2seq (CPU or one GPU).

Batched with a KV cache, prompts sorted by length into batches (see
:func:`modecotd.generation.generate_samples`), stopping at the stop strings. Prompts longer than
the limit are reported, not sent; a batch that fails is retried prompt by prompt so only the
prompts that fail are lost.
"""
from __future__ import annotations

import logging
from pathlib import Path

from modecotd.backends import Completion, as_texts, cut_at_stop

log = logging.getLogger(__name__)


class TransformersGenerator:
    def __init__(self, model_dir: Path | str, *, dtype: str = "auto", batch_size: int | str = "auto",
                 max_prompt_tokens: int | None = None):
        """``batch_size`` may be ``auto``: a larger batch when the model landed on a GPU (see
        :data:`modecotd.config.TEACHER_BATCH`)."""
        from modecotd.config import TEACHER_BATCH
        from modecotd.models import load_lm, load_tokenizer

        self.model = load_lm(Path(model_dir), dtype)  # straight onto the GPU Ray reserved, if any
        self.precision = self.model.precision
        self.tokenizer = load_tokenizer(Path(model_dir))
        self.batch_size = TEACHER_BATCH.resolve(batch_size, self.model.device)
        self.max_prompt_tokens = max_prompt_tokens
        self.context = getattr(self.model.config, "max_position_embeddings", None)

    def prompt_limit(self, max_new_tokens: int) -> int | None:
        """The longest prompt (in tokens) that still leaves room for ``max_new_tokens``."""
        if self.max_prompt_tokens is not None:
            return self.max_prompt_tokens
        return None if self.context is None else self.context - max_new_tokens

    def generate(self, prompts: list, *, samples: int, temperature: float, max_new_tokens: int,
                 stop: list[str], seed: int) -> list[Completion]:
        prompts, special = as_texts(prompts, self.tokenizer)
        out: list[Completion | None] = [None] * len(prompts)
        limit = self.prompt_limit(max_new_tokens)
        runnable = []
        for i, prompt in enumerate(prompts):
            length = len(self.tokenizer(prompt, add_special_tokens=special)["input_ids"])
            if limit is not None and length > limit:
                out[i] = Completion(error=f"prompt is {length} tokens; the limit is {limit}")
            else:
                runnable.append(i)
        settings = dict(max_new_tokens=max_new_tokens, batch_size=self.batch_size, temperature=temperature,
                        num_samples=samples, stop=stop, seed=seed, add_special_tokens=special)
        try:
            done = self._run([prompts[i] for i in runnable], settings)
        except Exception as exc:  # isolate the prompt(s) that break the batch
            log.warning("a generation batch failed (%s); retrying prompt by prompt", exc)
            done = []
            for i in runnable:
                try:
                    done.extend(self._run([prompts[i]], settings))
                except Exception as one:
                    done.append(Completion(error=f"generation failed: {type(one).__name__}: {one}"[:300]))
        for i, completion in zip(runnable, done):
            out[i] = completion
        return out  # type: ignore[return-value]

    def _run(self, prompts: list[str], settings: dict) -> list[Completion]:
        from modecotd.generation import generate_samples

        stop = settings["stop"]
        rows = generate_samples(self.model, self.tokenizer, prompts, **settings)
        return [Completion(texts=[cut_at_stop(text, stop) for text, _ in row], tokens=sum(n for _, n in row))
                for row in rows]
