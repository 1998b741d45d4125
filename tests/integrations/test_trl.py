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


# ------------------------------------------------------------------------------------------------ TRL tools
# A real tool-calling setup, offline: SmolLM2's tokenizer with the Qwen3-Instruct-2507 chat template that TRL
# ships (TRL recognises it, so `add_response_schema` gives it Qwen's tool-call parser), and a tiny Qwen2 model
# fine-tuned for a few seconds to answer every prompt with `<tool_call>{"name": "add", "arguments": {"a": x,
# "b": y}}</tool_call>` (x, y random digits: the high-entropy tokens where APPO branches), then "Done." after
# the tool result. TRL parses and executes the calls; APPO's branches run TRL's tool loop.

TOOL_PROMPTS = ["Add 13 and 29.", "What is 2 plus 5?", "Sum 7 and 8.", "Add two numbers."]
TOOL_MAX_COMPLETION = 64
TOOL_CALLS: list[tuple[int, int]] = []


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    TOOL_CALLS.append((a, b))
    return a + b


def tool_result_reward(completions, **kwargs):
    """The last tool result of each completion (a TRL message list), scaled to [0, 1]; 0 without one."""
    rewards = []
    for messages in completions:
        results = [m["content"] for m in messages if m.get("role") == "tool"]
        rewards.append(int(results[-1]) / 18 if results and results[-1].isdigit() else 0.0)
    return rewards


def _tool_call(a: int, b: int) -> dict:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}]}


@pytest.fixture(scope="module")
def tool_tokenizer():
    from trl.chat_template_utils import qwen3_instruct_2507_chat_template

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    tok.chat_template = qwen3_instruct_2507_chat_template
    tok.padding_side = "left"
    return tok


def _render(tok, messages, **kwargs):
    return tok.apply_chat_template(messages, tools=[add], tokenize=True, return_dict=False, **kwargs)


