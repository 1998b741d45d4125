"""APPOTrainer inside TRL 1.16: a real two-step training run on a tiny random model on CPU.

The tiny model shares SmolLM2's tokenizer (vocab 49152) so TRL tokenises and decodes real text; the reward
is a deterministic function of the completion text with spread inside each group.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'appo[trl]'")

from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from appo.integrations.trl import APPOConfig, APPOTrainer  # noqa: E402
from appo.models import smollm2_path, tiny_model  # noqa: E402

NUM_GENERATIONS = 4
BRANCHES = 2
MAX_COMPLETION = 10


def text_length_reward(completions, **kwargs):
    """A reward with spread inside each group: the completion's character count modulo 7."""
    return [float(len(text) % 7) for text in completions]


class RecordingAPPOTrainer(APPOTrainer):
    """Records what each generation step produced, for the assertions below."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def _appo_generate_branches(self, full_ids, full_mask, cache, rows, positions, prompt_width):
        branches = super()._appo_generate_branches(full_ids, full_mask, cache, rows, positions, prompt_width)
        self.records.append({"full_ids": full_ids.clone(), "prompt_width": prompt_width, "rows": rows.clone(),
                             "positions": positions.clone() - prompt_width, "branches": branches})
        return branches

    def _appo_score_branches(self, rows, branch_ids):
        rewards = super()._appo_score_branches(rows, branch_ids)
        self.records[-1]["branch_rewards"] = rewards.clone()
        self.records[-1]["initial_rewards"] = self._appo_total_rewards(self._appo_reward_context[2]).clone()
        return rewards

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.records[-1]["output"] = {k: v.clone() for k, v in output.items() if isinstance(v, torch.Tensor)}
        return output


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=32, layers=2, heads=4, kv_heads=2,
                       seed=3)
    # Sharper attention and logits than the random init, so positions and greedy choices matter.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
        model.lm_head.weight.mul_(20.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # Prompt lengths differ a lot, so TRL's left padding is wide inside every batch.
    dataset = Dataset.from_dict({"prompt": [
        "Add 13 and 29.", "Hi",
        "Name a prime number above ten, then explain in one short sentence why it is prime:",
        "Spell the word cat backwards, letter by letter:"]})
    config = APPOConfig(output_dir=str(tmp_path_factory.mktemp("appo_trl")), per_device_train_batch_size=8,
                        num_generations=NUM_GENERATIONS, max_completion_length=MAX_COMPLETION, max_steps=2,
                        learning_rate=5e-2, logging_steps=1, report_to="none", save_strategy="no",
                        use_cpu=True, bf16=False, seed=0,
                        appo_branches_per_rollout=BRANCHES, appo_candidates="all")
    trainer = RecordingAPPOTrainer(model=model, reward_funcs=text_length_reward, args=config,
                                   train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer, before


def test_training_step_updates_parameters(trained):
    trainer, before = trained
    changed = [name for name, p in trainer.model.named_parameters()
               if not torch.equal(p.detach(), before[name])]
    assert len(changed) == len(before)


def test_appo_metrics_are_logged(trained):
    trainer, _ = trained
    logs = [entry for entry in trainer.state.log_history if "appo/branches" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["appo/branches"] > 0
        assert torch.isfinite(torch.tensor(entry["appo/mean_branching_score"]))
        # TRL branches with the policy that sampled: pi_theta == pi_old, the documented entropy-only fallback.
        assert entry["appo/entropy_only_fraction"] == 1.0


def test_branches_continue_their_parent_prefix(trained):
    trainer, _ = trained
    for record in trainer.records:
        assert record["rows"].numel() > 0
        full, width = record["full_ids"], record["prompt_width"]
        points = zip(record["rows"].tolist(), record["positions"].tolist(), record["branches"])
        for row, pos, branch in points:
            assert branch[:pos] == full[row, width:width + pos].tolist()
            assert pos < len(branch) <= MAX_COMPLETION


def _reference_advantages(record, mask):
    """fp64 loop form of METHOD.md's dual-group advantages times (1 + 0.5 * A_fut), with A_fut = 1
    (pi_theta == pi_old when TRL branches)."""
    rewards = record["initial_rewards"].double()
    branch_rewards = record["branch_rewards"].double()
    rows, positions = record["rows"].tolist(), record["positions"].tolist()
    num_rows, width = mask.shape
    out = torch.zeros(num_rows, width, dtype=torch.float64)

    def zscore(values):
        return (values - values.mean()) / (values.std(correction=0) + 1e-6)

    for group_start in range(0, num_rows, NUM_GENERATIONS):
        members = list(range(group_start, group_start + NUM_GENERATIONS))
        a_init = zscore(rewards[members])
        branch_ids = [k for k, r in enumerate(rows) if r in members]
        a_br = zscore(branch_rewards[branch_ids]) if branch_ids else None
        for j, n in enumerate(members):
            for i in range(width):
                if not mask[n, i]:
                    continue
                shared = [a_br[m] for m, k in enumerate(branch_ids) if rows[k] == n and positions[k] > i]
                base = a_init[j] if not shared else 0.5 * (a_init[j] + sum(shared) / len(shared))
                out[n, i] = base * 1.5
    return out


def test_advantages_match_dual_group_reference(trained):
    trainer, _ = trained
    for record in trainer.records:
        output = record["output"]
        mask = output["completion_mask"].bool()
        expected = _reference_advantages(record, mask)
        assert output["advantages"].shape == mask.shape
        torch.testing.assert_close(output["advantages"].double(), expected, atol=1e-5, rtol=1e-5)
        # at least one token got credit from a branch (different from the broadcast initial advantage)
        assert (expected != expected.gather(1, torch.zeros_like(mask, dtype=torch.long)[:, :1])).any()


def test_cached_branch_decoding_matches_full_prefill(trained):
    """Greedy branches decoded from the gathered prefix caches are greedy under a full, unpadded prefill of
    the same prefix: each new token's logit is the maximum (up to float noise) of the prefill logits."""
    trainer, _ = trained
    record = trainer.records[-1]
    full, width = record["full_ids"], record["prompt_width"]
    output = record["output"]
    full_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    rows = torch.tensor([0, 3, 5, 6])
    positions = torch.tensor([2, 1, 4, 3]) + width
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainer.generation_config.do_sample = False
    try:
        _, cache = trainer._appo_policy_forward(full, full_mask, full.shape[1] - width)
        branches = APPOTrainer._appo_generate_branches(trainer, full, full_mask, cache, rows, positions,
                                                       width)
    finally:
        trainer.generation_config.do_sample = True
    checked = 0
    for k, (row, pos) in enumerate(zip(rows.tolist(), positions.tolist())):
        kept = pos - width
        assert branches[k][:kept] == full[row, width:pos].tolist()
        prompt = full[row, :width][full_mask[row, :width].bool()].tolist()
        sequence = torch.tensor([prompt + branches[k]])
        with torch.no_grad():
            logits = model(input_ids=sequence).logits[0].double()
        spread = logits.std(dim=-1).mean()
        for j in range(kept, len(branches[k])):
            step = logits[len(prompt) + j - 1]
            assert step[branches[k][j]] >= step.max() - 1e-3 * spread
            checked += 1
    assert checked >= len(rows)


