"""The one queue-wait-retry loop of the stages that run many pieces of work on Ray: the teacher's
shards and the evaluation's (task, system) pairs on pools of actors, the distill stage's training
jobs as Ray tasks.

A pool has a fixed number of slots. With ``make``, each slot holds an actor (named
``<prefix>-<slot>``, its replacements ``<prefix>-<slot>-restart<n>``) that takes up to
``per_worker`` items at once and answers the liveness pings of :mod:`modecotd.jobs.liveness`: one
that stops answering is killed. Without ``make`` a slot is only a place: ``submit`` starts a Ray
task for the item (the distill stage's Ray Train jobs watch their own workers).

What comes back for an item:
- its result: ``done(item, result)``;
- the error its work raised (or a Ray task's lost worker): ``failed(item, reason, error)``;
- its actor's death: the actor is replaced while its slot has restarts left (``max_restarts``;
  None: always) and the item goes round again while it has tries left (``retries_per_item``;
  None: always), else ``failed``. When every slot has lost its actor for good, the pool raises
  ``all_dead`` (a :class:`~modecotd.errors.UserError` or subclass naming the setting to change).
"""
from __future__ import annotations

import logging
from collections import Counter, deque
from typing import Callable, Iterable

import ray

from modecotd.errors import UserError
from modecotd.jobs.liveness import Liveness
from modecotd.jobs.placement import wait_until_placed
from modecotd.jobs.ray_runtime import root_cause

log = logging.getLogger(__name__)


class WorkerPool:
    """``size`` slots, each with an actor made by ``make`` or, without it, a place for one Ray task
    at a time (see the module's text)."""

    def __init__(self, what: str, size: int, make: Callable[[str], object] | None = None, *, prefix: str = "",
                 per_worker: int = 1, max_restarts: int | None = None, retries_per_item: int | None = None,
                 stall_s: float = 0.0, start_s: float = 0.0, all_dead: Exception | None = None,
                 label: Callable[[object], str] = str):
        self.what, self.make, self.prefix, self.per_worker, self.label = what, make, prefix, per_worker, label
        self.max_restarts, self.retries_per_item, self.all_dead = max_restarts, retries_per_item, all_dead
        self.restarts = Counter()
        self.busy = Counter()  # items in hand per slot, of the slot's current actor
        self.slots = list(range(size))
        self.actors = {slot: make(f"{prefix}-{slot}") for slot in self.slots} if make else {}
        self.liveness = Liveness(stall_s, what, start_s) if make else None

    def wait_until_placed(self, what: str, need_each: dict, wait_s: float, settings: str) -> None:
        """Every actor placed on a node within ``wait_s`` (see :func:`modecotd.jobs.placement.wait_until_placed`),
        or every actor killed and the reason raised."""
        try:
            wait_until_placed(list(self.actors.values()), what, need_each, wait_s, settings)
        except UserError:
            self.kill_all()
            raise

    def kill_all(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()

    def run(self, items: Iterable, submit: Callable, done: Callable, failed: Callable) -> None:
        """Every item of ``items`` (read as slots come free: it may be a generator) through
        ``submit(actor, item) -> ObjectRef`` (``actor`` None without ``make``) to ``done`` or
        ``failed``. The pool's actors are killed at the end, however it ends."""
        feed, again = iter(items), deque()
        running: dict = {}  # ref -> (slot, actor, item)
        tries = Counter()  # actor deaths per item (by id)
        try:
            while True:
                for slot in self._free():
                    item = again.popleft() if again else next(feed, None)
                    if item is None:
                        break
                    actor = self.actors.get(slot)
                    running[submit(actor, item)] = (slot, actor, item)
                    self.busy[slot] += 1
                if not running:
                    return
                ref = self._wait(running)
                if ref is None:
                    continue
                slot, actor, item = running.pop(ref)
                current = self.actors.get(slot) is actor
                if current:
                    self.busy[slot] -= 1
                self._settle(ref, slot, actor, item, current, again, tries, done, failed)
        finally:
            self.kill_all()

    def _free(self) -> list[int]:
        """A slot once for every item it can take now."""
        slots = self.actors if self.make else self.slots
        return [slot for slot in slots for _ in range(self.per_worker - self.busy[slot])]

    def _wait(self, running: dict):
        if self.liveness is None:
            return ray.wait(list(running), num_returns=1)[0][0]
        held = {slot: actor for slot, actor, _ in running.values() if self.actors.get(slot) is actor}
        return self.liveness.wait(list(running), held)  # a stalled actor's work comes back as its death

    def _settle(self, ref, slot: int, actor, item, current: bool, again: deque, tries: Counter, done, failed) -> None:
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as error:
            if self.make is None:
                failed(item, root_cause(error), error)
                return
            if current:  # the other items that actor held come back through here too: replace it once
                self._replace(slot)
            tries[id(item)] += 1
            if self.retries_per_item is None or tries[id(item)] <= self.retries_per_item:
                log.warning("%s %s died with %s in hand (%s); trying it again", self.what, slot, self.label(item),
                            root_cause(error))
                again.append(item)
            else:
                failed(item, root_cause(error), error)
            if not self.actors and self.all_dead is not None:
                raise self.all_dead from None
        except ray.exceptions.RayError as error:  # the work's own error: the item fails, the others go on
            failed(item, root_cause(error), error)
        else:
            done(item, result)

    def _replace(self, slot: int) -> None:
        """A new actor in the slot, with nothing in hand (what the dead one held comes back as its
        death, item by item)."""
        ray.kill(self.actors.pop(slot), no_restart=True)
        self.busy[slot] = 0
        if self.max_restarts is None or self.restarts[slot] < self.max_restarts:
            self.restarts[slot] += 1
            self.actors[slot] = self.make(f"{self.prefix}-{slot}-restart{self.restarts[slot]}")
