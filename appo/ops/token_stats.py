"""Token statistics, ``appo.token_stats``: log p of the sampled token and the full-vocabulary entropy of
softmax(z / temperature), from logits [..., T, V] or straight from the LM head (hidden [..., T, H] and the
weight [V, H], never building the logits).

This file is the op's home: the public entry (both input forms), the only checks of its arguments, and the
torch reference of the logits form (the test oracle, and the backend off CUDA). The Triton backend is
``kernels/token_stats.py`` (installed as ``appo.kernels.token_stats``), imported only when it is chosen: the
core install has no triton. The LM-head form has its own home, ``appo/ops/linear_token_stats.py``.

Alignment: ``logits[..., t, :]`` (or ``hidden[..., t, :]``) is the distribution ``tokens[..., t]`` was sampled
from. With a Hugging Face causal LM, pass ``logits[:, :-1]`` with ``tokens[:, 1:]`` (a view: no copy).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from appo.ops import linear_token_stats
from appo.ops._checks import (check_finite_stats, check_float, check_same_device, check_temperature,
                              check_tokens, resolve_impl)

# Rows per chunk of the torch reference are chosen so that one fp32 chunk holds about this many elements.
DEFAULT_CHUNK_ELEMENTS = 2**25
FLT_MAX = torch.finfo(torch.float32).max


class TokenStats(NamedTuple):
    """Per-token statistics of softmax(z / temperature), both fp32 with the token shape [..., T].

    logprobs: log p of the sampled token (differentiable on the hidden/weight path).
    entropy:  full-vocabulary entropy -sum_j p_j log p_j (always detached).
    """

    logprobs: Tensor
    entropy: Tensor


class TokenStatsCall(NamedTuple):
    """The arguments of one ``token_stats`` call after its checks: ``logits``, or ``hidden`` + ``weight``
    (+ ``bias``); tokens int64; temperature a float; backend "torch" or "triton"."""

    logits: Tensor | None
    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    tokens: Tensor
    temperature: float
    backend: str


def token_stats(logits: Tensor | None = None, tokens: Tensor | None = None, *, hidden: Tensor | None = None,
                weight: Tensor | None = None, bias: Tensor | None = None, temperature: float = 1.0,
                impl: str = "auto") -> TokenStats:
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
    call = check_token_stats_args(logits, tokens, hidden, weight, bias, temperature, impl)
    return compute_token_stats(call)


def check_token_stats_args(logits, tokens, hidden, weight, bias, temperature, impl) -> TokenStatsCall:
    """The checks of ``token_stats`` (ValueError naming the argument; RuntimeError for a backend that cannot
    run here), apart from its computation so that ``appo.branching_score`` checks all its arguments first."""
    temperature = check_temperature(temperature)
    if logits is not None:
        if hidden is not None or weight is not None or bias is not None:
            raise ValueError("logits: pass either logits or hidden+weight(+bias), not both")
        check_float("logits", logits)
        if logits.dim() < 2:
            raise ValueError(f"logits: expected shape [..., T, V] with at least 2 dims, "
                             f"got {tuple(logits.shape)}")
        if logits.shape[-1] == 0:
            raise ValueError("logits: the vocabulary dimension is empty")
        tokens = check_tokens(tokens, logits.shape[:-1], logits.shape[-1], "logits.shape[:-1]")
        check_same_device(logits=logits, tokens=tokens)
        return TokenStatsCall(logits.detach(), None, None, None, tokens, temperature,
                              resolve_impl(impl, logits.device))
    if hidden is None or weight is None:
        raise ValueError("logits: pass logits=[..., T, V], or hidden=[..., T, H] together with weight=[V, H]")
    tokens = linear_token_stats.check_args(hidden, weight, bias, tokens)
    return TokenStatsCall(None, hidden, weight, bias, tokens, temperature, resolve_impl(impl, hidden.device))


def compute_token_stats(call: TokenStatsCall) -> TokenStats:
    """``token_stats`` of checked arguments: the backend's pass, then the check of its outputs."""
    if call.logits is None:
        return TokenStats(*linear_token_stats.stats_from_hidden(call.hidden, call.weight, call.bias,
                                                               call.tokens, call.temperature, call.backend))
    if call.backend == "triton":
        from appo.kernels.token_stats import token_stats_triton as rows_stats
    else:
        rows_stats = token_stats_torch
    logprobs = torch.empty(call.tokens.shape, dtype=torch.float32, device=call.logits.device)
    entropy = torch.empty_like(logprobs)
    if call.logits.numel() > 0:
        for index, rows in _row_views(call.logits):
            block_logprobs, block_entropy = rows_stats(rows, call.tokens[index].reshape(-1), call.temperature)
            logprobs[index] = block_logprobs.view(logprobs[index].shape)
            entropy[index] = block_entropy.view(entropy[index].shape)
    check_finite_stats(logprobs, entropy, "logits")
    return TokenStats(logprobs, entropy)


def _row_views(x: Tensor) -> list[tuple[tuple, Tensor]]:
    """Split [..., T, V] into 2-D row blocks without copying: one [N, V] view when the leading dims merge,
    else one [T, V] view per leading index. The vocabulary dim must have stride 1 (copied if not)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return [((), x.view(-1, x.shape[-1]))]
    except RuntimeError:
        leading = x.shape[:-2]
        return [(index, x[index]) for index in _ndindex(leading)]


def _ndindex(shape: torch.Size):
    if len(shape) == 0:
        yield ()
        return
    for i in range(shape[0]):
        for rest in _ndindex(shape[1:]):
            yield (i,) + rest


def token_stats_torch(logits: Tensor, tokens: Tensor, temperature: float = 1.0,
                      chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """The torch reference: log-prob of the sampled token and entropy of softmax(logits / temperature), in
    chunks of rows. Arguments as ``token_stats`` checked them (nothing is checked here).

    Args:
        logits: [N, V] float32 / bfloat16 / float16, contiguous along V, any row stride.
        tokens: [N] int64, sampled token ids in [0, V).
        temperature: positive divisor applied to the logits before the softmax.
        chunk_size: rows per chunk (a positive int); default ``max(1, 2**25 // V)`` (about 220 rows at
            V = 152,064).

    Returns:
        (logprobs, entropy): both [N] float32, detached; entropy is over the finite support of each row
        (a -inf logit, e.g. a masked vocabulary entry, has probability 0 and adds 0 to the entropy).
        A row with NaN or +inf logits, or with no finite logit, gets a NaN entropy; a sampled token whose
        logit is -inf gets logprob -inf.

    Memory O(chunk_size x V), never O(N x V): one fp32 log p buffer and one fp32 temporary per chunk (plus
    the scaled fp32 copy when temperature != 1), 256-384 MiB at the default chunk. It moves about
    itemsize + 28 bytes per logit (log_softmax, exp, multiply, sum), against itemsize for the Triton kernel.
    """
    num_rows, vocab_size = logits.shape
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // vocab_size)
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
