"""A run submitted to a separately started local cluster, with Ray's token authentication on."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from modecotd.cluster import auth, local

CONFIG = {
    "name": "on-cluster",
    "tasks": [
        {"name": "coins", "role": "seen", "source": {"kind": "generated", "family": "coin_flip", "size": 2},
         "sizes": {"train": 8, "fewshot": 4, "test": 4}},
    ],
    "teacher": {"backend": "scripted"},
    "student": {"model": "builtin:tiny", "dtype": "fp32"},
    "distill": {"epochs": 1, "batch_size": 4, "max_length": 160, "lora": {"r": 4, "alpha": 8}},
    "mixture": {"budget": 2, "l1": [0.05], "cv_folds": 2},
    "evaluation": {"max_new_tokens": 4},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_token_mode_is_asked_for_only_when_a_token_exists(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setattr(auth, "DEFAULT_TOKEN_FILE", tmp_path / "missing")
    assert auth.use_token_if_available() is False and "RAY_AUTH_MODE" not in os.environ
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    assert auth.use_token_if_available() is True and os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a mode the user chose is left alone
    assert auth.use_token_if_available() is False and os.environ["RAY_AUTH_MODE"] == "disabled"


@pytest.fixture(scope="module")
def started_cluster(s3_server):
    """A local multi-node cluster started apart from the tests' process: a head with the dashboard and two
    one-CPU worker nodes (token auth on when a token exists, as Ray 2.60 does), whose nodes hold the test
    S3 server's keys in their environment as a real cluster's nodes hold theirs; returns (Ray address,
    dashboard URL)."""
    import ray

    assert not ray.is_initialized(), "run this test before any test that starts Ray in-process"
    dashboard_port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3_server.environment.items():
            patch.setenv(name, value)
        port = free_port()
        address = local.up(port=port, dashboard_port=dashboard_port, workers=2, cpus_per_worker=1)
    try:
        yield address, f"http://127.0.0.1:{dashboard_port}"
    finally:
        local.down(port)


def cli(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # the CLI finds the token itself
    return subprocess.run([sys.executable, "-m", "modecotd.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_run_with_address_on_a_started_cluster_survives_cluster_up_twice_and_down_of_another(started_cluster,
                                                                                             tmp_path):
    address, dashboard = started_cluster
    port = int(address.rsplit(":", 1)[1])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    # teacher actors and a training job on the cluster's nodes (the whole pipeline there: the submissions below)
    run = subprocess.Popen([sys.executable, "-m", "modecotd.cli", "run", str(config), "--address", address,
                            "--run-dir", str(tmp_path / "run"), "--stage", "teacher", "--stage", "distill"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # `cluster up` twice on the running cluster's port: refused in one line, the cluster untouched
        for _ in range(2):
            again = cli("cluster", "up", "--workers", "2", "--port", str(port), "--dashboard-port", str(free_port()))
            lines = again.stderr.strip().splitlines()
            assert again.returncode == 2 and len(lines) == 1 and f"port {port} for Ray's GCS is taken" in lines[0]
        # a second cluster beside it, then `cluster down` of that one alone
        other = free_port()
        second = cli("cluster", "up", "--port", str(other), "--dashboard-port", str(free_port()), "--num-cpus", "1")
        assert second.returncode == 0, second.stderr[-2000:]
        down = cli("cluster", "down", "--port", str(other))
        assert down.returncode == 0 and f"stopped the Ray cluster on port {other}" in down.stdout
        assert not local.cluster_processes(other) and local.cluster_processes(port)
        assert run.poll() is None, "the run ended before the cluster was tried (make it longer)"
        out, err = run.communicate(timeout=600)
    finally:
        run.kill()
    assert run.returncode == 0, err[-3000:]
    assert f"report: {tmp_path / 'run' / 'report.md'}" in out
    assert (tmp_path / "run" / "rationales" / "coins" / "accepted.jsonl").is_file()
    assert (tmp_path / "run" / "experts" / "coins" / "manifest.json").is_file()
    assert cli("list", "--address", dashboard).returncode == 0  # the Jobs API still answers
    code, jobs = rest(f"{dashboard}/api/jobs/", auth.read_token())  # the run's driver, named in the dashboard
    assert code == 200 and any((job.get("metadata") or {}).get("job_name") == f"modecotd {CONFIG['name']}"
                               and job.get("type") == "DRIVER" for job in jobs), jobs


def rest(url: str, token: str | None):
    """GET a dashboard URL, with Ray's token as a bearer token; returns (status, parsed JSON or None)."""
    import json
    import urllib.error

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, None


