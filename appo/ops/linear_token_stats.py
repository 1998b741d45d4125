"""Token statistics straight from the LM head, ``appo.token_stats(hidden=, weight=, tokens=, bias=)``:
log p of the sampled token and the full-vocabulary entropy from hidden states and the LM-head weight,
without ever holding the [N, V] logits of all rows at once.

This file is the op's home: the checks of the LM-head form, the dispatch, and the torch reference with its
autograd Function (the test oracle, and the backend off CUDA). The Triton backend is
``kernels/linear_token_stats.py`` (``appo.kernels.linear_token_stats``), imported only when it is chosen.

    z = (hidden @ weight.T + bias) / temperature          fp32 accumulation, whatever the input dtype
    logprob_n = z[n, a_n] - lse_n,   entropy_n = lse_n - sum_j p_nj z_nj,   p = softmax(z)
    backward (logprobs only): dz = g (onehot(a) - p) / temperature,
        grad_hidden = dz @ weight,  grad_weight = dz.T @ hidden,  grad_bias = dz.sum(0)
"""

from __future__ import annotations

import torch
from torch import Tensor

from appo.ops._checks import check_finite_stats, check_float, check_same_device, check_tokens

DEFAULT_CHUNK_ROWS = 1024
FLT_MAX = torch.finfo(torch.float32).max


def check_args(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor | None) -> Tensor:
    """The checks of the LM-head form (ValueError naming the argument) -> tokens as int64.

    hidden [..., T, H] and weight [V, H] of one float dtype (fp32/bf16/fp16), V > 0 and H > 0; bias [V] of
    the same dtype, or None; tokens integer [..., T] with ids in [0, V); all on one device.
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() < 2:
        raise ValueError(f"hidden: expected shape [..., T, H] with at least 2 dims, "
                         f"got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight: expected V > 0 and H > 0, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: expected shape [V={weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias: dtype {bias.dtype} differs from hidden's {hidden.dtype}")
    tokens = check_tokens(tokens, hidden.shape[:-1], weight.shape[0], "hidden.shape[:-1]")
    check_same_device(hidden=hidden, weight=weight, bias=bias, tokens=tokens)
    return tokens


def stats_from_hidden(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor,
                      temperature: float, backend: str) -> tuple[Tensor, Tensor]:
    """(logprobs, entropy) fp32 with the tokens' shape, from arguments ``check_args`` passed; ``backend`` is
    "torch" or "triton". Non-finite statistics raise ValueError."""
    if backend == "triton":
        from appo.kernels.linear_token_stats import linear_token_stats_triton as rows_stats
    else:
        rows_stats = linear_token_stats_torch
    rows = hidden.reshape(-1, hidden.shape[-1])
    logprobs, entropy = rows_stats(rows, weight, tokens.reshape(-1), bias, temperature)
    check_finite_stats(logprobs.detach(), entropy, "hidden")
    return logprobs.view(tokens.shape), entropy.detach().view(tokens.shape)


def _chunk_logits(hidden_chunk: Tensor, weight32: Tensor, bias32: Tensor | None,
                  temperature: float) -> Tensor:
    """[c, H] any float dtype, weight32 [V, H] fp32, bias32 [V] fp32 or None -> z [c, V] fp32 (also under an
    enclosing autocast, which would otherwise run this matmul in bf16/fp16)."""
    with torch.autocast(hidden_chunk.device.type, enabled=False):
        logits = hidden_chunk.float() @ weight32.T
    if bias32 is not None:
        logits += bias32
    if temperature != 1.0:
        logits /= temperature
    return logits


class _LinearTokenStats(torch.autograd.Function):
    """Chunked forward/backward; saves hidden, weight, bias, tokens, row max and log-sum-exp [N] only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, chunk_size):
        num_rows = hidden.shape[0]
        weight32 = weight.float()
        bias32 = None if bias is None else bias.float()
        logprobs = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logprobs)
        row_max, log_sumexp = torch.empty_like(logprobs), torch.empty_like(logprobs)
        for start in range(0, num_rows, chunk_size):
            rows = slice(start, start + chunk_size)
            z = _chunk_logits(hidden[rows], weight32, bias32, temperature)
            row_max[rows] = z.max(dim=-1).values
            shifted = z.sub_(row_max[rows, None])
            log_sumexp[rows] = torch.exp(shifted).sum(dim=-1).log_()
            # log p = (z - max) - log sum e^(z - max): exact where p is large, unlike z - lse with lse
            # rounded at the logits' magnitude; entropy as -sum p log p avoids cancelling two large terms
            # on peaked rows.
            log_probs = shifted.sub_(log_sumexp[rows, None])
            logprobs[rows] = log_probs.gather(1, tokens[rows, None]).squeeze(1)
            # A -inf logit (a -inf bias entry masks the vocabulary) has p = 0 and adds 0, not 0 * -inf.
            probs = torch.exp(log_probs)
            entropy[rows] = -probs.mul_(log_probs.clamp_(min=-FLT_MAX)).sum(dim=-1)
        ctx.save_for_backward(hidden, weight, bias, tokens, row_max, log_sumexp)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        hidden, weight, bias, tokens, row_max, log_sumexp = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        weight32 = weight.float()
        bias32 = None if bias is None else bias.float()
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight32 = torch.zeros_like(weight32) if need_weight else None
        grad_bias32 = torch.zeros_like(bias32) if need_bias else None
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            z = _chunk_logits(hidden[rows], weight32, bias32, temperature)
            # dz = g * (onehot(a) - p) / temperature, built in place in the logits buffer.
            dz = z.sub_(row_max[rows, None]).sub_(log_sumexp[rows, None]).exp_().neg_()
            dz.scatter_add_(1, tokens[rows, None], torch.ones_like(row_max[rows, None]))
            dz.mul_(grad_logprobs[rows, None].float() / temperature)
            if need_hidden:
                grad_hidden[rows] = (dz @ weight32).to(hidden.dtype)
            if need_weight:
                grad_weight32.addmm_(dz.T, hidden[rows].float())
            if need_bias:
                grad_bias32 += dz.sum(dim=0)
        grad_weight = None if grad_weight32 is None else grad_weight32.to(weight.dtype)
        grad_bias = None if grad_bias32 is None else grad_bias32.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def linear_token_stats_torch(hidden: Tensor, weight: Tensor, tokens: Tensor, bias: Tensor | None = None,
                             temperature: float = 1.0,
                             chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """The torch reference: log-probability of the sampled token and full-vocabulary entropy from the LM head,
    in chunks of rows. Arguments as ``check_args`` passed them (nothing is checked here).

    Args:
        hidden: [N, H] fp32/bf16/fp16 final hidden states.
        weight: [V, H] LM-head weight, same dtype as ``hidden``.
        tokens: [N] int64 sampled token ids in [0, V).
        bias: [V] same dtype, or None; -inf entries mask the vocabulary (probability 0).
        temperature: z = (hidden @ weight.T + bias) / temperature, > 0.
        chunk_size: rows per chunk (a positive int, default 1024).

    Returns:
        (logprobs fp32 [N], differentiable w.r.t. hidden/weight/bias; entropy fp32 [N], detached).

    Memory: a few [chunk, V] fp32 blocks in forward and in backward (the logits are recomputed there from the
    saved row max and log-sum-exp), an fp32 copy of a bf16/fp16 ``weight`` and the fp32 grad_weight
    accumulator. It reads the fp32 weight once per chunk (ceil(N / chunk) V H 4 bytes) in each direction.
    """
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_ROWS
    return _LinearTokenStats.apply(hidden, weight, bias, tokens, float(temperature), chunk_size)
