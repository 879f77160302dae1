"""Runs as Ray jobs: `modecotd submit|status|logs|stop|list` through the Ray Jobs API.

A submitted run is the entrypoint ``modecotd run CONFIG --run-dir DIR`` with a working directory
holding the config and the data files it names (or a folder the user chooses; see
:mod:`modecotd.cluster.upload`, which measures it and refuses one too large), a readable submission id
(``modecotd-<run name>-<time>-<6 hex digits>``) and metadata that the dashboard shows: run name, stages, config
fingerprint. The client sends Ray's token when one is at hand (see :mod:`modecotd.cluster.auth`,
which the CLI calls before Ray is imported); nothing here turns authentication off.
"""
from __future__ import annotations

import os
import secrets
import shlex
import time
from pathlib import Path

from modecotd.errors import UserError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_RUNS_DIR = "~/modecotd-runs"  # on the cluster's head node, where the job's driver runs
JOB_PREFIX = "modecotd-"


def address_or_default(address: str | None) -> str:
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def client(address: str | None, allow_plain_token: bool = False):
    """The Jobs API at ``address`` (see :func:`address_or_default`); ``allow_plain_token``: the CLI's
    --allow-http-token (see :func:`modecotd.cluster.auth.check_token_transport`)."""
    from ray.job_submission import JobSubmissionClient

    from modecotd.cluster.auth import check_token_transport

    resolved = address_or_default(address)
    check_token_transport(resolved, allow_plain_token)
    try:
        return JobSubmissionClient(resolved)
    except Exception as exc:  # connection refused, 401 without a token, not a Ray dashboard
        text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if "401" in text or "nauthori" in text or "authentication" in text.lower():
            raise UserError(f"the Ray Jobs API at {resolved} refused this client's token (missing or wrong): give "
                            "the cluster's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token "
                            f"({text})") from None
        raise UserError(f"cannot reach the Ray Jobs API at {resolved}: {text}") from None


def submit(config_path: Path, *, address: str | None = None, run_dir: str | None = None,
           stages: list[str] | None = None, overrides: list[str] | None = None, pip: list[str] | None = None,
           env: dict[str, str] | None = None, working_dir: Path | None = None, excludes: list[str] | None = None,
           submission_id: str | None = None, say=print, allow_plain_token: bool = False) -> str:
    """Submit a run; returns its submission id. ``env``: variables for the run's driver only;
    ``working_dir`` and ``excludes``: send that folder (but what the patterns exclude) instead of only
    the config and its data files; ``say`` is told what is uploaded before it is sent. With
    ``submission_id``, a retry is idempotent: a job of that id with the same config and run folder
    is that run (nothing is submitted again); one with another config is refused."""
    from modecotd.artifacts import fingerprint
    from modecotd.config_loading import load_config

    config_path = Path(config_path)
    from modecotd.storage import is_uri

    config = load_config(config_path, overrides or [])  # a bad config fails here, not on the cluster
    # an object store is the same seen from anywhere; a relative folder means one on the head node
    run_dir = run_dir or (config.run_location() if is_uri(config.storage) or Path(config.storage).is_absolute()
                          else f"{DEFAULT_RUNS_DIR}/{config.name}")
    from modecotd.cluster.upload import stage as stage_upload

    upload = stage_upload(config_path, working_dir, excludes or [])  # a too large upload fails here, before sending
    words = ["modecotd", "run", upload.config, "--run-dir", run_dir]
    for stage in stages or []:
        words += ["--stage", stage]
    for override in overrides or []:
        words += ["--set", override]
    entrypoint = " ".join(_shell_word(w) for w in words)
    # The run's own driver gives its workers their environment (ray_runtime.worker_env); the job's
    # runtime environment must not set the same keys, or Ray refuses to merge the two.
    runtime_env = {"working_dir": str(upload.root)}
    if env:
        runtime_env["env_vars"] = dict(env)
    if pip:
        runtime_env["pip"] = list(pip)
    metadata = {"job_name": f"modecotd {config.name}", "run": config.name, "stages": ",".join(stages or []) or "all",
                "run_dir": run_dir,
                "config_fingerprint": fingerprint(config.model_dump(mode="json"))}
    # unique even for one config submitted many times in one second
    submission_id = submission_id or f"{JOB_PREFIX}{config.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    try:
        jobs = client(address, allow_plain_token)
        if _already_submitted(jobs, submission_id, metadata):
            say(f"{submission_id} was submitted before with this config and run folder: not submitted again")
            return submission_id
        say(upload.describe())
        return jobs.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env,
                               metadata=metadata)
    except RuntimeError as error:  # the Jobs API's refusal, e.g. HTTP 413 from a server with a lower limit
        if "already exists" in str(error) and _already_submitted(jobs, submission_id, metadata):
            return submission_id  # a retry racing the first submission
        raise UserError(f"the Ray Jobs API at {address_or_default(address)} refused the job: "
                        f"{str(error).splitlines()[0][:300]}") from None
    finally:
        upload.remove()


