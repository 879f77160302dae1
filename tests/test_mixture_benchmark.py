"""The mixer benchmark's per-target procedure runs on a tiny model, so that it cannot rot: the
reference's NGOpt search with the authors' objective, ours to its best and at equal evaluations,
the trivial starts and the test accuracy of each weight vector."""
from __future__ import annotations

from types import SimpleNamespace


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
