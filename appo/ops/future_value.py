"""Future value, ``appo.future_value`` (docs/method.md, section 4, Eq. 4): the reverse discounted sum of
masked log-ratios, exponentiated.

    d[b, k] = (logprobs - old_logprobs)[b, k]   where mask[b, k] != 0, else 0
    s[b, i] = sum_{k >= i} gamma**(k - i) * d[b, k]        (= d[b, i] + gamma * s[b, i + 1])
    Omega[b, i] = exp(clamp(s[b, i], -20, 20)),  clamped to ``clip`` when given

Distance counts sequence positions, masked ones included: a masked position adds 0 but still decays.

This file is the op's home: the public entry, the only checks of its arguments, and two torch forms of s:
- ``discounted_log_ratio_sum_torch``: O(T) work, vectorised; the oracle of the Triton scan and the backend
  off CUDA. The Triton scan is ``kernels/future_value.py`` (``appo.kernels.future_value``), imported only
  when it is chosen;
- ``dense_future_value_torch``: the authors' O(T^2) form (a dense [T, T] decay matrix); a baseline only.
The scans read logprobs, old_logprobs and mask once and write s once (what the benchmark counts).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from appo.ops._checks import check_float, check_same_device, resolve_impl

GAMMA = 2.0 ** (-1.0 / 32.0)
FUTURE_VALUE_CLIP = (1.0, 1.2)  # clip=(1.0, 1.2) gives A_fut (docs/method.md, section 7)
LOG_RATIO_SUM_BOUND = 20.0  # s is clamped to [-20, 20] before exp, so Omega is always finite
# Within a block the torch scan scales by gamma**-k; keeping gamma**(C-1) >= _SMALLEST_DECAY bounds that
# factor by 1e100, far from fp64 overflow (1.8e308) and underflow (2.2e-308) for any fp32/bf16/fp16 input.
_SMALLEST_DECAY = 1e-100
_MAX_BLOCK = 256


def future_value(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, *, gamma: float = GAMMA,
                 clip: tuple[float, float] | None = None, impl: str = "auto") -> Tensor:
    """Future value Omega (docs/method.md, Eq. 4), detached, float32 [B, T].

    d_k = (logprobs_k - old_logprobs_k) * mask_k;  s_i = sum_{k >= i} gamma^(k - i) d_k  (distance counts
    positions, masked ones included);  Omega_i = exp(clamp(s_i, -20, 20)), then clamped to ``clip`` = (lo, hi)
    when given (``clip=(1.0, 1.2)`` gives the method's A_fut). O(T) per row: a reverse scan, never a [T, T]
    matrix. logprobs/old_logprobs: [B, T] fp32/bf16/fp16, finite where the mask is set; mask: [B, T] bool or
    numeric (nonzero = generated); gamma in (0, 1]. ``impl``: "auto" (Triton on CUDA), "triton" or "torch".
    """
    check_float("logprobs", logprobs)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs: expected shape [B, T], got {tuple(logprobs.shape)}")
    mask, gamma = check_scan_args(old_logprobs, mask, gamma, logprobs, "logprobs")
    check_finite_where(mask, logprobs=logprobs)
    clip = None if clip is None else check_clip(clip)
    return omega(logprobs, old_logprobs, mask, gamma, resolve_impl(impl, logprobs.device), clip)


def check_scan_args(old_logprobs: Tensor, mask: Tensor, gamma, like: Tensor,
                    like_name: str) -> tuple[Tensor, float]:
    """The checks of old_logprobs, mask and gamma against ``like`` (the current log-probs, or the tokens they
    will be computed for: their shape and device) -> (mask as bool, gamma as a float). ValueError naming
    the argument; old_logprobs must be finite where the mask is set."""
    check_float("old_logprobs", old_logprobs)
    if old_logprobs.shape != like.shape:
        raise ValueError(f"old_logprobs: shape {tuple(old_logprobs.shape)} does not match {like_name} "
                         f"{tuple(like.shape)}")
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match the per-token shape "
                         f"{tuple(like.shape)}")
    if mask.dtype.is_complex:
        raise ValueError(f"mask: expected a bool or real dtype, got {mask.dtype}")
    check_same_device(**{like_name: like}, old_logprobs=old_logprobs, mask=mask)
    try:
        gamma_value = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"gamma: must be a number in (0, 1], got {gamma!r}") from None
    if isinstance(gamma, bool) or not 0.0 < gamma_value <= 1.0:  # NaN fails the range test too
        raise ValueError(f"gamma: must lie in (0, 1], got {gamma!r}")
    mask = mask if mask.dtype == torch.bool else mask != 0
    check_finite_where(mask, old_logprobs=old_logprobs)
    return mask, gamma_value


def check_finite_where(mask: Tensor, **tensors: Tensor) -> None:
    """ValueError naming the tensor that holds NaN or +-inf where ``mask`` (bool) is set (one device sync)."""
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor.detach().masked_select(mask)).all():
            raise ValueError(f"{name}: contains NaN or Inf at masked-in positions")


def check_clip(clip) -> tuple[float, float]:
    try:
        low, high = (float(c) for c in clip)
    except (TypeError, ValueError):
        raise ValueError(f"clip: expected a pair (lo, hi), got {clip!r}") from None
    if not low <= high:
        raise ValueError(f"clip: lo must not exceed hi, got ({low}, {high})")
    return low, high


def omega(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, gamma: float, backend: str,
          clip: tuple[float, float] | None = None) -> Tensor:
    """Omega fp32 [B, T] from checked arguments (bool mask, float gamma; backend "torch" or "triton")."""
    logprobs, old_logprobs = logprobs.detach(), old_logprobs.detach()
    if logprobs.numel() == 0:
        s = torch.zeros(logprobs.shape, dtype=torch.float32, device=logprobs.device)
    elif backend == "triton":
        from appo.kernels.future_value import discounted_log_ratio_sum_triton

        s = discounted_log_ratio_sum_triton(logprobs, old_logprobs, mask, gamma)
    else:
        s = discounted_log_ratio_sum_torch(logprobs, old_logprobs, mask, gamma)
    # Both scans give masked positions exactly 0, whatever they hold (e.g. -inf for tool results).
    future = torch.exp(s.clamp(-LOG_RATIO_SUM_BOUND, LOG_RATIO_SUM_BOUND))
    return future if clip is None else future.clamp(*clip)


def masked_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, dtype=torch.float64) -> Tensor:
    """d = logprobs - old_logprobs where mask != 0, else exactly 0 (even if a masked log-prob is -inf/NaN).

    Inputs [B, T] (any strides); returns a contiguous [B, T] tensor of ``dtype``.
    """
    difference = logprobs.to(dtype) - old_logprobs.to(dtype)
    return torch.where(mask != 0, difference, torch.zeros((), dtype=dtype, device=difference.device))


def _block_size(gamma: float) -> int:
    """Largest power of two C <= _MAX_BLOCK with gamma**(C - 1) >= _SMALLEST_DECAY (1 when gamma is tiny)."""
    if gamma >= 1.0:
        return _MAX_BLOCK
    if gamma < _SMALLEST_DECAY:
        return 1
    longest = 1 + math.log(_SMALLEST_DECAY) / math.log(gamma)
    return min(_MAX_BLOCK, 1 << int(math.floor(math.log2(longest))))


def _discounted_cumsum_fp64(values: Tensor, gamma: float) -> Tensor:
    """Forward discounted prefix sum y[r, j] = sum_{k <= j} gamma**(j - k) * values[r, k] of fp64 [R, T].

    Numerics: the row is cut into blocks of C positions. Inside a block,
    y_local[j] = gamma**j * cumsum(gamma**-k * values[k])[j], where gamma**-k <= 1e100 by the choice of C, so
    nothing overflows or underflows in fp64 and the absolute error is about C * 2**-53 times the discounted
    sum of |values|. The block ends form a sequence with decay gamma**C, scanned by the same function
    (recursion depth log_C(T)); each block then adds its carry-in times gamma**(j + 1). When gamma**C falls
    below 1e-100 the carry is dropped: its contribution is < 1e-100 * |y|, far below fp32 resolution.
    """
    rows, length = values.shape
    block = _block_size(gamma)
    if block == 1 or length == 1:  # gamma negligible (< 1e-100): every position stands alone
        return values.clone()
    num_blocks = -(-length // block)
    padded = torch.nn.functional.pad(values, (0, num_blocks * block - length)).view(rows, num_blocks, block)
    exponents = torch.arange(block, dtype=torch.float64, device=values.device)
    decay = torch.pow(gamma, exponents)  # gamma**j, j = 0..C-1
    local = torch.cumsum(padded * torch.pow(gamma, -exponents), dim=-1).mul_(decay)
    if num_blocks > 1:
        block_ends = _discounted_cumsum_fp64(local[:, :, -1].contiguous(), gamma**block)
        carry_in = torch.nn.functional.pad(block_ends[:, :-1], (1, 0)).unsqueeze(-1)  # [R, nb, 1]
        local.add_(carry_in * (decay * gamma))
    return local.view(rows, num_blocks * block)[:, :length]


def discounted_log_ratio_sum_torch(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor,
                                   gamma: float) -> Tensor:
    """s[b, i] = sum_{k >= i} gamma**(k - i) * (logprobs - old_logprobs)[b, k] * [mask[b, k] != 0], unclamped.
    The torch reference; nothing is checked here (``future_value`` does).

    Args:
        logprobs, old_logprobs: [B, T] fp32/bf16/fp16, any strides.
        mask: [B, T] bool/integer/floating; nonzero = generated token. Masked-out positions contribute exactly
            0 (whatever their log-probs, even -inf/NaN) but still count as distance.
        gamma: discount in [0, 1] (a Python float).
    Returns:
        s: fp32 [B, T], contiguous.

    O(T) work, vectorised: computed in fp64 as a forward blocked scan of the flipped rows (see
    ``_discounted_cumsum_fp64`` for the numerics), rounded once to fp32.
    """
    if logprobs.numel() == 0:
        return torch.zeros(logprobs.shape, dtype=torch.float32, device=logprobs.device)
    log_ratio = masked_log_ratio(logprobs, old_logprobs, mask)
    reversed_sum = _discounted_cumsum_fp64(log_ratio.flip(-1), gamma)
    return reversed_sum.flip(-1).to(torch.float32)


def dense_future_value_torch(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """The authors' O(T^2) form, as a baseline: s = d @ W^T with the dense decay matrix
    W[i, k] = gamma**(k - i) for k >= i, else 0 (an fp32 [T, T] tensor: 4 * T**2 bytes; 4.3 GB at T = 32,768).

    Same contract as ``discounted_log_ratio_sum_torch``: [B, T] inputs -> fp32 [B, T] s, not clamped.
    """
    length = logprobs.shape[1]
    log_ratio = masked_log_ratio(logprobs, old_logprobs, mask, dtype=torch.float32)
    positions = torch.arange(length, dtype=torch.float32, device=logprobs.device)
    decay = positions.unsqueeze(0) - positions.unsqueeze(1)  # decay[i, k] = k - i, the one [T, T] allocation
    torch.pow(gamma, decay, out=decay)  # in place; entries with k < i (possibly inf) are zeroed next
    decay.triu_()
    return log_ratio @ decay.T

