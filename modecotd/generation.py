"""Batched text generation with a causal or seq2seq LM (KV cache, left padding, stop strings).

Greedy decoding of a causal LM (evaluation, a teacher at temperature 0) runs our own loop,
:func:`greedy_continue`: a row that has stopped leaves the batch and its KV cache at once, so a
batch costs the tokens its rows write, not its longest row times its size. Sampling and
encoder-decoder models go through transformers' ``generate``."""
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
    add_special_tokens: bool = True,
) -> list[list[tuple[str, int]]]:
    """Continue each prompt; returns ``num_samples`` (text, generated tokens) pairs per prompt, in
    the prompts' order. ``add_special_tokens``: False for prompts rendered with a chat template,
    which hold their special tokens already.

    Prompts are sorted by length so that each batch pads little; greedy when temperature is 0.
    Each sequence stops at a stop string (kept in the text; anything after it is cut) or at EOS.
    """
    from modecotd.models import is_encoder_decoder

    stops = [stop] if isinstance(stop, str) else list(stop or [])
    encoder_decoder = is_encoder_decoder(model)
    ends, stopped = stop_token_ids(model, tokenizer), stop_check(tokenizer, stops)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[tuple[str, int]]] = [[] for _ in prompts]
    tokenizer.padding_side = "left"
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True,
                          add_special_tokens=add_special_tokens).to(model.device)
        torch.manual_seed(seed + start)
        new_rows = _continue_batch(model, tokenizer, batch, max_new_tokens=max_new_tokens, temperature=temperature,
                                   num_samples=num_samples, stops=stops, encoder_decoder=encoder_decoder)
        counts = [written_tokens(row, tokenizer.pad_token_id, ends, stopped) for row in new_rows]
        texts = tokenizer.batch_decode(new_rows, skip_special_tokens=True)
        for row, text in enumerate(texts):
            results[indices[row // num_samples]].append((cut_at_first_stop(text, stops), counts[row]))
        if on_batch:
            on_batch(len(indices))
    return results


def _continue_batch(model, tokenizer, batch, *, max_new_tokens: int, temperature: float, num_samples: int,
                    stops: list[str], encoder_decoder: bool) -> list[list[int]]:
    """The new tokens of each sequence of one padded batch (``num_samples`` rows per prompt): the
    cached greedy loop for a causal LM's single greedy sample, ``generate`` otherwise."""
    sampling = temperature > 0
    if not sampling and num_samples == 1 and not encoder_decoder:
        return greedy_continue(model, tokenizer, batch, max_new_tokens=max_new_tokens, stops=stops)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sampling, num_return_sequences=num_samples,
                  pad_token_id=tokenizer.pad_token_id)
    if sampling:
        kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
    if stops:
        kwargs.update(stop_strings=stops, tokenizer=tokenizer)
    with torch.inference_mode():
        output = model.generate(**batch, **kwargs)
    # A causal LM's output repeats the prompt; an encoder-decoder's starts with the decoder start token.
    return output[:, 1 if encoder_decoder else batch["input_ids"].shape[1]:].tolist()


def written_tokens(row: list[int], pad: int | None, ends: set[int], stopped: Callable[[list[int]], bool]) -> int:
    """How many of a row's new tokens the model wrote: all but the padding ``generate`` puts after a
    row that ended early, counting the end token a row ended with even where the padding token is
    that same token (SmolLM2 pads with its EOS), and not counting padding after a stop string."""
    n = len(row)
    while n and row[n - 1] == pad:
        n -= 1
    if n < len(row) and pad in ends and not stopped(row[:n]):
        n += 1  # it ended with an end token that is also the padding token
    return n


def cut_at_first_stop(text: str, stops: list[str]) -> str:
    """``text`` up to and with the earliest stop string in it (all of it when none is)."""
    hits = [(text.index(s), s) for s in stops if s in text]
    if not hits:
        return text
    at, hit = min(hits)
    return text[: at + len(hit)]


def generate_texts(model, tokenizer, prompts: list[str], **kwargs) -> list[list[str]]:
    """Like :func:`generate_samples`, texts only."""
    return [[text for text, _ in row] for row in generate_samples(model, tokenizer, prompts, **kwargs)]


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end a sequence: the tokenizer's EOS and the model's generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return {i for i in ids if i is not None}


def greedy_continue(model, tokenizer, batch: dict, *, max_new_tokens: int, stops: list[str]) -> list[list[int]]:
    """Greedy continuation of a left-padded batch of a causal LM; returns each row's new tokens (up
    to and including its EOS or the token that completes a stop string). Rows that stop are dropped
    from the batch and the KV cache, so later steps compute only the rows still writing; each row's
    tokens are those of a row decoded alone, up to the arithmetic of batch shapes."""
    ends = stop_token_ids(model, tokenizer)
    stopped = stop_check(tokenizer, stops)
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rows: list[list[int]] = [[] for _ in range(mask.shape[0])]
    alive = list(range(mask.shape[0]))  # the batch's rows, by their index in ``rows``
    with torch.inference_mode():
        # the prompt's logits at its last position only: a whole prompt's would be [rows, length, vocabulary]
        out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        cache_name = "cache" if "cache" in out.keys() else "past_key_values"  # transformers 5 renamed it
        cache, position = out[cache_name], positions[:, -1:] + 1
        for step in range(max_new_tokens):
            tokens = out.logits[:, -1, :].argmax(-1)
            keep = []
            for slot, (row, token) in enumerate(zip(alive, tokens.tolist())):
                rows[row].append(token)
                if token not in ends and not stopped(rows[row]):
                    keep.append(slot)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(alive):
                index = torch.tensor(keep, device=tokens.device)
                cache.batch_select_indices(index)
                tokens, mask, position = tokens[index], mask[index], position[index]
                alive = [alive[slot] for slot in keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position,
                        use_cache=True, **{cache_name: cache})
            position = position + 1
    return rows


def stop_check(tokenizer, stops: list[str]) -> Callable[[list[int]], bool]:
    """Whether a row's tokens so far end in a stop string, decoding only their tail: a stop string
    that the newest token completes lies within the last few tokens (each token writes at least one
    character, or a piece of one of at most 4 bytes), so the check costs the same at every step
    instead of growing with the row. Checked at every step, it finds each row's first stop."""
    if not stops:
        return lambda tokens: False
    tail = 4 * max(len(s) for s in stops) + 4

    def stopped(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens[-tail:])
        return any(s in text for s in stops)

    return stopped