def _reference_future_value(logprobs, old, mask, gamma=2 ** (-1 / 32), lo=1.0, hi=1.2):
    """fp64 clip(exp(sum_{k >= i} gamma^(k - i) (l_k - l_old_k) m_k), lo, hi), one position at a time."""
    delta = (logprobs.double() - old.double()) * mask
    running = torch.zeros(delta.shape[0], dtype=torch.float64)
    out = torch.zeros_like(delta)
    for i in reversed(range(delta.shape[1])):
        running = delta[:, i] + gamma * running
        out[:, i] = running.clamp(-20, 20).exp().clamp(lo, hi)
    return out


def test_each_update_rescales_advantages_by_the_current_future_value(trained):
    """With old log-probs present (pi_theta has moved), the loss uses A_base * (1 + 0.5 * A_fut(pi_theta))."""
    trainer, _ = trained
    inputs = {k: v.clone() for k, v in trainer.records[-1]["output"].items()}
    mask = inputs["completion_mask"].bool()
    full_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    full_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        current, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, full_ids, full_mask,
                                                                   mask.shape[1])
        old = current - 0.05 * torch.randn(current.shape, generator=torch.Generator().manual_seed(1))
        inputs["old_per_token_logps"] = old
        trainer._compute_loss(trainer.model, inputs)
    future = _reference_future_value(current, old, mask)
    assert future[mask].max() - future[mask].min() > 0.01
    expected = inputs["appo_base_advantages"].double() * (1 + 0.5 * future) * mask
    torch.testing.assert_close(inputs["advantages"].double() * mask, expected, atol=1e-5, rtol=1e-5)


def test_trainer_needs_an_appo_config(tmp_path, tokenizer):
    from trl import GRPOConfig

    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=16, layers=1, heads=2, kv_heads=1)
    config = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                        report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="args: APPOTrainer needs an APPOConfig"):
        APPOTrainer(model=model, reward_funcs=text_length_reward, args=config,
                    train_dataset=Dataset.from_dict({"prompt": ["Hi"]}), processing_class=tokenizer)


def test_config_rejects_bad_appo_fields(tmp_path):
    with pytest.raises(ValueError, match="appo_combine"):
        APPOConfig(output_dir=str(tmp_path), appo_combine="mean", report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="appo_branches_per_rollout"):
        APPOConfig(output_dir=str(tmp_path), appo_branches_per_rollout=-1, report_to="none", use_cpu=True)
