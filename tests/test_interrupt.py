"""Ctrl-C stops a run within seconds, takes down the Ray work it started and keeps what was
committed. (That the same command then resumes a stopped run is shown for the harder case, a driver
killed with SIGKILL, in tests/test_pipeline.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

CONFIG = {
    "name": "interrupt",
    "tasks": [{"name": "coins", "role": "seen", "source": {"kind": "generated", "family": "coin_flip", "size": 2},
               "sizes": {"train": 16, "fewshot": 3, "test": 3}}],
    "teacher": {"backend": "scripted"},
    "student": {"model": "builtin:tiny"},
    # Enough steps that the interrupt lands while the expert trains.
    "distill": {"epochs": 200, "batch_size": 2, "max_length": 160, "lora": {"r": 2, "alpha": 4}},
    "evaluation": {"max_new_tokens": 4},
    "resources": {"num_cpus": 2},
}


def _raylets() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "raylet"], capture_output=True, text=True).stdout
    return {int(pid) for pid in out.split()}


def _wait_for(process: subprocess.Popen, lines: list[str], text: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if text in line:
            return
    pytest.fail(f"{text!r} never appeared:\n{''.join(lines)[-3000:]}")


def test_ctrl_c_stops_the_run_and_keeps_what_was_committed(tiny_model_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "modecotd.cli", "run", str(config), "--run-dir", str(run_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    raylets_before = _raylets()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    try:
        _wait_for(process, lines, "distill coins: ", timeout=240)  # training is under way
        ours = _raylets() - raylets_before
        assert ours, "the run started no local Ray"
        process.send_signal(signal.SIGINT)
        pressed = time.time()
        code = process.wait(timeout=30)
        stopped_in = time.time() - pressed
    finally:
        if process.poll() is None:
            process.kill()
    err = "".join(lines) + process.stderr.read()
    assert code == 130, err[-3000:]
    assert stopped_in <= 10, f"took {stopped_in:.1f} s to stop"
    assert "interrupted" in err
    deadline = time.time() + 20
    while _raylets() & ours and time.time() < deadline:
        time.sleep(0.5)
    assert not _raylets() & ours, "the local Ray the run started is still running"
    assert (run_dir / "rationales/coins/manifest.json").is_file()  # committed before the interrupt: kept
    assert not (run_dir / "experts/coins/manifest.json").exists()

