"""The APPO chain, written once: Branching Score -> branch points (with the budget filled) -> dual-group
advantages -> future-aware scaling (docs/method.md sections 5 to 7).

appo's trainer, the TRL integration and the verl integration all call these three functions; only the step
between them, generating the branch continuations, belongs to each engine:

    plan = plan_branches(settings, tokens=..., mask=..., group_ids=..., logprobs=pi_theta, old_logprobs=pi_old,
                         entropy=...)                                     # which (row, position) to branch
    ... the engine decodes one continuation per (plan.src[k], plan.pos[k]) and rewards it ...
    base = dual_group_base(settings, rewards=..., group_ids=..., parent=..., shared_prefix=..., mask=...)
    advantages = scale_by_future(settings, base, logprobs=pi_theta, old_logprobs=pi_old, mask=...)

``old_logprobs`` is always pi_old in the trainer's own numerics (a forward of the policy that sampled, same
micro-batches, dtype and kernels as the loss forward), never the rollout engine's log-probs: with pi_theta ==
pi_old the future value is exactly 1, the Branching Score falls back to entropy alone (docs/method.md section 5), and Omega
never measures engine noise. ``scale_by_future`` is meant to be called at every update, with that update's
pi_theta (A_fut is recomputed from the current policy, detached); the base advantages stay fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from appo.algos.advantages import dual_group_advantages, future_aware_scaling
from appo.scoring import (FUTURE_VALUE_CLIP, GAMMA, BranchingScore, branching_score, future_value,
                          no_shift_tolerance, select_branch_points)
from appo.settings import ConfigError, Range, check_fields, setting


_UNIT = Range(0, 1, open_lo=True)
_CLIP = Range(0, 100)


@dataclass(frozen=True)
class APPOSettings:
    """Every knob of the APPO chain: the one APPO settings block. appo's trainer embeds it as ``algo.appo``,
    the TRL integration exposes each field as ``APPOConfig.appo_<name>``, and verl reads it from
    ``actor_rollout_ref.actor.policy_loss.appo`` (docs/integrations.md). Defaults are docs/method.md's (the
    paper's implementation setting, with B = 1 as in the CPU demo); each field's help says what it does, its
    range is checked when the block is built (a ConfigError, i.e. a ValueError, naming the field)."""

    branches_per_rollout: int = setting(
        1, "B: branch points per initial rollout; a prompt with N rollouts always gets exactly B * N branches "
        "(plan_branches fills the budget), so it costs M = (B + 1) * N", within=Range(0, 4096))
    bs_gamma: float = setting(GAMMA, "Branching Score: the future value's discount per position (Eq. 5)",
                              within=_UNIT)
    bs_clip: tuple[float, float] = setting(FUTURE_VALUE_CLIP, "Branching Score: the future value's clip "
                                           "range [lo, hi]", within=_CLIP)
    candidates: Literal["strict", "all"] = setting(
        "strict", "'strict': branch only where z(Omega) > 0 and z(H) > 0; 'all': every generated token")
    select_per: Literal["rollout", "group"] = setting(
        "rollout", "'rollout': the top B points of each rollout; 'group': the top B * N of the prompt's "
        "rollouts pooled (the authors' code)")
    min_gap: int = setting(0, "minimum distance between two branch points of one row (the fill rule keeps it "
                           "too)", within=Range(0, 2**20))
    include_token: bool = setting(False, "the branch keeps the chosen token (the authors' code) instead of "
                                  "re-sampling it")
    entropy_only: bool = setting(False, "ablation 'BS -> entropy': rank the points by z(H) alone")
    uniform_points: bool = setting(
        False, "ablation: draw the branch points uniformly at random (from the step's seeded generator) among "
        "the candidates the Branching Score would rank, with the same budget, min_gap and fill rule")
    shift_tolerance: float | None = setting(
        None, "a rollout whose largest |log pi_theta - log pi_old| is at most this counts as unshifted and "
        "falls back to entropy; null: from the dtype the forward computes in (fp32 2^-12, fp16 or TF32 2^-5, "
        "bf16 2^-2; docs/method.md section 4); 0: bit equality only", within=Range(0, 20))
    fut_gamma: float = setting(GAMMA, "A_fut: the future value's discount per position (Eq. 7)", within=_UNIT)
    fut_clip: tuple[float, float] = setting(FUTURE_VALUE_CLIP, "A_fut = clip(exp(s), lo, hi)", within=_CLIP)
    future_scale: float = setting(0.5, "b in A = A_base * (1 + b * A_fut); 0 is the 'w/o A_fut' ablation",
                                  within=Range(0, 100))
    combine: Literal["avg", "sum"] = setting(
        "avg", "dual-group rule for a shared prefix: 'avg' (appo's reading) or 'sum' (the authors' code)")
    one_group: bool = setting(False, "ablation 'w/o dual-group': one group of all M trajectories")
    eps: float = setting(1e-6, "the z-scores' epsilon", within=Range(0, 1, open_lo=True))

    def __post_init__(self):
        check_fields(self)
        for name in ("bs_clip", "fut_clip"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ConfigError(name, f"need lo <= hi, got {getattr(self, name)}")

    @classmethod
    def authors_code(cls, **overrides) -> "APPOSettings":
        """The authors' code's choices (docs/method.md section 11): BS gamma 1 and clip [0.8, 1.2], A_fut gamma 2^(-1/64), top
        B * N per prompt, the chosen token kept, dual-group "sum"."""
        values = dict(bs_gamma=1.0, bs_clip=(0.8, 1.2), fut_gamma=2.0 ** (-1.0 / 64.0), select_per="group",
                      include_token=True, combine="sum")
        return cls(**{**values, **overrides})

    def shared_prefix(self, pos: torch.Tensor) -> torch.Tensor:
        """Length of the prefix a branch at ``pos`` shares with its parent: pos (+ 1 with include_token)."""
        return pos + int(self.include_token)


@dataclass
class BranchPlan:
    """Where to branch. src, pos: int64 [K], sorted by (row, position), duplicates allowed (two branches
    from one point are two independent continuations); shared: int64 [K], ``settings.shared_prefix(pos)``;
    score: the Branching Score of every token; chosen: points the selection chose (per-row top-B by the
    Branching Score, or uniform draws among its candidates with ``uniform_points``); filled: points added by
    the fill rule; fresh: of those, branches at a response's first generated token (the prompt had fewer
    branchable tokens than its budget): re-samples of the whole response, or with ``include_token`` of all
    but its first token."""

    src: torch.Tensor
    pos: torch.Tensor
    shared: torch.Tensor
    score: BranchingScore
    chosen: int
    filled: int
    fresh: int

    @property
    def entropy_only_fraction(self) -> float:
        """Share of rows scored by the entropy-only fallback (no shift beyond the no-shift tolerance)."""
        return float(self.score.entropy_only.float().mean())


def plan_branches(settings: APPOSettings, *, tokens: torch.Tensor, mask: torch.Tensor, group_ids: torch.Tensor,
                  logprobs: torch.Tensor, old_logprobs: torch.Tensor, entropy: torch.Tensor,
                  compute_dtype: torch.dtype = torch.float32,
                  generator: torch.Generator | None = None) -> BranchPlan:
    """Branching Score (Eq. 5) and exactly ``B * n_g`` branch points for each prompt group of n_g rows.

    tokens int [R, T]; mask bool [R, T] (generated tokens); group_ids int64 [R]; logprobs float [R, T], pi_theta
    of the sampled tokens (detached here); old_logprobs float [R, T], pi_old in the trainer's numerics; entropy
    float [R, T], pi_theta's full-vocabulary entropy. compute_dtype: the dtype the forwards behind logprobs
    and old_logprobs computed in (torch.bfloat16 under bf16 autocast); it sets the no-shift tolerance unless
    ``settings.shift_tolerance`` is given: a row whose largest |logprobs - old_logprobs| is within it falls
    back to entropy alone, so pi_theta == pi_old, bit for bit or up to rounding noise, never drives the
    selection.
    generator: the source of the draws of ``settings.uniform_points`` (required then, unused otherwise).

    Selection: the top-B candidates of each row by the Branching Score (``select_per="rollout"``) or the top
    B * n_g of the group (``select_per="group"``), at least ``min_gap`` positions apart within a row; with
    ``uniform_points``, the same candidates ranked by uniform random keys instead of the score.

    Fill rule [appo choice]: when a row has fewer candidates, the prompt's budget is filled with its next-best
    tokens: first the group's remaining candidates in the selection's order (by score, or by the random keys),
    then its other generated tokens (never a row's last) by entropy, highest first, always keeping ``min_gap``
    from the points a row already has. When even those run out (very short responses, or a large min_gap),
    the rest are fresh branches at a row's first generated token (rows taken in turn; min_gap does not apply
    to them): without ``include_token`` such a branch shares no generated token with its parent, i.e. it is a
    fresh rollout of the prompt; with ``include_token`` it keeps that first token and re-samples the rest.
    Only a group none of whose rows holds a generated token gets fewer than its budget (none).
    """
    if settings.uniform_points and generator is None:
        raise ValueError("generator: settings.uniform_points draws the branch points at random; pass a "
                         "torch.Generator (the trainer passes the step's)")
    logprobs = logprobs.detach()
    reference = logprobs if settings.entropy_only else old_logprobs.detach()
    tolerance = settings.shift_tolerance
    if tolerance is None:
        tolerance = no_shift_tolerance(compute_dtype)
    score = branching_score(tokens=tokens, old_logprobs=reference, mask=mask, entropy=entropy.detach(),
                            logprobs=logprobs, gamma=settings.bs_gamma, clip=settings.bs_clip,
                            candidates=settings.candidates, shift_tolerance=tolerance)
    ranking = score.score
    if settings.uniform_points:  # the same candidates ranked by uniform keys: a draw without replacement
        keys = torch.rand(ranking.shape, generator=generator, device=generator.device)
        ranking = torch.where(score.candidates, keys.to(ranking.device), -torch.inf)
    budget = settings.branches_per_rollout
    src, pos = select_branch_points(ranking, budget, group_ids=group_ids, per=settings.select_per,
                                    min_gap=settings.min_gap, allow_fewer=True)
    chosen = src.numel()
    points = list(zip(src.tolist(), pos.tolist()))
    fresh = 0
    if budget > 0:
        extra, fresh = _fill_budget(ranking, score.entropy, mask.bool(), group_ids, budget, points,
                                    settings.min_gap)
        points += extra
    points.sort()
    device = tokens.device
    index = torch.tensor(points, dtype=torch.long, device=device).view(-1, 2)
    src, pos = index[:, 0].contiguous(), index[:, 1].contiguous()
    return BranchPlan(src, pos, settings.shared_prefix(pos), score, chosen, len(points) - chosen, fresh)


def _fill_budget(ranking: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, group_ids: torch.Tensor,
                 budget: int, taken: list[tuple[int, int]],
                 min_gap: int) -> tuple[list[tuple[int, int]], int]:
    """The points each group still needs to reach ``budget`` per row (rule in ``plan_branches``); ranking
    [R, T]: the selection's order (-inf off the candidates); taken: the points already chosen."""
    values = ranking.detach().float().cpu().tolist()
    entropy = entropy.detach().float().cpu().tolist()
    generated = [torch.nonzero(row).flatten().tolist() for row in mask.cpu()]
    groups: dict[int, list[int]] = {}
    for r, g in enumerate(group_ids.cpu().tolist()):
        groups.setdefault(g, []).append(r)
    placed: dict[int, list[int]] = {}
    for r, p in taken:
        placed.setdefault(r, []).append(p)
    taken_set = set(taken)
    extra, fresh = [], 0
    for rows in groups.values():
        missing = budget * len(rows) - sum(len(placed.get(r, ())) for r in rows)
        if missing <= 0:
            continue
        # candidates first (in the selection's order), then the other generated tokens by entropy; never a
        # row's last token; ties toward the earlier row and position
        ranked = sorted((values[r][p] == float("-inf"),
                         -(entropy[r][p] if values[r][p] == float("-inf") else values[r][p]), r, p)
                        for r in rows for p in generated[r][:-1] if (r, p) not in taken_set)
        for _, _, r, p in ranked:
            if missing == 0:
                break
            if min_gap and any(abs(p - q) < min_gap for q in placed.get(r, ())):
                continue
            extra.append((r, p))
            placed.setdefault(r, []).append(p)
            missing -= 1
        starts = [r for r in rows if generated[r]]  # a fully masked row (e.g. TRL's truncated) has no start
        for k in range(missing if starts else 0):  # fresh branches at a response's first generated token
            r = starts[k % len(starts)]
            extra.append((r, generated[r][0]))
            fresh += 1
    return extra, fresh


