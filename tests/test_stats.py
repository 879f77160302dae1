"""modecotd.stats against values computed by hand."""
from __future__ import annotations

import math

import pytest

from modecotd.stats import (Z_95, discordant_counts, majority_answer_accuracy, mcnemar_exact_p, mcnemar_test,
                            paired_bootstrap_diff_ci, wilson_interval)

Z2 = Z_95 ** 2  # 3.8415


@pytest.mark.parametrize("successes, n, low, high", [
    (0, 10, 0.0, Z2 / (10 + Z2)),  # 0.2775: the upper bound at 0/n is z²/(n + z²)
    (10, 10, 10 / (10 + Z2), 1.0),  # 0.7225, the mirror image
    # 5/10: centre 1/2, half-width z * sqrt(1/40 + z²/400) / (1 + z²/10)
    (5, 10, 0.5 - Z_95 * math.sqrt(1 / 40 + Z2 / 400) / (1 + Z2 / 10),
     0.5 + Z_95 * math.sqrt(1 / 40 + Z2 / 400) / (1 + Z2 / 10)),
])
def test_wilson_interval_hand_computed(successes, n, low, high):
    got = wilson_interval(successes, n)
    assert got == pytest.approx((low, high), abs=1e-12)


def test_wilson_interval_rounded_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert wilson_interval(15, 30) == pytest.approx((0.33154, 0.66846), abs=1e-5)


@pytest.mark.parametrize("successes, n", [(1, 0), (-1, 5), (6, 5)])
def test_wilson_interval_rejects_impossible_counts(successes, n):
    with pytest.raises(ValueError):
        wilson_interval(successes, n)


@pytest.mark.parametrize("only_a, only_b, p", [
    (0, 0, 1.0),  # no discordant pair: no evidence
    (0, 1, 1.0),  # 2 * 1/2, capped at 1
    (3, 3, 1.0),
    (1, 5, 14 / 64),  # 2 * (C(6,0) + C(6,1)) / 2^6
    (5, 1, 14 / 64),  # symmetric
    (0, 6, 2 / 64),
    (2, 9, 2 * (1 + 11 + 55) / 2 ** 11),  # 0.0654
    (0, 10, 2 / 1024),
])
def test_mcnemar_exact_small_tables(only_a, only_b, p):
    assert mcnemar_exact_p(only_a, only_b) == pytest.approx(p, abs=1e-15)


def test_mcnemar_from_vectors_counts_only_discordant_pairs():
    a = [True, True, True, False, False, False, True, False]
    b = [True, False, False, True, True, True, True, True]
    assert discordant_counts(a, b) == (2, 4)
    assert mcnemar_test(a, b) == pytest.approx(2 * (1 + 6 + 15) / 64)
    with pytest.raises(ValueError, match="length"):
        mcnemar_test([True], [True, False])


def test_paired_bootstrap_degenerate_cases_are_exact():
    assert paired_bootstrap_diff_ci([True, False, True], [True, False, True]) == (0.0, 0.0)
    assert paired_bootstrap_diff_ci([True] * 4, [False] * 4) == (-1.0, -1.0)
    with pytest.raises(ValueError):
        paired_bootstrap_diff_ci([], [])


def test_paired_bootstrap_is_seeded_and_covers_the_observed_difference():
    a = [True] * 30 + [False] * 70
    b = [True] * 45 + [False] * 55  # B right on 15 more questions, never worse: diff +0.15
    low, high = paired_bootstrap_diff_ci(a, b, seed=3)
    assert (low, high) == paired_bootstrap_diff_ci(a, b, seed=3)
    assert 0.0 < low < 0.15 < high < 0.3
    # all the variation is in the 15 discordant questions: sd of the diff is sqrt(p(1-p)/n), p = 0.15
    assert high - low == pytest.approx(2 * Z_95 * math.sqrt(0.15 * 0.85 / 100), rel=0.15)


def test_majority_answer_accuracy_uses_the_golds_given():
    assert majority_answer_accuracy(["yes", "no", "no", "no"]) == ("no", 0.75)
    assert majority_answer_accuracy(["a", "b", "b", "a"]) == ("a", 0.5)  # ties: first seen
    assert majority_answer_accuracy([]) == (None, None)


