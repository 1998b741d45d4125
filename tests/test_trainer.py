"""The training loop end to end on a tiny random model, a character tokenizer and a toy task (CPU)."""

import json

import pytest
import torch
from fakes import CharTokenizer, Echo, VowelTask

from appo.config import load_config
from appo.models import tiny_model
from appo.trainer import TaskData, train


def run(tmp_path, name, overrides, steps, num_prompts=5):
    tokenizer = CharTokenizer()
    config = load_config(None, [f"output_dir={tmp_path / name}", f"steps={steps}", "checkpoint_every=1",
                                "rollout.max_new_tokens_per_turn=10", "rollout.max_total_tokens=24",
                                "rollout.max_prompt_tokens=8", "optim.lr=1e-2", "device=cpu",
                                # pinned here so the tests do not follow the CPU demo's defaults
                                "rollout.temperature=1.0", "rollout.response_prefix=''", "optim.grad_accumulation=2",
                                "eval_at_end=false", *overrides])
    prompts = [tokenizer.encode(q) for q in ("abc", "xyz!", "q7", "hello", "<python>1")][:num_prompts]
    data = TaskData(VowelTask(), [None] * len(prompts), prompts)
    model = tiny_model("llama", vocab_size=len(tokenizer.vocab), hidden_size=32, heads=2, kv_heads=1, seed=0)
    metrics = train(config, model=model, tokenizer=tokenizer, train_data=data, tools={"python": Echo()})
    return config, model, metrics


SMALL = ["prompts_per_step=2", "optim.grad_accumulation=1"]


@pytest.mark.slow
@pytest.mark.parametrize("algo, extra", [
    ("appo", []),  # 4 prompts from a 3-item dataset (one repeats): 2 updates of 2 accumulated micro-batches
    ("appo", [*SMALL, "algo.branch_when=once_per_step", "algo.appo.select_per=group",
              "algo.appo.entropy_only=true", "algo.kl_coef=0.1", "algo.appo.combine=sum",
              "algo.appo.include_token=true"]),
    ("grpo", SMALL),
    ("arpo", [*SMALL, "algo.arpo.entropy_window=3"]),
])
def test_each_algorithm_trains_and_logs(tmp_path, algo, extra):
    config, model, metrics = run(tmp_path, algo, [f"algo.name={algo}", *extra], steps=1,
                                 num_prompts=3 if not extra else 5)
    out = tmp_path / algo
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert (out / "curves.png").stat().st_size > 0 and (out / "checkpoints" / "latest").is_file()
    last = records[-1]
    assert last["loss/tokens"] > 0 and last["grad_norm"] > 0
    # every algorithm samples exactly M trajectories per prompt
    assert last["rollouts"] == config.prompts_per_step * config.algo.rollouts_per_prompt
    assert last["rollouts_per_prompt"] == config.algo.rollouts_per_prompt
    if algo == "appo":
        branches_per_prompt = config.algo.appo.branches_per_rollout * config.algo.initial_rollouts
        assert last["branches"] == config.prompts_per_step * branches_per_prompt
    assert all(torch.isfinite(p).all() for p in model.parameters())


def make_trainer(tmp_path, overrides, *, prompts=("hello", "abc", "xyz!", "q7"), seed=0):
    from appo.trainer import Trainer

    tokenizer = CharTokenizer()
    config = load_config(None, [f"output_dir={tmp_path}", "device=cpu", "rollout.temperature=1.0",
                                "rollout.response_prefix=''", "rollout.max_new_tokens_per_turn=12",
                                "rollout.max_total_tokens=24", "rollout.max_prompt_tokens=8",
                                f"prompts_per_step={len(prompts)}", "eval_at_end=false", *overrides])
    ids = [tokenizer.encode(p) for p in prompts]
    model = tiny_model("llama", vocab_size=len(tokenizer.vocab), hidden_size=32, heads=2, kv_heads=1, seed=seed)
    return Trainer(config, model=model, tokenizer=tokenizer, train_data=TaskData(VowelTask(), [None] * len(ids), ids),
                   tools={"python": Echo()})


