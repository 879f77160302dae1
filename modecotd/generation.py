"""Batched text generation with a causal or seq2seq LM (KV cache, left padding, stop strings)."""
from __future__ import annotations

from typing import Callable

import torch


def generate_samples(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    num_samples: int = 1,
    stop: str | list[str] | None = None,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[tuple[str, int]]]:
    """Continue each prompt; returns ``num_samples`` (text, generated tokens) pairs per prompt, in
    the prompts' order.

    Prompts are sorted by length so that each batch pads little; greedy when temperature is 0.
    Each sequence stops at a stop string (kept in the text; anything after it is cut) or at EOS.
    """
    from modecotd.models import is_encoder_decoder

    stops = [stop] if isinstance(stop, str) else list(stop or [])
    encoder_decoder = is_encoder_decoder(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[tuple[str, int]]] = [[] for _ in prompts]
    tokenizer.padding_side = "left"
    sampling = temperature > 0
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True).to(model.device)
        torch.manual_seed(seed + start)
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            num_return_sequences=num_samples,
            pad_token_id=tokenizer.pad_token_id,
        )
        if sampling:
            kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
        if stops:
            kwargs.update(stop_strings=stops, tokenizer=tokenizer)
        with torch.inference_mode():
            output = model.generate(**batch, **kwargs)
        # A causal LM's output repeats the prompt; an encoder-decoder's starts with the decoder start token.
        new_tokens = output[:, 1 if encoder_decoder else batch["input_ids"].shape[1]:]
        counts = (new_tokens != tokenizer.pad_token_id).sum(dim=1).tolist()
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for row, text in enumerate(texts):
            hits = [(text.index(s), s) for s in stops if s in text]
            if hits:
                at, hit = min(hits)
                text = text[: at + len(hit)]
            results[indices[row // num_samples]].append((text, counts[row]))
        if on_batch:
            on_batch(len(indices))
    return results


def generate_texts(model, tokenizer, prompts: list[str], **kwargs) -> list[list[str]]:
    """Like :func:`generate_samples`, texts only."""
    return [[text for text, _ in row] for row in generate_samples(model, tokenizer, prompts, **kwargs)]
