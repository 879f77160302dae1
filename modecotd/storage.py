"""Where a run's artifacts live, reached the same way from every node.

A storage is given as a URI: a local folder (one machine, or a mount every node shares: NFS, a
Kubernetes ReadWriteMany volume) or an object store (``s3://bucket/prefix``, ``gs://bucket/prefix``)
reached through ``pyarrow.fs``, which Ray Train and Tune use for their own storage. Credentials come
from the environment only (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, an instance role,
``GOOGLE_APPLICATION_CREDENTIALS``...): a URI that carries one is refused, so none can reach a
config, a log or an artifact. An S3-compatible server other than AWS is named with
``?endpoint_override=http://host:port`` in the URI or ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``;
a GCS emulator with ``STORAGE_EMULATOR_HOST=http://host:port`` (then requests go unauthenticated,
as emulators expect) or ``?endpoint_override=host:port&scheme=http&anonymous=true``.

Paths inside a storage are relative, ``/``-separated strings (``experts/arith/adapter_model.safetensors``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from modecotd.errors import ConfigError, UserError

HASH_CHUNK = 1 << 20
SECRET_QUERY_KEYS = {"access_key", "secret_key", "session_token", "access_token"}
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
GCS_EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"
GCS_QUERY_KEYS = {"endpoint_override", "scheme", "anonymous", "project_id", "retry_limit_seconds"}
GCS_RETRY_LIMIT_S = 120  # the GCS client's own default retries for 15 minutes before a run hears of it


class StorageError(UserError):
    """The run's storage cannot be reached, or holds something other than what was written."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_inside(name: str) -> bool:
    """Whether a storage file name stays inside the folder it is relative to: relative, no ``..``,
    no backslash, no empty part."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and "\\" not in name and ".." not in parts and "" not in parts


def local_path(root: Path, relative: str) -> Path:
    """Where the storage file ``relative`` goes under the local folder ``root``; a name that would
    land outside it (absolute, ``..``, a backslash, a link out of ``root``) is refused: listings and
    manifests come from the storage, and whoever can write there must not write elsewhere."""
    target = root / relative
    if not is_inside(relative) or not target.resolve().is_relative_to(root.resolve()):
        raise StorageError(f"{relative!r}: a file name in the storage that would be written outside {root}; refused")
    return target


def is_uri(location: str) -> bool:
    scheme = urlsplit(str(location)).scheme
    return len(scheme) > 1  # "C:" is a drive, not a scheme


def checked_uri(location: str) -> str:
    """``location`` as a storage URI (an absolute path for a local folder); refuses credentials in it."""
    location = str(location)
    if not is_uri(location) or location.startswith("file://"):
        return str(Path(location.removeprefix("file://")).expanduser().absolute())
    parts = urlsplit(location)
    if parts.username or parts.password or SECRET_QUERY_KEYS & set(parse_qs(parts.query)):
        raise ConfigError(f"storage {redacted(location)}: credentials do not belong in the storage URI; "
                          "set them in the environment of every node (AWS_ACCESS_KEY_ID, "
                          "AWS_SECRET_ACCESS_KEY or an instance role for s3://; "
                          "GOOGLE_APPLICATION_CREDENTIALS or a service account for gs://)")
    if not parts.netloc:
        raise ConfigError(f"storage {location}: a bucket is missing ({parts.scheme}://BUCKET/PREFIX)")
    return location


def with_endpoint(uri: str) -> str:
    """An object-store URI with the endpoint named in this environment written into it (when it
    names none), so that every node reaches the same server (an endpoint is no secret): for
    ``s3://`` ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, for ``gs://`` ``STORAGE_EMULATOR_HOST``."""
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    if "endpoint_override" in query:
        return uri
    if parts.scheme == "s3":
        endpoint = next((os.environ[name] for name in ENDPOINT_VARIABLES if os.environ.get(name)), None)
        extra = {"endpoint_override": endpoint}
    elif parts.scheme == "gs":
        endpoint = os.environ.get(GCS_EMULATOR_VARIABLE)
        emulator = urlsplit(endpoint if endpoint and "://" in endpoint else f"http://{endpoint}")
        extra = {"endpoint_override": emulator.netloc, "scheme": emulator.scheme, "anonymous": "true"}
    else:
        return uri
    if not endpoint:
        return uri
    return urlunsplit(parts._replace(query=urlencode({**query, **extra}, doseq=True)))


