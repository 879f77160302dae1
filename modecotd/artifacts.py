"""Units of work on disk: fingerprinted, committed atomically, skipped when done.

A unit is a folder (a task's rationales, an expert, a mixture, an evaluation). It is written in
a hidden staging folder beside its final place; ``manifest.json`` is written last and the folder
is then renamed into place, so a reader never sees half an artifact and a crash leaves only a
staging folder that the next run removes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
FINGERPRINT_LENGTH = 16


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able inputs and settings."""
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()[:FINGERPRINT_LENGTH]


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


class Unit:
    """One unit of work at ``path`` whose content is determined by ``key``."""

    def __init__(self, path: Path, key: str):
        self.path = Path(path)
        self.key = key

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def manifest(self) -> dict | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def done(self) -> bool:
        """True when a complete unit with the same fingerprint is already on disk."""
        manifest = self.manifest()
        return manifest is not None and manifest.get("fingerprint") == self.key

    def begin(self) -> Path:
        """Create and return a fresh staging folder for this unit."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.parent / f".{self.path.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        return staging

    def commit(self, staging: Path, summary: dict | None = None, seconds: float | None = None) -> None:
        """Write the manifest last, then move the staging folder into place (replacing an older unit)."""
        manifest = {
            "fingerprint": self.key,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seconds": None if seconds is None else round(seconds, 3),
            "summary": summary or {},
        }
        write_json(staging / MANIFEST, manifest)
        if self.path.exists():
            retired = self.path.parent / f".{self.path.name}.retired-{uuid.uuid4().hex[:8]}"
            os.replace(self.path, retired)
            os.replace(staging, self.path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, self.path)

    @staticmethod
    def abort(staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    @contextlib.contextmanager
    def writing(self, summary: dict | None = None) -> Iterator[Path]:
        """Yield a staging folder; on success commit it with ``summary`` (which the caller may fill
        in while writing), on any error discard it."""
        staging = self.begin()
        started = time.time()
        try:
            yield staging
            self.commit(staging, summary, time.time() - started)
        except BaseException:
            self.abort(staging)
            raise


def pending(units: dict[str, Unit], stage: str, log) -> list[str]:
    """Names of the units not done yet; logs the ones skipped because they are."""
    todo = [name for name, unit in units.items() if not unit.done()]
    for name in units:
        if name not in todo:
            log.info("%s: %s already done, skipped", stage, name)
    return todo


def clean_staging(folder: Path) -> None:
    """Remove staging and retired folders left by a crashed run under ``folder``."""
    for pattern in ("**/.*.staging-*", "**/.*.retired-*"):
        for stale in Path(folder).glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
