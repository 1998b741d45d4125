"""appo's own trainer on the conformance suite's tiny setup, for tests/integrations/test_conformance.py.

Imported by that test for the transformers backend, and run as a script in the vLLM side environment
(``python _conformance_appo.py SPEC.json OUT.json``, appo on PYTHONPATH) for ``rollout.backend=vllm``: both
go through ``run_trainer`` and return the same JSON report, which the test checks.

The tiny agent: SmolLM2's tokenizer and a tiny Llama (2 layers, hidden 64, head size 32 as vLLM's CPU
attention needs) fine-tuned for a few seconds on "Add a and b." -> ``<calculator>x+y</calculator>`` with
random digits (the high-entropy tokens where APPO branches), the result block, then ``<answer>w</answer>``
with a random digit. It is trained to write the result block itself (labels on it): the attack of a path that
does not stop at the closing tag, where the model's own text would stand where the tool's output belongs. The
tool (``Adder``, tag "calculator") records every call it runs.

One Trainer runs two steps of 2 prompts x N = 4 rollouts, B = 2 (M = 12), two mini-batches of one prompt each:
step 1 with learning rate 0, step 2 with ``LEARNING_RATE``. Per mini-batch the report holds the trainer's
branching record, the branch rows' recorded log-probs against a forward of the weights the trainer holds then
and of the weights that sampled the step, every tool call, and every trajectory's reward against the task
reward of its graded text recomputed here.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from appo.tools.base import Tool

N, B = 4, 2
M = (B + 1) * N
PROMPTS = [(1, 2), (3, 4)]          # "Add a and b." with gold a + b
LEARNING_RATE = 1e-3
TEMPERATURE = 1.0
RESULT_TEMPLATE = "<result>\n{result}\n</result>\n"   # rollout.result_template of the run


class Adder(Tool):
    """The calculator tool of the setup: ``x+y`` of two integers -> their sum, anything else an error. Records
    every call it runs as (query, output) in ``log``."""

    name = tag = "calculator"
    parallel = False

    def __init__(self):
        self.log: list[tuple[str, str]] = []

    def run(self, text: str) -> str:
        match = re.fullmatch(r"\s*(\d+)\s*\+\s*(\d+)\s*", text)
        output = str(int(match.group(1)) + int(match.group(2))) if match else "Error: expected x+y"
        self.log.append((text, output))
        return output


@dataclass
class Graded:
    score: float
    correct: float


class SumTask:
    """Reward of a graded text: appo's arithmetic rule (1 for the gold sum in <answer>, -0.1 when malformed)
    plus 0.01 x the graded text's length, a tie-breaker so that every group has reward spread."""

    def reward(self, response: str, example) -> Graded:
        from appo.tasks import Arithmetic

        graded = Arithmetic().reward(response, example)
        return Graded(graded.score + 0.01 * len(response), graded.correct)


def response_ids(tok, x: int, y: int, w: int) -> list[int]:
    """Token ids of ``<calculator>x+y</calculator>`` + the result block of x + y (as the engine appends it:
    ``RolloutConfig.result_template``'s pieces and the output encoded apart) + ``<answer>w</answer>`` + EOS,
    so that training sees the token boundaries the engine makes."""
    before, after = RESULT_TEMPLATE.split("{result}")
    pieces = [f"<calculator>{x}+{y}</calculator>", before, str(x + y), after, f"<answer>{w}</answer>"]
    return [i for piece in pieces for i in tok.encode(piece, add_special_tokens=False)] + [tok.eos_token_id]


def prompt_text(a: int, b: int) -> str:
    return f"Add {a} and {b}.\n"


