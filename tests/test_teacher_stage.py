"""The teacher stage on a local Ray: the shard queue, dead actors, resume, failures, secrets, memory."""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from modecotd.artifacts import Unit, read_jsonl
from modecotd.config_loading import parse_config
from modecotd.errors import UserError
from stub_openai import StubServer

# Ray is imported inside the tests, never at collection: test_cluster must run before any
# in-process Ray (see tests/test_cluster.py).

SECRET = "sk-test-do-not-leak-4242"
QUESTION = re.compile(r"What is (\d+) \+ 1\?")


def plus_one(prompt: str, n: int) -> list[str]:
    """A teacher that is always right: stage 1 reasons, stage 2 (after the trigger) answers."""
    number = int(QUESTION.findall(prompt)[-1])
    if prompt.rstrip().endswith("is"):
        return [f" {number + 1}."] * n
    return [f"{number} and one more make {number + 1} (way {k})." for k in range(n)]


def write_questions(folder: Path, count: int, *, marks: dict[int, str] | None = None,
                    rationale: bool = False) -> Path:
    path = folder / "train.jsonl"
    with open(path, "w") as handle:
        for i in range(count):
            row = {"question": f"What is {i} + 1?{(' ' + marks[i]) if marks and i in marks else ''}",
                   "answer": str(i + 1)}
            if rationale:
                row["rationale"] = f"{i} and one more make {i + 1}."
            handle.write(json.dumps(row) + "\n")
    test = folder / "test.jsonl"
    test.write_text(json.dumps({"question": "What is -1 + 1?", "answer": "0"}) + "\n")
    fewshot = folder / "fewshot.jsonl"
    fewshot.write_text(json.dumps({"question": "What is -2 + 1?", "answer": "-1", "rationale": "r"}) + "\n")
    return path


def make_config(folder: Path, teacher: dict, **sections) -> object:
    source = {"kind": "jsonl", "train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl"),
              "fewshot": str(folder / "fewshot.jsonl"), "rationale_field": "rationale"}
    return parse_config({"name": "teacher-test", "tasks": [{"name": "plus", "role": "seen", "answer": "number",
                                                           "source": source}],
                         "teacher": teacher, "student": {"model": "builtin:tiny"}, **sections})


def openai_teacher(stub: StubServer, **changes) -> dict:
    teacher = {"backend": "openai", "model": "stub-model", "samples": 1, "temperature": 0.0, "shard_size": 2,
               "actors": 2, "cpus_per_actor": 0.5,
               "endpoint": {"url": stub.url, "api_key_env": "MODECOTD_TEST_KEY", "concurrency": 2,
                            "timeout_s": 5, "max_retries": 1, "backoff_s": 0.01}}
    teacher.update(changes)
    return teacher


def run_stage(config, run_dir: Path):
    from modecotd.jobs.driver import load_tasks
    from modecotd.jobs.teacher_stage import run_teacher_stage
    from modecotd.plan import RunLayout
    from modecotd.storage import Storage

    tasks = load_tasks(config)
    units = {"plus": Unit(Storage(run_dir), "rationales/plus", "key")}
    return run_teacher_stage(config, RunLayout(Storage(run_dir)), tasks, units)


def rows(run_dir: Path, name: str) -> list[dict]:
    return read_jsonl(run_dir / "rationales" / "plus" / f"{name}.jsonl")


def alive_teachers() -> set[str]:
    from ray.util.state import list_actors

    return {a.name for a in list_actors(filters=[("class_name", "=", "TeacherWorker"), ("state", "=", "ALIVE")])}


def test_transformers_teacher_pool_of_named_actors(ray_cluster, tiny_model_dir, tmp_path):
    """Zero-shot CoT with k samples per question through two named actors; a second run skips."""
    from ray.util.state import list_actors

    write_questions(tmp_path, 8)
    config = make_config(tmp_path, {"backend": "transformers", "model": "builtin:tiny", "samples": 2,
                                    "temperature": 0.7, "max_new_tokens": 6, "batch_size": 3, "shard_size": 2,
                                    "actors": 2, "cpus_per_actor": 0.5})
    summary = run_stage(config, tmp_path)["plus"].summary
    assert summary.questions == 8
    assert summary.accepted + summary.rejected == 8 * 2  # every sample is kept or rejected with a reason
    assert all(row["reason"] for row in rows(tmp_path, "rejected"))
    assert summary.generated_tokens > 0 and summary.tokens_per_second > 0
    names = {a.name for a in list_actors(filters=[("class_name", "=", "TeacherWorker")], limit=1000)}
    assert {"teacher-0", "teacher-1"} <= names
    assert not alive_teachers()  # the pool is gone when the stage ends
    assert run_stage(config, tmp_path) == {}  # done: skipped


