"""docs/CONFIG.md, written from the config schema (:class:`modecotd.config.RunConfig`): every key,
its type, default and description. ``python -m modecotd.config_doc`` rewrites the file; a test
checks that it is current."""
from __future__ import annotations

import re
import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from modecotd.config import RunConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"
HEADER = """# Config reference

Every key of a run's config file, from the schema in `modecotd/config.py` (`python -m
modecotd.config_doc` writes this file; `tests/test_config_doc.py` checks that it is current).
Unknown keys are errors. Keys marked *runtime* change how a run runs, not what it makes: they are
in no unit's fingerprint, so changing them redoes nothing.

| key | type | default | description |
|---|---|---|---|
"""


def _models(annotation) -> list[type[BaseModel]]:
    """The config sections inside an annotation (a section, a list of them, a union of them)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _type(annotation) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation)
    text = re.sub(r"\b(typing|pathlib|modecotd\.\w+(\.\w+)*)\.", "", text)
    text = re.sub(r"Annotated\[(.*?), .*\]$", r"\1", text)
    return text.replace("NoneType", "None").replace("|", "&#124;")


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    text = getattr(value, "value", value)
    return f"`{text!r}`" if not isinstance(text, (int, float)) or isinstance(text, bool) else f"`{text}`"


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sections = _models(field.annotation)
        runtime = " *runtime*" if (field.json_schema_extra or {}).get("fingerprint") is False else ""
        description = " ".join((field.description or "").split())
        if sections and len(sections) > 1:  # a union told apart by its kind
            description = description or "one of these sections, chosen by its kind"
            lines.append(f"| `{key}` | one of: {', '.join(_kind(s) for s in sections)} | required | "
                         f"{description}{runtime} |")
            for section in sections:
                lines += rows(section, f"{key}.({_kind(section)}) ")
            continue
        if sections:
            many = typing.get_origin(field.annotation) is list
            lines.append(f"| `{key}` | {'list of sections' if many else 'section'} | {_default(field)} | "
                         f"{' '.join((sections[0].__doc__ or '').split())}{runtime} |")
            lines += rows(sections[0], f"{key}{'[]' if many else ''}.")
            continue
        lines.append(f"| `{key}` | {_type(field.annotation)} | {_default(field)} | {description}{runtime} |")
    return lines


def _kind(section: type[BaseModel]) -> str:
    kind = section.model_fields.get("kind")
    return typing.get_args(kind.annotation)[0] if kind else section.__name__


def render() -> str:
    return HEADER + "\n".join(rows(RunConfig)) + "\n"


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC}", file=sys.stderr)