@pytest.mark.parametrize("bf16_autocast", [False, True])
def test_no_update_means_no_policy_shift_in_any_minibatch(tmp_path, monkeypatch, bf16_autocast):
    """lr = 0: pi_old, recomputed by the trainer, equals pi_theta bit for bit in every mini-batch, so every
    Branching Score falls back to entropy alone and every PPO ratio is exactly 1, even though the engine's own
    log-probs (fp32, step-by-step decoding) differ from the trainer's forward. Under bf16 autocast (the GPU
    path, doubled here by CPU autocast) the engine/trainer gap is large, and still no mini-batch sees it."""
    import appo.trainer

    if bf16_autocast:
        monkeypatch.setattr(appo.trainer, "_autocast",
                            lambda config, device: torch.autocast("cpu", dtype=torch.bfloat16))
    trainer = make_trainer(tmp_path, ["optim.lr=0", "optim.minibatches_per_step=2", "optim.grad_accumulation=2",
                                      "algo.initial_rollouts=2", "algo.appo.branches_per_rollout=1",
                                      "algo.rollouts_per_prompt=4"])
    captured = []
    generate = trainer.engine.generate
    trainer.engine.generate = lambda *a, **k: captured.append(generate(*a, **k)) or captured[-1]
    metrics = trainer.step()
    assert len(trainer.micro_records) == 4
    for record in trainer.micro_records:
        assert record["branching"]["bs_entropy_only"] == 1.0
        assert record["branching"]["omega_min"] == record["branching"]["omega_max"] == 1.0
        assert record["loss"]["ratio_max"] == 1.0 and record["loss"]["ratio_mean"] == 1.0
        assert record["loss"]["approx_kl"] == 0.0
    assert metrics["bs_entropy_only"] == 1.0
    # the engine's log-probs are not pi_old: they differ from the trainer's forward (more so under bf16)
    from appo.trainer import policy_token_stats

    batch = captured[0]
    with torch.no_grad(), appo.trainer._autocast(trainer.config, trainer.device):
        ours = policy_token_stats(trainer.model, batch, 1.0, use_cache=False).logprobs
    gap = (ours - batch.behaviour_logprobs)[batch.mask].abs().max()
    assert gap > 0.0
    assert metrics["loss/is_weight_max"] != 1.0  # the truncated IS weight sees that gap instead


def test_after_an_update_later_minibatches_measure_a_policy_shift(tmp_path):
    """lr > 0: the first mini-batch still falls back (no update yet, ratio exactly 1); the second one, after
    an optimizer step, sees Omega != 1, so its Branching Score uses the future value."""
    trainer = make_trainer(tmp_path, ["optim.lr=3e-2", "optim.minibatches_per_step=2", "optim.grad_accumulation=1",
                                      "algo.initial_rollouts=2", "algo.appo.branches_per_rollout=1",
                                      "algo.rollouts_per_prompt=4"])
    trainer.step()
    first, second = trainer.micro_records
    assert first["loss"]["ratio_max"] == 1.0 and first["branching"]["bs_entropy_only"] == 1.0
    assert first["branching"]["omega_min"] == first["branching"]["omega_max"] == 1.0
    assert second["branching"]["omega_min"] < 1.0 or second["branching"]["omega_max"] > 1.0
    assert second["branching"]["bs_entropy_only"] < 1.0
    assert second["loss"]["ratio_max"] != 1.0


