"""Nodes that share no disk: `modecotd cluster up --isolated` runs every worker node in its own mount
namespace, where /tmp, the home folder, ./runs and the model caches of this machine do not exist.
The run's storage is the only thing the nodes share: a folder every node sees (the NFS case) or a
real S3 server. Runs before any test that starts Ray in this process (see tests/test_cluster.py)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from modecotd.cluster import local
from tests.test_cluster import free_port

CONFIG = {
    "name": "nodes",
    "seed": 3,
    "tasks": [
        {"name": "coins", "role": "seen", "source": {"kind": "generated", "family": "coin_flip", "size": 2},
         "sizes": {"train": 16, "fewshot": 4, "test": 4}},
        {"name": "letters", "role": "unseen",
         "source": {"kind": "generated", "family": "last_letter_concatenation", "size": 2},
         "sizes": {"train": 0, "fewshot": 4, "test": 4}},
    ],
    "teacher": {"backend": "scripted", "actors": 1},
    "student": {"model": "builtin:tiny", "dtype": "fp32"},
    # enough steps after the first checkpoint that the node is killed mid-training even on a busy machine
    "distill": {"epochs": 8, "batch_size": 2, "max_length": 160, "lora": {"r": 4, "alpha": 8},
                "checkpoint_every": 4, "max_failures": 2, "baselines": []},
    # no few-shot LoRA control: the one training job is the expert whose node is killed
    "mixture": {"budget": 2, "l1": [0.05], "cv_folds": 0, "optimizer": "gradient", "controls": []},
    "evaluation": {"max_new_tokens": 4, "actors": 1},
}


def can_isolate() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("unshare") is not None


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "run.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(scope="module")
def isolated_cluster(s3_server):
    """A head (no CPUs) and two isolated one-CPU worker nodes. The nodes get the S3 server's keys
    in their environment when they start, as a real cluster's nodes have theirs."""
    import ray

    if not can_isolate():
        pytest.skip("isolated worker nodes need root and unshare (a mount namespace per node)")
    assert not ray.is_initialized(), "run this module before any test that starts Ray in-process"
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in s3_server.environment.items() if k != "AWS_ENDPOINT_URL_S3"})
    # a killed node is noticed within seconds instead of Ray's default ~15-30 s
    os.environ.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    port = free_port()
    address = local.up(port=port, dashboard_port=free_port(), workers=2, cpus_per_worker=1, isolated=True)
    try:
        yield address
    finally:
        local.down(port)
        os.environ.clear()
        os.environ.update(saved)


