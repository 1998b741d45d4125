"""The Branching Score (docs/method.md, Eqs. 3-5) and the choice of branch points: the public face other
trainers call, built on the two ops it re-exports.

``token_stats`` and ``future_value`` each have one home in ``appo/ops/`` (public entry, the checks of its
arguments, the torch reference) with a Triton backend of the same file name in ``kernels/`` (installed as
``appo.kernels``). ``branching_score`` checks its arguments once, up front (the ops' own checks included),
then runs the ops' unchecked cores and the cheap per-token arithmetic on [B, T] tensors (z-scores,
candidates); ``select_branch_points`` picks the positions.

Alignment convention: every per-token tensor is [B, T] and ``logits[b, t]`` (or ``hidden[b, t]``) is the
distribution that token ``tokens[b, t]`` was sampled from. With a Hugging Face causal LM whose output at
position t predicts token t + 1, pass ``logits[:, :-1]`` with ``tokens[:, 1:]`` (a view: no copy is made).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from appo.ops._checks import check_float, resolve_impl
from appo.ops.future_value import (FUTURE_VALUE_CLIP, GAMMA, LOG_RATIO_SUM_BOUND, check_clip,
                                   check_finite_where, check_scan_args, future_value, omega)
from appo.ops.token_stats import TokenStats, check_token_stats_args, compute_token_stats, token_stats

__all__ = ["FUTURE_VALUE_CLIP", "GAMMA", "LOG_RATIO_SUM_BOUND", "NO_SHIFT_TOLERANCE", "BranchingScore",
           "TokenStats", "branching_score", "future_value", "no_shift_tolerance", "select_branch_points",
           "token_stats"]

# No shift: the largest |log pi_theta - log pi_old| over a rollout's generated tokens that rounding alone may
# produce between two forwards of the same weights, by the dtype the forward computes in (docs/method.md,
# section 4). Calibrated on SmolLM2-135M (tests/test_trainer_smollm2.py, "tolerance"): the same rollouts
# forwarded alone and inside a padded batch differ by at most 1.6e-5 in fp32, 0.012 in fp16 and 0.098 in bf16,
# while one AdamW step at lr 1e-6 moves a token of every rollout by at least 1.9e-2, 0.20 and 0.30.
NO_SHIFT_TOLERANCE = {torch.float32: 2.0 ** -12, torch.float16: 2.0 ** -5, torch.bfloat16: 2.0 ** -2}


@dataclass
class BranchingScore:
    """Result of :func:`branching_score`; every tensor is [B, T].

    score:        float32, BS = z(clip(Omega)) * z(H) on candidates, -inf elsewhere (docs/method.md, Eq. 5).
    entropy:      float32 token entropy H.
    logprobs:     float32 log pi_theta of the sampled token.
    future_value: float32 Omega = exp(clamp(s, -20, 20)), not clipped to [lo, hi].
    candidates:   bool, where ``score`` is finite.
    entropy_only: bool [B], rows that show no policy shift: their largest |log pi_theta - log pi_old|
                  over the mask is within the no-shift tolerance (``no_shift_tolerance``; e.g. pi_theta ==
                  pi_old on the first mini-batch, or only rounding noise between two forwards), or their
                  clipped Omega is constant over the mask. Their score is z(H) alone, the documented fallback.
    """

    score: torch.Tensor
    entropy: torch.Tensor
    logprobs: torch.Tensor
    future_value: torch.Tensor
    candidates: torch.Tensor
    entropy_only: torch.Tensor


# ------------------------------------------------------------------------------------- branching score
def no_shift_tolerance(dtype: torch.dtype) -> float:
    """The no-shift tolerance of a forward computed in ``dtype`` (``NO_SHIFT_TOLERANCE``): a rollout whose
    largest |log pi_theta - log pi_old| over its generated tokens is at most this shows no policy shift, only
    rounding noise, and its Branching Score falls back to entropy alone. fp32 2^-12, fp16 2^-5, bf16 2^-2."""
    if dtype not in NO_SHIFT_TOLERANCE:
        raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {dtype}")
    return NO_SHIFT_TOLERANCE[dtype]


def _masked_zscore(x: torch.Tensor, mask: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row z-score over masked positions (population std). Returns (z [B, T], std [B])."""
    m = mask.to(x.dtype)
    count = m.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (x * m).sum(dim=1, keepdim=True) / count
    centered = (x - mean) * m
    std = ((centered * centered).sum(dim=1, keepdim=True) / count).sqrt()
    return (x - mean) / (std + eps), std.squeeze(1)


