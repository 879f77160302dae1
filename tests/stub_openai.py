"""A small OpenAI-compatible server for tests (not a test file).

Serves ``POST /v1/chat/completions`` and ``POST /v1/completions`` on 127.0.0.1 from a background
thread and records every request. Markers in the prompt make failures happen:

- ``REFUSE``: 400 with an OpenAI-shaped JSON error;
- ``FLAKY``: the first request for that exact prompt gets 429 (``Retry-After``), the second 500,
  later ones succeed;
- ``DOWN``: always 503;
- ``SLOW``: waits 2 s before answering (so a client timeout of ~0.3 s fails);
- ``GARBLED``: 200 with a body that is not JSON;
- ``NOCHOICES``: 200 with JSON that has no ``choices``;
- ``CLOSE``: the connection is closed without an answer;
- ``REDIRECT``: 302 to the same path under ``redirect_to`` (another server's ``.../v1``);
- ``TRICKLE``: a good reply whose body comes one byte every 0.1 s;
- ``HUGE``: a good reply with a text of 100,000 characters.

Markers ending in ``ONCE`` (``GARBLEDONCE``, ``CLOSEONCE``) fail only the prompt's first request.
``ignore_n`` makes the stub answer one choice whatever ``n`` asks, as llama.cpp's server does.

The stub counts one token per character in ``usage.completion_tokens``, so a test can tell
usage-based counts from a client's word-count fallback.
"""
from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

PATHS = ("/v1/chat/completions", "/v1/completions")
SLOW_S = 2.0


def default_responder(prompt: str, n: int) -> list[str]:
    """The same short rationale for every sample."""
    return ["step one. step two."] * n


class StubServer:
    """The stub, as a context manager: ``with StubServer() as stub: ... stub.url ... stub.requests``.

    ``responder(prompt, n)`` gives the n texts; ``api_key`` makes every request without
    ``Authorization: Bearer <api_key>`` get 401 (the message echoes the key it got, as some
    servers do); ``delay_s`` is slept on every request; ``retry_after`` is the FLAKY 429's
    Retry-After header (None: none sent); ``report_usage`` False leaves ``usage`` out.
    """

    def __init__(self, responder: Callable[[str, int], list[str]] | None = None, api_key: str | None = None,
                 delay_s: float = 0.0, *, retry_after: str | None = "0", report_usage: bool = True,
                 ignore_n: bool = False, redirect_to: str = ""):
        self.redirect_to = redirect_to
        self.responder = responder or default_responder
        self.api_key = api_key
        self.delay_s = delay_s
        self.retry_after = retry_after
        self.report_usage = report_usage
        self.ignore_n = ignore_n
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def __enter__(self) -> StubServer:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.stub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="stub-openai", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()  # ends SLOW / delay_s waits at once
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def count(self, substring: str) -> int:
        """How many requests had a prompt containing ``substring``."""
        with self._lock:
            return sum(1 for r in self.requests if substring in (r["prompt"] or ""))

    # ------------------------------------------------------------------ used by the handler

    def _record(self, path: str, body: dict, authorization: str | None) -> int:
        """Record one request; returns how many requests this exact prompt has had, this one included."""
        prompt = _prompt_of(body)
        with self._lock:
            self.requests.append({"path": path, "prompt": prompt, "n": body.get("n", 1),
                                  "authorization": authorization, "body": body})
            self._seen[prompt] += 1
            return self._seen[prompt]

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds``; False when the server is shutting down meanwhile."""
        return seconds <= 0 or not self._stopping.wait(seconds)


def _prompt_of(body: dict) -> str | None:
    """The prompt text: the user message's content (chat) or the ``prompt`` field."""
    if "messages" in body:
        users = [m.get("content") for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else None
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else None


class _Handler(BaseHTTPRequestHandler):
    """Answers one request of the stub (the stub is ``self.server.stub``)."""

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def do_POST(self):  # noqa: N802 - http.server's naming
        stub: StubServer = self.server.stub
        stub._enter()
        self._counted = True
        try:
            self._answer(stub)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test); nothing to answer
        finally:
            self._done(stub)

    def send_response(self, code, message=None):
        # The request stops counting as in flight once its answer starts: the client may send its
        # next request as soon as it has read this one, before this thread gets to run again.
        self._done(self.server.stub)
        super().send_response(code, message)

    def _done(self, stub: StubServer) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            stub._leave()

    def _answer(self, stub: StubServer) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self._json(400, _error("request body is not JSON"))
        authorization = self.headers.get("Authorization")
        seen = stub._record(self.path, body, authorization)
        if self.path not in PATHS:
            return self._json(404, _error(f"no route {self.path}"))
        if not stub._wait(stub.delay_s):
            return None
        if stub.api_key is not None and authorization != f"Bearer {stub.api_key}":
            got = (authorization or "").removeprefix("Bearer ")
            return self._json(401, _error(f"Incorrect API key provided: {got!r}"))
        prompt = _prompt_of(body) or ""
        n = 1 if stub.ignore_n else int(body.get("n", 1))
        if "REDIRECT" in prompt:
            target = stub.redirect_to + self.path.removeprefix("/v1")
            return self._send(302, b"", "text/plain", {"Location": target})
        if "REFUSE" in prompt:
            return self._json(400, _error("This model's maximum context length is 8 tokens (stub refusal)"))
        if "FLAKY" in prompt and seen == 1:
            headers = {"Retry-After": stub.retry_after} if stub.retry_after is not None else {}
            return self._json(429, _error("rate limited (stub)"), headers)
        if "FLAKY" in prompt and seen == 2:
            return self._json(500, _error("internal error (stub)"))
        if "DOWN" in prompt:
            return self._json(503, _error("service unavailable (stub)"))
        if "SLOW" in prompt and not stub._wait(SLOW_S):
            return None
        if "CLOSE" in prompt and ("CLOSEONCE" not in prompt or seen == 1):
            self.close_connection = True
            return None
        if "GARBLEDONCE" in prompt and seen == 1:
            return self._send(200, b'{"choices": [{"index": 0, "mess', "application/json")
        if "GARBLED" in prompt and "GARBLEDONCE" not in prompt:
            return self._send(200, b"<html>this is not json</html>", "text/html")
        if "NOCHOICES" in prompt:
            return self._json(200, {"id": "stub", "object": "chat.completion", "usage": {"completion_tokens": 0}})
        texts = ["x" * 100_000] * n if "HUGE" in prompt else stub.responder(prompt, n)
        chat = self.path.endswith("/chat/completions")
        choices = [{"index": i, "finish_reason": "stop",
                    **({"message": {"role": "assistant", "content": t}} if chat else {"text": t})}
                   for i, t in enumerate(texts)]
        reply = {"id": "stub", "object": "chat.completion" if chat else "text_completion",
                 "model": body.get("model"), "choices": choices}
        if stub.report_usage:
            tokens = sum(len(t) for t in texts)
            reply["usage"] = {"prompt_tokens": len(prompt), "completion_tokens": tokens,
                              "total_tokens": len(prompt) + tokens}
        if "TRICKLE" in prompt:
            return self._trickle(stub, json.dumps(reply).encode())
        return self._json(200, reply)

    def _trickle(self, stub: StubServer, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for i in range(len(data)):
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            if not stub._wait(0.1):
                return

    def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _error(message: str) -> dict:
    """An OpenAI-shaped error body."""
    return {"error": {"message": message, "type": "invalid_request_error", "code": None}}