def run_cli(*args, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # the CLI finds the token itself
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "modecotd.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


LOOK = """
import json, os, sys
from modecotd.cluster.auth import use_token_if_available
use_token_if_available()
import ray
ray.init(address=sys.argv[1], logging_level="WARNING")
paths = json.loads(sys.argv[2])
look = ray.remote(num_cpus=1)(lambda: {p: os.path.exists(p) for p in paths})
print(json.dumps(ray.get([look.options(resources={f"worker-{i}": 1}).remote() for i in (1, 2)])))
"""


def test_a_worker_node_sees_none_of_this_machines_private_paths(isolated_cluster, tmp_path):
    marker = tmp_path / "only-here.txt"
    marker.write_text("x")
    paths = [str(marker), str(Path.home() / ".ray"), str(Path.home() / ".cache"), sys.executable]
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    done = subprocess.run([sys.executable, "-c", LOOK, isolated_cluster, json.dumps(paths)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for node in json.loads(done.stdout.strip().splitlines()[-1]):
        assert node == {paths[0]: False, paths[1]: False, paths[2]: False, sys.executable: True}


def test_a_folder_only_this_machine_has_is_refused_before_anything_runs(isolated_cluster, config_file, tmp_path):
    done = run_cli("run", str(config_file), "--address", isolated_cluster, "--storage", str(tmp_path / "runs"))
    assert done.returncode == 2
    assert "cannot be read from 2 of 3 Ray nodes" in done.stderr and "shared mount or an object store" in done.stderr
    assert not (tmp_path / "runs" / "nodes" / "rationales").exists()


def training_worker_pid() -> int | None:
    found = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout.split()
    return int(found[0]) if found else None


def raylet_of(pid: int) -> int:
    """The raylet that started a worker process (its node's)."""
    while pid > 1:
        status = Path(f"/proc/{pid}/status").read_text()
        parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if "raylet" in Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="ignore"):
            return parent
        pid = parent
    raise RuntimeError("no raylet above the training worker")


def kill_the_training_node_after_a_checkpoint(storage: Path, killed: list) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        if (storage / "nodes/experts/coins/manifest.json").exists():
            return  # the expert was committed before the node could be killed: the test says so
        # a checkpoint counts once Ray Train's controller has registered it in its snapshot
        snapshots = list(storage.glob("nodes/ray/distill-coins-*/checkpoint_manager_snapshot.json"))
        registered = snapshots and "checkpoint_" in snapshots[0].read_text(errors="ignore")
        if registered and (pid := training_worker_pid()):
            raylet = raylet_of(pid)
            os.kill(raylet, signal.SIGKILL)  # the whole node goes: its raylet, then every worker on it
            os.kill(pid, signal.SIGKILL)
            killed.append(raylet)
            return
        time.sleep(0.1)


def artifacts(root: Path) -> dict:
    import safetensors.torch

    adapter = safetensors.torch.load_file(root / "experts/coins/adapter_model.safetensors")
    return {"rationales": (root / "rationales/coins/accepted.jsonl").read_text(), "adapter": adapter,
            "accuracy": {unit: json.loads((root / unit / "manifest.json").read_text())["summary"]["accuracy"]
                         for unit in ("eval/coins/base", "eval/coins/expert", "eval/coins/mixture",
                                      "eval/letters/mixture")}}


def same(a: dict, b: dict) -> None:
    assert a["rationales"] == b["rationales"] and a["accuracy"] == b["accuracy"]
    assert a["adapter"].keys() == b["adapter"].keys()
    assert all((a["adapter"][k] - b["adapter"][k]).abs().max() < 1e-5 for k in a["adapter"])


def test_the_pipeline_on_a_shared_folder_with_a_node_killed_equals_a_run_on_s3(isolated_cluster, config_file,
                                                                             s3_server, s3_bucket, tmp_path):
    # The NFS case: a folder every node sees at the same path; a worker node is killed during distill.
    shared = Path(tempfile.mkdtemp(prefix="modecotd-shared-", dir="/var/tmp"))
    killed: list[int] = []
    killer = threading.Thread(target=kill_the_training_node_after_a_checkpoint, args=(shared, killed))
    killer.start()
    try:
        on_nfs = run_cli("run", str(config_file), "--address", isolated_cluster, "--storage", str(shared))
        killer.join()
        assert on_nfs.returncode == 0, on_nfs.stderr[-3000:]
        assert killed, "no worker node was killed while the expert was training"
        training = json.loads((shared / "nodes/experts/coins/training.json").read_text())
        # from its checkpoint in storage, on the other node
        assert training["resumed_from_step"] is not None, on_nfs.stderr[-6000:]
        disturbed = artifacts(shared / "nodes")
    finally:
        shutil.rmtree(shared, ignore_errors=True)

    # The object-store case, undisturbed: the same artifacts as the run that lost a node.
    s3 = s3_server.uri(s3_bucket, f"isolated-{uuid.uuid4().hex[:8]}")
    on_s3 = run_cli("run", str(config_file), "--address", isolated_cluster, "--storage", s3,
                    env_extra=s3_server.environment)
    assert on_s3.returncode == 0, on_s3.stderr[-3000:]
    assert "report: s3://" in on_s3.stdout
    pulled = run_cli("pull", "nodes", "--storage", s3, "--to", str(tmp_path / "pulled"), env_extra=s3_server.environment)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    same(artifacts(tmp_path / "pulled"), disturbed)
    assert (tmp_path / "pulled" / "report.md").is_file() and not (tmp_path / "pulled" / "ray").exists()
    report = run_cli("report", "nodes", "--storage", s3, env_extra=s3_server.environment)  # as from a laptop
    assert report.returncode == 0 and "report: s3://" in report.stdout, report.stderr[-2000:]
    from modecotd.storage import Storage

    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3_server.environment.items():
            patch.setenv(name, value)
        files = Storage(f"{s3}/nodes").files()
    assert any(f.startswith("ray/distill-coins-") for f in files)  # Ray Train's checkpoints are in the run's storage
