"""Future value (METHOD.md Eq. 4) as a Triton reverse discounted scan.

    s[b, i] = sum_{k >= i} gamma**(k - i) * d[b, k],   d = logprobs - old_logprobs where mask != 0, else 0

One program per row walks the row from its end in chunks of BLOCK positions. A chunk is loaded in reverse
order (lane j holds position end - j, x_j its masked log-ratio), so the reverse scan becomes a forward
discounted prefix sum over the lanes, plus the carry c (the s of the position just right of the chunk):

    s_j = sum_{k <= j} gamma**(j - k) * x_k + gamma**(j + 1) * c

Two ways to form the chunk sum, both with powers from exp2(n * log2(gamma)) (relative error about
|ln(gamma**n)| * 2**-24), never from products of a rounded fp32 gamma, which drift by n times its rounding:
- scaled cumsum (when gamma**-(BLOCK - 1) <= 2**64 for BLOCK >= 128: gamma >= 0.71, the default
  gamma = 2**(-1/32) and gamma = 1 with BLOCK = 1024):
  s_j = gamma**j * (cumsum_k(gamma**-k * x_k)_j + gamma * c); one tl.cumsum, no overflow by the bound;
- pair scan (smaller gamma, gamma = 0 included): tl.associative_scan over (log2 decay, value) pairs,
  (l1, b1) then (l2, b2) = (l1 + l2, b1 * exp2(l2) + b2); no scaling, so nothing overflows. A sequential scan
  (the CPU interpreter's) multiplies by exp2(log2(gamma)) once per position and so drifts like a product;
  the GPU's tree scan does not.
Sums add about (log2(BLOCK) + T / BLOCK) * 2**-24 times the discounted sum of |d| (more under a sequential
cumsum: at most min(BLOCK, 1 / (1 - gamma)) * 2**-24).

The torch reference (the test oracle) is ``appo.ops.future_value.discounted_log_ratio_sum_torch``.
Bytes moved: read logprobs, old_logprobs (2 or 4 bytes each) and mask (1 to 8 bytes), write 4 bytes of s.
"""

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from appo.ops.future_value import check_scan_inputs

_MAX_BLOCK = 1024
# the scaled cumsum multiplies by gamma**-k <= 2**64: sums of 1,024 such terms stay finite for |d| < 2**53
_MAX_LOG2_GROWTH = 64


@triton.jit
def _join_stretches(log2_decay_first, value_first, log2_decay_next, value_next):
    """(l1, b1) then (l2, b2) = (l1 + l2, b1 * exp2(l2) + b2): the first stretch decays across the next."""
    return log2_decay_first + log2_decay_next, value_first * tl.exp2(log2_decay_next) + value_next


@triton.jit
def _discounted_log_ratio_sum_kernel(
    logprobs_ptr, old_logprobs_ptr, mask_ptr, out_ptr,
    length, log2_gamma,
    stride_logprobs_row, stride_logprobs_col,
    stride_old_row, stride_old_col,
    stride_mask_row, stride_mask_col,
    stride_out_row,
    BLOCK: tl.constexpr, SCALED_CUMSUM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    log2_gamma_per_lane = tl.full([BLOCK], 1.0, tl.float32) * log2_gamma
    if SCALED_CUMSUM:
        decay_to_lane = tl.exp2(lanes.to(tl.float32) * log2_gamma_per_lane)  # gamma**j
        growth_to_lane = tl.exp2(-lanes.to(tl.float32) * log2_gamma_per_lane)  # gamma**-j <= 2**64
        gamma = tl.exp2(log2_gamma)
    carry = tl.zeros([], dtype=tl.float32)  # s at the position just right of the current chunk
    for chunk in range(0, tl.cdiv(length, BLOCK)):
        positions = (length - 1 - chunk * BLOCK - lanes).to(tl.int64)
        in_row = positions >= 0
        logprobs = tl.load(logprobs_ptr + row * stride_logprobs_row + positions * stride_logprobs_col,
                           mask=in_row, other=0.0).to(tl.float32)
        old_logprobs = tl.load(old_logprobs_ptr + row * stride_old_row + positions * stride_old_col,
                               mask=in_row, other=0.0).to(tl.float32)
        generated = tl.load(mask_ptr + row * stride_mask_row + positions * stride_mask_col,
                            mask=in_row, other=0) != 0
        log_ratio = tl.where(generated & in_row, logprobs - old_logprobs, 0.0)
        if SCALED_CUMSUM:
            future = decay_to_lane * (tl.cumsum(log_ratio * growth_to_lane, axis=0) + gamma * carry)
        else:
            log2_decay, local = tl.associative_scan((log2_gamma_per_lane, log_ratio), 0, _join_stretches)
            future = local + tl.exp2(log2_decay) * carry
        tl.store(out_ptr + row * stride_out_row + positions, future, mask=in_row)
        carry = tl.sum(tl.where(lanes == BLOCK - 1, future, 0.0), axis=0)


def _chunk_plan(length: int, gamma: float) -> tuple[int, bool]:
    """(BLOCK, SCALED_CUMSUM) for one launch.

    The chunk is as wide as the row, within [16, 1024]. The scaled cumsum needs gamma**-(BLOCK - 1) <= 2**64;
    it is used, on a narrower chunk if need be, unless that would leave fewer than 128 positions per chunk
    (gamma < 0.71 on long rows), where the pair scan over the full-width chunk needs fewer sequential steps.
    """
    block = min(_MAX_BLOCK, max(16, triton.next_power_of_2(length)))
    if gamma == 0.0:
        return block, False
    if gamma == 1.0:
        return block, True
    widest_scaled = 1 << int(math.log2(1 + _MAX_LOG2_GROWTH / -math.log2(gamma)))
    if widest_scaled >= min(block, 128):
        return min(block, widest_scaled), True
    return block, False


def discounted_log_ratio_sum_triton(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor,
                                    gamma: float) -> Tensor:
    """s[b, i] = sum_{k >= i} gamma**(k - i) * (logprobs - old_logprobs)[b, k] * [mask[b, k] != 0], unclamped.

    Args:
        logprobs, old_logprobs: [B, T] fp32/bf16/fp16 CUDA tensors (CPU tensors only under
            TRITON_INTERPRET=1), any strides.
        mask: [B, T] bool/integer/floating, nonzero = generated token; masked positions add exactly 0
            (whatever their log-probs) but still count as distance.
        gamma: discount in [0, 1].
    Returns:
        s: fp32 [B, T], contiguous. Same contract as ``appo.ops.future_value.discounted_log_ratio_sum_torch``.
    """
    gamma = check_scan_inputs(logprobs, old_logprobs, mask, gamma)
    if not logprobs.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"logprobs is on {logprobs.device}: the Triton scan needs CUDA tensors "
                         "(or TRITON_INTERPRET=1); use the torch implementation on CPU")
    rows, length = logprobs.shape
    out = torch.empty((rows, length), dtype=torch.float32, device=logprobs.device)
    if out.numel() == 0:
        return out
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same strides; avoids relying on i1 pointer loads
    block, scaled_cumsum = _chunk_plan(length, gamma)
    log2_gamma = math.log2(gamma) if gamma > 0 else float("-inf")
    _discounted_log_ratio_sum_kernel[(rows,)](
        logprobs, old_logprobs, mask, out,
        length, log2_gamma,
        logprobs.stride(0), logprobs.stride(1),
        old_logprobs.stride(0), old_logprobs.stride(1),
        mask.stride(0), mask.stride(1),
        out.stride(0),
        BLOCK=block, SCALED_CUMSUM=scaled_cumsum, num_warps=4 if block >= 512 else 1,
    )
    return out
