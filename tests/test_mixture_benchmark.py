"""The mixer benchmark runs on a tiny model, so that it cannot rot: `python -m
benchmarks.mixture_search --quick` end to end (the experts trained, written into a run folder as
the pipeline writes one and read back through the `--run` path, every target, the final JSON
line), and one target's procedure in-process: the reference's NGOpt search with the authors'
objective, ours to its best and at equal evaluations, the trivial starts and the test accuracy of
each weight vector."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_quick_mixture_search_runs_every_part_through_both_target_sources():
    from benchmarks.mixture_search import EXPERT_FAMILIES, QUICK, QUICK_RUN_TARGETS, QUICK_RUN_UNSEEN, TARGET_FAMILY

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    python = ROOT / ".venv" / "bin" / "python"
    done = subprocess.run([str(python if python.exists() else sys.executable), "-m", "benchmarks.mixture_search",
                           "--quick"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    # the experts were trained in this call (never taken from a cache), one after the other
    assert [line.split()[2] for line in lines if line.startswith("training the ")] == list(EXPERT_FAMILIES)
    assert result["benchmark"] == "mixture_search" and result["mode"] == "quick" and result["note"]
    assert result["model"] == "builtin:tiny" and result["experts"] == list(EXPERT_FAMILIES)
    assert result["optimizer_ours"] == "gradient" and result["dtype_ours"] in ("fp32", "bf16")
    assert result["cpu_capability"] and result["threads"] == 1

    # the generated target, then the run folder's (read back through --run's code): its unseen task and a seen one
    targets = result["targets"]
    assert list(targets) == [TARGET_FAMILY, *QUICK_RUN_TARGETS]
    assert [(t["source"], t["role"]) for t in targets.values()] == [("generated", "unseen"), ("run", "unseen"),
                                                                     ("run", "seen")]
    assert targets[QUICK_RUN_UNSEEN[0]]["kind"] == "yes_no" and targets[TARGET_FAMILY]["kind"] == "yes_no"
    budget = QUICK["reference_budget"]
    for name, target in targets.items():
        assert target["fewshot"] == QUICK["fewshot"] and target["test"] == QUICK["test"], name
        reference, reached, equal = target["reference"], target["ours_to_target"], target["ours_equal_evaluations"]
        assert _positive(reference["best_objective"]) and _positive(reference["seconds"]), name
        assert reference["evaluations"] == budget and 1 <= reference["evaluation_of_best"] <= budget, name
        assert 0 <= reference["seconds_to_best"] <= reference["seconds"], name
        assert len(reference["weights"]) == len(EXPERT_FAMILIES) and all(abs(w) <= 3 for w in reference["weights"])
        assert _positive(reached["objective"]) and _positive(reached["seconds"]), name
        assert 1 <= reached["evaluations"] <= QUICK["budget_ours"], name
        # (the JSON's objectives are rounded to 5 places, so only one way is certain)
        assert not reached["reached"] or reached["objective"] <= reference["best_objective"], name
        assert _positive(equal["objective"]) and _positive(equal["seconds"]) and 1 <= equal["evaluations"] <= budget
        assert len(equal["weights"]) == len(EXPERT_FAMILIES) and all(abs(w) <= 3 for w in equal["weights"]), name
        starts = target["trivial_starts"]
        assert set(starts) == {"zero", "average", *(f"alone:{f}" for f in EXPERT_FAMILIES)}, name
        assert all(_positive(v) for v in starts.values()) and starts[target["best_trivial_start"]] == min(
            starts.values()), name
        assert not target["trivial_start_beats_reference"] or min(starts.values()) <= reference["best_objective"]
        # w = 0 is the reference's first candidate
        assert reference["best_objective"] <= starts["zero"] + 1e-4, name
        assert set(target["test_accuracy"]) == {"reference", "ours", "zero"}, name
        assert all(0.0 <= a <= 1.0 for a in target["test_accuracy"].values()), name

    # the aggregation over the targets
    ratios = [t["reference"]["seconds"] / t["ours_to_target"]["seconds"] for t in targets.values()
              if t["ours_to_target"]["reached"]]
    assert result["ratio"] == round(statistics.median(ratios), 2) if ratios else result["ratio"] == 0.0
    assert result["targets_reached"] == f"{len(ratios)}/{len(targets)}"
    assert result["met"] == (result["ratio"] >= 5.0 and len(ratios) == len(targets))
    assert result["trivial_start_beats_reference_on"] == [
        n for n, t in targets.items() if t["trivial_start_beats_reference"]]
    assert result["ours_better_at_equal_evaluations_on"] == [
        n for n, t in targets.items() if t["ours_equal_evaluations"]["objective"] <= t["reference"]["best_objective"]]
    for label in ("reference", "ours", "zero"):
        mean = statistics.mean(t["test_accuracy"][label] for t in targets.values())
        assert abs(result["mean_test_accuracy"][label] - mean) <= 1e-4 and 0.0 <= mean <= 1.0, label


def test_one_target_is_measured_against_the_reference_search(tiny_model_dir, tmp_path):
    from benchmarks.mixture_search import REFERENCE, reference_model, run_target
    from modecotd.mixture import Mixture
    from modecotd.tasks.schema import Example
    from tests.test_mixture import ROWS, make_expert

    experts = {name: make_expert(tiny_model_dir, tmp_path / name, seed) for seed, name in enumerate(["a", "b"])}
    test = [Example(question=r["question"], answer=r["answer"]) for r in ROWS[:2]]
    mixture = Mixture(tiny_model_dir, experts, "lorahub", "fp32")
    mixture.objective = "per_row"
    args = SimpleNamespace(optimizer="gradient", budget_ours=6, candidates_per_forward=4, learning_rate=0.2,
                           max_new_tokens=4, eval_batch=2)
    result = run_target("sums", {"kind": "number", "role": "unseen", "fewshot": ROWS, "test": test}, tiny_model_dir,
                        reference_model(tiny_model_dir, experts), mixture, args)
    reference, equal = result["reference"], result["ours_equal_evaluations"]
    assert 1 <= reference["evaluation_of_best"] <= REFERENCE["budget"] and len(reference["weights"]) == 2
    assert equal["evaluations"] <= REFERENCE["budget"] and result["ours_to_target"]["evaluations"] <= 6
    # w = 0 is the reference's first candidate: its objective is the untouched student's loss / rows
    assert reference["best_objective"] <= result["trivial_starts"]["zero"] + 1e-4
    assert set(result["trivial_starts"]) == {"zero", "average", "alone:a", "alone:b"}
    assert set(result["test_accuracy"]) == {"reference", "ours", "zero"}
    assert all(0.0 <= value <= 1.0 for value in result["test_accuracy"].values())
