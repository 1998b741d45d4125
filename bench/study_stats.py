"""Statistics of the learning study (bench/study.py): paired contrasts over seeds, a check, a power figure.

The data of one arm at one budget is a matrix ``scores[seed, question]`` of per-question scores in [0, 1] (the
correctness of one sampled answer, or an interpolation between two evaluations, see ``at_budget``). Every arm
is evaluated on the same held-out questions, and within one seed with the same prompts and sampling seed, so
two arms are compared seed by seed.

- **Primary: the per-seed paired t-interval** (``paired_t``). Each seed gives one difference d_s (arm A's mean
  over the questions minus arm B's); the interval is mean(d) +/- t_{0.975, S-1} * sd(d) / sqrt(S), with its
  two-sided p-value. It treats the question set as fixed and the training runs (seeds) as the random part:
  the seeds are what varies most between repetitions of the study, and with S seeds there are S - 1 degrees of
  freedom, however many questions there are.
- **Check: a crossed seeds x questions random-effects interval** (``crossed_interval``). The cell differences
  D[s, q] = mu + a_s + b_q + e_sq, with seed, question and residual variances estimated from the two-way
  ANOVA mean squares (method of moments, each variance floored at 0); Var(mean D) = s_a^2 / S + s_b^2 / Q +
  s_e^2 / (S Q), with Satterthwaite's degrees of freedom. It also counts the questions as a sample, so it is
  the wider of the two when the arms differ question by question.
- **Minimum detectable difference** (``mdd``): the true mean difference the paired t-test (two-sided 5%)
  would detect with 80% power given the observed spread of the d_s and S seeds (noncentral t). A contrast
  whose MDD is 15 points cannot tell a 5-point effect from no effect, whatever its p.

tests/test_study_stats.py shows by simulation (a seed-level random effect, known truth) that the paired
t-interval and the crossed interval cover the truth at least 93% of the time, and that an interval that
pools every seed x question cell as independent (ignoring the seeds) does not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy import optimize
from scipy import stats as sps

LEVEL = 0.95
POWER = 0.80


@dataclass(frozen=True)
class Contrast:
    """A mean difference (or a mean) over S seeds with its 95% t-interval [lo, hi], two-sided p-value of
    "mean = 0", the minimum detectable difference at 80% power (``mdd``), the sd of the per-seed values and
    the crossed random-effects interval [re_lo, re_hi] (NaN where it does not apply). With one seed, every
    interval, p and mdd are NaN."""

    mean: float
    lo: float
    hi: float
    p: float
    mdd: float
    sd: float
    seeds: int
    re_lo: float = float("nan")
    re_hi: float = float("nan")

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def as_dict(self) -> dict:
        return asdict(self)


def _matrix(scores, name: str) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"{name}: expected a non-empty [seeds, questions] matrix, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: scores must be finite")
    return array


@lru_cache(maxsize=256)
def _t_quantile(q: float, df: float) -> float:
    return float(sps.t.ppf(q, df))


def mdd(sd: float, seeds: int, level: float = LEVEL, power: float = POWER) -> float:
    """The smallest true mean difference a two-sided one-sample t-test at ``1 - level`` detects with
    probability ``power``, for per-seed values with standard deviation ``sd`` and ``seeds`` of them (the
    noncentral t distribution with S - 1 degrees of freedom, solved exactly). NaN for fewer than 2 seeds; 0
    when sd is 0."""
    if seeds < 2 or not np.isfinite(sd):
        return float("nan")
    return max(float(sd), 0.0) * _mdd_per_sd(seeds, level, power)


@lru_cache(maxsize=256)
def _mdd_per_sd(seeds: int, level: float, power: float) -> float:
    """``mdd`` for sd = 1 (the MDD is proportional to sd)."""
    df, crit = seeds - 1, _t_quantile(0.5 + level / 2, seeds - 1)

    def shortfall(delta: float) -> float:
        nc = delta * np.sqrt(seeds)
        lower = np.nan_to_num(sps.nct.cdf(-crit, df, nc))  # below 1e-30 where scipy's tail turns NaN
        return float(sps.nct.sf(crit, df, nc) + lower) - power

    high = 2 * (crit + _t_quantile(power, df)) / np.sqrt(seeds)  # power(high) is well above ``power``
    return float(optimize.brentq(shortfall, 0.0, high, xtol=1e-12))


def paired_t(values, level: float = LEVEL) -> Contrast:
    """The t-interval, p-value and MDD of the mean of ``values`` [S] (one number per seed: a paired
    difference, or one arm's accuracy), with S - 1 degrees of freedom."""
    d = np.asarray(values, dtype=np.float64)
    if d.ndim != 1 or d.size == 0 or not np.isfinite(d).all():
        raise ValueError(f"values: expected a non-empty finite [seeds] vector, got shape {d.shape}")
    s, mean = d.size, float(d.mean())
    if s < 2:
        nan = float("nan")
        return Contrast(mean, nan, nan, nan, nan, nan, s)
    sd = float(d.std(ddof=1))
    se = sd / np.sqrt(s)
    half = _t_quantile(0.5 + level / 2, s - 1) * se
    if se > 0:
        p = float(2 * sps.t.sf(abs(mean) / se, s - 1))
    else:
        p = 1.0 if mean == 0 else 0.0
    return Contrast(mean, float(mean - half), float(mean + half), p, mdd(sd, s, level), sd, s)


def crossed_interval(diff, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, lo, hi): the interval of the mean of ``diff`` [S, Q] with seeds and questions both random
    (crossed two-way random effects, no replication; the module docstring has the estimator). Needs S >= 2
    and Q >= 2; returns NaN bounds otherwise."""
    d = _matrix(diff, "diff")
    s, q = d.shape
    mean = float(d.mean())
    if s < 2 or q < 2:
        return mean, float("nan"), float("nan")
    seed_means, question_means = d.mean(1), d.mean(0)
    ms_seed = q * float(((seed_means - mean) ** 2).sum()) / (s - 1)
    ms_question = s * float(((question_means - mean) ** 2).sum()) / (q - 1)
    residual = d - seed_means[:, None] - question_means[None, :] + mean
    ms_error = float((residual ** 2).sum()) / ((s - 1) * (q - 1))
    # Var(mean) * S * Q as a combination of mean squares: s_a^2 = (MS_s - MS_e) / Q,
    # s_b^2 = (MS_q - MS_e) / S, s_e^2 = MS_e, each floored at 0 (a floored component drops its mean squares
    # from the combination).
    mean_squares = {"seed": (ms_seed, s - 1), "question": (ms_question, q - 1),
                    "error": (ms_error, (s - 1) * (q - 1))}
    weights = {"seed": 0.0, "question": 0.0, "error": 1.0}
    for name in ("seed", "question"):
        if mean_squares[name][0] > ms_error:
            weights[name] += 1.0
            weights["error"] -= 1.0
    combined = sum(w * mean_squares[k][0] for k, w in weights.items())
    if combined <= 0:
        return mean, mean, mean
    df_eff = combined ** 2 / sum((w * ms) ** 2 / df for k, w in weights.items() if w
                                 for ms, df in [mean_squares[k]])
    half = _t_quantile(0.5 + level / 2, df_eff) * np.sqrt(combined / (s * q))
    return mean, float(mean - half), float(mean + half)


def contrast(scores, baseline, level: float = LEVEL) -> Contrast:
    """``scores`` minus ``baseline`` (both [S, Q]; row s of both from the same seed, column q the same
    question): the per-seed paired t-interval (primary) with p and MDD, and the crossed random-effects
    interval as ``re_lo`` / ``re_hi``."""
    scores, baseline = _matrix(scores, "scores"), _matrix(baseline, "baseline")
    if scores.shape != baseline.shape:
        raise ValueError(f"baseline: shape {baseline.shape} differs from scores' {scores.shape} (pair the "
                         "same seeds and questions)")
    diff = scores - baseline
    primary = paired_t(diff.mean(1), level)
    _, re_lo, re_hi = crossed_interval(diff, level)
    return Contrast(**{**primary.as_dict(), "re_lo": re_lo, "re_hi": re_hi})


def accuracy(scores, level: float = LEVEL) -> Contrast:
    """One arm's mean accuracy over ``scores`` [S, Q] with the t-interval over its S seed means."""
    return paired_t(_matrix(scores, "scores").mean(1), level)


def at_budget(budgets, scores, x: float) -> np.ndarray:
    """Per-question scores of one run at budget ``x`` (trajectories, optimised sequences, generated tokens or
    seconds), linearly interpolated between its two evaluations around ``x``: ``budgets`` [K] increasing (0
    for the start model), ``scores`` [K, Q]. An ``x`` beyond the last evaluation is refused (no
    extrapolation): pick ``x`` no larger than every run's last budget. Returns float64 [Q]."""
    budgets = np.asarray(budgets, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if budgets.ndim != 1 or scores.ndim != 2 or len(budgets) != len(scores) or len(budgets) == 0:
        raise ValueError(f"budgets, scores: expected [K] and [K, Q], got {budgets.shape} and {scores.shape}")
    if np.any(np.diff(budgets) <= 0):
        raise ValueError(f"budgets: must increase, got {budgets.tolist()}")
    if not budgets[0] <= x <= budgets[-1]:
        raise ValueError(f"x: {x} lies outside the evaluated budgets [{budgets[0]}, {budgets[-1]}]")
    k = min(int(np.searchsorted(budgets, x, side="right")), len(budgets) - 1)
    if k == 0 or budgets[k - 1] == x:
        return scores[max(k - 1, 0)].copy()
    share = (x - budgets[k - 1]) / (budgets[k] - budgets[k - 1])
    return (1 - share) * scores[k - 1] + share * scores[k]
