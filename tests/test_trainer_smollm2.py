"""Issue 11's acceptance on the real model: SmolLM2-135M-Instruct, arithmetic task, 2 mini-batches.

With lr = 0 no mini-batch may see a policy shift: every Branching Score falls back to entropy alone (the step's
metric is exactly 1.0) and every PPO ratio is exactly 1, in fp32 and under bf16 autocast (the GPU path, doubled
on the CPU by CPU autocast). With lr > 0 the second mini-batch, after an optimizer step, sees Omega != 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

SETTINGS = ["data.task=arithmetic", "data.few_shot=1", "data.train_size=16", "prompts_per_step=2",
            "algo.name=appo", "algo.initial_rollouts=2", "algo.appo.branches_per_rollout=1",
            "algo.rollouts_per_prompt=4", "optim.minibatches_per_step=2",
            "optim.grad_accumulation=1", "rollout.max_new_tokens_per_turn=24", "rollout.max_total_tokens=400",
            "rollout.max_prompt_tokens=360", "device=cpu", "threads=1", "eval_at_end=false"]


@pytest.fixture(scope="module")
def smollm2():
    from appo.models import load_model

    torch.set_num_threads(1)
    return load_model()


class LengthReward:
    """Rewards that always differ between rollouts (the response length), so an update has a gradient."""

    def reward(self, response, example):
        from appo.tasks.base import Reward

        return Reward(len(response) / 100.0, 0.0, True, None)


def trainer_with(smollm2, tmp_path, *overrides, varied_rewards=False):
    from appo.config import load_config
    from appo.trainer import TaskData, Trainer, load_task_data

    model, tokenizer = smollm2
    config = load_config(None, [*SETTINGS, f"output_dir={tmp_path}", *overrides])
    data = load_task_data(config, tokenizer, "train", config.data.train_size)
    if varied_rewards:
        data = TaskData(LengthReward(), data.examples, data.prompts)
    return Trainer(config, model=model, tokenizer=tokenizer, train_data=data)


@pytest.mark.parametrize("bf16_autocast", [False, True])
def test_smollm2_no_update_no_policy_shift(smollm2, tmp_path, monkeypatch, bf16_autocast):
    import appo.trainer

    if bf16_autocast:
        monkeypatch.setattr(appo.trainer, "_autocast",
                            lambda config, device: torch.autocast("cpu", dtype=torch.bfloat16))
    before = {name: p.detach().clone() for name, p in smollm2[0].named_parameters()}
    trainer = trainer_with(smollm2, tmp_path, "optim.lr=0")
    metrics = trainer.step()
    assert metrics["bs_entropy_only"] == 1.0
    assert metrics["rollouts"] == 2 * 4 and metrics["branches"] == 2 * 2
    first = trainer.micro_records[0]["loss"]
    assert first["ratio_max"] == 1.0 and first["ratio_mean"] == 1.0
    for record in trainer.micro_records:
        assert record["loss"]["ratio_max"] == 1.0 and record["loss"]["approx_kl"] == 0.0
        assert record["branching"]["omega_min"] == record["branching"]["omega_max"] == 1.0
    for name, p in smollm2[0].named_parameters():
        assert torch.equal(p, before[name]), name


def test_smollm2_update_then_policy_shift(smollm2, tmp_path):
    model = smollm2[0]
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        trainer = trainer_with(smollm2, tmp_path, "optim.lr=1e-5", varied_rewards=True)
        metrics = trainer.step()
        assert metrics["grad_norm"] > 0
        first, second = (r["branching"] for r in trainer.micro_records)
        assert trainer.micro_records[0]["loss"]["ratio_max"] == 1.0
        assert first["bs_entropy_only"] == 1.0 and first["omega_min"] == first["omega_max"] == 1.0
        assert second["omega_min"] < 1.0 or second["omega_max"] > 1.0
        assert second["bs_entropy_only"] < 1.0
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])


def rollouts(trainer, prompts=4, per_prompt=2):
    """Sampled rollouts of the trainer's first prompts (its engine, its settings)."""
    ids = trainer.data.prompts[:prompts]
    return trainer.engine.generate([p for p in ids for _ in range(per_prompt)],
                                   [g for g in range(len(ids)) for _ in range(per_prompt)])


