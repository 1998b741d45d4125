"""Triton backend of ``appo.future_value`` (docs/method.md, Eq. 4): a parallel reverse discounted scan.
The op's home (its checks, the torch scan it is tested against) is ``appo/ops/future_value.py``; the
launcher here checks nothing.

    s[b, i] = sum_{k >= i} gamma**(k - i) * d[b, k],   d = logprobs - old_logprobs where mask != 0, else 0

Each row is cut into chunks of BLOCK positions and every (chunk, row) pair is a program (B = 64 rows of
L = 32,768 make 2,048 programs). Two launches, both loading their chunk in forward order (coalesced):

1. ``_chunk_sums_kernel``: A[b, c] = sum_j gamma**j x_j over the chunk's positions j = 0..BLOCK-1 (x the
   masked log-ratio), i.e. the chunk's own contribution to s at its first position.
2. ``_scan_kernel``: the carry into chunk c, the s of the first position after it,
   carry = sum_{c' > c} gamma**((c' - c - 1) BLOCK) A[b, c'] (a dot product over at most L / BLOCK values),
   then the chunk's reverse scan s_j = sum_{k >= j} gamma**(k - j) x_k + gamma**(BLOCK - j) carry.
   (A single chunk skips launch 1: the carry is 0.)

The reverse scan inside a chunk, with powers from exp2(n * log2(gamma)) (relative error about
|ln(gamma**n)| * 2**-24), never from products of a rounded fp32 gamma, which drift by n times its rounding:
- scaled cumsum (when gamma**-(BLOCK - 1) <= 2**64 for BLOCK >= 128: gamma >= 0.71, the default
  gamma = 2**(-1/32) and gamma = 1 with BLOCK = 1024):
  s_j = gamma**-j * reverse_cumsum(gamma**k x_k)_j + gamma**(BLOCK - j) carry; one tl.cumsum, no overflow;
- pair scan (smaller gamma, gamma = 0 included): a reverse tl.associative_scan over (log2 decay, value)
  pairs, (l1, b1) then (l2, b2) = (l1 + l2, b1 * exp2(l2) + b2); no scaling, so nothing overflows.
Sums add about (log2(BLOCK) + L / BLOCK) * 2**-24 times the discounted sum of |d| (more under a sequential
cumsum, as on the CPU interpreter: at most min(BLOCK, 1 / (1 - gamma)) * 2**-24).

Bytes: launch 1 reads the inputs (9 bytes per position with fp32 log-probs and a bool mask), launch 2 reads
them again and writes 4: 22 bytes per position. Speed model and the sm_90 record: docs/kernels.md.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

_MAX_BLOCK = 1024
_CARRY_BLOCK = 1024  # chunk sums folded per step when forming a carry
# the scaled cumsum multiplies by gamma**-k <= 2**64: sums of 1,024 such terms stay finite for |d| < 2**53
_MAX_LOG2_GROWTH = 64


@triton.jit
def _join_stretches(log2_decay_first, value_first, log2_decay_next, value_next):
    """(l1, b1) then (l2, b2) = (l1 + l2, b1 * exp2(l2) + b2): the first stretch decays across the next."""
    return log2_decay_first + log2_decay_next, value_first * tl.exp2(log2_decay_next) + value_next


@triton.jit
def _masked_log_ratio(logprobs_ptr, old_logprobs_ptr, mask_ptr, row, positions, length,
                      stride_logprobs_row, stride_logprobs_col, stride_old_row, stride_old_col,
                      stride_mask_row, stride_mask_col):
    """x = logprobs - old_logprobs (fp32) where mask != 0 and the position is in the row, else exactly 0."""
    in_row = positions < length
    logprobs = tl.load(logprobs_ptr + row * stride_logprobs_row + positions * stride_logprobs_col,
                       mask=in_row, other=0.0).to(tl.float32)
    old_logprobs = tl.load(old_logprobs_ptr + row * stride_old_row + positions * stride_old_col,
                           mask=in_row, other=0.0).to(tl.float32)
    generated = tl.load(mask_ptr + row * stride_mask_row + positions * stride_mask_col, mask=in_row,
                        other=0) != 0
    return tl.where(generated & in_row, logprobs - old_logprobs, 0.0)


@triton.jit
def _chunk_sums_kernel(logprobs_ptr, old_logprobs_ptr, mask_ptr, sums_ptr, length, num_chunks, log2_gamma,
                       stride_logprobs_row, stride_logprobs_col, stride_old_row, stride_old_col,
                       stride_mask_row, stride_mask_col, BLOCK: tl.constexpr):
    """sums[row, chunk] = sum_j gamma**j x[chunk * BLOCK + j] (fp32 [B, num_chunks])."""
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    positions = (chunk * BLOCK + lanes).to(tl.int64)
    x = _masked_log_ratio(logprobs_ptr, old_logprobs_ptr, mask_ptr, row, positions, length,
                          stride_logprobs_row, stride_logprobs_col, stride_old_row, stride_old_col,
                          stride_mask_row, stride_mask_col)
    decay = tl.exp2(lanes.to(tl.float32) * log2_gamma)  # gamma**j
    tl.store(sums_ptr + row * num_chunks + chunk, tl.sum(x * decay, axis=0))


@triton.jit
def _scan_kernel(logprobs_ptr, old_logprobs_ptr, mask_ptr, sums_ptr, out_ptr, length, num_chunks, log2_gamma,
                 stride_logprobs_row, stride_logprobs_col, stride_old_row, stride_old_col,
                 stride_mask_row, stride_mask_col, stride_out_row,
                 BLOCK: tl.constexpr, CARRY_BLOCK: tl.constexpr, SCALED_CUMSUM: tl.constexpr):
    """out[row, chunk * BLOCK + j] = s at that position, from the chunk's x and the carry of the chunks
    to its right (their sums from _chunk_sums_kernel)."""
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    positions = (chunk * BLOCK + lanes).to(tl.int64)

    carry = tl.zeros([], dtype=tl.float32)  # s at the first position after this chunk
    for first in range(chunk + 1, num_chunks, CARRY_BLOCK):
        later = first + tl.arange(0, CARRY_BLOCK)
        sums = tl.load(sums_ptr + row * num_chunks + later, mask=later < num_chunks, other=0.0)
        distance = ((later - chunk - 1) * BLOCK).to(tl.float32)  # positions from the carry to chunk start
        carry += tl.sum(sums * tl.exp2(distance * log2_gamma), axis=0)

    x = _masked_log_ratio(logprobs_ptr, old_logprobs_ptr, mask_ptr, row, positions, length,
                          stride_logprobs_row, stride_logprobs_col, stride_old_row, stride_old_col,
                          stride_mask_row, stride_mask_col)
    to_carry = tl.exp2((BLOCK - lanes).to(tl.float32) * log2_gamma)  # gamma**(BLOCK - j)
    if SCALED_CUMSUM:
        decay = tl.exp2(lanes.to(tl.float32) * log2_gamma)  # gamma**j
        growth = tl.exp2(-lanes.to(tl.float32) * log2_gamma)  # gamma**-j <= 2**64
        future = growth * tl.cumsum(x * decay, axis=0, reverse=True) + to_carry * carry
    else:
        log2_decay = tl.full([BLOCK], 1.0, tl.float32) * log2_gamma
        _, local = tl.associative_scan((log2_decay, x), 0, _join_stretches, reverse=True)
        future = local + to_carry * carry
    tl.store(out_ptr + row * stride_out_row + positions, future, mask=positions < length)


def _chunk_plan(length: int, gamma: float) -> tuple[int, bool]:
    """(BLOCK, SCALED_CUMSUM) for one launch.

    The chunk is as wide as the row, within [16, 1024]. The scaled cumsum needs gamma**-(BLOCK - 1) <= 2**64;
    it is used, on a narrower chunk if need be, unless that would leave fewer than 128 positions per chunk
    (gamma < 0.71 on long rows), where the pair scan over the full-width chunk needs fewer steps.
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
    Arguments as ``appo.future_value`` checked them (nothing is checked here).

    Args:
        logprobs, old_logprobs: [B, T] fp32/bf16/fp16 CUDA tensors (CPU tensors only under
            TRITON_INTERPRET=1), any strides.
        mask: [B, T] bool/integer/floating, nonzero = generated token; masked positions add exactly 0
            (whatever their log-probs) but still count as distance.
        gamma: discount in [0, 1] (a Python float).
    Returns:
        s: fp32 [B, T], contiguous. Same contract as ``appo.ops.future_value.discounted_log_ratio_sum_torch``.
    """
    rows, length = logprobs.shape
    out = torch.empty((rows, length), dtype=torch.float32, device=logprobs.device)
    if out.numel() == 0:
        return out
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same strides; avoids relying on i1 pointer loads
    block, scaled_cumsum = _chunk_plan(length, gamma)
    num_chunks = triton.cdiv(length, block)
    # gamma = 0: 2^-10000 is 0 in fp32 for every distance >= 1, and 2^(0 * -10000) = 1 (no 0 * -inf = NaN)
    log2_gamma = math.log2(gamma) if gamma > 0 else -1e4
    strides = (logprobs.stride(0), logprobs.stride(1), old_logprobs.stride(0), old_logprobs.stride(1),
               mask.stride(0), mask.stride(1))
    num_warps = 4 if block >= 512 else 1
    sums = torch.empty((rows, num_chunks), dtype=torch.float32, device=logprobs.device)
    if num_chunks > 1:
        _chunk_sums_kernel[(num_chunks, rows)](
            logprobs, old_logprobs, mask, sums, length, num_chunks, log2_gamma, *strides,
            BLOCK=block, num_warps=num_warps)
    _scan_kernel[(num_chunks, rows)](
        logprobs, old_logprobs, mask, sums, out, length, num_chunks, log2_gamma, *strides, out.stride(0),
        BLOCK=block, CARRY_BLOCK=_CARRY_BLOCK, SCALED_CUMSUM=scaled_cumsum, num_warps=num_warps)
    return out
