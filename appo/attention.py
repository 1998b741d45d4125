"""Grouped-query attention without copying the KV cache.

Hugging Face's ``sdpa`` attention repeats the keys and values of a grouped-query model (``repeat_kv``: a copy of
the whole cache, every layer, every decode step) whenever an attention mask is present, which is always the
case for padded batches. On the CPU that copy was about two thirds of a SmolLM2 decode step. Here the queries
are folded instead: the ``g`` query heads that share a KV head become ``g`` times as many query rows of that
KV head, and the mask rows are tiled to match. The same SDPA kernel then reads the cache in place.

``register_grouped_sdpa()`` registers this as the attention implementation ``"appo_sdpa"`` (with the
``sdpa`` mask builder); ``appo.models.load_model`` uses it for ``attn_implementation="sdpa"``.
"""

from __future__ import annotations

import torch

NAME = "appo_sdpa"


def grouped_query_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs):
    """Attention with the signature transformers expects of an attention function.

    query [B, H, q, d], key/value [B, H_kv, k, d] with H = g * H_kv, attention_mask [B or 1, 1, q, >= k] (bool
    or additive) -> (output [B, q, H, d], None). Falls back to transformers' sdpa where folding does not apply
    (no grouping, no mask: the mask-free path already uses SDPA's own GQA support).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (groups == 1 or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
            or kwargs.get("position_bias") is not None or kwargs.get("output_attentions", False)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    # head h = kv * g + r (transformers' repeat_kv layout) -> row r * q + i of KV head kv
    folded = query.reshape(batch, kv_heads, groups * q_len, dim)
    mask = attention_mask[:, :, :, :kv_len]
    mask = mask.expand(mask.shape[0], 1, q_len, kv_len).repeat(1, 1, groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


def register_grouped_sdpa() -> str:
    """Register ``"appo_sdpa"`` with transformers (idempotent) and return the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_query_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
