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


def _lazy_exports(module: str, exports: dict[str, str], namespace: dict):
    """A module-level ``__getattr__`` (PEP 562) for ``module``: ``exports`` maps each lazily exported name to
    the module that defines it, imported on first access; the value is then kept in ``namespace`` (the
    module's globals), so later lookups do not come back here. appo.tools uses it too."""
    def __getattr__(name):
        if name in exports:
            value = namespace[name] = getattr(import_module(exports[name]), name)
            return value
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return __getattr__


__getattr__ = _lazy_exports(__name__, _EXPORTS, globals())


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