@pytest.mark.parametrize("algo, extra", [
    # B = 3 on responses of at most 4 tokens: candidate tokens run short, the fill rule makes up the budget
    ("appo", ["algo.initial_rollouts=2", "algo.appo.branches_per_rollout=3", "algo.rollouts_per_prompt=8",
              "rollout.max_new_tokens_per_turn=4"]),
    ("appo", ["algo.initial_rollouts=2", "algo.appo.branches_per_rollout=3", "algo.rollouts_per_prompt=8",
              "rollout.max_new_tokens_per_turn=4", "algo.appo.select_per=group"]),
    ("grpo", ["algo.rollouts_per_prompt=8"]),
    ("arpo", ["algo.initial_rollouts=2", "algo.rollouts_per_prompt=8", "algo.arpo.entropy_window=3"]),
])
def test_every_algorithm_samples_exactly_m_trajectories_per_prompt(tmp_path, algo, extra):
    trainer = make_trainer(tmp_path, [f"algo.name={algo}", "optim.lr=1e-3", "optim.minibatches_per_step=2",
                                      "optim.grad_accumulation=1", *extra])
    metrics = trainer.step()
    assert metrics["rollouts"] == 4 * 8 and metrics["rollouts_per_prompt"] == 8
    if algo == "appo":
        assert metrics["branches"] == 4 * 2 * 3
        assert sum(r["branching"]["branches_filled"] for r in trainer.micro_records) > 0  # the fill rule ran
    if algo == "arpo":  # its branches, then fresh rollouts up to M
        assert 4 * 2 + metrics["branches/chosen"] + metrics["branches/fresh"] == 4 * 8


def test_appo_advantages_credit_the_shared_prefix_from_the_branch_group(tmp_path):
    """The trainer's APPO advantages are the dual-group rule times (1 + b * A_fut): on the first mini-batch
    (A_fut = clip(1) = 1) a token in a branch's shared prefix gets 1.5 * (A_init + A_br) / 2, any other token
    1.5 * A_init; computed here from the rewards with an independent fp64 loop (GRPO's rollout-level advantage
    would fail this)."""
    trainer = make_trainer(tmp_path, ["optim.lr=1e-3", "optim.minibatches_per_step=1", "optim.grad_accumulation=1",
                                      "algo.initial_rollouts=3", "algo.appo.branches_per_rollout=1",
                                      "algo.rollouts_per_prompt=6"], prompts=("hello", "abc"))
    seen = []
    advantages = trainer.algorithm.advantages

    def spy(ctx, index, sub, forward, old):
        out, info = advantages(ctx, index, sub, forward, old)
        seen.append((sub, info["branch_batch"], out))
        return out, info

    trainer.algorithm.advantages = spy
    trainer.step()
    (sub, branches, got), = seen

    def z(values):
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        return [(v - mean) / (std + 1e-6) for v in values]

    for group in sub.group_ids.unique().tolist():
        rows = [r for r in range(sub.num_rollouts) if int(sub.group_ids[r]) == group]
        kids = [k for k in range(branches.num_rollouts) if int(branches.group_ids[k]) == group]
        a_init = dict(zip(rows, z([float(sub.rewards[r]) for r in rows])))
        a_br = dict(zip(kids, z([float(branches.rewards[k]) for k in kids])))
        for r in rows:
            for t in sub.mask[r].nonzero().flatten().tolist():
                covering = [a_br[k] for k in kids if int(branches.parent[k]) == r and int(branches.branch_pos[k]) > t]
                base = a_init[r] if not covering else (a_init[r] + sum(covering) / len(covering)) / 2
                assert abs(float(got[r, t]) - 1.5 * base) < 1e-5, (r, t)
    assert len(set(branches.rewards.tolist())) > 1, "branch rewards should differ for the test to bite"


def test_separate_branching_score_and_future_value_settings_reach_the_chain(tmp_path):
    """The authors'-code variant is expressible: BS gamma 1 and clip [0.8, 1.2], A_fut gamma 2^(-1/64)."""
    trainer = make_trainer(tmp_path, ["algo.appo.bs_gamma=1.0", "algo.appo.bs_clip=[0.8, 1.2]",
                                      "algo.appo.fut_gamma=0.98923", "algo.appo.fut_clip=[1.0, 1.3]"])
    settings = trainer.algorithm.settings
    assert (settings.bs_gamma, settings.bs_clip) == (1.0, (0.8, 1.2))
    assert (settings.fut_gamma, settings.fut_clip) == (0.98923, (1.0, 1.3))


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    _, straight, _ = run(tmp_path, "straight", SMALL, steps=2)
    run(tmp_path, "resumed", SMALL, steps=1)
    _, resumed, _ = run(tmp_path, "resumed", SMALL, steps=2)  # picks up the step-1 checkpoint
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    straight_lines = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["reward"] == json.loads(straight_lines[-1])["reward"]


