"""Issue 11's acceptance on the real model: SmolLM2-135M-Instruct, arithmetic task, 2 mini-batches.

With lr = 0 no mini-batch may see a policy shift: every Branching Score falls back to entropy alone (the step's
metric is exactly 1.0) and every PPO ratio is exactly 1, in fp32 and under bf16 autocast (the GPU path, doubled
on the CPU by CPU autocast). With lr > 0 the second mini-batch, after an optimizer step, sees Omega != 1.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

SETTINGS = ["data.task=arithmetic", "data.few_shot=1", "data.train_size=16", "prompts_per_step=2",
            "algo.algo=appo", "algo.N=2", "algo.B=1", "algo.M=4", "optim.minibatches_per_step=2",
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
