"""`python -m benchmarks.gpu --quick`: every stage runs through the library's own code on a tiny
student (the CPU, gloo, dtype auto), prints its figures as one JSON line, and never imports Ray."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_quick_gpu_benchmark_runs_every_stage_without_ray():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    python = ROOT / ".venv" / "bin" / "python"
    done = subprocess.run([str(python if python.exists() else sys.executable), "-X", "importtime",
                           "-m", "benchmarks.gpu", "--quick"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])

    # Ray: neither imported (python -X importtime lists every module a process imports) nor loaded.
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert imported, "python -X importtime printed nothing"
    assert not [m for m in imported if m == "ray" or m.startswith("ray.")]
    assert result["ray_imported"] is False

    assert result["benchmark"] == "gpu" and result["mode"] == "quick"
    assert {"goal", "met", "device", "cpu_capability", "dtype", "hardware"} <= set(result)
    assert result["dtype"] in ("bf16", "fp32") and result["cpu_capability"]
    stages = {"teacher", "distill_lora_zero2", "distill_lora_zero3", "full_finetune", "mixture", "evaluation"}
    assert set(result["stage_ratios"]) == stages
    assert all(_positive(v) for v in result["stage_ratios"].values())
    assert _positive(result["ratio"]) and result["ratio"] == min(result["stage_ratios"].values())
    assert _positive(result["matmul_peak_tflops"]) and _positive(result["model"]["params"])

    teacher = result["teacher"]
    for key in ("ours_tokens_per_s", "baseline_tokens_per_s", "ours_tokens", "baseline_tokens"):
        assert _positive(teacher[key]), key
    assert teacher["batch_size"] >= 64

    distill = result["distill"]
    for run in ("ours_zero2", "ours_zero3", "baseline"):
        for key in ("target_tokens_per_s", "mfu", "peak_memory_gib", "seconds", "steps"):
            assert _positive(distill[run][key]), (run, key)
    assert distill["ours_zero2"]["zero_stage"] == 2 and distill["ours_zero3"]["zero_stage"] == 3
    assert _positive(result["mfu_lora_zero2"])

    full = result["full_finetune"]
    for run in ("ours", "baseline"):
        for key in ("target_tokens_per_s", "mfu", "peak_memory_gib", "seconds"):
            assert _positive(full[run][key]), (run, key)

    mixture = result["mixture"]
    assert _positive(mixture["ours_candidates_per_s"]) and _positive(mixture["baseline_candidates_per_s"])
    assert len(mixture["experts"]) == 3
    assert mixture["max_loss_gap"] < 0.1  # ours computes the reference's objective

    evaluation = result["evaluation"]
    for key in ("ours_tokens_per_s", "baseline_tokens_per_s", "ours_tokens", "baseline_tokens", "batch_size"):
        assert _positive(evaluation[key]), key
