"""The OpenAI-compatible endpoint generator against a local stub server: texts, concurrency, retries, keys."""
from __future__ import annotations

import logging
import socket
import time

import pytest
from stub_openai import StubServer

from modecotd.backends import openai_api
from modecotd.backends.openai_api import OpenAIGenerator, resolve_api_key
from modecotd.errors import ModelError

SECRET = "sk-test-9f8e7d6c5b4a-secret"
FAST = {"backoff_s": 0.01, "timeout_s": 5.0}
ARGS = {"samples": 2, "temperature": 0.7, "max_new_tokens": 64, "stop": ["\n\n"], "seed": 3}


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """Requests to the stub on 127.0.0.1 must not go through a proxy from the environment."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The backoff waits the generator asked for (recorded, not slept)."""
    recorded: list[float] = []
    monkeypatch.setattr(openai_api, "_sleep", recorded.append)
    return recorded


def numbered(prompt: str, n: int) -> list[str]:
    """Texts that name their prompt and sample, with a tail after a stop string."""
    return [f"<{prompt}> sample {i}. answer{i}\n\nTAIL should be cut" for i in range(n)]


# --------------------------------------------------------------------------- texts, paths, tokens


def test_chat_texts_in_order_with_samples_cut_at_stop_and_usage_tokens():
    prompts = [f"question {i}" for i in range(5)]
    with StubServer(numbered) as stub:
        gen = OpenAIGenerator(stub.url, "teacher-model", concurrency=3, **FAST)
        out = gen.generate([[{"role": "user", "content": p}] for p in prompts], **{**ARGS, "samples": 3})
    assert [c.error for c in out] == [None] * 5
    for prompt, completion in zip(prompts, out):
        expected = [f"<{prompt}> sample {i}. answer{i}" for i in range(3)]
        assert completion.texts == expected
        uncut = numbered(prompt, 3)
        assert completion.tokens == sum(len(t) for t in uncut)  # the stub's usage, not a word count
    assert {r["path"] for r in stub.requests} == {"/v1/chat/completions"}
    assert sorted(r["prompt"] for r in stub.requests) == prompts
    body = stub.requests[0]["body"]
    assert body["model"] == "teacher-model"
    assert body["messages"][0]["role"] == "user"
    assert (body["n"], body["temperature"], body["max_tokens"], body["seed"], body["stop"]) == (3, 0.7, 64, 3, ["\n\n"])


def test_a_text_prompt_goes_to_the_completions_path():
    with StubServer(numbered) as stub:
        gen = OpenAIGenerator(stub.url + "/", "m", **FAST)
        out = gen.generate(["alpha", "beta"], **ARGS)
    assert [c.texts for c in out] == [["<alpha> sample 0. answer0", "<alpha> sample 1. answer1"],
                                      ["<beta> sample 0. answer0", "<beta> sample 1. answer1"]]
    assert [r["path"] for r in stub.requests] == ["/v1/completions"] * 2
    assert all("prompt" in r["body"] and "messages" not in r["body"] for r in stub.requests)


def test_only_four_stop_strings_are_sent_but_all_are_cut_locally():
    stop = ["S1", "S2", "S3", "S4", "S5", "FIFTH_WINS"]
    with StubServer(lambda p, n: ["keep this FIFTH_WINS drop S1 this"] * n) as stub:
        out = OpenAIGenerator(stub.url, "m", **FAST).generate(["p"], **{**ARGS, "stop": stop})
    assert stub.requests[0]["body"]["stop"] == stop[:4]
    assert out[0].texts == ["keep this "] * 2


def test_tokens_fall_back_to_a_word_count_without_usage():
    with StubServer(lambda p, n: ["one two three\n\nfour five"] * n, report_usage=False) as stub:
        out = OpenAIGenerator(stub.url, "m", **FAST).generate(["p"], **ARGS)
    assert out[0].texts == ["one two three"] * 2
    assert out[0].tokens == 6  # 3 words x 2 samples, counted after the cut


