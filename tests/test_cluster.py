"""A run submitted to a separately started local cluster, with Ray's token authentication on."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

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


def test_run_with_address_on_a_started_cluster(tmp_path):
    import ray

    # `cluster down` stops every Ray process of this machine, so no other Ray may be running here.
    assert not ray.is_initialized(), "run this test before any test that starts Ray in-process"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    address = local.up(num_cpus=2, port=free_port(), dashboard_port=free_port())
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
        done = subprocess.run([sys.executable, "-m", "modecotd.cli", "run", str(config), "--address", address,
                               "--run-dir", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                              timeout=600)
    finally:
        local.down()
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"report: {tmp_path / 'run' / 'report.md'}" in done.stdout
    assert (tmp_path / "run" / "experts" / "coins" / "adapter_config.json").is_file()
