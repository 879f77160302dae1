"""A :class:`~modecotd.backends.TextGenerator` for any server speaking the OpenAI API.

Works with vLLM's ``vllm serve``, hosted endpoints and anything else that answers
``POST {url}/chat/completions`` (chat messages) or ``POST {url}/completions`` (text).
Only the standard library is used: one HTTP request per prompt (``n=samples``), a bounded
thread pool, and retries with exponential backoff for failures another try may fix (429, 5xx,
timeouts, dropped connections, malformed replies). A server that sends fewer choices than asked
(llama.cpp's server ignores ``n``) is asked again for the missing samples, each time with a new seed.

The API key is sent as a Bearer header and is kept out of ``repr``, log records and every
error string (a server that echoes the key back has it masked). Redirects are never followed (the
key would go wherever a server points), a reply larger than ``max_reply_bytes`` is refused, and
``timeout_s`` is one request's whole time: a server that trickles its reply is cut off there.
"""
from __future__ import annotations

import http.client
import json
import logging
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from modecotd.backends import Completion, cut_at_stop
from modecotd.errors import ModelError

log = logging.getLogger(__name__)

APIS = {"chat": "/chat/completions", "completions": "/completions"}
MAX_STOP_SENT = 4  # the OpenAI API accepts at most 4 stop strings; the rest are cut locally
MAX_WAIT_S = 60.0  # cap on a server's Retry-After (and on our own backoff)
MESSAGE_CHARS = 200  # how much of a server's error message goes into an error string
MAX_REPLY_BYTES = 64 * 2**20  # a reply larger than this is refused (a completion is a few KiB)

_sleep = time.sleep  # one place to stub out waiting in tests


def resolve_api_key(env_name: str | None) -> str | None:
    """The API key held in the environment variable ``env_name`` (None when no variable is named)."""
    if env_name is None:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise ModelError(f"teacher.endpoint.api_key_env: the environment variable {env_name} is not set "
                         "(it holds the endpoint's API key)")
    return key


class _Retry(Exception):
    """A failure another try may fix: HTTP 429, a 5xx, a dropped connection, a timeout, a malformed reply."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class _Fail(Exception):
    """A failure another try will not fix; its message becomes the prompt's error."""


