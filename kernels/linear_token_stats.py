"""Triton backend of ``appo.token_stats(hidden=, weight=, tokens=, bias=)``: log p of the sampled token and
the full-vocabulary entropy from hidden states [N, H] and the LM-head weight [V, H], never allocating the
[N, V] logits, with a chunked backward. The op's home (its checks, the torch reference and its autograd
Function, the test oracle) is ``appo/ops/linear_token_stats.py``; the launcher here checks nothing.

Forward (``_forward_kernel``): a grid of (vocabulary splits) x (row blocks of BLOCK_N), the split the fastest
axis, so that the programs in flight share their hidden rows through L2. Each program walks its vocabulary
range tile by tile: a [BLOCK_N, BLOCK_V] logits tile from a software-pipelined K loop of tl.dot (wgmma on
sm_90), folded into the online statistics of each row (``kernels/_online_softmax.py``) along with the
sampled token's logit. The per-split partial statistics [S, N] merge in a few torch ops; the split count S
is chosen so that the S x (row blocks) programs fill whole waves of the GPU's SMs (``plan_splits``).

Backward (``_grad_logits_kernel`` + cuBLAS), per chunk of C rows: the kernel recomputes the chunk's logits
tile by tile from the saved row max and log-sum-exp and writes dz = g (onehot(a) - p) / T in the input
dtype into a [C, V] buffer; torch.matmul then computes grad_hidden[chunk] = dz @ weight and
grad_weight += dz.T @ hidden[chunk] with fp32 accumulation. Memory O(C V) + an fp32 [V, H] accumulator.

FLOPs: forward 2 N V H; backward 6 N V H (the recompute and two GEMMs). The speed model at the target sizes
and the sm_90 record: docs/kernels.md.

On the Triton CPU interpreter every tl.dot operand is cast to fp32 first (its bf16 dot is wrong) and the
GEMMs of the backward run in fp32 torch (CPU has no bf16 GEMM with fp32 output).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from appo.kernels._online_softmax import LN_2, LOG2_E, fold, lowest_shift

DZ_BUDGET_ELEMENTS = 2**30  # backward chunk: about this many dz elements (C x V)
GROUP_N = 8  # backward: row blocks per group in the grouped program order (L2 reuse of weight tiles)
# GPU tile configs (BLOCK_N, BLOCK_V, BLOCK_K, stages, warps) for bf16/fp16, tried by the small autotune on
# the first call per shape (forward and backward apart); each compiles for sm_90 without spills
# (bench/sm90_static.py, tests/kernels/test_sm90_static.py).
GPU_CONFIGS = ((128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (128, 128, 64, 4, 8))
GPU_FP32_CONFIG = (64, 64, 32, 2, 8)  # exact fp32 dots on CUDA cores: correctness, not speed
INTERPRETER_CONFIG = (16, 64, 32, 1, 4)


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, rows, cols, hidden_size, stride_hidden, stride_weight,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 NUM_STAGES: tl.constexpr,
                 EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc [BLOCK_N, BLOCK_V] fp32 = hidden[rows] @ weight[cols].T, rows and cols in bounds (int64 offsets).
    The K loop is software-pipelined (cp.async into shared memory, wgmma on sm_90)."""
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hidden + ks[None, :]
    w_ptrs = weight_ptr + cols.to(tl.int64)[None, :] * stride_weight + ks[:, None]  # [BLOCK_K, BLOCK_V]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in tl.range(0, hidden_size, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            h = tl.load(h_ptrs, mask=(k + ks < hidden_size)[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=(k + ks < hidden_size)[:, None], other=0.0)
        if UPCAST:
            acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(h, w, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _forward_kernel(hidden_ptr, weight_ptr, bias_ptr, tokens_ptr, partial_ptr,
                    num_rows, vocab_size, hidden_size, stride_hidden, stride_weight, scale, lowest,
                    tiles_per_split,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_K: tl.constexpr,
                    NUM_STAGES: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Partial statistics of rows [pid_n BLOCK_N, +BLOCK_N) over vocabulary split pid_s, into partial
    [4, S, N] fp32: m = max z, s = sum 2^((z - m) scale), t = sum 2^((z - m) scale) (z - m), z[a] (0 if the
    token is outside the split). z is the raw logit (with bias), scale = log2(e) / T."""
    pid_s = tl.program_id(0)  # fastest: programs in flight share the row block
    pid_n = tl.program_id(1)
    num_splits = tl.num_programs(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    safe_rows = tl.minimum(rows, num_rows - 1)  # rows past N recompute row N - 1, never stored
    tokens = tl.load(tokens_ptr + safe_rows).to(tl.int32)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    picked = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_col = pid_s * tiles_per_split * BLOCK_V
    last_col = tl.minimum(first_col + tiles_per_split * BLOCK_V, vocab_size)
    for v in range(first_col, last_col, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        z = _logits_tile(hidden_ptr, weight_ptr, safe_rows, tl.minimum(cols, vocab_size - 1), hidden_size,
                         stride_hidden, stride_weight, BLOCK_N, BLOCK_V, BLOCK_K, NUM_STAGES, EVEN_K, UPCAST,
                         PRECISION)
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=cols < last_col, other=0.0).to(tl.float32)[None, :]
        if v + BLOCK_V > last_col:  # the split's last, partial tile: columns past it have probability 0
            z = tl.where((cols < last_col)[None, :], z, float("-inf"))
        m, s, t = fold(z, m, s, t, scale, lowest, 1)
        picked += tl.sum(tl.where(cols[None, :] == tokens[:, None], z, 0.0), axis=1)
    out = partial_ptr + pid_s * num_rows + rows
    split_stride = num_splits * num_rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + split_stride, s, mask=row_ok)
    tl.store(out + 2 * split_stride, t, mask=row_ok)
    tl.store(out + 3 * split_stride, picked, mask=row_ok)


@triton.jit
def _grad_logits_kernel(hidden_ptr, weight_ptr, bias_ptr, tokens_ptr, max_ptr, log2_sum_ptr, upstream_ptr,
                        dz_ptr, first_row, chunk_rows, num_rows, vocab_size, hidden_size, stride_hidden,
                        stride_weight, stride_dz, scale,
                        HAS_BIAS: tl.constexpr, GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                        EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dz[r - first_row, cols] = g_r (onehot(a_r) - p_r) / T for rows [first_row, first_row + chunk_rows),
    in dz's dtype; p = 2^((z - m) scale - log2 s) with the forward's per-row m and log2 s. Grouped program
    order: GROUP_N row blocks share each weight tile while it is in L2."""
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(chunk_rows, BLOCK_N)
    vocab_tiles = tl.cdiv(vocab_size, BLOCK_V)
    group = pid // (GROUP_N * vocab_tiles)
    group_rows = tl.minimum(row_blocks - group * GROUP_N, GROUP_N)
    pid_n = group * GROUP_N + (pid % (GROUP_N * vocab_tiles)) % group_rows
    pid_v = (pid % (GROUP_N * vocab_tiles)) // group_rows

    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = first_row + local
    row_ok = local < chunk_rows
    safe_rows = tl.minimum(rows, num_rows - 1)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab_size
    z = _logits_tile(hidden_ptr, weight_ptr, safe_rows, tl.minimum(cols, vocab_size - 1), hidden_size,
                     stride_hidden, stride_weight, BLOCK_N, BLOCK_V, BLOCK_K, NUM_STAGES, EVEN_K, UPCAST,
                     PRECISION)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    row_max = tl.load(max_ptr + safe_rows)
    log2_sum = tl.load(log2_sum_ptr + safe_rows)
    grad_scale = tl.load(upstream_ptr + safe_rows) * (scale * LN_2)  # g / T
    tokens = tl.load(tokens_ptr + safe_rows).to(tl.int32)
    # (z - m) first: exact for nearby values, so p is exact where it is near 1; -inf logits give p = 0.
    probs = tl.exp2((z - row_max[:, None]) * scale - log2_sum[:, None])
    dz = (tl.where(cols[None, :] == tokens[:, None], 1.0, 0.0) - probs) * grad_scale[:, None]
    out = dz_ptr + local.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ------------------------------------------------------------------------------------------- launching
def _as_config(entry, hidden_size: int, upcast: bool, precision: str) -> dict:
    block_n, block_v, block_k, stages, warps = entry
    return dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=block_k, NUM_STAGES=stages, num_warps=warps,
                EVEN_K=hidden_size % block_k == 0, UPCAST=upcast, PRECISION=precision)


def candidate_configs(device: torch.device, dtype: torch.dtype, hidden_size: int) -> list[dict]:
    """Launch configs to try, in order: one on the interpreter and for fp32 (exact fp32 dots), the
    GPU_CONFIGS for bf16/fp16 on CUDA."""
    if device.type != "cuda":
        return [_as_config(INTERPRETER_CONFIG, hidden_size, True, "ieee")]
    if dtype == torch.float32:
        return [_as_config(GPU_FP32_CONFIG, hidden_size, False, "ieee")]
    return [_as_config(entry, hidden_size, False, "tf32") for entry in GPU_CONFIGS]


def _resident_programs(device: torch.device, config: dict, itemsize: int) -> int:
    """Programs the GPU runs at once: SMs x programs per SM, the latter bounded by the shared memory of the
    pipeline stages (228 KiB per SM on sm_90); 8 on the interpreter."""
    if device.type != "cuda":
        return 8
    properties = torch.cuda.get_device_properties(device)
    stage_bytes = (config["BLOCK_N"] + config["BLOCK_V"]) * config["BLOCK_K"] * itemsize
    per_sm = max(1, (228 * 1024) // (config["NUM_STAGES"] * stage_bytes + 1024))
    return properties.multi_processor_count * per_sm


def plan_splits(row_blocks: int, vocab_tiles: int, resident: int) -> int:
    """The vocabulary split count S that finishes the (S x row_blocks) programs soonest.

    Time is modelled as waves x tiles per program = ceil(S R / resident) ceil(tiles / S). Among the best
    S, the smallest wins (fewer programs in flight per row block: the weight is read from HBM about
    ceil(S R / resident) times in all). S is at least 8 when there are enough tiles, so that the row blocks
    in flight at once (resident / S) keep their hidden rows in L2.
    """
    best = None
    for splits in range(min(8, vocab_tiles), vocab_tiles + 1):
        cost = math.ceil(splits * row_blocks / resident) * math.ceil(vocab_tiles / splits)
        if best is None or cost < best[0]:
            best = (cost, splits)
    return best[1]


def _forward(hidden, weight, bias, tokens, temperature, config) -> tuple[Tensor, ...]:
    """-> (logprobs, entropy, row max of z, log2 of s), all fp32 [N]."""
    num_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    scale = LOG2_E / temperature
    row_blocks = triton.cdiv(num_rows, config["BLOCK_N"])
    vocab_tiles = triton.cdiv(vocab_size, config["BLOCK_V"])
    splits = plan_splits(row_blocks, vocab_tiles, _resident_programs(hidden.device, config,
                                                                     hidden.element_size()))
    tiles_per_split = triton.cdiv(vocab_tiles, splits)
    splits = triton.cdiv(vocab_tiles, tiles_per_split)
    partial = torch.empty(4, splits, num_rows, dtype=torch.float32, device=hidden.device)
    _forward_kernel[(splits, row_blocks)](
        hidden, weight, bias if bias is not None else hidden, tokens, partial,
        num_rows, vocab_size, hidden_size, hidden.stride(0), weight.stride(0), scale, lowest_shift(scale),
        tiles_per_split, HAS_BIAS=bias is not None, **config)
    part_max, part_sum, part_shifted, part_picked = partial.unbind(0)
    # Merge the splits as the kernel merges tiles: rescale every split's sums to the row max.
    row_max = part_max.max(dim=0).values
    ref = torch.where(row_max == -math.inf, 0.0, row_max)
    alpha = torch.exp2((part_max - ref) * scale)
    sums = (alpha * part_sum).sum(dim=0)
    shifted = (alpha * (part_shifted + torch.where(part_sum > 0, part_max - ref, 0.0) * part_sum)).sum(dim=0)
    log_sum = torch.log(sums)
    entropy = log_sum - (shifted / sums) / temperature
    logprobs = (part_picked.sum(dim=0) - row_max) / temperature - log_sum
    return logprobs, entropy, row_max, log_sum * LOG2_E


_TUNED: dict[tuple, dict] = {}


def _tuned_config(kind: str, key: tuple, candidates: list[dict], run) -> dict:
    """The fastest of ``candidates`` for ``run(config)`` (timed once per key, on CUDA only)."""
    if len(candidates) == 1:
        return candidates[0]
    if (kind, key) not in _TUNED:
        timings = [triton.testing.do_bench(lambda c=c: run(c), warmup=5, rep=20) for c in candidates]
        _TUNED[(kind, key)] = candidates[timings.index(min(timings))]
    return _TUNED[(kind, key)]


def _mm_accumulate(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """out (fp32, or the inputs' dtype) (+)= a @ b with fp32 accumulation: cuBLAS with an fp32 output for
    bf16/fp16 CUDA inputs (``addmm(..., out_dtype=torch.float32)``; a torch without it computes a @ b in the
    inputs' dtype and adds it in fp32), fp32 upcasts on the CPU (the interpreter path)."""
    if a.is_cuda and a.dtype != torch.float32 and out.dtype == torch.float32:
        if _HAS_OUT_DTYPE_ADDMM and accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        elif _HAS_OUT_DTYPE_ADDMM:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        elif accumulate:
            out += a @ b
        else:
            out.copy_(a @ b)
    elif accumulate:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))
    else:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


_HAS_OUT_DTYPE_ADDMM = all("dtype_out" in op.overloads() for op in (torch.ops.aten.addmm, torch.ops.aten.mm))


def backward_chunk_rows(vocab_size: int, block_n: int) -> int:
    """Rows per backward chunk: the largest power of two of at most DZ_BUDGET_ELEMENTS / V, >= BLOCK_N."""
    rows = max(block_n, DZ_BUDGET_ELEMENTS // vocab_size)
    return max(block_n, 1 << (rows.bit_length() - 1))


class _LinearTokenStatsTriton(torch.autograd.Function):
    """Saves hidden, weight, bias, tokens, row max and log2-sum-exp [N]; never the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, chunk_rows):
        configs = candidate_configs(hidden.device, hidden.dtype, hidden.shape[1])
        key = (hidden.device.index, hidden.dtype, hidden.shape[1], weight.shape[0], bias is not None,
               triton.next_power_of_2(hidden.shape[0]))
        config = _tuned_config("forward", key, configs,
                               lambda c: _forward(hidden, weight, bias, tokens, temperature, c))
        logprobs, entropy, row_max, log2_sum = _forward(hidden, weight, bias, tokens, temperature, config)
        ctx.save_for_backward(hidden, weight, bias, tokens, row_max, log2_sum)
        ctx.temperature, ctx.chunk_rows, ctx.key = temperature, chunk_rows, key
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        hidden, weight, bias, tokens, row_max, log2_sum = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        num_rows, hidden_size = hidden.shape
        vocab_size = weight.shape[0]
        upstream = grad_logprobs.float().contiguous()
        configs = candidate_configs(hidden.device, hidden.dtype, hidden_size)
        chunk = ctx.chunk_rows or backward_chunk_rows(vocab_size, max(c["BLOCK_N"] for c in configs))
        padded_vocab = triton.cdiv(vocab_size, 8) * 8  # 16-byte aligned dz rows for cuBLAS
        dz_buffer = torch.empty(min(chunk, num_rows), padded_vocab, dtype=hidden.dtype, device=hidden.device)
        scale = LOG2_E / ctx.temperature

        def launch(config, first_row, rows):
            grid = (triton.cdiv(rows, config["BLOCK_N"]) * triton.cdiv(vocab_size, config["BLOCK_V"]),)
            _grad_logits_kernel[grid](
                hidden, weight, bias if bias is not None else hidden, tokens, row_max, log2_sum, upstream,
                dz_buffer, first_row, rows, num_rows, vocab_size, hidden_size, hidden.stride(0),
                weight.stride(0), dz_buffer.stride(0), scale,
                HAS_BIAS=bias is not None, GROUP_N=GROUP_N, **config)

        config = _tuned_config("backward", ctx.key, configs, lambda c: launch(c, 0, min(chunk, num_rows)))
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_hidden32 = (torch.empty(min(chunk, num_rows), hidden_size, dtype=torch.float32,
                                     device=hidden.device) if need_hidden and hidden.dtype != torch.float32
                         else None)
        grad_weight32 = (torch.zeros(vocab_size, hidden_size, dtype=torch.float32, device=weight.device)
                         if need_weight else None)
        grad_bias32 = (torch.zeros(vocab_size, dtype=torch.float32, device=weight.device) if need_bias
                       else None)
        for start in range(0, num_rows, chunk):
            rows = min(chunk, num_rows - start)
            launch(config, start, rows)
            dz = dz_buffer[:rows, :vocab_size]
            if need_hidden:
                if grad_hidden32 is None:
                    _mm_accumulate(grad_hidden[start:start + rows], dz, weight, accumulate=False)
                else:
                    _mm_accumulate(grad_hidden32[:rows], dz, weight, accumulate=False)
                    grad_hidden[start:start + rows] = grad_hidden32[:rows]
            if need_weight:
                _mm_accumulate(grad_weight32, dz.T, hidden[start:start + rows], accumulate=True)
            if need_bias:
                grad_bias32 += dz.sum(dim=0, dtype=torch.float32)
        grad_weight = grad_weight32.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias32.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def linear_token_stats_triton(hidden: Tensor, weight: Tensor, tokens: Tensor, bias: Tensor | None = None,
                              temperature: float = 1.0, *, chunk_rows: int | None = None
                              ) -> tuple[Tensor, Tensor]:
    """Fused LM head + token statistics (Triton), never allocating [N, V]. Arguments as ``appo.token_stats``
    checked them (nothing is checked here).

    Args:
        hidden: [N, H] fp32/bf16/fp16 final hidden states (CUDA, or CPU under TRITON_INTERPRET=1).
        weight: [V, H] LM-head weight, same dtype and device as ``hidden``.
        tokens: [N] int64 sampled token ids in [0, V).
        bias: [V] same dtype, or None; -inf entries mask the vocabulary (probability 0).
        temperature: z = (hidden @ weight.T + bias) / temperature, > 0.
        chunk_rows: rows per backward chunk, a positive int (default: about 2^30 / V, a power of two); the
            backward's extra memory is chunk_rows x V elements of dz plus an fp32 [V, H] grad_weight
            accumulator.

    Returns:
        (logprobs fp32 [N], differentiable w.r.t. hidden/weight/bias, grads in the input dtypes;
         entropy fp32 [N], detached, over each row's finite support).
    """
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    return _LinearTokenStatsTriton.apply(hidden, weight, bias, tokens.contiguous(), float(temperature),
                                         chunk_rows)