def test_submitted_run_is_visible_through_the_dashboards_rest_api(started_cluster, tmp_path, s3_server, s3_bucket,
                                                                   monkeypatch):
    """Submitted through the Jobs API with its storage on S3 (the client holds no keys: only the
    cluster's nodes do); then reported and pulled from the storage as from a laptop."""
    import uuid

    _, dashboard = started_cluster
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "name": "submitted"}))
    storage = f"s3://{s3_bucket}/submitted-{uuid.uuid4().hex[:8]}"
    for name in s3_server.environment:
        monkeypatch.delenv(name, raising=False)
    done = cli("submit", str(config), "--address", dashboard, "--storage", storage, "--wait")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    submission_id = done.stdout.split("submitted ", 1)[1].split()[0]
    assert submission_id.startswith("modecotd-submitted-")
    assert not (tmp_path / "runs").exists()
    for name, value in s3_server.environment.items():  # the keys, now on this "laptop"
        monkeypatch.setenv(name, value)
    reported = cli("report", "submitted", "--storage", storage)
    assert reported.returncode == 0 and "coins" in reported.stdout, (reported.stdout + reported.stderr)[-2000:]
    pulled = cli("pull", "submitted", "--storage", storage, "--to", str(tmp_path / "pulled"))
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    assert (tmp_path / "pulled" / "report.md").is_file()
    assert (tmp_path / "pulled" / "experts" / "coins" / "adapter_config.json").is_file()

    listed = cli("list", "--address", dashboard)
    assert submission_id in listed.stdout and "SUCCEEDED" in listed.stdout, listed.stderr[-2000:]
    status = cli("status", submission_id, "--address", dashboard)
    assert "SUCCEEDED" in status.stdout and "run submitted" in status.stdout
    logs = cli("logs", submission_id, "--address", dashboard).stdout
    assert "report:" in logs

    token = auth.read_token()  # `cluster up` always turns token authentication on
    assert rest(f"{dashboard}/api/jobs/", None)[0] == 401  # nothing without the token
    assert rest(f"{dashboard}/api/jobs/", "not-the-token")[0] in (401, 403)
    code, jobs = rest(f"{dashboard}/api/jobs/{submission_id}", token)
    assert code == 200 and jobs["status"] == "SUCCEEDED"
    assert jobs["metadata"]["run"] == "submitted" and jobs["metadata"]["stages"] == "all"
    assert len(jobs["metadata"]["config_fingerprint"]) >= 16
    code, nodes = rest(f"{dashboard}/api/v0/nodes?limit=100", token)
    assert code == 200 and len(nodes["data"]["result"]["result"]) == 3  # head + two workers
    code, actors = rest(f"{dashboard}/api/v0/actors?limit=1000&detail=true", token)
    assert code == 200
    names = {actor.get("name") for actor in actors["data"]["result"]["result"]}
    assert {"teacher-0", "eval-0"} <= names, sorted(n for n in names if n)
    # The nodes' storage keys appear in no file of the run, the job's log, its record or its actors'
    secret = s3_server.environment["AWS_SECRET_ACCESS_KEY"]
    assert secret not in logs and secret not in json.dumps(jobs) and secret not in json.dumps(actors)
    for path in (tmp_path / "pulled").rglob("*"):
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path

    # each stage's Ray metrics, on the ports the dashboard's node view names (what Prometheus scrapes; each
    # node exports what ran on it)
    code, nodes = rest(f"{dashboard}/nodes?view=summary", token)
    assert code == 200
    ports = list(find_values(nodes, "metricsExportPort"))
    assert ports, "the dashboard names no metrics port"
    # Counters only: they outlive the processes that counted; a finished process's gauges may be dropped.
    wanted = ["modecotd_teacher_questions", "modecotd_distill_experts_done", "modecotd_mix_trials_done",
              "modecotd_eval_pairs_done"]
    text = ""
    deadline = time.time() + 60
    while time.time() < deadline and not all(name in text for name in wanted):
        text = "".join(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
                       for port in set(ports))
        time.sleep(1)
    assert all(name in text for name in wanted), [name for name in wanted if name not in text]