def test_mean_over_tasks_weighs_each_task_once_and_its_interval_narrows_with_questions():
    from modecotd.stats import mean_over_tasks_ci

    mean, low, high = mean_over_tasks_ci([[1, 1, 1, 1], [0] * 100])  # 100% on 4 questions, 0% on 100
    assert mean == 0.5 and low <= mean <= high
    assert high == 0.5  # the first task is 100% in every resample, the second 0%: no spread at all
    assert mean_over_tasks_ci([[1, 0]]) [1:] == mean_over_tasks_ci([[1, 0]])[1:]  # seeded
    few = mean_over_tasks_ci([[1, 0] * 10, [1, 0, 0, 0] * 5])
    many = mean_over_tasks_ci([[1, 0] * 1000, [1, 0, 0, 0] * 500])
    assert abs(few[0] - many[0]) < 1e-12 and (many[2] - many[1]) < (few[2] - few[1]) / 5
    diff, low, high = mean_over_tasks_ci([[1, 0, -1, 1], [0, 0, 1, 1]])  # paired differences B - A
    assert abs(diff - 0.375) < 1e-12 and low < diff < high
    with pytest.raises(ValueError):
        mean_over_tasks_ci([[1], []])


def test_the_report_means_and_the_mixtures_changes_are_paired_by_question():
    from modecotd.report.collect import means_with_intervals
    from modecotd.report.markdown import means_section

    def rows(correct):
        return {0: [{"id": i, "question": f"q{i}", "correct": c} for i, c in enumerate(correct)]}  # one seed

    tasks = {"a": {"role": "seen", "majority": {"accuracy": 0.5}}, "b": {"role": "seen", "majority": {"accuracy": 0.3}},
             "u": {"role": "unseen", "majority": {"accuracy": None}}}
    scores = {("a", "expert"): rows([1, 0, 0, 0]), ("a", "mixture-delta"): rows([1, 1, 0, 0]),
              ("b", "expert"): rows([1, 1]), ("b", "mixture-delta"): {0: list(reversed(rows([0, 1])[0]))},  # order differs
              ("u", "base"): rows([0, 0, 0]), ("u", "mixture-delta"): rows([1, 0, 0])}
    means, changes = means_with_intervals(tasks, scores, "strict")
    assert means["seen"]["expert"]["mean"] == (0.25 + 1.0) / 2 and means["seen"]["expert"]["tasks"] == 2
    assert means["seen"]["majority"] == {"mean": 0.4, "tasks": 2} and "majority" not in means["unseen"]
    by = {(c["role"], c["over"]): c for c in changes}
    assert set(by) == {("seen", "expert"), ("unseen", "base")}  # no multi-task LoRA evaluated
    assert abs(by[("seen", "expert")]["change"] - (0.25 - 0.5) / 2) < 1e-12  # b: q0 lost, paired by id
    assert by[("unseen", "base")]["change"] == 1 / 3 and by[("unseen", "base")]["paper"] == 7.8
    text = "\n".join(means_section({"means": means, "changes": changes}))
    assert "| seen | mixture-delta | expert | 2 | -12.5 [" in text and "+6.3 (seen)" in text and "2 comparisons" in text

    # a second seed of the mixture: the base student, evaluated once, pairs with each seed's rows
    scores[("u", "mixture-delta")] = {0: rows([1, 0, 0])[0], 7: rows([1, 1, 1])[0]}
    means, changes = means_with_intervals(tasks, scores, "strict")
    unseen = next(c for c in changes if c["role"] == "unseen")
    assert unseen["seeds"] == 2 and unseen["change"] == pytest.approx((1 / 3 + 1) / 2)
    assert means["unseen"]["mixture-delta"]["seeds"] == 2 and means["unseen"]["base"]["seeds"] == 1
    assert means["unseen"]["mixture-delta"]["mean"] == pytest.approx(2 / 3)


def test_the_interval_over_seeds_and_questions_widens_with_the_spread_between_seeds():
    from modecotd.stats import mean_over_seeds_and_tasks_ci, mean_over_tasks_ci

    task_a, task_b = [1, 0] * 50, [1, 1, 0, 0, 0] * 20
    one = mean_over_seeds_and_tasks_ci([[task_a, task_b]])
    assert one == mean_over_tasks_ci([task_a, task_b])  # one seed: the stratified bootstrap over questions
    agreeing = mean_over_seeds_and_tasks_ci([[task_a, task_b]] * 3)
    far_apart = mean_over_seeds_and_tasks_ci([[[1] * 100, [1] * 100], [[0] * 100, [0] * 100], [task_a, task_b]])
    assert agreeing[0] == pytest.approx(0.45)
    assert far_apart[0] == pytest.approx((1 + 0 + 0.45) / 3)
    assert far_apart[2] - far_apart[1] > 3 * (agreeing[2] - agreeing[1])  # the seeds' spread is in the interval
    assert far_apart[1] <= far_apart[0] <= far_apart[2]
    assert mean_over_seeds_and_tasks_ci([[task_a]] * 2, seed=1) == mean_over_seeds_and_tasks_ci([[task_a]] * 2, seed=1)
    with pytest.raises(ValueError):
        mean_over_seeds_and_tasks_ci([[task_a], []])
