"""The distill stage on a local Ray: a killed training worker resumes from its checkpoint."""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import asdict

import safetensors.torch

from modecotd.distill import DistillSettings
from modecotd.tasks.generators import generate

# Ray is imported inside the tests, never at collection (see tests/test_cluster.py).


def settings_for(tiny_model_dir, output_dir, **changes) -> dict:
    rows = [{"question": e.question, "answer": e.answer, "rationale": e.rationale}
            for e in generate("coin_flip", 24, seed=1, size=2)]
    settings = DistillSettings(student_dir=str(tiny_model_dir), dtype="fp32", kind="yes_no", rows=rows,
                               output_dir=str(output_dir), lora_r=4, lora_alpha=8, learning_rate=5e-3,
                               batch_size=2, epochs=3, zero_stage=2, max_length=160, seed=5, checkpoint_every=4)
    return asdict(settings) | changes


def alive_train_workers() -> list:
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])


def test_a_killed_training_worker_resumes_from_its_checkpoint(ray_cluster, tiny_model_dir, tmp_path):
    import ray

    from modecotd.artifacts import Unit
    from modecotd.jobs.distill_stage import fit_expert
    from modecotd.storage import Storage

    run = Storage(tmp_path)
    storage = tmp_path / "ray"
    undisturbed = Unit(run, "experts/undisturbed", "k")
    reference = ray.get(fit_expert.remote("ref", undisturbed, str(tiny_model_dir), settings_for(tiny_model_dir, ""),
                                          1, 1, (run, "ray"), "distill-ref", 0))

    killed = Unit(run, "experts/killed", "k")
    victims: list[int] = []

    def kill_after_a_registered_checkpoint():
        # A worker's checkpoint counts once the Ray Train controller has registered it, which it
        # records in its checkpoint manager snapshot; kill the worker only then.
        snapshot = storage / "distill-killed" / "checkpoint_manager_snapshot.json"
        deadline = time.time() + 120
        while time.time() < deadline:
            if snapshot.is_file() and "checkpoint_" in snapshot.read_text(errors="ignore"):
                workers = alive_train_workers()
                if workers:
                    os.kill(workers[0].pid, signal.SIGKILL)
                    victims.append(workers[0].pid)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_a_registered_checkpoint)
    killer.start()
    summary = ray.get(fit_expert.remote("killed", killed, str(tiny_model_dir), settings_for(tiny_model_dir, ""),
                                        1, 1, (run, "ray"), "distill-killed", 2))
    killer.join()
    assert victims, "no training worker was killed"
    assert summary["resumed_from_step"] is not None and summary["resumed_from_step"] >= 4
    assert summary["steps"] == reference["steps"] == summary["planned_steps"]
    assert undisturbed.done() and killed.done()  # rank 0 committed each unit to the run's storage
    before = safetensors.torch.load_file(undisturbed.local() / "adapter_model.safetensors")
    after = safetensors.torch.load_file(killed.local() / "adapter_model.safetensors")
    for name in before:  # the same seed gives the same adapter, killed or not
        assert (before[name] - after[name]).abs().max() < 1e-5, name


def test_jobs_queue_to_what_the_cluster_holds():
    from types import SimpleNamespace

    from modecotd.jobs.distill_stage import concurrent_jobs

    def cfg(**changes):
        return SimpleNamespace(**({"workers_per_job": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 1.0,
                                   "use_gpu": False, "max_concurrent_jobs": 4} | changes))

    assert concurrent_jobs(cfg(), {"CPU": 2.0}) == (2, None)
    assert concurrent_jobs(cfg(workers_per_job=2), {"CPU": 2.0}) == (1, None)
    assert concurrent_jobs(cfg(max_concurrent_jobs=1), {"CPU": 16.0}) == (1, None)
    assert concurrent_jobs(cfg(use_gpu=True), {"CPU": 16.0, "GPU": 2.0}) == (2, None)
    limit, problem = concurrent_jobs(cfg(workers_per_job=3), {"CPU": 2.0})
    assert limit == 0 and "needs 3 CPU" in problem and "has 2" in problem
    assert "GPU" in concurrent_jobs(cfg(use_gpu=True), {"CPU": 16.0})[1]


def test_concurrency_limit_and_a_failed_expert_does_not_stop_the_others(ray_cluster, tiny_model_dir, tmp_path):
    from modecotd.artifacts import Unit, write_jsonl
    from modecotd.config import parse_config
    from modecotd.jobs.distill_stage import run_distill_stage
    from modecotd.plan import RunLayout, Training
    from modecotd.storage import Storage

    tasks_config = [{"name": name, "role": "seen", "source": {"kind": "generated", "family": "coin_flip", "size": 2}}
                    for name in ("one", "two", "bad")]
    config = parse_config({"name": "d", "tasks": tasks_config, "student": {"model": "builtin:tiny", "dtype": "fp32"},
                           "distill": {"epochs": 1, "batch_size": 4, "max_length": 160, "max_concurrent_jobs": 1, "max_failures": 0,
                                       "lora": {"r": 4, "alpha": 8}}})
    from modecotd.jobs.driver import load_tasks

    tasks = load_tasks(config)
    storage = Storage(tmp_path)
    jobs, units = {}, {}
    for name in ("one", "two", "bad"):
        rows = [{"question": e.question, "answer": e.answer, "rationale": e.rationale} for e in tasks[name].train][:8]
        if name == "bad":
            rows = [{**row, "rationale": "word " * 400} for row in rows]  # nothing fits in max_length
        rationales = Unit(storage, f"rationales/{name}", "r")
        with rationales.writing() as staging:
            write_jsonl(staging / "accepted.jsonl", rows)
        units[name] = Unit(storage, f"experts/{name}", f"key-{name}")
        jobs[name] = Training(name, units[name], ((rationales, "yes_no"),))
    results = run_distill_stage(config, RunLayout(storage), jobs)
    assert results["bad"]["status"] == "failed" and "max_length" in results["bad"]["error"]
    assert results["one"]["status"] == results["two"]["status"] == "done"
    assert units["one"].done() and units["two"].done() and not units["bad"].done()
    first, second = sorted((results[n]["started_at"], results[n]["finished_at"]) for n in ("one", "two"))
    assert first[1] <= second[0]  # max_concurrent_jobs=1: never two at once
