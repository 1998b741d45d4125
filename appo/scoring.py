"""The scoring core: token statistics, future value and the Branching Score (METHOD.md Eqs. 3-5).

This module is the public face other trainers call. It validates inputs once, picks a backend
(``impl="triton"`` kernels in ``appo.kernels``, ``impl="torch"`` references in ``appo.ops``) and does the
cheap per-token arithmetic on [B, T] tensors itself (z-scores, candidates, selection).

Alignment convention: every per-token tensor is [B, T] and ``logits[b, t]`` (or ``hidden[b, t]``) is the
distribution that token ``tokens[b, t]`` was sampled from. With a Hugging Face causal LM whose output at
position t predicts token t + 1, pass ``logits[:, :-1]`` with ``tokens[:, 1:]`` (a view: no copy is made).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

GAMMA = 2.0 ** (-1.0 / 32.0)
FUTURE_VALUE_CLIP = (1.0, 1.2)
LOG_RATIO_SUM_BOUND = 20.0  # s is clamped to [-20, 20] before exp, so Omega is always finite
# No shift: the largest |log pi_theta - log pi_old| over a rollout's generated tokens that rounding alone may
# produce between two forwards of the same weights, by the dtype the forward computes in (docs/method.md,
# section 4). Calibrated on SmolLM2-135M (tests/test_trainer_smollm2.py, "tolerance"): the same rollouts
# forwarded alone and inside a padded batch differ by at most 1.6e-5 in fp32, 0.012 in fp16 and 0.098 in bf16,
# while one AdamW step at lr 1e-6 moves a token of every rollout by at least 1.9e-2, 0.20 and 0.30.
NO_SHIFT_TOLERANCE = {torch.float32: 2.0 ** -12, torch.float16: 2.0 ** -5, torch.bfloat16: 2.0 ** -2}

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_IMPLS = ("auto", "triton", "torch")


class TokenStats(NamedTuple):
    """Per-token statistics of softmax(z / temperature), both fp32 with the token shape [..., T].

    logprobs: log p of the sampled token (differentiable on the hidden/weight path).
    entropy:  full-vocabulary entropy -sum_j p_j log p_j (always detached).
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor


@dataclass
class BranchingScore:
    """Result of :func:`branching_score`; every tensor is [B, T].

    score:        float32, BS = z(clip(Omega)) * z(H) on candidates, -inf elsewhere (METHOD.md Eq. 5).
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


# ----------------------------------------------------------------------------------------------- helpers
def _check_impl(impl: str, device: torch.device) -> str:
    """Resolve "auto" and refuse an explicit backend that cannot run here (RuntimeError naming impl)."""
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {_IMPLS}, got {impl!r}")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if impl == "triton":
        if not _triton_available():
            raise RuntimeError("impl='triton': the triton package is not installed (pip install triton)")
        if device.type != "cuda" and not (interpreted and device.type == "cpu"):
            raise RuntimeError(
                f"impl='triton' needs CUDA tensors (got device {device}); use impl='torch' or 'auto', "
                "or set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU interpreter")
    return impl


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: expected dtype float32, bfloat16 or float16, got {t.dtype}")


def _check_tokens(tokens: torch.Tensor, expected_shape: torch.Size, vocab: int, ref_name: str, *,
                  check_range: bool = True) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"tokens: expected a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens: expected an integer dtype, got {tokens.dtype}")
    if tokens.shape != expected_shape:
        raise ValueError(f"tokens: shape {tuple(tokens.shape)} does not match {ref_name} "
                         f"{tuple(expected_shape)} (one token per row of {ref_name})")
    if check_range and tokens.numel() > 0:  # min/max: a device sync, so done once per call
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"tokens: ids must lie in [0, {vocab}) (the vocabulary size), "
                             f"got range [{lo}, {hi}]")
    return tokens.long()


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not (temperature > 0.0 and temperature != float("inf")):
        raise ValueError(f"temperature: must be a positive finite number, got {temperature}")
    return temperature


def _check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name}: on device {dev}, but {first_name} is on {first}")
    return first


def _row_views(x: torch.Tensor) -> list[tuple[tuple, torch.Tensor]]:
    """Split [..., T, V] into 2-D row blocks without copying: one [N, V] view when the leading dims merge,
    else one [T, V] view per leading index. The vocabulary dim must have stride 1 (copied if not)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return [((), x.view(-1, x.shape[-1]))]
    except RuntimeError:
        leading = x.shape[:-2]
        return [(idx, x[idx]) for idx in _ndindex(leading)]


