"""A local Ray cluster on this machine: `modecotd cluster up` / `modecotd cluster down`.

`modecotd run` without --address starts a private in-process cluster instead; use this one to
share a cluster between runs, watch it in the dashboard, or submit jobs to it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from modecotd.errors import UserError

DEFAULT_GCS_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265


def _ray_cli() -> str:
    """The `ray` command of this Python environment (also when its bin folder is not on PATH)."""
    beside = Path(sys.executable).parent / "ray"
    path = str(beside) if beside.is_file() else shutil.which("ray")
    if path is None:
        raise UserError("the 'ray' command is not on PATH; install modecotd in this environment first")
    return path


def up(num_cpus: int | None = None, port: int = DEFAULT_GCS_PORT, dashboard_port: int = DEFAULT_DASHBOARD_PORT) -> str:
    """Start a head node (with the dashboard); returns the address to pass as --address."""
    command = [_ray_cli(), "start", "--head", f"--port={port}", "--include-dashboard=true",
               f"--dashboard-port={dashboard_port}", "--disable-usage-stats"]
    if num_cpus:
        command.append(f"--num-cpus={num_cpus}")
    # Jobs submitted to this cluster run `modecotd ...`: keep this environment's commands on their PATH.
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise UserError(f"ray start failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
    return f"127.0.0.1:{port}"


def down() -> None:
    """Stop every Ray process of this machine's local cluster."""
    subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True, text=True, check=False)
