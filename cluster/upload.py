"""What a submitted run sends to the cluster: the job's working directory, chosen and measured first.

By default only what the run needs: the config file and every data file or folder it names by a
relative path (kept at the same place relative to the config, so the paths still resolve). A path
the config gives as absolute names the cluster's own disk and is not sent. With a working
directory the user chooses, all of it is sent but for :data:`ALWAYS_EXCLUDED` and the user's
``.gitignore``-style patterns.

The files are copied into a staging folder and zipped, as Ray will zip them, to know the size
before anything is sent: an upload over the Jobs API's request limit is refused in one line
instead of failing on the server with HTTP 413.
"""
from __future__ import annotations

import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


from modecotd.config import DATA_PATH_KEYS, ConfigError, read_yaml
from modecotd.errors import UserError

UPLOAD_LIMIT_BYTES = 100 * 2**20  # the Ray dashboard's request body limit (DASHBOARD_CLIENT_MAX_SIZE)
ALWAYS_EXCLUDED = [".git", ".venv", "venv", "__pycache__", "runs/", "*.safetensors", "*.gguf", "*.bin", "*.pt"]


@dataclass
class Upload:
    """A staged working directory: ``root`` holds ``files`` (relative path -> bytes); the config is
    ``config`` relative to it; ``zipped`` is the size Ray will send; ``remote`` the absolute data
    paths the cluster must have itself."""

    root: Path
    config: str
    files: dict[str, int] = field(default_factory=dict)
    zipped: int = 0
    remote: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the terminal: what is sent and its size."""
        names = sorted(self.files, key=lambda n: -self.files[n])
        shown = ", ".join(f"{n} ({_mb(self.files[n])})" for n in names[:5]) + (" ..." if len(names) > 5 else "")
        line = (f"uploading {len(self.files)} file(s), {_mb(sum(self.files.values()))} "
                f"({_mb(self.zipped)} zipped): {shown}")
        if self.remote:
            line += f"; read on the cluster: {', '.join(self.remote)}"
        return line

    def remove(self) -> None:
        shutil.rmtree(self.root.parent, ignore_errors=True)  # the staging folder's own temp folder


def stage(config_path: Path, working_dir: Path | None = None, excludes: list[str] | tuple[str, ...] = (),
          limit: int = UPLOAD_LIMIT_BYTES) -> Upload:
    """Stage and measure the upload of a run of ``config_path`` (see the module's text); refuses one
    over ``limit`` bytes zipped."""
    config_path = Path(config_path).resolve()
    if working_dir is None:
        base, files, remote = _needed_files(config_path)
    else:
        base = Path(working_dir).resolve()
        if not base.is_dir():
            raise UserError(f"--working-dir {working_dir}: no such folder")
        if not config_path.is_relative_to(base):
            raise UserError(f"--working-dir {working_dir}: the config {config_path} is not inside it")
        files, remote = _folder_files(base, list(excludes)), []
        files.add(config_path.relative_to(base).as_posix())
    root = Path(tempfile.mkdtemp(prefix="modecotd-upload-")) / "job"
    upload = Upload(root, config_path.relative_to(base).as_posix(), remote=remote)
    try:
        for name in sorted(files):
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(base / name, target)
            upload.files[name] = target.stat().st_size
        upload.zipped = _zipped_size(root)
    except BaseException:
        upload.remove()
        raise
    if upload.zipped > limit:
        upload.remove()
        largest = max(upload.files, key=upload.files.get)
        raise UserError(f"the job's files are {_mb(upload.zipped)} zipped, over the {_mb(limit)} a Ray job may "
                        f"upload (largest: {largest}, {_mb(upload.files[largest])}): put large data where the "
                        "cluster reads it (an absolute path on its disk, or the run's storage), or choose what "
                        "to send with --working-dir and --exclude")
    return upload


def _needed_files(config_path: Path) -> tuple[Path, set[str], list[str]]:
    """(base folder, files under it to send, absolute paths left to the cluster) for the config and
    the data paths it names; base is the deepest folder holding the config and every relative path."""
    try:
        data = read_yaml(config_path.read_text(encoding="utf-8"), str(config_path)) or {}
    except (ConfigError, UnicodeDecodeError):
        data = {}  # load_config has already said what is wrong with it
    local: list[Path] = [config_path]
    remote: list[str] = []
    for task in data.get("tasks") or []:
        source = task.get("source") if isinstance(task, dict) else None
        for key in DATA_PATH_KEYS:
            value = source.get(key) if isinstance(source, dict) else None
            if not isinstance(value, str):
                continue
            if Path(value).expanduser().is_absolute():
                remote.append(value)
            else:
                local.append((config_path.parent / value).resolve())
    base = Path(*_common_parts([p if p.is_dir() else p.parent for p in local]))
    files: set[str] = set()
    for path in local:
        if path.is_dir():
            files |= {(path / name).relative_to(base).as_posix()
                      for name in _folder_files(path, [])}
        elif path.is_file():
            files.add(path.relative_to(base).as_posix())
    return base, files, sorted(set(remote))


def _common_parts(paths: list[Path]) -> tuple[str, ...]:
    parts = paths[0].parts
    for path in paths[1:]:
        n = 0
        while n < min(len(parts), len(path.parts)) and parts[n] == path.parts[n]:
            n += 1
        parts = parts[:n]
    return parts


def _folder_files(folder: Path, excludes: list[str]) -> set[str]:
    """Every file under ``folder``, relative to it, but those the patterns exclude (``.gitignore``
    syntax; :data:`ALWAYS_EXCLUDED` first)."""
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", ALWAYS_EXCLUDED + excludes)
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*")
            if path.is_file() and not spec.match_file(path.relative_to(folder).as_posix())}


def _zipped_size(folder: Path) -> int:
    """The size of ``folder`` zipped as Ray packs a working directory (deflate)."""
    with tempfile.TemporaryFile() as handle:
        with zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(folder).as_posix())
        return handle.tell()


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
