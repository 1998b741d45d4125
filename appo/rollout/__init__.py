"""Rollouts: the RolloutBatch bundle and the transformers rollout engine (multi-turn tools, branching)."""

from appo.rollout.batch import RolloutBatch, ToolCall, concat
from appo.rollout.engine import RolloutConfig, RolloutEngine, RolloutStats
from appo.rollout.sampling import Sampled, sample_tokens

__all__ = ["RolloutBatch", "RolloutConfig", "RolloutEngine", "RolloutStats", "ToolCall", "concat",
           "Sampled", "sample_tokens"]
