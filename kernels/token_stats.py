"""Triton backend of ``appo.token_stats`` from logits: log p of the sampled token and the full-vocabulary
entropy, each logit read once. The op's home (its checks, the torch reference it is tested against) is
``appo/ops/token_stats.py``; the launcher here checks nothing.

Per row, every thread folds the logits it loads into its own running (m, s, t) (the online softmax of
``kernels/_online_softmax.py``; no shuffles or barriers in the loop), and after the loop the threads' values
merge into the row's. Full tiles of K x THREADS x VEC logits (thread i holds K runs of VEC contiguous
logits, one 16-byte load each; neighbouring threads neighbouring runs) run without masks in a
software-pipelined ``tl.range`` (3 stages); one masked tile handles the tail. Row offsets are int64
(N x V passes 2^31).

Bytes: N V itemsize of logits read once, 8 N of tokens, 8 N written. Speed model and the sm_90 machine-code
record: docs/kernels.md.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from appo.kernels._online_softmax import LN_2, LOG2_E, fold, lowest_shift, merge

# One config (no autotune, so the interpreter runs it). A tile of 8192 values over 8 warps is 32 values per
# thread (four 16-byte loads of bf16). For small V several rows share a program (see launch_config).
TILE_ELEMENTS = 8192
NUM_WARPS = 8
NUM_STAGES = 3
ROWS_PER_PROGRAM = 8


@triton.jit
def _per_thread(z, ROWS: tl.constexpr, K: tl.constexpr, THREADS: tl.constexpr, VEC: tl.constexpr):
    """[ROWS, K, THREADS * VEC] -> [ROWS, THREADS, K * VEC]: each thread's logits on the last axis (a
    relabelling of registers, no data movement)."""
    runs = tl.permute(tl.reshape(z, (ROWS, K, THREADS, VEC)), (0, 2, 1, 3))
    return tl.reshape(runs, (ROWS, THREADS, K * VEC))


@triton.jit
def _token_stats_kernel(logits_ptr, tokens_ptr, logprobs_ptr, entropy_ptr,
                        num_rows, vocab_size, row_stride, scale, lowest,
                        ROWS: tl.constexpr, K: tl.constexpr, THREADS: tl.constexpr, VEC: tl.constexpr,
                        NUM_STAGES: tl.constexpr):
    """ROWS rows per program (1 for real vocabularies). A tile is K x THREADS x VEC logits of each row:
    thread i holds K runs of VEC contiguous logits (one 16-byte load each), neighbouring threads
    neighbouring runs (coalesced)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_valid = rows < num_rows
    # Rows past the end re-read the last row (in bounds) and are not stored: no row mask on the loads.
    safe_rows = tl.minimum(rows, num_rows - 1).to(tl.int64)
    row_ptrs = logits_ptr + safe_rows * row_stride  # int64 offsets: T x V passes 2^31
    BLOCK_V: tl.constexpr = K * THREADS * VEC
    columns = tl.arange(0, K)[:, None] * (THREADS * VEC) + tl.arange(0, THREADS * VEC)[None, :]
    ptrs = row_ptrs[:, None, None] + columns[None, :, :]  # [ROWS, K, THREADS * VEC]

    m = tl.full((ROWS, THREADS), float("-inf"), tl.float32)
    s = tl.zeros((ROWS, THREADS), tl.float32)
    t = tl.zeros((ROWS, THREADS), tl.float32)
    full_end = (vocab_size // BLOCK_V) * BLOCK_V
    for v_start in tl.range(0, full_end, BLOCK_V, num_stages=NUM_STAGES):  # cp.async pipeline on GPUs
        z = tl.load(ptrs + v_start)
        m, s, t = fold(_per_thread(z.to(tl.float32), ROWS, K, THREADS, VEC), m, s, t, scale, lowest, 2)
    if full_end < vocab_size:
        in_row = (full_end + columns < vocab_size)[None, :, :]
        z = tl.load(ptrs + full_end, mask=in_row, other=float("-inf"))
        m, s, t = fold(_per_thread(z.to(tl.float32), ROWS, K, THREADS, VEC), m, s, t, scale, lowest, 2)
    m, s, t = merge(m, s, t, scale, 1)

    tokens = tl.load(tokens_ptr + safe_rows)
    z_token = tl.load(row_ptrs + tokens).to(tl.float32)
    log_s = LN_2 * tl.log2(s)
    inv_temperature = LN_2 * scale
    tl.store(logprobs_ptr + rows, (z_token - m) * inv_temperature - log_s, mask=row_valid)
    tl.store(entropy_ptr + rows, log_s - (t / s) * inv_temperature, mask=row_valid)


def launch_config(vocab_size: int, itemsize: int, interpreted: bool = False) -> dict:
    """Tile shape (ROWS, K, THREADS, VEC), warps and pipeline stages for rows of ``vocab_size`` logits.

    VEC logits make one 16-byte load. A row's tile holds up to TILE_ELEMENTS logits, 32 per thread over
    NUM_WARPS warps; a small vocabulary gets fewer threads (down to one warp) and runs (down to one), and
    several rows per program while a thread holds at most 32 logits of a tile. The CPU interpreter, whose
    cost is per program and per op rather than per register, takes up to 8 rows per program regardless.
    """
    vec = 16 // itemsize
    runs_of_vec = triton.next_power_of_2(triton.cdiv(vocab_size, vec))
    threads = min(32 * NUM_WARPS, max(32, runs_of_vec // 4))
    runs = min(TILE_ELEMENTS // (threads * vec), max(1, runs_of_vec // threads))
    rows = max(1, min(ROWS_PER_PROGRAM, (TILE_ELEMENTS // threads if interpreted else 32) // (runs * vec)))
    return {"ROWS": rows, "K": runs, "THREADS": threads, "VEC": vec, "NUM_STAGES": NUM_STAGES,
            "num_warps": threads // 32}


def token_stats_triton(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Log-prob of the sampled token and entropy of softmax(logits / temperature), one pass over the logits.
    Arguments as ``appo.token_stats`` checked them (nothing is checked here).

    Args:
        logits: [N, V] float32 / bfloat16 / float16 (CUDA, or CPU under TRITON_INTERPRET=1), contiguous
            along V, any row stride. -inf entries (masked vocabulary) have probability 0.
        tokens: [N] int64 in [0, V), same device (an id outside the vocabulary would read out of bounds).
        temperature: positive divisor applied to the logits before the softmax.

    Returns:
        (logprobs, entropy): both [N] float32, detached; entropy is over the finite support of each row.
        A row with NaN or +inf logits, or with no finite logit, gets a NaN entropy; a sampled token whose
        logit is -inf gets logprob -inf.

    Reads N x V x itemsize bytes of logits once plus 8 N bytes of tokens, writes 8 N bytes.
    """
    num_rows, vocab_size = logits.shape
    logprobs = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return logprobs, entropy

    config = launch_config(vocab_size, logits.element_size(), interpreted=logits.device.type != "cuda")
    _token_stats_kernel[(triton.cdiv(num_rows, config["ROWS"]),)](
        logits.detach(), tokens.contiguous(), logprobs, entropy,
        num_rows, vocab_size, logits.stride(0), LOG2_E / temperature, lowest_shift(LOG2_E / temperature),
        **config,
    )
    return logprobs, entropy
