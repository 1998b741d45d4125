"""Test doubles for the rollout engine: a character tokenizer with tag tokens, a model wrapper that steers
sampling by adding a bias that depends only on the previous input token, and a small calculator tool."""

from __future__ import annotations

import string

import torch

from appo.tools.base import Tool

SPECIALS = ["<pad>", "<bos>", "<eos>", "<python>", "</python>", "<answer>", "</answer>", "<result>",
            "</result>", "<search>", "</search>"]


class CharTokenizer:
    """Ids 0..10 are whole tags (pad 0, eos 2); the rest are single printable characters."""

    def __init__(self):
        self.vocab = SPECIALS + list(string.printable[:95]) + ["\n"]
        self.ids = {tok: i for i, tok in enumerate(self.vocab)}
        self.pad_token_id, self.eos_token_id = 0, 2

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            tag = next((t for t in SPECIALS if text.startswith(t, i)), None)
            piece = tag or text[i]
            ids.append(self.ids[piece])
            i += len(piece)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        out = []
        for i in ids:
            tok = self.vocab[i] if i < len(self.vocab) else "\N{REPLACEMENT CHARACTER}"
            if skip_special_tokens and i in (0, 1, 2):
                continue
            out.append(tok)
        return "".join(out)


class SteeredModel(torch.nn.Module):
    """logits(next | ..., prev) = inner logits + strength * [next == successor[prev]].

    The bias depends only on the token at the same position, so a cached decode and a full forward over the
    finished sequence see the same logits (the property the alignment tests rely on)."""

    def __init__(self, inner, tokenizer: CharTokenizer, successors: dict[str, str], strength: float):
        super().__init__()
        self.inner, self.config = inner, inner.config
        vocab = inner.config.vocab_size
        bias = torch.zeros(vocab, vocab)
        for prev, nxt in successors.items():
            bias[tokenizer.ids[prev], tokenizer.ids[nxt]] = strength
        self.register_buffer("bias", bias)
        self.logits_seen: list[torch.Tensor] = []

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        out = self.inner(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
        keep = out.logits.shape[1]
        out.logits = out.logits + self.bias[input_ids[:, -keep:]]
        self.logits_seen.append(out.logits[:, -1].detach().clone())
        return out


class Calculator(Tool):
    """Evaluates arithmetic; pads each successive result with a growing run of spaces (ragged results)."""

    name = tag = "python"
    parallel = False

    def __init__(self):
        self.calls = 0

    def run(self, text: str) -> str:
        self.calls += 1
        try:
            value = str(eval(text, {"__builtins__": {}}))  # test double: inputs are the steered "6*7"
        except Exception as err:  # noqa: BLE001 - a tool returns its errors as text
            value = f"error: {err}"
        return value + " " * (3 * (self.calls % 4))
