"""A stage that does not fit the cluster waits for nodes to join (autoscaling), saying so, then
fails with the numbers; never a silent hang."""
from __future__ import annotations

import logging
import time

import pytest

from modecotd.errors import UserError


def test_a_missing_gpu_fails_at_once_where_no_node_can_join(ray_cluster):
    from modecotd.jobs.placement import wait_for_resources

    started = time.time()
    with pytest.raises(UserError, match=r"teacher actor needs 1 GPU but the Ray cluster has .*CPU.*lower teacher.gpus"):
        wait_for_resources({"GPU": 1}, "teacher actor", 0, "teacher.gpus_per_actor")
    assert time.time() - started < 5
    wait_for_resources({"CPU": 1}, "evaluator actor", 0, "evaluation.cpus_per_actor")  # fits: returns


def test_waiting_for_nodes_is_said_and_bounded(ray_cluster, caplog):
    from modecotd.jobs.placement import wait_for_resources

    started = time.time()
    with caplog.at_level(logging.WARNING, logger="modecotd.jobs.placement"):
        with pytest.raises(UserError, match=r"after waiting [0-9]+ s for nodes to join.*add nodes with GPU"):
            wait_for_resources({"GPU": 2, "CPU": 1}, "a training job", 3, "distill.gpus_per_worker")
    assert 3 <= time.time() - started < 15
    assert "waiting for the cluster to hold 2 GPU, 1 CPU" in caplog.text


def test_an_actor_that_cannot_be_placed_is_reported_with_the_numbers(ray_cluster):
    import ray

    from modecotd.jobs import placement

    @ray.remote(num_cpus=64)
    class Huge:
        def placed(self):
            return True

    actor = Huge.remote()
    try:
        with pytest.raises(UserError, match=r"teacher actors: 1 of 1 not placed after [0-9]+ s \(each needs 64 CPU"):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(placement, "START_GRACE_S", 0)
                placement.wait_until_placed([actor], "teacher actors", {"CPU": 64}, 2, "teacher.cpus_per_actor")
    finally:
        ray.kill(actor)


def test_a_teacher_that_loads_slowly_is_not_taken_for_one_that_cannot_be_placed(ray_cluster):
    """Placement is answered before the model loads: a pool whose backends load for longer than the
    placement timeout is waited for, not refused."""
    import ray

    from modecotd.jobs import placement
    from modecotd.jobs.teacher_stage import start_backends
    from modecotd.jobs.worker_pool import WorkerPool

    @ray.remote(num_cpus=0)
    class SlowLoader:
        def placed(self):
            return True

        def load(self):
            time.sleep(12)
            return True

    pool = WorkerPool("teacher actor", 2, lambda name: SlowLoader.options(name=name).remote(), max_restarts=0)
    try:
        with pytest.MonkeyPatch.context() as patch:
            # placement may take a few seconds on a busy machine (worker processes start); loading
            # takes longer than the whole timeout
            patch.setattr(placement, "START_GRACE_S", 6)
            started = time.time()
            start_backends(pool, {"CPU": 0}, 1)
        assert time.time() - started >= 12
    finally:
        pool.kill_all()
