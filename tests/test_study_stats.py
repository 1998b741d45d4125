"""bench/study_stats.py on synthetic data with known answers: the bootstrap's point estimates, its coverage and
width against the binomial standard error, pairing, and the interpolation at equal wall time."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def stats():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("study_stats")


def test_weights_are_multiplicities_of_draws_with_replacement(stats):
    w_seed, w_question = stats.weights(3, 50, draws=4000, seed=1)
    assert w_seed.shape == (4000, 3) and w_question.shape == (4000, 50)
    assert (w_seed.sum(1) == 3).all() and (w_question.sum(1) == 50).all()
    # each seed drawn once per slot with probability 1/3: expected multiplicity 1, P(all three the same) = 1/9
    assert w_seed.mean() == pytest.approx(1.0, abs=0.03)
    assert (w_seed.max(1) == 3).mean() == pytest.approx(1 / 9, abs=0.02)
    again = stats.weights(3, 50, draws=4000, seed=1)
    assert np.array_equal(again[0], w_seed) and np.array_equal(again[1], w_question)


def test_resampled_mean_equals_the_mean_over_the_explicit_resampled_grid(stats):
    rng = np.random.default_rng(0)
    scores = rng.random((3, 7))
    w = stats.weights(3, 7, draws=5, seed=2)
    means = stats.resampled_means(scores, w)
    for b in range(5):
        seeds = np.repeat(np.arange(3), w[0][b].astype(int))
        questions = np.repeat(np.arange(7), w[1][b].astype(int))
        assert means[b] == pytest.approx(scores[np.ix_(seeds, questions)].mean(), rel=1e-12)


def test_constant_scores_give_a_zero_width_interval(stats):
    result = stats.interval(np.full((3, 40), 0.25))
    assert (result.mean, result.lo, result.hi) == pytest.approx((0.25, 0.25, 0.25))
    assert not stats.interval(np.zeros((2, 5))).excludes_zero()


def test_interval_width_matches_the_binomial_standard_error(stats):
    """One seed (nothing to resample there): the question bootstrap's 95% interval of a mean of Q coin flips
    has half-width about 1.96 * sqrt(p (1 - p) / Q)."""
    rng = np.random.default_rng(3)
    q, p = 400, 0.3
    scores = (rng.random((1, q)) < p).astype(float)
    result = stats.interval(scores)
    p_hat = scores.mean()
    expected = 1.96 * np.sqrt(p_hat * (1 - p_hat) / q)
    assert (result.hi - result.lo) / 2 == pytest.approx(expected, rel=0.1)
    assert result.lo < p_hat < result.hi


def test_coverage_of_a_known_accuracy_is_about_95_percent(stats):
    """200 synthetic studies around a known accuracy of 0.4: 3 seeds, each with its own offset (training noise,
    sd 0.06), x 128 questions drawn from a population of difficulties uniform in [0.1, 0.7], one sampled answer
    each. The two-way intervals cover 0.4 in about 95% of the studies; a bootstrap over questions only (or
    over seeds only) ignores one source of variance and covers it in only about 75%."""
    rng = np.random.default_rng(4)
    w = stats.weights(3, 128, draws=2000, seed=5)
    questions_only = (np.ones_like(w[0]), w[1])
    covered = {"two-way": 0, "questions only": 0}
    for _ in range(200):
        difficulty = rng.uniform(0.1, 0.7, size=128)
        offsets = rng.normal(0.0, 0.06, size=(3, 1))
        scores = (rng.random((3, 128)) < np.clip(difficulty + offsets, 0, 1)).astype(float)
        for name, resamples in (("two-way", w), ("questions only", questions_only)):
            result = stats.interval(scores, resamples)
            covered[name] += result.lo <= 0.4 <= result.hi
    assert 0.9 <= covered["two-way"] / 200 <= 0.99
    assert covered["questions only"] / 200 < 0.85


def test_paired_difference_is_exact_and_narrower_than_unpaired(stats):
    rng = np.random.default_rng(6)
    baseline = (rng.random((3, 256)) < 0.4).astype(float)
    better = baseline.copy()
    better[:, :20] = 1.0                                        # fixes some questions in every seed
    gain = (better - baseline).mean()
    paired = stats.paired_difference(better, baseline)
    assert paired.mean == pytest.approx(gain, abs=1e-12) and paired.excludes_zero()
    # unpaired: the intervals of the two means overlap although the paired difference is clear
    a, b = stats.interval(better), stats.interval(baseline)
    assert paired.hi - paired.lo < 0.5 * ((a.hi - a.lo) + (b.hi - b.lo))
    identical = stats.paired_difference(baseline, baseline)
    assert (identical.mean, identical.lo, identical.hi) == (0.0, 0.0, 0.0)


def test_paired_difference_of_independent_equal_algorithms_covers_zero(stats):
    rng = np.random.default_rng(7)
    hits = 0
    w = stats.weights(3, 256, draws=2000, seed=8)
    for _ in range(100):
        p = rng.uniform(0.2, 0.6, size=256)
        a = (rng.random((3, 256)) < p).astype(float)
        b = (rng.random((3, 256)) < p).astype(float)
        hits += not stats.paired_difference(a, b, w).excludes_zero()
    assert hits >= 88


def test_bad_shapes_are_refused_naming_the_argument(stats):
    with pytest.raises(ValueError, match="scores"):
        stats.interval(np.zeros(5))
    with pytest.raises(ValueError, match="baseline"):
        stats.paired_difference(np.zeros((3, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="^w:"):
        stats.interval(np.zeros((3, 4)), stats.weights(2, 4, draws=3))
    with pytest.raises(ValueError, match="scores"):
        stats.interval([[0.5, float("nan")]])


def test_at_time_interpolates_linearly_between_evaluations(stats):
    times = [0.0, 100.0, 300.0]
    scores = np.array([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert stats.at_time(times, scores, 0.0).tolist() == [0.0, 1.0, 0.0]
    assert stats.at_time(times, scores, 50.0).tolist() == [0.5, 1.0, 0.0]
    assert stats.at_time(times, scores, 100.0).tolist() == [1.0, 1.0, 0.0]
    assert stats.at_time(times, scores, 250.0) == pytest.approx([1.0, 0.25, 0.75])
    assert stats.at_time(times, scores, 300.0).tolist() == [1.0, 0.0, 1.0]
    # the mean accuracy at t is the linear interpolation of the accuracy curve
    assert stats.at_time(times, scores, 250.0).mean() == pytest.approx(np.interp(250.0, times, scores.mean(1)))
    with pytest.raises(ValueError, match="^t:"):
        stats.at_time(times, scores, 301.0)
    with pytest.raises(ValueError, match="^times:"):
        stats.at_time([0.0, 0.0], scores[:2], 0.0)
