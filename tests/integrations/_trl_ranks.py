"""Two APPO steps of TRL on a tiny model, recorded: run by ``torchrun --nproc_per_node 2`` for the multi-process
test of tests/integrations/test_trl.py (``python _trl_ranks.py OUT_DIR``: each rank writes OUT_DIR/rank<r>.pt),
and imported by that test for the 1-process replay of the same prompts, completions, branches and rewards.

Setup: 4 prompts x 4 completions, 4 rows (one prompt group) per rank and micro-batch, steps_per_generation 2,
so one generation feeds both optimizer steps: step 1 branches before any update (pi_theta == pi_old, the
entropy-only fallback), step 2 after one (a real policy shift). SGD, so that the 1-process run's float
reassociation of the averaged gradient stays at float noise (Adam's first step is sign-like and would amplify
it on near-zero gradients).
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from appo.integrations.trl import APPOConfig, APPOTrainer
from appo.models import smollm2_path, tiny_model

PROMPTS = ["Add 13 and 29.", "Hi",
           "Name a prime number above ten, then explain in one short sentence why it is prime:",
           "Spell the word cat backwards, letter by letter:"]
NUM_GENERATIONS = 4
BRANCHES = 2
MAX_COMPLETION = 8
LEARNING_RATE = 2.0


def text_length_reward(completions, **kwargs):
    """A reward with spread inside each group: the completion's character count modulo 7."""
    return [float(len(text) % 7) for text in completions]


def tokenizer():
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    tok.padding_side = "left"
    return tok


def model(tok):
    """A tiny Llama with SmolLM2's vocabulary, sharpened so that positions and choices matter."""
    net = tiny_model("llama", vocab_size=len(tok), hidden_size=32, layers=2, heads=4, kv_heads=2, seed=3)
    with torch.no_grad():
        for layer in net.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
        net.lm_head.weight.mul_(20.0)
    return net


def config(output_dir: str, per_device: int) -> APPOConfig:
    return APPOConfig(output_dir=output_dir, per_device_train_batch_size=per_device,
                      num_generations=NUM_GENERATIONS, max_completion_length=MAX_COMPLETION, max_steps=2,
                      steps_per_generation=2, learning_rate=LEARNING_RATE, optim="sgd", lr_scheduler_type="constant",
                      shuffle_dataset=False, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                      bf16=False, seed=0, appo_branches_per_rollout=BRANCHES, appo_candidates="all")


def real_ids(ids: torch.Tensor, mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(ids[mask.bool()].tolist())


class RecordingTrainer(APPOTrainer):
    """Records, per micro-step, what APPO consumed and produced; and every generation and branch decoding."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[dict] = []
        self.generations: dict[tuple, list] = defaultdict(list)      # prompt ids -> completions, in order
        self.branch_log: dict[tuple, list] = defaultdict(list)       # (prompt, completion, pos) -> branches
        self._record: dict | None = None

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                              has_tool_images=False):
        completion_ids, logprobs = super()._generate_single_turn(prompt_ids, images, multimodal_fields,
                                                                 num_generations, has_tool_images)
        for prompt, completion in zip(prompt_ids, completion_ids):
            self.generations[tuple(prompt)].append(list(completion))
        return completion_ids, logprobs

    def _appo_consume(self, inputs):
        self._record = {"old": inputs.get("appo_old_logprobs")}
        output = super()._appo_consume(inputs)
        keep = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "appo_rewards",
                "advantages", "appo_base_advantages")
        self._record.update({key: output[key].detach().clone() for key in keep})
        self.records.append(self._record)
        return output

    def _appo_forward(self, inputs, *, keep_cache):
        stats, cache = super()._appo_forward(inputs, keep_cache=keep_cache)
        if keep_cache and self._record is not None:
            self._record["theta"] = stats.logprobs.clone()
        return stats, cache

    def _appo_branch_keys(self, inputs, plan) -> list[tuple]:
        return [(real_ids(inputs["prompt_ids"][r], inputs["prompt_mask"][r]),
                 real_ids(inputs["completion_ids"][r], inputs["completion_mask"][r]), p)
                for r, p in zip(plan.src.tolist(), plan.pos.tolist())]

    def _appo_decode_branches(self, inputs, cache, plan):
        branches = self._appo_branches(inputs, cache, plan)
        for key, branch in zip(self._appo_branch_keys(inputs, plan), branches):
            self.branch_log[key].append(branch)
        self._record.update(src=plan.src.clone(), pos=plan.pos.clone(), omega=plan.score.future_value.clone(),
                            entropy_only=plan.score.entropy_only.clone(), branches=branches)
        return branches

    def _appo_branches(self, inputs, cache, plan):
        return super()._appo_decode_branches(inputs, cache, plan)

    def _appo_score_branches(self, generation_rows, branch_ids, branch_completions=None):
        rewards = super()._appo_score_branches(generation_rows, branch_ids, branch_completions)
        self._record["branch_rewards"] = rewards.clone()
        return rewards


class ReplayTrainer(RecordingTrainer):
    """One process, fed the completions and branch continuations the ranks sampled (``generations``,
    ``branch_log`` merged over ranks); everything else (rewards, pi_old, pi_theta, branch points, advantages,
    loss, updates) is computed here. A branch point the ranks did not choose is a KeyError."""

    def __init__(self, *args, generations, branch_log, **kwargs):
        super().__init__(*args, **kwargs)
        self.replay_generations = {key: list(value) for key, value in generations.items()}
        self.replay_branches = {key: list(value) for key, value in branch_log.items()}

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                              has_tool_images=False):
        return [self.replay_generations[tuple(prompt)].pop(0) for prompt in prompt_ids], None

    def _appo_branches(self, inputs, cache, plan):
        return [self.replay_branches[key].pop(0) for key in self._appo_branch_keys(inputs, plan)]


def dataset(order: list[int]) -> Dataset:
    return Dataset.from_dict({"prompt": [PROMPTS[i] for i in order]})


def main(out_dir: str) -> None:
    tok = tokenizer()
    trainer = RecordingTrainer(model=model(tok), reward_funcs=text_length_reward,
                               args=config(os.path.join(out_dir, "run"), NUM_GENERATIONS),
                               train_dataset=dataset([0, 1, 2, 3]), processing_class=tok)
    trainer.train()
    rank = trainer.accelerator.process_index
    params = {name: p.detach().clone() for name, p in trainer.accelerator.unwrap_model(trainer.model)
              .named_parameters()}
    logs = [entry for entry in trainer.state.log_history if "appo/branches" in entry]
    torch.save({"rank": rank, "world": trainer.accelerator.num_processes,
                "distributed_type": str(trainer.accelerator.distributed_type), "records": trainer.records,
                "generations": dict(trainer.generations), "branch_log": dict(trainer.branch_log),
                "params": params, "logs": logs}, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
