"""GRPO, ARPO and APPO as the trainer sees them: one object per algorithm behind one small interface.

The trainer (``appo.trainer.Trainer.step``) owns everything the algorithms share: the prompts of a step, the
micro-batches (whole prompt groups), pi_old recomputed by its own forward before the first update, the policy
forward of each micro-batch, the PPO loss and the optimizer. An algorithm decides only

  rollouts(ctx, prompts, groups) -> (batch, info)    what the step samples: exactly M trajectories per prompt,
                                                     all but APPO's branches (APPO branches per micro-batch);
  advantages(ctx, index, sub, forward, old_logprobs) -> (advantages, info)
                                                     the advantages of micro-batch ``sub`` given this update's
                                                     forward of pi_theta and pi_old;
  after_old_forward(ctx, index, sub, forward)        a hook on the no-grad pi_old forward (APPO's
                                                     ``branch_when="once_per_step"`` branches there);
  keeps_cache                                        whether the loss forward must keep the KV cache (APPO's
                                                     branches decode from it);
  branches_before_updates                            whether the pi_old forward must keep it too;
  warmup_advantages(sub, forward)                    APPO only: the advantages of ``algo.warmup_update``.

Nothing here switches on an algorithm's name: ``make_algorithm`` looks the class up once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal, NamedTuple

import torch

from appo.algos import (APPOSettings, arpo_branch_points, dual_group_base, fresh_rollouts_to_fill,
                        grpo_advantages, plan_branches, scale_by_future)
from appo.rollout.batch import RolloutBatch, concat
from appo.settings import ConfigError, Range, check_fields, setting

if TYPE_CHECKING:
    from appo.config import TrainConfig

_GROUP = 4096  # rollouts per prompt: far above any run, low enough that a typo is refused at once


@dataclass(frozen=True)
class ARPOSettings:
    """ARPO's branching rule (``appo.algos.arpo.arpo_branch_points``; docs/method.md, "Baselines")."""

    entropy_window: int = setting(20, "k: generated tokens averaged for the entropy after a tool result and "
                                  "for the rollout's first-segment entropy", within=Range(1, 2**20))
    entropy_weight: float = setting(0.2, "beta: weight of the entropy change dH in clip(U(0,1) - beta * dH, "
                                    "0, 1)", within=Range(0, 100))
    branch_threshold: float = setting(0.5, "tau: a tool result is branched when clip(U(0,1) - beta * dH, 0, 1) "
                                      "<= tau", within=Range(0, 1))

    def __post_init__(self):
        check_fields(self)


@dataclass
class AlgoConfig:
    """The trainer's ``algo`` block: which algorithm, its budget, the PPO loss, and each algorithm's own block
    (``appo``: the APPO settings the TRL and verl integrations read too; ``arpo``). Each algorithm checks the
    rules between them (``Algorithm.check``); docs/method.md section 2 maps the paper's symbols to these keys."""

    name: str = setting("appo", "the algorithm: a name in appo.algorithms.ALGORITHMS (appo, grpo, arpo)")
    rollouts_per_prompt: int = setting(4, "M: trajectories per prompt, the budget, exact for every algorithm "
                                       "(APPO: M = (B + 1) * N)", within=Range(1, _GROUP))
    initial_rollouts: int = setting(2, "N: rollouts sampled from the prompt before branching (APPO, ARPO; "
                                    "GRPO samples all M)", within=Range(1, _GROUP))
    eps_low: float = setting(0.2, "PPO clip: the ratio's lower bound is 1 - eps_low",
                             within=Range(0, 1, open_hi=True))
    eps_high: float = setting(0.28, "PPO clip: the ratio's upper bound is 1 + eps_high", within=Range(0, 10))
    tis_cap: float | None = setting(2.0, "truncated importance sampling: the loss weight min(pi_old / "
                                    "pi_behaviour, tis_cap) corrects the rollout engine / trainer mismatch "
                                    "(null disables it)", within=Range(0, 1000, open_lo=True))
    kl_coef: float = setting(0.0, "weight of the KL penalty to the initial policy (0: no reference model)",
                             within=Range(0, 100))
    branch_when: Literal["per_minibatch", "once_per_step"] = setting(
        "per_minibatch", "APPO in appo's trainer: branch each mini-batch from the policy after the updates "
        "before it (the paper's loop), or every mini-batch before the first update (the authors' code)")
    warmup_update: bool = setting(
        False, "APPO in appo's trainer: with optim.minibatches_per_step updates per step, the first mini-batch "
        "branches while pi_theta == pi_old, so its prompts never use Omega (half of them at 2 mini-batches); "
        "true adds one update on the first mini-batch's initial rollouts (advantage A_init, no branches) "
        "before any branching: one more forward, backward and optimizer step per step")
    appo: APPOSettings = setting(help="APPO's block (appo.algos.chain.APPOSettings)", factory=APPOSettings)
    arpo: ARPOSettings = setting(help="ARPO's block", factory=ARPOSettings)

    def __post_init__(self):
        check_fields(self)


