"""The clipped PPO objective of Eq. 8, shared by APPO, GRPO and ARPO.

J = (1/M) * sum_n (1/|H_n|) * sum_i min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) over generated tokens,
rho = exp(log pi_theta - log pi_old). APPO passes its N initial rollouts with M = the prompt budget (branches
only supply rewards); GRPO and ARPO pass all M rollouts with M = the number of rows.

pi_old is the trainer's own recomputation; the rollout engine's log-probs are the behaviour policy's. With
``behaviour_logprobs`` and ``is_cap``, each token's objective is weighted by the truncated importance weight
min(pi_old / pi_behaviour, is_cap) (detached), which corrects for the engine/trainer mismatch (as verl's and
TRL's "truncated importance sampling" do).
"""

from __future__ import annotations

import torch


def _per_rollout_mean_sum(values: torch.Tensor, mask: torch.Tensor, tokens_per_rollout: torch.Tensor,
                          num_rollouts_total: int) -> torch.Tensor:
    """(1/M) * sum_n (1/|H_n|) * sum_i values[n, i] over masked tokens; a scalar."""
    return ((values * mask).sum(dim=1) / tokens_per_rollout).sum() / num_rollouts_total


def ppo_clip_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, *, num_rollouts_total: int, eps_low: float = 0.2,
                  eps_high: float = 0.28, ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
                  behaviour_logprobs: torch.Tensor | None = None, is_cap: float | None = None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped PPO loss -J of Eq. 8 and its diagnostics.

    logprobs: float [R, T], log pi_theta of the sampled tokens (carries the gradient);
    old_logprobs: float [R, T], log pi_old of the same tokens; advantages: float [R, T] (or [R], broadcast to
    the tokens); mask: bool [R, T], generated tokens; num_rollouts_total: M, the 1/M normaliser (>= R is
    typical for APPO, == R for GRPO/ARPO). A row with no generated token contributes 0. ref_logprobs
    (optional, float [R, T]) with kl_coef > 0 adds kl_coef * k3-KL(pi_theta || pi_ref), averaged with the same
    per-rollout normalisation. behaviour_logprobs (optional, float [R, T]: the rollout engine's log-probs)
    with is_cap (> 0) weights each token by min(exp(old - behaviour), is_cap), detached; is_cap None disables
    the correction. Returns (loss: 0-dim fp32 tensor, metrics: dict of floats) with metrics policy_loss,
    kl_ref, clip_fraction, clip_low_fraction, clip_high_fraction, approx_kl (k3 of pi_old vs pi_theta),
    ratio_mean, ratio_max, advantage_mean, is_weight_mean, is_weight_max (1 without the correction), tokens.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs: expected [R, T], got {tuple(logprobs.shape)}")
    for name, value in (("old_logprobs", old_logprobs), ("mask", mask)):
        if value.shape != logprobs.shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not match logprobs "
                             f"{tuple(logprobs.shape)}")
    if advantages.dim() == 1 and advantages.shape[0] == logprobs.shape[0]:
        advantages = advantages[:, None]
    elif advantages.shape != logprobs.shape:
        raise ValueError(f"advantages: expected [R, T] or [R], got {tuple(advantages.shape)}")
    if num_rollouts_total < 1:
        raise ValueError(f"num_rollouts_total: must be >= 1, got {num_rollouts_total}")
    if not (0.0 <= eps_low < 1.0) or eps_high < 0.0:
        raise ValueError(f"eps_low/eps_high: need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, "
                         f"{eps_high}")
    if kl_coef < 0.0:
        raise ValueError(f"kl_coef: must be >= 0, got {kl_coef}")
    if kl_coef > 0.0 and ref_logprobs is None:
        raise ValueError("ref_logprobs: required when kl_coef > 0")
    if ref_logprobs is not None and ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs: shape {tuple(ref_logprobs.shape)} does not match logprobs")
    if is_cap is not None:
        if not is_cap > 0:
            raise ValueError(f"is_cap: must be > 0 (or None to disable), got {is_cap}")
        if behaviour_logprobs is None or behaviour_logprobs.shape != logprobs.shape:
            raise ValueError("behaviour_logprobs: required with is_cap, shaped like logprobs")

    mask = mask.bool()
    weight = mask.to(logprobs.dtype)
    tokens_per_rollout = weight.sum(dim=1).clamp(min=1.0)
    advantages = advantages.detach().to(logprobs.dtype)
    # Zero the log-ratio off the mask so padding can never overflow exp().
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach().to(logprobs.dtype), 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    objective = torch.minimum(unclipped, clipped)
    is_weight = torch.ones_like(ratio)
    if is_cap is not None:
        behaviour_gap = torch.where(mask, old_logprobs.detach().to(logprobs.dtype) -
                                    behaviour_logprobs.detach().to(logprobs.dtype), 0.0)
        is_weight = torch.exp(behaviour_gap).clamp(max=is_cap)
        objective = objective * is_weight
    policy_loss = -_per_rollout_mean_sum(objective, weight, tokens_per_rollout, num_rollouts_total)

    loss = policy_loss
    kl_ref = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    if ref_logprobs is not None:
        ref_log_ratio = torch.where(mask, ref_logprobs.detach().to(logprobs.dtype) - logprobs, 0.0)
        k3 = torch.exp(ref_log_ratio) - ref_log_ratio - 1.0
        kl_ref = _per_rollout_mean_sum(k3, weight, tokens_per_rollout, num_rollouts_total)
        loss = loss + kl_coef * kl_ref

    with torch.no_grad():
        num_tokens = weight.sum().clamp(min=1.0)
        low = (ratio < 1.0 - eps_low) & (advantages < 0) & mask
        high = (ratio > 1.0 + eps_high) & (advantages > 0) & mask
        approx_kl = ((ratio - 1.0) - log_ratio) * weight
        stats = torch.stack([
            policy_loss.detach(), kl_ref.detach(),
            (low | high).sum() / num_tokens, low.sum() / num_tokens, high.sum() / num_tokens,
            approx_kl.sum() / num_tokens, (ratio * weight).sum() / num_tokens,
            torch.where(mask, ratio, 0.0).max() if mask.any() else ratio.new_zeros(()),
            (advantages.expand_as(weight) * weight).sum() / num_tokens,
            (is_weight * weight).sum() / num_tokens,
            torch.where(mask, is_weight, 0.0).max() if mask.any() else ratio.new_zeros(()),
            weight.sum(),
        ]).tolist()
    names = ("policy_loss", "kl_ref", "clip_fraction", "clip_low_fraction", "clip_high_fraction", "approx_kl",
             "ratio_mean", "ratio_max", "advantage_mean", "is_weight_mean", "is_weight_max", "tokens")
    return loss, dict(zip(names, stats))
