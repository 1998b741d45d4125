"""The lean training loop (docs/architecture.md): APPO, with GRPO and ARPO as baselines, from one ``TrainConfig``.

One step (``Trainer.step``; the per-algorithm parts are objects in ``appo.algorithms``):
  1. rollouts: the algorithm samples exactly M trajectories per prompt in all: GRPO M full rollouts; ARPO N,
     branches after tool results by its entropy rule, fresh rollouts to fill M; APPO N (its B * N branches per
     prompt come in 3).
  2. pi_old: the step's prompts are split into ``optim.minibatches_per_step`` optimizer updates, each
     accumulated over ``optim.grad_accumulation`` micro-batches of whole prompts. Before the first update, a
     no-grad forward recomputes pi_old for every micro-batch of the later updates, with the micro-batch, padding,
     dtype and autocast its loss forward will use (the first update's micro-batches take theirs from their own
     loss forward). With no update, pi_theta == pi_old bit for bit: the PPO ratio is exactly 1 and APPO's
     Branching Score falls back to entropy alone. The engine's log-probs are only the behaviour policy's, used
     by the truncated importance-sampling weight of the loss (``algo.tis_cap``).
  3. updates: per micro-batch, a forward of pi_theta (log-probs, entropies, KV cache when APPO branches) -> the
     algorithm's advantages (APPO: Branching Score -> B * N branch points per prompt -> continuations decoded
     from the gathered prefix caches -> branch rewards -> dual-group advantages * (1 + b * A_fut)) -> PPO loss
     (1/M per prompt) -> backward; an optimizer step per update. ``algo.branch_when="once_per_step"`` (the
     authors' code) branches every micro-batch before the first update instead; ``algo.warmup_update`` adds
     one update on the first mini-batch before any branching, so every mini-batch branches after an update.
     A vLLM engine holds its own weights: it is synced at the start of a step and before a mini-batch's
     branches whenever an optimizer step came since, so branches decode from the policy the trainer holds.
  4. metrics (JSONL, optional TensorBoard), atomic checkpoints, a PNG of the curves at the end. Per step,
     besides reward and accuracy: tokens/generated (sampled tokens: rollouts, branches, fresh rollouts),
     tokens/optimised (generated tokens in the loss), tool_calls/run, branches and branches/chosen | filled |
     fresh, updates, weight_syncs, and seconds per phase: time/rollout (time/rollout_sync inside it),
     time/old_logprobs, time/branch (time/branch_sync inside it), time/update, time/step.
Resume: a run directory holding a checkpoint continues from it exactly (weights, AdamW, RNGs, data cursor).
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from appo.algorithms import PolicyForward, StepContext, make_algorithm
from appo.algos import ppo_clip_loss
from appo.checkpoint import (ResumeError, fingerprint, latest_checkpoint, load_checkpoint, plan_resume,
                             save_checkpoint)
from appo.config import TrainConfig, check_available, dump_yaml, validate
from appo.metrics import MetricsWriter, plot_metrics, read_metrics, truncate_metrics
from appo.rollout.batch import RolloutBatch, concat
from appo.scoring import token_stats


# ---------------------------------------------------------------------------------------------- setup
def _device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_policy(config: TrainConfig, device: torch.device, name_or_path: str | None = None):
    """(model, tokenizer) on ``device``, in eval mode: ``config.model`` when ``name_or_path`` is None, else
    ``name_or_path``: a model name appo knows ("smollm2-135m-instruct"), a transformers model folder
    (config.json), an appo run folder (what ``appo train`` writes: its weights are in ``checkpoints/``), a
    checkpoints folder (``step-*`` inside) or one ``step-*`` checkpoint. An appo checkpoint is loaded into the
    model its run started from (``model.name_or_path`` in the checkpoint's config), with that model's
    tokenizer. Raises ValueError naming ``model_path`` and what was expected, before any model loads."""
    from appo.models import load_model
    from appo.runs import resolve_model

    base, checkpoint = resolve_model(name_or_path) if name_or_path else (config.model.name_or_path, None)
    model, tokenizer = load_model(base, dtype=getattr(torch, config.model.dtype),
                                  attn_implementation=config.attn_implementation, device=device)
    if checkpoint is not None:
        load_checkpoint(checkpoint, model, restore_rng=False)
    return model.eval(), tokenizer


@dataclass
class TaskData:
    """The task, its tokenised prompts, and the score function the rollout engine calls."""

    task: object
    examples: list          # appo.tasks.Example, indexed by group id
    prompts: list[list[int]]

    def score(self, group_id: int, response: str) -> tuple[float, float]:
        reward = self.task.reward(response, self.examples[group_id])
        return reward.score, reward.correct


def load_task_data(config: TrainConfig, tokenizer, split: str, size: int, examples=None) -> TaskData:
    """The first ``size`` examples of ``split`` (or the given examples) whose prompt fits
    max_prompt_tokens. The task reads its data from ``data.path``, $APPO_DATA_DIR or the hub
    (``appo.tasks.data``), built with ``data.task_options``; a split the task lacks falls back to its first
    split (HotpotQA has only "dev")."""
    from appo.tasks import get_task, render_prompt

    task = get_task(config.data.task, path=config.data.path, **config.data.task_options)
    if examples is None:
        split = split if split in task.splits else task.splits[0]
        examples = task.examples(split)
    kept, prompts = [], []
    for example in examples:
        ids = render_prompt(tokenizer, example, tools=(config.data.tool,), few_shot=config.data.few_shot)
        if len(ids) <= config.rollout.max_prompt_tokens:
            kept.append(example)
            prompts.append(ids)
        if len(kept) == size:
            break
    if not kept:
        raise ValueError(f"rollout.max_prompt_tokens: no {config.data.task} prompt fits in "
                         f"{config.rollout.max_prompt_tokens} tokens")
    return TaskData(task, kept, prompts)


def make_engine(config: TrainConfig, model, tokenizer, seed: int, tools: dict | None = None):
    """The rollout engine of ``rollout.backend`` with the configured sampling settings and tools (default: the
    ``data.tool`` tool built by ``appo.tools.make_tools``). The vLLM engine starts from ``model.name_or_path``
    and is given ``model``'s current weights at once (the policy may come from a checkpoint)."""
    from appo.tools import make_tools

    settings = config.rollout
    tools = tools if tools is not None else make_tools([config.data.tool])
    if settings.backend == "vllm":
        from appo.models import model_path
        from appo.rollout.vllm import VLLMRolloutEngine

        engine = VLLMRolloutEngine(str(model_path(config.model.name_or_path)), tokenizer, tools, settings,
                                   seed=seed, **{"dtype": config.model.dtype, **settings.vllm})
        engine.load_weights(model)
        return engine
    from appo.rollout.engine import RolloutEngine

    return RolloutEngine(model, tokenizer, tools, settings, seed=seed)


# ---------------------------------------------------------------------------------------------- batch helpers
def take_rows(batch: RolloutBatch, rows: torch.Tensor) -> RolloutBatch:
    """Rows ``rows`` of ``batch`` (trimmed to their longest length); ``parent`` is kept as it is."""
    rows = rows.to(batch.tokens.device)
    width = int(batch.lengths[rows].max())
    picked = rows.tolist()

    def pick(values):
        return [values[r] for r in picked] if values else []

    return RolloutBatch(tokens=batch.tokens[rows, :width], mask=batch.mask[rows, :width],
                        behaviour_logprobs=batch.behaviour_logprobs[rows, :width], lengths=batch.lengths[rows],
                        prompt_lengths=batch.prompt_lengths[rows], group_ids=batch.group_ids[rows],
                        rewards=batch.rewards[rows], parent=batch.parent[rows],
                        branch_pos=batch.branch_pos[rows],
                        pad_id=batch.pad_id, tool_calls=pick(batch.tool_calls), answers=pick(batch.answers),
                        finish_reasons=pick(batch.finish_reasons), texts=pick(batch.texts),
                        correct=pick(batch.correct),
                        entropy=batch.entropy[rows, :width] if batch.entropy is not None else None)


def rows_of_groups(batch: RolloutBatch, groups: list[int]) -> torch.Tensor:
    """int64 indices of the rows whose group id is in ``groups``, in row order."""
    wanted = torch.tensor(groups, dtype=torch.long, device=batch.group_ids.device)
    return torch.nonzero(torch.isin(batch.group_ids, wanted)).squeeze(1)


def policy_token_stats(model, batch: RolloutBatch, temperature: float, *, use_cache: bool) -> PolicyForward:
    """Forward pi_theta over right-padded rollouts: PolicyForward(logprobs [R, T] (with grad when enabled),
    entropy [R, T], cache or None).

    Position t holds the statistics of the distribution that sampled token t (from the hidden state at t - 1);
    position 0 (always a prompt token) is 0. The LM head is fused into ``appo.token_stats``, so the [R, T, V]
    logits are never materialised.
    """
    out = model.get_decoder()(input_ids=batch.tokens, attention_mask=batch.attention_mask(),
                              use_cache=use_cache)
    head = model.get_output_embeddings()
    stats = token_stats(hidden=out.last_hidden_state[:, :-1], weight=head.weight, bias=head.bias,
                        tokens=batch.tokens[:, 1:], temperature=temperature)
    logprobs = torch.nn.functional.pad(stats.logprobs, (1, 0))
    entropy = torch.nn.functional.pad(stats.entropy, (1, 0))
    return PolicyForward(logprobs, entropy, out.past_key_values if use_cache else None)


# ---------------------------------------------------------------------------------------------- one step
def _autocast(config: TrainConfig, device: torch.device):
    if config.bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _average(records: list[dict]) -> dict:
    keys = {k for r in records for k in r}
    return {k: sum(r[k] for r in records if k in r) / sum(1 for r in records if k in r) for k in keys}


class Trainer:
    """Holds the model, optimizer, engine, algorithm, data and RNGs of one run; ``step()`` runs one step."""

    def __init__(self, config: TrainConfig, *, model=None, tokenizer=None, train_data: TaskData | None = None,
                 tools: dict | None = None):
        self.config = config
        self.device = _device(config)
        _seed_everything(config.seed)
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        if model is None:
            model, tokenizer = load_policy(config, self.device)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.model_dtype = next(model.parameters()).dtype
        self.data = train_data or load_task_data(config, tokenizer, "train", config.data.train_size)
        self.engine = make_engine(config, model, tokenizer, seed=config.seed, tools=tools)
        self.algorithm = make_algorithm(config)
        optim = config.optim
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas,
                                           weight_decay=optim.weight_decay)
        self.reference = None
        if config.algo.kl_coef > 0:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.arpo_generator = torch.Generator().manual_seed(config.seed + 1)
        self.order = torch.randperm(len(self.data.prompts), generator=self.data_generator).tolist()
        self.cursor = 0
        self.step_count = 0
        self.engine_stale = False  # the vLLM engine holds weights older than self.model's
        self.weight_syncs = 0  # copies of the weights into the engine (vLLM), cumulative
        self.score = self.data.score  # replaced each step by a scorer over that step's group ids
        self.micro_records: list[dict] = []  # the last step's {"loss": ..., "branching": ...} per micro-batch

    # -- state for checkpoints
    def generators(self) -> dict[str, torch.Generator]:
        """The run's named generators, saved and restored by checkpoints: data order, ARPO draws, sampling."""
        return {"data": self.data_generator, "arpo": self.arpo_generator, "rollout": self.engine.generator}

    def save(self, directory: Path) -> Path:
        """Checkpoint step ``step_count`` under ``directory``: weights, AdamW, RNGs, the data order and cursor,
        and a fingerprint of the training prompts that ``restore`` checks."""
        extra = {"order": self.order, "cursor": self.cursor, "data_sha256": fingerprint(self.data.prompts)}
        return save_checkpoint(directory, self.step_count, self.model, self.optimizer, self.config,
                               self.generators(), extra, keep=self.config.keep_checkpoints)

    def restore(self, directory: Path, *, verify: bool = True) -> int:
        """Continue from a checkpoint (a checkpoints folder or one step directory; ``appo.checkpoint``):
        weights, AdamW state, RNGs, data order and cursor; returns the step. AdamW then takes lr, betas and
        weight_decay from this run's config, so a change ``allow_config_change`` let through is applied.
        Raises ResumeError when the training data no longer fits the saved order: another number of prompts,
        or other prompts unless allow_config_change (then it warns)."""
        import warnings

        loaded = load_checkpoint(directory, self.model, self.optimizer, self.generators(), verify=verify)
        extra, size = loaded.extra, len(self.data.prompts)
        order, cursor = list(extra.get("order", ())), extra.get("cursor", -1)  # none: not the trainer's
        if sorted(order) != list(range(size)) or not 0 <= cursor <= size:
            raise ResumeError(f"train data: checkpoint {loaded.path} saved its data order over {len(order)} "
                              f"prompts, but the training data now has {size}; resume with the data it was "
                              "saved with (data.task, data.path, data.train_size, data.few_shot, "
                              "rollout.max_prompt_tokens, the data file) or start a new output_dir")
        if loaded.extra.get("data_sha256", fingerprint(self.data.prompts)) != fingerprint(self.data.prompts):
            message = (f"train data: the {size} training prompts differ from those checkpoint {loaded.path} "
                       "was trained on")
            if not self.config.allow_config_change:
                raise ResumeError(f"{message}; resume with the same data, or set allow_config_change=true "
                                  "(--allow-config-change) to go on with these prompts in the saved order")
            warnings.warn(f"{message}; going on with them in the saved order (allow_config_change)", stacklevel=2)
        self.order, self.cursor, self.step_count = order, cursor, loaded.step
        optim = self.config.optim
        for group in self.optimizer.param_groups:
            group.update(lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
        self.engine_stale = True
        return self.step_count

    # -- data
    def next_examples(self) -> list[int]:
        """Example indices of the next ``prompts_per_step`` prompts, reshuffling at each epoch's end."""
        groups = []
        while len(groups) < self.config.prompts_per_step:
            if self.cursor == len(self.order):
                self.order = torch.randperm(len(self.order), generator=self.data_generator).tolist()
                self.cursor = 0
            groups.append(self.order[self.cursor])
            self.cursor += 1
        return groups

    # -- the step
    def step(self) -> dict:
        """One training step; returns its metrics.

        1. the algorithm samples the step's rollouts (exactly M trajectories per prompt in all);
        2. the prompts are split into micro-batches (whole groups), ``optim.grad_accumulation`` per update;
        3. pi_old: before the first update, a no-grad forward of every micro-batch of the later updates, with
           the same padding, dtype, autocast and kernels as its loss forward (the first update's micro-batches
           use their own loss forward, detached: the policy has not moved yet), so that with no update pi_theta
           equals pi_old bit for bit;
        4. per micro-batch: forward of pi_theta -> the algorithm's advantages (APPO branches here) -> PPO loss
           (truncated IS against the engine's behaviour log-probs) -> backward; an optimizer step per update.
        """
        config = self.config
        started = time.perf_counter()
        examples = self.next_examples()
        prompts = [self.data.prompts[e] for e in examples]
        # Group ids are step-local (0..P-1), so an example drawn twice in one step still forms two groups.
        groups = list(range(len(examples)))
        self.score = lambda group_id, response: self.data.score(examples[group_id], response)
        counted = (self.engine.stats.generated_tokens, self.engine.stats.tool_calls, self.weight_syncs)
        timings = {"rollout_sync": self._sync_engine()}
        ctx = StepContext(engine=self.engine, score=self.score, forward=self._forward,
                          generator=self.arpo_generator, model_dtype=self.model_dtype,
                          compute_dtype=self._compute_dtype())
        ctx.prepare_branches = lambda: self._prepare_branches(ctx)
        batch, rollout_info = self.algorithm.rollouts(ctx, prompts, groups)
        timings["rollout"] = time.perf_counter() - started

        per_micro = len(groups) // (config.optim.minibatches_per_step * config.optim.grad_accumulation)
        micro = [take_rows(batch, rows_of_groups(batch, groups[i:i + per_micro]))
                 for i in range(0, len(groups), per_micro)]
        rollouts_per_update = per_micro * config.optim.grad_accumulation * config.algo.rollouts_per_prompt

        tick = time.perf_counter()
        old_logprobs = {}
        for i in range(config.optim.grad_accumulation, len(micro)):
            with torch.no_grad():  # (the KV cache changes no number: kept only when branching from it)
                forward = self._forward(micro[i], self._keep_cache and self.algorithm.branches_before_updates)
            old_logprobs[i] = forward.logprobs
            self.algorithm.after_old_forward(ctx, i, micro[i], forward)
            del forward
        branched_before_updates = ctx.timings["branch"]  # once_per_step branches in the pi_old pass
        timings["old_logprobs"] = time.perf_counter() - tick - branched_before_updates

        self.micro_records, grad_norms, branch_batches = [], [], []
        tick = time.perf_counter()
        if config.algo.warmup_update:  # one update before any branching: every mini-batch then sees a shift
            grad_norms.append(self._warmup_update(micro[:config.optim.grad_accumulation], old_logprobs,
                                                  rollouts_per_update))
        for i, sub in enumerate(micro):
            forward = self._forward(sub, self._keep_cache)
            old = old_logprobs.pop(i) if i in old_logprobs else forward.logprobs.detach()
            advantages, info = self.algorithm.advantages(ctx, i, sub, forward, old)
            forward = forward._replace(cache=None)
            branches = info.pop("branch_batch", None)
            if branches is not None:
                branch_batches.append(branches)
            loss, record = ppo_clip_loss(forward.logprobs, old, advantages, sub.mask,
                                         num_rollouts_total=rollouts_per_update, eps_low=config.algo.eps_low,
                                         eps_high=config.algo.eps_high, ref_logprobs=self._reference_logprobs(sub),
                                         kl_coef=config.algo.kl_coef, behaviour_logprobs=sub.behaviour_logprobs,
                                         is_cap=config.algo.tis_cap)
            loss.backward()
            self.micro_records.append({"loss": record, "branching": info})
            if (i + 1) % config.optim.grad_accumulation == 0:
                grad_norms.append(self._optimizer_step())
        timings["update"] = time.perf_counter() - tick - (ctx.timings["branch"] - branched_before_updates)
        timings["branch"] = ctx.timings["branch"]
        timings["branch_sync"] = ctx.timings["branch_sync"]
        self.step_count += 1
        counts = {"tokens/generated": self.engine.stats.generated_tokens - counted[0],
                  "tokens/optimised": sum(int(sub.mask.sum()) for sub in micro),
                  "tool_calls/run": self.engine.stats.tool_calls - counted[1],
                  "weight_syncs": self.weight_syncs - counted[2]}
        return self._step_metrics(batch, branch_batches, rollout_info, grad_norms, timings,
                                  time.perf_counter() - started, len(groups), counts)

    def _warmup_update(self, subs: list[RolloutBatch], old_logprobs: dict, rollouts_per_update: int) -> float:
        """``algo.warmup_update``: one optimizer update over the first mini-batch's micro-batches ``subs``
        before any branching, with the algorithm's warm-up advantages; their pi_old (this forward, detached)
        goes into ``old_logprobs`` for their later update. Returns the gradient norm."""
        algo = self.config.algo
        for i, sub in enumerate(subs):
            forward = self._forward(sub, False)
            old_logprobs[i] = forward.logprobs.detach()
            advantages = self.algorithm.warmup_advantages(sub, forward)
            loss, _ = ppo_clip_loss(forward.logprobs, old_logprobs[i], advantages, sub.mask,
                                    num_rollouts_total=rollouts_per_update, eps_low=algo.eps_low,
                                    eps_high=algo.eps_high, ref_logprobs=self._reference_logprobs(sub),
                                    kl_coef=algo.kl_coef, behaviour_logprobs=sub.behaviour_logprobs,
                                    is_cap=algo.tis_cap)
            loss.backward()
        return self._optimizer_step()

    @property
    def _keep_cache(self) -> bool:
        """The forward keeps its KV cache when the algorithm branches from it on this engine."""
        return self.algorithm.keeps_cache and self.engine.accepts_gathered_cache

    def _forward(self, sub: RolloutBatch, use_cache: bool) -> PolicyForward:
        with _autocast(self.config, self.device):
            return policy_token_stats(self.model, sub, self.config.rollout.temperature, use_cache=use_cache)

    def _reference_logprobs(self, sub: RolloutBatch):
        if self.reference is None:
            return None
        with torch.no_grad(), _autocast(self.config, self.device):
            stats = policy_token_stats(self.reference, sub, self.config.rollout.temperature, use_cache=False)
        return stats.logprobs

    def _optimizer_step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.engine_stale = True
        return float(norm)

    def _sync_engine(self) -> float:
        """Give a vLLM engine the current weights before it samples (the transformers engine shares them);
        a no-op unless an optimizer step came since the last sync. Returns the seconds it took."""
        seconds = 0.0
        if self.engine_stale and hasattr(self.engine, "load_weights"):
            tick = time.perf_counter()
            self.engine.load_weights(self.model)
            seconds = time.perf_counter() - tick
            self.weight_syncs += 1
        self.engine_stale = False
        return seconds

    def _prepare_branches(self, ctx: StepContext) -> None:
        """Right before branch continuations are decoded: sync the engine's weights when they are stale (once
        per branching mini-batch after an update; seconds added to ``time/branch_sync``)."""
        ctx.timings["branch_sync"] += self._sync_engine()

    def _compute_dtype(self) -> torch.dtype:
        """The dtype the policy forward computes in, which sets the no-shift tolerance (docs/method.md,
        section 4): bf16 under autocast; fp32 matmuls that CUDA runs as TF32 round like fp16 (10-bit
        mantissa)."""
        if self.config.bf16 and self.device.type == "cuda":
            return torch.bfloat16
        if self.model_dtype == torch.float32 and self.device.type == "cuda" and \
                torch.backends.cuda.matmul.allow_tf32:
            return torch.float16
        return self.model_dtype

    def _step_metrics(self, batch, branch_batches, rollout_info, grad_norms, timings, total_time,
                      prompts, counts) -> dict:
        initial = batch.parent < 0
        everything = concat([batch, *branch_batches]) if branch_batches else batch
        generated = batch.mask.sum(dim=1).float()
        trajectories = rollout_info["trajectories"] + sum(r["branching"].get("trajectories", 0)
                                                          for r in self.micro_records)
        metrics = {
            "reward": batch.rewards[initial].mean().item(),
            "accuracy": sum(c for c, keep in zip(batch.correct, initial.tolist()) if keep)
            / int(initial.sum()),
            "reward_all": everything.rewards.mean().item(),
            "response_length": generated[initial].mean().item(),
            "rollouts": everything.num_rollouts,
            "rollouts_per_prompt": trajectories / prompts,
            "tool_calls": sum(len(c) for c in everything.tool_calls) / everything.num_rollouts,
            "answered": sum(r == "answer" for r in everything.finish_reasons) / everything.num_rollouts,
            "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
            "updates": len(grad_norms),
            "time/step": total_time,
            **{f"time/{k}": v for k, v in timings.items()},
            **counts,
        }
        records = self.micro_records
        metrics.update({f"loss/{k}": v for k, v in _average([r["loss"] for r in records]).items()})
        branching = [r["branching"] for r in records if r["branching"]]
        if branching:
            metrics.update(_average(branching))
            metrics["branches"] = sum(r["branches"] for r in branching)
            for part in ("chosen", "filled", "fresh"):  # step totals (branches_filled: per micro-batch)
                metrics[f"branches/{part}"] = sum(r[f"branches_{part}"] for r in branching)
        else:  # ARPO: its branches, and the fresh rollouts that filled its budget; GRPO: none
            if "branches" in rollout_info:
                metrics["branches"] = rollout_info["branches"]
            metrics["branches/chosen"] = rollout_info.get("branches", 0)
            metrics["branches/filled"] = metrics["branches/fresh"] = rollout_info.get("fresh", 0)
        return metrics


# ---------------------------------------------------------------------------------------------- entry points
def train(config: TrainConfig, *, model=None, tokenizer=None, train_data: TaskData | None = None,
          tools: dict | None = None) -> dict:
    """Run ``config.steps`` steps into ``config.output_dir`` (resuming from its latest checkpoint when
    ``config.resume``); writes metrics.jsonl, checkpoints/, config.yaml and curves.png. Returns the last
    step's metrics (empty when nothing was left to run). model / tokenizer / train_data / tools replace the
    ones the config would build (tests, custom tasks).

    Before anything loads: the config is validated (ConfigError naming the key), the checkpoint to resume
    from is chosen and verified, and its config compared with this one (``appo.checkpoint.plan_resume``:
    ResumeError naming each changed key unless ``allow_config_change``; applied changes are appended to
    config_changes.jsonl). metrics.jsonl is cut back to the resumed step, so its steps stay unique."""
    import warnings

    from tqdm import tqdm

    validate(config)
    check_available(config, model=model is None)
    out = Path(config.output_dir)
    checkpoints = out / "checkpoints"
    resume_from, changes = plan_resume(checkpoints, config)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, model=model, tokenizer=tokenizer, train_data=train_data, tools=tools)
    if resume_from is not None:
        trainer.restore(resume_from, verify=False)
    if changes:
        with open(out / "config_changes.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps({"step": trainer.step_count, "changes": {
                key: {"from": old, "to": new} for key, (old, new) in changes.items()}}) + "\n")
    (out / "config.yaml").write_text(dump_yaml(config))
    dropped = truncate_metrics(out / "metrics.jsonl", trainer.step_count)
    if dropped:
        warnings.warn(f"{out / 'metrics.jsonl'}: removed the records of steps {dropped[0]['step']}.."
                      f"{dropped[-1]['step']}; the run resumes from step {trainer.step_count} and logs them "
                      "again", stacklevel=2)
    metrics: dict = {}
    with MetricsWriter(out / "metrics.jsonl", tensorboard=config.tensorboard) as writer, \
            tqdm(total=config.steps, initial=trainer.step_count, desc=f"{config.algo.name} train") as bar:
        while trainer.step_count < config.steps:
            metrics = trainer.step()
            if config.eval_every and trainer.step_count % config.eval_every == 0:
                metrics.update({f"eval/{k}": v for k, v in evaluate(config, model=trainer.model,
                                                                    tokenizer=trainer.tokenizer).items()})
            writer.write(trainer.step_count, metrics)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}")
            bar.update(1)
            if trainer.step_count % config.checkpoint_every == 0 or trainer.step_count == config.steps:
                trainer.save(checkpoints)
    plot = plot_metrics([out / "metrics.jsonl"], out / "curves.png")
    summary = {"algo": config.algo.name, "steps": trainer.step_count, "output_dir": str(out),
               "metrics": str(out / "metrics.jsonl"), "plot": str(plot), "last_step": metrics}
    history = read_metrics(out / "metrics.jsonl")
    if history:
        summary["mean_time_per_step"] = sum(r["time/step"] for r in history) / len(history)
        summary["mean_reward"] = sum(r["reward"] for r in history) / len(history)
    if config.eval_at_end and config.data.eval_size > 0:
        summary["eval"] = evaluate(config, model=trainer.model, tokenizer=trainer.tokenizer,
                                   samples=config.eval_samples)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _note_other_task(config: TrainConfig, model_path: str) -> None:
    """Say so (stderr) when an appo checkpoint was trained on another task than the one about to be
    evaluated: ``appo eval --model runs/x`` evaluates on ``data.task`` of the eval config, not the run's."""
    import sys

    from appo.runs import checkpoint_in, trained_config

    checkpoint = checkpoint_in(Path(model_path).expanduser())
    trained = (trained_config(checkpoint).get("data") or {}).get("task") if checkpoint is not None else None
    if trained is not None and trained != config.data.task:
        print(f"appo eval: {model_path} was trained on {trained}; evaluating on {config.data.task} "
              f"(add data.task={trained} to evaluate on its own task)", file=sys.stderr)


