"""What a submitted run sends to the cluster: the job's working directory, chosen and measured first.

By default only what the run needs: the config file and every data file or folder it names by a
relative path (kept at the same place relative to the config, so the paths still resolve). A path
the config gives as absolute names the cluster's own disk and is not sent. With a working
directory the user chooses, all of it is sent but for :data:`ALWAYS_EXCLUDED` and the user's
``.gitignore``-style patterns.

Two things never travel, in either mode, and the line printed before sending says which files were
left out and why: files that look like secrets (:data:`SECRET_PATTERNS`: ``.env``, cloud and SSH
credentials, private keys, tokens), and links that lead out of the folder being sent (a link in the
data folder to ``~/.aws/credentials`` would otherwise ship the file it points to). A data file the
config names itself that is either is refused in one line, since the run could not read it.

The files are copied into a staging folder and zipped, as Ray will zip them, to know the size
before anything is sent: an upload over the Jobs API's request limit is refused in one line
instead of failing on the server with HTTP 413.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


from modecotd.config import ConfigError


from modecotd.config_loading import DATA_PATH_KEYS, read_yaml
from modecotd.errors import UserError

UPLOAD_LIMIT_BYTES = 100 * 2**20  # the Ray dashboard's request body limit (DASHBOARD_CLIENT_MAX_SIZE)
ALWAYS_EXCLUDED = [".git", ".venv", "venv", "__pycache__", "runs/", "*.safetensors", "*.gguf", "*.bin", "*.pt"]
# Files that hold secrets by name (``.gitignore`` syntax): never sent to a cluster, whose token
# holders can read every job's files.
SECRET_PATTERNS = [".env", ".env.*", "*.env", ".envrc", ".netrc", ".pgpass", ".pypirc", ".npmrc", ".git-credentials",
                   ".aws/", ".ssh/", ".gnupg/", ".kube/", ".docker/config.json", ".config/gcloud/",
                   "credentials", "credentials.*", "*credentials*.json", "*service-account*.json",
                   "auth_token", "*.token", "secrets.*", "*.secret", "*.secrets",
                   "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.kdbx", "*.asc", "*.gpg",
                   "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*"]


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
    left_out: dict[str, str] = field(default_factory=dict)  # relative path -> why it is not sent

    def describe(self) -> str:
        """One line for the terminal: what is sent and its size."""
        names = sorted(self.files, key=lambda n: -self.files[n])
        shown = ", ".join(f"{n} ({_mb(self.files[n])})" for n in names[:5]) + (" ..." if len(names) > 5 else "")
        line = (f"uploading {len(self.files)} file(s), {_mb(sum(self.files.values()))} "
                f"({_mb(self.zipped)} zipped): {shown}")
        if self.remote:
            line += f"; read on the cluster: {', '.join(self.remote)}"
        if self.left_out:
            names = sorted(self.left_out)
            line += ("; left out: " + ", ".join(f"{n} ({self.left_out[n]})" for n in names[:10])
                     + (f" and {len(names) - 10} more" if len(names) > 10 else ""))
        return line

    def remove(self) -> None:
        shutil.rmtree(self.root.parent, ignore_errors=True)  # the staging folder's own temp folder


def stage(config_path: Path, working_dir: Path | None = None, excludes: list[str] | tuple[str, ...] = (),
          limit: int = UPLOAD_LIMIT_BYTES) -> Upload:
    """Stage and measure the upload of a run of ``config_path`` (see the module's text); refuses one
    over ``limit`` bytes zipped."""
    config_path = Path(config_path).resolve()
    left_out: dict[str, str] = {}
    if working_dir is None:
        base, files, remote = _needed_files(config_path, left_out)
    else:
        base = Path(os.path.abspath(working_dir))
        if not base.is_dir():
            raise UserError(f"--working-dir {working_dir}: no such folder")
        if not config_path.is_relative_to(base.resolve()):
            raise UserError(f"--working-dir {working_dir}: the config {config_path} is not inside it")
        config_path = base / config_path.relative_to(base.resolve())
        files, remote = _folder_files(base, list(excludes), left_out), []
        files.add(_named_file(config_path, base, "the config"))
    root = Path(tempfile.mkdtemp(prefix="modecotd-upload-")) / "job"
    upload = Upload(root, config_path.relative_to(base).as_posix(), remote=remote, left_out=left_out)
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


def _needed_files(config_path: Path, left_out: dict[str, str]) -> tuple[Path, set[str], list[str]]:
    """(base folder, files under it to send, absolute paths left to the cluster) for the config and
    the data paths it names; base is the deepest folder holding the config and every relative path
    (links are not followed to find it: a path through a link stays where the config says)."""
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
                local.append(Path(os.path.normpath(config_path.parent / value)))
    base = Path(*_common_parts([p if p.is_dir() and not p.is_symlink() else p.parent for p in local]))
    files: set[str] = set()
    for path in local:
        if path.is_dir():
            inside = _inside(path, base)
            if inside is not True:
                raise UserError(f"{config_path}: the data folder {path} {inside}")
            files |= {(path / name).relative_to(base).as_posix()
                      for name in _folder_files(path, [], left_out, base)}
        elif path.is_file():
            files.add(_named_file(path, base, f"{config_path}: the data file"))
    return base, files, sorted(set(remote))


def _inside(path: Path, base: Path) -> bool | str:
    """True when ``path``, links followed, stays inside ``base``; else why not, for a message."""
    target = path.resolve()
    if target.is_relative_to(base.resolve()):
        return True
    return f"is a link to {target}, outside the folder sent ({base})"


def _named_file(path: Path, base: Path, what: str) -> str:
    """``path`` relative to ``base``: a file the run needs by name, refused if it must not travel."""
    relative = path.relative_to(base).as_posix()
    inside = _inside(path, base)
    if inside is not True:
        raise UserError(f"{what} {path} {inside}: copy the file into the folder, or give the absolute path "
                        "where the cluster reads it")
    if _secret_spec().match_file(relative):
        raise UserError(f"{what} {path} is named like a secret (.env, credentials, private keys: never sent to a "
                        "cluster); rename it if it is data")
    return relative


def _common_parts(paths: list[Path]) -> tuple[str, ...]:
    parts = paths[0].parts
    for path in paths[1:]:
        n = 0
        while n < min(len(parts), len(path.parts)) and parts[n] == path.parts[n]:
            n += 1
        parts = parts[:n]
    return parts


def _secret_spec():
    from pathspec import GitIgnoreSpec

    return GitIgnoreSpec.from_lines(SECRET_PATTERNS)


def _folder_files(folder: Path, excludes: list[str], left_out: dict[str, str], base: Path | None = None) -> set[str]:
    """Every file under ``folder``, relative to it, but those the patterns exclude (``.gitignore``
    syntax; :data:`ALWAYS_EXCLUDED` first). Files named like secrets and links that lead out of
    ``base`` (default: ``folder``) are not returned; they go to ``left_out`` (path relative to
    ``base`` -> why). A linked folder inside ``base`` is walked once."""
    from pathspec import GitIgnoreSpec

    base = base or folder
    spec, secret = GitIgnoreSpec.from_lines(ALWAYS_EXCLUDED + excludes), _secret_spec()
    files: set[str] = set()
    walked = {folder.resolve()}
    for here, folders, names in os.walk(folder, followlinks=True):
        here = Path(here)
        for name in list(folders):
            path = here / name
            relative = path.relative_to(folder).as_posix() + "/"
            if spec.match_file(relative):
                folders.remove(name)
            elif secret.match_file(path.relative_to(base).as_posix() + "/"):
                left_out[path.relative_to(base).as_posix() + "/"] = "named like a secret"
                folders.remove(name)
            elif path.is_symlink() and (_inside(path, base) is not True or path.resolve() in walked):
                if _inside(path, base) is not True:
                    left_out[path.relative_to(base).as_posix() + "/"] = "a link out of the folder sent"
                folders.remove(name)
            else:
                walked.add(path.resolve())
        for name in names:
            path = here / name
            relative = path.relative_to(folder).as_posix()
            if not path.is_file() or spec.match_file(relative):
                continue
            if secret.match_file(path.relative_to(base).as_posix()):
                left_out[path.relative_to(base).as_posix()] = "named like a secret"
            elif _inside(path, base) is not True:
                left_out[path.relative_to(base).as_posix()] = "a link out of the folder sent"
            else:
                files.add(relative)
    return files


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
