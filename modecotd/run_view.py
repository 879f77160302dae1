"""A run's storage as the commands that read a finished (or running) run see it: `report`, `compare`
and `pull`. A unit counts only when its manifest's fingerprint is the one the run's plan wants at
its place (``plan.json``, written by the driver before each stage and at the end): a unit whose redo
failed in the last run, or one of a system the config no longer has, is left out, never shown as
current. A run written before ``plan.json`` existed is read as it is, every committed unit counting."""
from __future__ import annotations

import json

from modecotd.artifacts import MANIFEST, read_listed
from modecotd.errors import UserError
from modecotd.plan import PLAN_FORMAT, PlannedUnit, RunLayout
from modecotd.storage import Storage


class RunView:
    def __init__(self, storage: Storage):
        self.storage = storage
        self.layout = RunLayout(storage)
        self.plan = self._plan()  # None: a run from before plan.json
        self.planned = None if self.plan is None else {unit.prefix: unit.key for unit in self.plan}

    def _plan(self) -> list[PlannedUnit] | None:
        name = self.layout.plan
        try:
            planned = json.loads(self.storage.read_text(name))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            planned = None
        if isinstance(planned, dict) and planned.get("format") == PLAN_FORMAT and isinstance(planned.get("units"), list):
            try:
                return [PlannedUnit.from_json(unit) for unit in planned["units"]]
            except (AttributeError, TypeError):
                pass
        elif isinstance(planned, dict) and all(isinstance(v, str) for v in planned.values()):  # format 1
            return [PlannedUnit(prefix, key, "") for prefix, key in planned.items()]
        raise UserError(f"{self.storage.describe(name)}: not a modecotd plan (format {PLAN_FORMAT}: "
                        '{"format": 2, "units": [...]}); run the same command again to write it anew')

    def planned_systems(self, task: str, stage: str = "evaluate") -> list[str] | None:
        """The systems the plan evaluates ``task`` on (``stage`` mix: the mixture systems it builds
        for it), in the plan's order, built or not; None for a run planned before plans named them."""
        if self.plan is None or not any(unit.stage for unit in self.plan):
            return None
        return list(dict.fromkeys(u.system for u in self.plan if u.stage == stage and u.task == task))

    def manifest(self, prefix: str) -> dict | None:
        """The manifest of the unit at ``prefix`` when it is committed and current; else None."""
        if self.planned is not None and prefix not in self.planned:
            return None
        try:
            manifest = json.loads(self.storage.read_text(f"{prefix}/{MANIFEST}"))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None
        if not isinstance(manifest, dict):
            return None
        if self.planned is not None and manifest.get("fingerprint") != self.planned[prefix]:
            return None
        return manifest

    def read(self, prefix: str, name: str) -> str | None:
        """The file ``name`` of the current unit at ``prefix``, checked against its manifest's sha256;
        None when the unit is not current or does not list it."""
        manifest = self.manifest(prefix)
        if manifest is None:
            return None
        try:
            return read_listed(self.storage, prefix, name, manifest)
        except FileNotFoundError:
            return None

    def units_under(self, folder: str) -> list[str]:
        """The prefixes of the current units directly under ``folder`` (hidden ones, such as
        staging folders, left out)."""
        folder = folder.rstrip("/")
        return sorted(prefix for path in self.storage.files(folder)
                      if path.count("/") == 1 and path.endswith(f"/{MANIFEST}") and not path.startswith(".")
                      and self.manifest(prefix := f"{folder}/{path.split('/')[0]}") is not None)

    def units(self) -> tuple[list[str], list[str]]:
        """(current units, stale units): the folders holding a manifest, split by :meth:`manifest`."""
        prefixes = sorted(path[: -len(MANIFEST) - 1] for path in self.storage.files()
                          if path.endswith(f"/{MANIFEST}"))
        current = [prefix for prefix in prefixes if self.manifest(prefix) is not None]
        return current, [prefix for prefix in prefixes if prefix not in current]
