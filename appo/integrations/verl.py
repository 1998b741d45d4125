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
* Branching rollouts, called in a (patched) ``RayPPOTrainer.fit`` between generation + ``compute_log_prob``
  and reward + advantage: :func:`branch_requests` scores the initial responses with ``appo.branching_score``
  and returns the branch prefixes as a generation-ready ``DataProto``; verl's rollout generates them;
  :func:`merge_branches` appends the continuations as rows laid out like the initial ones, with the metadata
  above filled in. docs/integrations.md has the recipe.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from appo.algos.advantages import dual_group_advantages, future_aware_scaling
from appo.prefix_cache import build_branch_batch
from appo.scoring import FUTURE_VALUE_CLIP, GAMMA, branching_score, future_value, select_branch_points

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
                             "compute_log_prob output; verl's fit pops 'entropys' before its union)")
        out[key] = stats.batch[key]
    for source in (stats, data):
        if source.batch is not None and "rollout_log_probs" in source.batch.keys():
            out["rollout_log_probs"] = source.batch["rollout_log_probs"]
            break
    rows, width = out["responses"].shape
    if out["prompts"].dim() != 2 or out["prompts"].shape[0] != rows:
        raise ValueError(f"data: batch['prompts'] has shape {tuple(out['prompts'].shape)}, "
                         f"expected [{rows}, P]")
    if out["attention_mask"].shape != (rows, out["prompts"].shape[1] + width):
        raise ValueError(f"data: batch['attention_mask'] has shape {tuple(out['attention_mask'].shape)}, "
                         f"expected [{rows}, P + L]")
    for key in ("response_mask", "old_log_probs", "entropys", "rollout_log_probs"):
        if key in out and out[key].shape != (rows, width):
            raise ValueError(f"{key}: shape {tuple(out[key].shape)} does not match responses "
                             f"[{rows}, {width}]")
    return out


def branch_requests(data, *, log_probs=None, branches_per_rollout: int = 3, candidates: str = "strict",
                    per: str = "rollout", min_gap: int = 0, include_token: bool = False, gamma: float = GAMMA,
                    clip: tuple[float, float] = FUTURE_VALUE_CLIP, pad_token_id: int | None = None,
                    agent_name: str | None = "appo_branch"):
    """Choose APPO branch points in verl's initial rollouts and return their prefixes, ready to generate.

    data: the step's ``DataProto`` after generation (R rows): batch ``prompts`` int64 [R, P] (left-padded),
      ``responses`` int64 [R, L] (right-padded), ``attention_mask`` [R, P + L], ``response_mask`` [R, L]
      (1 = model token; tool results 0), optionally ``rollout_log_probs`` float [R, L] (the sampling engine's
      log-probs); non_tensor_batch ``uid`` (only for ``per="group"``) and whatever the reward needs.
    log_probs: the actor's ``compute_log_prob`` output (``old_log_probs``, ``entropys`` float [R, L]; verl's
      ``fit`` pops ``entropys`` before its union, so pass this object), or None to read both from ``data``.
    The Branching Score (METHOD.md Eq. 5) compares the actor's log-probs (pi_theta) with the sampling ones;
      without ``rollout_log_probs`` they are the same and the score falls back to entropy alone.
    branches_per_rollout (B), candidates, per, min_gap, include_token, gamma, clip: as in
      ``appo.branching_score`` / ``appo.select_branch_points`` (a row with fewer candidates gets fewer).
    Returns None when no token qualifies, else a ``DataProto`` of K rows (HF-rollout style input):
      batch ``input_ids`` / ``attention_mask`` / ``position_ids`` int64 [K, P'] = prompt + response[:pos],
      left-padded with ``pad_token_id`` (default meta_info's, else 0); non_tensor_batch: the parent's fields
      (``uid``, ``data_source``, ...), ``appo_parent`` (parent row in ``data``), ``appo_branch_pos`` (length
      of the shared response prefix: pos, + 1 with include_token), ``raw_prompt_ids`` (each prefix as a
      list of ids, for a token-id agent loop) and ``agent_name`` (default "appo_branch": verl's stock agent
      loops rebuild the prompt from ``raw_prompt`` and would drop the prefix; None keeps the parent's);
      meta_info ``do_sample=True``, ``response_length`` = L - the shortest shared prefix, verl's eos/pad ids
      and temperature when ``data`` has them, and ``appo_metrics`` (branches, mean score, fallback share).
    """
    t = _response_tensors(data, log_probs)
    mask = t["response_mask"].bool()
    sampling = t.get("rollout_log_probs", t["old_log_probs"])
    score = branching_score(tokens=t["responses"], old_logprobs=sampling.float(), mask=mask,
                            entropy=t["entropys"].float(), logprobs=t["old_log_probs"].float(), gamma=gamma,
                            clip=clip, candidates=candidates)
    group_ids = None
    if per == "group":
        if "uid" not in data.non_tensor_batch:
            raise ValueError("data: non_tensor_batch['uid'] is missing (per='group' pools a prompt's rows)")
        _, inverse = np.unique(np.asarray(data.non_tensor_batch["uid"]).astype(str), return_inverse=True)
        group_ids = torch.as_tensor(inverse.reshape(-1), dtype=torch.int64)
    rows, positions = select_branch_points(score.score, branches_per_rollout, group_ids=group_ids, per=per,
                                           min_gap=min_gap, allow_fewer=True)
    if rows.numel() == 0:
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
    rows, positions = rows.to(tokens.device), positions.to(tokens.device)
    prefix = build_branch_batch(tokens, lengths, rows, prompt_len[rows] + positions, pad_id=int(pad_token_id),
                                include_token=include_token)

    shared = (positions + int(include_token)).cpu().numpy()
    parent = rows.cpu().numpy()
    non_tensors = {key: np.asarray(value)[parent] for key, value in data.non_tensor_batch.items()}
    prefix_ids = np.empty(len(parent), dtype=object)
    for k, length in enumerate(prefix.prefix_lengths.tolist()):
        prefix_ids[k] = prefix.input_ids[k, prefix.input_ids.shape[1] - length:].tolist()
    non_tensors.update({PARENT_KEY: parent.astype(np.int64), BRANCH_POS_KEY: shared.astype(np.int64),
                        PREFIX_IDS_KEY: prefix_ids})
    if agent_name is not None:
        non_tensors["agent_name"] = np.array([agent_name] * len(parent), dtype=object)
    meta = {key: data.meta_info[key] for key in _META_KEYS if key in data.meta_info}
    chosen = score.score[rows, positions]
    meta.update(do_sample=True, response_length=int(width - shared.min()), appo_metrics={
        "appo/branches": int(rows.numel()), "appo/mean_branching_score": float(chosen.mean()),
        "appo/entropy_only_fraction": float(score.entropy_only.float().mean()),
        "appo/mean_branch_position": float(positions.float().mean())})
    tensors = {"input_ids": prefix.input_ids, "attention_mask": prefix.attention_mask,
               "position_ids": prefix.position_ids}
    return type(data).from_dict(tensors=tensors, non_tensors=non_tensors, meta_info=meta)


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