def train_agent(out_dir: str, steps: int = 150) -> str:
    """Fine-tune the tiny agent (module docstring); save it with its tokenizer in ``out_dir``, returned."""
    from transformers import AutoTokenizer

    from appo.models import smollm2_path, tiny_model

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    rng = random.Random(0)
    sequences = []
    for _ in range(96):
        a, b, x, y, w = (rng.randint(1, 4) for _ in range(5))
        prompt = tok.encode(prompt_text(a, b), add_special_tokens=False)
        response = response_ids(tok, x, y, w)
        sequences.append((prompt + response, [-100] * len(prompt) + response))
    net = tiny_model("llama", vocab_size=len(tok), hidden_size=64, layers=2, heads=2, kv_heads=1, seed=0)
    fit_on_labels(net, tok, sequences, steps, batch_size=16)
    net.config._attn_implementation = "sdpa"
    net.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def fit_on_labels(net, tok, sequences, steps: int, batch_size: int) -> None:
    """Fine-tune the tiny causal LM ``net`` in place (also for _trl_ranks.py's tool-calling model): ``steps``
    AdamW steps (lr 1e-2, one torch thread) on random batches of ``batch_size`` of ``sequences``, (token ids,
    labels) pairs with -100 where no loss is taken, right-padded with ``tok``'s pad token.

    Exact full-vocabulary cross-entropy at a fraction of the cost: lm_head rows outside the target tokens are
    zero (logit 0), so their softmax mass is (V - |targets|) * e^0, one log term."""
    width = max(len(ids) for ids, _ in sequences)
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s, _ in sequences])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in sequences])
    targets = torch.tensor(sorted(set(labels[labels != -100].tolist())))
    remap = torch.full((len(tok),), -1, dtype=torch.long)
    remap[targets] = torch.arange(len(targets))
    with torch.no_grad():
        rows = net.lm_head.weight[targets].clone()
        net.lm_head.weight.zero_()
    head = torch.nn.Parameter(rows)
    rest = torch.tensor(math.log(len(tok) - len(targets)))
    body = [p for name, p in net.model.named_parameters() if "embed_tokens" not in name]
    optimizer = torch.optim.AdamW(body + [head], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # a tiny model: one thread is fastest, and kindest to a shared machine
    net.train()
    try:
        _fit(net, head, rest, remap, ids, labels, optimizer, generator, steps, batch_size)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        net.lm_head.weight[targets] = head.detach()


def _fit(net, head, rest, remap, ids, labels, optimizer, generator, steps: int, batch_size: int) -> None:
    """``steps`` AdamW steps of the restricted-head cross-entropy on batches of ``batch_size`` sequences."""
    for _ in range(steps):
        batch = torch.randint(0, ids.shape[0], (batch_size,), generator=generator)
        hidden = net.model(input_ids=ids[batch]).last_hidden_state[:, :-1]
        target = labels[batch][:, 1:]
        keep = target != -100
        logits = hidden[keep] @ head.T
        logsumexp = torch.logaddexp(torch.logsumexp(logits, dim=-1), rest)
        loss = (logsumexp - logits.gather(1, remap[target[keep]][:, None])[:, 0]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


# ---------------------------------------------------------------------------------------------- the run
def _config(spec: dict):
    from appo.config import from_dict

    rollout = {"backend": spec["backend"], "temperature": TEMPERATURE, "response_prefix": "",
               "result_template": RESULT_TEMPLATE,
               "max_new_tokens_per_turn": 24, "max_total_tokens": 96, "max_prompt_tokens": 32,
               "max_tool_calls": 2}
    if spec["backend"] == "vllm":
        rollout["vllm"] = {"enforce_eager": True}
    return from_dict({"seed": 0, "steps": 2, "prompts_per_step": len(PROMPTS), "threads": 1, "device": "cpu",
                      "output_dir": spec["output_dir"], "eval_at_end": False,
                      "model": {"name_or_path": spec["model"]},
                      "algo": {"name": "appo", "rollouts_per_prompt": M, "initial_rollouts": N,
                               "appo": {"branches_per_rollout": B}},
                      "optim": {"lr": 0.0, "minibatches_per_step": 2, "grad_accumulation": 1},
                      "rollout": rollout})


def _new_token_logprobs(model, batch, weights=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(recorded, recomputed) fp32 log-probs of the branch rows' newly decoded tokens (generated positions
    from each row's branch point on): the engine's recorded ones, and a forward of ``model`` (with
    ``weights`` loaded into a copy when given)."""
    import copy

    from appo.trainer import policy_token_stats

    net = model
    if weights is not None:
        net = copy.deepcopy(model)
        net.load_state_dict(weights)
    with torch.no_grad():
        logprobs = policy_token_stats(net, batch, TEMPERATURE, use_cache=False).logprobs
    positions = torch.arange(batch.tokens.shape[1])[None, :]
    new = batch.mask & (positions >= batch.branch_pos[:, None])
    return batch.behaviour_logprobs[new].float(), logprobs[new].float()


def _trajectories(batch, task, examples, tokenizer) -> list[dict]:
    """Per row: its reward; the task reward of its graded text recomputed here from the row's tokens and mask;
    that text, with its count of closing tags the model wrote and of the engine's (empty) result blocks; its
    tool calls, ``new`` where this row ran the call (a branch copies its prefix's calls without running
    them)."""
    from appo.rollout.tool_loop import RESULT_BLOCK, graded_text

    out = []
    for r in range(batch.num_rollouts):
        start, end = int(batch.prompt_lengths[r]), int(batch.lengths[r])
        text = graded_text(tokenizer, batch.tokens[r, start:end], batch.mask[r, start:end])
        example = examples[int(batch.group_ids[r])]
        branch_pos = int(batch.branch_pos[r])
        calls = [{"query": c.query, "result": c.result, "new": c.result_span[1] > branch_pos}
                 for c in batch.tool_calls[r]]
        out.append({"reward": float(batch.rewards[r]), "regraded": task.reward(text, example).score,
                    "text": text, "calls": calls, "parent": int(batch.parent[r]),
                    "closing_tags": text.count("</calculator>"), "result_blocks": text.count(RESULT_BLOCK)})
    return out


def run_trainer(spec: dict) -> dict:
    """Two steps of appo's Trainer on ``spec["backend"]`` ("transformers" or "vllm") from the agent saved in
    ``spec["model"]``; returns the JSON report described in the module docstring."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appo.tasks import Example
    from appo.trainer import TaskData, Trainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    examples = [Example(id=str(i), question=prompt_text(a, b), answer=str(a + b))
                for i, (a, b) in enumerate(PROMPTS)]
    task = SumTask()
    prompts = [tokenizer.encode(e.question, add_special_tokens=False) for e in examples]
    data = TaskData(task, examples, prompts)
    tool = Adder()
    trainer = Trainer(_config(spec), model=model, tokenizer=tokenizer, train_data=data,
                      tools={"calculator": tool})
    algorithm = trainer.algorithm
    rollouts, advantages = algorithm.rollouts, algorithm.advantages
    state: dict = {}

    def recording_rollouts(ctx, prompts, groups):
        state["sampler"] = copy.deepcopy(trainer.model.state_dict())
        batch, info = rollouts(ctx, prompts, groups)
        state["initial"] = batch
        return batch, info

    def recording_advantages(ctx, index, sub, forward, old):
        result, info = advantages(ctx, index, sub, forward, old)
        branches = info.get("branch_batch")
        entry = {"index": index, "branches": 0}
        if branches is not None:
            recorded, current = _new_token_logprobs(trainer.model, branches)
            _, sampler = _new_token_logprobs(trainer.model, branches, state["sampler"])
            entry.update(branches=branches.num_rollouts, new_tokens=int(recorded.numel()),
                         error_current=float((recorded - current).abs().max()),
                         error_sampler=float((recorded - sampler).abs().max()),
                         mean_shift=float((current - sampler).mean()))
            state.setdefault("branch_batches", []).append(branches)
        state["minibatches"].append(entry)
        return result, info

    next_examples = trainer.next_examples

    def recording_next_examples():
        indices = next_examples()
        state["examples"] = [examples[i] for i in indices]             # group id -> example, this step
        return indices

    algorithm.rollouts, algorithm.advantages = recording_rollouts, recording_advantages
    trainer.next_examples = recording_next_examples
    threads = torch.get_num_threads()       # the Trainer sets its own (config.threads); restored after
    try:
        steps = _steps(trainer, tool, task, tokenizer, state)
    finally:
        torch.set_num_threads(threads)
    return {"backend": type(trainer.engine).__name__, "steps": steps}


def _steps(trainer, tool, task, tokenizer, state) -> list[dict]:
    """Step 1 with learning rate 0, step 2 with LEARNING_RATE; per step what ``run_trainer`` reports."""
    steps = []
    for rate in (0.0, LEARNING_RATE):
        for group in trainer.optimizer.param_groups:
            group["lr"] = rate
        state.update(minibatches=[], branch_batches=[])
        calls_before = len(tool.log)
        metrics = trainer.step()
        rows = _trajectories(state["initial"], task, state["examples"], tokenizer)
        for branches in state["branch_batches"]:
            rows += _trajectories(branches, task, state["examples"], tokenizer)
        groups = [int(g) for g in state["initial"].group_ids]
        for branches in state["branch_batches"]:
            groups += [int(g) for g in branches.group_ids]
        steps.append({"lr": rate, "metrics": metrics, "minibatches": state["minibatches"],
                      "branching": [record["branching"] for record in trainer.micro_records],
                      "trajectories_per_group": [groups.count(g) for g in sorted(set(groups))],
                      "trajectories": rows, "tool_log": tool.log[calls_before:]})
    for step in steps:
        for record in step["branching"]:
            record.pop("branch_batch", None)
    return steps


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        report = run_trainer(json.load(handle))
    Path(sys.argv[2]).write_text(json.dumps(report, default=float))
