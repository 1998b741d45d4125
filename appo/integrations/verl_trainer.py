"""APPO as a trainer mode of verl 0.9.1's v1 trainer: ``trainer.v1.trainer_mode=appo``.

Importing this module imports verl's v1 trainer (verl's full install: ray, transfer_queue, ...) and registers
:class:`APPOTrainer` with verl's ``register_trainer("appo")``; ``appo.integrations.verl_plugin`` does that when
verl loads it (``VERL_USE_EXTERNAL_MODULES=appo.integrations.verl_plugin``). Nothing of verl is patched: the
class overrides two methods of verl's ``PPOTrainer`` that exist to be overridden, and leaves every other step
(sampling through verl's agent loops, rewards, balancing, reference, actor update, weight sync) to verl's sync
trainer.

One step of ``APPOTrainer`` (verl's ``_step_once``; APPO's additions marked +):
  sample the step's prompts x N rollouts (verl's agent loop, rewarded by verl's reward workers), balance;
  ``_compute_old_log_prob``: verl's actor pass (``old_log_probs``, ``entropy``), then
    + read the step's rows from TransferQueue (:func:`rows_to_dataproto`: verl's HF-rollout layout);
    + ``appo.integrations.verl.branch_requests``: exactly B * N branch points per prompt (the chain's plan);
      before any update pi_theta == pi_old, so the Branching Score is the entropy-only fallback (reported);
    + wake the rollout replicas (``checkpoint_manager.update_weights``: the weights are still those that
      sampled), decode each prefix's continuation through verl's LLM server client, sleep them again;
    + ``merge_branches``, then the branch rewards from verl's reward workers (``compute_rm_score``) on the
      merged rows (prefix + continuation: a reward of the continuation alone would miss the prefix);
  ``_compute_advantage``: + the registered "appo" estimator over the initial rows and their branches; the
    initial rows' advantages go back to TransferQueue (branches are never trained on);
  verl's actor update, with ``policy_loss.loss_mode=appo`` (A_fut recomputed at every mini-batch).
Padding rows verl adds to balance the data-parallel split are neither branched nor counted in any group.

Not run on this project's CPU machines (verl's rollouts need a GPU server); ``scripts/verl_main_ppo.sh`` runs it
on a GPU machine with vLLM. Its TransferQueue plumbing (:func:`rows_to_dataproto`, :meth:`_appo_advantages`)
is tested on CPU against a real TransferQueue in tests/integrations/test_verl.py.
"""

from __future__ import annotations

import asyncio
import logging
from uuid import uuid4

import numpy as np
import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl import DataProto
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.debug import marked_timer
from verl.utils.ray_utils import auto_await
from verl.workers.utils.padding import response_to_nested

from appo.integrations import verl as appo_verl

logger = logging.getLogger(__name__)

