"""The APPO chain (appo.algos.chain): branch plans with an exact budget, and separate BS / A_fut settings."""

import math

import pytest
import torch

from appo.algos import APPOSettings, dual_group_base, plan_branches, scale_by_future, token_advantages
from appo.scoring import branching_score


def bundle(seed=0, rows=4, width=23, groups=(0, 0, 1, 1)):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (rows, width), generator=gen)
    mask = torch.zeros(rows, width, dtype=torch.bool)
    for r in range(rows):
        mask[r, 3:width - 2 * r] = True                   # ragged responses after a 3-token prompt
    mask[1, 9:12] = False                                 # a tool result inside row 1
    old = -torch.rand(rows, width, generator=gen) * 3
    shift = 0.3 * torch.randn(rows, width, generator=gen)  # pi_theta moved after an update
    entropy = torch.rand(rows, width, generator=gen) * 2 + 0.1
    return tokens, mask, torch.tensor(groups), old + shift, old, entropy


def plan(settings, tokens, mask, groups, logprobs, old, entropy):
    return plan_branches(settings, tokens=tokens, mask=mask, group_ids=groups, logprobs=logprobs,
                         old_logprobs=old, entropy=entropy)


@pytest.mark.parametrize("per", ["rollout", "group"])
@pytest.mark.parametrize("B", [1, 2, 5, 9])
def test_every_group_gets_exactly_its_budget(per, B):
    tokens, mask, groups, logprobs, old, entropy = bundle()
    result = plan(APPOSettings(branches_per_rollout=B, per=per), tokens, mask, groups, logprobs, old, entropy)
    for g in (0, 1):
        assert int((groups[result.src] == g).sum()) == B * 2
    assert bool(mask[result.src, result.pos].all())                       # only generated tokens
    keys = (result.src * mask.shape[1] + result.pos).tolist()
    assert keys == sorted(keys)                                            # sorted by (row, position)
    assert result.chosen + result.filled == result.src.numel()
    assert torch.equal(result.shared, result.pos)


def test_fill_takes_the_groups_next_best_tokens_then_entropy_then_fresh_responses():
    tokens, mask, groups, logprobs, old, entropy = bundle()
    settings = APPOSettings(branches_per_rollout=2)
    score = branching_score(tokens=tokens, old_logprobs=old, mask=mask, entropy=entropy, logprobs=logprobs)
    result = plan(settings, tokens, mask, groups, logprobs, old, entropy)
    # the Branching Score's own choice: each row's top-2 candidates come first, untouched by the fill rule
    for r in range(4):
        finite = torch.isfinite(score.score[r])
        want = set(torch.topk(torch.where(finite, score.score[r], -torch.inf), min(2, int(finite.sum())))
                   .indices.tolist())
        assert want <= set(result.pos[result.src == r].tolist())
    # a huge budget: every branchable token of a group is used once, the rest are fresh responses
    big = plan(APPOSettings(branches_per_rollout=25), tokens, mask, groups, logprobs, old, entropy)
    expected_fresh = 0
    for rows in ([0, 1], [2, 3]):
        branchable = {(r, p) for r in rows for p in mask[r].nonzero().flatten().tolist()[:-1]}
        points = [(s, p) for s, p in zip(big.src.tolist(), big.pos.tolist()) if s in rows]
        assert len(points) == 25 * 2 and branchable <= set(points)      # every branchable token once ...
        extra = [pt for pt in points if pt not in branchable or points.count(pt) > 1]
        assert all(p == int(mask[s].nonzero()[0]) for s, p in extra)     # ... the rest at a response's start
        expected_fresh += 25 * 2 - len(branchable)
    assert big.fresh == expected_fresh > 0
    # the fill rule against an independent transcription: remaining candidates by score, then the other
    # non-last generated tokens by entropy, highest first, over the whole group
    for B in (3, 4, 6):
        result = plan(APPOSettings(branches_per_rollout=B), tokens, mask, groups, logprobs, old, entropy)
        values = result.score.score
        for rows in ([0, 1], [2, 3]):
            chosen = set()
            for r in rows:
                finite = torch.isfinite(values[r]).nonzero().flatten().tolist()
                chosen |= {(r, p) for p in sorted(finite, key=lambda p: (-float(values[r, p]), p))[:B]}
            pool = [(r, p) for r in rows for p in mask[r].nonzero().flatten().tolist()[:-1] if (r, p) not in chosen]
            pool.sort(key=lambda rp: (not bool(torch.isfinite(values[rp])),
                                      -float(values[rp] if torch.isfinite(values[rp]) else entropy[rp]), rp))
            want = chosen | set(pool[:B * len(rows) - len(chosen)])
            got = {(s, p) for s, p in zip(result.src.tolist(), result.pos.tolist()) if s in rows}
            assert got == want, (B, rows)


