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


def plan(settings, tokens, mask, groups, logprobs, old, entropy, **options):
    return plan_branches(settings, tokens=tokens, mask=mask, group_ids=groups, logprobs=logprobs,
                         old_logprobs=old, entropy=entropy, **options)


@pytest.mark.parametrize("per", ["rollout", "group"])
@pytest.mark.parametrize("B", [1, 2, 5, 9])
def test_every_group_gets_exactly_its_budget(per, B):
    tokens, mask, groups, logprobs, old, entropy = bundle()
    result = plan(APPOSettings(branches_per_rollout=B, select_per=per), tokens, mask, groups, logprobs, old,
                  entropy)
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


def uniform_noise(like, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return size * (2 * torch.rand(like.shape, generator=gen) - 1)


def test_rounding_noise_never_drives_the_selection_but_a_real_shift_does():
    """1e-7 of noise on the log-ratio (two forwards that disagree in the last bits) is no policy shift: every
    row falls back to entropy alone and the points are exactly the no-shift ones; z(Omega) would otherwise
    blow the noise up to a full-size signal (shift_tolerance=0 shows it). A real update still drives it."""
    tokens, mask, groups, shifted, old, entropy = bundle()
    settings = APPOSettings(branches_per_rollout=2)
    exact = plan(settings, tokens, mask, groups, old.clone(), old, entropy)
    noisy = plan(settings, tokens, mask, groups, old + uniform_noise(old, 1e-7), old, entropy)
    assert noisy.entropy_only_fraction == 1.0
    assert torch.equal(noisy.src, exact.src) and torch.equal(noisy.pos, exact.pos)
    assert torch.equal(noisy.score.score, exact.score.score)
    bit_exact = APPOSettings(branches_per_rollout=2, shift_tolerance=0.0)
    driven = plan(bit_exact, tokens, mask, groups, old + uniform_noise(old, 1e-7), old, entropy)
    assert driven.entropy_only_fraction < 1.0 and not torch.equal(driven.score.score, exact.score.score)
    real = plan(settings, tokens, mask, groups, shifted, old, entropy)
    assert real.entropy_only_fraction < 1.0 and not torch.equal(real.score.score, exact.score.score)


def test_no_shift_tolerance_follows_the_forwards_dtype():
    """The tolerance is per compute dtype: 0.05 of disagreement is rounding noise for a bf16 forward, a shift
    for an fp32 one; just above a dtype's tolerance the row counts as shifted."""
    from appo.scoring import NO_SHIFT_TOLERANCE, no_shift_tolerance

    assert no_shift_tolerance(torch.float32) < no_shift_tolerance(torch.float16) < no_shift_tolerance(torch.bfloat16)
    tokens, mask, groups, _, old, entropy = bundle()
    settings = APPOSettings(branches_per_rollout=2)
    noise = uniform_noise(old, 0.05)
    as_bf16 = plan(settings, tokens, mask, groups, old + noise, old, entropy, compute_dtype=torch.bfloat16)
    as_fp32 = plan(settings, tokens, mask, groups, old + noise, old, entropy, compute_dtype=torch.float32)
    assert as_bf16.entropy_only_fraction == 1.0 and as_fp32.entropy_only_fraction == 0.0
    for dtype, tolerance in NO_SHIFT_TOLERANCE.items():
        one_token = torch.zeros_like(old)
        one_token[0, 5] = 1.5 * tolerance                       # one token of row 0 moved a little past it
        result = plan(settings, tokens, mask, groups, old + one_token, old, entropy, compute_dtype=dtype)
        assert result.score.entropy_only.tolist() == [False, True, True, True], dtype
    with pytest.raises(ValueError, match="dtype"):
        no_shift_tolerance(torch.int32)


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
    assert settings.include_token and settings.select_per == "group" and settings.combine == "sum"
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
                         ({"fut_clip": (1.3, 1.0)}, "fut_clip"), ({"select_per": "token"}, "select_per"),
                         ({"future_scale": -0.5}, "future_scale"), ({"combine": "max"}, "combine")):
        with pytest.raises(ValueError, match=name):
            APPOSettings(**kwargs)


