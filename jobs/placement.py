"""Waiting for a cluster to hold what a stage asks for, with autoscaling in mind.

On an autoscaled cluster (KubeRay, `ray up`) the GPU nodes may not exist yet when a stage starts:
a stage whose actors or jobs do not fit what the cluster holds now waits for nodes to join, up to
``resources.placement_timeout_s``, saying what it waits for, and then fails with the numbers.
Never a silent hang. A cluster that this run started itself gains no nodes, so there nothing is
waited for.
"""
from __future__ import annotations

import logging
import time

import ray

from modecotd.errors import UserError

log = logging.getLogger(__name__)
POLL_S = 2.0
SAY_EVERY_S = 30.0
START_GRACE_S = 120.0


def _in_words(resources: dict) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in resources.items() if amount) or "nothing"


def _short(need: dict, have: dict) -> dict:
    return {name: amount for name, amount in need.items() if amount > have.get(name, 0)}


def wait_for_resources(need: dict, what: str, timeout_s: float, config_key: str) -> None:
    """Return once the cluster's total resources hold ``need`` (e.g. {"GPU": 1}); wait up to
    ``timeout_s`` for nodes to join first, then raise a UserError with the numbers."""
    started, last_said = time.time(), None
    while True:
        have = ray.cluster_resources()
        short = _short(need, have)
        if not short:
            return
        waited = time.time() - started
        if waited >= timeout_s:
            raise UserError(f"{what} needs {_in_words(need)} but the Ray cluster has {_in_words(have)}"
                            + (f" after waiting {waited:.0f} s for nodes to join" if timeout_s else "")
                            + f"; add nodes with {', '.join(short)} or lower {config_key}")
        if last_said is None or time.time() - last_said >= SAY_EVERY_S:
            log.warning("%s: waiting for the cluster to hold %s (it has %s; up to %.0f s more)", what,
                        _in_words(need), _in_words(have), timeout_s - waited)
            last_said = time.time()
        time.sleep(POLL_S)


def wait_until_placed(actors: list, what: str, need_each: dict, timeout_s: float, config_key: str) -> None:
    """Wait for actors to be placed on a node and started: each answers its ``placed`` method, which
    its class keeps free of any slow work (models load at the first real call, not in the
    constructor, so a teacher that loads for ten minutes is never taken for one that cannot be
    placed). Those not placed within ``timeout_s`` (at least START_GRACE_S, the time a worker
    process takes to start on a busy machine) raise a UserError saying how many, what each needs and
    what the cluster holds. A constructor that fails is left to the caller's next call to raise."""
    refs = {actor.placed.remote(): actor for actor in actors}
    pending, timeout_s = dict(refs), max(timeout_s, START_GRACE_S)
    started = last_said = time.time()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
        for ref in ready:
            pending.pop(ref)
        if not pending:
            return
        waited = time.time() - started
        if waited >= timeout_s:
            raise UserError(f"{what}: {len(pending)} of {len(refs)} not placed after {waited:.0f} s (each needs "
                            f"{_in_words(need_each)}; the cluster has {_in_words(ray.cluster_resources())}, "
                            f"free now {_in_words(ray.available_resources())}); add nodes or lower {config_key}")
        if time.time() - last_said >= SAY_EVERY_S:
            log.warning("%s: %d of %d still waiting to be placed (each needs %s; free now: %s)", what, len(pending),
                        len(refs), _in_words(need_each), _in_words(ray.available_resources()))
            last_said = time.time()
