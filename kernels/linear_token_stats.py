"""Fused LM head + token statistics in Triton: log p(sampled token) and full-vocabulary entropy from hidden
states [N, H] and the LM-head weight [V, H], never allocating the [N, V] logits. With backward.

Torch reference (the test oracle): ``appo.ops.linear_token_stats.linear_token_stats_torch``. In short:

    z = (hidden @ weight.T + bias) / temperature                # fp32 accumulation
    lse = logsumexp(z);  logprob = z[a] - lse;  entropy = lse - sum(softmax(z) * z)
    backward (logprobs only): dz = g * (onehot(a) - softmax(z)) / temperature
        grad_hidden = dz @ weight,  grad_weight = dz.T @ hidden,  grad_bias = dz.sum(0)

Forward: a grid of (row blocks of BLOCK_N) x (vocabulary splits). Each program walks its vocabulary range
tile by tile, builds the [BLOCK_N, BLOCK_V] logits tile with tl.dot over H in BLOCK_H chunks and folds it into
online statistics (max m, sum-exp s, sum e^(z-m) (z-m) t, and the sampled token's logit) as flash attention
does. The vocabulary is split across programs only when there are too few row blocks to fill the GPU (small N
at scoring time); the per-split partial statistics [S, N] are merged by a few elementwise torch ops.

Backward, two kernels, both recomputing logits tile by tile from the saved row max and log-sum-exp (kept
apart: p = exp((z - max) - log_sumexp) stays exact where p is near 1; the [N, V] gradient never exists
either). Design choice: each output gets a kernel whose programs OWN disjoint slices of it, so there are
no atomics, results are deterministic, and the fp32 accumulators are read-modify-written only by their owner:
  * grad_hidden: one program per row block walks all vocabulary tiles and accumulates dz @ W into its rows of
    an fp32 [N, H] buffer (a row block's accumulator is BLOCK_N x H, too big for registers at H = 3584, so it
    lives in global memory/L2, touched once per (vocabulary tile, H chunk)).
  * grad_weight and grad_bias: one program per vocabulary tile walks all row blocks and accumulates dz.T @ h
    into its rows of an fp32 [V, H] buffer; V / BLOCK_V programs (1,188 at V = 152,064) fill an H100.
The price is recomputing the logits twice in backward (2 x 2NVH flops) on top of the 2 x 2NVH of the gradient
matmuls; the alternative (one kernel, atomics into grad_weight from every row block) issues N / BLOCK_N atomic
adds per weight element, which is slower at these sizes and non-deterministic.

On GPUs, bf16/fp16 tiles feed tl.dot directly (fp32 accumulation) and dz is cast to the input dtype for the
gradient matmuls, as flash attention does with P; fp32 inputs use exact ("ieee") fp32 dots, not tf32. On the
Triton CPU interpreter every tl.dot operand is cast to fp32 first (its bf16 dot is wrong).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from appo.ops.linear_token_stats import check_linear_token_stats_inputs


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a [M, K] @ b [K, N] -> fp32 [M, N]; UPCAST casts both operands to fp32 first (interpreter)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, hidden_size,
                 stride_hidden, stride_weight, inv_temperature,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """z [BLOCK_N, BLOCK_V] fp32 = (hidden[rows] @ weight[cols].T + bias[cols]) * inv_temperature, -inf on
    columns past V (rows past N hold finite garbage that callers mask)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    row_offsets = rows.to(tl.int64)[:, None] * stride_hidden
    col_offsets = cols.to(tl.int64)[None, :] * stride_weight
    for k in range(0, hidden_size, BLOCK_H):
        ks = k + tl.arange(0, BLOCK_H)
        k_ok = ks < hidden_size
        h_tile = tl.load(hidden_ptr + row_offsets + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0)
        w_tile_t = tl.load(weight_ptr + col_offsets + ks[:, None], mask=col_ok[None, :] & k_ok[:, None],
                           other=0.0)
        acc += _dot(h_tile, w_tile_t, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_temperature, float("-inf"))