def test_a_group_whose_rows_hold_no_generated_token_gets_no_branch():
    tokens, mask, groups, logprobs, old, entropy = bundle()
    mask[2:] = False                                     # group 1 entirely masked (e.g. truncated completions)
    result = plan(APPOSettings(branches_per_rollout=2), tokens, mask, groups, logprobs, old, entropy)
    assert set(result.src.tolist()) <= {0, 1} and result.src.numel() == 4


def test_no_policy_shift_falls_back_to_entropy_only_bit_for_bit():
    tokens, mask, groups, _, old, entropy = bundle()
    result = plan(APPOSettings(branches_per_rollout=2), tokens, mask, groups, old.clone(), old, entropy)
    assert result.entropy_only_fraction == 1.0
    shifted = plan(APPOSettings(branches_per_rollout=2), tokens, mask, groups, old + 1e-6 * torch.randn_like(old),
                   old, entropy)
    assert shifted.entropy_only_fraction < 1.0   # any difference, even noise, would drive the score


def test_branching_score_settings_and_future_value_settings_are_independent():
    tokens, mask, groups, logprobs, old, entropy = bundle(seed=3)
    paper = APPOSettings(branches_per_rollout=2)
    new_fut = APPOSettings(branches_per_rollout=2, fut_gamma=2 ** (-1 / 64), fut_clip=(1.0, 1.5))
    new_bs = APPOSettings(branches_per_rollout=2, bs_gamma=1.0, bs_clip=(0.8, 1.2))
    a, b, c = (plan(s, tokens, mask, groups, logprobs, old, entropy) for s in (paper, new_fut, new_bs))
    assert torch.equal(a.score.score, b.score.score) and torch.equal(a.src, b.src)      # A_fut knobs: no effect
    assert not torch.equal(a.score.score, c.score.score)                                 # BS knobs: an effect
    base = torch.randn(4, mask.shape[1]) * mask
    fa, fb, fc = (scale_by_future(s, base, logprobs=logprobs, old_logprobs=old, mask=mask)
                  for s in (paper, new_fut, new_bs))
    assert torch.equal(fa, fc) and not torch.equal(fa, fb)
    # A_fut = clip(exp(s), fut_clip) with s discounted by fut_gamma: an independent fp64 loop
    d = ((logprobs - old) * mask).double()
    gamma, (lo, hi) = new_fut.fut_gamma, new_fut.fut_clip
    for r in range(4):
        for t in mask[r].nonzero().flatten().tolist():
            s = sum(gamma ** (k - t) * float(d[r, k]) for k in range(t, mask.shape[1]))
            want = float(base[r, t]) * (1 + 0.5 * min(max(math.exp(s), lo), hi))
            assert abs(float(fb[r, t]) - want) < 1e-4


def test_authors_code_settings():
    settings = APPOSettings.authors_code(branches_per_rollout=3)
    assert (settings.bs_gamma, settings.bs_clip) == (1.0, (0.8, 1.2))
    assert settings.fut_gamma == 2 ** (-1 / 64) and settings.fut_clip == (1.0, 1.2)
    assert settings.include_token and settings.per == "group" and settings.combine == "sum"
    assert torch.equal(settings.shared_prefix(torch.tensor([4, 7])), torch.tensor([5, 8]))


def test_token_advantages_compose_dual_group_and_future_scaling():
    tokens, mask, groups, logprobs, old, entropy = bundle(seed=5)
    settings = APPOSettings(branches_per_rollout=1)
    result = plan(settings, tokens, mask, groups, logprobs, old, entropy)
    rewards = torch.cat([torch.tensor([1.0, 0.0, 0.5, 0.25]), torch.arange(result.src.numel()).float() / 3])
    parent = torch.cat([torch.full((4,), -1), result.src])
    shared = torch.cat([torch.zeros(4, dtype=torch.long), result.shared])
    all_groups = torch.cat([groups, groups[result.src]])
    base = dual_group_base(settings, rewards=rewards, group_ids=all_groups, parent=parent, shared_prefix=shared,
                           mask=mask)
    full = token_advantages(settings, rewards=rewards, group_ids=all_groups, parent=parent, shared_prefix=shared,
                            mask=mask, logprobs=logprobs, old_logprobs=old)
    torch.testing.assert_close(full, scale_by_future(settings, base, logprobs=logprobs, old_logprobs=old,
                                                     mask=mask))
    assert (full[~mask] == 0).all() and not torch.equal(full, 1.5 * base)   # A_fut varies after an update


def test_settings_reject_bad_values():
    for kwargs, name in (({"branches_per_rollout": -1}, "branches_per_rollout"), ({"bs_gamma": 0.0}, "bs_gamma"),
                         ({"fut_clip": (1.3, 1.0)}, "fut_clip"), ({"per": "token"}, "per"),
                         ({"future_scale": -0.5}, "future_scale"), ({"combine": "max"}, "combine")):
        with pytest.raises(ValueError, match=name):
            APPOSettings(**kwargs)