def test_a_killed_actor_loses_no_question(ray_cluster, tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("MODECOTD_TEST_KEY", SECRET)
    write_questions(tmp_path, 24)
    with StubServer(plus_one, api_key=SECRET, delay_s=0.05) as stub:
        config = make_config(tmp_path, openai_teacher(stub))
        shards = tmp_path / "rationales" / ".shards" / "plus" / "key"
        killed = []

        def kill_when_work_started():
            deadline = time.time() + 60
            while time.time() < deadline:
                if shards.is_dir() and len(list(shards.glob("*.jsonl"))) >= 2:
                    ray.kill(ray.get_actor("teacher-0"))
                    killed.append(True)
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_when_work_started)
        killer.start()
        summary = run_stage(config, tmp_path)["plus"].summary
        killer.join()
    assert killed, "the actor was never killed: the stage ended before two shards were written"
    ids = [row["id"] for row in rows(tmp_path, "accepted")]
    assert sorted(ids) == list(range(24))  # every question exactly once
    assert summary.questions == 24 and summary.failed == 0
    assert {row["question"] for row in rows(tmp_path, "accepted")} == {f"What is {i} + 1?" for i in range(24)}
    from ray.util.state import list_actors

    names = {a.name for a in list_actors(filters=[("class_name", "=", "TeacherWorker")], limit=1000)}
    assert "teacher-0-restart1" in names  # the dead actor was replaced


def test_a_stopped_actor_is_noticed_killed_and_its_shards_redone(ray_cluster, tmp_path, monkeypatch):
    """SIGSTOP: the actor neither works nor dies; without a deadline the stage would wait forever."""
    import os
    import signal

    import psutil
    from ray.util.state import list_actors

    from tests.deadline import fails_after

    monkeypatch.setenv("MODECOTD_TEST_KEY", SECRET)
    write_questions(tmp_path, 24)
    with StubServer(plus_one, api_key=SECRET, delay_s=0.05) as stub:
        config = make_config(tmp_path, openai_teacher(stub), resources={"stall_timeout_s": 3})
        shards = tmp_path / "rationales" / ".shards" / "plus" / "key"
        stopped = []

        def stop_when_work_started():
            deadline = time.time() + 60
            while time.time() < deadline:
                if shards.is_dir() and len(list(shards.glob("*.jsonl"))) >= 2:
                    [actor] = list_actors(filters=[("name", "=", "teacher-0"), ("state", "=", "ALIVE")])
                    os.kill(actor.pid, signal.SIGSTOP)
                    stopped.append((actor.pid, time.time()))
                    return
                time.sleep(0.02)

        stopper = threading.Thread(target=stop_when_work_started)
        stopper.start()
        with fails_after(120, "the teacher stage with a stopped actor"):
            summary = run_stage(config, tmp_path)["plus"].summary
        ended = time.time()
        stopper.join()
    assert stopped, "the actor was never stopped: the stage ended before two shards were written"
    pid, when = stopped[0]
    assert sorted(row["id"] for row in rows(tmp_path, "accepted")) == list(range(24))  # every question once
    assert summary.questions == 24 and summary.failed == 0
    assert ended - when < 30  # noticed after 3 s of silence, not waited on forever
    names = {a.name for a in list_actors(filters=[("class_name", "=", "TeacherWorker")], limit=1000)}
    assert "teacher-0-restart1" in names  # the stopped actor was replaced
    deadline = time.time() + 30
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.2)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # killed, not left frozen


