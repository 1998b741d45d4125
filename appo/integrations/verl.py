"""APPO inside verl 0.9.1, entered only through verl's own extension points (no line of verl is patched).

Four pieces, all registered by name when verl itself loads ``appo.integrations.verl_plugin``
(``VERL_USE_EXTERNAL_MODULES=appo.integrations.verl_plugin``, which verl imports in every process it starts):

* ``algorithm.adv_estimator=appo`` -> :func:`appo_advantage` (``register_adv_est``): the dual-group base
  advantages (docs/method.md section 7, Eqs. 6-7, ``appo.algos.chain.dual_group_base``) of the initial rows, 0 on branch rows;
* ``actor_rollout_ref.actor.policy_loss.loss_mode=appo`` -> :func:`appo_policy_loss`
  (``register_policy_loss``): at every update, A = A_base * (1 + b * A_fut) with A_fut from the CURRENT
  log-probs against verl's recomputed ``old_log_prob`` (``appo.algos.chain.scale_by_future``), then verl's own
clipped PPO loss ("vanilla"); * ``actor_rollout_ref.rollout.agent.default_agent_loop=appo_agent`` ->
  ``appo.integrations.verl_agent`` (verl's agent-loop registry): appo's tool loop on verl's LLM servers, for
the rollouts and their branches; * ``trainer.v1.trainer_mode=appo`` ->
  ``appo.integrations.verl_trainer.APPOTrainer`` (``register_trainer``): verl's sync PPO trainer whose
  ``_update_actor`` branches each update part from the policy the actor holds (:func:`plan`, verl's rollout
  servers and agent loop, :func:`agent_loop_requests`, verl's reward workers) and runs "appo" on it before the
  update.

This module needs only torch and numpy to import; verl is imported by :func:`register` and the functions that
build ``DataProto`` objects.

The settings are APPO's one settings block (``appo.algos.chain.APPOSettings``, the ``algo.appo`` block of
appo's trainer, with the same names and defaults), in verl's own config tree:

    actor_rollout_ref.actor.policy_loss._target_=appo.integrations.verl_config.APPOPolicyLossConfig
    +actor_rollout_ref.actor.policy_loss.appo.branches_per_rollout=3   (any field of APPOSettings)

verl builds the actor config from that tree in the driver (``validate_config``: a bad value fails there,
naming the key) and in every actor worker, so the "appo" policy loss reads the block from the ``config`` verl
passes it and ``APPOTrainer`` from the same tree (:func:`settings_of`). Without the block, the defaults apply.
The JSON of ``$APPO_VERL_SETTINGS`` (earlier versions) is refused with a message naming the keys.

Omega in verl. ``APPOTrainer`` branches the step's first update part before any update (pi_theta == pi_old:
the Branching Score falls back to entropy alone) and every later part after the updates before it, from a
fresh log-prob pass of the actor against verl's ``old_log_prob`` (pi_old), so Omega measures the real shift.
The rollout engine's log-probs (``rollout_log_probs``) are never used as pi_old: their gap to the actor is
engine mismatch, not a policy shift. A_fut is recomputed at every PPO mini-batch update against the same
pi_old.

Data contract: one verl ``DataProto`` holds a step's initial rollouts AND their branches (R rows):
  batch["token_level_rewards"]         float [R, L] (summed over L: the rollout's reward, as verl's GRPO does)
  batch["response_mask"]               int/bool [R, L], generated response tokens (tool results 0)
  non_tensor_batch["uid"]              object [R], the prompt id; a branch carries its parent's uid
  non_tensor_batch["appo_parent"]      int [R], -1 for an initial rollout, else the ROW INDEX of its parent
  non_tensor_batch["appo_branch_pos"]  int [R], the length of the response prefix a branch shares with its
                                       parent (the parent's response[:pos]); ignored on initial rows
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from typing import Any

import numpy as np
import torch

from appo.algos.chain import APPOSettings, dual_group_base, plan_branches, scale_by_future
from appo.prefix_cache import build_branch_batch
from appo.scoring import future_value
from appo.settings import ConfigError, check_renamed, prefixed

APPO_NAME = "appo"
PARENT_KEY = "appo_parent"
BRANCH_POS_KEY = "appo_branch_pos"
SETTINGS_KEY = "actor_rollout_ref.actor.policy_loss.appo"      # where the block sits in verl's config tree
POLICY_LOSS_TARGET = "appo.integrations.verl_config.APPOPolicyLossConfig"
SETTINGS_ENV = "APPO_VERL_SETTINGS"                            # removed: refused with a hint
RENAMED = {"per": "select_per"}                                # the block's older names -> the current ones


def appo_settings(block, key: str = SETTINGS_KEY) -> APPOSettings:
    """The APPOSettings of a mapping of its fields (a dict or an OmegaConf node, as verl's config tree holds
    the block; an APPOSettings is returned as it is). Unknown keys, old names (a one-line hint naming the new
    one) and bad values raise ConfigError (a ValueError) naming ``key``.<field>."""
    if isinstance(block, APPOSettings):
        return block
    if block is None:
        return APPOSettings()
    if type(block).__name__ in ("DictConfig", "ListConfig"):
        from omegaconf import OmegaConf

        block = OmegaConf.to_container(block, resolve=True)
    if not isinstance(block, dict):
        raise ConfigError(key, f"expected a mapping of APPOSettings fields, got {type(block).__name__}")
    check_renamed(block, RENAMED, prefix=f"{key}.")
    known = [item.name for item in fields(APPOSettings)]
    unknown = sorted(str(name) for name in block if name not in known)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"unknown APPO setting (known: {', '.join(known)})")
    try:
        return APPOSettings(**block)
    except ConfigError as err:
        raise prefixed(err, f"{key}.") from None


def settings_of(config) -> APPOSettings:
    """The APPO settings a verl config holds: from the whole tree (``actor_rollout_ref``), the actor's
    config (``policy_loss``), the policy loss config (``appo``; :class:`APPOPolicyLossConfig` holds it built)
    or the block itself; APPOSettings() when the tree has no block (``policy_loss`` without ``appo``)."""
    for name in ("actor_rollout_ref", "actor", "policy_loss"):
        inner = _get(config, name)
        if inner is not None:
            return settings_of(inner)
    if isinstance(config, APPOSettings):
        return config
    return appo_settings(_get(config, "appo"))


def _get(config, name: str):
    """``config[name]`` of a dict, an OmegaConf node or a verl config dataclass; None when absent."""
    if config is None or isinstance(config, APPOSettings):
        return None
    if isinstance(config, dict) or type(config).__name__ == "DictConfig":
        return config.get(name, None)
    return getattr(config, name, None)


def check_no_settings_env() -> None:
    """Refuse ``$APPO_VERL_SETTINGS`` (earlier versions read the settings from it): a ValueError naming the
    config keys that replace it."""
    if os.environ.get(SETTINGS_ENV, "").strip():
        raise ValueError(f"${SETTINGS_ENV}: no longer read; APPO's settings are verl config keys: "
                         f"actor_rollout_ref.actor.policy_loss._target_={POLICY_LOSS_TARGET} and "
                         f"+{SETTINGS_KEY}.<name>=<value> for each field of appo.algos.chain.APPOSettings "
                         "(docs/integrations.md, verl)")


def _int_field(non_tensor_batch: dict, key: str, rows: int, device: torch.device) -> torch.Tensor:
    if key not in non_tensor_batch:
        raise ValueError(f"non_tensor_batch: missing {key!r} (see appo.integrations.verl's data contract)")
    values = np.asarray(non_tensor_batch[key])
    if values.shape != (rows,):
        raise ValueError(f"non_tensor_batch: {key!r} has shape {values.shape}, expected ({rows},)")
    return torch.as_tensor(values.astype(np.int64), device=device)


def _group_ids(uids, device: torch.device | None = None) -> torch.Tensor:
    """int64 [R] dense ids of verl's prompt uids."""
    _, inverse = np.unique(np.asarray(uids, dtype=object).astype(str), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.int64, device=device)