def layout_noise_and_update(model, batch, autocast_dtype):
    """(largest |log-prob difference| between each rollout forwarded alone and inside the padded batch, the
    smallest over rollouts of the largest |log-prob change| one AdamW step at lr 1e-6 makes), with the forward
    under CPU autocast to ``autocast_dtype`` (None: fp32). The weights are restored afterwards."""
    from appo.trainer import policy_token_stats, take_rows

    def logprobs(sub):
        region = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu",
                                                                                                 enabled=False)
        with torch.no_grad(), region:
            return policy_token_stats(model, sub, 0.7, use_cache=False).logprobs

    together = logprobs(batch)
    noise = 0.0
    for r in range(batch.num_rollouts):
        alone = take_rows(batch, torch.tensor([r]))
        width = alone.tokens.shape[1]
        noise = max(noise, float((logprobs(alone)[0] - together[r, :width])[alone.mask[0]].abs().max()))
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
        advantages = torch.linspace(-1.0, 1.0, batch.num_rollouts)[:, None]
        trained = policy_token_stats(model, batch, 0.7, use_cache=False).logprobs
        (-(trained * advantages * batch.mask).sum() / batch.mask.sum()).backward()
        optimizer.step()
        moved = torch.where(batch.mask, (logprobs(batch) - together).abs(), 0.0).amax(dim=1)
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])
                p.grad = None
    return noise, float(moved.min())


def test_smollm2_no_shift_tolerance_lies_between_rounding_noise_and_an_update(smollm2, tmp_path):
    """The calibration of appo.scoring.NO_SHIFT_TOLERANCE (docs/method.md, section 5) on sampled SmolLM2
    rollouts: the same rollouts forwarded alone and inside a padded batch (another batch layout, as a GPU
    recompute may use) differ by less than the tolerance of the forward's dtype, and one AdamW step at lr 1e-6
    moves some token of every rollout by more than it. Prints the figures."""
    from appo.scoring import no_shift_tolerance

    trainer = trainer_with(smollm2, tmp_path, "optim.lr=0", "data.train_size=4")
    batch = rollouts(trainer, prompts=2)     # 4 rollouts: each dtype forwards every one alone (CI time)
    for autocast_dtype, dtype in ((None, torch.float32), (torch.bfloat16, torch.bfloat16),
                                  (torch.float16, torch.float16)):
        noise, update = layout_noise_and_update(smollm2[0], batch, autocast_dtype)
        tolerance = no_shift_tolerance(dtype)
        print(f"{dtype}: layout noise {noise:.3g}, tolerance {tolerance:.3g}, lr 1e-6 update (every rollout) "
              f">= {update:.3g}")
        assert noise < tolerance < update, (dtype, noise, update)


@pytest.mark.parametrize("lr", [0.0, 1e-5])
def test_smollm2_rounding_noise_is_no_shift_an_update_is(smollm2, tmp_path, lr):
    """Issue 21's acceptance: 1e-7 of noise on the log-ratio (each log-prob of every forward moved by up to
    1e-7, or one ulp where fp32 cannot hold a smaller step) and lr = 0: the step's entropy-only share is
    exactly 1.0; with a real update (lr 1e-5, varied rewards) the second mini-batch's is below 1."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer import with_forward_noise

    model = smollm2[0]
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        trainer = trainer_with(smollm2, tmp_path, f"optim.lr={lr}", varied_rewards=True)
        trainer = with_forward_noise(trainer, 1e-7)
        metrics = trainer.step()
        first, second = (r["branching"] for r in trainer.micro_records)
        assert trainer.micro_records[1]["loss"]["ratio_max"] != 1.0  # the noise reached the log-ratio
        assert first["bs_entropy_only"] == 1.0
        if lr == 0.0:
            assert metrics["bs_entropy_only"] == 1.0 and second["bs_entropy_only"] == 1.0
        else:
            assert metrics["grad_norm"] > 0 and second["bs_entropy_only"] < 1.0
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])
