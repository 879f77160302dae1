"""A local Ray cluster on this machine: `modecotd cluster up` / `modecotd cluster down`.

`modecotd run` without --address starts a private in-process cluster instead; use this one to
share a cluster between runs, watch it in the dashboard, or submit jobs to it.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from modecotd.cluster.auth import ensure_token, read_token, token_available
from modecotd.errors import UserError

DEFAULT_GCS_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
RECORDS = Path.home() / ".ray" / "modecotd-clusters"  # one file per cluster `up` started: what `down` stops
STOP_GRACE_S = 10.0


def _ray_cli() -> str:
    """The `ray` command of this Python environment (also when its bin folder is not on PATH)."""
    beside = Path(sys.executable).parent / "ray"
    path = str(beside) if beside.is_file() else shutil.which("ray")
    if path is None:
        raise UserError("the 'ray' command is not on PATH; install modecotd in this environment first")
    return path


def up(num_cpus: int | None = None, port: int = DEFAULT_GCS_PORT, dashboard_port: int = DEFAULT_DASHBOARD_PORT,
       workers: int = 0, cpus_per_worker: float = 1, isolated: bool = False, dashboard_host: str = "127.0.0.1") -> str:
    """Start a head node with the dashboard and, with ``workers``, that many worker nodes on this
    machine, each with its own CPUs and a resource ``worker-<i>`` (a multi-node cluster for tests
    and demos; the head then keeps no CPUs, so all work lands on the workers). With ``isolated``
    each worker node runs in its own mount namespace where /tmp, the home folder, ./runs and the
    model caches are empty private folders, as on a machine that shares no disk with this one
    (needs root, for ``unshare --mount``). Token authentication is on (a token is made when there is
    none) unless RAY_AUTH_MODE says otherwise; the dashboard and the Jobs API listen on
    ``dashboard_host`` only. Returns the address to pass as --address."""
    ensure_token()
    for what, number in (("Ray's GCS", port), ("the dashboard", dashboard_port)):
        if port_taken(number):
            raise UserError(f"port {number} for {what} is taken on this machine (a Ray cluster runs there already?): "
                            f"use that cluster (--address 127.0.0.1:{port}), stop one that `cluster up` started with "
                            "`modecotd cluster down`, or pick another port; nothing was started or stopped")
    try:
        _start_nodes(port, dashboard_port, workers, num_cpus, cpus_per_worker, isolated, dashboard_host)
    except BaseException:
        stop_cluster(port)  # what this call started, and nothing else of the user's
        raise
    RECORDS.mkdir(parents=True, exist_ok=True)
    (RECORDS / f"{port}.json").write_text(json.dumps({"port": port, "dashboard_port": dashboard_port,
                                                       "workers": workers, "started_at": time.time()}))
    return f"127.0.0.1:{port}"


def _start_nodes(port: int, dashboard_port: int, workers: int, num_cpus: int | None, cpus_per_worker: float,
                 isolated: bool, dashboard_host: str) -> None:
    head = [_ray_cli(), "start", "--head", f"--port={port}", "--include-dashboard=true",
            f"--dashboard-host={dashboard_host}", f"--dashboard-port={dashboard_port}", "--disable-usage-stats"]
    if workers:
        head.append("--num-cpus=0")
    elif num_cpus:
        head.append(f"--num-cpus={num_cpus}")
    _ray_start(head)
    for i in range(1, workers + 1):
        # Its own temp folder, as a node on another machine has: nodes sharing one would clean up
        # each other's unpacked job files (a job driver's working folder included).
        temp = Path(tempfile.gettempdir()) / f"modecotd-ray-worker-{i}"
        command = [_ray_cli(), "start", f"--address=127.0.0.1:{port}", f"--num-cpus={cpus_per_worker:g}",
                   f"--resources={json.dumps({f'worker-{i}': 1})}", f"--temp-dir={temp}", "--disable-usage-stats"]
        _ray_start(_in_own_mount_namespace(command, i) if isolated else command, isolated)


def port_taken(port: int) -> bool:
    """Whether something listens on ``port`` of this machine (any interface)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return True
    return False


def private_paths() -> list[Path]:
    """What an isolated worker node must not share with this machine: the temp folder, the home
    folder (caches, Ray's token file), ./runs and the model caches wherever they are set."""
    paths = [Path(tempfile.gettempdir()), Path.home(), Path.cwd() / "runs"]
    paths += [Path(os.environ[name]) for name in ("MODECOTD_CACHE", "HF_HOME") if os.environ.get(name)]
    kept: list[Path] = []
    for path in paths:
        path = path.resolve()
        if path.is_dir() and path != Path("/") and not any(path.is_relative_to(k) for k in kept):
            kept.append(path)
    return kept