def _gcs_filesystem(uri: str):
    """``gs://bucket/prefix?...`` opened with pyarrow's GcsFileSystem (whose own URI parser knows no
    ``anonymous``, which an emulator needs); returns (filesystem, root path)."""
    from datetime import timedelta

    import pyarrow.fs as pafs

    parts = urlsplit(uri)
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    unknown = set(query) - GCS_QUERY_KEYS
    if unknown:
        raise ValueError(f"unknown query parameter {sorted(unknown)[0]!r} (known: {', '.join(sorted(GCS_QUERY_KEYS))})")
    filesystem = pafs.GcsFileSystem(
        anonymous=query.get("anonymous", "false").lower() in ("1", "true", "yes"),
        scheme=query.get("scheme"), endpoint_override=query.get("endpoint_override"),
        project_id=query.get("project_id"),
        retry_time_limit=timedelta(seconds=float(query.get("retry_limit_seconds", GCS_RETRY_LIMIT_S))))
    return filesystem, f"{parts.netloc}{parts.path}"


def redacted(location: str) -> str:
    """``location`` without anything that could be a secret (user info, secret query keys)."""
    parts = urlsplit(str(location))
    if not parts.scheme or len(parts.scheme) == 1:
        return str(location)
    query = {k: v for k, v in parse_qs(parts.query).items() if k not in SECRET_QUERY_KEYS}
    return urlunsplit((parts.scheme, parts.hostname or "", parts.path, urlencode(query, doseq=True), ""))


