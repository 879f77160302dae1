"""Noticing an actor that stopped answering: stopped (SIGSTOP), frozen, or cut off by the network.

A pool's actors answer :data:`PING` in a concurrency group of their own (:data:`LIVENESS_GROUP`),
so a busy actor answers at once while its work goes on. The pool waits on its work with a timeout
and, each time, asks :meth:`Liveness.stalled` which actors holding work have left a ping unanswered
for longer than ``resources.stall_timeout_s``; it kills those, and the work they held comes back
through the pool's own path for a dead actor (re-queued, the actor replaced). Ray Train's workers
have their own health check, set to the same time (:func:`train_health_env`).
"""
from __future__ import annotations

import logging
import time

import ray

log = logging.getLogger(__name__)

LIVENESS_GROUP = {"liveness": 1}  # @ray.remote(concurrency_groups=...) of an actor that answers pings
PING = "alive"  # the method, in that group, that answers True
WAIT_S = 1.0  # how long a pool waits on its work before it looks at its actors again
START_S = 60.0  # at least this long for an actor that never answered to start: a replacement may queue for CPUs


class Liveness:
    """The pings in flight of one pool's actors, by a key the pool chooses (a slot). An actor that
    has never answered may still be waiting for a node or for CPUs other actors hold: it is given
    ``start_s`` more (the stage's placement wait), and at least :data:`START_S`, before it counts as
    stalled."""

    def __init__(self, stall_s: float, what: str, start_s: float = 0.0):
        self.stall_s, self.start_s, self.what = stall_s, start_s, what
        self.pings: dict = {}  # key -> (actor, ping ref, sent at)
        self.seen: set = set()  # ids of the actors that have answered once

    def stalled(self, busy: dict) -> list:
        """The keys of ``busy`` ({key: actor holding work}) whose actor has not answered a ping for
        over ``stall_s``; each is logged. An actor that answered is pinged again."""
        now = time.monotonic()
        for key in [key for key in self.pings if key not in busy or self.pings[key][0] is not busy[key]]:
            del self.pings[key]  # idle now, or replaced
        stalled = []
        for key, actor in busy.items():
            if key not in self.pings:
                self.pings[key] = (actor, getattr(actor, PING).remote(), now)
                continue
            _, ref, sent = self.pings[key]
            answered, _ = ray.wait([ref], timeout=0)
            if answered:
                self.seen.add(actor._actor_id)
                self.pings[key] = (actor, getattr(actor, PING).remote(), now)
                continue
            allowed = self.stall_s + (0 if actor._actor_id in self.seen else max(self.start_s, START_S))
            if now - sent > allowed:
                log.warning("%s %s has not answered for %.0f s (resources.stall_timeout_s): stopped, frozen or cut "
                            "off; it is killed and its work goes to another", self.what, key, now - sent)
                del self.pings[key]
                stalled.append(key)
        return stalled

    def wait(self, pending: list, busy: dict):
        """Wait up to :data:`WAIT_S` for one of ``pending``; meanwhile kill every actor of ``busy``
        that :meth:`stalled` names (its work then fails as an actor's death, which the pool already
        handles). Returns the ref that is ready, or None."""
        ready, _ = ray.wait(pending, num_returns=1, timeout=WAIT_S)
        for key in self.stalled(busy):
            ray.kill(busy[key], no_restart=True)
        return ready[0] if ready else None


def train_health_env(stall_s: float) -> dict[str, str]:
    """The environment that makes Ray Train give up on a worker that has not answered its health
    check for ``stall_s`` (then the job restarts from its last checkpoint, up to max_failures)."""
    return {"RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": str(stall_s)}
