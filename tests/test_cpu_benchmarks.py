"""The two CPU benchmarks end to end in their quick modes (a tiny random student), so that they
cannot rot: `python -m benchmarks.teacher_throughput --quick` and `python -m
benchmarks.distill_throughput --quick` each run every part and print their figures as one JSON
line. Their speed figures mean nothing at this size; what is checked is that both sides ran and were
measured the same way."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _run_quick(module: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    python = ROOT / ".venv" / "bin" / "python"
    done = subprocess.run([str(python if python.exists() else sys.executable), "-m", module, "--quick"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_quick_teacher_throughput_compares_the_stage_with_generate_on_the_same_batches():
    result = _run_quick("benchmarks.teacher_throughput")
    assert result["benchmark"] == "teacher_throughput" and result["mode"] == "quick"
    assert {"goal", "met", "model", "dtype", "dtype_reason", "baseline_setup", "ours_setup"} <= set(result)
    assert result["dtype"] in ("fp32", "bf16") and result["cpu_capability"]
    for key in ("ratio", "ours_tokens_per_s", "baseline_tokens_per_s", "ours_tokens", "baseline_tokens",
                "ours_seconds", "baseline_seconds", "baseline_load_seconds", "questions", "max_new_tokens"):
        assert _positive(result[key]), key
    speeds = result["ours_tokens_per_s"] / result["baseline_tokens_per_s"]  # each rounded to 0.1, the ratio to 0.01
    assert abs(result["ratio"] - speeds) <= 0.01 + 0.02 * speeds
    # the baseline is batched: generate on exactly the stage's batches (both stages, every shard), not per prompt
    assert result["baseline_batch_sizes"] == result["stage_batch_sizes"]
    assert max(result["baseline_batch_sizes"]) == min(result["batch_size"], result["shard_size"]) > 1
    assert sum(result["baseline_batch_sizes"]) == 2 * result["questions"]  # a rationale, then an answer, each
    assert "generate" in result["baseline_setup"] and "per batch" in result["baseline_setup"]
    # generated tokens are counted alike: at most max_new_tokens + the answer stage's 16 per question, no padding
    assert result["baseline_tokens"] <= result["questions"] * (result["max_new_tokens"] + 16)
    assert result["ours_failed_questions"] == 0
    for key in ("answer_agreement", "accuracy_ours", "accuracy_baseline"):
        assert 0.0 <= result[key] <= 1.0, key
    if result["dtype"] == "fp32":  # the same greedy batches: the same answers (the goal's agreement)
        assert result["answer_agreement"] >= 0.95
        # counted by the same rule (an ending EOS included, padding not): equal but for rows whose greedy
        # path the batch shapes' rounding changed
        assert abs(result["ours_tokens"] - result["baseline_tokens"]) <= 0.02 * result["baseline_tokens"]


def test_quick_distill_throughput_times_both_loops_alike_and_runs_the_concurrency_part():
    result = _run_quick("benchmarks.distill_throughput")
    assert result["benchmark"] == "distill_throughput" and result["mode"] == "quick"
    assert {"goal", "met", "model", "dtype", "dtype_reason", "timing", "baseline_setup"} <= set(result)
    assert result["dtype"] in ("fp32", "bf16") and result["cpu_capability"]
    for key in ("ratio", "ours_target_tokens_per_s", "baseline_target_tokens_per_s", "ours_seconds",
                "baseline_seconds", "ours_timed_target_tokens", "baseline_timed_target_tokens",
                "ours_whole_loop_target_tokens_per_s", "baseline_whole_loop_target_tokens_per_s",
                "loss_ours", "loss_baseline", "held_out_loss_ours", "held_out_loss_baseline", "mfu",
                "matmul_peak_gflops"):
        assert _positive(result[key]), key
    assert 0.0 <= result["loss_gap"] and len(result["loss_per_seed_ours"]) == len(result["loss_per_seed_baseline"])
    # warm-up left out the same way on both sides: the same steps, the first `untimed_steps` untimed
    assert result["untimed_steps"] >= 2
    assert result["ours_steps"] == result["baseline_steps"] > result["untimed_steps"]
    for side in ("ours", "baseline"):
        assert result[f"{side}_timed_steps"] == result[f"{side}_steps"] - result["untimed_steps"] * result["seeds"]
    # the concurrency part ran (through the distill stage's fit_expert), each expert to its last step
    assert _positive(result["concurrent_two_experts_s"]) and _positive(result["sequential_two_experts_s"])
    assert _positive(result["concurrency_wall_ratio"])
    for mode in ("concurrent", "sequential"):
        experts = result["concurrency_experts"][mode]
        assert set(experts) == {"arithmetic", "letters"}
        assert all(e["steps"] >= 1 and _positive(e["target_tokens"]) for e in experts.values())
