"""APPO inside verl: an ``appo`` advantage estimator and an ``appo`` policy loss, registered through verl's
public registries (``register_adv_est``, ``register_policy_loss``).

Importing this module needs only torch and numpy; verl is imported when :func:`register` is called.

Data contract: one verl ``DataProto`` holds a step's initial rollouts AND their branches (R rows):
  batch["token_level_rewards"]         float [R, L] (summed over L: the rollout's reward, as verl's GRPO does)
  batch["response_mask"]               int/bool [R, L], generated response tokens (tool results 0)
  non_tensor_batch["uid"]              object [R], the prompt id; a branch carries its parent's uid
  non_tensor_batch["appo_parent"]      int [R], -1 for an initial rollout, else the ROW INDEX of its parent
  non_tensor_batch["appo_branch_pos"]  int [R], the response position a branch re-sampled from (the parent's
                                       response[:pos] is the shared prefix); ignored on initial rows

* ``adv_estimator="appo"`` -> :func:`appo_advantage`: dual-group base advantages (METHOD.md Eqs. 6-7) on the
  initial rows, 0 on branch rows (branches only supply rewards). verl 0.9.1's ``compute_advantage`` in
  ``ray_trainer`` forwards ``non_tensor_batch`` only to its "gdpo" estimator, so a recipe routes "appo" to
  :func:`compute_advantage` below, which passes it and drops the branch rows before the update.
* ``policy_loss.loss_mode="appo"`` -> :func:`appo_policy_loss`: at every update, A_fut = clip(exp(s), 1, 1.2)
  from the CURRENT log-probs against ``old_log_prob`` (Eq. 4, detached) scales the advantages by
  (1 + b * A_fut), then verl's own clipped PPO loss ("vanilla") aggregates with verl's settings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from appo.algos.advantages import dual_group_advantages, future_aware_scaling
from appo.scoring import FUTURE_VALUE_CLIP, GAMMA, future_value

APPO_NAME = "appo"
PARENT_KEY = "appo_parent"
BRANCH_POS_KEY = "appo_branch_pos"

# Settings read by the registered functions; :func:`register` sets them.
_SETTINGS: dict[str, Any] = {"combine": "avg", "one_group": False, "future_scale": 0.5, "gamma": GAMMA,
                             "clip": FUTURE_VALUE_CLIP}


def _int_field(non_tensor_batch: dict, key: str, rows: int, device: torch.device) -> torch.Tensor:
    if key not in non_tensor_batch:
        raise ValueError(f"non_tensor_batch: missing {key!r} (see appo.integrations.verl's data contract)")
    values = np.asarray(non_tensor_batch[key])
    if values.shape != (rows,):
        raise ValueError(f"non_tensor_batch: {key!r} has shape {values.shape}, expected ({rows},)")
    return torch.as_tensor(values.astype(np.int64), device=device)


def appo_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                   index: np.ndarray | None = None, config: Any = None, non_tensor_batch: dict | None = None,
                   epsilon: float = 1e-6, **unused: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator "appo": APPO's dual-group token advantages, float32 [R, L] (returned twice,
    as advantages and returns), 0 on branch rows and off the mask.

    token_level_rewards float [R, L]; response_mask [R, L]; index object [R] (verl's ``uid``: prompt groups);
    non_tensor_batch holds ``appo_parent`` int [R] and ``appo_branch_pos`` int [R] (and ``uid`` when
    ``index`` is None). The combination rule and the one-group ablation come from :func:`register`.
    """
    if non_tensor_batch is None:
        raise ValueError("non_tensor_batch: the 'appo' estimator needs the branch metadata; call "
                         "appo.integrations.verl.compute_advantage(data) (verl's stock "
                         "compute_advantage does not forward non_tensor_batch to custom estimators)")
    if token_level_rewards.dim() != 2 or response_mask.shape != token_level_rewards.shape:
        raise ValueError(f"response_mask: shape {tuple(response_mask.shape)} must match token_level_rewards "
                         f"{tuple(token_level_rewards.shape)} ([R, L])")
    rows, device = token_level_rewards.shape[0], token_level_rewards.device
    if index is None:
        index = non_tensor_batch.get("uid")
    if index is None or len(index) != rows:
        raise ValueError(f"index: expected the {rows} prompt uids (verl's non_tensor_batch['uid'])")
    _, group_ids = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
    group_ids = torch.as_tensor(group_ids.reshape(-1), dtype=torch.int64, device=device)
    parent = _int_field(non_tensor_batch, PARENT_KEY, rows, device)
    branch_pos = _int_field(non_tensor_batch, BRANCH_POS_KEY, rows, device)
    initial = parent < 0
    rewards = token_level_rewards.float().sum(dim=-1)
    mask = response_mask.bool()
    base = dual_group_advantages(rewards, group_ids, parent, torch.where(initial, 0, branch_pos),
                                 mask[initial], combine=_SETTINGS["combine"],
                                 one_group=_SETTINGS["one_group"], eps=epsilon)
    advantages = torch.zeros(token_level_rewards.shape, dtype=torch.float32, device=device)
    advantages[initial] = base
    return advantages, advantages


