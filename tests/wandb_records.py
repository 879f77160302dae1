"""Reads back what W&B's offline mode wrote: a run's ``run-*.wandb`` file is a log of protobuf
records in 32 KiB blocks (a 7-byte file header, then each record or record fragment behind a
7-byte header: checksum, length, kind), the format ``wandb sync`` uploads later."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    found, pending, position = [], b"", HEADER
    while position + HEADER <= len(data):
        room = BLOCK - position % BLOCK
        if room < HEADER:  # a block's tail too short for a header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        if kind == 0:  # zeros: the rest of the block is padding
            position += room
            continue
        chunk = data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
    return found


def history(path: Path) -> list[dict]:
    """Each logged step's values, W&B's own keys (``_step``, ``_runtime``...) left out."""
    steps = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                      for item in record.history.item}
            steps.append({k: v for k, v in values.items() if not k.startswith("_")} | {"step": values.get("_step")})
    return steps


def run_facts(path: Path) -> dict:
    """The run's group, job type, name and config as the run record has them."""
    [run] = [r.run for r in records(path) if r.WhichOneof("record_type") == "run"][:1]
    config = {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
    return {"group": run.run_group, "job_type": run.job_type, "name": run.display_name, "config": config}


def artifacts(path: Path) -> list[str]:
    """The names of the artifacts the run logged."""
    return [r.artifact.name for r in records(path) if r.WhichOneof("record_type") == "artifact"]
