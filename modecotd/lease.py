"""One driver per run: a lease in the run's storage.

Two drivers on one run would delete each other's staging folders and interleave their writes. A
driver therefore holds ``lease.json`` in the run's storage while it runs: who holds it (host, process,
start time), and when it last renewed it. The lease is written only by compare-and-swap, so of two
drivers starting at once exactly one gets it:

- a folder (local, or a mount that nodes share): the read-compare-write runs under an exclusive
  ``fcntl`` lock of ``.lease.lock`` (POSIX locks work on NFS too);
- S3: a conditional PUT (``If-None-Match: *`` to create, ``If-Match: <etag>`` to replace);
- GCS: an upload with ``ifGenerationMatch`` (0 to create, the generation read to replace).

The holder renews its lease every :data:`RENEW_EVERY_S`; a lease not renewed for :data:`TTL_S` has
lapsed. A lease is stale, and the next driver takes it over, when it has lapsed or when its holder
ran on this machine and that process is gone (a driver killed with ``kill -9``, then run again).
Otherwise the second driver is refused in one line naming the holder; ``--take-over`` takes the
lease anyway (for a holder on another machine that is known to be dead). A holder that finds its
lease taken (or cannot renew it before it lapses) stops its run.
"""
from __future__ import annotations

import _thread
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from modecotd.errors import UserError
from modecotd.storage import Storage

log = logging.getLogger(__name__)

LEASE = "lease.json"
TTL_S = 120.0
RENEW_EVERY_S = 20.0


class Taken(Exception):
    """The stored object is not the version the writer expected (someone else wrote it)."""


# --- compare-and-swap of one small object, per kind of storage --------------------------------


_THIS_PROCESS = threading.Lock()  # fcntl locks are held per process: threads of one take this one too


class FolderSlot:
    """A file of a folder, swapped under an exclusive lock of a sidecar file; its version is its content."""

    def __init__(self, root: Path, name: str):
        self.path, self.lock = root / name, root / f".{name}.lock"

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _THIS_PROCESS, open(self.lock, "a+") as handle:
            fcntl.lockf(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(handle, fcntl.LOCK_UN)

    def _current(self) -> tuple[bytes, str] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, data.decode("utf-8", "replace")

    def read(self) -> tuple[bytes, str] | None:
        with self._locked():
            return self._current()

    def swap(self, data: bytes, expected: str | None) -> str:
        with self._locked():
            current = self._current()
            if (current[1] if current else None) != expected:
                raise Taken()
            tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
            return data.decode("utf-8", "replace")

    def remove(self, expected: str) -> None:
        with self._locked():
            current = self._current()
            if current and current[1] == expected:
                self.path.unlink()


class S3Slot:
    """An S3 object, written with conditional PUTs; its version is its ETag."""

    def __init__(self, storage: Storage, name: str):
        import boto3

        parts = urlsplit(storage.uri)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        endpoint = query.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name=query.get("region")
                                   or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        self.bucket, self.key = parts.netloc, f"{parts.path.strip('/')}/{name}".lstrip("/")

    def _refused(self, error) -> bool:
        code = error.response.get("Error", {}).get("Code", "")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    def read(self) -> tuple[bytes, str] | None:
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return reply["Body"].read(), reply["ETag"]

    def swap(self, data: bytes, expected: str | None) -> str:
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except ClientError as error:
            if self._refused(error):
                raise Taken() from None
            raise

    def remove(self, expected: str) -> None:
        current = self.read()
        if current and current[1] == expected:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


class GcsSlot:
    """A GCS object, written with ``ifGenerationMatch``; its version is its generation. An emulator
    (``STORAGE_EMULATOR_HOST``, or ``anonymous=true`` in the URI) is reached without credentials."""

    def __init__(self, storage: Storage, name: str):
        import requests

        parts = urlsplit(storage.uri)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        if query.get("endpoint_override"):
            self.base = f"{query.get('scheme', 'https')}://{query['endpoint_override']}"
        else:
            self.base = "https://storage.googleapis.com"
        if query.get("anonymous", "").lower() in ("1", "true", "yes"):
            self.session = requests.Session()
        else:
            import google.auth
            from google.auth.transport.requests import AuthorizedSession

            credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
            self.session = AuthorizedSession(credentials)
        self.bucket, self.name = parts.netloc, f"{parts.path.strip('/')}/{name}".lstrip("/")
        self.object = f"{self.base}/storage/v1/b/{self.bucket}/o/{quote(self.name, safe='')}"

    def read(self) -> tuple[bytes, str] | None:
        meta = self.session.get(self.object, timeout=30)
        if meta.status_code == 404:
            return None
        meta.raise_for_status()
        generation = meta.json()["generation"]
        media = self.session.get(self.object, params={"alt": "media", "generation": generation}, timeout=30)
        if media.status_code == 404:
            return None
        media.raise_for_status()
        return media.content, str(generation)

    def swap(self, data: bytes, expected: str | None) -> str:
        reply = self.session.post(f"{self.base}/upload/storage/v1/b/{self.bucket}/o", data=data, timeout=30,
                                  params={"uploadType": "media", "name": self.name, "ifGenerationMatch": expected or "0"},
                                  headers={"Content-Type": "application/octet-stream"})
        if reply.status_code == 412:
            raise Taken()
        reply.raise_for_status()
        return str(reply.json()["generation"])

    def remove(self, expected: str) -> None:
        self.session.delete(self.object, params={"ifGenerationMatch": expected}, timeout=30)


def slot_for(storage: Storage, name: str = LEASE):
    if storage.is_local:
        return FolderSlot(storage.local_root, name)
    scheme = urlsplit(storage.uri).scheme
    return S3Slot(storage, name) if scheme == "s3" else GcsSlot(storage, name)


# --- the lease ---------------------------------------------------------------------------------


def this_process() -> dict:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(),
            "process_started": psutil.Process().create_time(), "token": uuid.uuid4().hex}


