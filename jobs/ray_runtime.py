"""Connecting to Ray: a local cluster started in-process, or an existing one by address.

Token authentication: see :mod:`modecotd.cluster.auth` (it must act before Ray is imported).
"""
from __future__ import annotations

import logging
import os
import socket

import ray

from modecotd.cluster.auth import check_token_over_grpc, make_token_file, token_available
from modecotd.errors import UserError

log = logging.getLogger(__name__)

# Passed to every worker when the driver has them (whether models may be downloaded, where the
# caches are). Credentials are never forwarded: each node has its own (see modecotd.storage).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MODECOTD_CACHE", "HF_HOME")


def worker_env() -> dict[str, str]:
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no per-load progress bars in every actor's log
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    return env


def this_cluster_env() -> dict[str, str]:
    """Environment variables for the Ray work a stage starts (the workers' own plus RAY_ADDRESS, this
    cluster's GCS): Ray Train's helper actors look the cluster up with Ray's state API, which without
    RAY_ADDRESS searches the machine for a Ray and fails where it finds two (a private run's cluster
    beside a `ray start` one), printing a traceback and leaving a dead job's placement group behind."""
    return {**worker_env(), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def check_address(address: str | None, allow_plain_token: bool = False) -> None:
    """Refuse, in one line and before anything is written or started, an ``address`` (or
    ``RAY_ADDRESS``) that would send the token in clear text or that no Ray answers at."""
    given, address = address, address or os.environ.get("RAY_ADDRESS")
    if address:
        check_token_over_grpc(address, allow_plain_token)  # never the token in clear text on a network
    if given:
        check_reachable(given)  # before anything else: Ray would wait for minutes


def connect(address: str | None, num_cpus: int | None = None, dashboard: bool = True,
            dashboard_host: str = "127.0.0.1", run: str | None = None, run_log=None,
            allow_plain_token: bool = False) -> dict:
    """Start or join a Ray cluster; returns what the run should print about it. Without an
    address, a run inside a Ray job (which sets RAY_ADDRESS) joins the job's cluster. ``run``: the
    run's name, shown by the dashboard as the job's name (its ``job_name`` metadata), as for a
    submitted run. ``run_log``: a :class:`modecotd.jobs.run_log.RunLog` that takes the workers'
    lines (the terminal shows only their warnings, unless debug logging is on)."""
    check_address(address, allow_plain_token)
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return {"address": "already connected", "dashboard": None}
    runtime_env = {"env_vars": worker_env()}
    if run_log is not None:
        runtime_env["worker_process_setup_hook"] = "modecotd.jobs.run_log.mark_warnings"
    kwargs = dict(runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=True)
    if run:
        from ray.job_config import JobConfig

        kwargs["job_config"] = JobConfig(metadata={"job_name": f"modecotd {run}", "run": run})
    if address:
        if os.environ.get("RAY_AUTH_MODE") != "token" and token_available():
            log.warning("a Ray auth token exists but RAY_AUTH_MODE was not 'token' when Ray was imported; "
                        "the connection may be refused (modecotd's CLI sets it for you)")
        context = ray.init(address=address, **kwargs)
    else:
        make_token_file()  # Ray's first start on a machine would write its token readable by every user
        # "local": a private cluster even where `ray start` runs one (Ray would join that one instead)
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                           dashboard_host=dashboard_host, **kwargs)
        from modecotd.jobs import reaper

        reaper.start()  # should this process be killed, its private Ray goes with it
    if run_log is not None:
        run_log.capture_workers(verbose=logging.getLogger().isEnabledFor(logging.DEBUG))
    info = {"address": context.address_info.get("address"), "dashboard": context.dashboard_url or None,
            "started_here": not address}
    log.info("Ray cluster at %s, dashboard %s", info["address"], info["dashboard"])
    return info


PROBE_TIMEOUT_S = 5.0  # Ray itself waits minutes for a GCS that is not there


def check_reachable(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast, naming the address, when nothing that speaks gRPC (Ray's GCS, or a Ray Client
    server for ``ray://``) answers there: ``ray.init`` would wait for minutes. "auto" and "local"
    are left to Ray, and so are clusters using TLS (the probe speaks plain gRPC)."""
    if address in ("auto", "local") or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected HOST:PORT (a Ray cluster's GCS, e.g. 127.0.0.1:6379) "
                        "or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise UserError(f"cannot reach a Ray cluster at {address}: {reason}; start one (modecotd cluster up, or "
                        "ray start --head) or pass the head node's HOST:6379") from None
    import grpc

    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise UserError(f"{address} answers but is not a Ray cluster (no gRPC reply within {timeout_s:g} s); "
                        "--address takes the GCS address (HOST:6379), not the dashboard's (8265)") from None
    finally:
        channel.close()


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def root_cause(exc: BaseException) -> str:
    """The original error inside a Ray error, as one line: the last ``SomeError: message`` line of
    its text (Ray wraps remote errors in tracebacks and banners), else its last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head and not head.startswith("ray."):
            return line[:400]
    return (lines[-1] if lines else type(exc).__name__)[:400]


DISK_SIGNS = ("No space left on device", "Read-only file system", "Disk quota exceeded")


def stop_if_disk_failed(error: str, where: str) -> None:
    """A worker's failure that is the run folder's disk (full, read-only, over quota) stops the
    stage in one line instead of failing every unit after it in turn."""
    if any(sign in error for sign in DISK_SIGNS):
        from modecotd.storage import StorageError

        raise StorageError(f"{where}: {error}: the stage stopped; units committed before are kept: free space "
                           "(or make the folder writable) and run the same command again")
