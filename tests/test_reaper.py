"""A driver killed with SIGKILL takes its private Ray down with it: the reaper kills its descendants."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

DRIVER = """
import subprocess, sys, time
from modecotd.jobs import reaper
reaper.start()
grandchild = "import time; time.sleep(300)"
child = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(300)"
subprocess.Popen([sys.executable, "-c", child])
time.sleep(300)
"""


def test_a_killed_drivers_descendants_are_killed_and_the_reaper_ends():
    import psutil

    driver = subprocess.Popen([sys.executable, "-c", DRIVER])
    deadline = time.time() + 30
    tree = []
    while time.time() < deadline and len(tree) < 3:  # the reaper, the child, the grandchild
        tree = psutil.Process(driver.pid).children(recursive=True)
        time.sleep(0.2)
    assert len(tree) == 3, tree
    time.sleep(1.5)  # the reaper has seen them all
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    _, alive = psutil.wait_procs(tree, timeout=10)
    for process in alive:
        process.kill()
    assert not alive


def test_a_driver_that_exits_normally_leaves_nothing_to_kill():
    from modecotd.jobs.reaper import reap

    done = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    assert reap(done.pid, poll_s=0.1) == []
    done.wait()
