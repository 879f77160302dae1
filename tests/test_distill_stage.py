"""The distill stage on a local Ray: jobs queue to what the cluster holds, a failed expert does not
stop the others. (A killed worker node resuming from its checkpoint: tests/test_cluster_isolated.py.)"""
from __future__ import annotations

from modecotd.outcome import Failed

# Ray is imported inside the tests, never at collection (see tests/test_cluster.py).


def test_jobs_queue_to_what_the_cluster_holds():
    from modecotd.config import DistillConfig
    from modecotd.jobs.distill_stage import concurrent_jobs

    def cfg(**changes):
        return DistillConfig(**({"workers_per_job": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 1.0,
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
    from modecotd.config_loading import parse_config
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
    assert isinstance(results["bad"], Failed) and "max_length" in results["bad"].reason
    assert results["one"].summary.status == results["two"].summary.status == "done"
    assert units["one"].done() and units["two"].done() and not units["bad"].done()
    first, second = sorted((results[n].summary.started_at, results[n].summary.finished_at) for n in ("one", "two"))
    assert first[1] <= second[0]  # max_concurrent_jobs=1: never two at once
