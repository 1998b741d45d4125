import pytest
import torch

from appo.algos import arpo_branch_points, fresh_rollouts_to_fill


def reference_points(entropy, mask, spans, group_ids, budget, uniforms, k, beta, tau):
    """Loop transcription of ARPO's rule given the uniform draws in (rollout, span) order."""
    chosen, draw = [], 0
    for r, row_spans in enumerate(spans):
        generated = [i for i in range(mask.shape[1]) if mask[r, i]]
        first = generated[:k]
        h_init = sum(entropy[r, i].item() for i in first) / max(len(first), 1)
        for _, end in row_spans:
            after = [i for i in generated if i >= end][:k]
            if not after:
                continue
            h_now = sum(entropy[r, i].item() for i in after) / len(after)
            u = uniforms[draw]
            draw += 1
            if min(max(u - beta * (h_now - h_init), 0.0), 1.0) <= tau:
                chosen.append((row_spans.index((_, end)), r, end))
    kept, used = [], {}
    for _, r, end in sorted(chosen):  # round by round: every rollout's first call, then the second calls...
        g = int(group_ids[r])
        initial = int((group_ids == g).sum())
        if used.get(g, 0) < budget - initial:
            kept.append((r, end))
            used[g] = used.get(g, 0) + 1
    return sorted(kept)


def random_rollouts(seed=0, rows=6, width=57):
    gen = torch.Generator().manual_seed(seed)
    entropy = 3 * torch.rand(rows, width, generator=gen)
    mask = torch.zeros(rows, width, dtype=torch.bool)
    spans = []
    for r in range(rows):
        mask[r, 4:width - int(torch.randint(0, 6, (1,), generator=gen))] = True
        row_spans = []
        start = 9 + r
        while start + 5 < width:
            mask[r, start:start + 4] = False  # the result block is never generated
            row_spans.append((start, start + 4))
            start += 8 + int(torch.randint(0, 6, (1,), generator=gen))
        spans.append(row_spans)
    return entropy, mask, spans


@pytest.mark.parametrize("k", [3, 20])
def test_rule_matches_loop_reference_with_seeded_generator(k):
    entropy, mask, spans = random_rollouts()
    group_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    budget = 100  # no cap
    src, pos = arpo_branch_points(entropy, mask, spans, group_ids, budget=budget, k=k,
                                  generator=torch.Generator().manual_seed(11))
    num_draws = sum(1 for r, row in enumerate(spans) for _, end in row if mask[r, end:].any())
    uniforms = torch.rand(num_draws, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    uniforms = uniforms.tolist()
    want = reference_points(entropy, mask, spans, group_ids, budget, uniforms, k, 0.2, 0.5)
    assert list(zip(src.tolist(), pos.tolist())) == want
    assert 0 < len(want) < num_draws  # the rule is neither all-or-nothing here


def test_same_seed_same_points_and_budget_cap():
    entropy, mask, spans = random_rollouts(seed=1)
    group_ids = torch.tensor([4, 4, 4, 9, 9, 9])
    uncapped = arpo_branch_points(entropy, mask, spans, group_ids, budget=100, tau=1.0,
                                  generator=torch.Generator().manual_seed(2))
    assert len(uncapped[0]) == sum(1 for r, row in enumerate(spans) for _, e in row if mask[r, e:].any())
    src, pos = arpo_branch_points(entropy, mask, spans, group_ids, budget=5, tau=1.0,
                                  generator=torch.Generator().manual_seed(2))
    again = arpo_branch_points(entropy, mask, spans, group_ids, budget=5, tau=1.0,
                               generator=torch.Generator().manual_seed(2))
    assert torch.equal(src, again[0]) and torch.equal(pos, again[1])
    per_group = torch.bincount(group_ids[src], minlength=10)
    assert per_group[4] == 2 and per_group[9] == 2  # budget 5 - 3 initial rollouts
    # The kept points are each prompt's earliest tool calls: the first call of rows 0 and 1 (every row has
    # several calls here), not two calls of row 0.
    for rows in ([0, 1, 2], [3, 4, 5]):
        kept = [(r, p) for r, p in zip(src.tolist(), pos.tolist()) if r in rows]
        assert kept == [(rows[0], spans[rows[0]][0][1]), (rows[1], spans[rows[1]][0][1])]
    prompt_ids, fresh = fresh_rollouts_to_fill(group_ids, src, budget=5)
    assert prompt_ids.tolist() == [4, 9] and fresh.tolist() == [0, 0]


def test_entropy_rise_favours_branching():
    # Two rollouts, each with one result; after the result entropy jumps up in row 0 and falls in row 1.
    width = 30
    entropy = torch.full((2, width), 1.0)
    entropy[0, 15:] = 6.0   # dH = +5 -> clip(U - 1, 0, 1) = 0 <= tau: always branch
    entropy[1, 15:] = 0.0   # dH = -1 -> U + 0.2 > 0.5 unless U <= 0.3
    mask = torch.ones(2, width, dtype=torch.bool)
    mask[:, 10:15] = False
    spans = [[(10, 15)], [(10, 15)]]
    hits = torch.zeros(2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        src, _ = arpo_branch_points(entropy, mask, spans, torch.tensor([0, 1]), budget=4, k=5, generator=gen)
        hits += torch.bincount(src, minlength=2)
    assert hits[0] == 200
    assert 30 < hits[1] < 90  # P(U <= 0.3) = 0.3


def test_fresh_rollouts_fill_the_budget():
    group_ids = torch.tensor([0, 0, 3, 3])
    prompt_ids, fresh = fresh_rollouts_to_fill(group_ids, torch.tensor([1, 1, 2]), budget=6)
    assert prompt_ids.tolist() == [0, 3] and fresh.tolist() == [2, 3]


def test_no_results_and_bad_input():
    entropy, mask = torch.rand(2, 5), torch.ones(2, 5, dtype=torch.bool)
    src, pos = arpo_branch_points(entropy, mask, [[], []], torch.tensor([0, 0]), budget=4,
                                  generator=torch.Generator())
    assert src.numel() == 0 and pos.numel() == 0
    with pytest.raises(ValueError, match="result_spans"):
        arpo_branch_points(entropy, mask, [[]], torch.tensor([0, 0]), budget=4, generator=torch.Generator())
    with pytest.raises(ValueError, match="result_spans"):
        arpo_branch_points(entropy, mask, [[(2, 9)], []], torch.tensor([0, 0]), budget=4,
                           generator=torch.Generator())
    with pytest.raises(ValueError, match="mask"):
        arpo_branch_points(entropy, mask[:, :4], [[], []], torch.tensor([0, 0]), budget=4,
                           generator=torch.Generator())
