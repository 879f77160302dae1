"""The expert-retrieval check (modecotd.retrieval), and its benchmark end to end on a tiny student."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from modecotd.retrieval import placements, summarize_check


def test_the_matching_expert_is_placed_at_every_position_the_others_in_cyclic_order():
    assert placements(["a", "b", "c", "d"], "c") == [["c", "d", "a", "b"], ["d", "c", "a", "b"],
                                                      ["d", "a", "c", "b"], ["d", "a", "b", "c"]]
    assert placements(["a"], "a") == [["a"]]


def test_retrieval_is_counted_per_mixer_and_per_position():
    rows = [{"mixer": "m", "position": p, "retrieved": p == 0, "largest": "x", "first_listed": "x" if p == 0 else "y",
             "evaluations": 4, "accuracy": {"strict": 0.5, "likelihood": None}} for p in range(2)]
    summary = summarize_check(rows, ["m", "absent"], experts=2)
    assert list(summary) == ["m"]
    assert summary["m"]["retrieval_rate"] == 0.5 and summary["m"]["retrieval_by_position"] == {1: 1.0, 2: 0.0}
    assert summary["m"]["first_listed_largest"] == 0.5 and summary["m"]["mean_accuracy"] == {"strict": 0.5}


def test_the_benchmark_runs_end_to_end_on_a_tiny_student(tiny_model_dir, tmp_path):
    """Experts trained on three generated families, each mixer fitted on each twin with its expert
    at every position, accuracies decoded; the last line is the benchmark's JSON. The best expert
    by few-shot loss needs no order: it must find every twin's expert wherever it is listed."""
    env = {**os.environ, "MODECOTD_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "benchmarks.expert_retrieval", "--quick", "--student",
                           str(tiny_model_dir), "--test", "2", "--max-new-tokens", "6", "--gate-steps", "6",
                           "--budget", "6"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    mixers = result["mixers"]
    assert result["benchmark"] == "expert_retrieval" and len(result["experts"]) == 3
    assert len(result["rows"]) == 3 * 3 * len(mixers) == 3 * 3 * 5
    for twin in {r["twin"] for r in result["rows"]}:
        for mixer in mixers:
            mine = [r for r in result["rows"] if r["twin"] == twin and r["mixer"] == mixer]
            assert sorted(r["position"] for r in mine) == [0, 1, 2]
            assert all(r["first_listed"] == r["expert"] for r in mine if r["position"] == 0)
    assert mixers["best expert"]["retrieval_rate"] == 1.0
    authors = mixers["lorahub, 1 order (the authors')"]["retrieval_rate"]
    assert result["ratio"] == mixers["lorahub, 3 orders"]["retrieval_rate"] / max(authors, 1e-9)
    for figures in mixers.values():
        assert set(figures["retrieval_by_position"]) == {"1", "2", "3"}
        assert 0.0 <= figures["mean_accuracy"]["strict"] <= 1.0
    assert set(result["twin_references"]) == {r["twin"] for r in result["rows"]}
    assert result["cpu_capability"] and result["precision"]["dtype"] in ("fp32", "bf16")
