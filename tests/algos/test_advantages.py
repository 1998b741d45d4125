import math

import pytest
import torch

from appo.algos import dual_group_advantages, future_aware_scaling, grpo_advantages


def zscores(values):
    """fp64 population z-scores of a Python list (the test oracle)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / (std + 1e-6) for v in values]


def reference_dual_group(rewards, group_ids, parent, branch_pos, mask, combine):
    """Loop-by-loop transcription of docs/method.md's dual-group rule, in fp64."""
    rows = range(len(rewards))
    initial = [r for r in rows if parent[r] < 0]
    a_init, a_br = {}, {}
    for g in set(group_ids):
        members = [r for r in initial if group_ids[r] == g]
        a_init.update(zip(members, zscores([rewards[r] for r in members])))
        branches = [r for r in rows if parent[r] >= 0 and group_ids[r] == g]
        if branches:
            a_br.update(zip(branches, zscores([rewards[r] for r in branches])))
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for j, n in enumerate(initial):
        for i in range(mask.shape[1]):
            if not mask[j, i]:
                continue
            covering = [a_br[b] for b in a_br if parent[b] == n and branch_pos[b] > i]
            if not covering:
                out[j, i] = a_init[n]
            else:
                mean_br = sum(covering) / len(covering)
                out[j, i] = (a_init[n] + mean_br) / 2 if combine == "avg" else a_init[n] + mean_br
    return out


def test_grpo_matches_per_group_zscore_with_gaps_in_ids():
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 3.0, 0.25])
    groups = torch.tensor([7, 7, 7, 2, 2, 2, 2])
    got = grpo_advantages(rewards, groups)
    want = zscores([1.0, 0.0, 0.5]) + zscores([2.0, -1.0, 3.0, 0.25])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_grpo_singleton_and_all_equal_groups_give_zero():
    rewards = torch.tensor([0.7, 1.0, 1.0, 1.0, 0.3, 0.9])
    groups = torch.tensor([0, 1, 1, 1, 2, 2])
    got = grpo_advantages(rewards, groups)
    assert got[:4].abs().max() == 0.0
    assert got[4] < 0 < got[5]


def test_grpo_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(torch.rand(4), torch.zeros(3, dtype=torch.long))


def test_dual_group_hand_computed_first_and_last_position():
    # One prompt, two initial rollouts (rewards 1 and 0) and three branches whose group z-scores differ from
    # the initial ones: from row 0 at position 1 (the first generated token: it shares only the prompt), from
    # row 1 at position 4 (the last generated token of a length-5 response) and from row 1 at position 3.
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0])
    groups = torch.zeros(5, dtype=torch.long)
    parent = torch.tensor([-1, -1, 0, 1, 1])
    branch_pos = torch.tensor([-1, -1, 1, 4, 3])
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    got = dual_group_advantages(rewards, groups, parent, branch_pos, mask)
    a = 1 / (1 + 1e-6)                              # |A_init| of a two-member group with different rewards
    c = 1 / (math.sqrt(2 / 3) + 1e-6)               # A_br of branch rewards [2, 0, 1]: [c, -c, 0]
    # Row 0: its branch at p=1 covers no generated token -> A_init everywhere.
    torch.testing.assert_close(got[0], torch.tensor([0.0, a, a, a, a]))
    # Row 1: positions 1, 2 lie in both branches' prefixes (mean A_br = -c / 2), position 3 only in the p=4
    # one (A_br = -c), position 4 in none (it is re-sampled by both).
    want = torch.tensor([0.0, (-a - c / 2) / 2, (-a - c / 2) / 2, (-a - c) / 2, -a])
    torch.testing.assert_close(got[1], want)
    summed = dual_group_advantages(rewards, groups, parent, branch_pos, mask, combine="sum")
    torch.testing.assert_close(summed[1], torch.tensor([0.0, -a - c / 2, -a - c / 2, -a - c, -a]))
    torch.testing.assert_close(summed[0], got[0])


def test_dual_group_avg_vs_sum_differ_only_under_branches():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    groups = torch.zeros(4, dtype=torch.long)
    parent = torch.tensor([-1, -1, 0, 0])
    branch_pos = torch.tensor([-1, -1, 2, 3])
    mask = torch.ones(2, 4, dtype=torch.bool)
    avg = dual_group_advantages(rewards, groups, parent, branch_pos, mask, combine="avg")
    total = dual_group_advantages(rewards, groups, parent, branch_pos, mask, combine="sum")
    a = 1 / (1 + 1e-6)
    # Positions 0, 1 are covered by both branches (mean A_br = 0), position 2 only by the p=3 branch
    # (A_br = +a).
    torch.testing.assert_close(avg[0], torch.tensor([a / 2, a / 2, a, a]))
    torch.testing.assert_close(total[0], torch.tensor([a, a, 2 * a, a]))
    torch.testing.assert_close(avg[1], total[1])


