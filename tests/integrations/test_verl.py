"""appo's verl integration against the real verl 0.9.1 package, in its own virtual environment.

verl pins transformers<5.11 (appo's environment has 5.17.0), so ``scripts/verl_env.sh`` builds a separate venv
(a few minutes the first time, instant afterwards). The checks run there in ONE subprocess (this file executed
as a script prints a JSON report, which the pytest tests read):

* appo enters verl only through ``VERL_USE_EXTERNAL_MODULES=appo.integrations.verl_plugin``: verl itself loads
  the plugin, in the driver and in every Ray worker, and resolves "appo" as an advantage estimator, a policy
  loss and a v1 trainer mode, and "appo_agent" as an agent loop;
* APPO's trainer mode through verl's own ``PPOTrainer.step`` on CPU stand-ins for the GPU parts (an actor
  worker and a rollout server; ``_verl_cpu.run_trainer``): two steps, lr = 0 then a real update, checked for
  the conformance invariants (exactly M per prompt, Omega exactly 1 with lr = 0, Omega != 1 after an update,
  branches sampled with the weights the actor holds) and the weight-sync protocol, with the costs printed;
* ``appo_agent`` through verl's ``AgentLoopManager`` on a scripted server with the calculator tool and appo's
  verl reward function (``_verl_cpu.run_agent_loop``): tool calls in rollouts and branches run the tool,
  forged results never enter a row or earn credit;
* verl's Ray worker group on CPU (``RayResourcePool(use_gpu=False)``, 2 workers, gloo): each worker generates
  its initial rollouts with verl's ``HFRollout``, scores them, asks ``branch_requests`` for its branches,
  generates them with ``HFRollout`` again, merges them, computes the "appo" advantages and the "appo" loss
  (both looked up in verl's registries), and the gradients are all-reduced, on ``DataProto`` end to end;
* APPO's trainer pieces against a real TransferQueue: rows written the way verl's agent loop writes them,
  planned, split into update parts, advantages written back as verl's nested per-row tensors;
* the estimator and the loss against fp64 references, the trainer's refusals, the GPU script's overrides,
  and errors that name the bad key.
The tests skip only when that environment cannot be created.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLUGIN = "appo.integrations.verl_plugin"
VOCAB, PAD, EOS = 96, 0, 2
PROMPT_WIDTH, RESPONSE_LENGTH = 6, 10
ROLLOUTS, BRANCHES = 3, 2
TRAINER_LRS = (0.0, 0.5)          # APPOTrainer steps: lr = 0 (nothing moves), then a real update
TRAINER_PROMPTS, TRAINER_N = 4, 2  # _verl_cpu's config: 4 prompts x N = 2, two parts of 2 prompts


# ------------------------------------------------------------------------------ checks run inside the venv
def _reference_dual_group(rewards, groups, parent, shared, mask, combine="avg"):
    """fp64 loop form of docs/method.md Eqs. 6-7 for the initial rows (branch rows stay 0)."""
    import torch

    def zscore(values):
        values = torch.tensor(values, dtype=torch.float64)
        return (values - values.mean()) / (values.std(correction=0) + 1e-6)

    rows, width = mask.shape
    out = torch.zeros(rows, width, dtype=torch.float64)
    for group in sorted(set(groups)):
        initial = [r for r in range(rows) if groups[r] == group and parent[r] < 0]
        branches = [r for r in range(rows) if groups[r] == group and parent[r] >= 0]
        a_init = dict(zip(initial, zscore([rewards[r] for r in initial]).tolist()))
        a_br = dict(zip(branches, zscore([rewards[r] for r in branches]).tolist())) if branches else {}
        for n in initial:
            for i in range(width):
                if not mask[n, i]:
                    continue
                shared_here = [a_br[b] for b in branches if parent[b] == n and shared[b] > i]
                if not shared_here:
                    out[n, i] = a_init[n]
                else:
                    total = a_init[n] + sum(shared_here) / len(shared_here)
                    out[n, i] = total / 2 if combine == "avg" else total
    return out


def _reference_future_value(logprobs, old, mask, gamma=2 ** (-1 / 32), lo=1.0, hi=1.2):
    """fp64 loop of clip(exp(sum_{k>=i} gamma^(k-i) (l_k - l_old_k) m_k), lo, hi)."""
    import torch

    rows, width = logprobs.shape
    out = torch.zeros(rows, width, dtype=torch.float64)
    for r in range(rows):
        for i in range(width):
            s = sum(gamma ** (k - i) * float(logprobs[r, k] - old[r, k]) * float(mask[r, k])
                    for k in range(i, width))
            out[r, i] = min(max(torch.exp(torch.tensor(max(min(s, 20.0), -20.0))).item(), lo), hi)
    return out


def _toy_rewards(responses, attention):
    """Deterministic per-row reward of the valid response tokens, at the last one ([R, L] float)."""
    import torch

    lengths = attention.sum(1).clamp(min=1)
    rewards = torch.zeros(responses.shape)
    rewards[torch.arange(len(lengths)), lengths - 1] = ((responses * attention).sum(1) % 7).float() / 3 - 1
    return rewards


def _actor_config(rollout_n: int, **appo):
    """verl's actor config as verl's workers build it from the tree (``omega_conf_to_dataclass`` by
    ``_target_``), with APPO's settings block at ``policy_loss.appo`` (B = BRANCHES unless ``appo`` says)."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    from appo.integrations import verl as appo_verl

    return omega_conf_to_dataclass(OmegaConf.create({
        "_target_": "verl.workers.config.ActorConfig", "strategy": "fsdp", "ppo_micro_batch_size_per_gpu": 2,
        "rollout_n": rollout_n, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
        "policy_loss": {"_target_": appo_verl.POLICY_LOSS_TARGET, "loss_mode": "appo",
                        "appo": {"branches_per_rollout": BRANCHES, **appo}}}))


