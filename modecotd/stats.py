"""Small statistics for the report and `modecotd compare`: intervals, a paired test, a baseline.

Pure functions over counts or per-question correct/incorrect vectors; no I/O.
"""
from __future__ import annotations

import collections
import math
from typing import Sequence

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) for a proportion ``successes / n``.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0/n or n/n.
    """
    if n <= 0:
        raise ValueError(f"a proportion needs n > 0, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # at 0/n and n/n one bound is exactly 0 or 1; clamp away rounding noise
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def discordant_counts(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> tuple[int, int]:
    """(questions only A got right, questions only B got right) for two paired vectors."""
    _check_paired(a_correct, b_correct)
    only_a = sum(1 for a, b in zip(a_correct, b_correct) if a and not b)
    only_b = sum(1 for a, b in zip(a_correct, b_correct) if b and not a)
    return only_a, only_b


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts: under the null each discordant
    question is equally likely to favour A or B, so min(only_a, only_b) ~ Binomial(n, 1/2);
    p = min(1, 2 * P(X <= min)). With no discordant pair there is no evidence: p = 1."""
    if only_a < 0 or only_b < 0:
        raise ValueError("discordant counts must be >= 0")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def mcnemar_test(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """Exact McNemar p-value for two systems scored on the same questions (paired vectors)."""
    return mcnemar_exact_p(*discordant_counts(a_correct, b_correct))


def paired_bootstrap_diff_ci(a_correct: Sequence[bool], b_correct: Sequence[bool], *, resamples: int = 2000,
                             seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of accuracy(B) - accuracy(A), resampling questions with their
    pair kept together.

    Each question's difference is -1, 0 or +1, so resampling n questions with replacement amounts
    to drawing the three counts from a multinomial with the observed shares: the same bootstrap
    distribution as resampling indices, without an n-by-resamples array. Seeded: same inputs, same
    interval.
    """
    import numpy as np

    _check_paired(a_correct, b_correct)
    n = len(a_correct)
    if n == 0:
        raise ValueError("no paired questions")
    only_a, only_b = discordant_counts(a_correct, b_correct)
    shares = [only_a / n, only_b / n, (n - only_a - only_b) / n]
    counts = np.random.default_rng(seed).multinomial(n, shares, size=resamples)
    diffs = (counts[:, 1] - counts[:, 0]) / n
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return float(low), float(high)


def mean_over_tasks_ci(scores: Sequence[Sequence[float]], *, resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean over tasks of each task's mean per-question score, with a
    percentile bootstrap interval that resamples questions within each task (a stratified
    bootstrap: every task keeps its weight of 1/T and its own n).

    A score is 1/0 for one system's correctness, or -1/0/+1 for B minus A on paired questions, which
    gives the interval of a mean difference. Seeded: same inputs, same interval."""
    import numpy as np

    if not scores or any(len(task) == 0 for task in scores):
        raise ValueError("every task needs at least one scored question")
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for task in scores:
        values = np.asarray(task, dtype=float)
        picks = rng.integers(0, len(values), size=(resamples, len(values)))
        means += values[picks].mean(axis=1)
    means /= len(scores)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(np.mean([np.mean(task) for task in scores])), float(low), float(high)


def mean_over_seeds_and_tasks_ci(scores: Sequence[Sequence[Sequence[float]]], *, resamples: int = 2000,
                                 seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) for scores[seed][task] = per-question scores of one system trained and mixed
    with each of several seeds: the mean over seeds of the mean over tasks, with a percentile
    bootstrap interval that resamples the seeds (with replacement) and, within each seed, the
    questions of each task. The interval thus covers the spread between training seeds as well as
    the sampling of questions; with one seed it is :func:`mean_over_tasks_ci`'s. Seeded."""
    import numpy as np

    if not scores or any(not seed_scores or any(len(task) == 0 for task in seed_scores) for seed_scores in scores):
        raise ValueError("every seed needs every task with at least one scored question")
    rng = np.random.default_rng(seed)
    per_seed = np.zeros((len(scores), resamples))  # each seed's mean over tasks, per resample of its questions
    for index, seed_scores in enumerate(scores):
        for task in seed_scores:
            values = np.asarray(task, dtype=float)
            per_seed[index] += values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
        per_seed[index] /= len(seed_scores)
    drawn = rng.integers(0, len(scores), size=(resamples, len(scores)))  # the seeds of each resample
    means = per_seed[drawn, np.arange(resamples)[:, None]].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    point = float(np.mean([np.mean([np.mean(task) for task in seed_scores]) for seed_scores in scores]))
    return point, float(low), float(high)


def majority_answer_accuracy(golds: Sequence[str]) -> tuple[str | None, float | None]:
    """(answer, accuracy) of always giving the most frequent gold answer of these (test) golds.

    It reads the test golds, so it is an upper bound for any constant guesser (one that picks its
    single answer without seeing the test set), not a baseline a real system could match blindly.
    Answers compare as written; ties go to the answer seen first. No golds: (None, None).
    """
    if not golds:
        return None, None
    answer, count = collections.Counter(golds).most_common(1)[0]
    return answer, count / len(golds)


def _check_paired(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired vectors differ in length: {len(a)} and {len(b)}")
