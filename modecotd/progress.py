"""What a long run shows while it works: one progress entry per unit of work (a task's questions,
an expert's optimizer steps, a target's mixer trials, a system's test questions).

On a terminal each entry is a live bar with its rate and ETA; elsewhere (CI, a Ray job's log) each
entry prints a plain line when it moves, at most every ``line_every_s`` seconds, and always when it
finishes. Where the updates come from (Ray workers) is the Ray side's business: see
``modecotd.jobs.progress``.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO


@dataclass
class Update:
    """One unit's state: ``done`` of ``total`` ``what``s (e.g. 12 of 96 steps), with a short note."""

    stage: str
    unit: str
    done: float
    total: float | None
    what: str
    note: str = ""
    finished: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return self.stage, self.unit


@dataclass
class _Entry:
    first: Update
    first_at: float
    last: Update
    printed_at: float = 0.0
    printed_done: float = -1.0
    bar: object = None
    closed: bool = False


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def eta_seconds(first: Update, first_at: float, last: Update, now: float) -> float | None:
    """Time left at the rate seen since the unit was first reported (None until it moves)."""
    if last.total is None or last.done <= first.done or now <= first_at:
        return None
    rate = (last.done - first.done) / (now - first_at)
    return max(0.0, (last.total - last.done) / rate)


class ProgressBoard:
    """Draws the latest state of every unit. ``tty`` defaults to whether ``stream`` is a terminal."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, line_every_s: float = 10.0,
                 clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.line_every_s = line_every_s
        self.clock = clock
        self.entries: dict[tuple[str, str], _Entry] = {}

    def update(self, update: Update) -> None:
        now = self.clock()
        entry = self.entries.get(update.key)
        if entry is None or (entry.closed and update.done < entry.last.done):  # new, or the unit started over
            entry = self.entries[update.key] = _Entry(first=update, first_at=now, last=update)
        elif entry.closed:
            return
        entry.last = update
        if self.tty:
            self._draw_bar(entry)
        else:
            self._print_line(entry, now)
        if update.finished:
            self._close(entry)

    def line(self, entry: _Entry, now: float) -> str:
        """The plain-text line for one unit: counts, percentage, note, rate-based ETA."""
        last = entry.last
        count = f"{last.done:g}/{last.total:g}" if last.total else f"{last.done:g}"
        percent = f" ({100 * last.done / last.total:.0f}%)" if last.total else ""
        parts = [f"{last.stage} {last.unit}: {count} {last.what}s{percent}"]
        if last.note:
            parts.append(last.note)
        if last.finished:
            parts.append(f"done in {format_seconds(now - entry.first_at)}")
        else:
            eta = eta_seconds(entry.first, entry.first_at, last, now)
            if eta is not None:
                parts.append(f"ETA {format_seconds(eta)}")
        return ", ".join(parts)

    def _print_line(self, entry: _Entry, now: float) -> None:
        last = entry.last
        moved = last.done != entry.printed_done
        due = now - entry.printed_at >= self.line_every_s or entry.printed_done < 0
        if last.finished or (moved and due):
            print(self.line(entry, now), file=self.stream, flush=True)
            entry.printed_at, entry.printed_done = now, last.done

    def _draw_bar(self, entry: _Entry) -> None:
        from tqdm import tqdm

        last = entry.last
        if entry.bar is None:
            entry.bar = tqdm(total=last.total, desc=f"{last.stage} {last.unit}", unit=last.what,
                             file=self.stream, dynamic_ncols=True, leave=True,
                             initial=entry.first.done, position=None)
        bar = entry.bar
        if last.total is not None and bar.total != last.total:
            bar.total = last.total
        if last.note:
            bar.set_postfix_str(last.note, refresh=False)
        bar.update(last.done - bar.n)

    def _close(self, entry: _Entry) -> None:
        entry.closed = True
        if entry.bar is not None:
            entry.bar.close()
            entry.bar = None

    def close(self) -> None:
        for entry in self.entries.values():
            if not entry.closed:
                self._close(entry)
