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


def test_workers_lines_go_to_the_run_log_and_only_their_warnings_to_the_terminal(tmp_path, capsys, monkeypatch):
    """What Ray's printer would show: every line lands in the run's log file; the terminal gets a
    worker's modecotd warning (marked in the worker by mark_warnings) and the raylet's warnings."""
    import logging

    from modecotd.jobs.run_log import MARK, RunLog, mark_warnings
    from modecotd.storage import Storage

    before = list(logging.getLogger("modecotd").handlers)
    try:
        mark_warnings()  # as in a worker process
        logging.getLogger("modecotd.distill").info("an info line")
        logging.getLogger("modecotd.distill").warning("resume from step %d", 4)
        marked = capsys.readouterr().err
    finally:
        logging.getLogger("modecotd").handlers[:] = before
    assert marked.strip() == f"{MARK}WARNING modecotd.distill: resume from step 4"

    monkeypatch.setenv("MODECOTD_CACHE", str(tmp_path / "cache"))
    with RunLog(Storage(tmp_path / "run"), "run") as run_log:
        assert not (tmp_path / "run" / "logs").exists()  # nothing held open in the run folder while it runs
        run_log._worker_lines({"pid": 12, "ip": "10.0.0.2", "actor_name": "RayTrainWorker",
                               "lines": ["Setting accelerator to CPU", marked.strip()]}, verbose=False)
        run_log._worker_lines({"pid": "raylet", "ip": "10.0.0.2",
                               "lines": ["[2026-12-06 10:00:00,000 E 1 1] (raylet) a worker was killed: memory"]},
                              verbose=False)
        run_log._worker_lines({"pid": 13, "ip": "10.0.0.2", "task_name": "fit_expert", "lines": ["quiet"]},
                              verbose=True)
    terminal = capsys.readouterr().err.splitlines()
    assert terminal == ["(RayTrainWorker) WARNING modecotd.distill: resume from step 4",
                        "(raylet) [2026-12-06 10:00:00,000 E 1 1] (raylet) a worker was killed: memory"]
    kept = (tmp_path / "run" / "logs" / run_log.file_name).read_text()  # copied into the run at its end
    assert kept == run_log.path.read_text() and run_log.path.is_relative_to(tmp_path / "cache")
    assert "(RayTrainWorker pid=12, 10.0.0.2) Setting accelerator to CPU" in kept and "(fit_expert pid=13" in kept