@triton.jit
def _forward_kernel(hidden_ptr, weight_ptr, bias_ptr, tokens_ptr,
                    max_ptr, sumexp_ptr, shifted_ptr, picked_ptr,
                    num_rows, vocab_size, hidden_size, stride_hidden, stride_weight, inv_temperature,
                    tiles_per_split,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Partial statistics of rows [pid_n * BLOCK_N, +BLOCK_N) over vocabulary split pid_s, written to [S, N]
    fp32 buffers: m = max z, s = sum e^(z-m), t = sum e^(z-m) (z-m), picked = z[a] (0 if a not in split)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=-1).to(tl.int32)  # int32 compares
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sumexp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_shifted = tl.zeros((BLOCK_N,), dtype=tl.float32)
    picked = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_col = pid_s * tiles_per_split * BLOCK_V
    last_col = tl.minimum(first_col + tiles_per_split * BLOCK_V, vocab_size)
    for v in range(first_col, last_col, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        col_ok = cols < last_col
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, hidden_size,
                         stride_hidden, stride_weight, inv_temperature,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        shifted = tl.where(col_ok[None, :], z - new_max[:, None], 0.0)
        exps = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)
        rescale = tl.exp(run_max - new_max)
        # t' = e^(m - m') (t + (m - m') s); on the first tile m = -inf and s = 0, so the shift is zeroed.
        max_shift = tl.where(run_sumexp > 0.0, run_max - new_max, 0.0)
        run_shifted = rescale * (run_shifted + max_shift * run_sumexp) + tl.sum(exps * shifted, axis=1)
        run_sumexp = run_sumexp * rescale + tl.sum(exps, axis=1)
        run_max = new_max
        picked += tl.sum(tl.where(cols[None, :] == tokens[:, None], z, 0.0), axis=1)
    out = pid_s * num_rows + rows
    tl.store(max_ptr + out, run_max, mask=row_ok)
    tl.store(sumexp_ptr + out, run_sumexp, mask=row_ok)
    tl.store(shifted_ptr + out, run_shifted, mask=row_ok)
    tl.store(picked_ptr + out, picked, mask=row_ok)


