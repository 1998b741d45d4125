"""APPO as a trainer mode of verl 0.9.1's v1 trainer: ``trainer.v1.trainer_mode=appo``.

Importing this module imports verl's v1 trainer (verl's full install: ray, transfer_queue, ...) and registers
:class:`APPOTrainer` with verl's ``register_trainer("appo")``; ``appo.integrations.verl_plugin`` does that
when verl loads it (``VERL_USE_EXTERNAL_MODULES=appo.integrations.verl_plugin``). Nothing of verl is patched:
the class overrides three methods of verl's ``PPOTrainer`` that exist to be overridden
(``_compute_old_log_prob`` is left to verl, ``_compute_advantage`` and ``_update_actor`` are APPO's) and
leaves every other step (sampling through verl's agent loops, rewards, balancing, reference, weight sync at
the step's end) to verl's sync trainer.

One step of ``APPOTrainer`` (verl's ``_step_once``; APPO's additions marked +):
  sample the step's prompts x N rollouts (verl's agent loop: appo's ``appo_agent``, rewarded by verl's reward
    workers), balance them across data-parallel ranks;
  verl's old-log-prob pass: pi_old (``old_log_probs``) and entropies of every row, from the actor itself;
  ``_compute_advantage``: + verl's rollout correction (decoupled mode) when configured; advantages 0 for now;
  ``_update_actor``: + the step's prompts split into U = train_batch_size / ppo_mini_batch_size parts (whole
    prompt groups, verl's actor mini-batches); for part u:
      + pi_theta: for u = 0 the policy that sampled (pi_theta == pi_old, so the Branching Score falls back to
        entropy alone); for u > 0 a log-prob pass of the actor after the u updates so far
        (``actor_rollout_wg.compute_log_prob``), so Omega measures the real shift;
      + ``appo.integrations.verl.plan``: exactly B * N branch points per prompt;
      + the rollout replicas get the actor's current weights (``checkpoint_manager.update_weights``), each
        branch is decoded through verl's ``AgentLoopManager`` with the agent loop that sampled its parent (the
        same tools and stop tags: a tool call in a branch runs the tool), rewarded by verl's reward workers,
        and the replicas sleep again;
      + the "appo" estimator over the part's rows and their branches -> advantages into TransferQueue;
      verl's actor update on the part (``policy_loss.loss_mode=appo``: A_fut recomputed against pi_old).
  verl's weight sync for the next step.
Padding rows verl adds to balance the data-parallel split are neither branched nor counted in any group; they
ride along in the parts (advantage 0) to keep each part divisible by the data-parallel size.

Cost per step (timings ``appo_sync``, ``appo_logprob``, ``appo_branch_generate``, ``appo_branch_reward``,
inside verl's ``update_actor`` timer): U weight syncs (the first also wakes the replicas verl put to sleep
after sampling) and U - 1 log-prob passes over a part each.

verl's rollouts need a GPU server (vLLM / SGLang); ``scripts/verl_main_ppo.sh`` runs the whole trainer on a
GPU machine. tests/integrations/test_verl.py runs ``_compute_advantage`` and ``_update_actor`` as they are, on
verl's Ray worker group with CPU workers standing in for the actor and the rollout server, a real
TransferQueue, verl's ``AgentLoopManager`` / ``LLMServerClient`` / router / reward loop workers, and
``appo_agent``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from itertools import chain

import numpy as np
import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl import DataProto
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.debug import marked_timer
from verl.workers.utils.padding import response_from_nested, response_to_nested

from appo.integrations import verl as appo_verl

logger = logging.getLogger(__name__)

APPO_MODE = "appo"
_BRANCH_FIELDS = ("prompts", "responses", "response_mask", "old_log_probs", "entropy")
_VERL_AGENT_LOOPS = ("single_turn_agent", "tool_agent")   # verl's own loops cannot continue a prefix


def _rows(value) -> list[torch.Tensor]:
    """The per-row 1-D tensors of a TransferQueue column (jagged nested, or dense when all rows match)."""
    return list(value.unbind()) if isinstance(value, torch.Tensor) else [torch.as_tensor(v) for v in value]


def _pad(rows: list[torch.Tensor], width: int, value, *, left: bool = False, dtype=None) -> torch.Tensor:
    """[R, width] from R 1-D tensors, padded with ``value`` on the right (or the left)."""
    dtype = dtype or (rows[0].dtype if rows else torch.long)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            if left:
                out[i, width - len(row):] = row
            else:
                out[i, :len(row)] = row
    return out


def _object_column(values) -> np.ndarray:
    """A 1-D object array, one element per row (lists and dicts stay whole)."""
    values = list(values)
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


def rows_to_dataproto(rows: TensorDict, *, pad_token_id: int, response_width: int | None = None) -> DataProto:
    """The step's rows as TransferQueue holds them (one per key: ``prompts``, ``responses``,
    ``response_mask``, ``old_log_probs``, ``entropy`` of each row's own length, plus the dataset's
    non-tensor fields) as a ``DataProto`` in verl's HF-rollout layout, the one ``appo.integrations.verl``
    reads: ``prompts`` int64 [R, P] left-padded, ``responses`` / ``response_mask`` [R, L] right-padded
    (L = ``response_width``, at least the longest response), ``attention_mask`` [R, P + L], ``position_ids``
    (cumsum - 1), ``old_log_probs`` / ``entropys`` float32 [R, L]; every non-tensor field as an object array.
    Missing fields are a ValueError naming them."""
    missing = [name for name in _BRANCH_FIELDS if name not in rows.keys()]
    if missing:
        raise ValueError(f"rows: TransferQueue fields {missing} are missing (run after verl's "
                         "old-log-prob pass)")
    prompts = _rows(rows["prompts"])
    responses = _rows(rows["responses"])
    width = max([len(r) for r in responses] + [response_width or 0])
    prompt_width = max(len(p) for p in prompts)
    lengths = torch.tensor([len(r) for r in responses])
    prompt_ids = _pad(prompts, prompt_width, pad_token_id, left=True, dtype=torch.long)
    prompt_mask = _pad([torch.ones(len(p), dtype=torch.long) for p in prompts], prompt_width, 0, left=True)
    response_attention = (torch.arange(width)[None, :] < lengths[:, None]).long()
    attention = torch.cat([prompt_mask, response_attention], dim=1)
    tensors = {
        "prompts": prompt_ids, "responses": _pad(responses, width, pad_token_id, dtype=torch.long),
        "response_mask": _pad(_rows(rows["response_mask"]), width, 0, dtype=torch.long),
        "attention_mask": attention, "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
        "old_log_probs": _pad(_rows(rows["old_log_probs"]), width, 0.0, dtype=torch.float32),
        "entropys": _pad(_rows(rows["entropy"]), width, 0.0, dtype=torch.float32),
    }
    tensors["input_ids"] = torch.cat([tensors["prompts"], tensors["responses"]], dim=1)
    non_tensors = {key: _object_column(rows[key]) for key in rows.keys()
                   if not isinstance(rows[key], torch.Tensor)}
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors,
                               meta_info={"pad_token_id": pad_token_id})


def prompt_of(key: str) -> str:
    """The prompt uid of a TransferQueue key ``{uid}_{session}_{index}`` (verl's agent-loop layout)."""
    return key.rsplit("_", 2)[0]


def split_parts(keys: list[str], tags: list[dict], *, prompts_per_part: int, dp_size: int) -> list[list[int]]:
    """The step's rows as APPO's update parts: lists of row indices, each of ``prompts_per_part`` whole prompt
    groups (in the batch's order; the last may hold fewer), with verl's padding rows (``is_padding`` tags)
    added so each part's size is a multiple of ``dp_size``; a part no padding row can complete is merged into
    its neighbour. Every row lands in exactly one part."""
    if prompts_per_part < 1 or dp_size < 1:
        raise ValueError(f"prompts_per_part, dp_size: must be >= 1, got {prompts_per_part}, {dp_size}")
    groups: OrderedDict[str, list[int]] = OrderedDict()
    pool = []
    for i, (key, tag) in enumerate(zip(keys, tags)):
        if tag.get("is_padding", False):
            pool.append(i)
        else:
            groups.setdefault(prompt_of(key), []).append(i)
    ordered = list(groups.values())
    parts = [list(chain.from_iterable(ordered[i:i + prompts_per_part]))
             for i in range(0, len(ordered), prompts_per_part)]
    fixed: list[list[int]] = []
    carry: list[int] = []
    for part in parts:
        part = carry + part
        need = (-len(part)) % dp_size
        if need <= len(pool):
            fixed.append(part + pool[:need])
            pool, carry = pool[need:], []
        else:
            carry = part
    if carry:
        if fixed:
            fixed[-1] += carry
        else:
            fixed.append(carry)
    if not fixed:
        return [pool] if pool else []
    fixed[-1] += pool
    return fixed


@register_trainer(APPO_MODE)
class APPOTrainer(PPOTrainerSync):
    """verl's synchronous PPO trainer with APPO's branching and advantages (module docstring).

    APPO's settings are ``actor_rollout_ref.actor.policy_loss.appo`` (``appo.integrations.verl_config``),
    read here and, from the same tree, by the "appo" loss on the actor workers.

    Refused at construction, each with its reason: another ``algorithm.adv_estimator`` or
    ``policy_loss.loss_mode`` than "appo", an APPO settings block without APPO's policy-loss ``_target_``
    or with a bad value, ``algorithm.use_kl_in_reward`` (APPO's rewards are per rollout),
    rollout-correction ``bypass_mode`` (pi_old would be the rollout engine's log-probs, so A_fut would measure
    engine mismatch), ``rollout.n`` < 2 (no group to compare) and verl's own agent loops as the default loop
    (they cannot continue a branch prefix)."""

    def __init__(self, config):
        _check_config(config)
        super().__init__(config)
        self.appo_settings = appo_verl.settings_of(config)   # policy_loss.appo: the workers' loss reads it too
        self._appo_branch_loop = None
        parts = config.data.train_batch_size // config.actor_rollout_ref.actor.ppo_mini_batch_size
        if parts < 2:
            logger.warning("appo: data.train_batch_size == actor.ppo_mini_batch_size: one update per step, "
                           "so every branch is planned before any update and Omega is 1 on every row "
                           "(appo/entropy_only_fraction = 1)")

    # ------------------------------------------------------------------------------ verl's override points
    def _build_replay_buffer(self):
        """verl's sync replay buffer. APPOTrainer is verl's sync trainer plus APPO, so verl's code paths that
        ask for the trainer mode (replay buffer, dataloader refill, checkpointing) see "sync"; verl would
        otherwise pick its async buffer for any mode but "sync". The config keeps ``trainer_mode=appo``."""
        self.trainer_mode = "sync"
        return super()._build_replay_buffer()

    def _compute_advantage(self, batch, metrics):
        """verl's rollout correction (decoupled mode) on the step's rows when configured, and advantages /
        returns of 0 on every row: APPO's are written part by part in :meth:`_update_actor`, each just before
        its update (a part's branches come from the policy after the previous parts' updates)."""
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                               select_fields=["response_mask", "rollout_log_probs", "old_log_probs"])
        response_mask_nested = data["response_mask"]
        data = DataProto(batch=data.to_padded_tensor())
        zeros = torch.zeros(data.batch["response_mask"].shape, dtype=torch.float32)
        output = {"advantages": response_to_nested(zeros, response_mask_nested),
                  "returns": response_to_nested(zeros, response_mask_nested)}
        correction = self.config.algorithm.get("rollout_correction", None)
        if correction is not None and "rollout_log_probs" in data.batch.keys():
            data, correction_metrics = compute_rollout_correction_and_add_to_batch(data, correction)
            metrics.update(correction_metrics)
            output["response_mask"] = response_to_nested(data.batch["response_mask"], response_mask_nested)
            if "rollout_is_weights" in data.batch.keys():
                output["rollout_is_weights"] = response_to_nested(data.batch["rollout_is_weights"],
                                                                  response_mask_nested)
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                               fields=TensorDict(output, batch_size=len(batch)))

    def _update_actor(self, batch, metrics):
        """APPO's part loop (module docstring): branch each part from the policy the actor holds, write its
        advantages, then verl's actor update on it. verl's actor metrics are averaged over the parts."""
        parts = split_parts(batch.keys, batch.tags,
                            prompts_per_part=int(self.config.actor_rollout_ref.actor.ppo_mini_batch_size),
                            dp_size=self._appo_dp_size())
        actor_metrics: dict[str, list] = {}
        branch_metrics: list[dict] = []
        for u, rows in enumerate(parts):
            part = batch.select_keys([batch.keys[i] for i in rows])
            part.extra_info = dict(batch.extra_info)
            info: dict = {"appo/part": u}
            with marked_timer("appo_branch", self.timing_raw, color="purple"):
                pending = self._appo_branch(part, info, updated=u > 0)
            with marked_timer("appo_advantage", self.timing_raw, color="brown"):
                self._appo_advantages(part, pending)
            branch_metrics.append(info)
            part_metrics: dict = {}
            super()._update_actor(part, part_metrics)
            for key, value in part_metrics.items():
                actor_metrics.setdefault(key, []).append(value)
        metrics.update({key: float(np.mean(values)) for key, values in actor_metrics.items()})
        metrics.update(_step_branch_metrics(branch_metrics))
        return batch

    # ------------------------------------------------------------------------------------- APPO pieces
    def _appo_dp_size(self) -> int:
        """The actor's data-parallel size (verl's dispatch info, as ``_balance_batch`` reads it)."""
        group = self.actor_rollout_wg
        if "actor" not in group._dispatch_info:
            group._dispatch_info["actor"] = group._query_dispatch_info("actor")
        return max(group._dispatch_info["actor"]) + 1

    def _appo_branch(self, part, info: dict, *, updated: bool) -> dict:
        """Branch the part's real rows from the policy the actor holds now; returns what
        :meth:`_appo_advantages` needs: the rows' keys, and per branch its parent (index into those rows),
        shared prefix length and reward. ``info`` gets the plan's metrics."""
        real = [i for i, tag in enumerate(part.tags) if not tag.get("is_padding", False)]
        keys = [part.keys[i] for i in real]
        sessions = {key.rsplit("_", 1)[0] for key in keys}
        if len(sessions) != len(keys):
            raise ValueError("APPOTrainer: a rollout produced several outputs (multi-output agent loop); "
                             "APPO needs one output per rollout")
        empty = {"keys": keys, "parent": np.zeros(0, dtype=np.int64), "shared": np.zeros(0, dtype=np.int64),
                 "rewards": torch.zeros(0)}
        if not keys:
            return empty
        rows = tq.kv_batch_get(keys=keys, partition_id=part.partition_id)
        data = rows_to_dataproto(rows, pad_token_id=self._appo_pad_id(),
                                 response_width=self.config.actor_rollout_ref.rollout.response_length)
        current = self._appo_current_policy(part, real, data) if updated else None
        branch_plan, plan_metrics = appo_verl.plan(data, current=current, chain_settings=self.appo_settings,
                                                   compute_dtype=actor_compute_dtype(self.config))
        info.update(plan_metrics)
        if branch_plan is None:
            return empty
        extra_fields = data.non_tensor_batch.get("extra_fields", [None] * len(keys))
        names = [_agent_name(extra) for extra in extra_fields]
        requests = appo_verl.agent_loop_requests(data, branch_plan, agent_names=names)
        requests.meta_info.update(global_steps=self.global_steps, validate=False)
        with marked_timer("appo_sync", self.timing_raw, color="red"):
            self.checkpoint_manager.update_weights(self.global_steps)   # the actor's weights, replicas awake
        try:
            with marked_timer("appo_branch_generate", self.timing_raw, color="red"):
                generated = self._appo_agent_loops().generate_sequences(requests)
        finally:
            self.checkpoint_manager.sleep_replicas()
        _check_prefixes(data, generated, branch_plan)
        if "rm_scores" not in generated.batch.keys():              # no streaming reward workers: score now
            with marked_timer("appo_branch_reward", self.timing_raw, color="yellow"):
                generated.batch["rm_scores"] = self.reward_loop_manager.compute_rm_score(generated).batch[
                    "rm_scores"]
        rewards = generated.batch["rm_scores"].float().sum(dim=-1)
        info["appo/branch_reward_mean"] = float(rewards.mean())
        info["appo/weight_syncs"] = 1
        return {"keys": keys, "parent": branch_plan.src.cpu().numpy(),
                "shared": branch_plan.shared.cpu().numpy(), "rewards": rewards}

    def _appo_current_policy(self, part, real: list[int], data: DataProto) -> dict[str, torch.Tensor]:
        """pi_theta of the part's real rows (indices ``real``): verl's actor log-prob pass over the part with
        the weights it holds now -> ``log_probs`` / ``entropys`` float32 [R, L] in ``data``'s layout.
        TransferQueue's ``entropy`` becomes this pass's (response tokens, verl's layout); ``old_log_probs``
        stays pi_old."""
        part.extra_info.update(calculate_entropy=True, compute_loss=False,
                               temperature=self.config.actor_rollout_ref.rollout.temperature)
        with marked_timer("appo_logprob", self.timing_raw, color="blue"):
            self.actor_rollout_wg.compute_log_prob(part)
            got = tq.kv_batch_get(keys=part.keys, partition_id=part.partition_id,
                                  select_fields=["log_probs", "entropy", "response_mask"])
            log_probs = response_from_nested(got["log_probs"], got["response_mask"])
            entropy = response_from_nested(got["entropy"], got["response_mask"])
            tq.kv_batch_put(keys=part.keys, partition_id=part.partition_id,
                            fields=TensorDict({"entropy": entropy}, batch_size=len(part)))
        width = data.batch["responses"].shape[1]
        log_probs, entropy = _rows(log_probs), _rows(entropy)
        return {"log_probs": _pad([log_probs[i] for i in real], width, 0.0, dtype=torch.float32),
                "entropys": _pad([entropy[i] for i in real], width, 0.0, dtype=torch.float32)}

    def _appo_agent_loops(self):
        """verl's ``AgentLoopManager`` (workers running the rows' agent loops on verl's LLM servers, rewards
        from verl's reward loop workers), built on first use; it returns its outputs instead of writing them
        to TransferQueue, so branches never enter the replay buffer."""
        if self._appo_branch_loop is None:
            from verl.experimental.agent_loop import AgentLoopManager

            self._appo_branch_loop = AgentLoopManager.create(
                config=self.config, llm_client=self.get_llm_client(),
                teacher_client=self.get_teacher_client(),
                reward_loop_worker_handles=self.get_reward_handles())
        return self._appo_branch_loop

    def _appo_pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def _appo_advantages(self, part, pending: dict):
        """The "appo" estimator over the part's real rows (rewards ``rm_scores``) and their branches ->
        advantages and returns into TransferQueue as verl's nested per-row tensors (0 on padding rows)."""
        fields = ["uid", "response_mask", "rm_scores"]
        data = tq.kv_batch_get(keys=part.keys, partition_id=part.partition_id, select_fields=fields)
        response_mask_nested = data["response_mask"]
        data = DataProto(batch=data.to_padded_tensor())
        uids = np.array(data.batch.pop("uid").tolist(), dtype=object)
        real = [i for i, tag in enumerate(part.tags) if not tag.get("is_padding", False)]
        if [part.keys[i] for i in real] != pending["keys"]:
            raise RuntimeError("APPOTrainer: the branches of this part are missing (the part changed between "
                               "branching and the advantage)")
        advantages = torch.zeros(data.batch["response_mask"].shape, dtype=torch.float32)
        if real:
            rewards = data.batch["rm_scores"].float()[real]
            mask = data.batch["response_mask"][real]
            branches, width = len(pending["parent"]), rewards.shape[1]
            branch_rewards = torch.zeros(branches, width)
            branch_rewards[:, 0] = pending["rewards"].float()
            bundle = DataProto.from_dict(
                tensors={"token_level_rewards": torch.cat([rewards, branch_rewards]),
                         "response_mask": torch.cat([mask, torch.zeros(branches, width, dtype=mask.dtype)])},
                non_tensors={"uid": np.concatenate([uids[real], uids[real][pending["parent"]]]),
                             appo_verl.PARENT_KEY: np.concatenate([np.full(len(real), -1),
                                                                   pending["parent"]]),
                             appo_verl.BRANCH_POS_KEY: np.concatenate([np.zeros(len(real), dtype=np.int64),
                                                                       pending["shared"]])})
            advantages[real] = appo_verl.compute_advantage(
                bundle, chain_settings=self.appo_settings).batch["advantages"]
        output = {"advantages": response_to_nested(advantages, response_mask_nested),
                  "returns": response_to_nested(advantages, response_mask_nested)}
        return tq.kv_batch_put(keys=part.keys, partition_id=part.partition_id,
                               fields=TensorDict(output, batch_size=len(part)))


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def actor_compute_dtype(config) -> torch.dtype:
    """The dtype of the actor's forwards (``actor_rollout_ref.actor.fsdp_config.dtype``, else the megatron
    engine's ``dtype``; bf16, verl's default, when neither is set): it sets APPO's no-shift tolerance."""
    actor = config.actor_rollout_ref.actor
    for section in ("fsdp_config", "megatron"):
        part = actor.get(section, None)
        name = part.get("dtype", None) if part is not None else None
        if name is not None:
            if str(name) not in _DTYPES:
                raise ValueError(f"actor_rollout_ref.actor.{section}.dtype: {name!r} is not one of "
                                 f"{sorted(_DTYPES)}")
            return _DTYPES[str(name)]
    return torch.bfloat16


