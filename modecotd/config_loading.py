"""Reading a run's configuration: YAML (with each key's line kept) -> :class:`~modecotd.config.RunConfig`,
--set overrides, paths resolved against the config's folder, the built-in configs by name. A
validation error becomes one line naming the file, the line, the dotted key and what is allowed.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from modecotd.config import ConfigOrigin, ConfigProblem, RunConfig
from modecotd.errors import ConfigError


MAX_YAML_VALUES = 100_000  # a config with its aliases expanded; a real one holds a few thousand


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    """A composed node's keys and values (mapping), items (sequence), or nothing (scalar)."""
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def read_yaml(text: str, where: str) -> Any:
    """The YAML document in ``text`` (``where`` names it in errors), refused in one line when its
    aliases would expand it to more than :data:`MAX_YAML_VALUES` values or refer to themselves
    (an "alias bomb" of a few hundred bytes otherwise takes minutes or all memory to walk)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if root is None:
        return None
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, open_: frozenset) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_:
            raise ConfigError(f"{where}:{node.start_mark.line + 1}: a YAML alias refers to the value that holds it")
        total = 1 + sum(size(child, open_ | {id(node)}) for child in _yaml_children(node))
        sizes[id(node)] = total
        return total

    try:
        total = size(root, frozenset())
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    if total > MAX_YAML_VALUES:
        node = root  # name the innermost value whose aliases blow it up
        while True:
            big = next((c for c in _yaml_children(node) if sizes[id(c)] > MAX_YAML_VALUES), None)
            if big is None:
                break
            node = big
        raise ConfigError(f"{where}:{node.start_mark.line + 1}: YAML aliases expand the document to {total:,} values "
                          f"(at most {MAX_YAML_VALUES:,}); write the values out or nest fewer aliases")
    return yaml.safe_load(text)



def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line (list items by index)."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[path + (key.value,)] = key.start_mark.line + 1
                walk(value, path + (key.value,))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, path + (index,))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _describe(error: dict, origin: ConfigOrigin) -> str:
    """One line for one pydantic error: file:line: key: message."""
    # Drop the discriminator tags pydantic inserts for tagged unions ("generated", "paper", ...).
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p in {"generated", "paper", "jsonl", "hf"}))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "literal_error" or error["type"] == "enum":
        message = f"{message} (got {error.get('input')!r})"
    return f"{origin.locate(loc)}: {message}"


def parse_config(data: Any, origin: str = "<config>", text: str | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate a plain dict into a RunConfig; one ConfigError line per run, the first problem first.
    ``overrides``: the --set assignments already applied to ``data`` (errors about them name them)."""
    where = ConfigOrigin(origin, _key_lines(text) if text else {},
                         {_override_key(a): a for a in overrides if "=" in a})
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the config must be a mapping of sections, got {type(data).__name__}")
    try:
        config = RunConfig.model_validate(data)
    except ConfigProblem as problem:
        raise ConfigError(f"{where.locate(problem.loc)}: {problem.message}") from None
    except ValidationError as exc:
        problems = [_describe(e, where) for e in exc.errors()]
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more) from None
    config._origin = where
    return config


def _override_key(assignment: str) -> tuple:
    """The key path an override sets, as the config's key lines name it (list items by index)."""
    return tuple(int(p) if p.isdigit() else p for p in assignment.split("=", 1)[0].strip().split(".") if p)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `key.path=value` override in place; list items by index or by task name."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    dotted, raw = assignment.split("=", 1)
    try:
        value = read_yaml(raw, f"--set {assignment!r}") if raw != "" else ""
    except ConfigError:
        value = raw  # not YAML (or an alias bomb): taken as the plain string it is
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            index = _list_index(node, part, where)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {assignment!r}: {where} is not a section")


def _list_index(items: list, part: str, where: str) -> int:
    if re.fullmatch(r"\d+", part):
        index = int(part)
        if index >= len(items):
            raise ConfigError(f"--set: {where}: index out of range (list has {len(items)} items)")
        return index
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return index
    names = [i.get("name") for i in items if isinstance(i, dict)]
    raise ConfigError(f"--set: {where}: no item named {part!r}; names: {names}")


def resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    """Make data paths relative to the config file's folder absolute."""
    for task in config.tasks:
        source = task.source
        for field_name in DATA_PATH_KEYS:
            value = getattr(source, field_name, None)
            if isinstance(value, Path) and not value.is_absolute():
                setattr(source, field_name, (base / value).resolve())
    return config


DATA_PATH_KEYS = ("data_dir", "train", "fewshot", "test")  # a task source's paths: a folder, then files


def check_data_paths(config: RunConfig) -> None:
    """Every data path of the config is there, on the machine that reads the data: a file for a
    split, a folder for ``data_dir`` (a submitted run's paths may name the cluster's disks, so
    this is checked where the run starts, not when the config is read)."""
    for index, task in enumerate(config.tasks):
        for field_name in DATA_PATH_KEYS:
            value = getattr(task.source, field_name, None)
            if not isinstance(value, Path):
                continue
            folder = field_name == "data_dir"
            if value.is_dir() if folder else value.is_file():
                continue
            what = ("no such folder" if folder else "file not found") if not value.exists() else \
                "not a folder" if folder else "not a file"
            raise ConfigError(f"{config.where('tasks', index, 'source', field_name)}: {value}: {what}")


def builtin_configs() -> dict[str, Path]:
    """The example configs shipped with the package (the repository's examples/), by name."""
    from importlib.resources import files

    folder = Path(str(files("modecotd.examples")))
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (or a built-in name such as `quickstart`), apply overrides, validate."""
    builtins = builtin_configs()
    path = builtins.get(str(path), Path(path))
    if not path.is_file():
        known = ", ".join(builtins)
        raise ConfigError(f"{path}: config file not found (built-in configs: {known})")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raw = path.read_bytes()
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from None
    data = read_yaml(text, str(path))
    if data is None:
        raise ConfigError(f"{path}: the config file is empty")
    for assignment in overrides:
        apply_override(data, assignment)
    config = parse_config(data, origin=str(path), text=text, overrides=overrides)
    return resolve_paths(config, path.parent.resolve())