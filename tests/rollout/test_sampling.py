"""Temperature / top-p sampling: drawn tokens follow the (truncated) distribution; log-probs are the full one."""

from __future__ import annotations

import pytest
import torch

from appo.rollout.sampling import sample_tokens


def test_logprobs_are_full_temperature_distribution(seeded):
    logits = torch.randn(5, 37, generator=seeded) * 3
    for temperature, top_p in [(1.0, 1.0), (0.6, 0.8), (1.7, 0.3)]:
        tokens, logprobs, entropy = sample_tokens(logits, temperature=temperature, top_p=top_p,
                                                  generator=seeded)
        full = torch.log_softmax(logits.double() / temperature, dim=-1)
        ref = full.gather(-1, tokens[:, None]).squeeze(-1)
        assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
        assert torch.allclose(logprobs.double(), ref, atol=1e-6)
        # the entropy is the full distribution's too, whatever top_p truncates
        assert torch.allclose(entropy.double(), -(full.exp() * full).sum(-1), atol=1e-5)


def test_entropy_with_vocabulary_masked_to_minus_inf(seeded):
    logits = torch.randn(4, 50, generator=seeded) * 2
    logits[:, 10:] = -torch.inf                          # a logit processor kept only 10 tokens
    _, logprobs, entropy = sample_tokens(logits, generator=seeded)
    kept = torch.log_softmax(logits[:, :10].double(), dim=-1)
    assert torch.isfinite(entropy).all() and torch.isfinite(logprobs).all()
    assert torch.allclose(entropy.double(), -(kept.exp() * kept).sum(-1), atol=1e-5)


def test_top_p_only_draws_from_the_nucleus(seeded):
    logits = torch.randn(3, 29, generator=seeded) * 2
    top_p, temperature = 0.55, 0.9
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs
    nucleus = [set(order[r][before[r] < top_p].tolist()) for r in range(3)]
    for _ in range(200):
        tokens, *_ = sample_tokens(logits, temperature=temperature, top_p=top_p, generator=seeded)
        assert all(t in nucleus[r] for r, t in enumerate(tokens.tolist()))


def test_frequencies_follow_the_distribution(seeded):
    logits = torch.randn(1, 7, generator=seeded).expand(4000, 7).contiguous()
    tokens, *_ = sample_tokens(logits, temperature=1.3, generator=seeded)
    freq = torch.bincount(tokens, minlength=7).double() / tokens.numel()
    expected = torch.softmax(logits[0].double() / 1.3, dim=-1)
    assert (freq - expected).abs().max() < 0.03


def test_bad_arguments_raise():
    logits = torch.randn(2, 5)
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(logits, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(logits, top_p=0.0)
    with pytest.raises(ValueError, match="logits"):
        sample_tokens(logits[0])
