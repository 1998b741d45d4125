"""Token statistics from logits in one pass: log-prob of the sampled token and full-vocabulary entropy.

Each logit is read exactly once. Per row, the kernel walks the vocabulary in tiles and keeps three running
values over the temperature-scaled logits z seen so far:
    m = max z,   s = sum exp(z - m),   t = sum exp(z - m) * (z - m)
and at the end
    lse = m + log s,   logprob = (z_a - m) - log s,   entropy = log s - t / s.
The torch reference (the test oracle) is ``appo.ops.token_stats.token_stats_torch``.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from appo.ops.token_stats import check_token_stats_args

# One config (no autotune, so the interpreter runs it). A tile of 8192 fp32 values over 8 warps is 32 values
# per thread: enough bytes in flight per SM on an H100 without spilling (79 registers for bf16 on sm_90).
# For small V several rows share a program, at most one row per warp: with more rows per warp each thread
# holds a 64-bit pointer per element and the register count triples (checked with cuobjdump).
TILE_ELEMENTS = 8192
NUM_WARPS = 8


@triton.jit
def _token_stats_kernel(logits_ptr, tokens_ptr, logprobs_ptr, entropy_ptr,
                        num_rows, vocab_size, row_stride, inv_temperature,
                        BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_valid = rows < num_rows
    # Rows past the end re-read the last row (always in bounds) and are not stored: no row mask on loads.
    safe_rows = tl.minimum(rows, num_rows - 1).to(tl.int64)
    row_ptrs = logits_ptr + safe_rows * row_stride  # int64 offsets: N x V can exceed 2**31

    m = tl.full((BLOCK_ROWS,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_ROWS,), tl.float32)
    t = tl.zeros((BLOCK_ROWS,), tl.float32)
    for v_start in range(0, vocab_size, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_valid = cols < vocab_size
        z = tl.load(row_ptrs[:, None] + cols[None, :], mask=col_valid[None, :], other=float("-inf"))
        z = z.to(tl.float32) * inv_temperature
        # Every tile holds at least one valid column, so m_new is finite after the first tile
        # (unless the logits themselves are not finite, which then shows up as NaN in the outputs).
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(col_valid[None, :], z - m_new[:, None], 0.0)  # <= 0
        e = tl.where(col_valid[None, :], tl.exp(shift), 0.0)
        # Rescale the old sums from base m to base m_new (alpha = exp(m - m_new) <= 1):
        #   s <- alpha * s,   t <- alpha * (t + (m - m_new) * s).
        # Stable: every term of t and (m - m_new) * s is <= 0, so nothing cancels, and entropy = log s - t/s
        # adds two non-negative numbers. The textbook form lse - sum(p * z) instead subtracts two numbers of
        # the size of the logits and loses ~|z| * 1e-7 absolute when the logits have a large offset.
        # On the first tile m = -inf and s = 0: alpha = 0 and the guard keeps (-inf) * 0 out.
        alpha = tl.exp(m - m_new)
        t = alpha * (t + tl.where(s > 0.0, m - m_new, 0.0) * s) + tl.sum(e * shift, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new

    token = tl.load(tokens_ptr + safe_rows)
    z_token = tl.load(row_ptrs + token).to(tl.float32) * inv_temperature
    log_s = tl.log(s)
    tl.store(logprobs_ptr + rows, (z_token - m) - log_s, mask=row_valid)
    tl.store(entropy_ptr + rows, log_s - t / s, mask=row_valid)


def launch_config(num_rows: int, vocab_size: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_V): tiles of up to TILE_ELEMENTS values, at most NUM_WARPS rows per program."""
    block_v = min(TILE_ELEMENTS, triton.next_power_of_2(vocab_size))
    block_rows = min(TILE_ELEMENTS // block_v, NUM_WARPS, triton.next_power_of_2(num_rows))
    return block_rows, block_v


def token_stats_triton(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Log-prob of the sampled token and entropy of softmax(logits / temperature), one pass over the logits.

    Args:
        logits: [N, V] float32 / bfloat16 / float16 (CUDA, or CPU under TRITON_INTERPRET=1), contiguous
            along V, any row stride.
        tokens: [N] int64 in [0, V), same device (not range-checked here: an id outside the vocabulary reads
            out of bounds; ``appo.token_stats`` validates it).
        temperature: positive divisor applied to the logits before the softmax.

    Returns:
        (logprobs, entropy): both [N] float32, detached; entropy is over the full vocabulary.
        Non-finite logits give a non-finite entropy or log-prob in that row.

    Reads N x V x itemsize bytes of logits once plus 8 N bytes of tokens, writes 8 N bytes.
    """
    check_token_stats_args(logits, tokens, temperature)
    num_rows, vocab_size = logits.shape
    logprobs = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return logprobs, entropy

    block_rows, block_v = launch_config(num_rows, vocab_size)
    grid = (triton.cdiv(num_rows, block_rows),)
    _token_stats_kernel[grid](
        logits.detach(), tokens.contiguous(), logprobs, entropy,
        num_rows, vocab_size, logits.stride(0), 1.0 / temperature,
        BLOCK_ROWS=block_rows, BLOCK_V=block_v, num_warps=NUM_WARPS,
    )
    return logprobs, entropy


def compile_for_gpu(logits_dtype: str, num_rows: int, vocab_size: int, capability: int = 90):
    """Ahead-of-time build of the kernel for one launch config (no GPU needed): a triton CompiledKernel.

    ``logits_dtype`` is a Triton type name ("fp32", "bf16", "fp16"); ``capability`` the CUDA compute
    capability (90: H100/H200). Must run without TRITON_INTERPRET=1 (the interpreter replaces the compiler).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_rows, block_v = launch_config(num_rows, vocab_size)
    signature = {"logits_ptr": f"*{logits_dtype}", "tokens_ptr": "*i64", "logprobs_ptr": "*fp32",
                 "entropy_ptr": "*fp32", "num_rows": "i32", "vocab_size": "i32", "row_stride": "i64",
                 "inv_temperature": "fp32", "BLOCK_ROWS": "constexpr", "BLOCK_V": "constexpr"}
    constexprs = {"BLOCK_ROWS": block_rows, "BLOCK_V": block_v}
    source = ASTSource(_token_stats_kernel, signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": NUM_WARPS})