def find_values(tree, key):
    """Every value of ``key`` anywhere in a JSON tree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                yield v
            yield from find_values(v, key)
    elif isinstance(tree, list):
        for item in tree:
            yield from find_values(item, key)


def test_plain_ray_job_submit_runs_modecotd(started_cluster, tmp_path):
    _, dashboard = started_cluster
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "run.yaml").write_text(yaml.safe_dump({**CONFIG, "name": "plain"}))
    ray_cli = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "token"} if auth.token_available() else dict(os.environ)
    done = subprocess.run([ray_cli, "job", "submit", "--address", dashboard, "--working-dir", str(tmp_path / "job"),
                           "--", "modecotd", "run", "run.yaml", "--run-dir", str(tmp_path / "run"),
                           "--stage", "teacher"],  # the whole pipeline through the Jobs API: the tests above
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "succeeded" in done.stdout.lower(), (done.stdout + done.stderr)[-3000:]
    assert (tmp_path / "run" / "report.md").is_file()


def test_a_retried_submit_is_one_run_and_a_submitted_run_can_be_stopped(started_cluster, tmp_path):
    _, dashboard = started_cluster
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "name": "stopped", "distill": {**CONFIG["distill"], "epochs": 200}}))
    chosen = f"retried-{time.time_ns()}"  # an id of the user's own
    submit = ("submit", str(config), "--address", dashboard, "--run-dir", str(tmp_path / "run"),
              "--submission-id", chosen)
    done = cli(*submit)
    assert done.returncode == 0, done.stderr[-2000:]
    submission_id = done.stdout.split("submitted ", 1)[1].split()[0]
    assert submission_id == chosen
    again = cli(*submit)  # a retry (the first reply was lost, say): the same run, nothing submitted twice
    assert again.returncode == 0 and "not submitted again" in again.stderr, again.stderr[-2000:]
    other = cli("submit", str(config), "--address", dashboard, "--run-dir", str(tmp_path / "other"),
                "--submission-id", chosen)
    assert other.returncode == 2 and f"submission id {chosen} is taken by another run" in other.stderr
    assert cli("list", "--address", dashboard).stdout.count(chosen) == 1
    stopped = cli("stop", submission_id, "--address", dashboard)
    assert stopped.returncode == 0 and "stopping" in stopped.stdout
    deadline, state = time.time() + 120, ""
    while time.time() < deadline and "STOPPED" not in state:
        state = cli("status", submission_id, "--address", dashboard).stdout
        time.sleep(2)
    assert f"{submission_id}: STOPPED" in state


def test_ten_runs_submitted_at_once_all_finish_each_in_its_own_folder(started_cluster, tmp_path):
    """One config submitted ten times in a row through the Jobs API: ten distinct submissions whose
    drivers share the cluster (their teacher actors queue for its two CPUs); each finishes in its
    own run folder with the same rationales, none touching another's."""
    from modecotd.artifacts import read_jsonl
    from modecotd.cluster import jobs

    _, dashboard = started_cluster
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "name": "many", "teacher": {"backend": "scripted", "actors": 1}}))
    ids = [jobs.submit(config, address=dashboard, run_dir=str(tmp_path / f"run-{i}"), stages=["teacher"],
                       say=lambda line: None) for i in range(10)]
    assert len(set(ids)) == 10
    assert [jobs.wait(i, dashboard, timeout_s=600, poll_s=1) for i in ids] == ["SUCCEEDED"] * 10
    made = [read_jsonl(tmp_path / f"run-{i}" / "rationales" / "coins" / "accepted.jsonl") for i in range(10)]
    assert len(made[0]) == 8 and all(rows == made[0] for rows in made)
    for i in range(10):  # each run folder holds its own run and nothing else
        assert sorted(p.name for p in (tmp_path / f"run-{i}").iterdir()) == sorted(
            p.name for p in (tmp_path / "run-0").iterdir())


@pytest.mark.parametrize("token", ["wrong", None])
def test_a_wrong_or_missing_token_is_refused_in_one_line(started_cluster, tmp_path, token):
    _, dashboard = started_cluster
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token
    if token:
        env["RAY_AUTH_TOKEN"] = token
    done = subprocess.run([sys.executable, "-m", "modecotd.cli", "list", "--address", dashboard], env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert dashboard in lines[0] and "token" in lines[0], lines[0]