def holder_is_gone(lease: dict) -> bool:
    """True when the lease's holder ran on this machine and that process no longer runs."""
    import psutil

    holder = lease.get("holder", {})
    if holder.get("host") != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(int(holder.get("pid"))).create_time() - float(holder.get("process_started"))) > 1
    except (psutil.Error, TypeError, ValueError):
        return True


def describe(lease: dict, now: float) -> str:
    holder = lease.get("holder", {})
    return (f"driver pid {holder.get('pid')} on {holder.get('host')} (since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(lease.get('started_at', 0)))}, renewed "
            f"{now - lease.get('renewed_at', 0):.0f} s ago)")


class RunLease:
    """Hold the run's lease for a ``with`` block; a thread renews it (see the module's text)."""

    def __init__(self, storage: Storage, take_over: bool = False, ttl_s: float = TTL_S,
                 renew_every_s: float = RENEW_EVERY_S):
        self.storage, self.take_over = storage, take_over
        self.ttl_s, self.renew_every_s = ttl_s, renew_every_s
        self.slot = slot_for(storage)
        self.holder = this_process()
        self.version: str | None = None
        self.started_at = time.time()
        self.lost: str | None = None  # why the lease was lost, once it was
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"holder": self.holder, "started_at": self.started_at, "renewed_at": now,
                           "ttl_s": self.ttl_s}, sort_keys=True).encode()

    def acquire(self) -> None:
        where = self.storage.describe(LEASE)
        for _ in range(3):  # a lapsed lease another driver took over at the same moment: look again
            current = self.slot.read()
            if current is None:
                expected = None
            else:
                try:
                    lease = json.loads(current[0])
                except ValueError:
                    lease = {}
                now = time.time()
                lapsed = now - lease.get("renewed_at", 0) > lease.get("ttl_s", self.ttl_s)
                gone = holder_is_gone(lease)
                if not (lapsed or gone or self.take_over):
                    raise UserError(
                        f"{where}: this run is held by {describe(lease, now)}: two drivers on one run would delete "
                        f"each other's work. Wait for it to end or stop it; if it is dead, its lease lapses "
                        f"{lease.get('ttl_s', self.ttl_s):.0f} s after its last renewal, or run again with --take-over")
                if lapsed or gone:
                    log.info("%s: taking over the lease of %s (%s)", where, describe(lease, now),
                             "its process is gone" if gone else "it lapsed")
                else:
                    log.warning("%s: taking over the lease of %s (--take-over)", where, describe(lease, now))
                expected = current[1]
            try:
                self.version = self.slot.swap(self._body(), expected)
                return
            except Taken:
                continue
        raise UserError(f"{where}: another driver took this run's lease while this one tried to; run again to see "
                        "who holds it")

    def renew(self) -> None:
        """Write the lease again (its renewal time), only if it is still this driver's."""
        try:
            self.version = self.slot.swap(self._body(), self.version)
        except Taken:
            current = self.slot.read()
            lease = json.loads(current[0]) if current else {}
            holder = describe(lease, time.time()) if lease else "nobody (it was deleted)"
            raise UserError(f"{self.storage.describe(LEASE)}: this run's lease is now held by {holder}; this driver "
                            "stops so that two drivers never work on one run") from None

    def release(self) -> None:
        if self.version is not None and self.lost is None:
            with contextlib.suppress(Exception):
                self.slot.remove(self.version)
        self.version = None

    def _keep(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.renew_every_s):
            try:
                self.renew()
                last = time.monotonic()
            except UserError as lost:
                self.lost = str(lost)
            except Exception as error:  # the storage did not answer: try again, until the lease lapses
                log.warning("%s: could not renew the run's lease: %s", self.storage.describe(LEASE), error)
                if time.monotonic() - last > self.ttl_s:
                    self.lost = (f"{self.storage.describe(LEASE)}: the run's lease could not be renewed for "
                                 f"{self.ttl_s:.0f} s ({error}); this driver stops")
            if self.lost:
                log.error("%s", self.lost)
                _thread.interrupt_main()
                return

    def __enter__(self) -> "RunLease":
        self.acquire()
        self._thread = threading.Thread(target=self._keep, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.release()