def test_results_keep_prompt_order_when_early_prompts_finish_last():
    finished = []

    def slow_first(prompt: str, n: int) -> list[str]:
        time.sleep(0.3 if prompt == "p0" else 0.0)
        finished.append(prompt)
        return [prompt] * n

    with StubServer(slow_first) as stub:
        out = OpenAIGenerator(stub.url, "m", concurrency=4, **FAST).generate([f"p{i}" for i in range(6)], **ARGS)
    assert finished[-1] == "p0"  # the stub really answered p0 last ...
    assert [c.texts[0] for c in out] == [f"p{i}" for i in range(6)]  # ... yet it comes back first


def test_no_prompts_makes_no_requests():
    with StubServer() as stub:
        assert OpenAIGenerator(stub.url, "m", **FAST).generate([], **ARGS) == []
    assert stub.requests == []


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="concurrency"):
        OpenAIGenerator("http://x/v1", "m", concurrency=0)


# --------------------------------------------------------------------------- concurrency


def test_concurrency_is_bounded_and_speeds_things_up():
    prompts = [f"q{i}" for i in range(8)]
    timings = {}
    for concurrency in (2, 4):
        with StubServer(delay_s=0.25) as stub:
            gen = OpenAIGenerator(stub.url, "m", concurrency=concurrency, **FAST)
            start = time.perf_counter()
            out = gen.generate(prompts, **ARGS)
            timings[concurrency] = time.perf_counter() - start
        assert all(c.error is None for c in out)
        assert stub.max_in_flight == concurrency  # never more, and the pool does run that many at once
    assert timings[2] >= 4 * 0.25  # 8 requests, 2 at a time
    assert timings[4] < 0.75 * timings[2]  # about half as long with twice the slots


# --------------------------------------------------------------------------- failures and retries


def test_failures_stay_on_their_prompt_and_the_rest_succeed(waits):
    prompts = ["fine one", "FLAKY please", "DOWN now", "REFUSE this", "GARBLED body", "NOCHOICES here", "fine two"]
    with StubServer() as stub:
        gen = OpenAIGenerator(stub.url, "m", concurrency=4, max_retries=2, **FAST)
        out = dict(zip(prompts, gen.generate(prompts, **ARGS)))
    for ok in ("fine one", "fine two", "FLAKY please"):
        assert out[ok].error is None and out[ok].texts == ["step one. step two."] * 2, ok
    assert stub.count("FLAKY") == 3  # 429, 500, then success

    assert stub.count("DOWN") == 3  # max_retries + 1
    assert out["DOWN now"].texts == []
    assert out["DOWN now"].error.startswith("endpoint failed after 3 attempts: HTTP 503")
    assert "service unavailable" in out["DOWN now"].error

    assert stub.count("REFUSE") == 1  # a 400 is not retried
    assert out["REFUSE this"].error.startswith("endpoint refused the request (HTTP 400): ")
    assert "maximum context length" in out["REFUSE this"].error

    for garbled in ("GARBLED body", "NOCHOICES here"):  # retried: a cut-off body may come whole next time
        assert out[garbled].error.startswith("endpoint failed after 3 attempts: malformed response"), garbled
    assert stub.count("GARBLED") == 3 and stub.count("NOCHOICES") == 3


def test_a_cut_off_body_or_a_closed_connection_is_retried_then_succeeds(waits):
    prompts = ["GARBLEDONCE a", "CLOSEONCE b", "CLOSE always"]
    with StubServer() as stub:
        out = OpenAIGenerator(stub.url, "m", max_retries=2, **FAST).generate(prompts, **ARGS)
    assert out[0].error is None and out[0].texts == ["step one. step two."] * 2
    assert out[1].error is None and out[1].texts == ["step one. step two."] * 2
    assert stub.count("GARBLEDONCE") == 2 and stub.count("CLOSEONCE") == 2
    assert out[2].error.startswith("endpoint failed after 3 attempts: connection failed")
    assert stub.count("CLOSE always") == 3


