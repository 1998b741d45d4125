"""APPO inside TRL: ``APPOTrainer(GRPOTrainer)`` and ``APPOConfig(GRPOConfig)``.

A TRL GRPO script becomes an APPO script by swapping ``GRPOTrainer`` -> ``APPOTrainer`` and
``GRPOConfig`` -> ``APPOConfig`` (whose ``appo_*`` fields are the APPO config block). Everything else
(datasets, reward functions, accelerate launch, logging) stays TRL's.

The method rides on one override, ``_generate_and_score_completions``. After TRL has generated the N
completions per prompt, scored them with its reward functions and built its batch, APPOTrainer

1. runs ONE no-grad forward of the current policy over prompt + completion (``use_cache=True``): its
   logits give ``appo.branching_score`` (token entropy, log-probs, future value against the sampling
   log-probs) and its KV cache serves every branch;
2. picks ``appo_branches_per_rollout`` branch points per completion with ``appo.select_branch_points``;
3. generates the branch continuations with ``model.generate`` from caches gathered by
   ``appo.prefix_cache.gather_prefix_kv`` (no prefill over the prefix: one token per branch is fed);
   with TRL ``tools=``, a continuation that ends in a tool call then goes through TRL's own tool loop
   (``_tool_call_loop``: tool execution, tool-result tokens, next turns) until the branch is a finished
   multi-turn rollout, under the same ``max_tool_calling_iterations`` (the prefix's tool rounds count);
4. scores the branches with TRL's own reward functions (``_calculate_rewards``);
5. replaces TRL's [B] sequence advantages by APPO's [B, T] token advantages:
   ``dual_group_advantages(...) * (1 + b * A_fut)`` (``appo.algos.advantages``).

Two small hooks keep A_fut current: ``_calculate_rewards`` remembers the reward inputs for the branches, and
inside ``_compute_loss`` the policy forward (``_get_per_token_logps_and_entropies``) recomputes A_fut from the
current log-probs whenever the batch carries old ones (``num_iterations > 1``, or vLLM sampling).

TRL's loss accepts [B, T] advantages as they are and optimises only the N initial completions; branches
only supply rewards. What maps to what, and what differs from appo's own trainer, is in docs/integrations.md.
In short, TRL branches once per generation step (the authors'-code variant): the policy that branches is the
one that sampled, so Omega measures only sampling/training mismatch (e.g. vLLM vs the training engine) and,
with transformers generation, every row falls back to entropy-only scoring (``appo/entropy_only_fraction``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.chat_template_utils import parse_response
from trl.data_utils import is_conversational
from trl.models.utils import disable_gradient_checkpointing

from appo.algos.advantages import dual_group_advantages, future_aware_scaling
from appo.prefix_cache import build_branch_batch, gather_prefix_kv
from appo.scoring import (FUTURE_VALUE_CLIP, GAMMA, branching_score, future_value, select_branch_points,
                          token_stats)


@dataclass
class APPOConfig(GRPOConfig):
    """``GRPOConfig`` plus APPO's config block (every ``appo_*`` field; defaults are METHOD.md's)."""

    appo_branches_per_rollout: int = field(default=3, metadata={"help": "B: branch points per completion."})
    appo_future_scale: float = field(default=0.5, metadata={"help": "b in A_base * (1 + b * A_fut)."})
    appo_combine: str = field(default="avg", metadata={"help": "'avg' (appo) or 'sum' (authors' code)."})
    appo_one_group: bool = field(default=False, metadata={"help": "The w/o dual-group ablation."})
    appo_candidates: str = field(default="strict", metadata={"help": "'strict' or 'all' (Branching Score)."})
    appo_select_per: str = field(default="rollout", metadata={"help": "'rollout' or 'group' (top B*N)."})
    appo_min_gap: int = field(default=0, metadata={"help": "Minimum gap between a row's branch points."})
    appo_include_token: bool = field(default=False, metadata={"help": "Keep the branch token (authors')."})
    appo_gamma: float = field(default=GAMMA, metadata={"help": "Future-value discount per position."})
    appo_future_clip_low: float = field(default=FUTURE_VALUE_CLIP[0], metadata={"help": "Omega clip low."})
    appo_future_clip_high: float = field(default=FUTURE_VALUE_CLIP[1], metadata={"help": "Omega clip high."})

    def __post_init__(self):
        branches = self.appo_branches_per_rollout
        if isinstance(branches, bool) or not isinstance(branches, int) or branches < 0:
            raise ValueError(f"appo_branches_per_rollout: expected an int >= 0, got {branches!r}")
        if self.appo_future_scale < 0:
            raise ValueError(f"appo_future_scale: must be >= 0, got {self.appo_future_scale}")
        if self.appo_combine not in ("avg", "sum"):
            raise ValueError(f"appo_combine: expected 'avg' or 'sum', got {self.appo_combine!r}")
        if self.appo_candidates not in ("strict", "all"):
            raise ValueError(f"appo_candidates: expected 'strict' or 'all', got {self.appo_candidates!r}")
        if self.appo_select_per not in ("rollout", "group"):
            raise ValueError(f"appo_select_per: expected 'rollout' or 'group', got {self.appo_select_per!r}")
        if self.appo_min_gap < 0:
            raise ValueError(f"appo_min_gap: must be >= 0, got {self.appo_min_gap}")
        if not 0.0 < self.appo_gamma <= 1.0:
            raise ValueError(f"appo_gamma: must lie in (0, 1], got {self.appo_gamma}")
        if not self.appo_future_clip_low <= self.appo_future_clip_high:
            raise ValueError("appo_future_clip_low: must not exceed appo_future_clip_high")
        super().__post_init__()


class APPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with APPO's token branching, dual-group advantages and future-aware scaling.

    Same constructor as ``GRPOTrainer``; ``args`` must be an :class:`APPOConfig`. Runs on one process (the
    branch group of a prompt must be complete where its advantages are computed). TRL's ``tools=`` work:
    branches whose continuation calls a tool run TRL's tool loop before they are scored. Not supported (a
    ValueError at construction): more than one process, and ``environment_factory`` (a branch would share and
    mutate the stateful environment instance of the rollout it branches from).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, APPOConfig):
            raise ValueError(f"args: APPOTrainer needs an APPOConfig, got {type(self.args).__name__}")
        if self.accelerator.num_processes != 1:
            raise ValueError(f"args: APPOTrainer runs on one process for now, got "
                             f"{self.accelerator.num_processes}")
        if getattr(self, "environment_factories", None) is not None:
            raise ValueError("environment_factory: not supported by APPOTrainer yet (a branch would share "
                             "the stateful environment of the rollout it branches from); pass tools= instead")
        self._appo_reward_context = None
        self._appo_loss_inputs = None

    # -------------------------------------------------------------------------------- TRL override points
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's reward computation; remembers the initial completions' reward inputs (and their completions,
        whose earlier turns a tool-using branch keeps) for the branches."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._appo_reward_context is None:
            self._appo_reward_context = (inputs, prompts, rewards_per_func, completions)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        """TRL's generation and scoring, then APPO's branches and [B, T] token advantages (training only)."""
        self._appo_reward_context = None
        output = super()._generate_and_score_completions(inputs)
        if not self.model.training or self.args.appo_branches_per_rollout == 0:
            return output
        output["advantages"], output["appo_base_advantages"] = self._appo_advantages(output)
        return output

    def _compute_loss(self, model, inputs):
        """TRL's loss; the hook below rescales the advantages by A_fut from THIS update's log-probs first."""
        self._appo_loss_inputs = inputs if "appo_base_advantages" in inputs else None
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._appo_loss_inputs = None

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        """TRL's log-prob forward. Inside ``_compute_loss`` (its first call there is the policy forward,
        before TRL reads ``inputs["advantages"]``) it sets A = A_base * (1 + b * A_fut), A_fut = clip(exp(s))
        of the current log-probs against the sampling ones (METHOD.md: recomputed at each update, detached).
        Without old log-probs (TRL skips them when pi_theta == pi_old) the generation-time values stand."""
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        inputs, self._appo_loss_inputs = self._appo_loss_inputs, None
        old = None
        if inputs is not None:
            old = inputs.get("sampling_per_token_logps", inputs.get("old_per_token_logps"))
        if old is not None:
            mask = inputs["completion_mask"].bool()
            if "tool_mask" in inputs:
                mask &= inputs["tool_mask"].bool()
            old = torch.where(torch.isnan(old), logps.detach(), old)
            future = future_value(logps.detach(), old, mask, gamma=self.args.appo_gamma,
                                  clip=(self.args.appo_future_clip_low, self.args.appo_future_clip_high))
            future = torch.where(mask, future, 0.0)
            inputs["advantages"] = future_aware_scaling(inputs["appo_base_advantages"], future,
                                                        self.args.appo_future_scale)
        return logps, entropies, aux

    # ------------------------------------------------------------------------------------- APPO pieces
    def _appo_advantages(self, output: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """APPO token advantages float32 [B, C] for the B initial completions of ``output`` (TRL's batch), and
        the dual-group base advantages [B, C] they scale (kept for the per-update rescaling)."""
        args = self.args
        prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        loss_mask = completion_mask.bool()
        if "tool_mask" in output:
            loss_mask &= output["tool_mask"].bool()
        prompt_width = prompt_ids.shape[1]
        full_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        full_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        num_rows, num_generations = completion_ids.shape[0], self.num_generations
        group_ids = torch.arange(num_rows, device=full_ids.device) // num_generations

        if not loss_mask.any():  # every completion masked out (e.g. all truncated): nothing to optimise
            zeros = torch.zeros(loss_mask.shape, dtype=torch.float32, device=loss_mask.device)
            return zeros, zeros.clone()

        logits, cache = self._appo_policy_forward(full_ids, full_mask, completion_ids.shape[1])
        stats = token_stats(logits, completion_ids, temperature=self.temperature)   # one pass over the vocab
        old = output.get("sampling_per_token_logps", output.get("old_per_token_logps"))
        old = stats.logprobs if old is None else torch.where(torch.isnan(old), stats.logprobs, old)
        del logits
        score = branching_score(tokens=completion_ids, old_logprobs=old, mask=loss_mask,
                                entropy=stats.entropy, logprobs=stats.logprobs, gamma=args.appo_gamma,
                                clip=(args.appo_future_clip_low, args.appo_future_clip_high),
                                candidates=args.appo_candidates)
        rows, positions = select_branch_points(score.score, args.appo_branches_per_rollout,
                                               group_ids=group_ids, per=args.appo_select_per,
                                               min_gap=args.appo_min_gap, allow_fewer=True)
        rewards = self._appo_total_rewards(self._appo_reward_context[2])
        if rows.numel():
            branch_ids = self._appo_generate_branches(full_ids, full_mask, cache, rows,
                                                      positions + prompt_width, prompt_width)
            if self.tools:   # finish tool-calling branches with TRL's tool loop, score their message lists
                del cache    # the loop's later turns prefill afresh (TRL's generation)
                branch_ids, completions = self._appo_branch_tool_loop(output, rows, positions, branch_ids)
                branch_rewards = self._appo_score_branches(rows, branch_ids, completions)
            else:
                branch_rewards = self._appo_score_branches(rows, branch_ids)
        else:
            branch_rewards = rewards.new_zeros(0)
        scorable = ~torch.isnan(branch_rewards)
        rows, positions, branch_rewards = rows[scorable], positions[scorable], branch_rewards[scorable]
        unscorable_initial = torch.isnan(rewards)

        device = completion_ids.device
        all_rewards = torch.cat([torch.nan_to_num(rewards, nan=0.0), branch_rewards]).to(device)
        parent = torch.cat([torch.full((num_rows,), -1, device=device), rows])
        branch_pos = torch.cat([torch.zeros(num_rows, dtype=torch.long, device=device),
                                positions + int(args.appo_include_token)])
        base = dual_group_advantages(all_rewards, torch.cat([group_ids, group_ids[rows]]), parent, branch_pos,
                                     loss_mask, combine=args.appo_combine, one_group=args.appo_one_group)
        base = base.masked_fill(unscorable_initial.to(device)[:, None], 0.0)
        future = score.future_value.clamp(args.appo_future_clip_low, args.appo_future_clip_high)
        advantages = future_aware_scaling(base, torch.where(loss_mask, future, 0.0), args.appo_future_scale)
        self._appo_log(score, rows, positions, branch_rewards, future, loss_mask)
        return advantages, base

    def _appo_policy_forward(self, full_ids, full_mask, completion_width):
        """No-grad forward over prompt + completion: logits [B, C, V] predicting each completion token, and
        the KV cache [B, H, P + C, D] per layer. Position ids count real tokens (as ``generate`` does), so the
        cache lines up with the branch decoding that continues from it."""
        model = self.accelerator.unwrap_model(self.model)
        position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
        # Under TRL's autocast, as its own log-prob forwards, so Omega compares like with like.
        no_checkpointing = disable_gradient_checkpointing(model, self.args.gradient_checkpointing_kwargs)
        with torch.no_grad(), no_checkpointing, self.accelerator.autocast():
            out = model(input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids,
                        use_cache=True, logits_to_keep=completion_width + 1)
        return out.logits[:, :-1], out.past_key_values

    def _appo_generate_branches(self, full_ids, full_mask, cache, rows, positions, prompt_width):
        """Continue the K prefixes ``full_ids[rows[k], :positions[k] (+1)]`` from the gathered KV caches.

        Returns K lists of completion token ids (the prefix's completion part + the new tokens, cut after EOS
        and at ``max_completion_length``)."""
        include = self.args.appo_include_token
        lengths = torch.full(full_ids.shape[:1], full_ids.shape[1], dtype=torch.long, device=full_ids.device)
        prefix = build_branch_batch(full_ids, lengths, rows, positions, pad_id=self._tokenizer.pad_token_id,
                                    include_token=include)
        # The original attention mask, gathered the same way, keeps the prompts' left padding masked out.
        attention = build_branch_batch(full_mask.long(), lengths, rows, positions, pad_id=0,
                                       include_token=include).input_ids
        branch_cache = gather_prefix_kv(cache, rows, positions, include_token=include, lengths=lengths)
        kept = prefix.prefix_lengths - prompt_width                       # completion tokens kept per branch
        budget = self.max_completion_length - int(kept.min())
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad(), disable_gradient_checkpointing(model, self.args.gradient_checkpointing_kwargs):
            generation_config = copy.deepcopy(self.generation_config)
            generation_config.max_new_tokens = max(budget, 1)
            generated = model.generate(input_ids=prefix.input_ids, attention_mask=attention,
                                       past_key_values=branch_cache, generation_config=generation_config)
        new_tokens = generated[:, prefix.input_ids.shape[1]:].tolist()
        eos = set(self.eos_token_ids)
        branches = []
        for k, row in enumerate(rows.tolist()):
            head = full_ids[row, prompt_width:prompt_width + int(kept[k])].tolist()
            tail = []
            for token in new_tokens[k][:self.max_completion_length - len(head)]:
                tail.append(token)
                if token in eos:
                    break
            branches.append(head + tail)
        return branches

    def _appo_branch_tool_loop(self, output: dict, rows: torch.Tensor, positions: torch.Tensor,
                               branch_ids: list[list[int]]) -> tuple[list[list[int]], list[list[dict]]]:
        """Finish the K tool-using branches with TRL's own tool loop (``GRPOTrainer._tool_call_loop``).

        A branch at completion position ``positions[k]`` of row ``rows[k]`` keeps the parent's earlier turns
        (assistant turns, tool calls and tool results, token for token) and regenerated the rest of the
        current assistant turn. That turn is parsed with TRL's ``parse_response``; if it calls tools, TRL's
        loop executes them with the parent row's tool dicts, appends the tool-result tokens
        (``_get_tool_suffix_ids``) and generates the next turns (``_generate_single_turn``, a full prefill),
        until no call is left, ``max_completion_length`` is spent, or ``max_tool_calling_iterations`` is
        reached, counting the tool rounds already in the prefix. Returns the K completed token-id lists
        (tool-result tokens included, as TRL passes them to reward functions) and the K completions as TRL's
        message lists (earlier turns + the loop's turns)."""
        prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
        tool_mask = output.get("tool_mask")
        _, prompts, _, parent_completions = self._appo_reward_context
        limit = self.max_tool_calling_iterations
        # Per branch: where its current assistant turn starts, and how many tool rounds came before it.
        prompt_lists, starts, rounds_before, earlier = [], [], [], []
        for row, position in zip(rows.tolist(), positions.tolist()):
            prompt_lists.append(prompt_ids[row][prompt_mask[row].bool()].tolist())
            marks = tool_mask[row, :position].tolist() if tool_mask is not None else [1] * position
            start = position
            while start > 0 and marks[start - 1] == 1:
                start -= 1
            rounds = sum(1 for i in range(start) if marks[i] == 0 and (i == 0 or marks[i - 1] == 1))
            # The parent's messages before its `rounds`-th assistant turn: earlier turns and tool results.
            messages, seen = [], 0
            for message in parent_completions[row]:
                if message.get("role") == "assistant":
                    if seen == rounds:
                        break
                    seen += 1
                messages.append(message)
            starts.append(start)
            rounds_before.append(rounds)
            earlier.append(messages)

        turns = [parse_response(self._tokenizer, ids[start:], prefix=prompt_lists[k] + ids[:start],
                                tools=self.tools)
                 for k, (ids, start) in enumerate(zip(branch_ids, starts))]
        finished_ids = [list(ids) for ids in branch_ids]
        finished_turns = [[turn] for turn in turns]
        calls = failures = 0
        sync_dicts, async_dicts = self._sync_tool_dicts, self._async_tool_dicts
        try:
            # One TRL loop per number of earlier tool rounds, so each branch gets the rounds it has left.
            for rounds in sorted(set(rounds_before)):
                members = [k for k, r in enumerate(rounds_before)
                           if r == rounds and turns[k].get("tool_calls")]
                if not members or rounds >= limit:
                    continue  # no call, or no round left: the call stays unexecuted, as in TRL at the limit
                member_rows = [int(rows[k]) for k in members]
                self._sync_tool_dicts = [sync_dicts[row] for row in member_rows]
                self._async_tool_dicts = [async_dicts[row] for row in member_rows]
                self.max_tool_calling_iterations = limit - rounds
                contexts = [copy.deepcopy(prompts[row] + earlier[k]) for k, row in zip(members, member_rows)]
                _, completions, completion_ids, _, count, failed, _ = self._tool_call_loop(
                    contexts, [prompt_lists[k] for k in members], [finished_ids[k] for k in members],
                    [finished_turns[k] for k in members], None, None, {})
                calls, failures = calls + count, failures + failed
                for j, k in enumerate(members):
                    finished_ids[k], finished_turns[k] = completion_ids[j], completions[j]
        finally:
            self._sync_tool_dicts, self._async_tool_dicts = sync_dicts, async_dicts
            self.max_tool_calling_iterations = limit
        metrics = self._metrics["train"]
        metrics["appo/branch_tool_calls"].append(float(calls))
        metrics["appo/branch_tool_failure_frequency"].append(failures / calls if calls else 0.0)
        completions = [earlier[k] + finished_turns[k] for k in range(len(branch_ids))]
        return finished_ids, completions

    def _appo_score_branches(self, rows: torch.Tensor, branch_ids: list[list[int]],
                             branch_completions: list | None = None) -> torch.Tensor:
        """Rewards float32 [K] of the branches from TRL's reward functions (NaN where all gave None).
        ``branch_completions`` (TRL message lists, from the tool loop) is used as given; without it the branch
        ids are decoded as plain text (one assistant message for conversational prompts)."""
        inputs, prompts = self._appo_reward_context[:2]
        branch_inputs = [dict(inputs[row]) for row in rows.tolist()]
        branch_prompts = [prompts[row] for row in rows.tolist()]
        if branch_completions is None:
            branch_completions = self.processing_class.batch_decode(branch_ids, skip_special_tokens=True)
            if is_conversational({"prompt": branch_prompts[0]}):
                branch_completions = [[{"role": "assistant", "content": text}] for text in branch_completions]
        per_func = super()._calculate_rewards(branch_inputs, branch_prompts, branch_completions, branch_ids)
        return self._appo_total_rewards(per_func)

    def _appo_total_rewards(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """Weighted sum over reward functions, float32 [R]; NaN where every function returned None."""
        weights = self.reward_weights.to(rewards_per_func.device)
        total = (rewards_per_func * weights[None, :]).nansum(dim=1)
        return total.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))

    def _appo_log(self, score, rows, positions, branch_rewards, future, loss_mask) -> None:
        metrics = self._metrics["train"]
        chosen = score.score[rows, positions]

        def mean_or_zero(values: torch.Tensor) -> float:
            return float(values.float().mean()) if values.numel() else 0.0

        metrics["appo/branches"].append(float(rows.numel()))
        metrics["appo/branches_per_rollout"].append(rows.numel() / max(loss_mask.shape[0], 1))
        metrics["appo/mean_branching_score"].append(mean_or_zero(chosen))
        metrics["appo/entropy_only_fraction"].append(float(score.entropy_only.float().mean()))
        metrics["appo/branch_reward_mean"].append(mean_or_zero(branch_rewards))
        metrics["appo/future_value_mean"].append(float(future[loss_mask].mean()))
        metrics["appo/mean_branch_position"].append(mean_or_zero(positions))
