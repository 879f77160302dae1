"""A test that waits on a stage which could hang (the thing it tests is that it does not) fails
instead of hanging the suite."""
from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def fails_after(seconds: int, what: str):
    """Raise TimeoutError in the main thread if the block is still running after ``seconds``."""
    def ring(*_):
        raise TimeoutError(f"{what} still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
