"""Before a run writes anything: can every node of the Ray cluster reach the run's storage?

A local folder is only right on a cluster when every node mounts it at the same path (NFS, a
ReadWriteMany volume); on a one-machine cluster it always is. The driver writes a probe file and
a task pinned to each alive node reads it back: a node that cannot stops the run with one line
naming the node and what to use instead. An object store is checked the same way, so that a node
without credentials (or without a route to the endpoint) is found before any work is lost.
"""
from __future__ import annotations

import uuid

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from modecotd.errors import UserError
from modecotd.storage import Storage

PROBE_TIMEOUT_S = 120


@ray.remote(num_cpus=0)
def _read_probe(storage: Storage, name: str) -> str:
    import socket

    try:
        return "ok" if storage.read_text(name) == name else "read something else"
    except FileNotFoundError:
        return f"no such file on {socket.gethostname()}"
    except Exception as error:  # a node without credentials, a route or the mount
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


def check_every_node_reaches(storage: Storage) -> int:
    """Raise a UserError naming each alive node that cannot read the run's storage; returns how
    many nodes were checked."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1 and storage.is_local:
        return len(nodes)  # the driver's own machine: the folder is there
    name = f".probe-{uuid.uuid4().hex[:12]}"
    storage.write_text(name, name)
    try:
        refs = {_read_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(storage, name): n for n in nodes}
        ready, waiting = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        problems = [f"{refs[r]['NodeManagerAddress']}: {ray.get(r)}" for r in ready if ray.get(r) != "ok"]
        problems += [f"{refs[r]['NodeManagerAddress']}: no answer within {PROBE_TIMEOUT_S} s" for r in waiting]
    finally:
        storage.delete(name)
    if problems:
        hint = ("a local folder works on a cluster only when every node mounts it at the same path; use a "
                "shared mount or an object store (storage: s3://bucket/prefix)") if storage.is_local else \
            "every node needs the storage's credentials in its environment and a route to it"
        raise UserError(f"storage {storage.describe()} cannot be read from {len(problems)} of {len(nodes)} "
                        f"Ray nodes ({'; '.join(problems)}): {hint}")
    return len(nodes)