def _rollout_config():
    from omegaconf import OmegaConf

    return OmegaConf.create({"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                             "response_length": RESPONSE_LENGTH})


def _hf_rollout(model):
    """verl's ``HFRollout``, its generation code (``generate_sequences``) as is. In verl 0.9.1 the class no
    longer constructs: its ``__init__`` calls ``BaseRollout.__init__()`` without the (config, model_config,
    device_mesh) a server rollout now takes, and it lacks the abstract weight-sync hooks (release / resume /
    update_weights). This subclass sets the two attributes the generation code reads and gives the hooks
    nothing to do (the weights live in the same module)."""
    from verl.workers.rollout.hf_rollout import HFRollout

    class LocalHFRollout(HFRollout):
        def __init__(self, module, config):           # what HFRollout.__init__ sets, without the broken call
            self.config, self.module = config, module

        async def release(self):
            return None

        async def resume(self, tags):
            return None

        async def update_weights(self, weights, wire_format="named_tensors", **kwargs):
            return None

    return LocalHFRollout(model, _rollout_config())


def _prompts(num_prompts, seed):
    """verl's generation input: each prompt repeated ROLLOUTS times (interleaved), left-padded, with uid."""
    import numpy as np
    import torch
    from verl import DataProto

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, PROMPT_WIDTH + 1, (num_prompts,), generator=gen)
    ids = torch.randint(3, VOCAB, (num_prompts, PROMPT_WIDTH), generator=gen)
    mask = (torch.arange(PROMPT_WIDTH)[None, :] >= PROMPT_WIDTH - lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, PAD)
    prompts = DataProto.from_dict(
        tensors={"input_ids": ids, "attention_mask": mask,
                 "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)},
        non_tensors={"uid": np.array([f"p{seed}_{i}" for i in range(num_prompts)], dtype=object),
                     "data_source": np.array(["toy"] * num_prompts, dtype=object)},
        meta_info={"eos_token_id": EOS, "pad_token_id": PAD, "do_sample": True})
    return prompts.repeat(repeat_times=ROLLOUTS, interleave=True)


def _actor_stats(model, data, prompt_width):
    """log-prob and full-vocabulary entropy [R, L] of each response token, with verl's own functions (the
    actor's compute_log_prob); with grad when the model is in grad mode."""
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    out = model(input_ids=data.batch["input_ids"], attention_mask=data.batch["attention_mask"],
                position_ids=data.batch["position_ids"])
    logits = out.logits[:, prompt_width - 1:-1].float()
    responses = data.batch["responses"]
    return logprobs_from_logits(logits, responses), entropy_from_logits(logits)


def _agent_loop_is_appo() -> bool:
    """verl's agent-loop registry resolves "appo_agent" to appo's loop (registered by the plugin)."""
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry

    expected = {"_target_": "appo.integrations.verl_agent.APPOAgentLoop"}
    return _agent_loop_registry.get("appo_agent") == expected


def _worker_class():
    """A verl ``Worker`` holding a tiny model, verl's HFRollout and APPO's verl pieces (defined here so that
    Ray ships it by value to its workers)."""
    import torch
    from verl import DataProto
    from verl.single_controller.base import Worker
    from verl.single_controller.base.decorator import Dispatch, register

    class APPOWorker(Worker):
        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def init_model(self, seed):
            import torch.distributed as dist

            from appo.models import tiny_model

            dist.init_process_group("gloo")
            self.model = tiny_model("llama", vocab_size=VOCAB, hidden_size=32, layers=2, heads=4, kv_heads=2,
                                    seed=seed)
            with torch.no_grad():
                self.model.lm_head.weight.mul_(8.0)
            self.rollout = _hf_rollout(self.model)
            torch.manual_seed(100 + self.rank)            # each rank samples its own rollouts
            return self.rank

        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def plugin_state(self):
            import sys

            from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn
            from verl.trainer.ppo.v1 import get_trainer_cls

            from appo.integrations import verl as appo_verl
            from appo.integrations.verl_trainer import APPOTrainer
            return {"plugin_loaded": PLUGIN in sys.modules,
                    "estimator": get_adv_estimator_fn("appo") is appo_verl.appo_advantage,
                    "loss": get_policy_loss_fn("appo") is appo_verl.appo_policy_loss,
                    "trainer": get_trainer_cls("appo") is APPOTrainer, "agent_loop": _agent_loop_is_appo()}

        @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
        def appo_step(self, prompts):
            import numpy as np
            import torch.distributed as dist
            from verl.trainer.ppo.core_algos import get_policy_loss_fn

            from appo.integrations import verl as appo_verl

            config = _actor_config(ROLLOUTS)                 # APPO's settings: the tree's policy_loss.appo
            chain = appo_verl.settings_of(config)
            generated = self.rollout.generate_sequences(prompts)               # verl's HF generation
            data = DataProto(batch=generated.batch, non_tensor_batch=dict(prompts.non_tensor_batch),
                             meta_info=dict(prompts.meta_info))
            width = data.batch["prompts"].shape[1]
            data.batch["response_mask"] = data.batch["attention_mask"][:, width:].clone()
            with torch.no_grad():
                old, entropy = _actor_stats(self.model, data, width)
            data.batch["old_log_probs"] = old
            stats = DataProto.from_dict(tensors={"old_log_probs": old, "entropys": entropy})
            requests = appo_verl.branch_requests(data, log_probs=stats, chain_settings=chain)
            branch_output = self.rollout.generate_sequences(requests)          # verl's HF generation
            merged = appo_verl.merge_branches(data, branch_output, requests=requests)
            merged.batch["token_level_rewards"] = _toy_rewards(merged.batch["responses"],
                                                               merged.batch["attention_mask"][:, width:])
            full = appo_verl.compute_advantage(merged, drop_branches=False,  # verl's registry: "appo"
                                               chain_settings=chain)
            initial = full.select_idxs(np.flatnonzero(full.non_tensor_batch["appo_parent"] < 0))

            # one PPO update's loss through verl's registry ("appo"), a moved policy: the ratio and A_fut move
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
            log_prob, _ = _actor_stats(self.model, initial, width)
            mask = initial.batch["response_mask"]
            loss, metrics = get_policy_loss_fn("appo")(initial.batch["old_log_probs"], log_prob,
                                                       initial.batch["advantages"], mask, "token-mean",
                                                       config)
            loss.backward()
            local = torch.cat([p.grad.flatten() for p in self.model.parameters()])
            reduced = local.clone()
            dist.all_reduce(reduced)
            reduced /= dist.get_world_size()
            self.report = {
                "rank": self.rank, "rows": len(data), "branches": len(requests),
                "settings_branches": config.policy_loss.appo.branches_per_rollout,
                "budget_meta": requests.meta_info["response_length"],
                "metrics": requests.meta_info["appo_metrics"],
                "loss": float(loss), "loss_future_mean": metrics.get("appo/future_value_mean"),
                "log_prob": log_prob.detach().tolist(), "old": initial.batch["old_log_probs"].tolist(),
                "adv": initial.batch["advantages"].tolist(), "mask": mask.tolist(),
                "local_grad": local.tolist(), "reduced_grad": reduced.tolist(),
                "new_tokens": int(branch_output.batch["attention_mask"][:, -RESPONSE_LENGTH:].sum())}
            full.non_tensor_batch["appo_rank"] = np.full(len(full), self.rank)
            return full

        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def step_report(self):
            return self.report

    return APPOWorker


def worker_group_checks() -> dict:
    """2 CPU workers in verl's Ray worker group, APPO end to end on DataProto (module docstring)."""
    import time

    import numpy as np
    import ray
    import torch
    from verl import DataProto
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.workers.config import ActorConfig

    from appo.algos.advantages import dual_group_advantages

    started = time.perf_counter()
    pool = RayResourcePool(process_on_nodes=[2], use_gpu=False, max_colocate_count=1)
    group = RayWorkerGroup(resource_pool=pool, device_name="cpu",
                           ray_cls_with_init=RayClassWithInitArgs(cls=ray.remote(_worker_class())))
    _progress("worker group created")
    report = {"ranks": group.init_model(seed=3), "worker_plugin": group.plugin_state()}
    _progress("workers initialised")
    prompts = DataProto.concat([_prompts(2, seed=1), _prompts(2, seed=2)])  # 4 prompts x 3: 6 rows/worker
    merged = group.appo_step(prompts)
    per_rank = group.step_report()
    report["seconds"] = time.perf_counter() - started

    ranks = np.asarray(merged.non_tensor_batch["appo_rank"])
    report["rank_rows"] = [int((ranks == r).sum()) for r in range(2)]
    report["branches"] = [r["branches"] for r in per_rank]
    report["settings_branches"] = [r["settings_branches"] for r in per_rank]
    report["rows"] = [r["rows"] for r in per_rank]
    report["entropy_only"] = [r["metrics"]["appo/entropy_only_fraction"] for r in per_rank]
    report["new_tokens"] = [r["new_tokens"] for r in per_rank]
    layout_ok, adv_err, truncated, groups_whole = True, 0.0, False, True
    for r in range(2):
        part = merged.select_idxs(np.flatnonzero(ranks == r))
        parent = part.non_tensor_batch["appo_parent"].astype(int).tolist()
        shared = part.non_tensor_batch["appo_branch_pos"].astype(int).tolist()
        uids = part.non_tensor_batch["uid"].tolist()
        responses, rmask = part.batch["responses"], part.batch["response_mask"]
        width = part.batch["prompts"].shape[1]
        attention = part.batch["attention_mask"][:, width:]
        for row, (p, s) in enumerate(zip(parent, shared)):
            if p < 0:
                continue
            layout_ok &= uids[row] == uids[p]
            layout_ok &= torch.equal(responses[row, :s], responses[p, :s])
            layout_ok &= torch.equal(rmask[row, :s], rmask[p, :s])
            layout_ok &= torch.equal(part.batch["prompts"][row], part.batch["prompts"][p])
            layout_ok &= torch.equal(part.batch["input_ids"][row],
                                     torch.cat([part.batch["prompts"][row], responses[row]]))
            truncated |= bool(attention[row].sum() == RESPONSE_LENGTH) and s > 0
        initial_uids = {u for u, p in zip(uids, parent) if p < 0}
        groups_whole &= all(uids.count(u) >= ROLLOUTS for u in initial_uids)
        rewards = part.batch["token_level_rewards"].sum(-1)
        mask = rmask.bool()
        reference = _reference_dual_group(rewards.tolist(), uids, parent, shared, mask)
        direct = dual_group_advantages(rewards, torch.tensor([sorted(set(uids)).index(u) for u in uids]),
                                       torch.tensor(parent), torch.tensor(shared),
                                       mask[torch.tensor(parent) < 0])
        adv = part.batch["advantages"].double()
        adv_err = max(adv_err, float((adv - reference).abs().max()),
                      float((adv[torch.tensor(parent) < 0] - direct).abs().max()))
        report[f"adv_uses_branches_{r}"] = bool((reference != reference[:, :1]).any())
    report.update(layout_ok=bool(layout_ok), adv_max_err=adv_err, some_branch_truncated=truncated,
                  groups_whole_per_rank=bool(groups_whole))

    config = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, rollout_n=ROLLOUTS,
                         clip_ratio_low=0.2, clip_ratio_high=0.28)
    loss_err, future_spread = 0.0, 0.0
    for r in per_rank:
        old, new = torch.tensor(r["old"]), torch.tensor(r["log_prob"])
        adv, mask = torch.tensor(r["adv"]), torch.tensor(r["mask"])
        future = _reference_future_value(new, old, mask)
        scaled = (adv.double() * (1 + 0.5 * future)).float()
        expected, _ = get_policy_loss_fn("vanilla")(old, new, scaled, mask, "token-mean", config)
        loss_err = max(loss_err, abs(r["loss"] - float(expected)))
        future_spread = max(future_spread, float(future[mask.bool()].max() - future[mask.bool()].min()))
    local = [torch.tensor(r["local_grad"]) for r in per_rank]
    reduced = [torch.tensor(r["reduced_grad"]) for r in per_rank]
    report.update(loss_max_err=loss_err, future_spread=future_spread,
                  reduced_equal=bool(torch.equal(reduced[0], reduced[1])),
                  reduced_is_mean=float((reduced[0] - (local[0] + local[1]) / 2).abs().max()),
                  local_differ=float((local[0] - local[1]).abs().max()),
                  grad_norm=float(reduced[0].norm()))
    return report


def transfer_queue_checks() -> dict:
    """APPO's v1 trainer pieces against a real TransferQueue: rows written the way verl's agent loop writes
    them (plus a balancing padding row) -> ``rows_to_dataproto`` -> ``plan`` -> ``split_parts`` ->
    ``_compute_advantage`` and ``_appo_advantages`` (hand-made branch rewards) -> advantages read back."""
    import transfer_queue as tq

    tq.init()
    try:
        return _transfer_queue_run(tq)
    finally:
        tq.close()


def _transfer_queue_run(tq) -> dict:
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf
    from transfer_queue import KVBatchMeta
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    from appo.integrations import verl as appo_verl
    from appo.integrations.verl_trainer import APPOTrainer, rows_to_dataproto, split_parts

    gen = torch.Generator().manual_seed(4)
    keys, fields, tags = [], [], []
    for prompt in range(2):
        prompt_ids = torch.randint(3, VOCAB, (3 + 2 * prompt,), generator=gen)
        for session in range(ROLLOUTS):
            length = int(torch.randint(4, RESPONSE_LENGTH + 1, (1,), generator=gen))
            response_mask = torch.ones(length, dtype=torch.long)
            if prompt == 1 and session == 0:
                response_mask[1:3] = 0                        # a tool result inside the response
            rm_scores = torch.zeros(length)
            rm_scores[-1] = float(session + prompt) / 2
            keys.append(f"q{prompt}_{session}_0")
            tags.append({"status": "success", "seq_len": len(prompt_ids) + length})
            fields.append({"prompts": prompt_ids,
                           "responses": torch.randint(3, VOCAB, (length,), generator=gen),
                           "response_mask": response_mask, "rm_scores": rm_scores,
                           "old_log_probs": -torch.rand(length, generator=gen) * 3,
                           "entropy": torch.rand(length, generator=gen) * 4, "uid": f"q{prompt}",
                           "data_source": "toy", "reward_model": {"ground_truth": str(prompt)},
                           "extra_info": {"index": prompt}})
    # verl's balancing pads with a synthetic row of its own uid, tagged is_padding
    keys.append("padX_0_0")
    tags.append({"status": "success", "seq_len": 3, "is_padding": True})
    fields.append({**fields[0], "uid": "padX", "prompts": torch.tensor([5, 6]),
                   "responses": torch.tensor([EOS]),
                   "response_mask": torch.ones(1, dtype=torch.long), "rm_scores": torch.zeros(1),
                   "old_log_probs": torch.zeros(1), "entropy": torch.zeros(1)})
    tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(fields), tags=tags)
    batch = KVBatchMeta(keys=keys, tags=tags, partition_id="train")

    rows = tq.kv_batch_get(keys=keys[:-1], partition_id="train")
    data = rows_to_dataproto(rows, pad_token_id=PAD)
    chain = appo_verl.settings_of(_actor_config(ROLLOUTS))
    branch_plan, metrics = appo_verl.plan(data, chain_settings=chain)
    points = list(zip(branch_plan.src.tolist(), branch_plan.pos.tolist()))
    report = {"metrics": metrics, "branches": int(branch_plan.src.numel()),
              "prompt_left_padded": bool((data.batch["attention_mask"][:, -RESPONSE_LENGTH - 1] >= 0).all()
                                         and data.batch["prompts"][0, 0] == PAD),
              "tool_tokens_not_branched": all(s not in (1, 2) for p, s in points if p == 3),
              "parts": split_parts([f"p{i // 2}_{i % 2}_0" for i in range(8)], [{}] * 8, prompts_per_part=2,
                                   dp_size=2),
              "parts_padded": split_parts([f"p{i // 3}_{i % 3}_0" for i in range(9)] + ["padY_0_0"],
                                          [{}] * 9 + [{"is_padding": True}], prompts_per_part=1, dp_size=2)}

    trainer = APPOTrainer.__new__(APPOTrainer)
    trainer.config = OmegaConf.create({"algorithm": {"rollout_correction": None}})
    trainer.appo_settings = chain
    trainer.tokenizer = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    trainer._compute_advantage(batch, {})
    zeros = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["advantages"])
    report["advantages_zeroed"] = all(float(a.abs().sum()) == 0 for a in zeros["advantages"].unbind())
    rewards = torch.rand(branch_plan.src.numel(), generator=gen)
    pending = {"keys": keys[:-1], "parent": branch_plan.src.numpy(), "shared": branch_plan.shared.numpy(),
               "rewards": rewards}
    trainer._appo_advantages(batch, pending)
    back = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["advantages", "returns"])
    advantages = [row.tolist() for row in back["advantages"].unbind()]
    report["padding_advantage"] = advantages[-1]
    lengths = [len(f["responses"]) for f in fields[:-1]]
    report["row_lengths_kept"] = [len(a) for a in advantages[:-1]] == lengths
    # reference: the same bundle through the fp64 loop
    totals = [float(f["rm_scores"].sum()) for f in fields[:-1]] + rewards.tolist()
    uids = [f["uid"] for f in fields[:-1]]
    parent = [-1] * len(uids) + branch_plan.src.tolist()
    shared = [0] * len(uids) + branch_plan.shared.tolist()
    uids = uids + [uids[p] for p in branch_plan.src.tolist()]
    width = data.batch["response_mask"].shape[1]
    mask = torch.zeros(len(parent), width, dtype=torch.bool)
    mask[:len(fields) - 1] = data.batch["response_mask"].bool()
    reference = _reference_dual_group(totals, uids, parent, shared, mask)
    report["adv_max_err"] = max(abs(v - float(reference[r, i])) for r, values in enumerate(advantages[:-1])
                                for i, v in enumerate(values))
    report["adv_uses_branches"] = bool((reference[:6] != reference[:6, :1]).any())
    try:
        trainer._appo_advantages(batch, {**pending, "keys": keys[:2]})
        report["changed_part_error"] = ""
    except RuntimeError as error:
        report["changed_part_error"] = str(error)
    try:
        rows_to_dataproto(rows.exclude("entropy"), pad_token_id=PAD)
        report["missing_field_error"] = ""
    except ValueError as error:
        report["missing_field_error"] = str(error)
    return report