def appo_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                     response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                     rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss "appo": verl's clipped PPO loss on A * (1 + b * A_fut), float [B, L] inputs.

    A_fut = clip(exp(s), lo, hi) with s the discounted (gamma per position) sum of
    (log_prob - old_log_prob) * mask to the end of the response, from the current policy and detached
    (METHOD.md "Advantages"). Returns (loss scalar, metrics) as verl's losses do, plus
    ``appo/future_value_mean``.
    """
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    mask = response_mask.bool()
    future = future_value(log_prob.detach(), old_log_prob.detach(), mask, gamma=_SETTINGS["gamma"],
                          clip=_SETTINGS["clip"])
    future = torch.where(mask, future, 0.0)
    scaled = future_aware_scaling(advantages.float(), future, _SETTINGS["future_scale"])
    loss, metrics = get_policy_loss_fn("vanilla")(old_log_prob, log_prob, scaled.to(advantages.dtype),
                                                 response_mask, loss_agg_mode, config, rollout_is_weights)
    metrics = dict(metrics)
    metrics["appo/future_value_mean"] = float(future[mask].mean()) if mask.any() else 1.0
    return loss, metrics


def compute_advantage(data, *, drop_branches: bool = True):
    """Run verl's registered "appo" estimator on a ``DataProto``: what ``ray_trainer.compute_advantage`` does
    for other estimators, plus ``non_tensor_batch``. Sets ``batch["advantages"]`` and ``batch["returns"]``
    [R, L]; with ``drop_branches`` returns only the initial rows (those APPO optimises), else all R rows."""
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    if "response_mask" not in data.batch.keys():
        raise ValueError("data: batch['response_mask'] is required (verl's compute_response_mask makes it)")
    estimator = get_adv_estimator_fn(APPO_NAME)
    advantages, returns = estimator(token_level_rewards=data.batch["token_level_rewards"],
                                    response_mask=data.batch["response_mask"],
                                    index=data.non_tensor_batch["uid"],
                                    non_tensor_batch=data.non_tensor_batch)
    data.batch["advantages"] = advantages
    data.batch["returns"] = returns
    if not drop_branches:
        return data
    initial = np.flatnonzero(np.asarray(data.non_tensor_batch[PARENT_KEY]).astype(np.int64) < 0)
    return data.select_idxs(initial)


def register(*, combine: str = "avg", one_group: bool = False, future_scale: float = 0.5,
             gamma: float = GAMMA, clip: tuple[float, float] = FUTURE_VALUE_CLIP) -> None:
    """Register ``"appo"`` with verl's ``register_adv_est`` and ``register_policy_loss`` (imports verl).

    combine: "avg" (default) or "sum"; one_group: the w/o dual-group ablation; future_scale: b (0 is the
    w/o A_fut ablation); gamma, clip: the future value's discount and clip range. Calling it again updates
    the settings.
    """
    if combine not in ("avg", "sum"):
        raise ValueError(f"combine: expected 'avg' or 'sum', got {combine!r}")
    if future_scale < 0:
        raise ValueError(f"future_scale: must be >= 0, got {future_scale}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma: must lie in (0, 1], got {gamma}")
    lo, hi = (float(c) for c in clip)
    if not lo <= hi:
        raise ValueError(f"clip: lo must not exceed hi, got {clip}")
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, register_adv_est, register_policy_loss

    _SETTINGS.update(combine=combine, one_group=bool(one_group), future_scale=float(future_scale),
                     gamma=float(gamma), clip=(lo, hi))
    if ADV_ESTIMATOR_REGISTRY.get(APPO_NAME) is not appo_advantage:
        register_adv_est(APPO_NAME)(appo_advantage)
    register_policy_loss(APPO_NAME)(appo_policy_loss)