@triton.jit
def _grad_logits_tile(hidden_ptr, weight_ptr, bias_ptr, tokens, row_max, log_sumexp, upstream, rows, row_ok,
                      cols, col_ok,
                      hidden_size, stride_hidden, stride_weight, inv_temperature,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dz [BLOCK_N, BLOCK_V] fp32 = g * (onehot(a) - p) / temperature, 0 outside [N, V)."""
    z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, hidden_size,
                     stride_hidden, stride_weight, inv_temperature,
                     HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
    probs = tl.exp((z - row_max[:, None]) - log_sumexp[:, None])
    onehot = (cols[None, :] == tokens[:, None]).to(tl.float32)
    dz = (onehot - probs) * (upstream * inv_temperature)[:, None]
    return tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)


@triton.jit
def _grad_hidden_kernel(hidden_ptr, weight_ptr, bias_ptr, tokens_ptr, max_ptr, log_sumexp_ptr, upstream_ptr,
                        grad_hidden_ptr,
                        num_rows, vocab_size, hidden_size, stride_hidden, stride_weight, inv_temperature,
                        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """grad_hidden[rows] (fp32 [N, H], zero-initialised, contiguous) += dz @ weight, over all of V."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=-1).to(tl.int32)  # int32 compares
    row_max = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
    log_sumexp = tl.load(log_sumexp_ptr + rows, mask=row_ok, other=0.0)
    upstream = tl.load(upstream_ptr + rows, mask=row_ok, other=0.0)
    out_rows = rows.to(tl.int64)[:, None] * hidden_size
    for v in range(0, vocab_size, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab_size
        dz = _grad_logits_tile(hidden_ptr, weight_ptr, bias_ptr, tokens, row_max, log_sumexp, upstream,
                               rows, row_ok, cols, col_ok, hidden_size, stride_hidden, stride_weight,
                               inv_temperature,
                               HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        dz = dz.to(weight_ptr.dtype.element_ty)
        for k in range(0, hidden_size, BLOCK_H):
            ks = k + tl.arange(0, BLOCK_H)
            k_ok = ks < hidden_size
            w_tile = tl.load(weight_ptr + cols.to(tl.int64)[:, None] * stride_weight + ks[None, :],
                             mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            out_mask = row_ok[:, None] & k_ok[None, :]
            acc = tl.load(grad_hidden_ptr + out_rows + ks[None, :], mask=out_mask, other=0.0)
            acc += _dot(dz, w_tile, UPCAST, PRECISION)
            tl.store(grad_hidden_ptr + out_rows + ks[None, :], acc, mask=out_mask)


@triton.jit
def _grad_weight_kernel(hidden_ptr, weight_ptr, bias_ptr, tokens_ptr, max_ptr, log_sumexp_ptr, upstream_ptr,
                        grad_weight_ptr, grad_bias_ptr,
                        num_rows, vocab_size, hidden_size, stride_hidden, stride_weight, inv_temperature,
                        HAS_BIAS: tl.constexpr, WANT_WEIGHT: tl.constexpr, WANT_BIAS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """grad_weight[cols] (fp32 [V, H], zero-initialised, contiguous) += dz.T @ hidden over all N rows;
    grad_bias[cols] (fp32 [V]) = dz.sum(0)."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab_size
    out_cols = cols.to(tl.int64)[:, None] * hidden_size
    bias_acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n in range(0, num_rows, BLOCK_N):
        rows = n + tl.arange(0, BLOCK_N)
        row_ok = rows < num_rows
        tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=-1).to(tl.int32)  # int32 compares
        row_max = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
        log_sumexp = tl.load(log_sumexp_ptr + rows, mask=row_ok, other=0.0)
        upstream = tl.load(upstream_ptr + rows, mask=row_ok, other=0.0)
        dz = _grad_logits_tile(hidden_ptr, weight_ptr, bias_ptr, tokens, row_max, log_sumexp, upstream,
                               rows, row_ok, cols, col_ok, hidden_size, stride_hidden, stride_weight,
                               inv_temperature,
                               HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        bias_acc += tl.sum(dz, axis=0)
        if WANT_WEIGHT:
            dz_t = tl.trans(dz.to(hidden_ptr.dtype.element_ty))
            for k in range(0, hidden_size, BLOCK_H):
                ks = k + tl.arange(0, BLOCK_H)
                k_ok = ks < hidden_size
                h_tile = tl.load(hidden_ptr + rows.to(tl.int64)[:, None] * stride_hidden + ks[None, :],
                                 mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                out_mask = col_ok[:, None] & k_ok[None, :]
                acc = tl.load(grad_weight_ptr + out_cols + ks[None, :], mask=out_mask, other=0.0)
                acc += _dot(dz_t, h_tile, UPCAST, PRECISION)
                tl.store(grad_weight_ptr + out_cols + ks[None, :], acc, mask=out_mask)
    if WANT_BIAS:
        tl.store(grad_bias_ptr + cols, bias_acc, mask=col_ok)


def _launch_config(hidden: Tensor) -> dict:
    """One fixed config per device/dtype (no autotune: the interpreter needs a single config).

    The CUDA configs were compiled for sm_90a and checked with ``ptxas -v`` (the grad_weight kernel uses
    BLOCK_N / 2): bf16/fp16 (BLOCK_N x BLOCK_V x BLOCK_H = 128 x 128 x 32, 8 warps) spills no registers
    (16 bytes in grad_weight with a bias; BLOCK_H = 64 spills 200-600 bytes); fp32 (exact fp32 dots, no
    tensor cores) spills at most 16 bytes. Not yet timed on a GPU.
    """
    if hidden.device.type != "cuda":
        return dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=32, UPCAST=True, PRECISION="ieee", num_warps=4)
    if hidden.dtype == torch.float32:
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, UPCAST=False, PRECISION="ieee", num_warps=8)
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=32, UPCAST=False, PRECISION="tf32", num_warps=8)


def _num_programs_wanted(device: torch.device) -> int:
    """Enough forward programs for one wave on the GPU (one per SM); a small number on the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _launch_forward(hidden, weight, bias, tokens, temperature, config) -> tuple[Tensor, ...]:
    """-> (logprobs, entropy, row max, log sum e^(z - max)), all fp32 [N]."""
    num_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    block_n, block_v = config["BLOCK_N"], config["BLOCK_V"]
    row_blocks = triton.cdiv(num_rows, block_n)
    vocab_tiles = triton.cdiv(vocab_size, block_v)
    wanted_splits = max(1, math.ceil(_num_programs_wanted(hidden.device) / max(row_blocks, 1)))
    tiles_per_split = triton.cdiv(vocab_tiles, min(wanted_splits, vocab_tiles))
    num_splits = triton.cdiv(vocab_tiles, tiles_per_split)
    partial = torch.empty(4, num_splits, num_rows, dtype=torch.float32, device=hidden.device)
    part_max, part_sumexp, part_shifted, part_picked = partial.unbind(0)
    if num_rows:
        _forward_kernel[(row_blocks, num_splits)](
            hidden, weight, bias if bias is not None else hidden, tokens,
            part_max, part_sumexp, part_shifted, part_picked,
            num_rows, vocab_size, hidden_size, hidden.stride(0), weight.stride(0), 1.0 / temperature,
            tiles_per_split, HAS_BIAS=bias is not None, **config)
    # Merge the splits: rescale every split's sums to the global max m.
    row_max = part_max.max(dim=0).values
    weights = torch.exp(part_max - row_max)
    sumexp = (part_sumexp * weights).sum(dim=0)
    shifted = (weights * (part_shifted + (part_max - row_max) * part_sumexp)).sum(dim=0)
    log_sumexp = torch.log(sumexp)
    entropy = log_sumexp - shifted / sumexp
    logprobs = (part_picked.sum(dim=0) - row_max) - log_sumexp
    return logprobs, entropy, row_max, log_sumexp


class _LinearTokenStatsTriton(torch.autograd.Function):
    """Saves hidden, weight, bias, tokens, row max and log-sum-exp [N]; never the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature):
        config = _launch_config(hidden)
        logprobs, entropy, row_max, log_sumexp = _launch_forward(hidden, weight, bias, tokens, temperature,
                                                                 config)
        ctx.save_for_backward(hidden, weight, bias, tokens, row_max, log_sumexp)
        ctx.temperature, ctx.config = temperature, config
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        hidden, weight, bias, tokens, row_max, log_sumexp = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        config = ctx.config
        num_rows, hidden_size = hidden.shape
        vocab_size = weight.shape[0]
        upstream = grad_logprobs.float().contiguous()
        common = (num_rows, vocab_size, hidden_size, hidden.stride(0), weight.stride(0),
                  1.0 / ctx.temperature)
        bias_arg = bias if bias is not None else hidden
        grad_hidden = grad_weight = grad_bias = None
        if need_hidden:
            grad_hidden32 = torch.zeros(num_rows, hidden_size, dtype=torch.float32, device=hidden.device)
            if num_rows:
                _grad_hidden_kernel[(triton.cdiv(num_rows, config["BLOCK_N"]),)](
                    hidden, weight, bias_arg, tokens, row_max, log_sumexp, upstream, grad_hidden32, *common,
                    HAS_BIAS=bias is not None, **config)
            grad_hidden = grad_hidden32.to(hidden.dtype)
        if need_weight or need_bias:
            grad_weight32 = torch.zeros(weight.shape if need_weight else (1,), dtype=torch.float32,
                                        device=weight.device)
            grad_bias32 = torch.zeros(vocab_size if need_bias else 1, dtype=torch.float32,
                                      device=weight.device)
            # Half-height row blocks here: with the bias accumulator, 128-row blocks spill registers on sm_90.
            weight_config = {**config, "BLOCK_N": max(16, config["BLOCK_N"] // 2)}
            _grad_weight_kernel[(triton.cdiv(vocab_size, config["BLOCK_V"]),)](
                hidden, weight, bias_arg, tokens, row_max, log_sumexp, upstream, grad_weight32, grad_bias32,
                *common,
                HAS_BIAS=bias is not None, WANT_WEIGHT=need_weight, WANT_BIAS=need_bias, **weight_config)
            grad_weight = grad_weight32.to(weight.dtype) if need_weight else None
            grad_bias = grad_bias32.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None


def linear_token_stats_triton(hidden: Tensor, weight: Tensor, tokens: Tensor, bias: Tensor | None = None,
                              temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Fused LM head + token statistics (Triton), never allocating [N, V].

    Args:
        hidden: [N, H] fp32/bf16/fp16 final hidden states (CUDA, or CPU under TRITON_INTERPRET=1).
        weight: [V, H] LM-head weight, same dtype and device as ``hidden``.
        tokens: [N] int64 sampled token ids in [0, V).
        bias: [V] same dtype, or None.
        temperature: z = (hidden @ weight.T + bias) / temperature, > 0.

    Returns:
        (logprobs fp32 [N], differentiable w.r.t. hidden/weight/bias, grads in the input dtypes;
         entropy fp32 [N], detached).
    """
    check_linear_token_stats_inputs(hidden, weight, tokens, bias, temperature)
    if hidden.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"hidden is on {hidden.device}: the triton backend needs CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before importing appo.kernels); use impl='torch'")
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    return _LinearTokenStatsTriton.apply(hidden, weight, bias, tokens.contiguous(), float(temperature))