def config_checks() -> dict:
    """APPOTrainer refuses the settings it cannot honour before anything starts."""
    from omegaconf import OmegaConf

    from appo.integrations.verl import POLICY_LOSS_TARGET
    from appo.integrations.verl_trainer import _check_config

    base = {"algorithm": {"adv_estimator": "appo", "use_kl_in_reward": False, "rollout_correction": None},
            "actor_rollout_ref": {"actor": {"policy_loss": {"loss_mode": "appo"}}, "rollout": {"n": 4}}}
    cases = {"algorithm.adv_estimator": ("algorithm", "adv_estimator", "grpo"),
             "policy_loss.loss_mode": ("actor_rollout_ref.actor.policy_loss", "loss_mode", "vanilla"),
             "use_kl_in_reward": ("algorithm", "use_kl_in_reward", True),
             "bypass_mode": ("algorithm", "rollout_correction", {"bypass_mode": True}),
             "rollout.n": ("actor_rollout_ref.rollout", "n", 1),
             "default_agent_loop": ("actor_rollout_ref.rollout.agent", "default_agent_loop", "tool_agent"),
             "fsdp_config.dtype": ("actor_rollout_ref.actor.fsdp_config", "dtype", "int8"),
             "policy_loss._target_": ("actor_rollout_ref.actor.policy_loss", "appo", {"combine": "sum"}),
             "policy_loss.appo.fut_gamma": ("actor_rollout_ref.actor", "policy_loss",
                                            {"_target_": POLICY_LOSS_TARGET, "appo": {"fut_gamma": 0}})}
    out = {"main_ppo_script": _main_ppo_script_config()}
    with_block = OmegaConf.create(base)
    OmegaConf.update(with_block, "actor_rollout_ref.actor.policy_loss",
                     {"_target_": POLICY_LOSS_TARGET, "appo": {"combine": "sum"}}, force_add=True)
    _check_config(with_block)
    _check_config(OmegaConf.create(base))
    for name, (path, key, value) in cases.items():
        config = OmegaConf.create(base)
        OmegaConf.update(config, f"{path}.{key}", value, force_add=True)
        try:
            _check_config(config)
            out[name] = ""
        except ValueError as error:
            out[name] = str(error)
    return out


