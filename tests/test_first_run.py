"""What a new machine sees: each test here starts a user's command in a fresh process with empty
caches (the converted-model cache, the Hugging Face cache and, where Ray starts, an empty home
folder: no ``~/.ray``, no token file, no compiled DeepSpeed op), so that a first run's one-off
steps and output are exercised on every run of the suite, whatever an earlier test or run left.
"""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) ")  # the CLI's own log records
BAR = re.compile(r"\d+%\||it/s\]")  # a tqdm progress bar


def fresh_env(root: Path, home: bool = False) -> dict[str, str]:
    """The environment of a new machine's user: empty model and hub caches (and home folder)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MODECOTD_"))}
    env.update(MODECOTD_CACHE=str(root / "model-cache"), HF_HOME=str(root / "hf-home"), HF_HUB_OFFLINE="1")
    if home:
        (root / "home").mkdir(exist_ok=True)
        env.update(HOME=str(root / "home"), TORCH_EXTENSIONS_DIR=str(root / "home" / ".cache" / "torch_extensions"))
    return env


def cli(env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modecotd.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def too_long_question_project(root: Path) -> Path:
    """A config whose unseen task has a question longer than the tiny student's context."""
    data = root / "data"
    data.mkdir(parents=True)
    rows = [{"question": "Is 2 even?", "answer": "yes", "rationale": "2 ends in 2."},
            {"question": "Is 1 even? " + "seven " * 3000, "answer": "no", "rationale": "1 is odd."}]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    worked = {"question": "Is 4 even?", "answer": "yes", "rationale": "4 ends in 4."}
    (data / "fewshot.jsonl").write_text(json.dumps(worked) + "\n")
    config = {"name": "first-run", "student": {"model": "builtin:tiny"}, "teacher": {"backend": "scripted"},
              "tasks": [{"name": "coins", "role": "seen", "source": {"kind": "generated", "family": "coin_flip"},
                         "sizes": {"train": 4, "fewshot": 2, "test": 2}},
                        {"name": "parity", "role": "unseen", "answer": "yes_no",
                         "source": {"kind": "jsonl", "test": "data/test.jsonl", "fewshot": "data/fewshot.jsonl",
                                    "rationale_field": "rationale"}}]}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def first_check(tmp_path_factory):
    """The first command of a new machine (``check`` of a config the student cannot take), on empty
    caches: (its result, the environment, the config). Its model cache, prepared by that command,
    is what the module's later runs start from."""
    root = tmp_path_factory.mktemp("new-machine")
    env = fresh_env(root)
    config = too_long_question_project(root / "project")
    return cli(env, "check", str(config)), env, config


