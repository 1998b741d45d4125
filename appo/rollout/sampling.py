"""Token sampling for the rollout engine: temperature + nucleus (top-p) sampling from fp32 logits.

The recorded log-probability is always the one of the temperature-scaled FULL distribution
``log softmax(z / temperature)[token]``, never the renormalised top-p distribution. That is what
``appo.token_stats(logits, tokens, temperature=...)`` computes from a later forward pass, so the pi_old of a
rollout and the pi_theta of the trainer are comparable. With ``top_p < 1`` the tokens are drawn from the
truncated distribution while their recorded log-probs ignore the truncation (a known, documented bias).

The entropy of the same full temperature-scaled distribution comes out of the same softmax at no extra pass
over the vocabulary; the rollout bundle records it per generated token (ARPO's branching rule reads it instead
of running another forward).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def check_sampling_args(temperature: float, top_p: float) -> None:
    """Raise ValueError unless ``temperature > 0`` and ``0 < top_p <= 1``."""
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")


class Sampled(NamedTuple):
    """One decoding step's draw: tokens int64 [B], their log-probs float32 [B], the distributions' entropy
    float32 [B] (all under the full softmax(z / temperature))."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor


def sample_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> Sampled:
    """Draw one token per row and return ``Sampled(tokens int64 [B], logprobs float32 [B], entropy float32 [B])``.

    logits: [B, V] any float dtype (upcast to fp32). Tokens are drawn from softmax(z / temperature),
    restricted to the smallest set of most likely tokens whose mass reaches ``top_p`` when ``top_p < 1``.
    The log-prob and the entropy are taken under the full temperature-scaled distribution (module docstring).
    """
    check_sampling_args(temperature, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [B, V], got shape {tuple(logits.shape)}")
    logprobs_full = torch.log_softmax(logits.float() / temperature, dim=-1)
    probs = logprobs_full.exp()
    # -sum p log p, with 0 * log 0 = 0 for tokens a logit processor masked to -inf
    entropy = -torch.where(probs > 0, probs * logprobs_full, 0.0).sum(dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return Sampled(tokens, logprobs_full.gather(-1, tokens[:, None]).squeeze(-1), entropy)
