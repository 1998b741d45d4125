import math

import pytest
import torch

from appo.algos import ppo_clip_loss


def reference_objective(logprobs, old_logprobs, advantages, mask, total, eps_low, eps_high):
    """Loop-by-loop fp64 transcription of Eq. 8's J."""
    j = 0.0
    for n in range(logprobs.shape[0]):
        tokens = [i for i in range(logprobs.shape[1]) if mask[n, i]]
        if not tokens:
            continue
        acc = 0.0
        for i in tokens:
            rho = math.exp(float(logprobs[n, i] - old_logprobs[n, i]))
            a = float(advantages[n, i])
            acc += min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
        j += acc / len(tokens)
    return j / total


def random_case(rows=5, width=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(rows, width, generator=gen, dtype=torch.float64)
    new = old + 0.6 * torch.randn(rows, width, generator=gen, dtype=torch.float64)
    adv = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    mask = torch.rand(rows, width, generator=gen) > 0.3
    mask[:, 0] = True
    return new, old, adv, mask


@pytest.mark.parametrize("total", [5, 16])
def test_loss_matches_loop_reference_with_1_over_m_and_1_over_len(total):
    new, old, adv, mask = random_case()
    mask[2, 1:] = False  # a one-token rollout weighs as much as a long one
    loss, metrics = ppo_clip_loss(new, old, adv, mask, num_rollouts_total=total)
    want = -reference_objective(new, old, adv, mask, total, 0.2, 0.28)
    assert loss.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert metrics["policy_loss"] == pytest.approx(want, rel=1e-9)
    assert metrics["tokens"] == mask.sum().item()


def test_normalisation_per_rollout_not_per_token():
    # Ratio 1 everywhere: J = (1/M) sum_n mean_i A. Row 0 has 1 token with A=3, row 1 has 3 tokens with A=1.
    logp = torch.full((2, 3), -1.0, dtype=torch.float64)
    adv = torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    loss, _ = ppo_clip_loss(logp, logp, adv, mask, num_rollouts_total=4)
    assert loss.item() == pytest.approx(-(3.0 + 1.0) / 4)


def test_padding_values_never_leak():
    new, old, adv, mask = random_case(seed=2)
    poisoned_new = new.clone()
    poisoned_new[~mask] = 1e4  # would overflow exp() if used
    loss, metrics = ppo_clip_loss(poisoned_new, old, adv, mask, num_rollouts_total=5)
    clean, _ = ppo_clip_loss(new, old, adv, mask, num_rollouts_total=5)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(clean.item())
    assert math.isfinite(metrics["ratio_max"])


def test_clipping_on_both_sides_stops_the_gradient():
    old = torch.zeros(1, 4, dtype=torch.float64)
    # ratio 1.5 with A>0 (clipped high), ratio 0.5 with A<0 (clipped low), ratio 1.5 with A<0 and 0.5 with A>0
    # (pessimistic side, not clipped: the gradient flows).
    new = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, metrics = ppo_clip_loss(new, old, adv, mask, num_rollouts_total=1)
    assert loss.item() == pytest.approx(-(1.28 - 0.8 - 1.5 + 0.5) / 4)
    loss.backward()
    grad = new.grad[0]
    assert grad[0] == 0 and grad[1] == 0
    assert grad[2] == pytest.approx(1.5 / 4) and grad[3] == pytest.approx(-0.5 / 4)
    assert metrics["clip_fraction"] == pytest.approx(0.5)
    assert metrics["clip_low_fraction"] == pytest.approx(0.25)
    assert metrics["clip_high_fraction"] == pytest.approx(0.25)


def test_positive_advantage_raises_the_sampled_logprob():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 17, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 17, (3, 5), generator=gen)

    def sampled_logprobs(z):
        return torch.log_softmax(z, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)

    old = sampled_logprobs(logits).detach()
    adv = torch.tensor([1.0, -1.0, 0.5])[:, None].expand(3, 5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    loss, _ = ppo_clip_loss(sampled_logprobs(logits), old, adv, mask, num_rollouts_total=3)
    loss.backward()
    with torch.no_grad():
        stepped = logits - 0.5 * logits.grad
    change = sampled_logprobs(stepped) - old
    assert (change[0] > 0).all() and (change[2] > 0).all() and (change[1] < 0).all()


def test_k3_kl_term_and_metrics():
    new, old, adv, mask = random_case(seed=5)
    gen = torch.Generator().manual_seed(6)
    ref = old + 0.3 * torch.randn(old.shape, generator=gen, dtype=torch.float64)
    base, _ = ppo_clip_loss(new, old, adv, mask, num_rollouts_total=7)
    loss, metrics = ppo_clip_loss(new, old, adv, mask, num_rollouts_total=7, ref_logprobs=ref, kl_coef=0.1)
    kl = 0.0
    for n in range(new.shape[0]):
        d = (ref[n] - new[n])[mask[n]]
        kl += (torch.exp(d) - d - 1).mean().item()
    kl /= 7
    assert metrics["kl_ref"] == pytest.approx(kl, rel=1e-9)
    assert loss.item() == pytest.approx(base.item() + 0.1 * kl, rel=1e-9)
    log_ratio = (new - old)[mask]
    assert metrics["approx_kl"] == pytest.approx((log_ratio.exp() - 1 - log_ratio).mean().item(), rel=1e-9)


def test_row_advantages_broadcast_and_bad_input():
    new, old, adv, mask = random_case(seed=7)
    row_adv = adv[:, 0]
    a, _ = ppo_clip_loss(new, old, row_adv, mask, num_rollouts_total=5)
    b, _ = ppo_clip_loss(new, old, row_adv[:, None].expand_as(new), mask, num_rollouts_total=5)
    assert a.item() == pytest.approx(b.item())
    with pytest.raises(ValueError, match="mask"):
        ppo_clip_loss(new, old, adv, mask[:, :3], num_rollouts_total=5)
    with pytest.raises(ValueError, match="num_rollouts_total"):
        ppo_clip_loss(new, old, adv, mask, num_rollouts_total=0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        ppo_clip_loss(new, old, adv, mask, num_rollouts_total=5, kl_coef=0.1)
