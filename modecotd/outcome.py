"""What a stage says of each unit of work it ran: :class:`Done` with the unit's summary (what its
manifest records, typed: :mod:`modecotd.units`), or :class:`Failed` with the reason. The driver
collects the failures."""
from __future__ import annotations

from dataclasses import dataclass

from modecotd.units import Summary


@dataclass(frozen=True)
class Done:
    summary: Summary


@dataclass(frozen=True)
class Failed:
    reason: str


Outcome = Done | Failed
