"""The rollout bundle: the one data structure that flows from the rollout engine to scoring, prefix caches,
advantages and the loss. Plain tensors plus per-rollout Python lists; no stage writes back into it.

Layout: row r holds prompt tokens then response tokens (model text and appended tool results), right-padded
with ``pad_id`` to a common length T. Position t of row r is sequence position t (no left padding), so a
forward pass over ``tokens`` with ``attention_mask = arange(T) < lengths[:, None]`` reproduces the positions
the tokens were sampled at.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ToolCall:
    """One tool call inside a rollout. Spans are token positions [start, end) in the rollout's row."""

    tag: str                    # "python", "search", ...
    query: str                  # text between the tags
    result: str                 # the tool's output as placed inside <result>...</result> (escaped)
    call_span: tuple[int, int]  # tokens of "<tag>...</tag>" (generated, mask 1)
    result_span: tuple[int, int]  # tokens of the appended "<result>...</result>" block (mask 0)


@dataclass
class RolloutBatch:
    """R rollouts padded to T tokens.

    Tensors (all on one device):
      tokens        int64   [R, T]  token ids, right-padded with ``pad_id``
      mask          bool    [R, T]  True where the model generated the token (never prompt, tool result, pad)
      behaviour_logprobs float32 [R, T]  log-prob of the token under the distribution the engine sampled it
                    from, as the engine computed it (0 where not mask). These are the behaviour policy's
                    log-probs; the trainer recomputes pi_old with its own forward (docs/method.md section 2, "Notation").
      lengths       int64   [R]     valid tokens per row (prompt + response)
      prompt_lengths int64  [R]     prompt tokens per row
      group_ids     int64   [R]     index of the prompt the rollout answers (rollouts of one prompt share it)
      rewards       float32 [R]     scalar reward per rollout
      parent        int64   [R]     -1 for an initial rollout; for a branch, the row it branched from
      branch_pos    int64   [R]     -1 for an initial rollout; for a branch, the position re-sampled from
    Optional tensor:
      entropy       float32 [R, T]  full-vocabulary entropy of the sampling distribution at each generated
                    token, recorded while decoding (0 where not mask); None when the backend never sees the
                    whole distribution (vLLM returns top-k log-probs only).
    Per-rollout lists (length R): tool_calls, answers (None when the rollout gave none), finish_reasons
    ("answer", "eos", "length", "tool_limit", "error"), texts (the graded text of the response:
    ``appo.rollout.tool_loop.graded_text``, the model's own tokens with each tool result an empty
    ``<result></result>`` block; ``ToolCall.result`` keeps what the tool returned), correct (task metric).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    behaviour_logprobs: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    group_ids: torch.Tensor
    rewards: torch.Tensor
    parent: torch.Tensor
    branch_pos: torch.Tensor
    pad_id: int
    tool_calls: list[list[ToolCall]] = field(default_factory=list)
    answers: list[str | None] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    correct: list[float] = field(default_factory=list)
    entropy: torch.Tensor | None = None

    @property
    def num_rollouts(self) -> int:
        return self.tokens.shape[0]

    def attention_mask(self) -> torch.Tensor:
        """int64 [R, T]: 1 on the valid (non-pad) tokens of each row."""
        positions = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return (positions[None, :] < self.lengths[:, None]).long()

    def to(self, device) -> "RolloutBatch":
        moved = {name: getattr(self, name).to(device) for name in _TENSOR_FIELDS}
        entropy = self.entropy.to(device) if self.entropy is not None else None
        return RolloutBatch(**moved, pad_id=self.pad_id, tool_calls=self.tool_calls, answers=self.answers,
                            finish_reasons=self.finish_reasons, texts=self.texts, correct=self.correct,
                            entropy=entropy)


_TENSOR_FIELDS = ("tokens", "mask", "behaviour_logprobs", "lengths", "prompt_lengths", "group_ids", "rewards",
                  "parent", "branch_pos")


def concat(batches: list[RolloutBatch]) -> RolloutBatch:
    """Stack several bundles row-wise (re-padding to the longest T). ``parent`` indices are kept as they are."""
    if not batches:
        raise ValueError("batches: need at least one RolloutBatch")
    pad_id = batches[0].pad_id
    width = max(b.tokens.shape[1] for b in batches)

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    out = {}
    for name in _TENSOR_FIELDS:
        parts = [getattr(b, name) for b in batches]
        if parts[0].dim() == 2:
            value = pad_id if name == "tokens" else (False if name == "mask" else 0.0)
            parts = [pad(p, value) for p in parts]
        out[name] = torch.cat(parts)
    lists = {name: [x for b in batches for x in getattr(b, name)]
             for name in ("tool_calls", "answers", "finish_reasons", "texts", "correct")}
    entropy = None
    if all(b.entropy is not None for b in batches):
        entropy = torch.cat([pad(b.entropy, 0.0) for b in batches])
    return RolloutBatch(**out, pad_id=pad_id, **lists, entropy=entropy)
