"""The public scoring API against an independent fp64 implementation of docs/method.md, Eqs. 3-5.

The oracle below is written from the equations alone (materialised softmax, a dense decay matrix, a
per-row loop for the z-scores), in float64, so it shares no code with appo's backends.
"""

import math

import pytest
import torch

import appo

GAMMA = 2 ** (-1 / 32)


# ------------------------------------------------------------------------------------------ fp64 oracle
def oracle_stats(logits, tokens, temperature):
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    entropy = -torch.where(logp == -math.inf, 0.0, logp.exp() * logp).sum(-1)  # over the finite support
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), entropy


def oracle_log_ratio_sum(logprobs, old_logprobs, mask, gamma):
    d = (logprobs.double() - old_logprobs.double()) * mask.double()
    T = d.shape[1]
    i = torch.arange(T, dtype=torch.float64)
    distance = i[None, :] - i[:, None]                      # [i, k] = k - i
    decay = torch.where(distance >= 0, gamma ** distance.clamp_min(0), 0.0)
    return d @ decay.T                                      # s[b, i] = sum_k decay[i, k] d[b, k]


def oracle_branching_score(logprobs, entropy, old_logprobs, mask, *, gamma=GAMMA, lo=1.0, hi=1.2,
                           strict=True, eps=1e-6):
    s = oracle_log_ratio_sum(logprobs, old_logprobs, mask, gamma)
    omega = s.clamp(-20, 20).exp()
    clipped = omega.clamp(lo, hi)
    B, T = mask.shape
    score = torch.full((B, T), -math.inf, dtype=torch.float64)
    for b in range(B):
        sel = mask[b].bool()
        if not sel.any():
            continue
        h, c = entropy[b].double(), clipped[b]
        zh = (h - h[sel].mean()) / (h[sel].std(unbiased=False) + eps)
        zo = (c - c[sel].mean()) / (c[sel].std(unbiased=False) + eps)
        constant = bool((c[sel] == c[sel][0]).all())
        product = zh if constant else zo * zh
        keep = sel.clone()
        if strict:
            keep &= (zh > 0) & ((zo > 0) | constant)
        keep[sel.nonzero().max()] = False                   # never the last generated token
        score[b] = torch.where(keep, product, torch.tensor(-math.inf, dtype=torch.float64))
    return score, omega