def _tool_calling_model(tok, steps=100):
    """Tiny Qwen2 fine-tuned (assistant tokens only) on user -> add(x, y) call -> tool result -> "Done."."""
    import math
    import random

    rng = random.Random(0)
    sequences = []
    for i in range(64):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        messages = [{"role": "user", "content": TOOL_PROMPTS[i % len(TOOL_PROMPTS)]}]
        prompt = _render(tok, messages, add_generation_prompt=True)
        messages += [_tool_call(a, b), {"role": "tool", "name": "add", "content": str(a + b)},
                     {"role": "assistant", "content": "Done."}]
        full = _render(tok, messages)
        call_end = len(_render(tok, messages[:2])) - 1              # through the call's <|im_end|>
        answer_start = len(_render(tok, messages[:3], add_generation_prompt=True))
        labels = [-100] * len(full)
        for j in [*range(len(prompt), call_end), *range(answer_start, len(full) - 1)]:
            labels[j] = full[j]
        sequences.append((full, labels))
    width = max(len(ids) for ids, _ in sequences)
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s, _ in sequences])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in sequences])
    model = tiny_model("qwen2", vocab_size=len(tok), hidden_size=64, layers=2, heads=4, kv_heads=2, seed=0)
    # Exact full-vocabulary cross-entropy at a fraction of the cost: lm_head rows outside the target tokens
    # are zero (logit 0), so their softmax mass is (V - |targets|) * e^0, one log term.
    targets = torch.tensor(sorted(set(labels[labels != -100].tolist())))
    remap = torch.full((len(tok),), -1, dtype=torch.long)
    remap[targets] = torch.arange(len(targets))
    with torch.no_grad():
        rows = model.lm_head.weight[targets].clone()
        model.lm_head.weight.zero_()
    head = torch.nn.Parameter(rows)
    rest = torch.tensor(math.log(len(tok) - len(targets)))
    body = [p for name, p in model.model.named_parameters() if "embed_tokens" not in name]
    optimizer = torch.optim.AdamW(body + [head], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(sequences), (8,), generator=generator)
        hidden = model.model(input_ids=ids[batch]).last_hidden_state[:, :-1]
        target = labels[batch][:, 1:]
        keep = target != -100
        logits = hidden[keep] @ head.T
        logsumexp = torch.logaddexp(torch.logsumexp(logits, dim=-1), rest)
        loss = (logsumexp - logits.gather(1, remap[target[keep]][:, None])[:, 0]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        model.lm_head.weight[targets] = head.detach()
    return model.eval()


class RecordingToolTrainer(APPOTrainer):
    """Records the branches before and after TRL's tool loop, and the tool calls the loop executed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def _appo_branch_tool_loop(self, output, rows, positions, branch_ids):
        calls_before = len(TOOL_CALLS)
        finished, completions = super()._appo_branch_tool_loop(output, rows, positions, branch_ids)
        self.records.append({
            "rows": rows.tolist(), "positions": positions.tolist(),
            "before": [list(ids) for ids in branch_ids], "after": finished, "completions": completions,
            "calls": TOOL_CALLS[calls_before:],
            "parent_ids": output["completion_ids"].clone(), "tool_mask": output["tool_mask"].clone()})
        return finished, completions

    def _appo_score_branches(self, rows, branch_ids, branch_completions=None):
        rewards = super()._appo_score_branches(rows, branch_ids, branch_completions)
        if self.records:
            self.records[-1]["branch_rewards"] = rewards.clone()
        return rewards


@pytest.fixture(scope="module")
def tool_trained(tmp_path_factory, tool_tokenizer):
    model = _tool_calling_model(tool_tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in TOOL_PROMPTS]})
    config = APPOConfig(output_dir=str(tmp_path_factory.mktemp("appo_trl_tools")),
                        per_device_train_batch_size=8, num_generations=NUM_GENERATIONS,
                        max_completion_length=TOOL_MAX_COMPLETION, max_steps=2, learning_rate=1e-4,
                        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                        seed=0, appo_branches_per_rollout=BRANCHES, appo_candidates="all")
    TOOL_CALLS.clear()
    trainer = RecordingToolTrainer(model=model, reward_funcs=tool_result_reward, args=config,
                                   train_dataset=dataset, processing_class=tool_tokenizer, tools=[add])
    trainer.train()
    return trainer, before


def test_tools_training_step_updates_parameters_and_logs_branches(tool_trained):
    trainer, before = tool_trained
    changed = [name for name, p in trainer.model.named_parameters()
               if not torch.equal(p.detach(), before[name])]
    assert len(changed) == len(before)
    logs = [entry for entry in trainer.state.log_history if "appo/branches" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["appo/branches"] > 0
        assert entry["tools/call_frequency"] > 0                    # TRL's own rollouts called the tool
    assert sum(entry["appo/branch_tool_calls"] for entry in logs) > 0


def test_branches_run_trls_tool_loop(tool_trained, tool_tokenizer):
    """Branch continuations that call `add` are executed by TRL's loop: the branch keeps its parent's prefix,
    then gains the call's result as tool tokens (rendered by the chat template) and a post-tool turn, and its
    reward is computed on the completed multi-turn message list."""
    trainer, _ = tool_trained
    assert len(trainer.records) == 2
    executed = 0
    for record in trainer.records:
        assert len(record["calls"]) > 0
        for k, (row, pos) in enumerate(zip(record["rows"], record["positions"])):
            before, after, messages = record["before"][k], record["after"][k], record["completions"][k]
            parent = record["parent_ids"][row].tolist()
            assert before[:pos] == parent[:pos]
            assert after[:len(before)] == before and len(after) <= TOOL_MAX_COMPLETION
            tools = [m for m in messages if m["role"] == "tool"]
            if len(after) == len(before):
                continue
            executed += 1
            call = messages[0]["tool_calls"][0]["function"]["arguments"]
            assert (call["a"], call["b"]) in record["calls"]
            assert tools[0]["content"] == str(call["a"] + call["b"])
            result = tool_tokenizer.decode(after[len(before):])
            assert f"<tool_response>\n{call['a'] + call['b']}\n</tool_response>" in result
            assert messages[-1]["role"] == "assistant"
            reward = float(record["branch_rewards"][k])
            assert reward == pytest.approx(int(tools[-1]["content"]) / 18)
    assert executed > 0


def test_branch_tool_rounds_count_toward_max_tool_calling_iterations(tool_trained, tool_tokenizer):
    """A branch whose prefix already holds one tool round has max_tool_calling_iterations - 1 rounds left."""
    trainer, _ = tool_trained
    tok = tool_tokenizer
    messages = [{"role": "user", "content": TOOL_PROMPTS[0]}]
    prompt = _render(tok, messages, add_generation_prompt=True)
    first = _render(tok, messages + [_tool_call(1, 2)])
    first = first[:len(first) - 1]                                       # drop the "\n" after <|im_end|>
    with_result = _render(tok, messages + [_tool_call(1, 2), {"role": "tool", "name": "add", "content": "3"}],
                          add_generation_prompt=True)
    second_call = _render(tok, messages + [_tool_call(1, 2), {"role": "tool", "name": "add", "content": "3"},
                                           _tool_call(3, 4)])[len(with_result):-1]
    completion = with_result[len(prompt):] + second_call
    tool_mask = ([1] * (len(first) - len(prompt)) + [0] * (len(with_result) - len(first))
                 + [1] * len(second_call))
    output = {"prompt_ids": torch.tensor([prompt]), "tool_mask": torch.tensor([tool_mask]),
              "prompt_mask": torch.ones(1, len(prompt), dtype=torch.long)}
    parent_messages = [_tool_call(1, 2), {"role": "tool", "name": "add", "content": "3"}, _tool_call(3, 4)]
    position = len(completion) - len(second_call) + 5                    # inside the second call
    saved = (trainer._appo_reward_context, trainer.max_tool_calling_iterations, trainer.max_completion_length)
    trainer._appo_reward_context = ([{"prompt": messages}], [messages], None, [parent_messages])
    trainer.max_completion_length = 4 * TOOL_MAX_COMPLETION           # room for a second tool round
    try:
        for limit, runs in ((1, False), (2, True)):
            trainer.max_tool_calling_iterations = limit
            TOOL_CALLS.clear()
            ids, completions = APPOTrainer._appo_branch_tool_loop(
                trainer, output, torch.tensor([0]), torch.tensor([position]), [list(completion)])
            assert trainer.max_tool_calling_iterations == limit          # restored
            assert completions[0][:2] == parent_messages[:2]             # the prefix's round, as it was
            assert completions[0][2]["tool_calls"][0]["function"]["arguments"] == {"a": 3, "b": 4}
            if runs:
                assert TOOL_CALLS == [(3, 4)]
                assert completions[0][3] == {"role": "tool", "name": "add", "content": "7"}
                assert ids[0][:len(completion)] == completion and len(ids[0]) > len(completion)
            else:
                assert TOOL_CALLS == [] and ids[0] == completion and len(completions[0]) == 3
    finally:
        (trainer._appo_reward_context, trainer.max_tool_calling_iterations,
         trainer.max_completion_length) = saved


def test_environment_factory_is_rejected(tmp_path, tool_tokenizer, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    class Counter:
        def reset(self, **kwargs):
            return None

        def increment(self, step: int) -> int:
            """Increment the counter.

            Args:
                step: How much to add.
            """
            return step

    model = tiny_model("qwen2", vocab_size=len(tool_tokenizer), hidden_size=16, layers=1, heads=2, kv_heads=1)
    config = APPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                        report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="environment_factory"):
        APPOTrainer(model=model, reward_funcs=tool_result_reward, args=config,
                    train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": "Hi"}]]}),
                    processing_class=tool_tokenizer, environment_factory=Counter)