def test_a_first_command_prepares_the_model_in_one_line_of_its_own_and_errors_stay_one_line(first_check):
    """The first command on a machine builds the student into the model cache: one line of ours
    says so, no library prints a progress bar, and the error is still one line; the next command
    prints the error alone."""
    first, env, config = first_check
    assert first.returncode == 2, first.stderr
    assert not BAR.search(first.stderr + first.stdout), first.stderr
    ours = [line for line in first.stderr.splitlines() if LOG_LINE.match(line)]
    others = [line for line in first.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert len(others) == 1 and others[0].startswith("modecotd: error: "), first.stderr
    assert "test.jsonl:2" in others[0] and "context" in others[0]
    cache = Path(env["MODECOTD_CACHE"])
    preparing = [line for line in ours if "preparing" in line]
    assert len(preparing) == 1 and "builtin:tiny" in preparing[0] and str(cache) in preparing[0]
    assert (cache / "v1" / "tiny-llama" / "config.json").is_file()
    assert not any((cache / "v1").glob("*.tmp-*")), "a temporary build folder was left"

    second = cli(env, "check", str(config))
    assert second.returncode == 2
    lines = [line for line in second.stderr.splitlines() if line.strip() and " WARNING " not in line]
    assert lines == [others[0]], second.stderr


def test_quiet_libraries_keeps_a_plain_tqdm_bar_off_the_terminal(capfd):
    """The GGUF reader draws its bar with plain tqdm, which transformers' switch does not reach."""
    from tqdm.auto import tqdm

    from modecotd.models import quiet_libraries

    with quiet_libraries() as kept:
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
    assert "GGUF" not in capfd.readouterr().err
    assert "GGUF" in kept.getvalue()


SHM_CHECK = """
import logging
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
import deepspeed
from modecotd.cpu_collectives import prepare_shm_op
from modecotd.distill import init_one_rank_group, rank_zero_env
print("ready", prepare_shm_op())
with rank_zero_env(init_one_rank_group()):
    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's own start, which would compile the op
    print("started", deepspeed.comm.get_world_size(), deepspeed.comm.comm.cdb.shm_comm_op is None)
"""


def test_without_a_compiler_deepspeed_starts_on_gloo_with_one_warning(tmp_path):
    """A machine with an empty extension cache and no C++ compiler: DeepSpeed's first start would
    fail compiling its CPU op; it starts without it, and the user reads one line saying why."""
    env = fresh_env(tmp_path, home=True)
    env["CXX"] = str(tmp_path / "no-such-compiler")
    done = subprocess.run([sys.executable, "-c", SHM_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ready False" in done.stdout and "started 1 True" in done.stdout, done.stdout
    ours = [line for line in done.stderr.splitlines() if "modecotd.cpu_collectives" in line]
    assert [line.split(" ", 1)[0] for line in ours] == ["INFO", "WARNING"], done.stderr
    assert "could not be compiled" in ours[1] and "gloo" in ours[1]
    assert "Traceback" not in done.stderr and "!! WARNING !!" not in done.stderr


def test_a_first_run_on_a_new_machine_starts_ray_makes_a_private_token_and_trains(first_check, tmp_path):
    """An empty home folder (no ~/.ray: Ray's first start, no token; no compiled DeepSpeed op) and
    the model cache of the machine's first command: the teacher and distill stages run, the private
    cluster's token is readable by its user alone, the DeepSpeed op is compiled where training runs,
    and the terminal shows no library's progress bar, compiler output or traceback."""
    env = {**fresh_env(tmp_path, home=True), "MODECOTD_CACHE": first_check[1]["MODECOTD_CACHE"]}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "new-machine", "teacher": {"backend": "scripted"}, "student": {"model": "builtin:tiny"},
        "tasks": [{"name": "coins", "role": "seen", "source": {"kind": "generated", "family": "coin_flip", "size": 2},
                   "sizes": {"train": 4, "fewshot": 2, "test": 2}}],
        "distill": {"epochs": 1, "batch_size": 4, "max_length": 160, "lora": {"r": 4, "alpha": 8}},
        "resources": {"num_cpus": 2}}))
    run = tmp_path / "run"
    done = cli(env, "run", str(config), "--run-dir", str(run), "--stage", "teacher", "--stage", "distill")
    assert done.returncode == 0, done.stderr[-3000:]
    token = tmp_path / "home" / ".ray" / "auth_token"
    assert token.is_file() and stat.S_IMODE(token.stat().st_mode) == 0o600
    manifest = json.loads((run / "experts" / "coins" / "manifest.json").read_text())
    assert "adapter_model.safetensors" in manifest["files"]
    assert any((tmp_path / "home" / ".cache" / "torch_extensions").glob("deepspeed_shm_comm/*.so"))
    terminal = done.stdout + done.stderr
    assert not BAR.search(terminal) and "Traceback" not in terminal, terminal[-3000:]
    assert "ninja" not in terminal.lower() and "c++" not in terminal, terminal[-3000:]
    assert "preparing" not in terminal  # the machine's first command prepared the model
    # Ray's and DeepSpeed's worker lines go to the run's log file, not the terminal
    for noise in ("pid=", "core_worker", "Setting accelerator", "RayTrainWorker"):
        assert noise not in terminal, terminal[-3000:]
    [run_log] = (run / "logs").glob("run-*.log")
    kept = run_log.read_text()
    assert "RayTrainWorker pid=" in kept and f"this run's log: " in done.stderr and run_log.name in done.stderr