def _main_ppo_script_config() -> str:
    """scripts/verl_main_ppo.sh's hydra overrides composed against verl's own config, through APPOTrainer's
    checks and verl's actor config (built as verl builds it): "" when they pass with the script's APPO block
    (B = 3), else the error."""
    import shlex

    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    from appo.integrations.verl import settings_of
    from appo.integrations.verl_trainer import _check_config

    text = (REPO / "scripts" / "verl_main_ppo.sh").read_text()
    command = text[text.index('"$PY" -m verl.trainer.main_ppo'):].replace("\\\n", " ").split("\n")[0]
    for name, value in (("$OUT", "/tmp/out"), ("$MODEL", "model"), ("$REPO", str(REPO))):
        command = command.replace(name, value)
    overrides = [token for token in shlex.split(command)[3:] if "=" in token]
    directory = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    try:
        with initialize_config_dir(config_dir=directory, version_base=None):
            config = compose(config_name="ppo_trainer", overrides=overrides)
        _check_config(config)
        actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
        branches = (settings_of(config).branches_per_rollout, settings_of(actor).branches_per_rollout)
        return "" if branches == (3, 3) else f"B from the tree: {branches}, expected (3, 3)"
    except Exception as error:  # noqa: BLE001 - reported to the pytest side
        return f"{type(error).__name__}: {error}"