def test_the_fill_rule_keeps_min_gap_and_only_fresh_branches_are_exempt():
    tokens, mask, groups, logprobs, old, entropy = bundle()
    for B, gap in ((3, 3), (6, 4), (25, 2)):
        result = plan(APPOSettings(branches_per_rollout=B, min_gap=gap), tokens, mask, groups, logprobs, old,
                      entropy)
        assert result.filled > 0 and result.src.numel() == B * 4             # the budget, filled
        for r in range(4):
            start = int(mask[r].nonzero()[0])
            points = [p for s, p in zip(result.src.tolist(), result.pos.tolist()) if s == r]
            inside = sorted(set(points) - {start})  # fresh branches sit at the start, exempt from the gap
            assert len(inside) == len([p for p in points if p != start])   # no point twice
            assert all(b - a >= gap for a, b in zip(inside, inside[1:])), (B, gap, r, points)
    dense = plan(APPOSettings(branches_per_rollout=6), tokens, mask, groups, logprobs, old, entropy)
    spaced = plan(APPOSettings(branches_per_rollout=6, min_gap=4), tokens, mask, groups, logprobs, old, entropy)
    assert spaced.fresh > dense.fresh  # fewer spaced-out tokens: more fresh branches make up the budget


def test_fresh_branches_share_no_generated_token_unless_the_token_is_kept():
    """The fill rule's last resort branches at a response's first generated token: without include_token the
    branch shares no generated token with its parent (a fresh rollout); with include_token it keeps exactly
    that one token."""
    tokens, mask, groups, logprobs, old, entropy = bundle()
    for include_token, kept in ((False, 0), (True, 1)):
        settings = APPOSettings(branches_per_rollout=25, include_token=include_token)
        result = plan(settings, tokens, mask, groups, logprobs, old, entropy)
        assert result.fresh > 0
        starts = {r: int(mask[r].nonzero()[0]) for r in range(4)}
        fresh = [(s, shared) for s, p, shared in zip(result.src.tolist(), result.pos.tolist(),
                                                      result.shared.tolist()) if p == starts[s]]
        assert len(fresh) >= result.fresh
        assert all(int(mask[s, :shared].sum()) == kept for s, shared in fresh)


@pytest.mark.parametrize("per", ["rollout", "group"])
def test_uniform_points_draw_among_the_same_candidates_with_the_same_budget(per):
    tokens, mask, groups, logprobs, old, entropy = bundle(seed=2)
    settings = APPOSettings(branches_per_rollout=2, select_per=per, uniform_points=True)
    scored = plan(APPOSettings(branches_per_rollout=2, select_per=per), tokens, mask, groups, logprobs, old,
                  entropy)
    draws = [plan(settings, tokens, mask, groups, logprobs, old, entropy,
                  generator=torch.Generator().manual_seed(seed)) for seed in range(40)]
    candidates = scored.score.candidates
    for result in draws:
        assert torch.equal(result.score.score, scored.score.score)         # the same Branching Score ...
        for g in (0, 1):                                                   # ... the same budget ...
            assert int((groups[result.src] == g).sum()) == 2 * 2
        chosen = list(zip(result.src.tolist(), result.pos.tolist()))
        assert all(bool(candidates[s, p]) for s, p in chosen[:result.chosen] if result.filled == 0)
        assert result.chosen == scored.chosen and result.filled == scored.filled
    again = plan(settings, tokens, mask, groups, logprobs, old, entropy, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.src, draws[3].src) and torch.equal(again.pos, draws[3].pos)   # seeded
    assert len({tuple(d.pos.tolist()) for d in draws}) > 20                                 # random
    # uniform over the candidates: every candidate is drawn, none far more often than its share
    counts = torch.zeros_like(old)
    for result in draws:
        counts[result.src, result.pos] += 1
    picked = counts[candidates]
    assert bool((picked > 0).all()) and float(picked.max()) < 4 * float(picked.mean())
    assert float(counts[~candidates].sum()) == sum(d.filled for d in draws)             # only the fill leaves them
    with pytest.raises(ValueError, match="generator"):
        plan(settings, tokens, mask, groups, logprobs, old, entropy)


def test_uniform_points_fill_and_min_gap_as_the_branching_score_does():
    tokens, mask, groups, logprobs, old, entropy = bundle(seed=4)
    settings = APPOSettings(branches_per_rollout=5, min_gap=2, uniform_points=True)
    result = plan(settings, tokens, mask, groups, logprobs, old, entropy, generator=torch.Generator().manual_seed(0))
    scored = plan(APPOSettings(branches_per_rollout=5, min_gap=2), tokens, mask, groups, logprobs, old, entropy)
    assert result.src.numel() == scored.src.numel() == 5 * 4 and result.filled > 0
    for r in range(4):
        start = int(mask[r].nonzero()[0])
        points = sorted(set(p for s, p in zip(result.src.tolist(), result.pos.tolist()) if s == r) - {start})
        assert all(b - a >= 2 for a, b in zip(points, points[1:]))
