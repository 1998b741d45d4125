"""ARPO's branching rule (arXiv 2507.19849), the tree baseline of docs/method.md section 10.

After each tool result of a rollout, the mean full-vocabulary entropy of the next k generated tokens is
compared with the rollout's first-segment entropy (the mean over its first k generated tokens): dH = H_now -
H_init. The rollout is branched there (copied up to and including the result block, re-sampled after it) when
clip(U(0,1) - beta * dH, 0, 1) <= tau. Branches are capped so initial + branches never exceed the budget M per
prompt; ``fresh_rollouts_to_fill`` says how many fresh rollouts fill the rest. State is per step only: every
input comes from the current step's rollouts (no cross-step entropy cache).
"""

from __future__ import annotations

import torch


def _prefix_entropy_sums(entropy: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, S[q] = sum of the entropies of the first q generated tokens, for q = 0..T (fp64 [R, T+1]),
    and rank[t] = number of generated tokens before position t (int64 [R, T+1])."""
    generated = mask.long()
    rank = torch.nn.functional.pad(generated.cumsum(dim=1), (1, 0))
    masked_entropy = torch.where(mask, entropy.double(), 0.0)
    cumulative = torch.nn.functional.pad(masked_entropy.cumsum(dim=1), (1, 0))
    # cumulative[:, t] sums positions < t; the first t with rank[t] == q holds the sum of the first q tokens.
    first_position = torch.searchsorted(rank, torch.arange(rank.shape[1], device=rank.device)
                                        .expand(rank.shape[0], -1).contiguous())
    first_position = first_position.clamp(max=rank.shape[1] - 1)
    return cumulative.gather(1, first_position), rank


def arpo_branch_points(entropy: torch.Tensor, mask: torch.Tensor, result_spans: list[list[tuple[int, int]]],
                       group_ids: torch.Tensor, *, budget: int, generator: torch.Generator, k: int = 20,
                       beta: float = 0.2, tau: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ARPO branch points among the tool results of the current step's initial rollouts.

    entropy: float [R, T] full-vocab entropy of each token; mask: bool [R, T] generated tokens; result_spans:
    per rollout, the [start, end) token spans of its ``<result>`` blocks (``ToolCall.result_span``);
    group_ids: int64 [R] prompt ids; budget: M rollouts per prompt (initial + branches); generator: the source
    of the U(0,1) draws, one per tool result in (rollout, span) order. A result followed by no generated token
    is skipped (no draw). Returns (src, pos), int64 [K] each, sorted by (src, pos): branch from row ``src``
    keeping positions < ``pos`` (pos = the first position after the result block). Per prompt at most budget -
    (its initial rollouts) points are kept, the earliest tool calls first: every rollout's first call before
    any rollout's second (ARPO branches round by round), rows in order within a round.
    """
    if entropy.dim() != 2 or mask.shape != entropy.shape:
        raise ValueError(f"mask: expected the shape of entropy [R, T], got {tuple(mask.shape)} vs "
                         f"{tuple(entropy.shape)}")
    num_rows, width = entropy.shape
    if len(result_spans) != num_rows:
        raise ValueError(f"result_spans: expected {num_rows} lists, got {len(result_spans)}")
    if group_ids.shape != (num_rows,):
        raise ValueError(f"group_ids: expected shape ({num_rows},), got {tuple(group_ids.shape)}")
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if budget < 1:
        raise ValueError(f"budget: must be >= 1, got {budget}")
    device = entropy.device
    rows = [r for r, spans in enumerate(result_spans) for _ in spans]
    ends = [end for spans in result_spans for _, end in spans]
    rounds = [call for spans in result_spans for call in range(len(spans))]  # which call of its rollout
    if any(not 0 <= e <= width for e in ends):
        raise ValueError(f"result_spans: an end position lies outside [0, {width}]")
    empty = torch.empty(0, dtype=torch.long, device=device)
    if not rows:
        return empty, empty.clone()

    mask = mask.bool()
    sums, rank = _prefix_entropy_sums(entropy, mask)
    total = rank[:, -1]
    first_count = total.clamp(max=k)
    entropy_init = sums.gather(1, first_count[:, None]).squeeze(1) / first_count.clamp(min=1)

    src = torch.tensor(rows, dtype=torch.long, device=device)
    pos = torch.tensor(ends, dtype=torch.long, device=device)
    call_round = torch.tensor(rounds, dtype=torch.long, device=device)
    start_rank = rank[src, pos]
    end_rank = torch.minimum(start_rank + k, total[src])
    window = end_rank - start_rank
    entropy_now = (sums[src, end_rank] - sums[src, start_rank]) / window.clamp(min=1)
    measurable = window > 0
    src, pos, delta = src[measurable], pos[measurable], (entropy_now - entropy_init[src])[measurable]
    call_round = call_round[measurable]

    uniform = torch.rand(src.shape[0], generator=generator, dtype=torch.float64,
                         device=generator.device).to(device)
    chosen = (uniform - beta * delta).clamp(0.0, 1.0) <= tau
    src, pos, call_round = src[chosen], pos[chosen], call_round[chosen]
    by_round = torch.argsort(call_round * num_rows + src, stable=True)  # earliest calls first (then rows)
    src, pos = src[by_round], pos[by_round]
    keep = _within_budget(group_ids, src, budget)
    src, pos = src[keep], pos[keep]
    order = torch.argsort(src * (width + 1) + pos)
    return src[order], pos[order]


def _within_budget(group_ids: torch.Tensor, src: torch.Tensor, budget: int) -> torch.Tensor:
    """bool [K]: keep the first (budget - initial rollouts of the prompt) branch points of each prompt, in the
    order given."""
    _, dense_ids = torch.unique(group_ids, return_inverse=True)
    initial_per_group = torch.bincount(dense_ids)
    allowance = (budget - initial_per_group).clamp(min=0)
    branch_group = dense_ids[src]
    # Rank of each point within its group, preserving the (src, pos) order.
    one_hot = torch.nn.functional.one_hot(branch_group, num_classes=initial_per_group.numel())
    rank_in_group = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1
    return rank_in_group < allowance[branch_group]


def fresh_rollouts_to_fill(group_ids: torch.Tensor, branch_src: torch.Tensor, budget: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """How many fresh full rollouts each prompt needs so that initial + branches + fresh = budget.

    group_ids: int64 [R] prompt ids of the initial rollouts; branch_src: int64 [K] rows branched from (as
    returned by ``arpo_branch_points``); budget: M. Returns (prompt_ids [G] sorted, counts [G] int64 >= 0).
    """
    if budget < 1:
        raise ValueError(f"budget: must be >= 1, got {budget}")
    if branch_src.numel() and (branch_src.min() < 0 or branch_src.max() >= group_ids.shape[0]):
        raise ValueError("branch_src: row index outside group_ids")
    prompt_ids, dense_ids = torch.unique(group_ids, return_inverse=True)
    used = torch.bincount(dense_ids, minlength=prompt_ids.numel())
    used = used + torch.bincount(dense_ids[branch_src], minlength=prompt_ids.numel())
    return prompt_ids, (budget - used).clamp(min=0)