def _ndindex(shape: torch.Size):
    if len(shape) == 0:
        yield ()
        return
    for i in range(shape[0]):
        for rest in _ndindex(shape[1:]):
            yield (i,) + rest


# ----------------------------------------------------------------------------------------- token_stats
def token_stats(logits: torch.Tensor | None = None, tokens: torch.Tensor | None = None, *,
                hidden: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, temperature: float = 1.0, impl: str = "auto") -> TokenStats:
    """Log-probability of the sampled token and full-vocabulary entropy of softmax(z / temperature).

    Two input forms:
      * ``token_stats(logits, tokens)``: logits [..., T, V] fp32/bf16/fp16 (rows may be strided; the
        vocabulary dim contiguous), tokens int [..., T]. One pass over each logit.
      * ``token_stats(hidden=h, weight=W, tokens=t, bias=None)``: hidden [..., T, H], LM-head weight [V, H],
        bias [V]; z = h W^T + b is never materialised as [T, V]. ``logprobs`` is differentiable w.r.t.
        hidden, weight and bias (use it in a loss); ``entropy`` is detached.

    Returns TokenStats(logprobs, entropy), both float32 [..., T]. ``impl`` is "auto" (Triton on CUDA, torch
    elsewhere), "triton" or "torch". -inf logits (a masked vocabulary) are allowed: the entropy is over each
    row's finite support. NaN or +inf logits, a row with no finite logit, and a sampled token whose logit is
    -inf raise ValueError (detected from the outputs, so no extra pass over the logits).
    """
    temperature = _check_temperature(temperature)
    if logits is not None:
        if hidden is not None or weight is not None or bias is not None:
            raise ValueError("logits: pass either logits or hidden+weight(+bias), not both")
        return _token_stats_from_logits(logits, tokens, temperature, impl)
    if hidden is None or weight is None:
        raise ValueError("logits: pass logits=[..., T, V], or hidden=[..., T, H] together with weight=[V, H]")
    return _token_stats_from_hidden(hidden, weight, bias, tokens, temperature, impl)


def _token_stats_from_logits(logits, tokens, temperature, impl) -> TokenStats:
    _check_float("logits", logits)
    if logits.dim() < 2:
        raise ValueError(f"logits: expected shape [..., T, V] with at least 2 dims, "
                         f"got {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("logits: the vocabulary dimension is empty")
    if tokens is None:
        raise ValueError("tokens: required (the sampled token at each position)")
    _check_same_device(logits=logits, tokens=tokens)
    tokens = _check_tokens(tokens, logits.shape[:-1], logits.shape[-1], "logits.shape[:-1]")
    backend = _check_impl(impl, logits.device)
    if backend == "triton":
        from appo.kernels.token_stats import token_stats_triton as rows_fn
    else:
        from appo.ops.token_stats import token_stats_torch as rows_fn

    logits = logits.detach()
    logprobs = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logprobs)
    if logits.numel() > 0:
        for idx, rows in _row_views(logits):
            lp, ent = rows_fn(rows, tokens[idx].reshape(-1), temperature)
            logprobs[idx] = lp.view(logprobs[idx].shape)
            entropy[idx] = ent.view(entropy[idx].shape)
    _check_finite_outputs(logprobs, entropy, "logits")
    return TokenStats(logprobs, entropy)


