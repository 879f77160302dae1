"""One driver per run: the run's lease on a folder, on S3 (SeaweedFS: conditional PUTs) and on GCS
(the emulator ignores preconditions, so the race is tested on the folder and S3 only)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from modecotd.errors import UserError
from modecotd.lease import LEASE, RunLease, slot_for
from modecotd.storage import Storage


@pytest.fixture(params=["folder", "s3"])
def storage(request, tmp_path):
    if request.param == "folder":
        return Storage(tmp_path / "run")
    request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(f"s3://{bucket}/lease-{uuid.uuid4().hex[:8]}")


def lease_of(storage: Storage) -> dict:
    return json.loads(slot_for(storage).read()[0])


def test_a_second_driver_is_refused_in_one_line_naming_the_holder(storage):
    with RunLease(storage):
        with pytest.raises(UserError) as refused:
            RunLease(storage).acquire()
        message = str(refused.value)
        assert "\n" not in message and LEASE in message
        assert f"driver pid {os.getpid()} on {socket.gethostname()}" in message and "--take-over" in message
    assert slot_for(storage).read() is None  # released at the end
    with RunLease(storage):  # and free for the next driver
        pass


RACER = """
import sys, time
from modecotd.errors import UserError
from modecotd.lease import RunLease
from modecotd.storage import Storage
lease = RunLease(Storage(sys.argv[1]))
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # every driver starts at the same moment
try:
    lease.acquire()
    print("won", lease.holder["token"])
    time.sleep(3)  # held while the others try
except UserError:
    print("refused")
"""


def test_of_drivers_starting_at_once_exactly_one_gets_the_lease(storage):
    start = str(time.time() + 4)
    drivers = [subprocess.Popen([sys.executable, "-c", RACER, storage.uri, start], stdout=subprocess.PIPE, text=True)
               for _ in range(6)]
    said = [driver.communicate(timeout=60)[0].split() for driver in drivers]
    winners = [words[1] for words in said if words[:1] == ["won"]]
    assert len(winners) == 1 and sum(words == ["refused"] for words in said) == 5, said


def test_a_lease_of_a_dead_process_or_a_lapsed_one_is_taken_over(storage):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = RunLease(storage)
    gone.holder = {**gone.holder, "pid": dead.pid}  # as if a driver killed with kill -9 held it
    gone.acquire()
    with RunLease(storage) as taker:  # on this machine and gone: taken at once
        assert lease_of(storage)["holder"]["token"] == taker.holder["token"]

    elsewhere = RunLease(storage, ttl_s=0.5)
    elsewhere.holder = {**elsewhere.holder, "host": "another-machine"}
    elsewhere.acquire()
    with pytest.raises(UserError, match="held by driver pid .* on another-machine"):
        RunLease(storage).acquire()  # alive as far as this machine can tell
    time.sleep(0.7)  # no renewal for longer than its ttl: it lapsed
    with RunLease(storage):
        pass


def test_a_live_lease_is_renewed_and_take_over_makes_the_old_driver_stop(storage):
    with RunLease(storage, ttl_s=1.0, renew_every_s=0.2) as first:
        time.sleep(1.5)  # past its ttl, but renewed
        with pytest.raises(UserError, match="is held by"):
            RunLease(storage).acquire()
        taker = RunLease(storage, take_over=True)
        taker.acquire()
        with pytest.raises(UserError, match="lease is now held by driver pid"):
            first.renew()
        taker.release()


def test_a_lease_lost_stops_the_driver(tmp_path):
    """The renewing thread interrupts the main thread when another driver took the lease."""
    storage = Storage(tmp_path / "run")
    lease = RunLease(storage, ttl_s=5, renew_every_s=0.1)
    with pytest.raises(KeyboardInterrupt):
        with lease:
            RunLease(storage, take_over=True).acquire()
            time.sleep(5)  # interrupted well before
    assert "now held by" in lease.lost


def test_run_refuses_a_run_held_by_another_driver_and_touches_nothing(tmp_path, capsys):
    import yaml

    from modecotd.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "held", "student": {"model": "builtin:tiny"},
                                      "tasks": [{"name": "coins", "role": "seen",
                                                 "source": {"kind": "generated", "family": "coin_flip", "size": 2}}]}))
    run_dir = tmp_path / "run"
    staging = run_dir / "experts" / ".coins.staging-1-abcd"  # the other driver's work in progress
    staging.mkdir(parents=True)
    with RunLease(Storage(run_dir)):
        code = main(["run", str(config), "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "is held by driver pid" in lines[0], err
    assert staging.is_dir() and not (run_dir / "config.yaml").exists()


def test_on_gcs_a_held_lease_is_refused_and_released(gcs_env):
    storage = Storage(gcs_env.uri(f"lease-{uuid.uuid4().hex[:8]}"))
    with RunLease(storage) as held:
        assert lease_of(storage)["holder"]["token"] == held.holder["token"]
        with pytest.raises(UserError, match="is held by"):
            RunLease(storage).acquire()
        held.renew()
    assert slot_for(storage).read() is None