def check_algo(algo: AlgoConfig) -> None:
    """The rules of the algorithm ``algo.name`` (its class's ``check``); ConfigError naming the key."""
    if algo.name not in ALGORITHMS:
        raise ConfigError("algo.name", f"expected one of {list(ALGORITHMS)}, got {algo.name!r}")
    ALGORITHMS[algo.name].check(algo)


class PolicyForward(NamedTuple):
    """A forward of the policy over a micro-batch: log pi of each token [R, T] (with grad in the loss pass),
    its full-vocabulary entropy [R, T] (detached) and the KV cache (None unless asked for)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    cache: object


def _engine_shares_weights() -> None:
    """The default ``prepare_branches``: an engine that shares the trainer's weights needs nothing."""


@dataclass
class StepContext:
    """What an algorithm may use during one step: the engine, the step's scorer (group id, response text) ->
    (reward, correct), the no-grad policy forward (for backends that record no entropy), the step's generator
    (ARPO's U(0,1) draws, APPO's ``uniform_points``), the model's dtype, the dtype the policy forward computes
    in (bf16 under autocast: it sets the no-shift tolerance), ``prepare_branches`` (called right before branch
    continuations are decoded: a backend that holds its own weights, vLLM, gets the trainer's current ones, so
    branches decode from the policy the trainer holds), and a timer dict the algorithm adds its branching
    seconds to (``branch``; ``branch_sync``: the weight syncs inside it)."""

    engine: object
    score: Callable
    forward: Callable[[RolloutBatch, bool], PolicyForward]
    generator: torch.Generator
    model_dtype: torch.dtype
    compute_dtype: torch.dtype = torch.float32
    prepare_branches: Callable[[], None] = _engine_shares_weights
    timings: dict = field(default_factory=lambda: {"branch": 0.0, "branch_sync": 0.0})