def with_forward_noise(trainer, size, seed=0):
    """Every policy forward of ``trainer`` disagrees with the others by up to ``size`` in each log-prob, as two
    GPU forwards of the same weights may (split-K, atomics, another batch layout). fp32 cannot move a log-prob
    of magnitude > 1 by less than one ulp (1.2e-7 to 4.8e-7 here), so a step it would round away moves the
    value by one ulp in the noise's direction instead: the smallest disagreement two forwards can show."""
    forward, gen = trainer._forward, torch.Generator().manual_seed(seed)

    def noisy(sub, use_cache):
        out = forward(sub, use_cache)
        values = out.logprobs.detach()
        noise = size * (2 * torch.rand(values.shape, generator=gen, dtype=torch.float64) - 1)
        moved = (values.double() + noise).float()
        one_ulp = torch.nextafter(values, torch.where(noise > 0, torch.inf, -torch.inf).float())
        moved = torch.where(moved == values, one_ulp, moved)
        return out._replace(logprobs=out.logprobs + (moved - values))

    trainer._forward = noisy
    return trainer


@pytest.mark.parametrize("lr, shifted", [(0.0, False), (3e-2, True)])
def test_rounding_noise_is_no_policy_shift_but_an_update_is(tmp_path, lr, shifted):
    """1e-7 of noise between the pi_old recompute and the loss forward: with lr = 0 every mini-batch still falls
    back to entropy alone, exactly (the Branching Score's z(Omega) would blow the noise up to a full-size
    signal); after a real update the second mini-batch measures the shift."""
    trainer = with_forward_noise(make_trainer(tmp_path, [f"optim.lr={lr}", "optim.minibatches_per_step=2",
                                                         "optim.grad_accumulation=1", "algo.initial_rollouts=2",
                                                         "algo.appo.branches_per_rollout=1",
                                                         "algo.rollouts_per_prompt=4"]), 1e-7)
    metrics = trainer.step()
    first, second = (r["branching"] for r in trainer.micro_records)
    assert first["bs_entropy_only"] == 1.0
    assert trainer.micro_records[1]["loss"]["ratio_max"] != 1.0  # the noise did reach the second mini-batch
    if shifted:
        assert second["bs_entropy_only"] < 1.0 and metrics["bs_entropy_only"] < 1.0
    else:
        assert second["bs_entropy_only"] == 1.0 and metrics["bs_entropy_only"] == 1.0


