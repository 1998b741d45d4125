"""bench/study_stats.py against known truths: the t-interval and p against the textbook, the MDD's power and
the coverage of the intervals by simulation (seeds x questions with a seed-level random effect), where an
interval that ignores the seeds must fail and the shipped ones must not."""

import importlib

import numpy as np
import pytest
from scipy import stats as sps



@pytest.fixture(scope="module")
def stats():
    # bench/ is on the import path through pyproject's pytest pythonpath
    return importlib.import_module("study_stats")


def simulate(rng, reps: int, seeds: int, questions: int, delta: float, seed_sd: float):
    """``reps`` synthetic studies of two arms, 0/1 scores [reps, seeds, questions] each. Question q has a
    difficulty p_q ~ U(0.35, 0.65) shared by both arms; each arm's training run of seed s shifts every
    question of that seed by its own u ~ N(0, seed_sd) (clipped to +-0.2, so no probability leaves [0, 1]);
    arm A is delta better. The truth of the mean difference is delta exactly (for the question set drawn,
    too)."""
    base = rng.uniform(0.35, 0.65, size=(reps, 1, questions))
    shift_a, shift_b = (np.clip(rng.normal(0.0, seed_sd, size=(reps, seeds, 1)), -0.2, 0.2) for _ in range(2))
    a = rng.random((reps, seeds, questions)) < base + delta / 2 + shift_a
    b = rng.random((reps, seeds, questions)) < base - delta / 2 + shift_b
    return a.astype(np.float64), b.astype(np.float64)


def pooled_cells(diff: np.ndarray) -> tuple[float, float]:
    """The interval a method that ignores the seeds gives: every seed x question cell an independent pair."""
    half = 1.96 * diff.std(ddof=1) / np.sqrt(diff.size)
    return diff.mean() - half, diff.mean() + half


def test_coverage_by_simulation_seed_aware_intervals_hold_and_seed_blind_fails(stats):
    """2,000 studies of 8 seeds x 64 questions, true difference 5 points, training noise sd 8 points per arm
    and seed. The per-seed paired t-interval (primary) and the crossed random-effects interval (check) cover
    the truth in at least 93% of the studies (binomial se of the estimate: 0.5 points; measured 95.4% and
    95.5%); the pooled-cell interval, blind to the seeds, in 78.6%."""
    rng = np.random.default_rng(24)
    reps, delta = 2000, 0.05
    a, b = simulate(rng, reps, seeds=8, questions=64, delta=delta, seed_sd=0.08)
    covered = {"paired t": 0, "crossed": 0, "pooled cells": 0}
    for r in range(reps):
        result = stats.contrast(a[r], b[r])
        lo, hi = pooled_cells(a[r] - b[r])
        covered["paired t"] += result.lo <= delta <= result.hi
        covered["crossed"] += result.re_lo <= delta <= result.re_hi
        covered["pooled cells"] += lo <= delta <= hi
    rate = {k: v / reps for k, v in covered.items()}
    assert 0.93 <= rate["paired t"] <= 0.97, rate
    assert 0.93 <= rate["crossed"] <= 0.985, rate
    assert rate["pooled cells"] < 0.85, rate


def test_paired_t_is_the_textbook_t_interval_and_p(stats):
    values = np.array([0.291, 0.102, 0.095, -0.02, 0.13])
    result = stats.paired_t(values)
    test = sps.ttest_1samp(values, 0.0)
    lo, hi = test.confidence_interval(0.95)
    expected = (values.mean(), lo, hi, test.pvalue)
    assert (result.mean, result.lo, result.hi, result.p) == pytest.approx(expected)
    assert result.sd == pytest.approx(values.std(ddof=1)) and result.seeds == 5
    # the re-analysis of APPO - GRPO at equal wall time: three seeds, +16.3 [-11.4, +43.9], p = 0.13
    three = stats.paired_t([0.291, 0.102, 0.095])
    expected = (0.1627, -0.1136, 0.4389, 0.1268)
    assert (three.mean, three.lo, three.hi, three.p) == pytest.approx(expected, abs=5e-4)
    one = stats.paired_t([0.2])
    assert one.mean == 0.2 and np.isnan([one.lo, one.hi, one.p, one.mdd]).all()
    same = stats.paired_t([0.25, 0.25, 0.25])
    assert (same.lo, same.hi, same.p, same.mdd) == (0.25, 0.25, 0.0, 0.0)


