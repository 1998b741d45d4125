"""Statistics of the learning study (bench/study.py): held-out accuracy with 95% intervals.

The data of one quantity is a matrix ``scores[seed, question]`` of per-question scores in [0, 1] (the
correctness of one sampled answer, or an interpolation between two evaluations, see ``at_time``); every
algorithm is evaluated on the same questions, and within one seed with the same sampling seed.

Method (named in the README and in docs/study.md): a two-way percentile bootstrap. Each of ``draws``
resamples draws the seeds with replacement and, independently, the questions with replacement, and takes the
mean over the resampled grid; the interval is the 2.5th and 97.5th percentile of those means. A resample is a
pair of multiplicity vectors (``weights``), so the mean of draw b is ``w_seed[b] @ scores @ w_question[b] /
(S * Q)``: no grid is materialised. A paired difference (an algorithm minus GRPO, or a trained model minus the
start) uses the same resampled seeds and questions for both sides, so what the two share (hard questions, an
unlucky seed) cancels. The generator is seeded, so a report is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DRAWS = 10_000


@dataclass(frozen=True)
class Interval:
    """A mean and its 95% bootstrap interval [lo, hi]."""

    mean: float
    lo: float
    hi: float

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def as_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi}


def _matrix(scores, name: str) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"{name}: expected a non-empty [seeds, questions] matrix, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: scores must be finite")
    return array


def weights(seeds: int, questions: int, draws: int = DRAWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Multiplicities of ``draws`` bootstrap resamples: (w_seed [draws, seeds], w_question [draws, questions]),
    float64, each row summing to seeds (questions). Fixed ``seed``: the same resamples for every quantity of a
    report, which is what makes differences paired."""
    if seeds < 1 or questions < 1 or draws < 1:
        raise ValueError(f"seeds, questions, draws: must be >= 1, got {seeds}, {questions}, {draws}")
    rng = np.random.default_rng(seed)
    w_seed = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=draws).astype(np.float64)
    w_question = rng.multinomial(questions, np.full(questions, 1 / questions), size=draws).astype(np.float64)
    return w_seed, w_question


def resampled_means(scores, w: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The mean of ``scores`` [S, Q] under each resample of ``w`` (``weights(S, Q, ...)``): float64 [draws]."""
    scores = _matrix(scores, "scores")
    w_seed, w_question = w
    if w_seed.shape[1:] != scores.shape[:1] or w_question.shape[1:] != scores.shape[1:]:
        raise ValueError(f"w: resamples of {w_seed.shape[1]} seeds x {w_question.shape[1]} questions do not "
                         f"fit scores of shape {scores.shape}")
    return np.einsum("bs,sq,bq->b", w_seed, scores, w_question) / scores.size


def interval(scores, w: tuple[np.ndarray, np.ndarray] | None = None) -> Interval:
    """Mean of ``scores`` [S, Q] with its 95% two-way bootstrap interval (``w``: resamples to use, default
    ``weights(S, Q)``)."""
    scores = _matrix(scores, "scores")
    w = weights(*scores.shape) if w is None else w
    lo, hi = np.percentile(resampled_means(scores, w), [2.5, 97.5])
    return Interval(float(scores.mean()), float(lo), float(hi))


def paired_difference(scores, baseline, w: tuple[np.ndarray, np.ndarray] | None = None) -> Interval:
    """``scores`` minus ``baseline`` (both [S, Q], row s of both from the same seed, column q the same
    question): mean difference and its 95% interval over resamples shared by both sides."""
    scores, baseline = _matrix(scores, "scores"), _matrix(baseline, "baseline")
    if scores.shape != baseline.shape:
        raise ValueError(f"baseline: shape {baseline.shape} differs from scores' {scores.shape} (pair the same "
                         "seeds and questions)")
    return interval(scores - baseline, w)


def at_time(times, scores, t: float) -> np.ndarray:
    """Per-question scores of one run at training wall time ``t``, linearly interpolated between its two
    evaluations around ``t``: ``times`` [K] increasing seconds of training (0 for the start model),
    ``scores`` [K, Q]. A ``t`` beyond the last evaluation is refused (no extrapolation): pick ``t`` no larger
    than every run's last time. Returns float64 [Q]."""
    times = np.asarray(times, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if times.ndim != 1 or scores.ndim != 2 or len(times) != len(scores) or len(times) == 0:
        raise ValueError(f"times, scores: expected [K] and [K, Q], got {times.shape} and {scores.shape}")
    if np.any(np.diff(times) <= 0):
        raise ValueError(f"times: must increase, got {times.tolist()}")
    if not times[0] <= t <= times[-1]:
        raise ValueError(f"t: {t} lies outside the evaluated times [{times[0]}, {times[-1]}]")
    k = min(int(np.searchsorted(times, t, side="right")), len(times) - 1)
    if times[k - 1] == t or k == 0:
        return scores[max(k - 1, 0)].copy()
    share = (t - times[k - 1]) / (times[k] - times[k - 1])
    return (1 - share) * scores[k - 1] + share * scores[k]