class Storage:
    """One storage root. Picklable (only the URI travels; each process opens its own filesystem)."""

    def __init__(self, location: str | Path):
        self.uri = with_endpoint(checked_uri(str(location)))
        self._fs = None
        self._root = None

    def __getstate__(self):
        return {"uri": self.uri}

    def __setstate__(self, state):
        self.__init__(state["uri"])

    def __repr__(self) -> str:
        return f"Storage({redacted(self.uri)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Storage) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def is_local(self) -> bool:
        """A folder of this machine's filesystem (which may be a mount that other nodes share)."""
        return not is_uri(self.uri)

    @property
    def local_root(self) -> Path:
        if not self.is_local:
            raise StorageError(f"{self}: not a local folder")
        return Path(self.uri)

    def _open(self):
        import pyarrow.fs as pafs

        if self.is_local:
            return pafs.LocalFileSystem(), self.uri
        try:
            if urlsplit(self.uri).scheme == "gs":
                return _gcs_filesystem(self.uri)
            return pafs.FileSystem.from_uri(self.uri)
        except (OSError, ValueError, TypeError) as error:  # pyarrow raises ArrowInvalid (a ValueError)
            raise StorageError(f"storage {redacted(self.uri)}: {error}") from error

    @property
    def filesystem(self):
        """The ``pyarrow.fs`` filesystem (what Ray's ``storage_filesystem`` takes)."""
        if self._fs is None:
            self._fs, root = self._open()
            self._root = root.rstrip("/")
        return self._fs

    def path(self, relative: str = "") -> str:
        """``relative`` as a path in :attr:`filesystem` (what Ray's ``storage_path`` takes)."""
        self.filesystem
        relative = str(relative).strip("/")
        return f"{self._root}/{relative}" if relative else self._root

    def describe(self, relative: str = "") -> str:
        """Where ``relative`` is, for messages (never with a secret)."""
        base = redacted(self.uri).rstrip("/")
        return f"{base}/{relative}" if relative else base

    def _call(self, what: str, relative: str, function, *args):
        try:
            return function(*args)
        except FileNotFoundError:
            raise
        except OSError as error:
            raise StorageError(f"{self.describe(relative)}: cannot {what}: {error}") from error

    # -- reading ------------------------------------------------------------------------------
    def size(self, relative: str) -> int | None:
        """The size of the file at ``relative``, None when there is none."""
        import pyarrow.fs as pafs

        info = self._call("look up", relative, self.filesystem.get_file_info, self.path(relative))
        return info.size if info.type == pafs.FileType.File else None

    def exists(self, relative: str) -> bool:
        import pyarrow.fs as pafs

        info = self._call("look up", relative, self.filesystem.get_file_info, self.path(relative))
        return info.type != pafs.FileType.NotFound

    def read_bytes(self, relative: str) -> bytes:
        def read():
            with self.filesystem.open_input_stream(self.path(relative)) as stream:
                return stream.read()
        return self._call("read", relative, read)

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def files(self, relative: str = "") -> list[str]:
        """Every file under the folder ``relative``, as paths relative to it (sorted; [] when absent)."""
        import pyarrow.fs as pafs

        base = self.path(relative)
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = self._call("list", relative, self.filesystem.get_file_info, selector)
        return sorted(info.path[len(base):].lstrip("/") for info in infos if info.type == pafs.FileType.File)

    def download(self, relative: str, target: Path) -> None:
        """Copy the file at ``relative`` to the local path ``target``."""
        target.parent.mkdir(parents=True, exist_ok=True)

        def copy():
            with self.filesystem.open_input_stream(self.path(relative)) as source, open(target, "wb") as sink:
                while chunk := source.read(HASH_CHUNK):
                    sink.write(chunk)
        self._call("download", relative, copy)

    # -- writing ------------------------------------------------------------------------------
    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write a whole file. Readers never see part of it: an object store puts an object at once;
        a local folder gets a temporary file renamed into place."""
        if self.is_local:
            target = self.local_root / relative
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")

            def write():
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    tmp.write_bytes(data)
                    os.replace(tmp, target)
                except BaseException:
                    tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
                    raise
            self._call("write", relative, write)
            return

        def put():
            with self.filesystem.open_output_stream(self.path(relative)) as stream:
                stream.write(data)
        self._call("write", relative, put)

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode("utf-8"))

    def upload(self, source: Path, relative: str) -> None:
        if self.is_local:
            target = self.local_root / relative

            def copy_local():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
            self._call("write", relative, copy_local)
            return

        def copy():
            with open(source, "rb") as handle, self.filesystem.open_output_stream(self.path(relative)) as sink:
                while chunk := handle.read(HASH_CHUNK):
                    sink.write(chunk)
        self._call("upload", relative, copy)

    def delete(self, relative: str) -> None:
        """Remove the file or folder at ``relative`` (nothing when absent)."""
        import pyarrow.fs as pafs

        path = self.path(relative)
        info = self._call("look up", relative, self.filesystem.get_file_info, path)
        if info.type == pafs.FileType.Directory:
            try:
                self._call("delete", relative, self.filesystem.delete_dir, path)
            except FileNotFoundError:  # GCS: the folder's marker object, which a prefix need not have
                if self.files(relative):
                    raise
        elif info.type == pafs.FileType.File:
            self._call("delete", relative, self.filesystem.delete_file, path)

    def check_reachable(self) -> None:
        """Write, read back and remove a small file: one line naming the storage when that fails."""
        probe = f".probe-{uuid.uuid4().hex[:12]}"
        try:
            self.write_text(probe, "ok")
            if self.read_text(probe) != "ok":
                raise StorageError(f"{self.describe()}: a file written could not be read back")
        except FileNotFoundError as error:
            raise StorageError(f"{self.describe()}: a file written could not be read back") from error
        finally:
            try:
                self.delete(probe)
            except (StorageError, FileNotFoundError):
                pass
