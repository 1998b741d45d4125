"""Token statistics from logits, torch reference: log-prob of the sampled token and full-vocabulary entropy.

This is the oracle of the one-pass Triton kernel in ``kernels/token_stats.py`` and the backend that
``appo.token_stats`` uses off CUDA. It walks the rows in chunks so that its extra memory is
O(chunk_size x V), never O(N x V) as ``log_softmax`` over the whole batch would be.
"""

import torch
from torch import Tensor

# Rows per chunk are chosen so that one fp32 chunk holds about this many elements (128 MiB).
DEFAULT_CHUNK_ELEMENTS = 2**25
FLT_MAX = torch.finfo(torch.float32).max


def check_token_stats_args(logits: Tensor, tokens: Tensor, temperature: float) -> None:
    """Cheap metadata checks shared by both backends (no device sync, so token ids are not range-checked)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    if logits.shape[0] > 0 and logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must be contiguous along the vocabulary, got strides {logits.stride()}")
    if tokens.shape != (logits.shape[0],) or tokens.dtype != torch.int64:
        raise ValueError(f"tokens must be int64 of shape [{logits.shape[0]}], "
                         f"got {tokens.dtype} {tuple(tokens.shape)}")
    if tokens.device != logits.device:
        raise ValueError(f"tokens are on {tokens.device} but logits on {logits.device}")
    if not (temperature > 0.0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")


def token_stats_torch(logits: Tensor, tokens: Tensor, temperature: float = 1.0,
                      chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Log-prob of the sampled token and entropy of softmax(logits / temperature), row by row.

    Args:
        logits: [N, V] float32 / bfloat16 / float16, contiguous along V, any row stride.
        tokens: [N] int64, sampled token ids in [0, V) (not range-checked here; the dispatcher does it).
        temperature: positive divisor applied to the logits before the softmax.
        chunk_size: rows per chunk; default ``max(1, 2**25 // V)`` (about 220 rows at V = 152,064).

    Returns:
        (logprobs, entropy): both [N] float32, detached; entropy is over the finite support of each row
        (a -inf logit, e.g. a masked vocabulary entry, has probability 0 and adds 0 to the entropy).
        A row with NaN or +inf logits, or with no finite logit, gets a NaN entropy; a sampled token whose
        logit is -inf gets logprob -inf.

    Memory: O(chunk_size x V), never O(N x V): per chunk one fp32 log p buffer and one fp32 temporary for
    p (plus the scaled fp32 copy when temperature != 1), about 2-3 x chunk_size x V x 4 bytes (256-384 MiB
    at the default chunk).

    Bytes moved per logit (temperature 1): log_softmax reads the input (itemsize, up to 3 times when the row
    does not stay in cache) and writes 4; exp reads 4 and writes 4; the in-place multiply reads 8 and writes
    4; the sum reads 4. About itemsize + 28 bytes, against itemsize for the one-pass Triton kernel.
    """
    check_token_stats_args(logits, tokens, temperature)
    num_rows, vocab_size = logits.shape
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // vocab_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")

    logprobs = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for start in range(0, num_rows, chunk_size):
            stop = min(start + chunk_size, num_rows)
            rows = logits[start:stop]
            # log_softmax is z - logsumexp(z) with the row max subtracted first, fused in one kernel: both
            # terms stay small, so no digits are lost when the logits carry a large common offset.
            if temperature == 1.0:
                log_p = torch.log_softmax(rows, dim=-1, dtype=torch.float32)  # upcasts inside the kernel
            else:
                log_p = torch.log_softmax(rows.to(torch.float32) / temperature, dim=-1)
            logprobs[start:stop] = log_p.gather(1, tokens[start:stop, None]).squeeze(1)
            # entropy = lse - sum(p * z) = -sum(p * log p); the second form has no cancellation either.
            # log p = -inf (a -inf logit) has p = 0: clamped to -FLT_MAX so that 0 * log p is 0, not NaN
            # (clamp keeps NaN, so NaN logits still show).
            p = torch.exp(log_p)
            entropy[start:stop] = -p.mul_(log_p.clamp_(min=-FLT_MAX)).sum(dim=-1)
    return logprobs, entropy
