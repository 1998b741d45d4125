"""Algorithms: advantages (GRPO, APPO dual-group, future-aware scaling), the clipped PPO loss, ARPO's
branching."""

from appo.algos.advantages import dual_group_advantages, future_aware_scaling, grpo_advantages
from appo.algos.arpo import arpo_branch_points, fresh_rollouts_to_fill
from appo.algos.losses import ppo_clip_loss

__all__ = ["arpo_branch_points", "dual_group_advantages", "fresh_rollouts_to_fill", "future_aware_scaling",
           "grpo_advantages", "ppo_clip_loss"]
