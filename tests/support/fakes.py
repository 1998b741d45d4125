"""Test doubles shared by the test suite (one definition each; ``from fakes import ...``: pyproject's pytest
``pythonpath`` puts tests/support on sys.path).

A character tokenizer with tag tokens; a model wrapper that steers sampling by adding a bias that depends only
on the previous input token; a model that writes a fixed script of tokens (any tokenizer); tools (a small
calculator, an echo that reverses its input, one with a fixed output); a toy task rewarded by its vowels.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from appo.tools.base import Tool

SPECIALS = ["<pad>", "<bos>", "<eos>", "<python>", "</python>", "<answer>", "</answer>", "<result>",
            "</result>", "<search>", "</search>"]


class CharTokenizer:
    """Ids 0..10 are whole tags (pad 0, eos 2): its special tokens, which ``encode`` always matches (it has no
    ``split_special_tokens``); the rest are single printable characters."""

    def __init__(self):
        self.vocab = SPECIALS + list(string.printable[:95]) + ["\n"]
        self.ids = {tok: i for i, tok in enumerate(self.vocab)}
        self.pad_token_id, self.eos_token_id = 0, 2
        self.all_special_tokens = list(SPECIALS)
        self.all_special_ids = list(range(len(SPECIALS)))

    def encode(self, text: str, add_special_tokens: bool = False, **options) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            tag = next((t for t in SPECIALS if text.startswith(t, i)), None)
            piece = tag or text[i]
            ids.append(self.ids[piece])
            i += len(piece)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False, **options) -> str:
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


class ScriptedModel(torch.nn.Module):
    """A model whose k-th forward call forces the k-th token of ``script`` (then EOS): one rollout at a time
    writes exactly the chosen tokens, with any tokenizer, at no compute. It keeps the KV cache the engine
    hands it growing (zeros, one slot per fed token) like a real model. The engine calls the model once per
    sampled token (a result block is fed in the call that samples the token after it), so the script reads as
    the model's text with the tool results left out."""

    def __init__(self, vocab_size: int, script: list[int], eos_id: int):
        from transformers import LlamaConfig

        super().__init__()
        self.config = LlamaConfig(vocab_size=vocab_size, hidden_size=8, intermediate_size=8,
                                  num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the engine takes its device from the parameters
        self.script, self.eos_id, self.calls = list(script), eos_id, 0

    def forward(self, input_ids, past_key_values=None, logits_to_keep=0, **kwargs):
        rows, width = input_ids.shape
        if past_key_values is not None:
            slots = torch.zeros(rows, 1, width, 2)
            past_key_values.update(slots, slots.clone(), 0)
        token = self.script[self.calls] if self.calls < len(self.script) else self.eos_id
        self.calls += 1
        logits = torch.full((rows, 1, self.config.vocab_size), -1e4)
        logits[..., token] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


class FixedOutput(Tool):
    """A tool that returns ``output`` whatever it is asked (what model code can print, or a poisoned corpus
    can hold), and records the queries it ran."""

    parallel = False

    def __init__(self, tag: str, output: str):
        self.name = self.tag = tag
        self.output, self.queries = output, []

    def run(self, text: str) -> str:
        self.queries.append(text)
        return self.output


class Echo(Tool):
    """Returns its input reversed (a tool result that differs from the call)."""

    name = tag = "python"

    def run(self, text: str) -> str:
        return text[::-1]


@dataclass
class Graded:
    score: float
    correct: float


class VowelTask:
    """Reward: the share of vowels in the response, so rewards differ between rollouts (correct above 5%)."""

    def reward(self, response: str, example) -> Graded:
        share = sum(ch in "aeiou" for ch in response) / max(len(response), 1)
        return Graded(share, float(share > 0.05))