def test_a_server_that_ignores_n_is_asked_again_for_the_missing_samples(caplog):
    def distinct(prompt: str, n: int) -> list[str]:
        return [f"sample {len(stub.requests)}"] * n

    with StubServer(distinct, ignore_n=True) as stub, caplog.at_level(logging.WARNING, "modecotd"):
        out = OpenAIGenerator(stub.url, "m", concurrency=1, **FAST).generate(["p", "q"], **{**ARGS, "samples": 3})
    assert [len(c.texts) for c in out] == [3, 3]
    assert out[0].texts == ["sample 1", "sample 2", "sample 3"]
    assert [r["body"]["n"] for r in stub.requests] == [3, 2, 1] * 2
    assert [r["body"]["seed"] for r in stub.requests] == [3, 4, 5] * 2  # a new seed for each new sample
    assert sum("seems to ignore 'n'" in r.getMessage() for r in caplog.records) == 1


def test_samples_in_hand_are_kept_when_asking_for_the_rest_fails(waits):
    class DownAfterFirst(OpenAIGenerator):
        """The request for the missing sample carries the stub's DOWN marker."""

        def _body(self, prompt: str, params: dict) -> bytes:
            return super()._body(prompt + (" DOWN" if params["seed"] > ARGS["seed"] else ""), params)

    with StubServer(ignore_n=True) as stub:
        out = DownAfterFirst(stub.url, "m", max_retries=1, **FAST).generate(["p"], **ARGS)
    assert out[0].error is None and out[0].texts == ["step one. step two."]
    assert stub.count("DOWN") == 2 and len(stub.requests) == 3


def test_backoff_doubles_and_retry_after_is_honoured_and_capped(waits):
    with StubServer() as stub:
        OpenAIGenerator(stub.url, "m", max_retries=3, backoff_s=0.01).generate(["DOWN"], **ARGS)
    assert waits == pytest.approx([0.01, 0.02, 0.04])

    waits.clear()
    with StubServer(retry_after="0") as stub:
        out = OpenAIGenerator(stub.url, "m", max_retries=3, backoff_s=0.01).generate(["FLAKY"], **ARGS)
    assert out[0].error is None
    assert waits == pytest.approx([0.0, 0.02])  # Retry-After 0 for the 429, backoff for the 500

    waits.clear()
    with StubServer(retry_after="3600") as stub:
        OpenAIGenerator(stub.url, "m", max_retries=3, backoff_s=0.01).generate(["FLAKY"], **ARGS)
    assert waits == pytest.approx([60.0, 0.02])


def test_a_slow_prompt_times_out_while_the_others_succeed():
    with StubServer() as stub:
        gen = OpenAIGenerator(stub.url, "m", timeout_s=0.3, max_retries=1, backoff_s=0.01)
        start = time.perf_counter()
        out = gen.generate(["quick", "SLOW one", "also quick"], **ARGS)
        elapsed = time.perf_counter() - start
    assert out[1].error == "endpoint failed after 2 attempts: timed out after 0.3 s"
    assert stub.count("SLOW") == 2
    assert out[0].error is None and out[2].error is None
    assert elapsed < 1.8  # gave up on the timeout, not after the stub's 2 s


def test_connection_refused_is_retried_then_reported(waits):
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gen = OpenAIGenerator(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff_s=0.01)
    out = gen.generate(["p"], **ARGS)
    assert out[0].error.startswith("endpoint failed after 3 attempts: connection failed")
    assert len(waits) == 2


# --------------------------------------------------------------------------- API key


def test_api_key_is_sent_as_bearer_and_checked():
    with StubServer(api_key=SECRET) as stub:
        good = OpenAIGenerator(stub.url, "m", api_key=SECRET, **FAST).generate(["p"], **ARGS)
        wrong = OpenAIGenerator(stub.url, "m", api_key="sk-wrong-key-0000", **FAST).generate(["p"], **ARGS)
        missing = OpenAIGenerator(stub.url, "m", **FAST).generate(["p"], **ARGS)
    assert good[0].error is None and good[0].texts
    assert [r["authorization"] for r in stub.requests] == [f"Bearer {SECRET}", "Bearer sk-wrong-key-0000", None]
    for out in (wrong, missing):
        assert out[0].error.startswith("endpoint refused the request (HTTP 401): Incorrect API key")
    assert stub.count("p") == 3  # 401 is not retried
    assert "sk-wrong-key-0000" not in wrong[0].error  # the stub echoed the key; the generator masks it


