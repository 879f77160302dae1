"""Takes down the local Ray a run started when the run's driver dies without shutting it down.

``ray.init`` without an address starts a private cluster (GCS, raylet, agents, workers) as the
driver's descendants. A driver that exits or is stopped with Ctrl-C shuts it down; one killed with
SIGKILL cannot, and Ray's runtime-env and dashboard agents then live on. This process, started by
the driver (``python -m modecotd.jobs.reaper PID``) in a session of its own, notes the driver's
descendants every second; once the driver is gone it kills those that are still running.
"""
from __future__ import annotations

import os
import signal
import sys
import time

POLL_S = 1.0


def reap(driver_pid: int, poll_s: float = POLL_S) -> list[int]:
    """Watch ``driver_pid``; when it is gone, kill its last seen descendants; returns their pids."""
    import psutil

    me = os.getpid()
    seen: dict[int, float] = {}  # pid -> create time (a pid reused by another process is left alone)
    try:
        driver = psutil.Process(driver_pid)
        while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
            for child in driver.children(recursive=True):
                if child.pid != me:
                    try:
                        seen.setdefault(child.pid, child.create_time())
                    except psutil.Error:
                        pass
            time.sleep(poll_s)
    except psutil.Error:
        pass
    killed = []
    for pid, created in seen.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created:
                process.send_signal(signal.SIGKILL)
                killed.append(pid)
        except psutil.Error:
            pass
    return killed


def start(driver_pid: int | None = None):
    """Start the reaper for this process (or ``driver_pid``); it outlives neither its work nor a reboot."""
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "modecotd.jobs.reaper", str(driver_pid or os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


if __name__ == "__main__":
    reap(int(sys.argv[1]))
