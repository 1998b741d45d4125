"""Advantages: GRPO's group z-score, APPO's dual-group token advantages (Eqs. 6-7) and the future-aware
scaling.

All functions are vectorised over rollouts and tokens (scatter / index_add, no Python loop over tokens) and
compute group statistics in fp64, returning fp32. "Population std" means correction 0, so a singleton group or
a group whose rewards are all equal gets advantage 0 everywhere.
"""

from __future__ import annotations

import torch


def _check_vector(name: str, value: torch.Tensor, length: int | None = None) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got {getattr(value, 'shape', type(value))}")
    if length is not None and value.shape[0] != length:
        raise ValueError(f"{name}: expected length {length}, got {value.shape[0]}")


def _group_zscore(values: torch.Tensor, group_ids: torch.Tensor, eps: float) -> torch.Tensor:
    """fp64 [R] z-score of ``values`` within each group of ``group_ids`` (population std + eps)."""
    _, dense_ids = torch.unique(group_ids, return_inverse=True)
    num_groups = int(dense_ids.max()) + 1 if dense_ids.numel() else 0
    values = values.double()
    counts = torch.zeros(num_groups, dtype=torch.float64, device=values.device)
    counts.index_add_(0, dense_ids, torch.ones_like(values))
    sums = torch.zeros_like(counts).index_add_(0, dense_ids, values)
    mean = (sums / counts)[dense_ids]
    centred = values - mean
    variance = torch.zeros_like(counts).index_add_(0, dense_ids, centred * centred) / counts
    return centred / (variance.sqrt()[dense_ids] + eps)


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantage per rollout: the reward's z-score within its prompt group.

    rewards: float [R]; group_ids: int64 [R] (rollouts of one prompt share an id, ids need not be contiguous).
    Returns fp32 [R]: (R - mean_g) / (std_g + eps), population std; 0 for singleton or all-equal groups.
    Broadcast it to the tokens of a rollout with ``adv[:, None]``.
    """
    _check_vector("rewards", rewards)
    _check_vector("group_ids", group_ids, rewards.shape[0])
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards: contains NaN or Inf")
    if rewards.numel() == 0:
        return rewards.float()
    return _group_zscore(rewards, group_ids, eps).float()


def dual_group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, parent: torch.Tensor,
                          branch_pos: torch.Tensor, mask: torch.Tensor, *, combine: str = "avg",
                          one_group: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """APPO's token-level base advantages of the INITIAL rollouts (docs/method.md section 7, Eqs. 6-7).

    Inputs describe R rollouts, initial (``parent == -1``) and branches, in one bundle:
      rewards    float [R]; group_ids int64 [R] (prompt id); parent int64 [R] (-1, or the row a branch came
      from, which must be an initial rollout); branch_pos int64 [R] (the position a branch re-sampled from, i.e.
      the first position it does not share with its parent; add 1 when the branch kept the chosen token);
      mask       bool  [R_init, T], the generated-token mask of the initial rollouts in row order.
    A_init(n) is the z-score over the initial rollouts of n's prompt; A_br(b) the z-score over ALL branches of
    the prompt. For token i of initial rollout n, C(n, i) = branches with parent n and branch_pos > i (i lies
    in their shared prefix). Empty C -> A_init(n); else combine="avg" -> (A_init(n) + mean_C A_br) / 2 [appo's
    reading, default], combine="sum" -> A_init(n) + mean_C A_br (the authors' code). ``one_group=True`` is the
    "w/o dual-group" ablation: initial rollouts and branches of a prompt are z-scored together and the initial
    rollout's value is broadcast to its tokens. Returns fp32 [R_init, T], 0 where ``mask`` is False. Row j is
    the j-th initial rollout of the bundle.
    """
    _check_vector("rewards", rewards)
    num_rows = rewards.shape[0]
    for name, value in (("group_ids", group_ids), ("parent", parent), ("branch_pos", branch_pos)):
        _check_vector(name, value, num_rows)
    if combine not in ("avg", "sum"):
        raise ValueError(f"combine: expected 'avg' or 'sum', got {combine!r}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards: contains NaN or Inf")
    is_initial = parent < 0
    initial_rows = torch.nonzero(is_initial).squeeze(1)
    branch_rows = torch.nonzero(~is_initial).squeeze(1)
    if mask.dim() != 2 or mask.shape[0] != initial_rows.numel():
        raise ValueError(f"mask: expected [R_init={initial_rows.numel()}, T], got {tuple(mask.shape)}")
    mask = mask.bool()
    if one_group:
        advantage = _group_zscore(rewards, group_ids, eps)[initial_rows]
        return (advantage[:, None] * mask).float()

    # Row index of each initial rollout inside the [R_init, T] output (-1 for branches).
    output_row = torch.full((num_rows,), -1, dtype=torch.long, device=rewards.device)
    output_row[initial_rows] = torch.arange(initial_rows.numel(), device=rewards.device)
    branch_parent = parent[branch_rows]
    if branch_rows.numel() and (branch_parent >= num_rows).any():
        raise ValueError("parent: index outside the bundle")
    parent_out = output_row[branch_parent]
    if (parent_out < 0).any():
        raise ValueError("parent: a branch's parent must be an initial rollout (one level of branching)")
    if (group_ids[branch_rows] != group_ids[branch_parent]).any():
        raise ValueError("group_ids: a branch must share its parent's prompt group")

    advantage_init = _group_zscore(rewards[initial_rows], group_ids[initial_rows], eps)
    base = advantage_init[:, None].expand(-1, mask.shape[1]).clone()
    if branch_rows.numel():
        advantage_branch = _group_zscore(rewards[branch_rows], group_ids[branch_rows], eps)
        positions = torch.arange(mask.shape[1], device=rewards.device)
        in_prefix = (positions[None, :] < branch_pos[branch_rows][:, None]).double()  # [R_br, T]
        branch_sum = torch.zeros(base.shape, dtype=torch.float64, device=rewards.device)
        branch_sum.index_add_(0, parent_out, in_prefix * advantage_branch[:, None])
        branch_count = torch.zeros_like(branch_sum).index_add_(0, parent_out, in_prefix)
        branch_mean = branch_sum / branch_count.clamp(min=1.0)
        combined = base + branch_mean
        if combine == "avg":
            combined = combined / 2
        base = torch.where(branch_count > 0, combined, base)
    return (base * mask).float()


def future_aware_scaling(base: torch.Tensor, future_value_clipped: torch.Tensor,
                         b: float = 0.5) -> torch.Tensor:
    """Procedure-level scaling: A = A_base * (1 + b * A_fut), with A_fut detached.

    base: float [R, T] base advantages; future_value_clipped: float [R, T], A_fut = clip(exp(s), 1.0, 1.2) as
    returned by ``appo.future_value(logprobs, old_logprobs, mask, clip=(1.0, 1.2))``. b=0 is the "w/o A_fut"
    ablation (returns ``base`` unchanged). Returns fp32 [R, T].
    """
    if base.shape != future_value_clipped.shape:
        raise ValueError(f"future_value_clipped: shape {tuple(future_value_clipped.shape)} does not match "
                         f"base {tuple(base.shape)}")
    if not torch.isfinite(future_value_clipped).all():
        raise ValueError("future_value_clipped: contains NaN or Inf")
    return (base * (1.0 + b * future_value_clipped.detach())).float()