def appo_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                   index: np.ndarray | None = None, config: Any = None, non_tensor_batch: dict | None = None,
                   epsilon: float | None = None, chain_settings: APPOSettings | None = None,
                   **unused: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator "appo": APPO's dual-group token advantages, float32 [R, L] (returned twice,
    as advantages and returns), 0 on branch rows and off the mask.

    token_level_rewards float [R, L]; response_mask [R, L]; index object [R] (verl's ``uid``: prompt groups);
    non_tensor_batch holds ``appo_parent`` int [R] and ``appo_branch_pos`` int [R] (and ``uid`` when
    ``index`` is None). chain_settings: the APPO settings (``settings_of`` the run's config; None: the
    defaults): the combination rule, the one-group ablation and the z-scores' epsilon (verl's ``epsilon``
    replaces it when given).
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
    group_ids = _group_ids(index, device)
    parent = _int_field(non_tensor_batch, PARENT_KEY, rows, device)
    shared = _int_field(non_tensor_batch, BRANCH_POS_KEY, rows, device)
    initial = parent < 0
    chain = appo_settings(chain_settings)
    if epsilon is not None:
        chain = replace(chain, eps=float(epsilon))
    base = dual_group_base(chain, rewards=token_level_rewards.float().sum(dim=-1), group_ids=group_ids,
                           parent=parent, shared_prefix=shared, mask=response_mask.bool()[initial])
    advantages = torch.zeros(token_level_rewards.shape, dtype=torch.float32, device=device)
    advantages[initial] = base
    return advantages, advantages


