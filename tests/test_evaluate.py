"""Scoring rows and the baselines reported beside them."""
from __future__ import annotations

from modecotd.evaluate import majority_baseline, score_rows, summarize
from modecotd.tasks.schema import AnswerKind, Example


def test_majority_baseline_uses_train_answers_only():
    assert majority_baseline(["no", "no", "yes"], ["yes", "no", "no", "no"]) == {"answer": "no", "accuracy": 0.75}
    assert majority_baseline([], ["yes"]) == {"answer": None, "accuracy": None}


def test_rows_and_summary_keep_every_score():
    examples = [Example("q1", "ab"), Example("q2", "cd"), Example("q3", "ef")]
    outputs = [' "x" and "y".\n\n-->\n\nab END', "-->\n\ncx END", "no marker at all"]
    rows = score_rows(examples, outputs, AnswerKind.TEXT)
    assert [r["correct"] for r in rows] == [True, False, False]
    assert [r["format_ok"] for r in rows] == [True, True, False]
    assert [r["partial"] for r in rows] == [1.0, 0.5, 0.0]
    summary = summarize(rows)
    assert summary["n"] == 3 and summary["accuracy"] == summary["accuracy_strict"] == 1 / 3
    assert summary["format_rate"] == 2 / 3 and summary["partial_credit"] == 0.5
    assert summarize(rows, "reference")["accuracy"] == summary["accuracy_reference"]
