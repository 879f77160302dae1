"""The progress board: live bars on a terminal, plain throttled lines elsewhere, ETA from the rate."""
from __future__ import annotations

import io

from modecotd.progress import ProgressBoard, Update, eta_seconds, format_seconds


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_lines_are_throttled_and_carry_rate_based_eta():
    out, clock = io.StringIO(), Clock()
    board = ProgressBoard(out, tty=False, line_every_s=10, clock=clock)
    board.update(Update("distill", "arithmetic", 0, 100, "step"))
    clock.now = 5
    board.update(Update("distill", "arithmetic", 10, 100, "step", note="loss 1.200"))  # within 10 s: no line
    clock.now = 20
    board.update(Update("distill", "arithmetic", 40, 100, "step", note="loss 0.500"))
    clock.now = 21
    board.update(Update("distill", "arithmetic", 100, 100, "step", note="loss 0.100", finished=True))
    lines = out.getvalue().splitlines()
    assert lines[0] == "distill arithmetic: 0/100 steps (0%)"
    # 40 steps in 20 s: 2 steps/s, 60 to go: 30 s
    assert lines[1] == "distill arithmetic: 40/100 steps (40%), loss 0.500, ETA 30s"
    assert lines[2] == "distill arithmetic: 100/100 steps (100%), loss 0.100, done in 21s"
    assert len(lines) == 3


def test_units_are_kept_apart_and_updates_after_the_end_are_ignored():
    out, clock = io.StringIO(), Clock()
    board = ProgressBoard(out, tty=False, line_every_s=0, clock=clock)
    board.update(Update("evaluate", "a / base", 0, 2, "question"))
    board.update(Update("evaluate", "b / base", 0, 3, "question"))
    board.update(Update("evaluate", "a / base", 2, 2, "question", finished=True))
    board.update(Update("evaluate", "a / base", 2, 2, "question", finished=True))  # a late duplicate
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["evaluate a / base", "evaluate b / base", "evaluate a / base"]


def test_terminal_mode_draws_bars_that_reach_the_total():
    out = io.StringIO()
    board = ProgressBoard(out, tty=True)
    board.update(Update("teacher", "coins", 0, 8, "question"))
    board.update(Update("teacher", "coins", 8, 8, "question", note="8 rationales kept", finished=True))
    text = out.getvalue()
    assert "teacher coins" in text and "8/8" in text and "8 rationales kept" in text
    board.close()


def test_eta_and_durations():
    first, last = Update("s", "u", 0, 10, "x"), Update("s", "u", 5, 10, "x")
    assert eta_seconds(first, 0.0, last, 10.0) == 10.0
    assert eta_seconds(first, 0.0, first, 10.0) is None  # nothing moved yet
    assert format_seconds(59) == "59s" and format_seconds(61) == "1m01s" and format_seconds(3700) == "1h01m"