def _already_submitted(jobs, submission_id: str, metadata: dict) -> bool:
    """Whether the cluster holds a job ``submission_id`` for this very run (same config fingerprint,
    stages and run folder); a job of that id for anything else is refused."""
    try:
        info = jobs.get_job_info(submission_id)
    except RuntimeError:  # no such job
        return False
    held = info.metadata or {}
    if all(held.get(key) == metadata[key] for key in ("config_fingerprint", "stages", "run_dir")):
        return True
    raise UserError(f"submission id {submission_id} is taken by another run (run {held.get('run')!r}, run folder "
                    f"{held.get('run_dir')!r}); pick another --submission-id, or leave it out for a new one")


def _shell_word(word: str) -> str:
    """Quoted for the shell, except a leading ``~/``, which the head node's shell expands."""
    return "~/" + shlex.quote(word[2:]) if word.startswith("~/") else shlex.quote(word)


def status(submission_id: str, address: str | None = None, allow_plain_token: bool = False) -> dict:
    info = client(address, allow_plain_token).get_job_info(submission_id)
    return {"submission_id": submission_id, "status": str(info.status.value), "message": info.message,
            "metadata": info.metadata, "entrypoint": info.entrypoint,
            "start_time": info.start_time, "end_time": info.end_time}


def wait(submission_id: str, address: str | None = None, timeout_s: float = 3600, poll_s: float = 2.0,
         allow_plain_token: bool = False) -> str:
    """Wait until the job ends; returns its final status (SUCCEEDED, FAILED or STOPPED)."""
    jobs = client(address, allow_plain_token)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = str(jobs.get_job_status(submission_id).value)
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        time.sleep(poll_s)
    raise TimeoutError(f"job {submission_id} still running after {timeout_s:.0f} s")


def logs(submission_id: str, address: str | None = None, follow: bool = False, allow_plain_token: bool = False):
    """The job's log so far, or (``follow``) its lines as they come until it ends."""
    jobs = client(address, allow_plain_token)
    if not follow:
        yield jobs.get_job_logs(submission_id)
        return
    import asyncio

    async def tail():
        async for chunk in jobs.tail_job_logs(submission_id):
            yield chunk

    iterator = tail().__aiter__()
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(iterator.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def stop(submission_id: str, address: str | None = None, allow_plain_token: bool = False) -> bool:
    return client(address, allow_plain_token).stop_job(submission_id)


def list_runs(address: str | None = None, allow_plain_token: bool = False) -> list[dict]:
    """modecotd's jobs on the cluster, newest first."""
    jobs = [j for j in client(address, allow_plain_token).list_jobs()  # ours: our ids, or an id the user chose with our metadata
            if (j.submission_id or "").startswith(JOB_PREFIX) or "config_fingerprint" in (j.metadata or {})]
    jobs.sort(key=lambda j: j.start_time or 0, reverse=True)
    return [{"submission_id": j.submission_id, "status": str(j.status.value), "run": (j.metadata or {}).get("run"),
             "stages": (j.metadata or {}).get("stages"), "start_time": j.start_time} for j in jobs]
