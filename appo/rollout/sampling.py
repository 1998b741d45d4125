"""Token sampling for the rollout engine: temperature + nucleus (top-p) sampling from fp32 logits.

The recorded log-probability is always the one of the temperature-scaled FULL distribution
``log softmax(z / temperature)[token]``, never the renormalised top-p distribution. That is what
``appo.token_stats(logits, tokens, temperature=...)`` computes from a later forward pass, so the pi_old of a
rollout and the pi_theta of the trainer are comparable. With ``top_p < 1`` the tokens are drawn from the
truncated distribution while their recorded log-probs ignore the truncation (a known, documented bias).
"""

from __future__ import annotations

import torch


def check_sampling_args(temperature: float, top_p: float) -> None:
    """Raise ValueError unless ``temperature > 0`` and ``0 < top_p <= 1``."""
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")


def sample_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row and return ``(tokens int64 [B], logprobs float32 [B])``.

    logits: [B, V] any float dtype (upcast to fp32). Tokens are drawn from softmax(z / temperature),
    restricted to the smallest set of most likely tokens whose mass reaches ``top_p`` when ``top_p < 1``.
    The log-prob is taken under the full temperature-scaled distribution (see the module docstring).
    """
    check_sampling_args(temperature, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [B, V], got shape {tuple(logits.shape)}")
    logprobs_full = torch.log_softmax(logits.float() / temperature, dim=-1)
    probs = logprobs_full.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs_full.gather(-1, tokens[:, None]).squeeze(-1)