APPO_MODE = "appo"
_BRANCH_FIELDS = ("prompts", "responses", "response_mask", "old_log_probs", "entropy")


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
    non-tensor fields) as a ``DataProto`` in verl's HF-rollout layout, the one ``branch_requests`` and
    ``merge_branches`` read: ``prompts`` int64 [R, P] left-padded, ``responses`` / ``response_mask`` [R, L]
    right-padded (L = ``response_width``, at least the longest response), ``attention_mask`` [R, P + L],
    ``position_ids`` (cumsum - 1), ``old_log_probs`` / ``entropys`` float32 [R, L]; every non-tensor field
    as an object array. Missing fields are a ValueError naming them."""
    missing = [name for name in _BRANCH_FIELDS if name not in rows.keys()]
    if missing:
        raise ValueError(f"rows: TransferQueue fields {missing} are missing (run after verl's old-log-prob pass)")
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


@register_trainer(APPO_MODE)
class APPOTrainer(PPOTrainerSync):
    """verl's synchronous PPO trainer with APPO's branching and advantages (module docstring).

    Refused at construction, each with its reason: another ``algorithm.adv_estimator`` or
    ``policy_loss.loss_mode`` than "appo", ``algorithm.use_kl_in_reward`` (APPO's rewards are per rollout),
    rollout-correction ``bypass_mode`` (pi_old would be the rollout engine's log-probs, so A_fut would measure
    engine mismatch) and ``rollout.n`` < 2 (no group to compare)."""

    def __init__(self, config):
        _check_config(config)
        super().__init__(config)
        self.appo_settings = appo_verl.settings()
        self._appo_pending: dict | None = None

    # ------------------------------------------------------------------------------ verl's override points
    def _compute_old_log_prob(self, batch, metrics):
        batch = super()._compute_old_log_prob(batch, metrics)
        with marked_timer("appo_branch", self.timing_raw, color="purple"):
            self._appo_pending = self._appo_branch(batch, metrics)
        return batch

    def _compute_advantage(self, batch, metrics):
        pending, self._appo_pending = self._appo_pending, None
        return self._appo_advantages(batch, pending, metrics)

    # ------------------------------------------------------------------------------------- APPO pieces
    def _appo_branch(self, batch, metrics) -> dict:
        """Branch the step's real rows; returns what ``_compute_advantage`` needs: the rows' keys, and per
        branch its parent (index into those rows), shared prefix length and reward."""
        real = [i for i, tag in enumerate(batch.tags) if not tag.get("is_padding", False)]
        keys = [batch.keys[i] for i in real]
        sessions = {key.rsplit("_", 1)[0] for key in keys}
        if len(sessions) != len(keys):
            raise ValueError("APPOTrainer: a rollout produced several outputs (multi-output agent loop); APPO "
                             "needs one output per rollout")
        empty = {"keys": keys, "parent": np.zeros(0, dtype=np.int64), "shared": np.zeros(0, dtype=np.int64),
                 "rewards": torch.zeros(0)}
        rows = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id)
        data = rows_to_dataproto(rows, pad_token_id=self._appo_pad_id(),
                                 response_width=self.config.actor_rollout_ref.rollout.response_length)
        data.meta_info.update(eos_token_id=self.tokenizer.eos_token_id,
                              temperature=self.config.actor_rollout_ref.rollout.temperature)
        requests = appo_verl.branch_requests(data, chain_settings=self.appo_settings)
        if requests is None:
            return empty
        metrics.update(requests.meta_info["appo_metrics"])
        with marked_timer("appo_branch_generate", self.timing_raw, color="red"):
            generated = self._appo_generate(requests)
        merged = appo_verl.merge_branches(data, generated, requests=requests, pad_token_id=self._appo_pad_id())
        branch_rows = merged.select_idxs(np.arange(len(data), len(merged)))
        with marked_timer("appo_branch_reward", self.timing_raw, color="yellow"):
            scores = self.reward_loop_manager.compute_rm_score(branch_rows).batch["rm_scores"]
        rewards = scores.float().sum(dim=-1)
        metrics["appo/branch_reward_mean"] = float(rewards.mean())
        return {"keys": keys, "parent": np.asarray(requests.non_tensor_batch[appo_verl.PARENT_KEY]),
                "shared": np.asarray(requests.non_tensor_batch[appo_verl.BRANCH_POS_KEY]), "rewards": rewards}

    def _appo_pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def _appo_generate(self, requests: DataProto) -> DataProto:
        """Each request's continuation from verl's rollout servers, as ``merge_branches`` reads it:
        ``responses`` [K, Lb] (right-padded), ``attention_mask`` [K, P' + Lb], ``response_mask`` [K, Lb]."""
        rollout = self.config.actor_rollout_ref.rollout
        shared = requests.non_tensor_batch[appo_verl.BRANCH_POS_KEY]
        budgets = [max(int(rollout.response_length) - int(s), 1) for s in shared]
        self.checkpoint_manager.update_weights(self.global_steps)     # wake: the weights that sampled
        try:
            continuations = self._appo_decode(list(requests.non_tensor_batch[appo_verl.PREFIX_IDS_KEY]),
                                              budgets)
        finally:
            self.checkpoint_manager.sleep_replicas()
        width = max(1, max(len(c) for c in continuations))
        pad = self._appo_pad_id()
        responses = _pad([torch.tensor(c, dtype=torch.long) for c in continuations], width, pad)
        response_mask = _pad([torch.ones(len(c), dtype=torch.long) for c in continuations], width, 0)
        attention = torch.cat([requests.batch["attention_mask"].long(), response_mask], dim=1)
        return DataProto.from_dict(tensors={"responses": responses, "response_mask": response_mask,
                                            "attention_mask": attention})

    @auto_await
    async def _appo_decode(self, prefixes: list[list[int]], budgets: list[int]) -> list[list[int]]:
        """Decode each prefix (token ids) with the rollout's sampling settings, at most ``budgets[k]`` tokens."""
        client = self.get_llm_client()
        rollout = self.config.actor_rollout_ref.rollout

        async def one(prefix: list[int], budget: int) -> list[int]:
            params = {"temperature": rollout.temperature, "top_p": rollout.top_p, "top_k": rollout.top_k,
                      "repetition_penalty": 1.0, "logprobs": False, "max_tokens": budget}
            output = await client.generate(uuid4().hex, prompt_ids=[int(t) for t in prefix],
                                           sampling_params=params)
            return list(output.token_ids)[:budget]

        return list(await asyncio.gather(*(one(p, b) for p, b in zip(prefixes, budgets))))

    def _appo_advantages(self, batch, pending: dict | None, metrics: dict):
        """verl's ``_compute_advantage`` for APPO: the "appo" estimator over the initial rows (their rewards
        ``rm_scores`` from TransferQueue) and the branches of ``pending``; advantages and returns written back
        to TransferQueue as verl's nested per-row tensors (0 on padding rows), with verl's rollout correction
        (decoupled mode) when configured."""
        fields = ["uid", "response_mask", "rm_scores", "rollout_log_probs", "old_log_probs"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask_nested = data["response_mask"]
        data = DataProto(batch=data.to_padded_tensor())
        uids = np.array(data.batch.pop("uid").tolist(), dtype=object)
        real = [i for i, tag in enumerate(batch.tags) if not tag.get("is_padding", False)]
        keys = [batch.keys[i] for i in real]
        if pending is None or pending["keys"] != keys:
            raise RuntimeError("APPOTrainer: the branches of this batch are missing (the batch changed "
                               "between the old-log-prob pass and the advantage)")
        correction = self.config.algorithm.get("rollout_correction", None)
        apply_correction = correction is not None and "rollout_log_probs" in data.batch.keys()
        if apply_correction:
            data, correction_metrics = compute_rollout_correction_and_add_to_batch(data, correction)
            metrics.update(correction_metrics)

        rewards = data.batch["rm_scores"].float()[real]
        mask = data.batch["response_mask"][real]
        branches, width = len(pending["parent"]), rewards.shape[1]
        branch_rewards = torch.zeros(branches, width)
        branch_rewards[:, 0] = pending["rewards"].float()
        bundle = DataProto.from_dict(
            tensors={"token_level_rewards": torch.cat([rewards, branch_rewards]),
                     "response_mask": torch.cat([mask, torch.zeros(branches, width, dtype=mask.dtype)])},
            non_tensors={"uid": np.concatenate([uids[real], uids[real][pending["parent"]]]),
                         appo_verl.PARENT_KEY: np.concatenate([np.full(len(real), -1), pending["parent"]]),
                         appo_verl.BRANCH_POS_KEY: np.concatenate([np.zeros(len(real), dtype=np.int64),
                                                                   pending["shared"]])})
        advantages = torch.zeros(data.batch["response_mask"].shape, dtype=torch.float32)
        advantages[real] = appo_verl.compute_advantage(bundle).batch["advantages"]
        output = {"advantages": response_to_nested(advantages, response_mask_nested),
                  "returns": response_to_nested(advantages, response_mask_nested)}
        if apply_correction:
            output["response_mask"] = response_to_nested(data.batch["response_mask"], response_mask_nested)
            if "rollout_is_weights" in data.batch.keys():
                output["rollout_is_weights"] = response_to_nested(data.batch["rollout_is_weights"],
                                                                  response_mask_nested)
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                               fields=TensorDict(output, batch_size=len(batch)))


def _check_config(config) -> None:
    """The settings APPOTrainer cannot run with, each a ValueError naming the key and the reason."""
    algorithm, actor = config.algorithm, config.actor_rollout_ref.actor
    if algorithm.adv_estimator != appo_verl.APPO_NAME:
        raise ValueError(f"algorithm.adv_estimator: trainer_mode=appo needs 'appo', got {algorithm.adv_estimator!r}")
    loss_mode = actor.policy_loss.get("loss_mode", "vanilla")
    if loss_mode != appo_verl.APPO_NAME:
        raise ValueError(f"actor_rollout_ref.actor.policy_loss.loss_mode: trainer_mode=appo needs 'appo', got "
                         f"{loss_mode!r}")
    if algorithm.get("use_kl_in_reward", False):
        raise ValueError("algorithm.use_kl_in_reward: not supported with APPO (rewards are per rollout); use "
                         "actor_rollout_ref.actor.use_kl_loss instead")
    correction = algorithm.get("rollout_correction", None)
    if correction is not None and correction.get("bypass_mode", False):
        raise ValueError("algorithm.rollout_correction.bypass_mode: not supported with APPO: pi_old would be the "
                         "rollout engine's log-probs, so A_fut would measure engine mismatch, not policy shift")
    if config.actor_rollout_ref.rollout.n < 2:
        raise ValueError(f"actor_rollout_ref.rollout.n: APPO needs N >= 2 rollouts per prompt, got "
                         f"{config.actor_rollout_ref.rollout.n}")