def unit_checks() -> dict:
    """Estimator and loss on hand-made DataProtos against fp64 references; bad input."""
    import numpy as np
    import torch
    from verl import DataProto
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.workers.config import ActorConfig

    from appo.algos.advantages import dual_group_advantages
    from appo.integrations import verl as appo_verl

    report: dict = {}
    gen = torch.Generator().manual_seed(5)
    parent = [-1, -1, 0, -1, 1, -1, 8, -1, -1, 5, 7]
    uids = ["p0", "p0", "p0", "p0", "p0", "p1", "p1", "p1", "p1", "p1", "p1"]
    shared = [0, 0, 3, 0, 5, 0, 2, 0, 0, 4, 1]
    rows, width = len(parent), 7
    lengths = torch.tensor([7, 5, 6, 6, 7, 4, 5, 7, 3, 6, 7])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    rewards = torch.randn(rows, generator=gen) + 0.5
    token_level_rewards = torch.zeros(rows, width)
    token_level_rewards[torch.arange(rows), lengths - 1] = rewards
    data = DataProto.from_dict(
        tensors={"token_level_rewards": token_level_rewards, "response_mask": mask},
        non_tensors={"uid": np.array(uids, dtype=object), "appo_parent": np.array(parent),
                     "appo_branch_pos": np.array(shared)})
    full = appo_verl.compute_advantage(data, drop_branches=False)
    advantages = full.batch["advantages"]
    initial = torch.tensor(parent) < 0
    direct = dual_group_advantages(rewards, torch.tensor([0 if u == "p0" else 1 for u in uids]),
                                   torch.tensor(parent), torch.tensor(shared), mask[initial].bool())
    reference = _reference_dual_group(rewards.tolist(), uids, parent, shared, mask.bool())
    report["adv_vs_appo_max_abs"] = float((advantages[initial] - direct).abs().max())
    report["adv_vs_fp64_max_abs"] = float((advantages.double() - reference).abs().max())
    report["branch_rows_zero"] = bool((advantages[~initial] == 0).all())
    report["adv_uses_branches"] = bool((reference[initial] != reference[initial][:, :1]).any())
    dropped = appo_verl.compute_advantage(data)
    report["dropped_rows"] = len(dropped)
    report["dropped_match"] = bool(torch.equal(dropped.batch["advantages"], advantages[initial]))
    try:
        appo_verl.appo_advantage(token_level_rewards, mask, np.array(uids, dtype=object))
        report["missing_metadata_error"] = ""
    except ValueError as err:
        report["missing_metadata_error"] = str(err)

    old = -torch.rand(rows, width, generator=gen, dtype=torch.float32) * 3
    new = (old + 0.08 * torch.randn(rows, width, generator=gen)).requires_grad_(True)
    base = (torch.randn(rows, width, generator=gen) + 1.0) * mask
    config = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, rollout_n=1, clip_ratio_low=0.2,
                         clip_ratio_high=0.28)
    loss, metrics = get_policy_loss_fn("appo")(old, new, base, mask, "token-mean", config)
    future = _reference_future_value(new.detach(), old, mask)
    scaled = (base.double() * (1 + 0.5 * future)).float()
    expected, _ = get_policy_loss_fn("vanilla")(old, new.detach(), scaled, mask, "token-mean", config)
    plain, _ = get_policy_loss_fn("vanilla")(old, new.detach(), base * 1.5, mask, "token-mean", config)
    loss.backward()
    report["loss"], report["loss_expected"] = float(loss), float(expected)
    report["loss_without_future"] = float(plain)
    report["future_value_spread"] = float(future[mask.bool()].max() - future[mask.bool()].min())
    report["future_metric_err"] = abs(metrics["appo/future_value_mean"] - float(future[mask.bool()].mean()))
    report["grad_finite_nonzero"] = bool(torch.isfinite(new.grad).all() and new.grad.abs().sum() > 0)

    # branch_requests: exact budget, entropy-only (verl's log-probs are pi_old), bad input names the key
    responses = torch.randint(3, VOCAB, (6, 8), generator=gen)
    prompts = torch.randint(3, VOCAB, (6, 4), generator=gen)
    attention = torch.ones(6, 12, dtype=torch.long)
    response_mask = torch.ones(6, 8, dtype=torch.long)
    sample = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": attention,
                 "response_mask": response_mask, "old_log_probs": -torch.rand(6, 8, generator=gen),
                 "entropys": torch.rand(6, 8, generator=gen),
                 "rollout_log_probs": -torch.rand(6, 8, generator=gen)},     # never pi_old
        non_tensors={"uid": np.array(["a"] * 3 + ["b"] * 3, dtype=object)})
    requests = appo_verl.branch_requests(sample, chain_settings=appo_verl.settings_of(_actor_config(1)))
    report["request_count"] = len(requests)
    report["default_request_count"] = len(appo_verl.branch_requests(sample))   # no block: the defaults
    report["request_entropy_only"] = requests.meta_info["appo_metrics"]["appo/entropy_only_fraction"]
    errors = {}
    for name, call in {
        "entropys": lambda: appo_verl.branch_requests(_drop(sample, "entropys")),
        "response_mask": lambda: appo_verl.branch_requests(_drop(sample, "response_mask")),
        "uid": lambda: appo_verl.branch_requests(DataProto(batch=sample.batch)),
        "appo_parent": lambda: appo_verl.merge_branches(sample, DataProto(batch=requests.batch)),
        "APPO_VERL_SETTINGS": _bad_settings_env,
        "policy_loss.appo.bs_gamma": lambda: _actor_config(1, bs_gamma=1.5),
        "policy_loss.appo.select_per": lambda: _actor_config(1, per="group"),      # the old name: a hint
        "policy_loss.appo.branches": lambda: _actor_config(1, branches=3),
    }.items():
        try:
            call()
            errors[name] = ""
        except Exception as err:  # noqa: BLE001 - hydra wraps the block's ConfigError (a ValueError)
            errors[name] = str(err)
    report["bad_input_errors"] = errors
    return report


