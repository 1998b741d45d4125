"""Future value (METHOD.md Eq. 4): the reverse discounted sum of masked log-ratios, in torch.

    d[b, k] = (logprobs - old_logprobs)[b, k]   where mask[b, k] != 0, else 0
    s[b, i] = sum_{k >= i} gamma**(k - i) * d[b, k]        (= d[b, i] + gamma * s[b, i + 1])

Distance counts sequence positions, masked ones included: a masked position adds 0 but still decays.
``s`` is returned unclamped; ``appo.future_value`` clamps it to [-20, 20] and exponentiates.

Two implementations live here:
- ``discounted_log_ratio_sum_torch``: O(T) work, vectorised; the oracle of the Triton kernel
  (``appo.kernels.future_value``) and the CPU path of ``appo.future_value``.
- ``dense_future_value_torch``: the authors' O(T^2) form (a dense [T, T] decay matrix); baseline only.

Bytes moved by the scan (what the benchmark counts): read logprobs, old_logprobs and mask once, write s once.
"""

import math

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Within a block the scan scales by gamma**-k; keeping gamma**(C-1) >= _SMALLEST_DECAY bounds that factor by
# 1e100, far from fp64 overflow (1.8e308) and underflow (2.2e-308) for any fp32/bf16/fp16-derived input.
_SMALLEST_DECAY = 1e-100
_MAX_BLOCK = 256


def check_scan_inputs(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, gamma: float) -> float:
    """Raise ValueError (naming the argument) unless the scan contract holds; return gamma as a Python float.

    logprobs, old_logprobs: [B, T] fp32/bf16/fp16 on one device; mask: [B, T] bool/integer/floating
    (nonzero = generated token); gamma: a real number in [0, 1].
    """
    for name, tensor in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("mask", mask)):
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be 2-D [B, T], got shape {tuple(tensor.shape)}")
    for name, tensor in (("logprobs", logprobs), ("old_logprobs", old_logprobs)):
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if mask.dtype.is_complex:
        raise ValueError(f"mask must be bool, integer or floating, got {mask.dtype}")
    for name, tensor in (("old_logprobs", old_logprobs), ("mask", mask)):
        if tensor.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} != logprobs shape {tuple(logprobs.shape)}")
        if tensor.device != logprobs.device:
            raise ValueError(f"{name} is on {tensor.device}, logprobs on {logprobs.device}")
    try:
        gamma_value = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"gamma must be a real number in [0, 1], got {gamma!r}") from None
    if isinstance(gamma, bool) or not 0.0 <= gamma_value <= 1.0:  # NaN fails the range test too
        raise ValueError(f"gamma must be a real number in [0, 1], got {gamma!r}")
    return gamma_value


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

    Args:
        logprobs, old_logprobs: [B, T] fp32/bf16/fp16, any strides.
        mask: [B, T] bool/integer/floating; nonzero = generated token. Masked-out positions contribute exactly
            0 (whatever their log-probs, even -inf/NaN) but still count as distance.
        gamma: discount in [0, 1].
    Returns:
        s: fp32 [B, T], contiguous.

    O(T) work, vectorised: computed in fp64 as a forward blocked scan of the flipped rows (see
    ``_discounted_cumsum_fp64`` for the numerics), rounded once to fp32.
    """
    gamma = check_scan_inputs(logprobs, old_logprobs, mask, gamma)
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
    gamma = check_scan_inputs(logprobs, old_logprobs, mask, gamma)
    length = logprobs.shape[1]
    log_ratio = masked_log_ratio(logprobs, old_logprobs, mask, dtype=torch.float32)
    positions = torch.arange(length, dtype=torch.float32, device=logprobs.device)
    decay = positions.unsqueeze(0) - positions.unsqueeze(1)  # decay[i, k] = k - i, the one [T, T] allocation
    torch.pow(gamma, decay, out=decay)  # in place; entries with k < i (possibly inf) are zeroed next
    decay.triu_()
    return log_ratio @ decay.T