def _token_stats_from_hidden(hidden, weight, bias, tokens, temperature, impl) -> TokenStats:
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if hidden.dim() < 2:
        raise ValueError(f"hidden: expected shape [..., T, H] with at least 2 dims, "
                         f"got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: expected shape [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if tokens is None:
        raise ValueError("tokens: required (the sampled token at each position)")
    _check_same_device(hidden=hidden, weight=weight, bias=bias, tokens=tokens)
    # The fused backends check the ids against V themselves (they are public on their own).
    tokens = _check_tokens(tokens, hidden.shape[:-1], weight.shape[0], "hidden.shape[:-1]", check_range=False)
    backend = _check_impl(impl, hidden.device)
    if backend == "triton":
        from appo.kernels.linear_token_stats import linear_token_stats_triton as rows_fn
    else:
        from appo.ops.linear_token_stats import linear_token_stats_torch as rows_fn

    rows = hidden.reshape(-1, hidden.shape[-1])
    logprobs, entropy = rows_fn(rows, weight, tokens.reshape(-1), bias, temperature)
    _check_finite_outputs(logprobs.detach(), entropy, "hidden")
    return TokenStats(logprobs.view(tokens.shape), entropy.detach().view(tokens.shape))


def _check_finite_outputs(logprobs: torch.Tensor, entropy: torch.Tensor, source: str) -> None:
    """Turn non-finite statistics into errors (no extra pass over the logits: the kernels propagate them).

    -inf logits are allowed (masked vocabulary entries have probability 0). The entropy is NaN when a row
    holds NaN or +inf, or no finite logit at all; the log-prob is -inf when the sampled token's logit is -inf.
    """
    bad_rows = ~torch.isfinite(entropy)
    if bad_rows.any():
        where = tuple(int(i) for i in bad_rows.nonzero()[0])
        raise ValueError(f"{source}: contains NaN or +inf, or a row whose logits are all -inf (first at "
                         f"position {where}): the token statistics came out non-finite")
    bad_tokens = ~torch.isfinite(logprobs)
    if bad_tokens.any():
        where = tuple(int(i) for i in bad_tokens.nonzero()[0])
        raise ValueError(f"tokens: the sampled token at position {where} has logit -inf (probability 0 under "
                         f"the given {source}), so its log-probability is -inf")


# ---------------------------------------------------------------------------------------- future value
def future_value(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, *,
                 gamma: float = GAMMA, clip: tuple[float, float] | None = None,
                 impl: str = "auto") -> torch.Tensor:
    """Future value Omega (METHOD.md Eq. 4), detached, float32 [B, T].

    d_k = (logprobs_k - old_logprobs_k) * mask_k;  s_i = sum_{k >= i} gamma^(k - i) d_k  (distance counts
    positions, masked ones included);  Omega_i = exp(clamp(s_i, -20, 20)), then clamped to ``clip`` = (lo, hi)
    when given (``clip=(1.0, 1.2)`` gives METHOD.md's A_fut). O(T) per row: a reverse scan, never a [T, T]
    matrix. logprobs/old_logprobs: [B, T] fp32/bf16/fp16; mask: [B, T] bool or numeric (nonzero = generated).
    """
    s = _log_ratio_sum(logprobs, old_logprobs, mask, gamma, impl)
    omega = torch.exp(s.clamp(-LOG_RATIO_SUM_BOUND, LOG_RATIO_SUM_BOUND))
    if clip is not None:
        lo, hi = _check_clip(clip)
        omega = omega.clamp(lo, hi)
    return omega


def _check_clip(clip) -> tuple[float, float]:
    try:
        lo, hi = (float(c) for c in clip)
    except (TypeError, ValueError):
        raise ValueError(f"clip: expected a pair (lo, hi), got {clip!r}") from None
    if not lo <= hi:
        raise ValueError(f"clip: lo must not exceed hi, got ({lo}, {hi})")
    return lo, hi


def _check_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match the per-token shape {tuple(shape)}")
    if mask.dtype.is_complex:
        raise ValueError(f"mask: expected a bool or real dtype, got {mask.dtype}")
    return mask if mask.dtype == torch.bool else mask != 0


def _log_ratio_sum(logprobs, old_logprobs, mask, gamma, impl) -> torch.Tensor:
    _check_float("logprobs", logprobs)
    _check_float("old_logprobs", old_logprobs)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs: expected shape [B, T], got {tuple(logprobs.shape)}")
    if old_logprobs.shape != logprobs.shape:
        raise ValueError(f"old_logprobs: shape {tuple(old_logprobs.shape)} does not match logprobs "
                         f"{tuple(logprobs.shape)}")
    mask = _check_mask(mask, logprobs.shape)
    _check_same_device(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask)
    gamma = float(gamma)
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma: must lie in (0, 1], got {gamma}")
    logprobs, old_logprobs = logprobs.detach(), old_logprobs.detach()
    for name, t in (("logprobs", logprobs), ("old_logprobs", old_logprobs)):
        if not torch.isfinite(t.masked_select(mask)).all():
            raise ValueError(f"{name}: contains NaN or Inf at masked-in positions")
    if logprobs.numel() == 0:
        return torch.zeros(logprobs.shape, dtype=torch.float32, device=logprobs.device)
    backend = _check_impl(impl, logprobs.device)
    if backend == "triton":
        from appo.kernels.future_value import discounted_log_ratio_sum_triton as scan
    else:
        from appo.ops.future_value import discounted_log_ratio_sum_torch as scan
    # Both scans give masked positions exactly 0, whatever they hold (e.g. -inf for tool results).
    return scan(logprobs, old_logprobs, mask, gamma)


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
    """The Branching Score of METHOD.md Eq. 5 for every token of B rollouts.

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
    Raises ValueError when the mask selects no token at all.
    """
    if candidates not in ("strict", "all"):
        raise ValueError(f"candidates: expected 'strict' or 'all', got {candidates!r}")
    lo, hi = _check_clip(clip)
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
        _check_float("entropy", entropy)
        _check_float("logprobs", logprobs)
        if entropy.shape != logprobs.shape or entropy.dim() != 2:
            raise ValueError(f"entropy: expected [B, T] matching logprobs {tuple(logprobs.shape)}, "
                             f"got {tuple(entropy.shape)}")
        if tokens is None or tokens.shape != logprobs.shape:
            raise ValueError(f"tokens: expected shape {tuple(logprobs.shape)}, got "
                             f"{None if tokens is None else tuple(tokens.shape)}")
        computed_in = logprobs.dtype
        stats = TokenStats(logprobs.detach().float(), entropy.detach().float())
    else:
        computed_in = (logits if logits is not None else hidden).dtype
        stats = token_stats(logits, tokens, hidden=hidden, weight=weight, bias=bias,
                            temperature=temperature, impl=impl)
        if stats.logprobs.dim() != 2:
            raise ValueError(f"tokens: expected shape [B, T], got {tuple(stats.logprobs.shape)}")
    stats = TokenStats(stats.logprobs.detach(), stats.entropy.detach())
    mask = _check_mask(mask, stats.logprobs.shape)
    if not mask.any():
        raise ValueError("mask: selects no token (no model-generated token to score)")
    if old_logprobs.shape != stats.logprobs.shape:
        raise ValueError(f"old_logprobs: shape {tuple(old_logprobs.shape)} does not match tokens "
                         f"{tuple(stats.logprobs.shape)}")

    omega = future_value(stats.logprobs, old_logprobs, mask, gamma=gamma, impl=impl)
    # The [B, T] arithmetic below runs in float64: z-scores divide by a std that can be small (Omega is
    # clipped to [1.0, 1.2]), and fp64 keeps the score within 1e-5 of exact at negligible cost.
    clipped = omega.double().clamp(lo, hi)
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
    return BranchingScore(score=score, entropy=stats.entropy, logprobs=stats.logprobs, future_value=omega,
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
