"""The per-algorithm halves of a step (appo.algorithms) on a steered tiny model that calls a calculator."""

import re
import sys
from pathlib import Path

import pytest
import torch

from appo.algorithms import ALGORITHMS, APPO, ARPO, GRPO, StepContext, make_algorithm
from appo.config import ConfigError, load_config

sys.path.insert(0, str(Path(__file__).parent / "rollout"))
from test_engine import LOOP_SCRIPT, make_engine, prompts_for  # noqa: E402


def no_forward(*args, **kwargs):
    raise AssertionError("the rollout phase ran an extra policy forward")


def test_arpo_uses_the_engines_entropies_and_cache_no_extra_forward():
    """On the transformers backend ARPO's rollout phase runs no policy forward of its own: the entropies come
    from decoding, the branches decode from the kept decoding cache (no prefill over their prefixes), and
    fresh rollouts fill the budget to exactly M per prompt."""
    engine = make_engine(LOOP_SCRIPT, 9.0, max_tool_calls=3, max_total_tokens=120)
    config = load_config(None, ["algo.name=arpo", "algo.initial_rollouts=2", "algo.rollouts_per_prompt=5",
                                "algo.arpo.entropy_window=3", "algo.arpo.branch_threshold=0.9"])
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


@pytest.mark.parametrize("overrides, key, fragment", [
    (["algo.rollouts_per_prompt=5"], "algo.rollouts_per_prompt", "APPO needs M = (B + 1) * N"),
    (["algo.name=grpo", "algo.rollouts_per_prompt=1"], "algo.rollouts_per_prompt", "GRPO needs M >= 2"),
    (["algo.name=arpo", "algo.rollouts_per_prompt=1"], "algo.rollouts_per_prompt", "ARPO needs M >= 2"),
    (["algo.name=arpo", "algo.initial_rollouts=5"], "algo.initial_rollouts", "ARPO needs N <= M"),
    (["algo.name=grpo", "algo.warmup_update=true"], "algo.warmup_update", "needs algo.name=appo"),
    (["algo.warmup_update=true", "algo.branch_when=once_per_step"], "algo.warmup_update",
     "needs algo.branch_when=per_minibatch"),
])
def test_each_algorithm_checks_its_own_rules(overrides, key, fragment):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .*{re.escape(fragment)}"):
        load_config(None, overrides)


def test_the_rules_and_the_names_come_from_the_registry(monkeypatch):
    """A registered algorithm is a valid algo.name and its own check runs at load time: nothing in the config
    lists algorithm names or switches on them."""
    assert {"appo": APPO, "grpo": GRPO, "arpo": ARPO}.items() <= ALGORITHMS.items()

    class Triples(GRPO):
        @classmethod
        def check(cls, algo):
            super().check(algo)
            if algo.rollouts_per_prompt % 3:
                raise ConfigError("algo.rollouts_per_prompt", "Triples needs M divisible by 3")

    with pytest.raises(ConfigError, match=r"^algo\.name: expected one of \['grpo', 'arpo', 'appo'\]"):
        load_config(None, ["algo.name=triples"])
    monkeypatch.setitem(ALGORITHMS, "triples", Triples)
    with pytest.raises(ConfigError, match="Triples needs M divisible by 3"):
        load_config(None, ["algo.name=triples"])
    config = load_config(None, ["algo.name=triples", "algo.rollouts_per_prompt=6"])
    assert isinstance(make_algorithm(config), Triples)