def test_step_metrics_count_the_work_of_the_step(tmp_path):
    """What a study reads per step: generated tokens (initial rollouts plus the branches' new tokens), the
    tokens the loss optimised, tool calls run, branches chosen / filled / fresh and the seconds of each phase."""
    trainer = make_trainer(tmp_path, ["optim.lr=1e-3", "optim.minibatches_per_step=2", "optim.grad_accumulation=1",
                                      "algo.initial_rollouts=2", "algo.appo.branches_per_rollout=3",
                                      "algo.rollouts_per_prompt=8", "rollout.max_new_tokens_per_turn=4"])
    seen = []
    advantages = trainer.algorithm.advantages

    def spy(ctx, index, sub, forward, old):
        out, info = advantages(ctx, index, sub, forward, old)
        seen.append((sub, info["branch_batch"]))
        return out, info

    trainer.algorithm.advantages = spy
    metrics = trainer.step()
    initial = sum(int(sub.mask.sum()) for sub, _ in seen)
    branched = sum(int(b.mask[k, int(b.branch_pos[k]):].sum()) for _, b in seen for k in range(b.num_rollouts))
    assert metrics["tokens/optimised"] == initial > 0
    assert metrics["tokens/generated"] == initial + branched
    assert metrics["tool_calls/run"] == trainer.engine.stats.tool_calls
    assert metrics["branches/chosen"] + metrics["branches/filled"] == metrics["branches"] == 4 * 2 * 3
    assert metrics["branches/filled"] >= metrics["branches/fresh"] and metrics["branches/filled"] > 0
    for phase in ("rollout", "old_logprobs", "branch", "update", "branch_sync", "rollout_sync"):
        assert metrics[f"time/{phase}"] >= 0.0
    assert metrics["time/branch"] > 0 and metrics["updates"] == 2
    assert metrics["weight_syncs"] == 0 and metrics["branch_points_uniform"] == 0.0  # the engine shares them
    grpo = make_trainer(tmp_path / "grpo", ["algo.name=grpo", "algo.rollouts_per_prompt=4",
                                            "optim.minibatches_per_step=2", "optim.grad_accumulation=1"]).step()
    assert grpo["tokens/optimised"] == grpo["tokens/generated"] > 0 and grpo["branches/chosen"] == 0


def test_uniform_points_ablation_in_the_trainer(tmp_path):
    """algo.appo.uniform_points: the same budget (exactly B * N branches per prompt), points drawn from the
    step's seeded generator (the same run twice draws the same points), recorded in the metrics."""
    overrides = ["algo.appo.uniform_points=true", "optim.lr=1e-3", "optim.minibatches_per_step=2",
                 "optim.grad_accumulation=1", "algo.initial_rollouts=2",
                 "algo.appo.branches_per_rollout=2", "algo.rollouts_per_prompt=6"]
    runs = []
    for name in ("a", "b"):
        trainer = make_trainer(tmp_path / name, overrides)
        points = []
        plan = trainer.engine.continue_branches
        trainer.engine.continue_branches = lambda batch, src, pos, **kw: points.append(
            (src.tolist(), pos.tolist())) or plan(batch, src, pos, **kw)
        runs.append((trainer.step(), points))
    (metrics, points), (_, again) = runs
    assert metrics["branch_points_uniform"] == 1.0 and metrics["branches"] == 4 * 2 * 2
    assert points == again
    scored = make_trainer(tmp_path / "scored", overrides[1:])
    chosen = []
    plan = scored.engine.continue_branches
    scored.engine.continue_branches = lambda batch, src, pos, **kw: chosen.append(
        (src.tolist(), pos.tolist())) or plan(batch, src, pos, **kw)
    scored.step()
    assert chosen != points  # not the Branching Score's choice


@pytest.mark.parametrize("lr", [0.0, 3e-2])
def test_warmup_update_makes_every_minibatch_branch_after_an_update(tmp_path, lr):
    trainer = make_trainer(tmp_path, [f"optim.lr={lr}", "algo.warmup_update=true", "optim.minibatches_per_step=2",
                                      "optim.grad_accumulation=1", "algo.initial_rollouts=2",
                                      "algo.appo.branches_per_rollout=1", "algo.rollouts_per_prompt=4"])
    metrics = trainer.step()
    assert metrics["updates"] == 3 and metrics["branches"] == 4 * 2 * 1 and metrics["rollouts_per_prompt"] == 4
    fallback = [r["branching"]["bs_entropy_only"] for r in trainer.micro_records]
    if lr == 0.0:
        assert fallback == [1.0, 1.0]
    else:
        assert all(f < 1.0 for f in fallback), fallback   # the first mini-batch too
        assert trainer.micro_records[0]["loss"]["ratio_max"] != 1.0


def test_warmup_update_is_refused_where_it_cannot_apply(tmp_path):
    from appo.config import ConfigError

    for extra in (["algo.name=grpo"], ["algo.branch_when=once_per_step"]):
        with pytest.raises(ConfigError, match="algo.warmup_update"):
            load_config(None, ["algo.warmup_update=true", *extra])