# ------------------------------------------------------------------------------------------- fixtures
def make_rollouts(B=3, T=47, V=1000, seed=0, dtype=torch.float32):
    """Random logits with peaked and near-uniform rows, a prompt region and a tool-result hole in the mask,
    and old log-probs perturbed from the current ones so Omega spreads around [1.0, 1.2]."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2.0
    logits[:, ::5] *= 0.01                                  # near-uniform rows
    peaked = torch.randint(0, V, (B, T), generator=g)
    logits[:, 1::7].scatter_(-1, peaked[:, 1::7, None], 25.0)  # peaked rows
    # tokens sampled from the policy itself, as in a real rollout (so their log-probs are realistic)
    probs = torch.softmax(logits.double(), dim=-1).reshape(B * T, V)
    tokens = torch.multinomial(probs, 1, generator=g).reshape(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, :6] = False                                     # prompt
    mask[:, 20:25] = False                                  # tool result
    mask[1, T - 9:] = False                                 # a shorter rollout
    logprobs, _ = oracle_stats(logits, tokens, 1.0)
    old_logprobs = (logprobs + 0.08 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    return logits.to(dtype), tokens, old_logprobs, mask


def assert_scores_close(actual, expected, atol=1e-4):
    expected = expected.float()
    assert torch.equal(torch.isfinite(actual), torch.isfinite(expected)), "candidate sets differ"
    finite = torch.isfinite(expected)
    assert finite.any(), "the case selects no candidate: it would test nothing"
    torch.testing.assert_close(actual[finite], expected[finite], atol=atol, rtol=0)


IMPLS = ["torch", "triton"]


# -------------------------------------------------------------------------------------- branching_score
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_branching_score_matches_fp64_oracle(impl, temperature):
    logits, tokens, old_logprobs, mask = make_rollouts(seed=1)
    logprobs, entropy = oracle_stats(logits, tokens, temperature)
    old_logprobs = (logprobs + 0.08 * torch.randn(logprobs.shape, dtype=torch.float64,
                                                  generator=torch.Generator().manual_seed(5))).float()
    expected, omega = oracle_branching_score(logprobs, entropy, old_logprobs, mask)
    result = appo.branching_score(tokens=tokens, old_logprobs=old_logprobs, mask=mask, logits=logits,
                                  temperature=temperature, impl=impl)
    assert result.score.dtype == torch.float32 and result.score.shape == tokens.shape
    assert_scores_close(result.score, expected)
    torch.testing.assert_close(result.entropy.double(), entropy, atol=2e-5, rtol=0)
    torch.testing.assert_close(result.logprobs.double(), logprobs, atol=2e-5, rtol=0)
    torch.testing.assert_close(result.future_value.double(), omega, atol=1e-4, rtol=1e-5)
    assert not result.entropy_only.any()
    # the case exercises both sides of the clip and the candidate rule
    clipped = omega[mask]
    assert (clipped < 1.0).any() and (clipped > 1.2).any()
    assert result.candidates.sum() < mask.sum()


@pytest.mark.parametrize("impl", IMPLS)
def test_branching_score_all_candidates_rule(impl):
    logits, tokens, old_logprobs, mask = make_rollouts(B=2, T=33, V=300, seed=2)
    logprobs, entropy = oracle_stats(logits, tokens, 1.0)
    expected, _ = oracle_branching_score(logprobs, entropy, old_logprobs, mask, strict=False)
    result = appo.branching_score(tokens=tokens, old_logprobs=old_logprobs, mask=mask, logits=logits,
                                  candidates="all", impl=impl)
    assert_scores_close(result.score, expected)
    # "all" keeps every masked token but the last generated one
    assert int(result.candidates.sum()) == int(mask.sum()) - mask.shape[0]


def test_branching_score_from_hidden_equals_from_logits():
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 2, 29, 24, 500
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.1
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    logits = hidden @ weight.T + bias
    old_logprobs = (oracle_stats(logits, tokens, 1.0)[0] + 0.1 * torch.randn(B, T, generator=g,
                                                                             dtype=torch.float64)).float()
    from_logits = appo.branching_score(tokens=tokens, old_logprobs=old_logprobs, mask=mask, logits=logits,
                                       impl="torch")
    from_hidden = appo.branching_score(tokens=tokens, old_logprobs=old_logprobs, mask=mask, hidden=hidden,
                                       weight=weight, bias=bias, impl="torch")
    assert_scores_close(from_hidden.score, from_logits.score.double(), atol=1e-4)


def test_branching_score_from_precomputed_stats():
    logits, tokens, old_logprobs, mask = make_rollouts(B=2, T=40, V=200, seed=4)
    logprobs, entropy = oracle_stats(logits, tokens, 1.0)
    expected, _ = oracle_branching_score(logprobs, entropy, old_logprobs, mask)
    result = appo.branching_score(tokens=tokens, old_logprobs=old_logprobs, mask=mask,
                                  entropy=entropy.float(), logprobs=logprobs.float())
    assert_scores_close(result.score, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_branching_score_low_precision_logits_give_fp32(dtype):
    logits, tokens, old_logprobs, mask = make_rollouts(B=2, T=31, V=257, seed=6, dtype=dtype)
    result = appo.branching_score(tokens=tokens, old_logprobs=old_logprobs, mask=mask, logits=logits)
    assert result.score.dtype == result.entropy.dtype == result.future_value.dtype == torch.float32
    logprobs, entropy = oracle_stats(logits, tokens, 1.0)   # the oracle on the same rounded logits
    torch.testing.assert_close(result.entropy.double(), entropy, atol=1e-4, rtol=0)


def test_first_minibatch_falls_back_to_entropy_only():
    """pi_theta == pi_old: Omega is 1 everywhere, so rows are ranked by z(H) and flagged."""
    logits, tokens, _, mask = make_rollouts(B=2, T=40, V=128, seed=7)
    stats = appo.token_stats(logits, tokens)
    result = appo.branching_score(tokens=tokens, old_logprobs=stats.logprobs.clone(), mask=mask,
                                  logits=logits)
    assert result.entropy_only.all()
    assert torch.equal(result.future_value[mask], torch.ones(int(mask.sum())))
    for b in range(2):
        sel = mask[b]
        h = result.entropy[b].double()
        zh = (h - h[sel].mean()) / (h[sel].std(unbiased=False) + 1e-6)
        keep = result.candidates[b]
        assert keep.any()
        assert (zh[keep] > 0).all()
        torch.testing.assert_close(result.score[b][keep].double(), zh[keep], atol=1e-5, rtol=0)


def test_scores_outside_mask_and_last_token_are_minus_inf():
    logits, tokens, old_logprobs, mask = make_rollouts(B=3, T=40, V=100, seed=8)
    result = appo.branching_score(tokens=tokens, old_logprobs=old_logprobs, mask=mask, logits=logits,
                                  candidates="all")
    assert torch.isneginf(result.score[~mask]).all()
    for b in range(3):
        last = int(mask[b].nonzero().max())
        assert torch.isneginf(result.score[b, last])


def test_strided_logits_slice_is_handled_without_error():
    """The HF alignment idiom logits[:, :-1] / tokens[:, 1:] is a non-mergeable view."""
    logits, tokens, _, _ = make_rollouts(B=2, T=20, V=64, seed=9)
    view = logits[:, :-1]
    stats = appo.token_stats(view, tokens[:, 1:])
    expected = appo.token_stats(view.contiguous(), tokens[:, 1:])
    torch.testing.assert_close(stats.logprobs, expected.logprobs, atol=0, rtol=0)
    torch.testing.assert_close(stats.entropy, expected.entropy, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ future_value
@pytest.mark.parametrize("impl", IMPLS)
def test_future_value_matches_oracle_and_clips(impl):
    g = torch.Generator().manual_seed(10)
    logprobs = -torch.rand(4, 301, generator=g) * 3
    old_logprobs = logprobs + 0.2 * torch.randn(4, 301, generator=g)
    mask = torch.rand(4, 301, generator=g) > 0.3
    omega = appo.future_value(logprobs, old_logprobs, mask, impl=impl)
    expected = oracle_log_ratio_sum(logprobs, old_logprobs, mask, GAMMA).clamp(-20, 20).exp()
    torch.testing.assert_close(omega.double(), expected, rtol=1e-5, atol=1e-6)
    clipped = appo.future_value(logprobs, old_logprobs, mask, clip=(1.0, 1.2), impl=impl)
    torch.testing.assert_close(clipped.double(), expected.clamp(1.0, 1.2), rtol=1e-5, atol=1e-6)


def test_future_value_is_clamped_so_always_finite():
    logprobs = torch.zeros(1, 50)
    old_logprobs = torch.full((1, 50), -30.0)              # a huge likelihood gain at every token
    omega = appo.future_value(logprobs, old_logprobs, torch.ones(1, 50, dtype=torch.bool))
    assert torch.isfinite(omega).all()
    assert omega.max().item() == pytest.approx(math.exp(20), rel=1e-6)


def test_future_value_ignores_nonfinite_values_outside_the_mask():
    logprobs = torch.tensor([[-1.0, -float("inf"), -0.5]])
    old = torch.tensor([[-1.5, -float("inf"), -0.5]])
    mask = torch.tensor([[True, False, True]])
    omega = appo.future_value(logprobs, old, mask, gamma=0.5)
    torch.testing.assert_close(omega, torch.tensor([[math.exp(0.5), 1.0, 1.0]]))


# ---------------------------------------------------------------------------------- select_branch_points
def test_select_top_k_per_rollout():
    score = torch.tensor([[0.1, 3.0, -math.inf, 2.0, 1.0],
                          [5.0, -math.inf, 4.0, -math.inf, 0.5]])
    rows, pos = appo.select_branch_points(score, 2)
    assert rows.tolist() == [0, 0, 1, 1] and pos.tolist() == [1, 3, 0, 2]


def test_select_pooled_per_group():
    score = torch.tensor([[9.0, 8.0, 7.0, -math.inf],
                          [1.0, 0.5, -math.inf, -math.inf],
                          [3.0, 2.0, 1.0, 0.0]])
    group_ids = torch.tensor([0, 0, 1])
    rows, pos = appo.select_branch_points(score, 1, group_ids=group_ids, per="group")
    # group 0 pools 2 points: both from row 0; group 1 takes 1 point from row 2
    assert list(zip(rows.tolist(), pos.tolist())) == [(0, 0), (0, 1), (2, 0)]


def test_select_respects_min_gap_and_breaks_ties_deterministically():
    score = torch.tensor([[1.0, 5.0, 4.9, 4.8, 1.0, 1.0, 4.0]])
    rows, pos = appo.select_branch_points(score, 2, min_gap=3)
    assert pos.tolist() == [1, 6]
    ties = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    assert appo.select_branch_points(ties, 2)[1].tolist() == [0, 1]


def test_select_too_few_candidates():
    score = torch.tensor([[1.0, -math.inf, -math.inf], [1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="k"):
        appo.select_branch_points(score, 2)
    rows, pos = appo.select_branch_points(score, 2, allow_fewer=True)
    assert list(zip(rows.tolist(), pos.tolist())) == [(0, 0), (1, 1), (1, 2)]


def test_select_on_real_scores_picks_the_best_candidates():
    logits, tokens, old_logprobs, mask = make_rollouts(B=3, T=47, V=500, seed=11)
    result = appo.branching_score(tokens=tokens, old_logprobs=old_logprobs, mask=mask, logits=logits)
    rows, pos = appo.select_branch_points(result.score, 2, allow_fewer=True)
    for r, p in zip(rows.tolist(), pos.tolist()):
        row = result.score[r]
        assert mask[r, p] and torch.isfinite(row[p])
        assert (row > row[p]).sum() <= 1                   # at most one better position in that row


# ------------------------------------------------------------------------------------------------ errors
def _good():
    logits, tokens, old_logprobs, mask = make_rollouts(B=2, T=12, V=50, seed=12)
    return dict(tokens=tokens, old_logprobs=old_logprobs, mask=mask, logits=logits)


@pytest.mark.parametrize("change, argument", [
    (lambda a: a.update(tokens=a["tokens"][:, :-1]), "tokens"),
    (lambda a: a["tokens"].__setitem__((0, 3), 50), "tokens"),
    (lambda a: a["tokens"].__setitem__((1, 0), -1), "tokens"),
    (lambda a: a.update(tokens=a["tokens"].float()), "tokens"),
    (lambda a: a["logits"].__setitem__((0, 2, 7), float("nan")), "logits"),
    (lambda a: a["logits"].__setitem__((1, 4, 0), float("inf")), "logits"),
    (lambda a: a.update(logits=a["logits"].long()), "logits"),
    (lambda a: a.update(mask=torch.zeros_like(a["mask"])), "mask"),
    (lambda a: a.update(mask=a["mask"][:, :5]), "mask"),
    (lambda a: a.update(old_logprobs=a["old_logprobs"][:1]), "old_logprobs"),
    (lambda a: a.update(candidates="best"), "candidates"),
    (lambda a: a.update(clip=(1.2, 1.0)), "clip"),
    (lambda a: a.update(temperature=0.0), "temperature"),
    (lambda a: a.update(gamma=1.5), "gamma"),
    (lambda a: a.update(impl="cuda"), "impl"),
    (lambda a: a.update(entropy=torch.ones(2, 12)), "logits"),
])
def test_bad_input_raises_value_error_naming_the_argument(change, argument):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=argument):
        appo.branching_score(**args)


def test_hidden_path_errors_name_the_argument():
    hidden, weight, tokens = torch.randn(2, 5, 8), torch.randn(20, 8), torch.randint(0, 20, (2, 5))
    with pytest.raises(ValueError, match="weight"):
        appo.token_stats(hidden=hidden, weight=torch.randn(20, 7), tokens=tokens)
    with pytest.raises(ValueError, match="weight"):
        appo.token_stats(hidden=hidden, weight=weight.double(), tokens=tokens)
    with pytest.raises(ValueError, match="bias"):
        appo.token_stats(hidden=hidden, weight=weight, bias=torch.randn(19), tokens=tokens)
    with pytest.raises(ValueError, match="tokens"):
        appo.token_stats(hidden=hidden, weight=weight, tokens=tokens + 20)
    bad = hidden.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="hidden"):
        appo.token_stats(hidden=bad, weight=weight, tokens=tokens)


@pytest.mark.parametrize("impl", IMPLS)
def test_vocabulary_masked_logits_are_accepted_and_scored_over_the_finite_support(impl):
    """A logit processor's -inf entries have probability 0; token_stats and branching_score accept them."""
    logits, tokens, old_logprobs, mask = make_rollouts(B=2, T=12, V=300, seed=13)
    g = torch.Generator().manual_seed(14)
    banned = torch.rand(logits.shape, generator=g) < 0.6
    banned.scatter_(-1, tokens[..., None], False)  # the sampled tokens stay allowed
    logits = logits.masked_fill(banned, -math.inf)
    stats = appo.token_stats(logits, tokens, temperature=0.9, impl=impl)
    want_logprobs, want_entropy = oracle_stats(logits, tokens, 0.9)
    torch.testing.assert_close(stats.logprobs.double(), want_logprobs, rtol=0, atol=2e-5)
    torch.testing.assert_close(stats.entropy.double(), want_entropy, rtol=0, atol=2e-5)
    result = appo.branching_score(tokens=tokens, old_logprobs=old_logprobs, mask=mask, logits=logits,
                                  impl=impl)
    assert torch.isfinite(result.entropy).all() and result.candidates.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_minus_inf_sampled_token_and_all_minus_inf_rows_are_clear_errors(impl):
    logits, tokens = torch.randn(2, 6, 40), torch.randint(0, 40, (2, 6))
    at_token = logits.clone()
    at_token[1, 3, tokens[1, 3]] = -math.inf
    with pytest.raises(ValueError, match=r"tokens: the sampled token at position \(1, 3\) has logit -inf"):
        appo.token_stats(at_token, tokens, impl=impl)
    empty_row = logits.clone()
    empty_row[0, 5] = -math.inf
    with pytest.raises(ValueError, match=r"logits: .*all -inf \(first at position \(0, 5\)\)"):
        appo.token_stats(empty_row, tokens, impl=impl)