def _bad_settings_env():
    from appo.integrations import verl as appo_verl

    previous = os.environ.get(appo_verl.SETTINGS_ENV)
    os.environ[appo_verl.SETTINGS_ENV] = '{"branches_per_rollout": 3}'
    try:
        appo_verl.register()
    finally:
        if previous is None:
            del os.environ[appo_verl.SETTINGS_ENV]
        else:
            os.environ[appo_verl.SETTINGS_ENV] = previous


def _drop(proto, key):
    """A copy of ``proto`` without batch[key]."""
    import numpy as np

    copy = proto.select_idxs(np.arange(len(proto)))
    copy.batch = copy.batch.exclude(key)
    return copy


def run_checks() -> dict:
    """Everything that needs verl; returns plain numbers and flags (JSON-serialisable). Runs with
    VERL_USE_EXTERNAL_MODULES naming appo's plugin, and never calls appo's register() itself."""
    import ray

    report: dict = {}
    code = "import sys, appo.integrations.verl; print('verl' in sys.modules)"
    lazy = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"})
    report["import_pulls_verl"] = lazy.stdout.strip() if lazy.returncode == 0 else lazy.stderr[-500:]

    import verl  # noqa: F401  (loads the plugin)
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn
    from verl.trainer.ppo.v1 import PPOTrainer, get_trainer_cls

    from appo.integrations import verl as appo_verl
    report["estimator_is_appo"] = get_adv_estimator_fn("appo") is appo_verl.appo_advantage
    report["policy_loss_is_appo"] = get_policy_loss_fn("appo") is appo_verl.appo_policy_loss
    trainer = get_trainer_cls("appo")
    report["trainer_mode"] = f"{trainer.__module__}.{trainer.__name__}"
    report["trainer_is_verl_ppo_trainer"] = issubclass(trainer, PPOTrainer)
    report["agent_loop_is_appo"] = _agent_loop_is_appo()
    report["unit"] = unit_checks()
    report["config"] = config_checks()
    _progress("ray.init")
    # logical CPUs for scheduling only: worker groups, TransferQueue, agent-loop / reward workers, servers
    ray.init(num_cpus=32, include_dashboard=False, log_to_driver=False)
    try:
        report["worker_group"] = worker_group_checks()
        _progress("worker group done")
        report["transfer_queue"] = transfer_queue_checks()
        _progress("transfer queue done")
        import _verl_cpu  # this directory: on PYTHONPATH for the Ray workers too (the fixture sets it)

        with tempfile.TemporaryDirectory() as root:
            report["appo_trainer"] = _verl_cpu.run_trainer(root, steps_lr=TRAINER_LRS)
        _progress("trainer steps done")
        with tempfile.TemporaryDirectory() as root:
            report["agent_loop"] = _verl_cpu.run_agent_loop(root)
        _progress("agent loop done")
    finally:
        ray.shutdown()
    return report