@pytest.mark.parametrize("combine", ["avg", "sum"])
def test_dual_group_matches_loop_reference_on_random_bundle(combine):
    gen = torch.Generator().manual_seed(3)
    num_prompts, per_prompt, width = 3, 3, 13
    initial_groups = torch.arange(num_prompts).repeat_interleave(per_prompt)
    num_initial = initial_groups.numel()
    num_branches = 11
    branch_parent = torch.randint(0, num_initial, (num_branches,), generator=gen)
    branch_parent[:3] = 4  # several branches from one rollout at different positions
    parent = torch.cat([torch.full((num_initial,), -1), branch_parent])
    group_ids = torch.cat([initial_groups, initial_groups[branch_parent]])
    branch_pos = torch.cat([torch.full((num_initial,), -1), torch.randint(2, width + 1, (num_branches,),
                                                                           generator=gen)])
    branch_pos[num_initial:num_initial + 3] = torch.tensor([3, 7, 12])
    rewards = torch.rand(num_initial + num_branches, generator=gen)
    mask = torch.rand(num_initial, width, generator=gen) > 0.25
    got = dual_group_advantages(rewards, group_ids, parent, branch_pos, mask, combine=combine)
    want = reference_dual_group(rewards.double().tolist(), group_ids.tolist(), parent.tolist(),
                                branch_pos.tolist(), mask, combine)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_dual_group_handles_interleaved_rows_and_singleton_branch_group():
    # Branch rows before the initial ones; prompt 5 has a single branch (A_br = 0 -> avg halves A_init).
    rewards = torch.tensor([0.2, 0.9, 0.1, 0.6])
    group_ids = torch.tensor([5, 5, 5, 5])
    parent = torch.tensor([2, -1, -1, -1])
    branch_pos = torch.tensor([3, -1, -1, -1])
    mask = torch.ones(3, 4, dtype=torch.bool)
    got = dual_group_advantages(rewards, group_ids, parent, branch_pos, mask)
    a_init = zscores([0.9, 0.1, 0.6])
    torch.testing.assert_close(got[1].double(), torch.tensor([a_init[1] / 2] * 3 + [a_init[1]],
                                                             dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0].double(), torch.full((4,), a_init[0], dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)


def test_one_group_ablation_zscores_everything_together():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.75])
    group_ids = torch.zeros(5, dtype=torch.long)
    parent = torch.tensor([-1, -1, 0, 1, 1])
    branch_pos = torch.tensor([-1, -1, 2, 1, 3])
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    got = dual_group_advantages(rewards, group_ids, parent, branch_pos, mask, one_group=True)
    z = zscores(rewards.tolist())
    want = torch.tensor([[z[0], z[0], 0.0, z[0]], [0.0, z[1], z[1], z[1]]], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_dual_group_rejects_bad_input():
    rewards, groups = torch.rand(3), torch.zeros(3, dtype=torch.long)
    parent, pos = torch.tensor([-1, -1, 0]), torch.tensor([-1, -1, 1])
    with pytest.raises(ValueError, match="mask"):
        dual_group_advantages(rewards, groups, parent, pos, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="combine"):
        dual_group_advantages(rewards, groups, parent, pos, torch.ones(2, 4, dtype=torch.bool), combine="max")
    with pytest.raises(ValueError, match="parent"):
        dual_group_advantages(rewards, groups, torch.tensor([-1, 2, 0]), pos,
                              torch.ones(1, 4, dtype=torch.bool))


def test_future_aware_scaling_detaches_and_scales():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    future = (1.0 + 0.2 * torch.rand(3, 7, generator=gen, dtype=torch.float64)).requires_grad_(True)
    got = future_aware_scaling(base, future, b=0.5)
    assert not got.requires_grad
    torch.testing.assert_close(got.double(), base * (1 + 0.5 * future.detach()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(future_aware_scaling(base, future, b=0.0).double(), base, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="future_value_clipped"):
        future_aware_scaling(base, future[:, :5])