def _gold(answer: str) -> str:
    """A gold answer as given, or the final number of a GSM8K-style worked solution ("... #### 42")."""
    from appo.tasks.gsm8k import gold_answer

    return gold_answer(answer) if "####" in answer else answer


def evaluate(config: TrainConfig, *, model_path: str | None = None, data_path: str | None = None,
             limit: int | None = None, out_path: str | None = None, model=None, tokenizer=None,
             samples: int = 1) -> dict:
    """Held-out accuracy with the training engine (``rollout.temperature``, the tool loop): ``samples``
    sampled rollouts per question give pass@1 (mean correctness) and pass@k (any correct, k = samples).

    model_path: anything ``load_policy`` takes: a model name or folder, or what ``appo train`` wrote (the run
    folder, its checkpoints folder or one step); None: ``config.model``. data_path: a .jsonl with
    ``question`` and ``answer`` fields (GSM8K "#### n" solutions accepted), else the dev split of
    ``data.task`` (``data.eval_size`` items, from ``data.path``, $APPO_DATA_DIR or the hub). Returns
    {"accuracy" (= pass@1), "pass@1", "pass@k", "k", "reward", "response_length", "tool_calls", "items"}.
    """
    from appo.tasks import Example, read_jsonl

    if samples < 1:
        raise ValueError(f"samples: must be >= 1, got {samples}")

    device = _device(config)
    if model is None:
        if model_path is not None and data_path is None:
            _note_other_task(config, model_path)
        model, tokenizer = load_policy(config, device, model_path)
    examples = None
    if data_path is not None:
        examples = [Example(id=str(i), question=r["question"], answer=_gold(str(r["answer"])))
                    for i, r in enumerate(read_jsonl(data_path, required={"question": str,
                                                                          "answer": (str, int, float)}))]
    size = limit or (len(examples) if examples is not None else config.data.eval_size)
    data = load_task_data(config, tokenizer, "dev", size, examples)
    engine = make_engine(config, model, tokenizer, seed=config.seed)
    questions = len(data.prompts)
    batch = engine.generate([p for p in data.prompts for _ in range(samples)],
                            [q for q in range(questions) for _ in range(samples)], score=data.score)
    correct = torch.tensor(batch.correct, dtype=torch.float64).view(questions, samples)
    if out_path is not None:
        with open(out_path, "w", encoding="utf-8") as handle:
            for i in range(batch.num_rollouts):
                example = data.examples[i // samples]
                record = {"id": example.id, "sample": i % samples, "answer": batch.answers[i],
                          "gold": example.answer, "correct": batch.correct[i], "reward": batch.rewards[i].item()}
                handle.write(json.dumps(record) + "\n")
    pass_at_1 = correct.mean().item() if questions else 0.0
    return {"accuracy": pass_at_1, "pass@1": pass_at_1, "pass@k": (correct.amax(1).mean().item() if questions
                                                                   else 0.0),
            "k": samples, "reward": batch.rewards.mean().item() if questions else 0.0,
            "response_length": batch.mask.sum(dim=1).float().mean().item() if questions else 0.0,
            "tool_calls": sum(len(c) for c in batch.tool_calls) / max(batch.num_rollouts, 1),
            "items": questions}
