"""Algorithms: advantages (GRPO, APPO dual-group, future-aware scaling), the clipped PPO loss, ARPO's
branching rule, and the APPO chain (``appo.algos.chain``: score -> branch points -> advantages) that appo's
trainer, TRL and verl all call."""

from appo.algos.advantages import dual_group_advantages, future_aware_scaling, grpo_advantages
from appo.algos.arpo import arpo_branch_points, fresh_rollouts_to_fill
from appo.algos.chain import (APPOSettings, BranchPlan, dual_group_base, plan_branches, scale_by_future,
                              token_advantages)
from appo.algos.losses import ppo_clip_loss

__all__ = ["APPOSettings", "BranchPlan", "arpo_branch_points", "dual_group_advantages", "dual_group_base",
           "fresh_rollouts_to_fill", "future_aware_scaling", "grpo_advantages", "plan_branches",
           "ppo_clip_loss", "scale_by_future", "token_advantages"]