def _progress(what: str) -> None:
    print(f"[test_verl] {what}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ pytest side
if __name__ != "__main__":
    import pytest

    sys.path.insert(0, str(REPO / "tests"))
    from _venv import venv_python

    pytestmark = pytest.mark.slow  # the first run builds the verl venv (a few minutes)

    @pytest.fixture(scope="module")
    def verl_report():
        python = venv_python("verl_env.sh", "verl", timeout=900)
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{Path(__file__).parent}",
                   VERL_USE_EXTERNAL_MODULES=PLUGIN, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
        env.pop("APPO_VERL_SETTINGS", None)
        done = subprocess.run([python, __file__], check=False, capture_output=True, text=True, timeout=1500,
                              env=env, cwd=REPO)
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def test_verl_loads_appo_through_its_plugin_mechanism(verl_report):
        assert verl_report["estimator_is_appo"]
        assert verl_report["policy_loss_is_appo"]
        assert verl_report["trainer_mode"] == "appo.integrations.verl_trainer.APPOTrainer"
        assert verl_report["trainer_is_verl_ppo_trainer"]
        assert verl_report["agent_loop_is_appo"]

    def test_importing_the_module_does_not_import_verl(verl_report):
        assert verl_report["import_pulls_verl"] == "False"

    def test_ray_workers_load_the_plugin_too(verl_report):
        for state in verl_report["worker_group"]["worker_plugin"]:
            assert state == {"plugin_loaded": True, "estimator": True, "loss": True, "trainer": True,
                             "agent_loop": True}

    def test_worker_group_both_ranks_branch_their_own_groups(verl_report):
        group = verl_report["worker_group"]
        assert group["ranks"] == [0, 1]
        assert group["rows"] == [6, 6]                             # whole prompt groups per worker
        assert group["branches"] == [BRANCHES * 6, BRANCHES * 6]   # exactly B * N per prompt
        assert group["settings_branches"] == [BRANCHES, BRANCHES]  # B from the tree, in each Ray worker
        assert group["rank_rows"] == [6 + BRANCHES * 6] * 2
        assert group["groups_whole_per_rank"]
        assert group["entropy_only"] == [1.0, 1.0]                 # branching before any update: reported
        assert min(group["new_tokens"]) > 0                        # HFRollout decoded the continuations

    def test_worker_group_merged_rows_continue_their_parents(verl_report):
        group = verl_report["worker_group"]
        assert group["layout_ok"]
        assert group["some_branch_truncated"]                      # continuations cut at the response length

    def test_worker_group_advantages_match_the_reference(verl_report):
        group = verl_report["worker_group"]
        assert group["adv_max_err"] <= 1e-5
        assert group["adv_uses_branches_0"] and group["adv_uses_branches_1"]

    def test_worker_group_loss_and_all_reduced_gradient(verl_report):
        group = verl_report["worker_group"]
        assert group["future_spread"] > 1e-3            # A_fut really varies: the loss check can fail
        assert group["loss_max_err"] <= 1e-5
        assert group["grad_norm"] > 0
        assert group["local_differ"] > 1e-6                        # the ranks' own gradients differ ...
        assert group["reduced_equal"]                              # ... the all-reduced ones are identical
        assert group["reduced_is_mean"] <= 1e-6

    def test_worker_group_runs_in_ci_time(verl_report):
        print(f"worker group: {verl_report['worker_group']['seconds']:.1f} s")
        assert verl_report["worker_group"]["seconds"] > 0

    def test_trainer_mode_reads_and_writes_transfer_queue(verl_report):
        tq_report = verl_report["transfer_queue"]
        assert tq_report["branches"] == BRANCHES * 6
        assert tq_report["metrics"]["appo/branches"] == BRANCHES * 6
        assert tq_report["metrics"]["appo/entropy_only_fraction"] == 1.0   # pi_old as pi_theta: entropy only
        assert tq_report["metrics"]["appo/log_ratio_max"] == 0.0
        assert tq_report["advantages_zeroed"]                     # _compute_advantage: 0 until a part's turn
        assert tq_report["adv_max_err"] <= 1e-5 and tq_report["adv_uses_branches"]
        assert tq_report["padding_advantage"] == [0.0]            # verl's padding row: no group, no branch
        assert tq_report["row_lengths_kept"] and tq_report["prompt_left_padded"]
        assert tq_report["tool_tokens_not_branched"]
        assert "changed" in tq_report["changed_part_error"]
        assert "entropy" in tq_report["missing_field_error"]

    def test_update_parts_are_whole_prompt_groups_divisible_by_dp(verl_report):
        tq_report = verl_report["transfer_queue"]
        assert tq_report["parts"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        # 3 prompts x 3 rows + 1 padding row, 1 prompt per part, dp 2: the padding row completes the first
        # part; the second cannot be completed and joins the third
        assert tq_report["parts_padded"] == [[0, 1, 2, 9], [3, 4, 5, 6, 7, 8]]

    def test_estimator_matches_appo_advantages_on_a_dataproto(verl_report):
        unit = verl_report["unit"]
        assert unit["adv_vs_appo_max_abs"] <= 1e-6
        assert unit["adv_vs_fp64_max_abs"] <= 1e-5
        assert unit["adv_uses_branches"] and unit["branch_rows_zero"]
        assert unit["dropped_rows"] == 6 and unit["dropped_match"]
        assert "non_tensor_batch" in unit["missing_metadata_error"]

    def test_policy_loss_applies_future_aware_scaling(verl_report):
        unit = verl_report["unit"]
        assert unit["future_value_spread"] > 0.01
        assert abs(unit["loss"] - unit["loss_expected"]) <= 1e-5
        assert abs(unit["loss"] - unit["loss_without_future"]) > 1e-4
        assert unit["future_metric_err"] <= 1e-5
        assert unit["grad_finite_nonzero"]

    def test_branch_requests_never_use_the_engine_log_probs(verl_report):
        unit = verl_report["unit"]
        assert unit["request_count"] == 6 * BRANCHES              # B from policy_loss.appo x 6 rows
        assert unit["default_request_count"] == 6 * 1             # no block: APPOSettings' default B = 1
        assert unit["request_entropy_only"] == 1.0

    def test_bad_input_names_the_key(verl_report):
        for key, message in verl_report["unit"]["bad_input_errors"].items():
            assert key in message, (key, message)

    # --------------------------------------------- APPOTrainer on verl's step, CPU stand-ins (_verl_cpu)
    def _steps(verl_report):
        steps = verl_report["appo_trainer"]["steps"]
        assert [s["lr"] for s in steps] == list(TRAINER_LRS)
        return steps

    def _part_weights(verl_report):
        """Per branch generation: the server's weights for its requests, and the actor's weights before each
        of the step's updates (part u branches after u updates)."""
        trainer = verl_report["appo_trainer"]
        served = [r["weights"] for r in trainer["server"]["requests"]]
        updates = [e for e in trainer["actor_events"] if e[0] == "update"]
        return [(sorted(set(served[slice(*call["server_requests"])])), updates[i][1])
                for i, call in enumerate(trainer["calls"])]

    def test_conformance_verl_exact_M(verl_report):
        """exact_M: every prompt has N initial rollouts and exactly B * N branches, M = (B + 1) * N."""
        trainer = verl_report["appo_trainer"]
        for step in _steps(verl_report):
            assert sorted(step["rows_per_prompt"].values()) == [TRAINER_N] * TRAINER_PROMPTS
            assert step["metrics"]["appo/branches"] == BRANCHES * TRAINER_N * TRAINER_PROMPTS
        for call in trainer["calls"]:
            counts = {uid: call["parents"].count(uid) for uid in call["parents"]}
            assert set(counts.values()) == {BRANCHES * TRAINER_N}      # each prompt of the part: B * N

    def test_conformance_verl_lr0_entropy_only(verl_report):
        """lr0_entropy_only: with lr = 0 the second part's log-prob pass equals pi_old bit for bit: Omega is
        exactly 1 and every row of every part falls back to entropy alone."""
        metrics = _steps(verl_report)[0]["metrics"]
        assert metrics["appo/log_ratio_max"] == 0.0
        assert metrics["appo/entropy_only_fraction"] == 1.0
        assert metrics["appo/entropy_only_fraction_after_update"] == 1.0

    def test_conformance_verl_omega_after_update(verl_report):
        """omega_after_update: after the first part's update, the second part's Omega measures the shift."""
        metrics = _steps(verl_report)[1]["metrics"]
        assert metrics["appo/entropy_only_fraction_before_update"] == 1.0   # part 0: before any update
        assert metrics["appo/log_ratio_max"] > 1e-3
        assert metrics["appo/entropy_only_fraction_after_update"] < 1.0

    def test_conformance_verl_branch_policy_current(verl_report):
        """branch_policy_current: every branch request of part u was sampled by the server with the weights
        the actor held at part u (weight fingerprints), and those moved after the real update."""
        parts = _part_weights(verl_report)
        assert len(parts) == 2 * len(TRAINER_LRS)
        for served, actor_weights in parts:
            assert served == [actor_weights]
        (_, lr0_first), (_, lr0_second), (_, first), (_, second) = parts
        assert lr0_first == lr0_second                      # lr = 0: nothing moved
        assert first != second                              # lr > 0: part 1 branches from the updated policy

    def test_verl_replicas_wake_for_branches_and_sleep_after(verl_report):
        events = [e[0] for e in verl_report["appo_trainer"]["server"]["events"]]
        # per step: verl's sampling (sleep after), then per part: load + wake, branches, sleep
        assert events.count("sleep") >= 3 * len(TRAINER_LRS)
        assert verl_report["appo_trainer"]["steps"][1]["metrics"]["appo/weight_syncs"] == 2

    def test_verl_step_costs_are_measured(verl_report):
        for step in _steps(verl_report):
            timing = step["timing"]
            print(f"lr {step['lr']}: step {step['seconds']:.2f} s, appo_sync {timing['appo_sync']:.3f} s, "
                  f"appo_logprob {timing['appo_logprob']:.3f} s, old_log_prob {timing['old_log_prob']:.3f} s")
            assert timing["appo_sync"] > 0 and timing["appo_logprob"] > 0
            assert step["advantage_nonzero"] > 0

    def test_conformance_verl_branch_tools_run(verl_report):
        """branch_tools_run: a branch that closes a call runs the tool; the calls in its prefix count."""
        loop = verl_report["agent_loop"]
        for name in ("initial", "branch"):
            assert "<result>\n42\n</result>" in loop[name]["tool_text"], loop[name]
            assert [c["query"] for c in loop[name]["calls"] if not c["in_prefix"]] == ["6*7"]
            assert loop[name]["finish"] == "answer" and loop[name]["prefix_kept"]
        assert loop["branch"]["text"].startswith("<calculator>1+1</calculator><result>\n2\n</result>\n"
                                                 "<calculator>6*7</calculator><result>\n42\n</result>")
        assert loop["limit"]["finish"] == "tool_limit" and "42" not in loop["limit"]["text"]
        assert loop["branch"]["server_turns"] == 2                 # the answer came from a second request

    def test_conformance_verl_no_tool_credit(verl_report):
        """no_tool_credit: a fake result and answer the model wrote after closing a call never enter the row,
        so the reward (gold = the fake answer) gives nothing; the control gets credit for its own answer."""
        loop = verl_report["agent_loop"]
        for name in ("initial", "branch"):
            assert "<result>\n1\n</result>" not in loop[name]["text"]
            assert "<answer>1</answer>" not in loop[name]["text"]
            assert "<result>" not in loop[name]["model_text"]
            assert loop[name]["reward"] <= 0.0                     # gold "1": the fake answer earned nothing
            # the reward graded appo_graded_text: model tokens, each tool result an empty block
            assert "42" not in loop[name]["graded_text"] and "<result></result>" in loop[name]["graded_text"]
        assert loop["credit"]["reward"] == 1.0                     # its own answer, right: full credit

    def test_gpu_script_overrides_compose_and_pass_the_trainer_checks(verl_report):
        assert verl_report["config"]["main_ppo_script"] == ""

    @pytest.mark.parametrize("key", ["algorithm.adv_estimator", "policy_loss.loss_mode", "use_kl_in_reward",
                                     "bypass_mode", "rollout.n", "default_agent_loop", "fsdp_config.dtype",
                                     "policy_loss._target_", "policy_loss.appo.fut_gamma"])
    def test_trainer_refuses_what_it_cannot_honour(verl_report, key):
        assert key in verl_report["config"][key]

else:
    print(json.dumps(run_checks()))
