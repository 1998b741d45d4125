"""Token statistics straight from the LM head: log p(sampled token) and full-vocabulary entropy from hidden
states and the LM-head weight, without ever holding the [N, V] logits of all rows at once.

This is the torch reference of ``appo.kernels.linear_token_stats`` (the test oracle beside the kernel).

    z = (hidden @ weight.T + bias) / temperature          fp32 accumulation, whatever the input dtype
    logprob_n = z[n, a_n] - lse_n,   entropy_n = lse_n - sum_j p_nj z_nj,   p = softmax(z)

Memory: rows are processed ``chunk_size`` at a time, in forward AND backward, so the extra memory is a few
[chunk, V] fp32 blocks (the logits and elementwise temporaries), plus an fp32 copy of ``weight`` when it is
bf16/fp16 and the fp32 grad_weight accumulator in backward. The autograd Function saves only its inputs and
the per-row max and log-sum-exp (lse = max + log_sumexp, two fp32 [N]) and recomputes each chunk's logits in
backward.

Bytes moved: forward reads W (fp32) once per chunk, ceil(N / chunk) * V * H * 4 bytes, and writes/reads the
[chunk, V] fp32 block a few times; backward recomputes the same logits, then runs two matmuls per chunk
(2 * 2 * chunk * V * H flops) for grad_hidden and grad_weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_CHUNK_ROWS = 1024
FLT_MAX = torch.finfo(torch.float32).max


def check_linear_token_stats_inputs(hidden: Tensor, weight: Tensor, tokens: Tensor, bias: Tensor | None,
                                    temperature: float) -> None:
    """Raise ValueError naming the argument when shapes, dtypes, devices or token ids are wrong.

    hidden [N, H] and weight [V, H] of one float dtype (fp32/bf16/fp16), bias [V] or None of the same dtype,
    tokens int64 [N] with ids in [0, V), temperature a finite float > 0.
    """
    if not isinstance(hidden, Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a 2-D tensor [N, H], got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [V, H], got {getattr(weight, 'shape', type(weight))}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight [V, H] = {tuple(weight.shape)} does not match hidden H = {hidden.shape[1]}")
    if weight.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"weight must have V > 0 and H > 0, got {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if not isinstance(tokens, Tensor) or tokens.dtype != torch.int64 or tokens.shape != hidden.shape[:1]:
        raise ValueError(f"tokens must be int64 [N] = [{hidden.shape[0]}], got "
                         f"{getattr(tokens, 'dtype', type(tokens))} {tuple(getattr(tokens, 'shape', ()))}")
    if tokens.device != hidden.device:
        raise ValueError(f"tokens is on {tokens.device} but hidden is on {hidden.device}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= weight.shape[0]):
        raise ValueError(f"tokens must lie in [0, {weight.shape[0]}), got ids in "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must be a tensor [V] = [{weight.shape[0]}], got "
                             f"{tuple(getattr(bias, 'shape', ()))}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias must be {hidden.dtype} on {hidden.device}, "
                             f"got {bias.dtype} on {bias.device}")
    if not (isinstance(temperature, (int, float)) and 0.0 < float(temperature) < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


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
    """Log-probability of the sampled token and full-vocabulary entropy from the LM head, chunked over rows.

    Args:
        hidden: [N, H] fp32/bf16/fp16 final hidden states.
        weight: [V, H] LM-head weight, same dtype as ``hidden``.
        tokens: [N] int64 sampled token ids in [0, V).
        bias: [V] same dtype, or None.
        temperature: z = (hidden @ weight.T + bias) / temperature, > 0.
        chunk_size: rows per chunk (default 1024); extra memory is O(chunk_size * V) in forward and backward.

    Returns:
        (logprobs fp32 [N], differentiable w.r.t. hidden/weight/bias; entropy fp32 [N], detached).
    """
    check_linear_token_stats_inputs(hidden, weight, tokens, bias, temperature)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_ROWS
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return _LinearTokenStats.apply(hidden, weight, bias, tokens, float(temperature), chunk_size)