def appo_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                     response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                     rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss "appo": verl's clipped PPO loss ("vanilla") on A * (1 + b * A_fut), float [B, L].

    A_fut = clip(exp(s), fut_clip) with s the discounted (``fut_gamma`` per position) sum of
    (log_prob - old_log_prob) * mask to the end of the response, from the current policy and detached
    (``appo.algos.chain.scale_by_future``). ``old_log_prob`` is verl's recomputed pi_old (the actor's own
    forward), so A_fut measures how far this update's policy has moved. The settings (b, fut_gamma,
    fut_clip) are the block of the actor ``config`` verl passes (``policy_loss.appo``, :func:`settings_of`).
    Returns (loss, metrics) as verl's losses do, plus ``appo/future_value_mean`` (mean clipped A_fut over the
    mask).
    """
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    chain = settings_of(config)
    mask = response_mask.bool()
    scaled = scale_by_future(chain, advantages.float(), logprobs=log_prob, old_logprobs=old_log_prob,
                             mask=mask)
    loss, metrics = get_policy_loss_fn("vanilla")(old_log_prob, log_prob, scaled.to(advantages.dtype),
                                                 response_mask, loss_agg_mode, config, rollout_is_weights)
    metrics = dict(metrics)
    if mask.any():
        future = future_value(log_prob.detach(), old_log_prob.detach(), mask, gamma=chain.fut_gamma,
                              clip=chain.fut_clip)
        metrics["appo/future_value_mean"] = float(future[mask].mean())
    return loss, metrics


def compute_advantage(data, *, drop_branches: bool = True, chain_settings: APPOSettings | None = None):
    """Run verl's registered "appo" estimator on a ``DataProto``: what verl's ``compute_advantage`` does for
    other estimators, plus ``non_tensor_batch`` and the APPO settings (None: the defaults). Sets
    ``batch["advantages"]`` and ``batch["returns"]`` [R, L]; with ``drop_branches`` returns only the initial
    rows (those APPO optimises), else all R rows."""
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    if "response_mask" not in data.batch.keys():
        raise ValueError("data: batch['response_mask'] is required (verl's compute_response_mask makes it)")
    estimator = get_adv_estimator_fn(APPO_NAME)
    advantages, returns = estimator(token_level_rewards=data.batch["token_level_rewards"],
                                    response_mask=data.batch["response_mask"],
                                    index=data.non_tensor_batch["uid"],
                                    non_tensor_batch=data.non_tensor_batch, chain_settings=chain_settings)
    data.batch["advantages"] = advantages
    data.batch["returns"] = returns
    if not drop_branches:
        return data
    initial = np.flatnonzero(np.asarray(data.non_tensor_batch[PARENT_KEY]).astype(np.int64) < 0)
    return data.select_idxs(initial)


def register() -> None:
    """Register ``"appo"`` with verl's ``register_adv_est`` and ``register_policy_loss`` (imports verl). The
    trainer mode is registered by importing ``appo.integrations.verl_trainer``
    (``appo.integrations.verl_plugin`` does both). ``$APPO_VERL_SETTINGS`` is refused here
    (:func:`check_no_settings_env`), in every process verl starts."""
    check_no_settings_env()
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, register_adv_est, register_policy_loss

    if ADV_ESTIMATOR_REGISTRY.get(APPO_NAME) is not appo_advantage:
        register_adv_est(APPO_NAME)(appo_advantage)
    register_policy_loss(APPO_NAME)(appo_policy_loss)


# -------------------------------------------------------------------------------------- branching rollouts
PREFIX_IDS_KEY = "raw_prompt_ids"      # non_tensor_batch: each branch prefix as a list of token ids
REWARD_KEYS = ("rm_scores", "token_level_scores", "token_level_rewards")
_META_KEYS = ("eos_token_id", "pad_token_id", "temperature", "global_steps")


def _batch_tensor(source, key: str, name: str) -> torch.Tensor:
    if source.batch is None or key not in source.batch.keys():
        raise ValueError(f"{name}: batch[{key!r}] is missing")
    return source.batch[key]


def _response_tensors(data, log_probs) -> dict[str, torch.Tensor]:
    """The [R, P] / [R, L] tensors branching reads, checked (ValueError naming a missing or misshaped key)."""
    out = {key: _batch_tensor(data, key, "data") for key in ("prompts", "responses", "attention_mask",
                                                             "response_mask")}
    stats = data if log_probs is None else log_probs
    name = "data" if log_probs is None else "log_probs"
    for key in ("old_log_probs", "entropys"):
        if stats.batch is None or key not in stats.batch.keys():
            raise ValueError(f"{name}: batch[{key!r}] is missing (pass log_probs=, the actor's "
                             "compute_log_prob output with calculate_entropy)")
        out[key] = stats.batch[key]
    rows, width = out["responses"].shape
    if out["prompts"].dim() != 2 or out["prompts"].shape[0] != rows:
        raise ValueError(f"data: batch['prompts'] has shape {tuple(out['prompts'].shape)}, "
                         f"expected [{rows}, P]")
    if out["attention_mask"].shape != (rows, out["prompts"].shape[1] + width):
        raise ValueError(f"data: batch['attention_mask'] has shape {tuple(out['attention_mask'].shape)}, "
                         f"expected [{rows}, P + L]")
    for key in ("response_mask", "old_log_probs", "entropys"):
        if out[key].shape != (rows, width):
            raise ValueError(f"{key}: shape {tuple(out[key].shape)} does not match responses "
                             f"[{rows}, {width}]")
    if "uid" not in data.non_tensor_batch:
        raise ValueError("data: non_tensor_batch['uid'] is missing (the prompt groups that share a budget)")
    return out


def plan(data, *, current=None, chain_settings: APPOSettings | None = None,
         compute_dtype: torch.dtype = torch.float32):
    """APPO's branch points in verl's rows: ``appo.algos.chain.plan_branches`` on each prompt group.

    data: a ``DataProto`` with batch ``responses`` int64 [R, L], ``response_mask`` [R, L] (1 = model token;
      tool results 0), ``old_log_probs`` and ``entropys`` float [R, L] (pi_old: the actor's forward of the
      policy that sampled), and non_tensor_batch ``uid`` (the prompt groups).
    current: None before any update of the step (pi_theta == pi_old: every row falls back to entropy alone),
      else the actor's pass of the policy it holds now: ``log_probs`` and ``entropys`` float [R, L] (a
      ``DataProto`` or a dict), so Omega measures the shift of the step's updates so far.
    compute_dtype: the dtype of the actor's forwards (verl's ``fsdp_config.dtype``, bf16 by default): it sets
      the chain's no-shift tolerance (``appo.scoring.no_shift_tolerance``) unless the settings give one, so a
      row whose log-ratios are within rounding noise of that dtype falls back to entropy alone.
    Returns (plan, metrics) or (None, {}) when no row holds a model token or B = 0. Every prompt with N rows
    gets exactly B * N points (the chain's fill rule). metrics: ``appo/branches``, ``branches_filled``,
    ``branches_fresh``, ``entropy_only_fraction`` (rows scored by entropy alone: no shift beyond the
    tolerance), ``mean_branch_position`` and ``log_ratio_max`` (the largest |log pi_theta - log pi_old| on a
    model token: 0 when nothing moved). chain_settings: the APPO settings (None: the defaults).
    """
    chain = appo_settings(chain_settings)
    t = _response_tensors(data, None)
    mask = t["response_mask"].bool()
    if not mask.any() or chain.branches_per_rollout == 0:
        return None, {}
    old = t["old_log_probs"].float()
    logprobs, entropy = old, t["entropys"].float()
    if current is not None:
        stats = current.batch if hasattr(current, "batch") else current
        for key in ("log_probs", "entropys"):
            if key not in stats.keys() or tuple(stats[key].shape) != tuple(mask.shape):
                raise ValueError(f"current: needs {key!r} float [R, L] = {tuple(mask.shape)} (the actor's "
                                 "pass of the policy it holds now)")
        logprobs, entropy = stats["log_probs"].float(), stats["entropys"].float()
    branch_plan = plan_branches(chain, tokens=t["responses"], mask=mask,
                                group_ids=_group_ids(data.non_tensor_batch["uid"]), logprobs=logprobs,
                                old_logprobs=old, entropy=entropy, compute_dtype=compute_dtype)
    if branch_plan.src.numel() == 0:
        return None, {}
    shift = ((logprobs - old).abs() * mask).max()
    metrics = {"appo/branches": int(branch_plan.src.numel()), "appo/branches_filled": branch_plan.filled,
               "appo/branches_fresh": branch_plan.fresh,
               "appo/entropy_only_fraction": branch_plan.entropy_only_fraction,
               "appo/mean_branch_position": float(branch_plan.pos.float().mean()),
               "appo/log_ratio_max": float(shift)}
    return branch_plan, metrics


def branch_requests(data, *, log_probs=None, current=None, chain_settings: APPOSettings | None = None,
                    pad_token_id: int | None = None):
    """Choose APPO's branch points in verl's initial rollouts and return their prefixes, ready to generate
    with verl's HF rollout (``generate_sequences``).

    data: the step's ``DataProto`` after generation (R rows): batch ``prompts`` int64 [R, P] (left-padded),
      ``responses`` int64 [R, L] (right-padded), ``attention_mask`` [R, P + L], ``response_mask`` [R, L]
      (1 = model token; tool results 0); non_tensor_batch ``uid`` (the prompt groups) and whatever the reward
      needs.
    log_probs: the actor's ``compute_log_prob`` output for pi_old (``old_log_probs``, ``entropys`` float
      [R, L]), or None to read both from ``data``.
    current: pi_theta, as in :func:`plan` (None: branching before any update, entropy-only).
    Returns None when there is nothing to branch, else a ``DataProto`` of K rows (HF-rollout style input):
      batch ``input_ids`` / ``attention_mask`` / ``position_ids`` int64 [K, P'] = prompt + response[:shared],
      left-padded with ``pad_token_id`` (default meta_info's, else 0); non_tensor_batch: the parent's fields
      (``uid``, ``data_source``, ...), ``appo_parent`` (parent row in ``data``), ``appo_branch_pos`` (length
      of the shared response prefix) and ``raw_prompt_ids`` (each prefix as a list of ids); meta_info
      ``do_sample=True``, ``response_length`` = L - the shortest shared prefix, verl's eos/pad ids and
      temperature when ``data`` has them, and ``appo_metrics`` (:func:`plan`'s metrics).
    A plain continuation of a prefix runs no tool loop: for tool tasks, branch through verl's agent loop
    (:func:`agent_loop_requests`, as ``APPOTrainer`` does).
    """
    chain = appo_settings(chain_settings)
    if log_probs is not None:
        _response_tensors(data, log_probs)
        data = type(data)(batch=data.batch.clone(), non_tensor_batch=data.non_tensor_batch,
                          meta_info=data.meta_info)
        for key in ("old_log_probs", "entropys"):
            data.batch[key] = log_probs.batch[key]
    t = _response_tensors(data, None)
    branch_plan, metrics = plan(data, current=current, chain_settings=chain)
    if branch_plan is None:
        return None
    if pad_token_id is None:
        pad_token_id = data.meta_info.get("pad_token_id", 0)

    # Rows as prompt + response, left-aligned (prompt padding removed), for build_branch_batch.
    prompt_width, width = t["prompts"].shape[1], t["responses"].shape[1]
    tokens = torch.cat([t["prompts"], t["responses"]], dim=1).long()
    prompt_len = t["attention_mask"][:, :prompt_width].long().sum(1)
    shift = (prompt_width - prompt_len)[:, None]
    index = (torch.arange(prompt_width + width, device=tokens.device)[None, :] + shift).clamp(
        max=prompt_width + width - 1)
    tokens = tokens.gather(1, index)
    lengths = prompt_len + t["attention_mask"][:, prompt_width:].long().sum(1)
    rows, positions = branch_plan.src.to(tokens.device), branch_plan.pos.to(tokens.device)
    prefix = build_branch_batch(tokens, lengths, rows, prompt_len[rows] + positions, pad_id=int(pad_token_id),
                                include_token=chain.include_token)

    shared = branch_plan.shared.cpu().numpy()
    parent = rows.cpu().numpy()
    non_tensors = {key: np.asarray(value)[parent] for key, value in data.non_tensor_batch.items()}
    prefix_ids = np.empty(len(parent), dtype=object)
    for k, length in enumerate(prefix.prefix_lengths.tolist()):
        prefix_ids[k] = prefix.input_ids[k, prefix.input_ids.shape[1] - length:].tolist()
    non_tensors.update({PARENT_KEY: parent.astype(np.int64), BRANCH_POS_KEY: shared.astype(np.int64),
                        PREFIX_IDS_KEY: prefix_ids})
    meta = {key: data.meta_info[key] for key in _META_KEYS if key in data.meta_info}
    meta.update(do_sample=True, response_length=int(width - shared.min()), appo_metrics=metrics)
    tensors = {"input_ids": prefix.input_ids, "attention_mask": prefix.attention_mask,
               "position_ids": prefix.position_ids}
    return type(data).from_dict(tensors=tensors, non_tensors=non_tensors, meta_info=meta)


BRANCH_KEY = "appo_branch"             # the agent loop's input: the prefix a branch continues
# fields an agent loop wrote for its rollout (verl stores them beside the dataset's): never inputs of a branch
_AGENT_OUTPUT_FIELDS = ("extra_fields", "num_turns", "metrics", "mm_processor_kwargs", "mm_processor_output",
                        "multi_modal_inputs", "multi_modal_data", "reward_extra_info", "session_id",
                        "__num_turns__", "priority", PARENT_KEY, BRANCH_POS_KEY, PREFIX_IDS_KEY, BRANCH_KEY)


def agent_loop_requests(data, branch_plan, *, agent_names):
    """The inputs of verl's ``AgentLoopManager.generate_sequences`` for the K branch points of ``branch_plan``
    (:func:`plan` on ``data``): one row per branch, non_tensor_batch only.

    data: the rows :func:`plan` read, with batch ``prompts`` [R, P] (left-padded), ``responses`` /
      ``response_mask`` [R, L] and ``attention_mask`` [R, P + L], and the dataset's fields (``raw_prompt``,
      ``data_source``, ``reward_model``, ``extra_info``, ``uid``, ...) in non_tensor_batch.
    agent_names: per row of ``data``, the registered name of the agent loop that sampled it: the branch runs
      through that same loop (it must continue a prefix, as ``appo.integrations.verl_agent`` does).
    Each request: the parent's dataset fields (not its agent loop's outputs), ``agent_name``, ``appo_parent``
    (parent row), ``appo_branch_pos`` (the shared prefix length s) and ``appo_branch`` = {"prompt_ids",
    "response_ids", "response_mask", "include_token"}: the parent's prompt and its response[:s] with its mask.
    """
    if len(agent_names) != len(data):
        raise ValueError(f"agent_names: expected one name per row ({len(data)}), got {len(agent_names)}")
    prompts = _batch_tensor(data, "prompts", "data")
    responses = _batch_tensor(data, "responses", "data")
    response_mask = _batch_tensor(data, "response_mask", "data")
    prompt_mask = _batch_tensor(data, "attention_mask", "data")[:, :prompts.shape[1]].bool()
    parent = branch_plan.src.cpu().numpy().astype(np.int64)
    shared = branch_plan.shared.cpu().numpy().astype(np.int64)
    keep_token = (branch_plan.shared - branch_plan.pos).cpu().tolist()
    branches = np.empty(len(parent), dtype=object)
    for k, (r, s) in enumerate(zip(parent.tolist(), shared.tolist())):
        branches[k] = {"prompt_ids": prompts[r][prompt_mask[r]].tolist(),
                       "response_ids": responses[r, :s].tolist(),
                       "response_mask": response_mask[r, :s].tolist(),
                       "include_token": bool(keep_token[k])}
    non_tensors = {key: np.asarray(value, dtype=object)[parent]
                   for key, value in data.non_tensor_batch.items() if key not in _AGENT_OUTPUT_FIELDS}
    names = np.empty(len(parent), dtype=object)
    names[:] = [str(agent_names[r]) for r in parent.tolist()]
    non_tensors.update({"agent_name": names, PARENT_KEY: parent, BRANCH_POS_KEY: shared,
                        BRANCH_KEY: branches})
    return type(data)(batch=None, non_tensor_batch=non_tensors, meta_info={})


def _with_branch_fields(data):
    """``data`` (initial rows only) with appo_parent = -1 and appo_branch_pos = 0 on every row."""
    if PARENT_KEY in data.non_tensor_batch and (np.asarray(data.non_tensor_batch[PARENT_KEY]) >= 0).any():
        raise ValueError(f"data: non_tensor_batch[{PARENT_KEY!r}] already marks branch rows (merge once)")
    data.non_tensor_batch[PARENT_KEY] = np.full(len(data), -1, dtype=np.int64)
    data.non_tensor_batch[BRANCH_POS_KEY] = np.zeros(len(data), dtype=np.int64)
    return data


def merge_branches(data, branch_output, *, requests=None, pad_token_id: int | None = None):
    """Append generated branch continuations to ``data`` as rows laid out like the initial rollouts.

    data: the initial rows (what :func:`branch_requests` read), R rows, prompts [R, P], responses [R, L].
    branch_output: what verl's rollout returned for the K requests: batch ``responses`` int64 [K, Lb] (the new
      tokens, right-padded) and ``attention_mask`` [K, P' + Lb]; optionally ``response_mask`` [K, Lb] (1 on
      model tokens, an agent loop's tool results 0; default: the attention mask's response part) and any
      other [K, Lb] key ``data`` also has (e.g. ``rollout_log_probs``). None (no branches) returns ``data``
      with the metadata fields set for initial rows only.
    requests: the :func:`branch_requests` output, when ``branch_output`` does not carry its non_tensor_batch
      (verl's HF rollout drops it; the agent loop keeps it).
    Branch row k (parent r, shared prefix s = appo_branch_pos): prompts / prompt attention = row r's;
      responses = row r's response[:s] + the first min(new, L - s) new tokens (longer continuations are cut,
      as verl cuts at response_length); response_mask = row r's mask[:s] (appo's bundle copies the parent's
      prefix mask) + the branch's mask; position_ids = cumsum(attention) - 1 as verl builds them; keys in both
      spliced the same way; reward keys (``rm_scores``, ``token_level_scores/rewards``) NaN, so branch rewards
      must be computed on the merged rows (a continuation-only reward would miss the prefix); every other key
      of ``data`` zeros (placeholders: :func:`compute_advantage` drops branch rows before the update).
      non_tensor_batch: row r's fields (``uid`` included), ``appo_parent`` = r, ``appo_branch_pos`` = s.
    Returns the R + K rows (initial rows first, unchanged), ready for rewards and :func:`compute_advantage`.
    """
    data = _with_branch_fields(type(data)(batch=data.batch, non_tensor_batch=dict(data.non_tensor_batch),
                                          meta_info=dict(data.meta_info)))      # the caller's stays as it was
    if branch_output is None:
        return data
    meta = (requests if requests is not None else branch_output).non_tensor_batch
    source_name = "requests" if requests is not None else "branch_output"
    for key in (PARENT_KEY, BRANCH_POS_KEY):
        if key not in meta:
            raise ValueError(f"{source_name}: non_tensor_batch[{key!r}] is missing (pass requests=, the "
                             "branch_requests output, when the rollout drops non_tensor_batch)")
    branches = len(branch_output)
    parent = _int_field(meta, PARENT_KEY, branches, torch.device("cpu")).numpy()
    shared = _int_field(meta, BRANCH_POS_KEY, branches, torch.device("cpu"))
    prompts = _batch_tensor(data, "prompts", "data")
    responses = _batch_tensor(data, "responses", "data")
    rows, width = responses.shape
    if ((parent < 0) | (parent >= rows)).any() or ((shared < 0) | (shared > width)).any():
        raise ValueError(f"{source_name}: {PARENT_KEY!r} / {BRANCH_POS_KEY!r} outside the {rows} x {width} "
                         "initial responses")
    new_tokens = _batch_tensor(branch_output, "responses", "branch_output")
    new_width = new_tokens.shape[1]
    new_attention = _batch_tensor(branch_output, "attention_mask", "branch_output")[:, -new_width:].long()
    outputs = branch_output.batch.keys()
    new_mask = branch_output.batch["response_mask"] if "response_mask" in outputs else new_attention
    position_ids = _batch_tensor(data, "position_ids", "data")
    if position_ids.dim() != 2:
        raise ValueError("data: batch['position_ids'] must be [R, P + L] (multimodal 3-D rope ids are not "
                         "supported by merge_branches)")
    if pad_token_id is None:
        pad_token_id = data.meta_info.get("pad_token_id", 0)

    device = responses.device
    src = torch.as_tensor(parent, device=device)
    shared = shared.to(device)
    kept = torch.minimum(new_attention.sum(1).to(device), width - shared)         # new tokens kept [K]
    cols = torch.arange(width, device=device)[None, :]
    from_parent = cols < shared[:, None]
    offset = cols - shared[:, None]
    from_branch = (offset >= 0) & (offset < kept[:, None])
    gather_at = offset.clamp(0, new_width - 1)

    def splice(parent_rows: torch.Tensor, new: torch.Tensor, fill) -> torch.Tensor:
        picked = new.to(device, parent_rows.dtype).gather(1, gather_at)
        out = torch.where(from_branch, picked, torch.full_like(parent_rows, fill))
        return torch.where(from_parent, parent_rows, out)

    attention = _batch_tensor(data, "attention_mask", "data")
    response_attention = (from_parent | from_branch).to(attention.dtype)
    merged_attention = torch.cat([attention[src, :prompts.shape[1]], response_attention], dim=1)
    merged_responses = splice(responses[src], new_tokens, pad_token_id)
    built = {
        "prompts": prompts[src], "responses": merged_responses,
        "response_mask": splice(_batch_tensor(data, "response_mask", "data")[src], new_mask, 0),
        "input_ids": torch.cat([prompts[src], merged_responses], dim=1), "attention_mask": merged_attention,
        "position_ids": (merged_attention.long().cumsum(-1) - 1).clamp(min=0).to(position_ids.dtype),
    }
    tensors = {}
    for key in data.batch.keys():
        value = data.batch[key]
        if key in built:
            tensors[key] = built[key]
        elif key in REWARD_KEYS:
            tensors[key] = torch.full((branches, *value.shape[1:]), float("nan"), dtype=value.dtype,
                                      device=device)
        elif (key in outputs and value.shape[1:] == (width,)
              and branch_output.batch[key].shape[1:] == (new_width,)):
            tensors[key] = splice(value[src], branch_output.batch[key], 0)
        else:
            tensors[key] = torch.zeros((branches, *value.shape[1:]), dtype=value.dtype, device=device)
    non_tensors = {key: np.asarray(value)[parent] for key, value in data.non_tensor_batch.items()}
    non_tensors[PARENT_KEY] = parent.astype(np.int64)
    non_tensors[BRANCH_POS_KEY] = shared.cpu().numpy().astype(np.int64)
    branch_rows = type(data).from_dict(tensors=tensors, non_tensors=non_tensors,
                                       meta_info=dict(data.meta_info))
    merged = type(data).concat([data, branch_rows])
    merged.meta_info = dict(data.meta_info)
    return merged