def test_an_interrupted_stage_redoes_only_unfinished_shards(ray_cluster, tmp_path, monkeypatch):
    from modecotd.jobs import teacher_stage

    monkeypatch.setenv("MODECOTD_TEST_KEY", SECRET)
    write_questions(tmp_path, 12)
    written: list[Path] = []
    real_write = teacher_stage.write_shard

    def write_then_die(storage, path, result):
        if len(written) == 2:
            raise KeyboardInterrupt  # the driver is killed after two shards were committed
        real_write(storage, path, result)
        written.append(storage.local_root / path)

    with StubServer(plus_one, api_key=SECRET) as stub:
        config = make_config(tmp_path, openai_teacher(stub, actors=1))
        monkeypatch.setattr(teacher_stage, "write_shard", write_then_die)
        with pytest.raises(KeyboardInterrupt):
            run_stage(config, tmp_path)
        assert not alive_teachers()  # no actor outlives the interrupted driver
    assert not (tmp_path / "rationales" / "plus" / "manifest.json").exists()
    done = {json.loads(line)["id"] for path in written for line in path.read_text().splitlines()[1:]}
    assert done == {0, 1, 2, 3}
    # A fresh server for the second run, so that a late request from the killed actor of the first
    # run cannot be counted as the second run's.
    with StubServer(plus_one, api_key=SECRET) as stub:
        monkeypatch.setattr(teacher_stage, "write_shard", real_write)
        run_stage(make_config(tmp_path, openai_teacher(stub, actors=1)), tmp_path)
        second_run = {i: stub.count(f"What is {i} + 1?") for i in range(12)}
    assert all(second_run[i] == 0 for i in done)  # finished shards are not asked again
    assert all(second_run[i] == 2 for i in range(12) if i not in done), second_run  # the rest once per stage
    assert sorted(row["id"] for row in rows(tmp_path, "accepted")) == list(range(12))
    assert not (tmp_path / "rationales" / ".shards" / "plus").exists()  # merged shards are removed