def dual_group_base(settings: APPOSettings, *, rewards: torch.Tensor, group_ids: torch.Tensor,
                    parent: torch.Tensor, shared_prefix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dual-group base advantages (Eqs. 6-7) of the initial rollouts, fp32 [R_init, T].

    rewards float [R], group_ids int64 [R], parent int64 [R] (-1 for an initial rollout, else its row in this
    bundle) for R = initial rollouts and their branches; shared_prefix int64 [R], a branch's shared prefix
    length (``BranchPlan.shared``; ignored on initial rows); mask bool [R_init, T], the initial rollouts'
    generated tokens. ``settings.combine`` / ``one_group`` pick the rule (see ``dual_group_advantages``).
    """
    return dual_group_advantages(rewards, group_ids, parent, torch.where(parent < 0, 0, shared_prefix), mask,
                                 combine=settings.combine, one_group=settings.one_group, eps=settings.eps)


def scale_by_future(settings: APPOSettings, base: torch.Tensor, *, logprobs: torch.Tensor,
                    old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A = A_base * (1 + b * A_fut), A_fut = clip(exp(s), fut_clip) of this update's pi_theta against pi_old
    (gamma ``fut_gamma``), detached; fp32 [R, T], 0 off the mask. base, logprobs, old_logprobs: [R, T]."""
    future = future_value(logprobs.detach(), old_logprobs.detach(), mask, gamma=settings.fut_gamma,
                          clip=settings.fut_clip)
    return future_aware_scaling(base, torch.where(mask.bool(), future, 0.0), settings.future_scale)


def token_advantages(settings: APPOSettings, *, rewards: torch.Tensor, group_ids: torch.Tensor,
                     parent: torch.Tensor, shared_prefix: torch.Tensor, mask: torch.Tensor,
                     logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """``scale_by_future(dual_group_base(...))`` in one call: the APPO token advantages, fp32 [R_init, T].
    logprobs / old_logprobs: [R_init, T], pi_theta and pi_old of the initial rollouts."""
    base = dual_group_base(settings, rewards=rewards, group_ids=group_ids, parent=parent,
                           shared_prefix=shared_prefix, mask=mask)
    return scale_by_future(settings, base, logprobs=logprobs, old_logprobs=old_logprobs, mask=mask)