def test_minus_inf_bias_masks_the_hidden_path_too():
    hidden, weight = torch.randn(2, 5, 8), torch.randn(20, 8)
    bias = torch.zeros(20)
    bias[::3] = -math.inf
    tokens = torch.randint(0, 20, (2, 5))
    tokens[tokens % 3 == 0] += 1
    stats = appo.token_stats(hidden=hidden, weight=weight, bias=bias, tokens=tokens, impl="torch")
    want_logprobs, want_entropy = oracle_stats(hidden @ weight.T + bias, tokens, 1.0)
    torch.testing.assert_close(stats.logprobs.double(), want_logprobs, rtol=0, atol=2e-5)
    torch.testing.assert_close(stats.entropy.double(), want_entropy, rtol=0, atol=2e-5)
    tokens[0, 0] = 3
    with pytest.raises(ValueError, match="tokens: the sampled token at position"):
        appo.token_stats(hidden=hidden, weight=weight, bias=bias, tokens=tokens, impl="torch")


def test_explicit_triton_without_a_device_raises_runtime_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, tokens = torch.randn(3, 10), torch.randint(0, 10, (3,))
    with pytest.raises(RuntimeError, match="impl"):
        appo.token_stats(logits, tokens, impl="triton")
    # "auto" never fails for lack of a device: it takes the torch reference on the CPU
    assert appo.token_stats(logits, tokens, impl="auto").entropy.shape == (3,)
