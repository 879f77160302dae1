"""Progress from wherever the work runs to the driver's terminal.

The driver starts one small named actor (``modecotd-progress``, in the run's own Ray namespace);
any process of the run (teacher actors, Ray Train workers, Tune trials, evaluators, the driver
itself) sends it :class:`~modecotd.progress.Update` s with :func:`send`, and a thread in the driver
drains it every half second into a :class:`~modecotd.progress.ProgressBoard`.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import asdict

import ray

from modecotd.progress import ProgressBoard, Update

log = logging.getLogger(__name__)

HUB_NAME = "modecotd-progress"
DRAIN_EVERY_S = 0.5


@ray.remote(num_cpus=0)
class ProgressHub:
    """Holds updates until the driver takes them."""

    def __init__(self):
        self.pending: list[dict] = []

    def push(self, update: dict) -> None:
        self.pending.append(update)

    def drain(self) -> list[dict]:
        taken, self.pending = self.pending, []
        return taken


def _hub():
    """The run's hub, or None when the run has none (e.g. a stage run alone in a test). Looked up
    at every update (a few per second at most), never cached: a Ray worker process may serve
    several runs of one driver, each with its own hub."""
    try:
        return ray.get_actor(HUB_NAME)
    except ValueError:
        return None


def send(stage: str, unit: str, done: float, total: float | None, what: str, note: str = "",
         finished: bool = False) -> None:
    """Tell the driver where a unit of work stands (fire and forget; never raises, and never starts
    a Ray of its own outside one)."""
    if not ray.is_initialized():
        return
    try:
        hub = _hub()
        if hub is not None:
            hub.push.remote(asdict(Update(stage, unit, done, total, what, note, finished)))
    except Exception as exc:  # progress must never break the work
        log.debug("progress update lost: %s", exc)


@contextlib.contextmanager
def progress_display(board: ProgressBoard | None = None):
    """Start the hub and the drawing thread for the block; the board is closed at its end."""
    board = board or ProgressBoard()
    hub = ProgressHub.options(name=HUB_NAME).remote()
    stop = threading.Event()

    def drain_once() -> None:
        for update in ray.get(hub.drain.remote()):
            board.update(Update(**update))

    def loop() -> None:
        while not stop.wait(DRAIN_EVERY_S):
            try:
                drain_once()
            except Exception as exc:  # Ray going down under us: the run itself reports why
                log.debug("progress display stopped: %s", exc)
                return

    thread = threading.Thread(target=loop, name="modecotd-progress", daemon=True)
    thread.start()
    try:
        yield board
    finally:
        stop.set()
        thread.join(timeout=2)
        with contextlib.suppress(Exception):
            drain_once()
        board.close()
        with contextlib.suppress(Exception):
            ray.kill(hub)
