"""The one queue-wait-retry loop of the teacher, distill and evaluate stages (jobs/worker_pool.py),
on a local Ray with tiny actors and tasks."""
from __future__ import annotations

import os
import time

import pytest

from modecotd.errors import ModelError


def doubler():
    import ray

    from modecotd.jobs.liveness import LIVENESS_GROUP

    @ray.remote(num_cpus=0, concurrency_groups=LIVENESS_GROUP)
    class Doubler:
        @ray.method(concurrency_group="liveness")
        def alive(self):
            return True

        def work(self, item):
            if item == "die":
                os._exit(1)
            if item == "raise":
                raise ValueError("no double for that")
            time.sleep(0.05)
            return item * 2

    return Doubler


def outcomes(pool, items, submit):
    done, failed = {}, {}
    pool.run(items, submit, lambda item, result: done.__setitem__(item, result),
             lambda item, reason, error: failed.__setitem__(item, reason))
    return done, failed


def test_every_item_comes_back_done_or_failed_and_the_actors_are_gone(ray_cluster):
    from ray.util.state import list_actors

    from modecotd.jobs.worker_pool import WorkerPool

    Doubler = doubler()
    pool = WorkerPool("doubler", 2, lambda name: Doubler.options(name=name).remote(), prefix="pool-a", per_worker=2)
    done, failed = outcomes(pool, iter([1, 2, "raise", 3, 4]), lambda actor, item: actor.work.remote(item))
    assert done == {1: 2, 2: 4, 3: 6, 4: 8}
    assert list(failed) == ["raise"] and "no double for that" in failed["raise"]
    time.sleep(1)
    alive = [a.name for a in list_actors(filters=[("state", "=", "ALIVE")]) if (a.name or "").startswith("pool-a")]
    assert alive == [] and pool.actors == {}


def test_a_dead_actor_is_replaced_in_its_slot_and_its_item_tried_again_while_it_has_tries(ray_cluster):
    from modecotd.jobs.worker_pool import WorkerPool

    Doubler = doubler()
    made = []

    def make(name):
        made.append(name)
        return Doubler.options(name=name).remote()

    first_try = set()

    def submit(actor, item):  # "flaky" kills its actor the first time only
        if item == "flaky" and item not in first_try:
            first_try.add(item)
            return actor.work.remote("die")
        return actor.work.remote(3 if item == "flaky" else item)

    pool = WorkerPool("doubler", 1, make, prefix="pool-b", retries_per_item=1)
    done, failed = outcomes(pool, ["flaky", 5], submit)
    assert done == {"flaky": 6, 5: 10} and failed == {}
    assert made == ["pool-b-0", "pool-b-0-restart1"]

    pool = WorkerPool("doubler", 1, lambda name: Doubler.options(name=name).remote(), prefix="pool-c",
                      retries_per_item=1)
    done, failed = outcomes(pool, ["die", 7], lambda actor, item: actor.work.remote(item))
    assert done == {7: 14} and list(failed) == ["die"]  # died twice: out of tries


def test_a_replacement_actor_takes_as_many_items_at_once_as_the_one_it_replaced(ray_cluster):
    """The dead actor's other items come back as its death one by one: they must not keep counting
    against the new actor's share (it took one item at a time after a death)."""
    from modecotd.jobs.worker_pool import WorkerPool

    Doubler = doubler()
    in_hand: dict = {}  # actor -> items handed to it and not yet back
    most: dict = {}
    first_try = set()

    def submit(actor, item):
        in_hand[actor] = in_hand.get(actor, 0) + 1
        most[actor] = max(most.get(actor, 0), in_hand[actor])
        owner[item] = actor
        if item == "flaky" and item not in first_try:
            first_try.add(item)
            return actor.work.remote("die")
        return actor.work.remote(3 if item == "flaky" else item)

    owner: dict = {}

    def back(item, *_):
        in_hand[owner[item]] -= 1

    pool = WorkerPool("doubler", 1, lambda name: Doubler.options(name=name).remote(), prefix="pool-e",
                      per_worker=2)
    pool.run(["flaky", 1, 2, 3, 4, 5, 6], submit, back, back)
    first, second = list(most)  # the first actor and its replacement
    assert most[first] == 2 and most[second] == 2


def test_a_pool_whose_actors_are_all_dead_for_good_raises_what_it_was_given(ray_cluster):
    from modecotd.jobs.worker_pool import WorkerPool

    Doubler = doubler()
    pool = WorkerPool("doubler", 1, lambda name: Doubler.options(name=name).remote(), prefix="pool-d",
                      max_restarts=0, all_dead=ModelError("every doubler died"))
    with pytest.raises(ModelError, match="every doubler died"):
        outcomes(pool, ["die", 1], lambda actor, item: actor.work.remote(item))


def test_without_actors_a_pool_runs_tasks_at_most_its_size_at_once(ray_cluster):
    import ray

    from modecotd.jobs.worker_pool import WorkerPool

    @ray.remote(num_cpus=0)
    def span(item):
        started = time.time()
        time.sleep(0.5)
        if item == 3:
            raise RuntimeError("job 3 failed")
        return started, time.time()

    fed = []

    def items():  # read lazily: never more items out than slots free
        for item in range(6):
            fed.append(item)
            yield item

    fed_at_submit = []

    def submit(actor, item):
        assert actor is None
        fed_at_submit.append(len(fed))
        return span.remote(item)

    done, failed = outcomes(WorkerPool("job", 2), items(), submit)
    assert fed_at_submit == [1, 2, 3, 4, 5, 6]
    assert sorted(done) == [0, 1, 2, 4, 5] and "job 3 failed" in failed[3]
    spans = sorted(done.values())
    most = max(sum(start < moment < end for start, end in spans) for moment in [s + 0.01 for s, _ in spans])
    assert most <= 2, spans
