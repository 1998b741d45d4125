"""appo's grouped-query SDPA gives transformers' sdpa results without copying the KV cache."""

import pytest
import torch

from appo.models import tiny_model


def _padded_batch(vocab, generator):
    ids = torch.randint(3, vocab, (3, 21), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0            # left padding
    mask[1, 15:] = 0           # right padding
    mask[2, 8:11] = 0          # a hole, as the rollout engine leaves after a short tool result
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    return ids, mask, positions


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_grouped_sdpa_matches_transformers_sdpa_prefill_decode_and_grads(arch):
    g = torch.Generator().manual_seed(0)
    model = tiny_model(arch, vocab_size=211, hidden_size=48, heads=6, kv_heads=2, seed=1)
    assert model.config._attn_implementation == "appo_sdpa"
    reference = tiny_model(arch, vocab_size=211, hidden_size=48, heads=6, kv_heads=2, seed=1)
    reference.set_attn_implementation("sdpa")
    ids, mask, positions = _padded_batch(211, g)

    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    ref = reference(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    valid = mask.bool()
    torch.testing.assert_close(out.logits[valid], ref.logits[valid], atol=1e-5, rtol=1e-5)

    step = torch.randint(3, 211, (3, 1), generator=g)
    step_mask = torch.cat([mask, torch.ones_like(step)], dim=1)
    step_pos = positions[:, -1:] + 1
    nxt = model(input_ids=step, attention_mask=step_mask, position_ids=step_pos, past_key_values=out.past_key_values)
    nxt_ref = reference(input_ids=step, attention_mask=step_mask, position_ids=step_pos,
                        past_key_values=ref.past_key_values)
    torch.testing.assert_close(nxt.logits, nxt_ref.logits, atol=1e-5, rtol=1e-5)

    weights = torch.randn(out.logits.shape, generator=g)
    (out.logits * weights)[valid].sum().backward()
    (ref.logits * weights)[valid].sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