def _agent_name(extra_fields) -> str:
    """The agent loop that sampled a row, as appo's agent loop records it; a ValueError for any other loop."""
    name = extra_fields.get("appo_agent") if isinstance(extra_fields, dict) else None
    if not name:
        raise ValueError("APPOTrainer: a rollout was not sampled by appo's agent loop "
                         "(actor_rollout_ref.rollout.agent.default_agent_loop=appo_agent, or a dataset "
                         "agent_name registered to appo.integrations.verl_agent.APPOAgentLoop): its branches "
                         "must run through the same loop, which must continue a prefix")
    return str(name)


def _check_prefixes(data: DataProto, generated: DataProto, branch_plan) -> None:
    """Each branch row the agent loop returned starts with its parent's prompt and shared response prefix."""
    if len(generated) != branch_plan.src.numel():
        raise RuntimeError(f"APPOTrainer: the agent loop returned {len(generated)} branches, "
                           f"{branch_plan.src.numel()} were requested")
    prompt_width = data.batch["prompts"].shape[1]
    parent_mask = data.batch["attention_mask"][:, :prompt_width].bool()
    out_width = generated.batch["prompts"].shape[1]
    out_mask = generated.batch["attention_mask"][:, :out_width].bool()
    for k, (r, s) in enumerate(zip(branch_plan.src.tolist(), branch_plan.shared.tolist())):
        same_prompt = torch.equal(data.batch["prompts"][r][parent_mask[r]],
                                  generated.batch["prompts"][k][out_mask[k]])
        same_prefix = torch.equal(data.batch["responses"][r, :s], generated.batch["responses"][k, :s])
        if not (same_prompt and same_prefix):
            raise RuntimeError(f"APPOTrainer: branch {k} does not continue its parent's prefix (row {r}, {s} "
                               "tokens): the agent loop ignored appo_branch")