def _last_true_position(mask: torch.Tensor) -> torch.Tensor:
    """int64 [B]: index of the last True in each row (-1 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(dim=1)


def branching_score(*, tokens: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                    logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    entropy: torch.Tensor | None = None, logprobs: torch.Tensor | None = None,
                    gamma: float = GAMMA, clip: tuple[float, float] = FUTURE_VALUE_CLIP,
                    candidates: str = "strict", temperature: float = 1.0, eps: float = 1e-6,
                    shift_tolerance: float | None = None, impl: str = "auto") -> BranchingScore:
    """The Branching Score of docs/method.md, Eq. 5, for every token of B rollouts.

    BS_{n,i} = Z(clip(Omega_{n,i}, lo, hi)) * Z(H_{n,i}), with Z the population z-score over the masked
    tokens of the same rollout (+ ``eps`` in the denominator). Inputs (all [B, T] unless stated):
      tokens int, old_logprobs (log pi_old of each token, fp32/bf16/fp16), mask (bool or numeric, 1 = model
      generated), and ONE source of the current policy's statistics:
        logits [B, T, V] | hidden [B, T, H] + weight [V, H] (+ bias [V]) | entropy + logprobs [B, T].
    ``candidates``: "strict" (default) keeps tokens with z(Omega) > 0 and z(H) > 0; "all" keeps every masked
    token. Non-candidates, positions outside the mask and each row's last generated token get -inf.
    Rows with no policy shift are scored by z(H) alone (``entropy_only`` says which; under "strict" they keep
    tokens with z(H) > 0): rows whose largest |log pi_theta - log pi_old| over the mask is at most
    ``shift_tolerance`` (rounding noise between two forwards must not drive the z-score of Omega, which would
    turn it into a full-size signal), and rows whose clipped Omega is constant (every ratio below ``lo``).
    ``shift_tolerance`` None: ``no_shift_tolerance`` of the dtype the statistics were computed in (logits' or
    hidden's; with entropy=/logprobs=, the logprobs' dtype, so fp32 unless given in half precision): pass
    the tolerance of your forward's dtype when the log-probs were computed under autocast. 0: exact equality.
    Every argument is checked before the pass over the logits; ValueError when the mask selects no token.
    """
    if candidates not in ("strict", "all"):
        raise ValueError(f"candidates: expected 'strict' or 'all', got {candidates!r}")
    lo, hi = check_clip(clip)
    eps = float(eps)
    if not eps > 0:
        raise ValueError(f"eps: must be positive, got {eps}")
    if shift_tolerance is not None and not float(shift_tolerance) >= 0:
        raise ValueError(f"shift_tolerance: must be >= 0 (or None: from the dtype), got {shift_tolerance}")
    given_stats = entropy is not None or logprobs is not None
    sources = int(logits is not None) + int(hidden is not None or weight is not None) + int(given_stats)
    if sources != 1:
        raise ValueError("logits: pass exactly one of logits=, hidden=+weight=, or entropy=+logprobs=")
    if given_stats:
        if entropy is None or logprobs is None:
            raise ValueError("entropy: pass entropy= and logprobs= together")
        check_float("entropy", entropy)
        check_float("logprobs", logprobs)
        if entropy.shape != logprobs.shape or entropy.dim() != 2:
            raise ValueError(f"entropy: expected [B, T] matching logprobs {tuple(logprobs.shape)}, "
                             f"got {tuple(entropy.shape)}")
        if tokens is None or tokens.shape != logprobs.shape:
            raise ValueError(f"tokens: expected shape {tuple(logprobs.shape)}, got "
                             f"{None if tokens is None else tuple(tokens.shape)}")
        computed_in, backend = logprobs.dtype, resolve_impl(impl, logprobs.device)
        mask, gamma = check_scan_args(old_logprobs, mask, gamma, logprobs, "logprobs")
        check_finite_where(mask, logprobs=logprobs)
    else:
        call = check_token_stats_args(logits, tokens, hidden, weight, bias, temperature, impl)
        if call.tokens.dim() != 2:
            raise ValueError(f"tokens: expected shape [B, T], got {tuple(call.tokens.shape)}")
        computed_in, backend = (logits if logits is not None else hidden).dtype, call.backend
        mask, gamma = check_scan_args(old_logprobs, mask, gamma, call.tokens, "tokens")
    if not mask.any():
        raise ValueError("mask: selects no token (no model-generated token to score)")

    stats = TokenStats(logprobs, entropy) if given_stats else compute_token_stats(call)
    stats = TokenStats(stats.logprobs.detach().float(), stats.entropy.detach().float())
    future = omega(stats.logprobs, old_logprobs, mask, gamma, backend)
    # The [B, T] arithmetic below runs in float64: z-scores divide by a std that can be small (Omega is
    # clipped to [1.0, 1.2]), and fp64 keeps the score within 1e-5 of exact at negligible cost.
    clipped = future.double().clamp(lo, hi)
    z_entropy, _ = _masked_zscore(stats.entropy.double(), mask, eps)
    z_omega, _ = _masked_zscore(clipped, mask, eps)
    spread = torch.where(mask, clipped, -torch.inf).amax(1) - torch.where(mask, clipped, torch.inf).amin(1)
    tolerance = no_shift_tolerance(computed_in) if shift_tolerance is None else float(shift_tolerance)
    log_ratio = (stats.logprobs.double() - old_logprobs.detach().double()).abs()
    largest_shift = torch.where(mask, log_ratio, 0.0).amax(1)
    entropy_only = mask.any(dim=1) & ((spread == 0) | (largest_shift <= tolerance))

    product = torch.where(entropy_only[:, None], z_entropy, z_omega * z_entropy)
    keep = mask.clone()
    if candidates == "strict":
        keep &= (z_entropy > 0) & (entropy_only[:, None] | (z_omega > 0))
    last = _last_true_position(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    has_tokens = last >= 0
    keep[rows[has_tokens], last[has_tokens]] = False
    score = torch.where(keep, product, -torch.inf).float()
    return BranchingScore(score=score, entropy=stats.entropy, logprobs=stats.logprobs, future_value=future,
                          candidates=keep, entropy_only=entropy_only)


# -------------------------------------------------------------------------------- select_branch_points
def select_branch_points(score: torch.Tensor, k: int, *, group_ids: torch.Tensor | None = None,
                         per: str = "rollout", min_gap: int = 0,
                         allow_fewer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose branch points from a [B, T] score (-inf = not a candidate), deterministically.

    per="rollout": the top-``k`` positions of each row. per="group": the top ``k * n_g`` positions pooled over
    the n_g rows of each group (``group_ids`` int [B] required), as the authors' code does. ``min_gap``:
    chosen positions of one row are at least this far apart (greedy by score). Ties break toward the earlier
    row and position. Returns (rollout_idx int64 [K], position int64 [K]) sorted by row then position.
    When a row (or group) has fewer than the asked-for candidates: ValueError naming ``k``, unless
    ``allow_fewer`` (a training loop's choice), which returns what there is.
    """
    if not isinstance(score, torch.Tensor) or score.dim() != 2 or not score.dtype.is_floating_point:
        raise ValueError("score: expected a floating [B, T] tensor")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k: expected a non-negative int, got {k!r}")
    if isinstance(min_gap, bool) or not isinstance(min_gap, int) or min_gap < 0:
        raise ValueError(f"min_gap: expected a non-negative int, got {min_gap!r}")
    if torch.isnan(score).any() or torch.isposinf(score).any():
        raise ValueError("score: contains NaN or +inf")
    if per not in ("rollout", "group"):
        raise ValueError(f"per: expected 'rollout' or 'group', got {per!r}")
    num_rows = score.shape[0]
    if per == "group":
        if group_ids is None or group_ids.shape != (num_rows,):
            raise ValueError(f"group_ids: per='group' needs an int tensor of shape [{num_rows}]")
        ids = group_ids.cpu()
        groups = [torch.nonzero(ids == g).flatten().tolist() for g in torch.unique(ids)]
    else:
        groups = [[r] for r in range(num_rows)]

    flat_scores = score.detach().float().cpu()
    chosen: list[tuple[int, int]] = []
    for rows in groups:
        want = k * len(rows)
        picked = _pick(flat_scores, rows, want, min_gap)
        if len(picked) < want and not allow_fewer:
            where = f"row {rows[0]}" if per == "rollout" else f"group of rows {rows}"
            raise ValueError(f"k: asked for {want} branch points in {where} but only {len(picked)} "
                             "candidates qualify (pass allow_fewer=True to accept fewer)")
        chosen.extend(picked)
    chosen.sort()
    device = score.device
    if not chosen:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    idx = torch.tensor(chosen, dtype=torch.long, device=device)
    return idx[:, 0].contiguous(), idx[:, 1].contiguous()


def _pick(scores: torch.Tensor, rows: list[int], want: int, min_gap: int) -> list[tuple[int, int]]:
    """Greedy top-``want`` over the given rows, respecting ``min_gap`` within a row."""
    if want == 0:
        return []
    block = scores[rows]                                   # [n, T]
    finite = torch.isfinite(block)
    row_of = torch.arange(len(rows)).unsqueeze(1).expand_as(block)[finite]
    pos_of = torch.arange(block.shape[1]).unsqueeze(0).expand_as(block)[finite]
    values = block[finite]
    # stable sort on -value keeps (row, position) order among ties: deterministic
    order = torch.sort(-values, stable=True).indices
    picked: list[tuple[int, int]] = []
    taken: dict[int, list[int]] = {}
    for j in order.tolist():
        r, p = rows[int(row_of[j])], int(pos_of[j])
        if min_gap and any(abs(p - q) < min_gap for q in taken.get(r, ())):
            continue
        picked.append((r, p))
        taken.setdefault(r, []).append(p)
        if len(picked) == want:
            break
    return picked
