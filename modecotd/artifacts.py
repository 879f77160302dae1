"""Units of work in a run's storage: fingerprinted, committed whole, verified, skipped when done.

A unit is a folder of files (a task's rationales, an expert, a mixture, an evaluation) under one
prefix of the run's :class:`~modecotd.storage.Storage`. It is written in a local staging folder;
the commit publishes its files and then ``manifest.json``, which lists every file's size and
sha256, so a unit is done only when its manifest is there, its fingerprint is the one asked for
and its files match. On a local folder the staging folder sits beside the unit and is renamed into
place; on an object store (no rename) the files are uploaded under the prefix and the manifest
last. A crash leaves no manifest, and a unit without one is written again, never read.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from modecotd.storage import Storage, StorageError, is_inside, sha256_of

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
    try:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def scratch_dir() -> Path:
    """This node's folder for staging and for copies of units fetched from an object store."""
    from modecotd.models import cache_dir

    return cache_dir() / "units"


FETCH_TRIES = 3  # reads of one file of a unit before a transfer that keeps differing is given up


def listed_files(folder: Path) -> dict[str, dict]:
    """Every file under ``folder`` (but a manifest) with its size and sha256, by relative path."""
    return {path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": sha256_of(path)}
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}


class Unit:
    """One unit of work under ``prefix`` in ``storage``, whose content is determined by ``key``.
    Picklable: a worker on any node commits or reads it through the storage."""

    def __init__(self, storage: Storage, prefix: str, key: str):
        self.storage = storage
        self.prefix = prefix.strip("/")
        self.key = key
        self._verified: tuple | None = None  # what was last checked, so an unchanged unit is hashed once

    def __repr__(self) -> str:
        return f"Unit({self.where}, {self.key})"

    def __getstate__(self):
        return {"storage": self.storage, "prefix": self.prefix, "key": self.key, "_verified": None}

    @property
    def where(self) -> str:
        return self.storage.describe(self.prefix)

    def _file(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def manifest(self) -> dict | None:
        try:
            return json.loads(self.storage.read_text(self._file(MANIFEST)))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def problem(self) -> str | None:
        """Why this unit is not done, in words; None when it is."""
        manifest = self.manifest()
        if manifest is None:
            return "not written yet"
        if manifest.get("fingerprint") != self.key:
            return "written with other settings"
        files = manifest.get("files")
        if not isinstance(files, dict):
            return "its manifest lists no files (written by an older version)"
        unsafe = [name for name in files if not is_inside(name)]
        if unsafe:
            return f"its manifest names a file outside the unit ({unsafe[0]!r})"
        state = [json.dumps(manifest, sort_keys=True)]
        for name, facts in files.items():
            size = self.storage.size(self._file(name))
            if size is None:
                return f"{name} is missing"
            if size != facts.get("size"):
                return f"{name} has {size} bytes, its manifest says {facts.get('size')}"
            if self.storage.is_local:  # an object store's files are checked when they are fetched
                path = self.storage.local_root / self.prefix / name
                state.append((name, path.stat().st_mtime_ns))
        if self._verified != tuple(state):
            if self.storage.is_local:
                for name, facts in files.items():
                    if sha256_of(self.storage.local_root / self.prefix / name) != facts.get("sha256"):
                        return f"{name} was changed after it was written (sha256 differs from its manifest)"
            self._verified = tuple(state)
        return None

    def done(self) -> bool:
        """True when a complete unit with this fingerprint, its files as committed, is in storage."""
        return self.problem() is None

    def begin(self) -> Path:
        """A fresh local staging folder for this unit (beside it on a local folder, so that the
        commit is a rename; in this node's scratch folder otherwise)."""
        name = f".{Path(self.prefix).name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if self.storage.is_local:
            parent = (self.storage.local_root / self.prefix).parent
            parent.mkdir(parents=True, exist_ok=True)
            staging = parent / name
            staging.mkdir()
            return staging
        scratch_dir().mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=name, dir=scratch_dir()))

    def commit(self, staging: Path, summary: dict | None = None, seconds: float | None = None) -> None:
        """Publish ``staging``'s files, then the manifest (replacing an older unit); removes ``staging``."""
        manifest = {
            "fingerprint": self.key,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seconds": None if seconds is None else round(seconds, 3),
            "summary": summary or {},
            "files": listed_files(staging),
        }
        if self.storage.is_local:
            write_json(staging / MANIFEST, manifest)
            target = self.storage.local_root / self.prefix
            if target.exists():
                retired = target.parent / f".{target.name}.retired-{uuid.uuid4().hex[:8]}"
                os.replace(target, retired)
                os.replace(staging, target)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(staging, target)
            return
        self.storage.delete(self._file(MANIFEST))  # the old unit stops being done before its files go
        self.storage.delete(self.prefix)
        for name in manifest["files"]:
            self.storage.upload(staging / name, self._file(name))
        self.storage.write_text(self._file(MANIFEST), json.dumps(manifest, indent=2, sort_keys=True, default=str))
        shutil.rmtree(staging, ignore_errors=True)

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

    def local(self) -> Path:
        """A folder of this node holding the committed unit: the unit itself on a local folder,
        otherwise a copy fetched once per node and checked against the manifest's sha256."""
        manifest = self.manifest()
        if manifest is None or manifest.get("fingerprint") != self.key:
            raise StorageError(f"{self.where}: not done ({self.problem()}); it cannot be read")
        if self.storage.is_local:
            return self.storage.local_root / self.prefix
        identity = hashlib.sha256(f"{self.storage.uri}|{self.prefix}".encode()).hexdigest()[:16]
        version = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        target = scratch_dir() / "fetched" / identity / version
        if (target / MANIFEST).is_file():
            return target
        from modecotd.models import exclusive

        with exclusive(target.with_name(version + ".lock")):
            if (target / MANIFEST).is_file():
                return target
            tmp = target.with_name(f"{version}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            if not all(is_inside(name) for name in manifest["files"]):  # never write outside the copy
                raise StorageError(f"{self.where}: its manifest names a file outside the unit")
            try:
                for name, facts in manifest["files"].items():
                    verified_download(self.storage, self.prefix, name, facts["sha256"], tmp / name)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            write_json(tmp / MANIFEST, manifest)
            os.replace(tmp, target)
        return target

    def read_file(self, name: str) -> str:
        """One file of the committed unit, read straight from storage and checked against the
        manifest's sha256."""
        manifest = self.manifest()
        if manifest is None or manifest.get("fingerprint") != self.key:
            raise StorageError(f"{self.where}: not done ({self.problem()}); it cannot be read")
        return read_listed(self.storage, self.prefix, name, manifest)



def verified_download(storage: Storage, prefix: str, name: str, expected: str, target: Path) -> None:
    """Download the file ``name`` of the unit at ``prefix`` to ``target`` and check it against the
    manifest's sha256 ``expected`` (see :func:`_verified`)."""
    def fetch() -> Path:
        storage.download(f"{prefix}/{name}", target)
        return target
    _verified(storage, prefix, name, expected, fetch, sha256_of)


def read_listed(storage: Storage, prefix: str, name: str, manifest: dict) -> str:
    """The file ``name`` of the unit at ``prefix`` whose ``manifest`` lists it, checked against its
    sha256 (FileNotFoundError when the manifest does not list it)."""
    facts = manifest.get("files", {}).get(name) if isinstance(manifest.get("files"), dict) else None
    if not isinstance(facts, dict):
        raise FileNotFoundError(f"{storage.describe(prefix)}/{name}: not listed in the unit's manifest")
    data = _verified(storage, prefix, name, facts.get("sha256"), lambda: storage.read_bytes(f"{prefix}/{name}"),
                     lambda data: hashlib.sha256(data).hexdigest())
    return data.decode("utf-8")


def _verified(storage: Storage, prefix: str, name: str, expected: str, read, digest):
    """``read()`` until its ``digest`` is ``expected``. A read that differs is tried again: a bad
    transfer to this node says nothing about the stored file. Only when two reads agree on a wrong
    sha256 is the stored file itself wrong: then the unit is dropped (its manifest deleted, so that
    no node reads it again and the next run writes it anew)."""
    seen: set[str] = set()
    for _ in range(FETCH_TRIES):
        data = read()
        got = digest(data)
        if got == expected:
            return data
        if got in seen:
            storage.delete(f"{prefix}/{MANIFEST}")
            raise StorageError(f"{storage.describe(prefix)}/{name}: the stored file does not match its manifest "
                               "(sha256); the unit is dropped and the next run writes it again")
        seen.add(got)
    raise StorageError(f"{storage.describe(prefix)}/{name}: {FETCH_TRIES} reads differ from each other and from "
                       "the manifest (sha256); the unit is kept: the transfers, not the stored file, look wrong")


def local_folder(where: "Unit | str | Path") -> Path:
    """A folder on this node: a committed unit's (fetched when its storage is remote), or a path."""
    return where.local() if isinstance(where, Unit) else Path(where)


def pending(units: dict[str, Unit], stage: str, log) -> list[str]:
    """Names of the units not done yet; logs the ones skipped because they are."""
    todo = []
    for name, unit in units.items():
        problem = unit.problem()
        if problem is None:
            log.info("%s: %s already done, skipped", stage, name)
            continue
        todo.append(name)
        if unit.manifest() is not None:
            log.warning("%s: %s is written again: %s", stage, name, problem)
    return todo


def clean_staging(storage: Storage) -> None:
    """Remove the staging and retired folders a crashed run left in a local storage (an object
    store keeps no staging: a half-uploaded unit has no manifest and is replaced when redone)."""
    if not storage.is_local:
        return
    for pattern in ("**/.*.staging-*", "**/.*.retired-*"):
        for stale in storage.local_root.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