def test_api_key_never_shows_in_repr_errors_or_logs(caplog, waits):
    caplog.set_level(logging.DEBUG, logger="modecotd.backends.openai_api")
    prompt_text = "DOWN and a long private prompt text that must not be logged"
    with StubServer() as stub:
        gen = OpenAIGenerator(stub.url, "m", api_key=SECRET, max_retries=2, **FAST)
        out = gen.generate([prompt_text, "REFUSE", "FLAKY"], **ARGS)
        url = stub.url
    with StubServer(api_key="another-key") as stub:  # a 401 whose message echoes our key
        out += OpenAIGenerator(stub.url, "m", api_key=SECRET, **FAST).generate(["p"], **ARGS)
    assert repr(gen) == str(gen) == f"OpenAIGenerator(url={url!r}, model='m')"
    assert SECRET not in repr(gen)
    errors = [c.error for c in out if c.error]
    assert len(errors) == 3  # DOWN, REFUSE, the 401
    assert "(HTTP 401)" in errors[-1] and "***" in errors[-1]
    assert all(SECRET not in e for e in errors)
    assert len(caplog.records) >= 3  # the retries were logged ...
    assert SECRET not in caplog.text  # ... without the key
    assert prompt_text not in caplog.text  # ... or the prompt


def test_a_redirect_is_not_followed_and_the_key_goes_to_no_other_host():
    with StubServer() as elsewhere, StubServer(api_key=SECRET, redirect_to=elsewhere.url) as endpoint:
        out = OpenAIGenerator(endpoint.url, "m", api_key=SECRET, **FAST).generate(["REDIRECT me"], **ARGS)
    assert elsewhere.requests == []  # neither the key nor the prompt reached the other server
    assert out[0].texts == [] and out[0].error.startswith("endpoint answered HTTP 302, a redirect to "
                                                          f"{elsewhere.url}/completions")
    assert "teacher.endpoint.url" in out[0].error
    assert endpoint.count("REDIRECT") == 1  # not retried: another try would be redirected again


def test_a_trickling_reply_is_cut_off_at_the_requests_whole_deadline(waits):
    with StubServer() as stub:
        gen = OpenAIGenerator(stub.url, "m", timeout_s=0.5, max_retries=1, backoff_s=0.01)
        start = time.perf_counter()
        out = gen.generate(["TRICKLE", "quick"], **ARGS)
        elapsed = time.perf_counter() - start
    # each byte comes well within the socket timeout; the whole reply would take minutes
    assert out[0].error is not None and "timed out after 0.5 s" in out[0].error
    assert out[1].error is None
    assert elapsed < 3.0


def test_a_reply_larger_than_the_cap_is_refused():
    with StubServer() as stub:
        gen = OpenAIGenerator(stub.url, "m", max_reply_bytes=10_000, **FAST)
        out = gen.generate(["HUGE", "small"], **ARGS)
    assert out[0].error == "the endpoint's reply is larger than 10000 bytes; refused"
    assert out[1].error is None and stub.count("HUGE") == 1


def test_resolve_api_key_reads_the_environment(monkeypatch):
    assert resolve_api_key(None) is None
    monkeypatch.setenv("MODECOTD_TEST_KEY", SECRET)
    assert resolve_api_key("MODECOTD_TEST_KEY") == SECRET
    monkeypatch.delenv("MODECOTD_TEST_KEY")
    with pytest.raises(ModelError, match="MODECOTD_TEST_KEY is not set"):
        resolve_api_key("MODECOTD_TEST_KEY")
    monkeypatch.setenv("MODECOTD_TEST_KEY", "")
    with pytest.raises(ModelError, match="teacher.endpoint.api_key_env"):
        resolve_api_key("MODECOTD_TEST_KEY")
