"""appo: APPO (Agentic Procedural Policy Optimization) for tool-using LLM agents.

Public API (stable names other trainers call)::

    appo.token_stats(logits, tokens, *, temperature=1.0, impl="auto") -> TokenStats(logprobs, entropy)
    appo.token_stats(hidden=h, weight=W, tokens=t, bias=None, ...)     # fused LM head, never builds logits
    appo.future_value(logprobs, old_logprobs, mask, *, gamma=2**(-1/32), clip=None) -> Tensor
    appo.branching_score(*, tokens, old_logprobs, mask, logits=... | hidden=..., weight=... |
                         entropy=..., logprobs=..., ...) -> BranchingScore
    appo.select_branch_points(score, k, *, group_ids=None, per="rollout", min_gap=0) -> (rollout_idx, position)

Submodules are imported lazily, so ``import appo`` stays cheap (no Triton, no transformers).
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "token_stats": "appo.scoring",
    "future_value": "appo.scoring",
    "branching_score": "appo.scoring",
    "select_branch_points": "appo.scoring",
    "TokenStats": "appo.scoring",
    "BranchingScore": "appo.scoring",
    "RolloutBatch": "appo.rollout.batch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'appo' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
