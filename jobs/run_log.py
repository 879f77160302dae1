"""The run's log file: everything the driver logs, and every line Ray's workers print (teacher and
evaluator actors, Ray Train workers and their controller, Tune trials, DeepSpeed inside them, Ray's
own C++ notices), while the terminal shows the progress lines, the driver's own messages, and of the
workers' lines only the warnings a user must act on: modecotd's own warnings (marked in each worker
by :func:`mark_warnings`) and the raylet's (a worker killed for memory, objects spilled).
``--verbose`` shows every worker line in the terminal too, as Ray does by default.

The file is written beside the model cache (``<model cache>/../logs/<run name>/run-<start
time>.log``), never inside the run folder while the run goes on (an open file there would keep its
disk from being remounted or unmounted), and copied into the run's ``logs/`` when the run ends, the
way it ends (where that copy fails, for a full or read-only disk, it says where the log stays).
"""
from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger(__name__)

MARK = "modecotd-warning: "
RAY_PRINTER = "ray_print_logs"  # the name of the handler through which ray.init(log_to_driver=True) prints
OURS = "modecotd_run_log"
LOGS = "logs"


def mark_warnings() -> None:
    """Ray's worker_process_setup_hook, run in every worker process of the run: modecotd's warnings
    and errors go to the worker's standard error with a mark the driver looks for."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(MARK + "%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("modecotd").addHandler(handler)


class RunLog:
    """Open for the duration of a run: see the module's text."""

    def __init__(self, storage, name: str):
        from modecotd.models import cache_dir

        self.storage = storage
        self.file_name = f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
        folder = cache_dir().parent / LOGS / name
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / self.file_name
        self.stream = open(self.path, "a", buffering=1, encoding="utf-8")
        self.lock = threading.Lock()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        self.handler.setLevel(logging.getLogger().getEffectiveLevel())
        self.captured = False

    def __enter__(self) -> "RunLog":
        logging.getLogger().addHandler(self.handler)
        log.info("this run's log: %s (copied into the run's %s/ when it ends)", self.path, LOGS)
        return self

    def capture_workers(self, verbose: bool) -> None:
        """Take the workers' lines from Ray's printer (call after ``ray.init(log_to_driver=True)``
        in this process); with ``verbose`` Ray's printer keeps printing them too."""
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        if not verbose:
            dispatcher.remove_handler(RAY_PRINTER)
        dispatcher.add_handler(OURS, lambda data: self._worker_lines(data, verbose))
        self.captured = True

    def _worker_lines(self, data: dict, verbose: bool) -> None:
        who = data.get("actor_name") or data.get("task_name") or data.get("pid")
        lines = data.get("lines") or []
        with self.lock:
            for line in lines:
                self.stream.write(f"({who} pid={data.get('pid')}, {data.get('ip')}) {line}\n")
        if verbose:
            return
        for line in lines:
            if MARK in line:
                print(f"({who}) {line.split(MARK, 1)[1]}", file=sys.stderr, flush=True)
            elif data.get("pid") == "raylet" and ("WARNING" in line or "ERROR" in line or "killed" in line.lower()):
                print(f"(raylet) {line}", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self.captured:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

            dispatcher.remove_handler(OURS)
        logging.getLogger().removeHandler(self.handler)
        with self.lock:
            self.stream.close()
        try:
            self.storage.upload(self.path, f"{LOGS}/{self.file_name}")
        except Exception as error:  # the run's own outcome matters more than its log's copy
            log.warning("this run's log stays at %s: copying it into the run failed (%s)", self.path, error)
