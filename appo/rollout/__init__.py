"""Rollouts: the RolloutBatch bundle and the transformers rollout engine (multi-turn tools, branching)."""

from appo.rollout.batch import RolloutBatch, ToolCall, concat
from appo.rollout.config import RolloutConfig
from appo.rollout.engine import RolloutEngine, RolloutStats
from appo.rollout.sampling import Sampled, sample_tokens

__all__ = ["RolloutBatch", "RolloutConfig", "RolloutEngine", "RolloutStats", "Sampled", "ToolCall", "concat",
           "sample_tokens"]
