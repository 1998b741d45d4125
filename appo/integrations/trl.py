"""APPO inside TRL: ``APPOTrainer(GRPOTrainer)`` and ``APPOConfig(GRPOConfig)``.

A TRL GRPO script becomes an APPO script by swapping ``GRPOTrainer`` -> ``APPOTrainer`` and
``GRPOConfig`` -> ``APPOConfig`` (whose ``appo_*`` fields are APPO's settings block, APPOSettings). Everything else
(datasets, reward functions, ``accelerate launch`` / ``torchrun``, logging) stays TRL's.

When the method runs. TRL generates one batch of N completions per prompt and feeds it to
``steps_per_generation`` micro-steps, ``num_iterations`` times over. APPO branches each slice of the batch
ONCE, at its first consumption, with the policy of that moment (docs/method.md: "inside the PPO loop"):

1. at generation (``_generate_and_score_completions`` + ``_prepare_inputs``): TRL's rollouts and rewards; the
   batch is split into contiguous slices of whole prompt groups (TRL shuffles rows; APPO keeps groups whole),
   and when the batch spans an optimizer step, pi_old of every slice is recorded by appo's own no-grad
   forward (the same forward as in step 2, so with no update in between pi_theta == pi_old bit for bit);
2. at a slice's first consumption: one no-grad forward of the CURRENT policy over prompt + completion
   (``use_cache=True``) gives pi_theta, the full-vocabulary entropy and the KV cache;
3. ``appo.algos.chain.plan_branches``: Branching Score (pi_theta against pi_old) and exactly B * N branch
   points per prompt;
4. the continuations are decoded with ``model.generate`` from caches gathered by
   ``appo.prefix_cache.gather_prefix_kv`` (no prefill over the prefix); with TRL ``tools=``, a continuation
   that calls a tool goes through TRL's own tool loop (``_tool_call_loop``) under the same
   ``max_tool_calling_iterations`` (the prefix's tool rounds count);
5. TRL's reward functions score the branches (padded to the same count on every rank for TRL's gather, then
   sliced back to this rank's branches); like the initial completions, they also get ``graded_completions``,
   the model's own text with each tool result an empty block;
6. ``dual_group_base`` and ``scale_by_future`` (A_fut from this micro-step's pi_theta against pi_old) give
   the [B, T] token advantages TRL's loss uses as they are; only the N initial completions are optimised.
   The base advantages are stored with the slice;
7. later passes over the slice (``num_iterations > 1``) branch nothing: the stored base advantages, scaled by
   A_fut from a no-grad forward of the policy of that pass (no cache). So every prompt costs exactly
   M = (B + 1) * N trajectories per generation, whatever ``num_iterations``, ``steps_per_generation`` and the
   number of processes.

Omega is therefore a real policy shift where a slice is branched after an optimizer step of its generation
(``steps_per_generation > gradient_accumulation_steps``): it compares the updated policy with the one that
sampled, in the trainer's own numerics, never the sampling engine's log-probs. Slices branched before any
update have pi_theta == pi_old exactly and use the documented entropy-only fallback
(``appo/entropy_only_fraction``). ``APPOConfig`` defaults ``steps_per_generation`` to 2 x
``gradient_accumulation_steps`` (appo's two mini-batches per step) so that half of the slices branch against a
moved policy. ``num_iterations > 1`` does not re-branch: its later passes see the moved policy in A_fut only.

More than one process (DDP, e.g. ``torchrun --nproc_per_node 2`` or ``accelerate launch``): every micro-batch
holds whole prompt groups (``per_device_train_batch_size`` a multiple of ``num_generations``, checked), so
each group, its branches and its statistics live on one rank; scoring and branching are local to that rank.
What maps to what, and what differs from appo's own trainer, is in docs/integrations.md.

TRL's internals (the private methods this hooks into, the private state it reads) are reached only through
``appo/integrations/_trl_compat.py``, which checks them at import against the installed TRL.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import typing
from dataclasses import dataclass, field, fields

import torch

from appo.algos.chain import APPOSettings, BranchPlan, dual_group_base, plan_branches, scale_by_future
from appo.integrations import _trl_compat as trl_internals
from appo.integrations._trl_compat import GRADED, GRPOConfig, GRPOSurface
from appo.prefix_cache import build_branch_batch, gather_prefix_kv
from appo.scoring import TokenStats, future_value, token_stats
from appo.settings import ConfigError, check_renamed, field_help, prefixed

logger = logging.getLogger(__name__)

# Older APPOConfig fields -> the current ones (each fails with a one-line hint naming its replacement).
RENAMED_FIELDS = {f"appo_{name}_clip_{side}": f"appo_{name}_clip=[lo, hi]" for name in ("bs", "fut")
                  for side in ("low", "high")}


def _with_appo_block(cls):
    """``cls`` as a dataclass with ``appo_<name>`` for each field of ``appo.algos.chain.APPOSettings`` (APPO's
    one settings block: its default and help; its range is checked when ``appo_settings`` builds it; a pair,
    e.g. a clip, is a list of two numbers, as HfArgumentParser reads lists), and an ``__init__`` that refuses
    an older field name (RENAMED_FIELDS) with a hint."""
    annotations = cls.__dict__.get("__annotations__")
    if annotations is None:
        annotations = {}
        cls.__annotations__ = annotations
    hints = typing.get_type_hints(APPOSettings)
    for item in fields(APPOSettings):
        hint, metadata = hints[item.name], {"help": field_help(item)}
        if typing.get_origin(hint) is tuple:
            hint, spec = list[float], field(default_factory=functools.partial(list, item.default),
                                            metadata=metadata)
        else:
            spec = field(default=item.default, metadata=metadata)
        annotations[f"appo_{item.name}"] = hint
        setattr(cls, f"appo_{item.name}", spec)
    cls = dataclass(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        check_renamed(kwargs, RENAMED_FIELDS)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_with_appo_block
class APPOConfig(GRPOConfig):
    """``GRPOConfig`` plus APPO's settings block: ``appo_<name>`` for each field of
    ``appo.algos.chain.APPOSettings`` (the block appo's trainer reads as ``algo.appo.<name>`` and verl as
    ``actor_rollout_ref.actor.policy_loss.appo.<name>``: same names, defaults, ranges and help), e.g.
    ``appo_branches_per_rollout`` (B), ``appo_future_scale`` (b), ``appo_bs_clip=[lo, hi]``.

    ``steps_per_generation`` defaults to 2 x ``gradient_accumulation_steps`` here (TRL's default is 1 x): one
    generation feeds two optimizer steps, so the second branches against a moved policy. Set it (or
    ``generation_batch_size``) yourself to choose; with 1 x and ``num_iterations=1`` the Branching Score is
    entropy-only by construction (pi_theta == pi_old at every branching), which APPOTrainer reports.
    """

    def __post_init__(self):
        self.appo_settings()  # bad APPO fields fail before TRL's own checks
        if self.steps_per_generation is None and self.generation_batch_size is None:
            self.steps_per_generation = 2 * self.gradient_accumulation_steps
        super().__post_init__()

    def appo_settings(self) -> APPOSettings:
        """The chain's settings (``appo.algos.chain.APPOSettings``) of the ``appo_*`` fields; a bad value is a
        ConfigError (a ValueError) naming the ``appo_*`` field."""
        values = {item.name: getattr(self, f"appo_{item.name}") for item in fields(APPOSettings)}
        try:
            return APPOSettings(**values)
        except ConfigError as error:
            raise prefixed(error, "appo_") from None


_NO_ENVIRONMENT_FACTORY = ("environment_factory: not supported by APPOTrainer yet (a branch would share the "
                           "stateful environment of the rollout it branches from); pass tools= instead")


class APPOTrainer(GRPOSurface):
    """TRL's GRPOTrainer with APPO's token branching, dual-group advantages and future-aware scaling.

    Same constructor as ``GRPOTrainer``; ``args`` must be an :class:`APPOConfig`. Runs on any number of DDP
    processes. Refused at construction, each with its reason: ``per_device_train_batch_size`` not a multiple
    of ``num_generations`` (a prompt group would be split across micro-batches or ranks), FSDP or DeepSpeed
    ZeRO-3 (sharded parameters; branch decoding runs a different number of forwards on each rank),
    ``environment_factory`` (a branch would share and mutate its parent's stateful environment), ``tools=``
    with vLLM on more than one process (the branch tool loop runs a rank-dependent number of vLLM generations,
    each a collective) or with a vision-language processor, and a dataset column named ``graded_completions``.

    What a reward function reads: TRL's arguments as ``GRPOTrainer`` passes them, plus
    ``graded_completions`` (list[str]), the text appo grades: the model's own tokens decoded, each tool result
    an empty ``<result></result>`` block (``appo.rollout.tool_loop.graded_text``), for the initial completions
    and the branches alike. Tool results reach the model's context as plain text (no special token id).
    """

    def __init__(self, *args, **kwargs):
        if kwargs.get("environment_factory") is not None:   # before TRL's own setup of it
            raise ValueError(_NO_ENVIRONMENT_FACTORY)
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, APPOConfig):
            raise ValueError(f"args: APPOTrainer needs an APPOConfig, got {type(self.args).__name__}")
        self._appo_check_setup()
        self.appo_settings = self.args.appo_settings()
        self._appo_context = None      # the buffered generation batch's reward inputs, for the branches
        # appo_uniform_points' draws: seeded per rank (each rank branches its own groups)
        self._appo_generator = torch.Generator().manual_seed(self.args.seed + self.accelerator.process_index)
        if self.args.appo_branches_per_rollout and not self._appo_branches_after_update():
            logger.warning("APPOTrainer: every slice of a generation batch is branched (at its first "
                           "consumption) before the first optimizer step of its generation, so pi_theta == "
                           "pi_old at every branching and the Branching Score is entropy-only "
                           "(appo/entropy_only_fraction = 1); num_iterations > 1 reuses the branches and "
                           "moves only A_fut. Raise steps_per_generation above gradient_accumulation_steps "
                           "(APPOConfig's default is twice it) for a real future value.")

    def _appo_check_setup(self) -> None:
        args, processes = self.args, self.accelerator.num_processes
        if args.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                "per_device_train_batch_size: must be a multiple of num_generations "
                f"({self.num_generations}) for APPO, got {args.per_device_train_batch_size}: each "
                "micro-batch must hold whole prompt groups, so that a group's branches and its dual-group "
                "statistics stay on one rank and one update (raise per_device_train_batch_size or lower "
                "num_generations)")
        if getattr(self, "environment_factories", None) is not None:
            raise ValueError(_NO_ENVIRONMENT_FACTORY)
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_fsdp_enabled or (plugin is not None and plugin.zero_stage == 3):
            raise ValueError("args: APPOTrainer runs on DDP (or DeepSpeed ZeRO-1/2), not on FSDP or ZeRO-3: "
                             "branch continuations end at different lengths on each rank, so their decoding "
                             "runs a different number of forwards per rank, which sharded parameters cannot "
                             "serve")
        if self.tools and self._trl_is_vlm:
            raise ValueError("tools: APPOTrainer passes tool results to the model as plain text through a "
                             "text tokenizer; a vision-language processing_class is not supported with tools")
        columns = getattr(self.train_dataset, "column_names", None) or ()
        if GRADED in columns:
            raise ValueError(f"train_dataset: the column {GRADED!r} is the reward functions' keyword for the "
                             "graded text APPOTrainer passes them; rename the column")
        if self.tools and self.use_vllm and processes > 1:
            raise ValueError("tools: with vLLM on more than one process, APPOTrainer's branch tool loop "
                             "would call vLLM's gathered generation a different number of times on each "
                             "rank; use one process or transformers generation")

    def _appo_policy_moves(self) -> bool:
        """Whether some slice of a generation batch is consumed, in any pass, after an optimizer step (TRL's
        own rule for when pi_old differs from pi_theta): then pi_old is recorded at generation."""
        period = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % period != 0

    def _appo_branches_after_update(self) -> bool:
        """Whether some slice is branched, i.e. first consumed, after an optimizer step of its own generation.

        Generations start every ``steps_per_generation * num_iterations`` micro-steps and branch their slices
        at micro-steps start .. start + steps_per_generation - 1; an optimizer step follows micro-step m when
        (m + 1) % gradient_accumulation_steps == 0. The pattern repeats after lcm(period, accumulation)."""
        steps, accumulation = self.args.steps_per_generation, self.args.gradient_accumulation_steps
        period = steps * self.num_iterations
        return any((m + 1) % accumulation == 0
                   for start in range(0, math.lcm(period, accumulation), period)
                   for m in range(start, start + steps - 1))

    def _appo_compute_dtype(self) -> torch.dtype:
        """The dtype of appo's forwards (pi_old, pi_theta): TRL's autocast under bf16 / fp16 mixed precision,
        else the model's. It sets the chain's no-shift tolerance (``appo.scoring.no_shift_tolerance``)."""
        precision = str(self.accelerator.mixed_precision)
        if precision in ("bf16", "fp16"):
            return torch.bfloat16 if precision == "bf16" else torch.float16
        return next(self.accelerator.unwrap_model(self.model).parameters()).dtype

    # --------------------------------------------------------- hooks (called by _trl_compat.GRPOSurface)
    def _appo_rewarded(self, inputs, prompts, completions, completion_ids, model_masks, rewards) -> None:
        """After TRL's reward functions scored a generation batch: keep its reward inputs for the branches."""
        self._appo_context = {"inputs": inputs, "prompts": prompts, "completions": completions,
                              "completion_ids": completion_ids, "model_masks": model_masks,
                              "rewards_per_func": rewards}

    def _appo_generated(self, output: dict) -> dict:
        """TRL's generated and scored batch; in training it also carries ``appo_rewards`` float32 [B] (this
        rank's rows of TRL's gathered rewards) and ``appo_row`` int64 [B] (row in this generation batch)."""
        if not self.model.training:
            return output
        rows = output["completion_ids"].shape[0]
        rank = self.accelerator.process_index
        totals = self._appo_total_rewards(self._appo_context["rewards_per_func"])
        total = totals[rank * rows:(rank + 1) * rows]
        output["appo_rewards"] = total.to(output["completion_ids"].device)
        output["appo_row"] = torch.arange(rows, device=output["completion_ids"].device)
        return output

    def _appo_prepare_inputs(self, generation_batch):
        """TRL's buffering of one generation batch over ``steps_per_generation`` micro-steps (times
        ``num_iterations``), with slices of whole prompt groups (in TRL's order, not shuffled), pi_old
        recorded for each when the policy will move before it is consumed, and APPO at consumption: a slice
        branches once, at its first consumption; later passes over it reuse its branches and base
        advantages."""
        if not self.model.training or self.args.appo_branches_per_rollout == 0:
            return self._trl_prepare_inputs(generation_batch)
        steps = self.args.steps_per_generation
        if self._trl_step % (steps * self.num_iterations) == 0 or self._trl_buffer is None:
            batch = self._trl_generate_batch(generation_batch)
            if "pixel_values" in batch:
                raise ValueError("generation_batch: APPOTrainer does not support image inputs yet")
            slices = trl_internals.split_tensor_dict(batch, steps)
            if self._appo_policy_moves():
                for part in slices:
                    part["appo_old_logprobs"] = self._appo_forward(part, keep_cache=False)[0].logprobs
            self._trl_buffer = slices
        part = self._trl_buffer[self._trl_step % steps]
        if "appo_base_advantages" in part:
            return self._appo_reuse(part)
        output = self._appo_consume(part)
        part["appo_base_advantages"] = output["appo_base_advantages"]   # fixed for the later passes
        return output

    # ------------------------------------------------------------------------------------- APPO pieces
    def _appo_consume(self, inputs: dict) -> dict:
        """A slice's first consumption: branch it, and return it with APPO's [B, C] token advantages and the
        base advantages they scale (a new dict; the buffer is unchanged).

        Every rank calls this at the same micro-steps and makes the same collective calls (branch-count
        gather, reward gather, metrics gather) whatever its rows hold."""
        settings = self.appo_settings
        completion_ids = inputs["completion_ids"]
        loss_mask = self._appo_loss_mask(inputs)
        num_rows, device = completion_ids.shape[0], completion_ids.device
        group_ids = torch.arange(num_rows, device=device) // self.num_generations
        plan, stats, old, branch_ids, branch_masks, completions = None, None, None, [], [], None
        if loss_mask.any():
            stats, cache = self._appo_forward(inputs, keep_cache=True)
            old = inputs.get("appo_old_logprobs", stats.logprobs)
            plan = plan_branches(settings, tokens=completion_ids, mask=loss_mask, group_ids=group_ids,
                                 logprobs=stats.logprobs, old_logprobs=old, entropy=stats.entropy,
                                 compute_dtype=self._appo_compute_dtype(), generator=self._appo_generator)
            if plan.src.numel():
                branch_ids = self._appo_decode_branches(inputs, cache, plan)
                del cache
                branch_masks = self._appo_branch_masks(inputs, plan.src, plan.pos, branch_ids)
                if self.tools:
                    branch_ids, branch_masks, completions = self._appo_branch_tool_loop(
                        inputs, plan.src, plan.pos, branch_ids, branch_masks)
        src = plan.src if plan is not None else torch.zeros(0, dtype=torch.long, device=device)
        branch_rewards = self._appo_score_branches(inputs["appo_row"][src].tolist(), branch_ids, branch_masks,
                                                   completions)

        advantages = torch.zeros(loss_mask.shape, dtype=torch.float32, device=device)
        base = advantages.clone()
        if plan is not None:
            scorable = ~torch.isnan(branch_rewards)
            rewards = inputs["appo_rewards"]
            parent = torch.cat([torch.full((num_rows,), -1, device=device), src[scorable]])
            shared = torch.cat([torch.zeros(num_rows, dtype=torch.long, device=device),
                                plan.shared[scorable]])
            base = dual_group_base(settings, rewards=torch.cat([torch.nan_to_num(rewards, nan=0.0),
                                                                branch_rewards[scorable]]),
                                   group_ids=torch.cat([group_ids, group_ids[src[scorable]]]), parent=parent,
                                   shared_prefix=shared, mask=loss_mask)
            base = base.masked_fill(torch.isnan(rewards)[:, None], 0.0)   # unscorable rows: no signal (TRL)
            advantages = scale_by_future(settings, base, logprobs=stats.logprobs, old_logprobs=old,
                                         mask=loss_mask)
        omega = plan.score.future_value if plan is not None else None
        self._appo_log(loss_mask, omega, plan=plan, branch_rewards=branch_rewards)
        return {**inputs, "advantages": advantages, "appo_base_advantages": base}

    def _appo_reuse(self, inputs: dict) -> dict:
        """A later pass (``num_iterations > 1``) over a slice branched at its first consumption: no new
        branches, the slice's base advantages as they were computed then, and A_fut from a no-grad forward of
        the current policy against pi_old (``scale_by_future``). Returns a new dict with ``advantages``."""
        base = inputs["appo_base_advantages"]
        loss_mask = self._appo_loss_mask(inputs)
        advantages, omega = torch.zeros_like(base), None
        if loss_mask.any():
            stats, _ = self._appo_forward(inputs, keep_cache=False)
            old = inputs.get("appo_old_logprobs", stats.logprobs)
            advantages = scale_by_future(self.appo_settings, base, logprobs=stats.logprobs, old_logprobs=old,
                                         mask=loss_mask)
            omega = future_value(stats.logprobs, old, loss_mask, gamma=self.appo_settings.bs_gamma)
        self._appo_log(loss_mask, omega)
        return {**inputs, "advantages": advantages}

    @staticmethod
    def _appo_loss_mask(inputs: dict) -> torch.Tensor:
        """bool [B, C]: the model's own completion tokens (TRL's completion mask and tool mask)."""
        mask = inputs["completion_mask"].bool()
        return mask & inputs["tool_mask"].bool() if "tool_mask" in inputs else mask

    def _appo_forward(self, inputs: dict, *, keep_cache: bool) -> tuple[TokenStats, object]:
        """No-grad forward of the current policy over a slice's prompt + completion: token stats fp32 [B, C]
        (log-prob of each completion token, full-vocabulary entropy) and, with ``keep_cache``, the KV cache
        [B, H, P + C, D] per layer. Eval mode (no dropout) and TRL's autocast; position ids count real tokens
        (as ``generate`` does), so the cache lines up with the branch decoding. pi_old and pi_theta both come
        from here, so with no update in between they are equal bit for bit."""
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        full_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        full_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        model = self.accelerator.unwrap_model(self.model)
        position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
        training = model.training
        model.eval()
        try:
            checkpointing = self.args.gradient_checkpointing_kwargs
            with (torch.no_grad(), trl_internals.disable_gradient_checkpointing(model, checkpointing),
                  self.accelerator.autocast()):
                out = model(input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids,
                            use_cache=keep_cache, logits_to_keep=completion_ids.shape[1] + 1)
        finally:
            model.train(training)
        stats = token_stats(out.logits[:, :-1], completion_ids, temperature=self.temperature)
        return stats, (out.past_key_values if keep_cache else None)

    def _appo_decode_branches(self, inputs: dict, cache, plan: BranchPlan) -> list[list[int]]:
        """Continue the K prefixes (row ``plan.src[k]``'s prompt + completion[:plan.shared[k]]) from the
        gathered KV caches with TRL's generation config. Returns K lists of completion token ids (the kept
        completion prefix + the new tokens, cut after EOS and at ``max_completion_length``)."""
        include = self.appo_settings.include_token
        prompt_width = inputs["prompt_ids"].shape[1]
        full_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        full_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        rows, positions = plan.src, plan.pos + prompt_width
        lengths = torch.full(full_ids.shape[:1], full_ids.shape[1], dtype=torch.long, device=full_ids.device)
        prefix = build_branch_batch(full_ids, lengths, rows, positions,
                                    pad_id=self._trl_tokenizer.pad_token_id, include_token=include)
        # The original attention mask, gathered the same way, keeps the prompts' left padding masked out.
        attention = build_branch_batch(full_mask.long(), lengths, rows, positions, pad_id=0,
                                       include_token=include).input_ids
        model = self.accelerator.unwrap_model(self.model)
        branch_cache = gather_prefix_kv(cache, rows, positions, include_token=include, lengths=lengths)
        dtype = next(model.parameters()).dtype
        for layer in branch_cache.layers:   # the forward may have run under autocast
            layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
        kept = prefix.prefix_lengths - prompt_width                       # completion tokens kept per branch
        generation_config = copy.deepcopy(self.generation_config)
        generation_config.max_new_tokens = max(self.max_completion_length - int(kept.min()), 1)
        training = model.training
        model.eval()
        try:
            checkpointing = self.args.gradient_checkpointing_kwargs
            with torch.no_grad(), trl_internals.disable_gradient_checkpointing(model, checkpointing):
                generated = model.generate(input_ids=prefix.input_ids, attention_mask=attention,
                                           past_key_values=branch_cache, generation_config=generation_config)
        finally:
            model.train(training)
        new_tokens = generated[:, prefix.input_ids.shape[1]:].tolist()
        eos = set(self._trl_eos_ids)
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

    def _appo_branch_masks(self, inputs: dict, rows: torch.Tensor, positions: torch.Tensor,
                           branch_ids: list[list[int]]) -> list[list[int]]:
        """Per branch, a list of 1 where the model wrote the token and 0 on tool-result tokens: the kept
        prefix of parent row ``rows[k]`` (``positions[k]`` completion tokens, one more with
        ``appo_include_token``) has the parent's ``tool_mask``; the decoded continuation is the model's."""
        keep = int(self.appo_settings.include_token)
        tool_mask = inputs.get("tool_mask")
        masks = []
        for row, position, ids in zip(rows.tolist(), positions.tolist(), branch_ids):
            kept = min(position + keep, len(ids))
            head = tool_mask[row, :kept].tolist() if tool_mask is not None else [1] * kept
            masks.append([int(bool(m)) for m in head] + [1] * (len(ids) - kept))
        return masks

    def _appo_branch_tool_loop(self, inputs: dict, rows: torch.Tensor, positions: torch.Tensor,
                               branch_ids: list[list[int]], branch_masks: list[list[int]]
                               ) -> tuple[list[list[int]], list[list[int]], list[list[dict]]]:
        """Finish the K tool-using branches with TRL's own tool loop (``_trl_compat``'s ``_trl_tool_loop``).

        A branch at completion position ``positions[k]`` of slice row ``rows[k]`` keeps the parent's earlier
        turns (assistant turns, tool calls and tool results, token for token) and regenerated the rest of the
        current assistant turn. That turn is parsed with TRL's ``parse_response``; if it calls tools, TRL's
        loop executes them with the parent row's tool functions, appends the tool-result tokens (as plain
        text: ``GRPOSurface._get_tool_suffix_ids``) and generates the next turns (a full prefill), until no
        call is left, ``max_completion_length`` is spent, or ``max_tool_calling_iterations`` is reached,
        counting the tool rounds already in the prefix. Returns the K completed token-id lists (tool-result
        tokens included, as TRL passes them to reward functions), their K model masks (``branch_masks``
        extended: 0 on the appended tool-result tokens) and the K completions as TRL's message lists
        (earlier turns + the loop's turns)."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        tool_mask = inputs.get("tool_mask")
        generation_rows = inputs["appo_row"][rows].tolist()
        prompts, parent_completions = self._appo_context["prompts"], self._appo_context["completions"]
        limit = self.max_tool_calling_iterations
        # Per branch: where its current assistant turn starts, and how many tool rounds came before it.
        prompt_lists, starts, rounds_before, earlier = [], [], [], []
        for row, gen_row, position in zip(rows.tolist(), generation_rows, positions.tolist()):
            prompt_lists.append(prompt_ids[row][prompt_mask[row].bool()].tolist())
            marks = tool_mask[row, :position].tolist() if tool_mask is not None else [1] * position
            start = position
            while start > 0 and marks[start - 1] == 1:
                start -= 1
            rounds = sum(1 for i in range(start) if marks[i] == 0 and (i == 0 or marks[i - 1] == 1))
            # The parent's messages before its `rounds`-th assistant turn: earlier turns and tool results.
            messages, seen = [], 0
            for message in parent_completions[gen_row]:
                if message.get("role") == "assistant":
                    if seen == rounds:
                        break
                    seen += 1
                messages.append(message)
            starts.append(start)
            rounds_before.append(rounds)
            earlier.append(messages)

        turns = [trl_internals.parse_turn(self._trl_tokenizer, ids[start:], prompt_lists[k] + ids[:start],
                                          self.tools)
                 for k, (ids, start) in enumerate(zip(branch_ids, starts))]
        finished_ids = [list(ids) for ids in branch_ids]
        finished_masks = [list(mask) for mask in branch_masks]
        finished_turns = [[turn] for turn in turns]
        calls = failures = 0
        # One TRL loop per number of earlier tool rounds, so each branch gets the rounds it has left.
        for rounds in sorted(set(rounds_before)):
            members = [k for k, r in enumerate(rounds_before) if r == rounds and turns[k].get("tool_calls")]
            if not members or rounds >= limit:
                continue  # no call, or no round left: the call stays unexecuted, as in TRL at the limit
            member_rows = [generation_rows[k] for k in members]
            contexts = [copy.deepcopy(prompts[row] + earlier[k]) for k, row in zip(members, member_rows)]
            completion_ids, masks, completions, count, failed = self._trl_tool_loop(
                member_rows, contexts, [prompt_lists[k] for k in members], [finished_ids[k] for k in members],
                [finished_turns[k] for k in members], limit - rounds)
            calls, failures = calls + count, failures + failed
            for j, k in enumerate(members):
                before = len(finished_ids[k])
                finished_ids[k], finished_turns[k] = completion_ids[j], completions[j]
                finished_masks[k] = finished_masks[k] + list(masks[j][before:])
        metrics = self._trl_train_metrics
        metrics["appo/branch_tool_calls"].append(float(calls))
        metrics["appo/branch_tool_failure_frequency"].append(failures / calls if calls else 0.0)
        completions = [earlier[k] + finished_turns[k] for k in range(len(branch_ids))]
        return finished_ids, finished_masks, completions

    def _appo_score_branches(self, generation_rows: list[int], branch_ids: list[list[int]],
                             branch_masks: list[list[int]], branch_completions: list | None = None
                             ) -> torch.Tensor:
        """Rewards float32 [K] of this rank's K branches from TRL's reward functions (NaN where all gave
        None).

        ``generation_rows``: each branch's parent row in the generation batch (its reward inputs);
        ``branch_masks``: 1 where the model wrote the token (the reward functions' ``graded_completions`` are
        built from them); ``branch_completions`` (TRL message lists, from the tool loop) is used as given,
        else the ids are decoded as plain text (one assistant message for conversational prompts). TRL gathers
        rewards over all ranks, which needs the same row count everywhere: the ranks agree on the largest K,
        pad with copies of a row (scored, then dropped) and keep their own slice. Reward-function logs of
        branches are dropped."""
        device = self.accelerator.device
        count = len(generation_rows)
        width = count
        if self.accelerator.num_processes > 1:
            width = int(self.accelerator.gather(torch.tensor([count], device=device)).max())
        if width == 0:
            return torch.zeros(0, dtype=torch.float32, device=device)
        context = self._appo_context
        if branch_completions is None:
            branch_completions = self.processing_class.batch_decode(branch_ids, skip_special_tokens=True)
            if count and trl_internals.is_conversational({"prompt": context["prompts"][generation_rows[0]]}):
                branch_completions = [[{"role": "assistant", "content": text}] for text in branch_completions]
        rows, ids, masks, completions = (list(generation_rows), list(branch_ids), list(branch_masks),
                                         list(branch_completions))
        if not rows:                                   # nothing of our own: pad with the first initial row
            rows, ids, masks, completions = ([0], [context["completion_ids"][0]], [context["model_masks"][0]],
                                             [context["completions"][0]])
        filler = width - len(rows)
        rows, ids, masks, completions = (rows + rows[-1:] * filler, ids + ids[-1:] * filler,
                                         masks + masks[-1:] * filler, completions + completions[-1:] * filler)
        per_func = self._trl_rewards([dict(context["inputs"][r]) for r in rows],
                                     [context["prompts"][r] for r in rows], completions, ids, masks,
                                     keep_logs=False)
        rank = self.accelerator.process_index
        return self._appo_total_rewards(per_func[rank * width:rank * width + count])

    def _appo_total_rewards(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """Weighted sum over reward functions, float32 [R]; NaN where every function returned None."""
        weights = self.reward_weights.to(rewards_per_func.device)
        total = (rewards_per_func * weights[None, :]).nansum(dim=1)
        return total.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))

    def _appo_log(self, loss_mask: torch.Tensor, omega: torch.Tensor | None, *,
                  plan: BranchPlan | None = None, branch_rewards: torch.Tensor | None = None) -> None:
        """Metrics of this micro-step over all ranks (one gather, made by every rank). ``omega``: float32
        [B, C], the future value (Branching Score's gamma, unclipped) of this micro-step's pi_theta against
        pi_old, None when the rank has no generated token. ``branch_rewards`` is given when the micro-step
        branched (every rank branches at the same micro-steps), else only the Omega metrics are logged."""
        device = self.accelerator.device
        local = torch.zeros(11, dtype=torch.float64, device=device)
        local[1] = loss_mask.shape[0]
        if omega is not None:
            values = omega[loss_mask.bool()].double()
            local[3] = values.numel()
            local[4] = values.sum()
            local[5] = (values - 1).abs().max() if values.numel() else 0.0
        if plan is not None:
            finite = branch_rewards[~torch.isnan(branch_rewards)].double()
            local[0] = plan.src.numel()
            local[2] = plan.score.entropy_only.sum()
            local[6], local[7] = plan.filled, plan.fresh
            local[8], local[9] = finite.sum(), finite.numel()
            local[10] = plan.pos.double().sum()
        totals = self.accelerator.gather(local[None]).view(-1, local.numel())
        summed = totals.sum(dim=0).tolist()
        metrics = self._trl_train_metrics
        metrics["appo/omega_mean"].append(summed[4] / summed[3] if summed[3] else 1.0)
        metrics["appo/omega_max_shift"].append(float(totals[:, 5].max()))
        if branch_rewards is None:
            return
        rows = max(summed[1], 1.0)
        metrics["appo/branches"].append(summed[0])
        metrics["appo/branches_per_rollout"].append(summed[0] / rows)
        metrics["appo/rollouts_per_prompt"].append((summed[1] + summed[0]) * self.num_generations / rows)
        metrics["appo/branches_filled"].append(summed[6])
        metrics["appo/branches_fresh"].append(summed[7])
        metrics["appo/entropy_only_fraction"].append(summed[2] / rows)
        metrics["appo/branch_reward_mean"].append(summed[8] / summed[9] if summed[9] else 0.0)
        metrics["appo/mean_branch_position"].append(summed[10] / summed[0] if summed[0] else 0.0)