class Algorithm:
    """The interface (GRPO is its simplest case). ``config`` is the run's TrainConfig."""

    keeps_cache = False
    branches_before_updates = False

    def __init__(self, config: TrainConfig):
        self.config = config
        self.algo = config.algo

    @classmethod
    def check(cls, algo: AlgoConfig) -> None:
        """The rules this algorithm sets on the ``algo`` block (each field's range is checked when it is
        built); ConfigError naming the key. GRPO and ARPO: a group of M >= 2 (a group of one has advantage 0,
        so nothing is learned); only APPO has a warm-up update."""
        if algo.rollouts_per_prompt < 2:
            raise ConfigError("algo.rollouts_per_prompt", f"{cls.__name__} needs M >= 2 rollouts per prompt (a "
                              f"group of one has advantage 0, so nothing is learned), got {algo.rollouts_per_prompt}")
        if algo.warmup_update:
            raise ConfigError("algo.warmup_update", "needs algo.name=appo with algo.branch_when=per_minibatch "
                              "(it makes APPO's per-mini-batch branching see a policy shift)")

    def rollouts(self, ctx: StepContext, prompts: list[list[int]], groups: list[int]
                 ) -> tuple[RolloutBatch, dict]:
        """M full rollouts per prompt."""
        count = self.algo.rollouts_per_prompt
        batch = ctx.engine.generate([p for p in prompts for _ in range(count)],
                                    [g for g in groups for _ in range(count)], score=ctx.score)
        return batch, {"trajectories": batch.num_rollouts}

    def after_old_forward(self, ctx: StepContext, index: int, sub: RolloutBatch, forward: PolicyForward) -> None:
        """Called with the no-grad pi_old forward of micro-batch ``index`` (updates after the first only)."""

    def advantages(self, ctx: StepContext, index: int, sub: RolloutBatch, forward: PolicyForward,
                   old_logprobs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One group z-score per rollout, broadcast to its tokens (micro-batches hold whole groups)."""
        return grpo_advantages(sub.rewards, sub.group_ids), {}


class GRPO(Algorithm):
    """GRPO: M full rollouts per prompt, every one optimised with its group advantage."""


class ARPO(Algorithm):
    """ARPO (arXiv 2507.19849): N rollouts, branches after tool results by the entropy rule, fresh rollouts to
    fill M, GRPO advantages over all M. The entropies are the ones the engine recorded while decoding, and the
    branches decode from the KV cache decoding built (no extra forward, no prefill over the prefixes); a backend
    that records neither (vLLM) costs one no-grad forward for the entropies and uses its own prefix cache."""

    @classmethod
    def check(cls, algo):
        super().check(algo)
        if algo.initial_rollouts > algo.rollouts_per_prompt:
            raise ConfigError("algo.initial_rollouts", f"ARPO needs N <= M, got N={algo.initial_rollouts}, "
                              f"M={algo.rollouts_per_prompt}")

    def rollouts(self, ctx, prompts, groups):
        from appo.prefix_cache import gather_prefix_kv

        algo, engine = self.algo, ctx.engine
        prompt_rows = [p for p in prompts for _ in range(algo.initial_rollouts)]
        group_rows = [g for g in groups for _ in range(algo.initial_rollouts)]
        cache = None
        if engine.accepts_gathered_cache:
            initial, cache = engine.generate_with_cache(prompt_rows, group_rows, score=ctx.score)
        else:
            initial = engine.generate(prompt_rows, group_rows, score=ctx.score)
        entropy = initial.entropy
        if entropy is None:
            with torch.no_grad():
                entropy = ctx.forward(initial, False).entropy
        spans = [[call.result_span for call in calls] for calls in initial.tool_calls]
        rule = algo.arpo
        src, pos = arpo_branch_points(entropy, initial.mask, spans, initial.group_ids,
                                      budget=algo.rollouts_per_prompt, k=rule.entropy_window,
                                      beta=rule.entropy_weight, tau=rule.branch_threshold,
                                      generator=ctx.generator)
        parts = [initial]
        if src.numel():
            ctx.prepare_branches()  # a no-op: ARPO branches before any update of the step
            prefix_cache = None
            if cache is not None:
                prefix_cache = gather_prefix_kv(cache, src.to(initial.tokens.device), pos.to(initial.tokens.device),
                                                lengths=initial.lengths)
            parts.append(engine.continue_branches(initial, src, pos, past_key_values=prefix_cache,
                                                  score=ctx.score))
        del cache
        prompt_ids, fresh = fresh_rollouts_to_fill(initial.group_ids, src, algo.rollouts_per_prompt)
        by_group = dict(zip(groups, prompts))
        extra = [g for g, count in zip(prompt_ids.tolist(), fresh.tolist()) for _ in range(count)]
        if extra:
            parts.append(engine.generate([by_group[g] for g in extra], extra, score=ctx.score))
        batch = concat(parts)
        return batch, {"trajectories": batch.num_rollouts, "branches": int(src.numel()), "fresh": len(extra)}


class APPO(Algorithm):
    """APPO: N rollouts per prompt; each micro-batch's forward of pi_theta scores and branches them (B * N
    branches per prompt, from the forward's KV cache), then dual-group advantages scaled by A_fut. Only the N
    initial rollouts are optimised; the branches supply rewards."""

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        self.settings = self.algo.appo
        self.keeps_cache = True
        self.branches_before_updates = self.algo.branch_when == "once_per_step"
        self.early: dict[int, tuple[RolloutBatch, dict]] = {}  # once_per_step: branches made before the updates

    @classmethod
    def check(cls, algo):
        needed = (algo.appo.branches_per_rollout + 1) * algo.initial_rollouts
        if algo.rollouts_per_prompt != needed:
            raise ConfigError("algo.rollouts_per_prompt", f"APPO needs M = (B + 1) * N = (algo.appo."
                              f"branches_per_rollout + 1) * algo.initial_rollouts = {needed}, got "
                              f"{algo.rollouts_per_prompt}")
        if algo.warmup_update and algo.branch_when != "per_minibatch":
            raise ConfigError("algo.warmup_update", "needs algo.branch_when=per_minibatch (it makes APPO's "
                              "per-mini-batch branching see a policy shift)")

    def rollouts(self, ctx, prompts, groups):
        count = self.algo.initial_rollouts
        batch = ctx.engine.generate([p for p in prompts for _ in range(count)],
                                    [g for g in groups for _ in range(count)], score=ctx.score)
        self.early.clear()
        return batch, {"trajectories": batch.num_rollouts}

    def after_old_forward(self, ctx, index, sub, forward):
        if self.branches_before_updates:  # the authors' code: branch before any update
            self.early[index] = self._branch(ctx, sub, forward, forward.logprobs)

    def advantages(self, ctx, index, sub, forward, old_logprobs):
        branches, info = self.early.pop(index) if index in self.early else \
            self._branch(ctx, sub, forward, old_logprobs)
        bundle = concat([sub, branches]) if branches is not None else sub
        base = dual_group_base(self.settings, rewards=bundle.rewards, group_ids=bundle.group_ids,
                               parent=bundle.parent, shared_prefix=self.settings.shared_prefix(bundle.branch_pos),
                               mask=sub.mask)
        advantages = scale_by_future(self.settings, base, logprobs=forward.logprobs, old_logprobs=old_logprobs,
                                     mask=sub.mask)
        return advantages, info

    def warmup_advantages(self, sub: RolloutBatch, forward: PolicyForward) -> torch.Tensor:
        """Advantages of ``algo.warmup_update``, the update before any branching: the initial-group advantage
        A_init (no branches yet) times (1 + b * A_fut), with A_fut = clip(1) since pi_theta == pi_old."""
        base = dual_group_base(self.settings, rewards=sub.rewards, group_ids=sub.group_ids, parent=sub.parent,
                               shared_prefix=torch.zeros_like(sub.parent), mask=sub.mask)
        return scale_by_future(self.settings, base, logprobs=forward.logprobs, old_logprobs=forward.logprobs,
                               mask=sub.mask)

    def _branch(self, ctx, sub, forward, old_logprobs) -> tuple[RolloutBatch | None, dict]:
        """Plan B * N branches per prompt from this forward and decode them (from its gathered KV cache)."""
        from appo.prefix_cache import gather_prefix_kv

        tick = time.perf_counter()
        plan = plan_branches(self.settings, tokens=sub.tokens, mask=sub.mask, group_ids=sub.group_ids,
                             logprobs=forward.logprobs, old_logprobs=old_logprobs, entropy=forward.entropy,
                             compute_dtype=ctx.compute_dtype, generator=ctx.generator)
        omega = plan.score.future_value[sub.mask]
        info = {"bs_entropy_only": plan.entropy_only_fraction, "branches_chosen": plan.chosen,
                "branches_filled": plan.filled, "branches_fresh": plan.fresh,
                "branch_points_uniform": float(self.settings.uniform_points),
                "omega_min": float(omega.min()), "omega_max": float(omega.max())}
        branches = None
        if plan.src.numel():
            ctx.prepare_branches()  # vLLM: the trainer's current weights before it decodes
            prefix_cache = None
            if ctx.engine.accepts_gathered_cache:  # vLLM finds the prefixes in its own prefix cache instead
                cache = _one_dtype(forward.cache, ctx.model_dtype)
                with torch.no_grad():
                    prefix_cache = gather_prefix_kv(cache, plan.src, plan.pos, lengths=sub.lengths,
                                                    include_token=self.settings.include_token)
                for layer in prefix_cache.layers:  # the forward may have run under bf16 autocast
                    layer.keys, layer.values = layer.keys.to(ctx.model_dtype), layer.values.to(ctx.model_dtype)
            branches = ctx.engine.continue_branches(sub, plan.src, plan.pos, past_key_values=prefix_cache,
                                                    include_token=self.settings.include_token, score=ctx.score)
        info.update(trajectories=int(plan.src.numel()), branches=int(plan.src.numel()), branch_batch=branches)
        ctx.timings["branch"] += time.perf_counter() - tick
        return branches, info


def _one_dtype(cache, dtype: torch.dtype):
    """``cache`` as it is when all its keys and values share one dtype, else every layer cast to ``dtype`` in
    place (under autocast, newer transformers keep some keys and values in different dtypes)."""
    if len({t.dtype for layer in cache.layers for t in (layer.keys, layer.values)}) > 1:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
    return cache


ALGORITHMS = {"grpo": GRPO, "arpo": ARPO, "appo": APPO}


def make_algorithm(config: TrainConfig) -> Algorithm:
    """The algorithm object of ``config.algo.name``."""
    return ALGORITHMS[config.algo.name](config)
