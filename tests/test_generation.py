"""Greedy decoding's own loop (rows leave the batch as they stop) against transformers' generate."""
from __future__ import annotations

import torch

from modecotd.generation import generate_samples, greedy_continue

PROMPTS = ["Q: 1 + 1?", "Q: what is the last letter of apple and banana?", "Q: flip a coin twice.",
           "Q: a much longer question, with many words in it, so that the batch is padded on the left side.",
           "Q: 7 * 6?", "Q: yes or no?"]


def reference(model, tokenizer, prompts, max_new_tokens, **kwargs) -> list[list[int]]:
    """transformers' greedy generate, one row at a time (no padding at all), without what follows
    the end token."""
    from modecotd.generation import stop_token_ids

    ends = stop_token_ids(model, tokenizer)
    rows = []
    for prompt in prompts:
        batch = tokenizer([prompt], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, **kwargs)
        row = out[0, batch["input_ids"].shape[1]:].tolist()
        cut = next((i + 1 for i, token in enumerate(row) if token in ends), len(row))
        rows.append(row[:cut])
    return rows


def test_rows_that_stop_leave_the_batch_and_every_row_writes_what_it_writes_alone(tiny_model_dir):
    from modecotd.models import load_lm, load_tokenizer

    model, tokenizer = load_lm(tiny_model_dir, "fp32"), load_tokenizer(tiny_model_dir)
    free = reference(model, tokenizer, PROMPTS, 10)
    # one more end token, one that some rows write early and others late or never: rows stop apart
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, free[0][2]]
    alone = reference(model, tokenizer, PROMPTS, 10)
    lengths = sorted(len(row) for row in alone)
    assert lengths[0] < lengths[-1] == 10, lengths

    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert greedy_continue(model, tokenizer, batch, max_new_tokens=10, stops=[]) == alone

    # through generate_samples: texts and token counts, in the prompts' order, in batches of 4
    samples = generate_samples(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=4)
    assert [text for [(text, _)] in samples] == tokenizer.batch_decode(alone, skip_special_tokens=True)
    assert [count for [(_, count)] in samples] == [len(row) for row in alone]  # an ending EOS counted too


def test_a_row_stops_at_its_stop_string_and_the_text_ends_there(tiny_model_dir):
    from modecotd.models import load_lm, load_tokenizer

    model, tokenizer = load_lm(tiny_model_dir, "fp32"), load_tokenizer(tiny_model_dir)
    # the first prompt whose free continuation writes, after its first token, a token whose text it has
    # not written before (which prompt depends on the tiny model's random weights): that text is the stop
    for first, prompt in enumerate(PROMPTS):
        free = reference(model, tokenizer, [prompt], 12)[0]
        at = next((i for i in range(1, len(free)) if (stop := tokenizer.decode(free[i:i + 1])).strip()
                   and stop not in tokenizer.decode(free[:i])), None)
        if at is not None:
            break
    assert at is not None, "no prompt's continuation has a fresh token to stop at"
    pair = [prompt, PROMPTS[(first + 1) % len(PROMPTS)]]
    tokenizer.padding_side = "left"
    rows = greedy_continue(model, tokenizer, tokenizer(pair, return_tensors="pt", padding=True),
                           max_new_tokens=12, stops=[stop])
    assert rows[0] == free[:at + 1]
    [(text, _)], _ = generate_samples(model, tokenizer, pair, max_new_tokens=12, batch_size=2, stop=stop)
    assert text.endswith(stop) and text == tokenizer.decode(free[:at + 1], skip_special_tokens=True)


def test_the_stop_check_reads_only_a_rows_tail_and_finds_the_first_stop_where_a_whole_decode_does(tiny_model_dir):
    """Token by token, the tail check says a row has stopped at exactly the step where decoding the
    whole row first shows a stop string, over long rows of random tokens (multi-byte pieces
    included), and it decodes a bounded tail however long the row grows."""
    import random

    from modecotd.generation import stop_check
    from modecotd.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    rng = random.Random(5)
    vocabulary = list(range(len(tokenizer)))
    for stops in (["\n\n"], ["Q:", "The answer is"], ["é", " so"]):
        stopped = stop_check(tokenizer, stops)
        for _ in range(20):
            row: list[int] = []
            for _ in range(120):
                row.append(rng.choice(vocabulary) if rng.random() < 0.8 else
                           rng.choice(tokenizer(rng.choice(stops), add_special_tokens=False)["input_ids"]))
                whole = any(s in tokenizer.decode(row) for s in stops)
                assert stopped(row) == whole, (stops, row)
                if whole:
                    break

    decoded: list[int] = []
    original = tokenizer.decode
    tokenizer.decode = lambda tokens, **kw: decoded.append(len(tokens)) or original(tokens, **kw)
    stopped = stop_check(tokenizer, ["Q:"])
    stopped(list(range(100, 1100)))
    assert decoded == [4 * 2 + 4]


def test_written_tokens_leave_out_padding_and_count_the_end_token_a_row_wrote():
    """generate pads a row that ended early; where the padding token is the EOS (SmolLM2), the EOS
    the row wrote still counts, padding after a stop string does not, and a row that ran to the
    limit counts whole."""
    from modecotd.generation import written_tokens

    eos, pad_is_eos = 2, 2
    ends_in_stop = lambda tokens: tokens[-1:] == [9]  # token 9 completes a stop string
    never = lambda tokens: False
    assert written_tokens([5, 6, eos, eos, eos], pad_is_eos, {eos}, never) == 3  # ended with EOS, padded
    assert written_tokens([5, 9, eos, eos], pad_is_eos, {eos}, ends_in_stop) == 2  # stop string, then padding
    assert written_tokens([5, 6, 7], pad_is_eos, {eos}, never) == 3  # ran to the limit
    assert written_tokens([5, eos, 0, 0], 0, {eos}, never) == 2  # its own padding token: the EOS stays
    assert written_tokens([eos, eos], pad_is_eos, {eos}, never) == 1  # wrote only its EOS