def test_bad_rows_and_failing_endpoints_are_recorded_and_the_key_never_written(ray_cluster, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("MODECOTD_TEST_KEY", SECRET)
    write_questions(tmp_path, 10, marks={3: "REFUSE", 6: "DOWN"})
    with StubServer(plus_one, api_key=SECRET) as stub:
        config = make_config(tmp_path, openai_teacher(stub))
        summary = run_stage(config, tmp_path)["plus"].summary
    failed = {row["id"]: row["reason"] for row in rows(tmp_path, "failed")}
    assert set(failed) == {3, 6}
    assert "refused the request (HTTP 400)" in failed[3]
    assert "failed after 2 attempts" in failed[6] and "503" in failed[6]
    assert sorted(row["id"] for row in rows(tmp_path, "accepted")) == [0, 1, 2, 4, 5, 7, 8, 9]
    assert summary.failed == 2 and sum(summary.failure_reasons.values()) == 2
    assert summary.yield_ == pytest.approx(0.8)
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"  # every Ray log so far
    for path in [*tmp_path.rglob("*"), *logs.rglob("*")]:
        if path.is_file():
            assert SECRET not in path.read_text(errors="ignore"), path


def test_a_server_that_ignores_n_still_gives_every_sample_and_the_summary_counts_them(ray_cluster, tmp_path,
                                                                                     monkeypatch):
    """llama.cpp's server answers one choice whatever ``n`` says: the rest are asked for again."""
    import itertools

    monkeypatch.setenv("MODECOTD_TEST_KEY", SECRET)
    write_questions(tmp_path, 4)
    calls = itertools.count()

    def one_way_per_call(prompt: str, n: int) -> list[str]:
        number = int(QUESTION.findall(prompt)[-1])
        if prompt.rstrip().endswith("is"):
            return [f" {number + 1}."] * n
        return [f"{number} and one more make {number + 1} (call {next(calls)})."] * n

    with StubServer(one_way_per_call, api_key=SECRET, ignore_n=True) as stub:
        config = make_config(tmp_path, openai_teacher(stub, samples=2, temperature=0.7))
        summary = run_stage(config, tmp_path)["plus"].summary
        reasoning = [r["body"]["n"] for r in stub.requests if not r["prompt"].rstrip().endswith("is")]
    assert sorted(reasoning) == [1] * 4 + [2] * 4  # asked for 2, got 1, asked again for the other
    assert summary.samples_asked == summary.samples_returned == 8
    assert summary.accepted == 8 and summary.questions_with_rationale == 4
    assert sorted(row["id"] for row in rows(tmp_path, "accepted")) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_a_missing_api_key_variable_is_a_clear_error(ray_cluster, tmp_path, monkeypatch):
    from modecotd.errors import ModelError

    monkeypatch.delenv("MODECOTD_TEST_KEY", raising=False)
    write_questions(tmp_path, 2)
    with StubServer() as stub:
        config = make_config(tmp_path, openai_teacher(stub))
        with pytest.raises(ModelError, match="MODECOTD_TEST_KEY is not set"):
            run_stage(config, tmp_path)


def test_vllm_without_a_gpu_in_the_cluster_is_a_clear_error(ray_cluster, tmp_path):
    write_questions(tmp_path, 2)
    config = make_config(tmp_path, {"backend": "vllm", "model": "builtin:tiny", "gpus_per_actor": 1})
    config.resources.placement_timeout_s = 1  # an autoscaled cluster would get this long to add a GPU node
    with pytest.raises(UserError, match=r"needs 1 CPU, 1 GPU but the Ray cluster has .* after waiting"):
        run_stage(config, tmp_path)


def test_teacher_metrics_reach_the_metrics_endpoint(ray_cluster, tmp_path):
    """Questions done, accepted, failures and tokens/s are Ray metrics, scraped like the dashboard does."""
    import urllib.request

    import ray

    write_questions(tmp_path, 6, rationale=True)
    config = make_config(tmp_path, {"backend": "precomputed", "shard_size": 3})
    run_stage(config, tmp_path)
    node = ray.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    wanted = ["modecotd_teacher_questions", "modecotd_teacher_accepted", "modecotd_teacher_tokens_per_second"]
    deadline = time.time() + 60
    text = ""
    while time.time() < deadline:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        if all(name in text for name in wanted):
            break
        time.sleep(1)
    assert all(name in text for name in wanted), [name for name in wanted if name not in text]
    assert re.search(r'modecotd_teacher_questions_total\{[^}]*task="plus"[^}]*\} 6(\.0)?', text)


LOAD_QUESTIONS = 100_000
LOAD_BASELINE = 1_000


def test_100k_generated_questions_on_4_actors_need_no_more_driver_memory_than_1k(tmp_path):
    """Streaming, end to end, as a user runs it: `modecotd run --stage teacher` over generated
    questions with a pool of 4 teacher actors. The driver process's peak resident memory for 100k
    questions stays within 20% of its peak for 1k (holding the 100k rows would add ~100 MB), and
    every question is in the rationales exactly once. The figures go to docs/RELIABILITY.md."""
    import os
    import subprocess
    import sys

    import yaml

    def run(count: int) -> tuple[int, float]:
        folder = tmp_path / str(count)
        folder.mkdir()
        config = folder / "load.yaml"
        config.write_text(yaml.safe_dump({
            "name": "load", "tasks": [{"name": "plus", "role": "seen",
                                       "source": {"kind": "generated", "family": "coin_flip"},
                                       "sizes": {"train": count, "fewshot": 2, "test": 2}}],
            "teacher": {"backend": "scripted", "shard_size": 250, "actors": 4, "cpus_per_actor": 0.5},
            "student": {"model": "builtin:tiny"}, "resources": {"num_cpus": 2, "dashboard": False}}))
        started = time.time()
        with open(folder / "log.txt", "w") as log:
            process = subprocess.Popen([sys.executable, "-m", "modecotd.cli", "run", str(config), "--run-dir",
                                        str(folder / "run"), "--stage", "teacher"], stdout=log, stderr=log,
                                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
            _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        assert process.returncode == 0, (folder / "log.txt").read_text()[-3000:]
        ids = [json.loads(line)["id"] for line in open(folder / "run/rationales/plus/accepted.jsonl")]
        assert len(ids) == count and set(ids) == set(range(count)), "a question missing or answered twice"
        return usage.ru_maxrss * 1024, time.time() - started

    small, small_s = run(LOAD_BASELINE)
    large, large_s = run(LOAD_QUESTIONS)
    print(f"driver peak RSS {large / 1e6:.0f} MB for {LOAD_QUESTIONS} questions ({large_s:.0f} s) vs "
          f"{small / 1e6:.0f} MB for {LOAD_BASELINE} ({small_s:.0f} s): ratio {large / small:.3f}")
    assert large <= 1.2 * small, f"driver peak {large / 1e6:.0f} MB for 100k vs {small / 1e6:.0f} MB for 1k"
