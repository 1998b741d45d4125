"""The online softmax statistics that both token-statistics kernels fold logits into (``token_stats``,
``linear_token_stats``): shared ``@triton.jit`` helpers and the constants around them.

For the logits z of one row and scale = log2(e) / temperature, the running values are
    m = max z,   s = sum 2^((z - m) scale),   t = sum 2^((z - m) scale) (z - m)
(base 2, (z - m) taken before the scale: exact for nearby values, nothing rounds at the logits' magnitude),
and the statistics follow as  log p(a) = (z_a - m) / T - ln s,   entropy = ln s - (t / s) / T.

Finite support: a -inf logit (a masked vocabulary entry) has probability 0 and adds nothing to s or t. Its
z - m is clamped to ``lowest_shift(scale)``, finite, whose 2^(lowest scale) is 0 too, so that 0 * (-inf)
never makes a NaN; while a row has seen only -inf, its shift reference is 0 and m = -inf, s = 0. NaN stays
NaN (the clamp propagates it), so NaN or +inf logits give a NaN entropy, which ``appo.token_stats`` reports.
"""

import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
LN_2 = tl.constexpr(0.6931471805599453)
FLT_MAX = 3.4028234663852886e38


def lowest_shift(scale: float) -> float:
    """The clamp of z - m, in logit units: lowest * scale >= -FLT_MAX / 2 stays finite (numpy's interpreter
    warns on overflow) while 2^(lowest * scale) is exactly 0."""
    return -0.5 * FLT_MAX / max(1.0, scale)


@triton.jit
def fold(z, m, s, t, scale, lowest, AXIS: tl.constexpr):
    """Fold a block of logits z (fp32, -inf allowed) into the running (m, s, t) along AXIS, the last axis
    of z; m, s, t have z's shape without AXIS. Returns the new (m, s, t)."""
    m_new = tl.maximum(m, tl.max(z, axis=AXIS))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # 0 while every value seen is -inf
    # -inf (and any shift below lowest) becomes lowest, whose 2^(lowest * scale) is 0: e * shift = 0
    shift = tl.maximum(z - tl.expand_dims(ref, AXIS), lowest, propagate_nan=tl.PropagateNan.ALL)
    e = tl.exp2(shift * scale)
    # Rebase the old sums from m to ref >= m (alpha = 2^((m - ref) scale) <= 1): s <- alpha s,
    # t <- alpha (t + (m - ref) s). Every term of t and of (m - ref) s is <= 0, so nothing cancels and
    # entropy = ln s - (t / s) / T adds two non-negative numbers; the guard keeps (-inf) * 0 out while s = 0.
    alpha = tl.exp2((m - ref) * scale)
    t = alpha * (t + tl.where(s > 0.0, m - ref, 0.0) * s) + tl.sum(e * shift, axis=AXIS)
    s = alpha * s + tl.sum(e, axis=AXIS)
    return m_new, s, t


@triton.jit
def merge(m, s, t, scale, AXIS: tl.constexpr):
    """Combine running values (m, s, t) held along AXIS (e.g. one per thread) into one set without AXIS,
    rebased to the largest m as ``fold`` rebases."""
    m_all = tl.max(m, axis=AXIS)
    ref = tl.expand_dims(tl.where(m_all == float("-inf"), 0.0, m_all), AXIS)
    alpha = tl.exp2((m - ref) * scale)
    t_all = tl.sum(alpha * (t + tl.where(s > 0.0, m - ref, 0.0) * s), axis=AXIS)
    s_all = tl.sum(alpha * s, axis=AXIS)
    return m_all, s_all, t_all