def test_mdd_has_80_percent_power_and_half_of_it_far_less(stats):
    """12 seeds, per-seed sd 10 points: 4,000 simulated studies with the true difference at the MDD reject
    "no difference" about 80% of the time (se 0.6 points), at half the MDD about 29%."""
    sd, seeds = 0.10, 12
    detectable = stats.mdd(sd, seeds)
    assert detectable == pytest.approx(0.0889, abs=5e-4)  # (t_.975 + t_.8 with 11 df) * sd / sqrt(12): 0.0889
    rng = np.random.default_rng(7)
    noise = rng.normal(0.0, sd, size=(4000, seeds))
    power = np.mean([stats.paired_t(row + detectable).p < 0.05 for row in noise])
    half = np.mean([stats.paired_t(row + detectable / 2).p < 0.05 for row in noise])
    assert power == pytest.approx(0.80, abs=0.025) and half < 0.4
    # many seeds: the normal approximation (z_.975 + z_.8) * sd / sqrt(S)
    assert stats.mdd(1.0, 2000) * np.sqrt(2000) == pytest.approx(1.95996 + 0.84162, rel=2e-3)
    assert np.isnan(stats.mdd(0.1, 1)) and stats.mdd(0.0, 5) == 0.0


def test_contrast_pairs_seeds_so_a_shared_seed_effect_cancels(stats):
    """Seeds that differ by 30 points for both arms alike: each arm's own interval is wide; the paired
    difference (20 more of 256 questions right in every seed, different ones per seed) is +7.8 points with a
    zero-width interval."""
    rng = np.random.default_rng(6)
    shift = np.array([[-0.15], [0.0], [0.15]])
    baseline = (rng.random((3, 256)) < 0.45 + shift).astype(float)
    better = baseline.copy()
    for row in better:
        row[np.flatnonzero(row == 0)[:20]] = 1.0
    paired = stats.contrast(better, baseline)
    assert (paired.mean, paired.lo, paired.hi, paired.p) == pytest.approx((20 / 256, 20 / 256, 20 / 256, 0.0))
    noisy = better.copy()
    noisy[0, np.flatnonzero(baseline[0] == 0)[20:30]] = 1.0   # seed 0 gains 10 more: a real spread
    spread = stats.contrast(noisy, baseline)
    alone = stats.accuracy(noisy)
    assert spread.excludes_zero() and alone.hi - alone.lo > 5 * (spread.hi - spread.lo)
    identical = stats.contrast(baseline, baseline)
    assert (identical.mean, identical.lo, identical.hi, identical.p) == (0.0, 0.0, 0.0, 1.0)


def test_crossed_interval_widens_with_a_question_effect_the_per_seed_interval_does_not_see(stats):
    """The same per-seed differences, once spread evenly over the questions and once concentrated on a few of
    them (an arm x question effect): the paired t-interval is the same, the crossed interval is wider."""
    seeds, questions = 6, 40
    offsets = np.array([0.02, 0.06, 0.0, 0.08, 0.04, 0.05])[:, None]
    even = np.full((seeds, questions), 0.1) + offsets
    lumpy = np.zeros((seeds, questions))
    lumpy[:, :4] = 1.0
    lumpy += offsets
    assert even.mean(1) == pytest.approx(lumpy.mean(1))
    a, b = stats.contrast(even, np.zeros_like(even)), stats.contrast(lumpy, np.zeros_like(lumpy))
    assert (a.lo, a.hi) == pytest.approx((b.lo, b.hi))
    assert a.re_hi - a.re_lo == pytest.approx(a.hi - a.lo, rel=0.05)  # no question effect: the same width
    assert b.re_hi - b.re_lo > 2 * (b.hi - b.lo)


def test_bad_input_is_refused_naming_the_argument(stats):
    with pytest.raises(ValueError, match="^scores"):
        stats.accuracy(np.zeros(5))
    with pytest.raises(ValueError, match="^baseline"):
        stats.contrast(np.zeros((3, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="^scores"):
        stats.contrast([[0.5, float("nan")]], [[0.5, 0.5]])
    with pytest.raises(ValueError, match="^values"):
        stats.paired_t([])


def test_at_budget_interpolates_linearly_between_evaluations(stats):
    budgets = [0.0, 100.0, 300.0]
    scores = np.array([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert stats.at_budget(budgets, scores, 0.0).tolist() == [0.0, 1.0, 0.0]
    assert stats.at_budget(budgets, scores, 50.0).tolist() == [0.5, 1.0, 0.0]
    assert stats.at_budget(budgets, scores, 100.0).tolist() == [1.0, 1.0, 0.0]
    assert stats.at_budget(budgets, scores, 250.0) == pytest.approx([1.0, 0.25, 0.75])
    assert stats.at_budget(budgets, scores, 300.0).tolist() == [1.0, 0.0, 1.0]
    # the mean accuracy at x is the linear interpolation of the accuracy curve
    assert stats.at_budget(budgets, scores, 250.0).mean() == pytest.approx(np.interp(250.0, budgets,
                                                                                     scores.mean(1)))
    with pytest.raises(ValueError, match="^x:"):
        stats.at_budget(budgets, scores, 301.0)
    with pytest.raises(ValueError, match="^budgets:"):
        stats.at_budget([0.0, 0.0], scores[:2], 0.0)