class OpenAIGenerator:
    """Generates through an OpenAI-compatible endpoint at ``url`` (e.g. ``http://127.0.0.1:8000/v1``).

    A prompt that is a list of chat messages (``teacher.prompt_format: chat``) goes to
    ``/chat/completions``; a text prompt (``raw``) to ``/completions``, as it is. At most
    ``concurrency`` requests are in flight; ``timeout_s`` bounds each request as a whole (connect,
    send, the full reply); a retryable failure is tried again up to
    ``max_retries`` times, waiting ``backoff_s * 2**attempt`` seconds (or the server's numeric
    Retry-After).
    """

    def __init__(self, url: str, model: str, *, api_key: str | None = None,
                 concurrency: int = 8, timeout_s: float = 60.0, max_retries: int = 5, backoff_s: float = 1.0,
                 max_reply_bytes: int = MAX_REPLY_BYTES):
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, not {max_retries}")
        self.url = url.rstrip("/")
        self.model = model
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._api_key = api_key or None
        self.max_reply_bytes = max_reply_bytes
        self._told_short = False  # warned once that the server sends fewer choices than asked

    def __repr__(self) -> str:
        return f"OpenAIGenerator(url={self.url!r}, model={self.model!r})"

    __str__ = __repr__

    # ------------------------------------------------------------------ the TextGenerator contract

    def generate(self, prompts: list[str | list[dict]], *, samples: int, temperature: float, max_new_tokens: int,
                 stop: list[str], seed: int) -> list[Completion]:
        """One Completion per prompt, in order; a prompt that fails gets ``error`` set, never an exception."""
        if not prompts:
            return []
        stop = list(stop)
        params = {"model": self.model, "n": samples, "temperature": temperature,
                  "max_tokens": max_new_tokens, "seed": seed}
        if stop:
            params["stop"] = stop[:MAX_STOP_SENT]

        def one(index: int) -> Completion:
            return self._samples(index, prompts[index], params, stop)

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(one, range(len(prompts))))

    # ------------------------------------------------------------------ one prompt

    def _samples(self, index: int, prompt: str | list[dict], params: dict, stop: list[str]) -> Completion:
        """All ``n`` samples of one prompt. Each request asks for the samples still missing, with the
        seed moved on (a server that honours the seed would otherwise repeat its sample); at most
        ``n`` requests, since every successful one brings at least one choice. Should a later request
        fail, the samples already in hand are kept (the stage counts what was asked and what came)."""
        wanted = params["n"]
        endpoint = self.url + APIS["completions" if isinstance(prompt, str) else "chat"]
        texts: list[str] = []
        tokens = 0
        for round_ in range(wanted):
            missing = wanted - len(texts)
            if missing <= 0:
                break
            got = self._complete(index, endpoint,
                                 self._body(prompt, {**params, "n": missing, "seed": params["seed"] + round_}), stop)
            if got.error is not None:
                if not texts:
                    return got
                log.warning("%s: prompt %d: kept %d of %d samples: %s", endpoint, index, len(texts), wanted,
                            got.error)
                break
            if len(got.texts) < missing and not self._told_short:
                self._told_short = True
                log.warning("%s: asked for %d choices, got %d: the server seems to ignore 'n'; asking again for "
                            "the missing samples", endpoint, missing, len(got.texts))
            texts += got.texts[:missing]
            tokens += got.tokens
        return Completion(texts=texts, tokens=tokens)

    def _body(self, prompt: str | list[dict], params: dict) -> bytes:
        """The JSON request body for one prompt: its messages, or its text."""
        payload = {**params, "prompt": prompt} if isinstance(prompt, str) else {**params, "messages": prompt}
        return json.dumps(payload).encode("utf-8")

    def _complete(self, index: int, endpoint: str, body: bytes, stop: list[str]) -> Completion:
        """Send one prompt's request, retrying what may pass on another try, and read its texts."""
        attempts = self.max_retries + 1
        reason = ""
        for attempt in range(attempts):
            try:
                return _parse(self._post(endpoint, body), stop)
            except _Fail as failure:
                return Completion(error=self._redact(str(failure)))
            except _Retry as retry:
                reason = self._redact(str(retry))
                if attempt + 1 == attempts:
                    break
                wait = retry.retry_after if retry.retry_after is not None else self.backoff_s * 2 ** attempt
                wait = min(wait, MAX_WAIT_S)
                log.warning("%s: prompt %d: %s; retry %d of %d in %.2f s",
                            endpoint, index, reason, attempt + 1, self.max_retries, wait)
                _sleep(wait)
            except Exception as unexpected:  # one prompt's failure never stops the batch
                message = self._redact(f"{type(unexpected).__name__}: {unexpected}")
                log.error("%s: prompt %d: unexpected failure: %s", endpoint, index, message)
                return Completion(error=f"endpoint call failed: {message}")
        return Completion(error=f"endpoint failed after {attempts} attempts: {reason}")

    def _post(self, endpoint: str, body: bytes) -> dict:
        """One POST of ``body``; the decoded JSON reply, or :class:`_Retry` / :class:`_Fail`."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        deadline = _Deadline(self.timeout_s)
        try:
            with deadline, _opener(deadline).open(request, timeout=self.timeout_s) as response:
                raw = response.read(self.max_reply_bytes + 1)
        except urllib.error.HTTPError as error:
            status = error.code
            if 300 <= status < 400:
                where = _short(error.headers.get("Location") or "no Location header")
                raise _Fail(f"endpoint answered HTTP {status}, a redirect to {where}: redirects are not followed "
                            "(the API key goes to no other address); set teacher.endpoint.url to the address "
                            "that answers") from None
            message = _server_message(error)
            if status == 429 or status >= 500:
                raise _Retry(f"HTTP {status}: {message}", _retry_after(error.headers)) from None
            raise _Fail(f"endpoint refused the request (HTTP {status}): {message}") from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError) or deadline.expired:
                raise _Retry(f"timed out after {self.timeout_s:g} s") from None
            raise _Retry(f"connection failed: {error.reason}") from None
        except TimeoutError:
            raise _Retry(f"timed out after {self.timeout_s:g} s") from None
        except (OSError, http.client.HTTPException) as error:
            if deadline.expired:
                raise _Retry(f"timed out after {self.timeout_s:g} s") from None
            raise _Retry(f"connection failed: {type(error).__name__}: {error}") from None
        if deadline.expired:
            raise _Retry(f"timed out after {self.timeout_s:g} s")
        if len(raw) > self.max_reply_bytes:
            raise _Fail(f"the endpoint's reply is larger than {self.max_reply_bytes} bytes; refused")
        try:
            return json.loads(raw)
        except ValueError:  # a proxy's error page or a cut-off body: another try may be whole
            raise _Retry(f"malformed response (not JSON): {_short(raw)}") from None

    def _redact(self, text: str) -> str:
        """``text`` with the API key masked, should a server have echoed it."""
        return text.replace(self._api_key, "***") if self._api_key else text


class _Deadline:
    """One request's whole time: when it runs out, the request's sockets are shut down, which
    ends a read that a trickling server would keep alive forever (a socket timeout bounds each
    read alone). Used as a context manager around the request."""

    def __init__(self, seconds: float):
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # closed already


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx reply is handed back as an error instead of being followed with the API key."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """An opener whose connections register their sockets with ``deadline`` and that follows no
    redirect (proxies from the environment still apply)."""

    def watched(base):
        class Watched(base):
            def connect(self):
                super().connect()
                deadline.watch(self.sock)
        return Watched

    http_class, https_class = watched(http.client.HTTPConnection), watched(http.client.HTTPSConnection)

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_class, req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            extra = {"check_hostname": self._check_hostname} if hasattr(self, "_check_hostname") else {}
            return self.do_open(https_class, req, context=self._context, **extra)

    return urllib.request.build_opener(_NoRedirects, HTTP, HTTPS)


def _parse(reply: object, stop: list[str]) -> Completion:
    """The Completion in a decoded reply: texts cut at the stop strings, tokens from ``usage``."""
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices:
        raise _Retry(f"malformed response (no choices): {_short(json.dumps(reply))}")
    texts = []
    for choice in sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0):
        text = _choice_text(choice)
        if text is None:
            raise _Retry(f"malformed response (a choice without text): {_short(json.dumps(choice))}")
        texts.append(cut_at_stop(text, stop))
    usage = reply.get("usage")
    used = usage.get("completion_tokens") if isinstance(usage, dict) else None
    tokens = used if isinstance(used, int) else sum(len(t.split()) for t in texts)
    return Completion(texts=texts, tokens=tokens)


def _choice_text(choice: object) -> str | None:
    """A choice's text: ``message.content`` (chat) or ``text`` (completions); None when it has neither."""
    if not isinstance(choice, dict):
        return None
    message = choice.get("message")
    if isinstance(message, dict) and "content" in message:
        return message["content"] or ""  # null content (e.g. a tool call) counts as empty text
    text = choice.get("text")
    return text if isinstance(text, str) else None


def _server_message(error: urllib.error.HTTPError) -> str:
    """The short message of an HTTP error reply (OpenAI's ``error.message`` when there is one)."""
    try:
        raw = error.read()
    except (OSError, http.client.HTTPException):
        raw = b""
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        inner = payload.get("error", payload)
        if isinstance(inner, dict):
            inner = inner.get("message") or inner.get("detail") or inner
        if isinstance(inner, str):
            return _short(inner)
    return _short(raw) or str(error.reason)


def _retry_after(headers) -> float | None:
    """A numeric Retry-After header in seconds (dates and junk are ignored)."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _short(text: str | bytes) -> str:
    """``text`` on one line, cut to about :data:`MESSAGE_CHARS` characters."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS - 3] + "..."