def _step_branch_metrics(parts: list[dict]) -> dict[str, float]:
    """The step's APPO metrics from the parts' (first part: before any update; later: after)."""
    out: dict[str, float] = {}
    planned = [p for p in parts if "appo/branches" in p]
    if not planned:
        return out
    for key in ("appo/branches", "appo/branches_filled", "appo/branches_fresh", "appo/weight_syncs"):
        out[key] = float(sum(p.get(key, 0) for p in planned))
    weights = np.array([p["appo/branches"] for p in planned], dtype=float)
    for key in ("appo/entropy_only_fraction", "appo/mean_branch_position", "appo/branch_reward_mean"):
        values = [p[key] for p in planned if key in p]
        if len(values) == len(planned):
            out[key] = float(np.average(values, weights=weights))
    first, later = [p for p in planned if p["appo/part"] == 0], [p for p in planned if p["appo/part"] > 0]
    if first:
        out["appo/entropy_only_fraction_before_update"] = float(first[0]["appo/entropy_only_fraction"])
    if later:
        out["appo/entropy_only_fraction_after_update"] = float(np.mean(
            [p["appo/entropy_only_fraction"] for p in later]))
        out["appo/log_ratio_max"] = float(max(p["appo/log_ratio_max"] for p in later))
    return out


def _check_config(config) -> None:
    """The settings APPOTrainer cannot run with, each a ValueError naming the key and the reason."""
    algorithm, actor = config.algorithm, config.actor_rollout_ref.actor
    if algorithm.adv_estimator != appo_verl.APPO_NAME:
        raise ValueError(f"algorithm.adv_estimator: trainer_mode=appo needs 'appo', got "
                         f"{algorithm.adv_estimator!r}")
    loss_mode = actor.policy_loss.get("loss_mode", "vanilla")
    if loss_mode != appo_verl.APPO_NAME:
        raise ValueError(f"actor_rollout_ref.actor.policy_loss.loss_mode: trainer_mode=appo needs 'appo', "
                         f"got {loss_mode!r}")
    target = actor.policy_loss.get("_target_", None)
    if actor.policy_loss.get("appo", None) is not None and target != appo_verl.POLICY_LOSS_TARGET:
        raise ValueError(f"actor_rollout_ref.actor.policy_loss._target_: the APPO settings block "
                         f"(policy_loss.appo) needs {appo_verl.POLICY_LOSS_TARGET}, got {target!r}")
    appo_verl.settings_of(config)                     # a bad APPO setting fails here, naming its key
    if algorithm.get("use_kl_in_reward", False):
        raise ValueError("algorithm.use_kl_in_reward: not supported with APPO (rewards are per rollout); use "
                         "actor_rollout_ref.actor.use_kl_loss instead")
    correction = algorithm.get("rollout_correction", None)
    if correction is not None and correction.get("bypass_mode", False):
        raise ValueError("algorithm.rollout_correction.bypass_mode: not supported with APPO: pi_old would be "
                         "the rollout engine's log-probs, so A_fut would measure engine mismatch, not policy "
                         "shift")
    rollout = config.actor_rollout_ref.rollout
    if rollout.n < 2:
        raise ValueError(f"actor_rollout_ref.rollout.n: APPO needs N >= 2 rollouts per prompt, got "
                         f"{rollout.n}")
    actor_compute_dtype(config)                         # a dtype APPO has no tolerance for fails here
    agent = rollout.get("agent", None)
    default_loop = agent.get("default_agent_loop", None) if agent is not None else None
    if default_loop in _VERL_AGENT_LOOPS:
        raise ValueError(f"actor_rollout_ref.rollout.agent.default_agent_loop: {default_loop!r} cannot "
                         "continue a branch prefix; use 'appo_agent' (appo.integrations.verl_agent), the "
                         "loop APPO samples and branches with")