def _in_own_mount_namespace(command: list[str], node: int) -> list[str]:
    """``command`` in a new mount namespace where every private path is an empty tmpfs; what the
    node needs to run at all (the Python installation, this environment, modecotd's code) is bound
    back in, and ./runs and the caches inside those are hidden again."""
    if shutil.which("unshare") is None:
        raise UserError("--isolated needs the 'unshare' command (util-linux)")
    hidden = private_paths()
    code = Path(__file__).resolve().parents[1]
    needed = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), code}
    keep = sorted(p for p in needed if any(p.is_relative_to(h) for h in hidden))
    stash = Path("/var/tmp") / f"modecotd-isolated-node-{node}"
    lines = ["set -e"]
    for j, path in enumerate(keep):  # reachable under the stash while the tmpfs hides the original
        lines += [f"mkdir -p {stash}/{j}", f"mount --bind {shlex.quote(str(path))} {stash}/{j}"]
    lines += [f"mount -t tmpfs modecotd-private {shlex.quote(str(p))}" for p in hidden]
    for j, path in enumerate(keep):
        lines += [f"mkdir -p {shlex.quote(str(path))}", f"mount --bind {stash}/{j} {shlex.quote(str(path))}"]
    for path in _private_inside(keep):
        lines.append(f"mount -t tmpfs modecotd-private {shlex.quote(str(path))}")
    lines.append(f"exec {shlex.join(command)}")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "; ".join(lines)]


def _private_inside(kept: list[Path]) -> list[Path]:
    """Private folders that lie inside a folder bound back in (./runs inside the project...)."""
    candidates = [Path.cwd() / "runs", Path.home() / ".cache", Path.home() / ".ray", Path.home() / ".aws"]
    candidates += [Path(os.environ[n]) for n in ("MODECOTD_CACHE", "HF_HOME") if os.environ.get(n)]
    return [p.resolve() for p in candidates if p.is_dir() and any(p.resolve().is_relative_to(k) for k in kept)]


def _ray_start(command: list[str], isolated: bool = False) -> None:
    # Jobs submitted to this cluster run `modecotd ...`: keep this environment's commands on their PATH.
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    if token_available():  # a node joining a token-protected head must present the token
        env.setdefault("RAY_AUTH_MODE", "token")
        if isolated and not env.get("RAY_AUTH_TOKEN"):  # its home folder, with the token file, is hidden
            env["RAY_AUTH_TOKEN"] = read_token()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise UserError(f"ray start failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")


def token_file() -> str:
    """Where the cluster's token is, for the user (never the token itself)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "from RAY_AUTH_TOKEN"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")


def down(port: int | None = None) -> list[int]:
    """Stop the clusters that `cluster up` started here (or the one on ``port``): their processes on
    every node of this machine, and nothing else (a run's private Ray, a cluster the user started
    with `ray start`). Returns the ports of the clusters stopped."""
    ports = [port] if port else sorted(int(p.stem) for p in RECORDS.glob("*.json") if p.stem.isdigit())
    for number in ports:
        stop_cluster(number)
        (RECORDS / f"{number}.json").unlink(missing_ok=True)
    return ports


def cluster_processes(port: int) -> list:
    """The processes of the Ray cluster whose GCS listens on ``port``: those naming its session or its
    GCS address on their command line (GCS, raylets, dashboard, agents, monitors of every node), and
    the processes those started (workers)."""
    import psutil

    def command(process) -> list[str]:
        try:
            return process.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return []

    everything = list(psutil.process_iter())
    sessions = {arg.split("=", 1)[1] for p in everything for arg in command(p)
                if arg.startswith("--session-name=") and f"--gcs_server_port={port}" in command(p)}
    ours = []
    for process in everything:
        args = command(process)
        names_the_gcs = any(arg.startswith(("--address=", "--gcs-address=")) and arg.endswith(f":{port}")
                            for arg in args)
        if names_the_gcs or f"--gcs_server_port={port}" in args or any(s in a for s in sessions for a in args):
            ours.append(process)
    found = {p.pid: p for p in ours}
    for process in ours:
        try:
            found.update({child.pid: child for child in process.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def stop_cluster(port: int) -> None:
    """SIGTERM every process of the cluster on ``port``, then SIGKILL what is left after
    :data:`STOP_GRACE_S` seconds."""
    import psutil

    processes = cluster_processes(port)
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=STOP_GRACE_S)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=STOP_GRACE_S)
    # where Ray looks for "the" cluster of this machine (ray.init() without an address joins it)
    current = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        if current.read_text().strip().endswith(f":{port}"):
            current.unlink()
    except OSError:
        pass
