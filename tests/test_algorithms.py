"""The per-algorithm halves of a step (appo.algorithms) on a steered tiny model that calls a calculator."""

import sys
from pathlib import Path

import torch

from appo.algorithms import ARPO, StepContext, make_algorithm
from appo.config import load_config

sys.path.insert(0, str(Path(__file__).parent / "rollout"))
from test_engine import LOOP_SCRIPT, make_engine, prompts_for  # noqa: E402


def no_forward(*args, **kwargs):
    raise AssertionError("the rollout phase ran an extra policy forward")


def test_arpo_uses_the_engines_entropies_and_cache_no_extra_forward():
    """On the transformers backend ARPO's rollout phase runs no policy forward of its own: the entropies come
    from decoding, the branches decode from the kept decoding cache (no prefill over their prefixes), and
    fresh rollouts fill the budget to exactly M per prompt."""
    engine = make_engine(LOOP_SCRIPT, 9.0, max_tool_calls=3, max_total_tokens=120)
    config = load_config(None, ["algo.algo=arpo", "algo.N=2", "algo.M=5", "algo.arpo_k=3", "algo.arpo_tau=0.9"])
    algorithm = make_algorithm(config)
    assert isinstance(algorithm, ARPO)
    ctx = StepContext(engine=engine, score=lambda g, text: (float(len(text) % 3), 0.0), forward=no_forward,
                      generator=torch.Generator().manual_seed(0), model_dtype=torch.float32)
    seen = []
    continue_branches = engine.continue_branches

    def spy(batch, src, pos, **kwargs):
        assert kwargs.get("past_key_values") is not None, "ARPO branches must decode from a gathered cache"
        before = engine.stats.prefill_tokens
        out = continue_branches(batch, src, pos, **kwargs)
        seen.append(engine.stats.prefill_tokens - before)
        return out

    engine.continue_branches = spy
    prompts = prompts_for(engine, 3)
    batch, info = algorithm.rollouts(ctx, prompts, [0, 1, 2])
    assert info["branches"] > 0 and seen == [0]
    assert batch.num_rollouts == 3 * 5 and info["trajectories"] == 15
    assert torch.bincount(batch.group_ids).tolist() == [5, 5, 5]
    branches = batch.parent >= 0
    for k in branches.nonzero().flatten().tolist():     # a branch copies its parent up to its tool result
        parent, pos = int(batch.parent[k]), int(batch.branch_pos[k])
        assert torch.equal(batch.tokens[k, :pos], batch.tokens[parent, :pos])
        assert any(call.result_span[1] == pos for call in batch.tool_calls[parent])
