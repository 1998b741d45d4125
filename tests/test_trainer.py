"""The training loop end to end on a tiny random model, a character tokenizer and a toy task (CPU)."""

import json
import string
from dataclasses import dataclass

import pytest
import torch

from appo.config import load_config
from appo.models import tiny_model
from appo.tools.base import Tool
from appo.trainer import TaskData, train

SPECIALS = ["<pad>", "<bos>", "<eos>", "<python>", "</python>", "<answer>", "</answer>", "<result>",
            "</result>"]


class CharTokenizer:
    """Whole-tag tokens (pad 0, eos 2) plus one token per printable character."""

    def __init__(self):
        self.vocab = SPECIALS + list(string.printable[:95]) + ["\n"]
        self.ids = {tok: i for i, tok in enumerate(self.vocab)}
        self.pad_token_id, self.eos_token_id = 0, 2

    def encode(self, text, add_special_tokens=False, **options):
        ids, i = [], 0
        while i < len(text):
            piece = next((t for t in SPECIALS if text.startswith(t, i)), text[i])
            ids.append(self.ids[piece])
            i += len(piece)
        return ids

    def decode(self, ids, skip_special_tokens=False, **options):
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i in (0, 1, 2)))


class Echo(Tool):
    name = tag = "python"

    def run(self, text):
        return text[::-1]


@dataclass
class Graded:
    score: float
    correct: float


class VowelTask:
    """Reward: the share of vowels in the response, so rewards differ between rollouts."""

    def reward(self, response, example):
        share = sum(ch in "aeiou" for ch in response) / max(len(response), 1)
        return Graded(share, float(share > 0.05))


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
    ("appo", [*SMALL, "algo.branch_when=once_per_step", "algo.per=group", "algo.entropy_only=true",
              "algo.kl_coef=0.1", "algo.combine=sum", "algo.include_token=true"]),
    ("grpo", SMALL),
    ("arpo", [*SMALL, "algo.arpo_k=3"]),
])
def test_each_algorithm_trains_and_logs(tmp_path, algo, extra):
    config, model, metrics = run(tmp_path, algo, [f"algo.algo={algo}", *extra], steps=1,
                                 num_prompts=3 if not extra else 5)
    out = tmp_path / algo
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert (out / "curves.png").stat().st_size > 0 and (out / "checkpoints" / "latest").is_file()
    last = records[-1]
    assert last["loss/tokens"] > 0 and last["grad_norm"] > 0
    expected_rows = config.prompts_per_step * (config.algo.M if algo in ("grpo", "arpo") else config.algo.N)
    assert last["rollouts"] >= expected_rows
    if algo == "appo":
        # At most B = 1 branch per initial rollout; the branches are rolled out and rewarded.
        assert 0 < last["branches"] <= config.prompts_per_step * config.algo.N
        assert last["rollouts"] == expected_rows + last["branches"]
    if algo == "arpo":
        assert last["rollouts"] == config.prompts_per_step * config.algo.M  # fresh rollouts fill the budget
    assert all(torch.isfinite(p).all() for p in model.parameters())


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


@pytest.mark.slow
def test_one_appo_step_raises_the_logprob_of_the_best_rollout(tmp_path):
    """After one APPO step, the best-rewarded initial rollout is more likely and the worst less likely."""
    import copy

    from appo.trainer import Trainer, policy_token_stats

    tokenizer = CharTokenizer()
    config = load_config(None, [f"output_dir={tmp_path}", "steps=1", "device=cpu", "rollout.temperature=1.0",
                                "rollout.response_prefix=''", "rollout.max_new_tokens_per_turn=12",
                                "rollout.max_total_tokens=24", "rollout.max_prompt_tokens=8", "optim.lr=3e-3",
                                "prompts_per_step=1", "optim.minibatches_per_step=1",
                                "optim.grad_accumulation=1", "algo.N=4", "algo.B=1", "algo.M=8",
                                "eval_at_end=false"])
    prompts = [tokenizer.encode("hello")]
    model = tiny_model("llama", vocab_size=len(tokenizer.vocab), hidden_size=32, heads=2, kv_heads=1, seed=3)
    before = copy.deepcopy(model)
    trainer = Trainer(config, model=model, tokenizer=tokenizer, train_data=TaskData(VowelTask(), [None], prompts),
                      tools={"python": Echo()})
    captured = []
    generate = trainer.engine.generate
    trainer.engine.generate = lambda *args, **kw: captured.append(generate(*args, **kw)) or captured[-1]
    metrics = trainer.step()
    batch = captured[0]
    assert metrics["branches"] > 0 and len(set(batch.rewards.tolist())) > 1

    def sequence_logprob(policy):
        with torch.no_grad():
            logprobs, _, _ = policy_token_stats(policy, batch, 1.0, use_cache=False)
        return (logprobs * batch.mask).sum(dim=1)

    change = sequence_logprob(trainer.model) - sequence_logprob(before)
    best, worst = int(batch.rewards.argmax()), int(batch.rewards.argmin())
    assert change[best] > 0 > change[worst]
