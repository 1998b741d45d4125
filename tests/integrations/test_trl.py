"""APPOTrainer inside TRL 1.16: real training runs of tiny models on CPU, in one process and in two.

The runs live in tests/integrations/_trl_ranks.py (shared with test_conformance.py, cached for the session).
The plain run shares SmolLM2's tokenizer (vocab 49152) so TRL tokenises and decodes real text; the reward is a
deterministic function of the completion text with spread inside each group. One generation of 4 prompts x 4
completions, in slices of 2 prompts, feeds four optimizer steps (steps_per_generation 2, num_iterations 2):
the first slice branches before any update (pi_theta == pi_old: the entropy-only fallback, bit for bit), the
second after one (a real policy shift); the second pass over both branches nothing and keeps their base
advantages.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'appo[trl]'")

from datasets import Dataset

from appo.algos.chain import BranchPlan
from appo.integrations.trl import APPOConfig, APPOTrainer
from appo.models import tiny_model

sys.path.insert(0, str(Path(__file__).parent))
import _trl_ranks as ranks_helper  # one module, one run cache, for every test file

NUM_GENERATIONS = ranks_helper.NUM_GENERATIONS
BRANCHES = ranks_helper.BRANCHES
MAX_COMPLETION = ranks_helper.MAX_COMPLETION
M = (BRANCHES + 1) * NUM_GENERATIONS
GAMMA = 2 ** (-1 / 32)
text_length_reward = ranks_helper.text_length_reward


@pytest.fixture(scope="module")
def tokenizer():
    return ranks_helper.tokenizer()


@pytest.fixture(scope="module")
def trained():
    return ranks_helper.plain_run()


def _branched(trainer):
    return [record for record in trainer.records if not record["reused"]]


def test_training_step_updates_parameters(trained):
    trainer, before = trained
    changed = [name for name, p in trainer.model.named_parameters()
               if not torch.equal(p.detach(), before[name])]
    assert len(changed) == len(before)


def test_every_prompt_gets_exactly_its_branch_budget(trained):
    """Each slice branches once per generation, at its first consumption: B x N branches per prompt, so
    M = (B + 1) x N trajectories per prompt over the whole run, though each slice trains twice."""
    trainer, _ = trained
    assert [record["reused"] for record in trainer.records] == [False, False, True, True]
    for record in _branched(trainer):
        groups = record["src"] // NUM_GENERATIONS
        assert torch.bincount(groups, minlength=2).tolist() == [BRANCHES * NUM_GENERATIONS] * 2
    counts = ranks_helper.trajectories_per_prompt(trainer.generations, trainer.branch_log)
    assert len(counts) == len(ranks_helper.PROMPTS) and set(counts.values()) == {M}
    logs = [entry for entry in trainer.state.log_history if "appo/branches" in entry]
    assert [entry["appo/branches"] for entry in logs] == [2 * BRANCHES * NUM_GENERATIONS] * 2
    assert [entry["appo/rollouts_per_prompt"] for entry in logs] == [M, M]


def test_branching_before_any_update_is_entropy_only_bit_for_bit(trained):
    """The first slice is consumed before the optimizer step: appo's pi_old (recorded at generation) and
    pi_theta (at consumption) come from the same forward of the same weights, so Omega is exactly 1, every row
    uses the entropy-only fallback and A_fut is exactly 1 (A = A_base * (1 + b))."""
    trainer, _ = trained
    record = trainer.records[0]
    assert record["old"] is not None and torch.equal(record["old"], record["theta"])
    mask = record["completion_mask"].bool()
    assert bool((record["omega"][mask] == 1.0).all())
    assert bool(record["entropy_only"].all())
    assert torch.equal(record["advantages"], record["appo_base_advantages"] * 1.5)
    log = next(entry for entry in trainer.state.log_history if "appo/branches" in entry)
    assert log["appo/entropy_only_fraction"] == 1.0 and log["appo/omega_max_shift"] == 0.0


def _reference_future_value(logprobs, old, mask, gamma=GAMMA, lo=None, hi=None):
    """fp64 exp(sum_{k >= i} gamma^(k - i) (l_k - l_old_k) m_k), clamped to [-20, 20] before exp, one position
    at a time (clipped to [lo, hi] when given)."""
    delta = (logprobs.double() - old.double()) * mask
    running = torch.zeros(delta.shape[0], dtype=torch.float64)
    out = torch.zeros_like(delta)
    for i in reversed(range(delta.shape[1])):
        running = delta[:, i] + gamma * running
        out[:, i] = running.clamp(-20, 20).exp()
    return out.clamp(lo, hi) if lo is not None else out


def test_branching_after_an_update_measures_the_policy_shift(trained):
    """The second slice is consumed after one optimizer step: Omega is pi_theta (the updated policy) against
    pi_old (the policy that sampled), both in appo's forward, so it moves away from 1 and some rows get a real
    Branching Score."""
    trainer, _ = trained
    record = trainer.records[1]
    mask = record["completion_mask"].bool()
    assert not torch.equal(record["old"], record["theta"])
    expected = _reference_future_value(record["theta"], record["old"], mask)
    torch.testing.assert_close(record["omega"].double()[mask], expected[mask], rtol=1e-4, atol=1e-5)
    assert (record["omega"][mask] - 1).abs().max() > 1e-2
    assert not bool(record["entropy_only"].all())
    log = [entry for entry in trainer.state.log_history if "appo/branches" in entry][1]
    assert log["appo/entropy_only_fraction"] < 1.0 and log["appo/omega_max_shift"] > 1e-2


def test_branches_decode_from_the_policy_the_trainer_holds(trained):
    """The branch tokens are sampled by the model the trainer holds at that micro-step: before any update it
    is the sampling policy itself; after one, the tokens are more likely under it than under the policy that
    sampled the generation (mean log-ratio > 0, an estimate of KL(current || sampler); tokens from the stale
    policy would give a negative mean)."""
    trainer, _ = trained
    first, second = _branched(trainer)
    assert torch.equal(first["branch_logprobs_current"], first["branch_logprobs_sampler"])
    shift = second["branch_logprobs_current"] - second["branch_logprobs_sampler"]
    assert shift.numel() >= 2 * BRANCHES * NUM_GENERATIONS and shift.mean() > 0.1


def _reference_advantages(record, b=0.5):
    """fp64 loop form of METHOD.md's dual-group advantages times (1 + b * A_fut), A_fut = clip(Omega, 1, 1.2)
    of this micro-step's pi_theta against pi_old."""
    mask = record["completion_mask"].bool()
    rewards = record["appo_rewards"].double()
    branch_rewards = record["branch_rewards"].double()
    rows, positions = record["src"].tolist(), record["pos"].tolist()
    future = _reference_future_value(record["theta"], record["old"], mask, lo=1.0, hi=1.2)
    num_rows, width = mask.shape
    out = torch.zeros(num_rows, width, dtype=torch.float64)

    def zscore(values):
        return (values - values.mean()) / (values.std(correction=0) + 1e-6)

    for group_start in range(0, num_rows, NUM_GENERATIONS):
        members = list(range(group_start, group_start + NUM_GENERATIONS))
        a_init = zscore(rewards[members])
        branch_ids = [k for k, r in enumerate(rows) if r in members]
        a_br = zscore(branch_rewards[branch_ids])
        for j, n in enumerate(members):
            for i in range(width):
                if not mask[n, i]:
                    continue
                shared = [a_br[m] for m, k in enumerate(branch_ids) if rows[k] == n and positions[k] > i]
                base = a_init[j] if not shared else 0.5 * (a_init[j] + sum(shared) / len(shared))
                out[n, i] = base * (1 + b * future[n, i])
    return out


def test_advantages_match_dual_group_reference(trained):
    trainer, _ = trained
    for record in _branched(trainer):
        expected = _reference_advantages(record)
        assert record["advantages"].shape == record["completion_mask"].shape
        torch.testing.assert_close(record["advantages"].double(), expected, atol=1e-5, rtol=1e-5)
        # some token got credit from a branch (differs from its row's broadcast initial advantage)
        base = record["appo_base_advantages"]
        assert (base != base[:, :1]).any()


def test_later_passes_keep_the_base_advantages_and_move_only_a_fut(trained):
    """num_iterations = 2: the second pass over each slice branches nothing, trains on the base advantages
    computed at the slice's branching (bit for bit), scaled by A_fut of the policy of that pass against pi_old
    (a no-grad forward of the moved policy)."""
    trainer, _ = trained
    for first, again in zip(trainer.records[:2], trainer.records[2:]):
        assert again["reused"] and "src" not in again
        assert torch.equal(again["completion_ids"], first["completion_ids"])
        assert torch.equal(again["appo_base_advantages"], first["appo_base_advantages"])
        mask = again["completion_mask"].bool()
        assert torch.equal(again["old"], first["old"]) and not torch.equal(again["theta"], first["theta"])
        future = _reference_future_value(again["theta"], again["old"], mask, lo=1.0, hi=1.2)
        expected = again["appo_base_advantages"].double() * (1 + 0.5 * future)
        torch.testing.assert_close(again["advantages"].double(), expected, atol=1e-5, rtol=1e-5)
    logs = [entry for entry in trainer.state.log_history if "appo/omega_mean" in entry]
    assert len(logs) == 4 and all("appo/branches" not in entry for entry in logs[2:])
    assert min(entry["appo/omega_max_shift"] for entry in logs[2:]) > 1e-2


def test_initial_rewards_are_this_batch_rows(trained, tokenizer):
    trainer, _ = trained
    for record in trainer.records:
        texts = tokenizer.batch_decode(record["completion_ids"], skip_special_tokens=True)
        assert record["appo_rewards"].tolist() == text_length_reward(texts)


def test_branches_continue_their_parent_prefix(trained):
    trainer, _ = trained
    for record in _branched(trainer):
        points = zip(record["src"].tolist(), record["pos"].tolist(), record["branches"])
        for row, pos, branch in points:
            assert branch[:pos] == record["completion_ids"][row, :pos].tolist()
            assert pos < len(branch) <= MAX_COMPLETION


def test_cached_branch_decoding_matches_full_prefill(trained):
    """Greedy branches decoded from the gathered prefix caches are greedy under a full, unpadded prefill of
    the same prefix: each new token's logit is the maximum (up to float noise) of the prefill logits."""
    trainer, _ = trained
    record = trainer.records[-1]
    inputs = {key: record[key] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    rows, positions = torch.tensor([0, 3, 5, 6]), torch.tensor([2, 1, 4, 3])
    plan = BranchPlan(rows, positions, positions, None, 4, 0, 0)
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainer.generation_config.do_sample = False
    try:
        _, cache = trainer._appo_forward(inputs, keep_cache=True)
        branches = APPOTrainer._appo_decode_branches(trainer, inputs, cache, plan)
    finally:
        trainer.generation_config.do_sample = True
    checked = 0
    for k, (row, pos) in enumerate(zip(rows.tolist(), positions.tolist())):
        assert branches[k][:pos] == record["completion_ids"][row, :pos].tolist()
        prompt = record["prompt_ids"][row][record["prompt_mask"][row].bool()].tolist()
        sequence = torch.tensor([prompt + branches[k]])
        with torch.no_grad():
            logits = model(input_ids=sequence).logits[0].double()
        spread = logits.std(dim=-1).mean()
        for j in range(pos, len(branches[k])):
            step = logits[len(prompt) + j - 1]
            assert step[branches[k][j]] >= step.max() - 1e-3 * spread
            checked += 1
    assert checked >= len(rows)


@pytest.mark.parametrize("per_device, steps_per_generation, num_iterations, accumulation", [
    (2 * NUM_GENERATIONS, 1, 3, 1),          # TRL's on-policy layout, three passes: 3 micro-steps
    (NUM_GENERATIONS, 4, 1, 2)])             # 4 slices, 2 accumulated per optimizer step: 4 micro-steps
def test_every_layout_samples_exactly_m_per_prompt(tmp_path, tokenizer, per_device, steps_per_generation,
                                                  num_iterations, accumulation):
    """Whatever steps_per_generation, num_iterations and gradient accumulation, one generation's slices branch
    once each: completions + branches = M per prompt, and only first consumptions branch."""
    config = ranks_helper.config(str(tmp_path), per_device, num_iterations=num_iterations,
                                 steps_per_generation=steps_per_generation, accumulation=accumulation)
    trainer = ranks_helper.RecordingTrainer(model=ranks_helper.model(tokenizer),
                                            reward_funcs=text_length_reward, args=config,
                                            train_dataset=ranks_helper.dataset([0, 1, 2, 3]),
                                            processing_class=tokenizer)
    trainer.train()
    micro_steps = steps_per_generation * num_iterations
    assert [r["reused"] for r in trainer.records] == [i >= steps_per_generation for i in range(micro_steps)]
    counts = ranks_helper.trajectories_per_prompt(trainer.generations, trainer.branch_log)
    prompts = per_device * steps_per_generation // NUM_GENERATIONS
    assert len(counts) == prompts and set(counts.values()) == {M}


@pytest.mark.parametrize("steps_per_generation, num_iterations, accumulation, warned", [
    (1, 1, 1, True), (1, 2, 1, True), (2, 1, 2, True), (2, 3, 3, True), (2, 1, 1, False), (2, 2, 1, False),
    (3, 1, 2, False), (2, 1, 3, False)])
def test_entropy_only_by_construction_is_warned(tmp_path, tokenizer, caplog, steps_per_generation,
                                                num_iterations, accumulation, warned):
    """When every slice is branched (first consumed) before an optimizer step of its generation, pi_theta ==
    pi_old at every branching: the trainer says so. num_iterations > 1 does not change that (its later passes
    do not branch); a generation spanning an optimizer step does."""
    config = APPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                        steps_per_generation=steps_per_generation, num_iterations=num_iterations,
                        gradient_accumulation_steps=accumulation, report_to="none", use_cpu=True, bf16=False)
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=16, layers=1, heads=2, kv_heads=1)
    with caplog.at_level(logging.WARNING, logger="appo.integrations.trl"):
        APPOTrainer(model=model, reward_funcs=text_length_reward, args=config,
                    train_dataset=Dataset.from_dict({"prompt": ["Hi"]}), processing_class=tokenizer)
    assert ("entropy-only" in caplog.text) == warned


def test_config_defaults_to_two_updates_per_generation(tmp_path):
    config = APPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                        gradient_accumulation_steps=3, report_to="none", use_cpu=True)
    assert config.steps_per_generation == 6


def test_trainer_needs_an_appo_config(tmp_path, tokenizer):
    from trl import GRPOConfig

    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=16, layers=1, heads=2, kv_heads=1)
    config = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                        report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="args: APPOTrainer needs an APPOConfig"):
        APPOTrainer(model=model, reward_funcs=text_length_reward, args=config,
                    train_dataset=Dataset.from_dict({"prompt": ["Hi"]}), processing_class=tokenizer)


def test_micro_batches_must_hold_whole_groups(tmp_path, tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=16, layers=1, heads=2, kv_heads=1)
    config = APPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=4,
                        report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="per_device_train_batch_size: must be a multiple of num_gen"):
        APPOTrainer(model=model, reward_funcs=text_length_reward, args=config,
                    train_dataset=Dataset.from_dict({"prompt": ["Hi"]}), processing_class=tokenizer)


@pytest.mark.parametrize("field, value", [("appo_combine", "mean"), ("appo_branches_per_rollout", -1),
                                          ("appo_bs_gamma", 0.0), ("appo_fut_gamma", 1.5),
                                          ("appo_candidates", "some"), ("appo_select_per", "prompt"),
                                          ("appo_shift_tolerance", -1.0)])
def test_config_rejects_bad_appo_fields(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        APPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **{field: value})


def test_config_rejects_a_bad_clip_naming_its_fields(tmp_path):
    with pytest.raises(ValueError, match="^appo_bs_clip_low/high:"):
        APPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, appo_bs_clip_low=1.3)
    with pytest.raises(ValueError, match="^appo_fut_clip_low/high:"):
        APPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, appo_fut_clip_high=0.5)


def test_bs_and_future_settings_are_separate(tmp_path):
    config = APPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, appo_bs_gamma=1.0,
                        appo_bs_clip_low=0.8, appo_fut_gamma=2 ** (-1 / 64))
    settings = config.appo_settings()
    assert (settings.bs_gamma, settings.bs_clip) == (1.0, (0.8, 1.2))
    assert (settings.fut_gamma, settings.fut_clip) == (2 ** (-1 / 64), (1.0, 1.2))


# ------------------------------------------------------------------------------------ two processes (DDP)
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The plain run under ``torchrun --nproc_per_node 2`` (gloo on CPU, MULTI_CPU), then the same prompts,
    completions, branch continuations and rewards replayed in one process with twice the micro-batch."""
    runs = ranks_helper.two_process_runs()
    ranks = runs["train"]
    generations, branch_log = {}, {}
    for rank in ranks:
        generations.update(rank["generations"])
        for key, value in rank["branch_log"].items():
            branch_log.setdefault(key, []).extend(value)
    tok = ranks_helper.tokenizer()
    # One process, micro-batch 8: its slices hold rank 0's and rank 1's groups of the same step side by side.
    replay = ranks_helper.ReplayTrainer(
        model=ranks_helper.model(tok), reward_funcs=text_length_reward,
        args=ranks_helper.config(str(tmp_path_factory.mktemp("replay")), 2 * NUM_GENERATIONS),
        train_dataset=ranks_helper.dataset([0, 2, 1, 3]), processing_class=tok, generations=generations,
        branch_log=branch_log)
    replay.train()
    print(f"two-process launch (three jobs): {runs['seconds']:.1f} s")
    return ranks, replay


@pytest.mark.slow
def test_two_processes_keep_identical_parameters(two_ranks):
    ranks, _ = two_ranks
    assert [rank["world"] for rank in ranks] == [2, 2]
    assert ranks[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name


@pytest.mark.slow
def test_both_ranks_branch_their_own_groups_once_per_generation(two_ranks, tokenizer):
    ranks, _ = two_ranks
    for rank in ranks:
        assert [record["reused"] for record in rank["records"]] == [False, False, True, True]
        for record in _branched_records(rank):
            assert record["src"].tolist() == sorted(list(range(NUM_GENERATIONS)) * BRANCHES)
            texts = tokenizer.batch_decode(record["completion_ids"], skip_special_tokens=True)
            assert record["appo_rewards"].tolist() == text_length_reward(texts)   # this rank's rows
            assert record["branch_rewards"].tolist() == text_length_reward(
                tokenizer.batch_decode(record["branches"], skip_special_tokens=True))
        again = rank["records"][2:]
        for first, later in zip(rank["records"][:2], again):
            assert torch.equal(first["appo_base_advantages"], later["appo_base_advantages"])
    assert all(bool(rank["records"][0]["entropy_only"].all()) for rank in ranks)
    shifts = [(r["records"][1]["omega"] - 1).abs().max() for r in ranks]
    assert min(shifts) > 1e-2                               # step 2: a real policy shift on both ranks
    generations, branch_log = {}, {}
    for rank in ranks:
        generations.update(rank["generations"])
        branch_log.update(rank["branch_log"])
    counts = ranks_helper.trajectories_per_prompt(generations, branch_log)
    assert len(counts) == len(ranks_helper.PROMPTS) and set(counts.values()) == {M}


def _branched_records(rank):
    return [record for record in rank["records"] if not record["reused"]]


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_data(two_ranks):
    """Rank r's rows of step s are rows [4r, 4r + 4) of the one-process slice of step s: same rewards, same
    branch points (a different one would miss the replayed continuations), advantages equal to float noise:
    1e-6 in the branching passes; in the later passes 1e-5 relative, as their A_fut comes from parameters that
    went through more updates of gradients summed in another order (all-reduce against one process)."""
    ranks, replay = two_ranks
    assert len(replay.records) == 4
    worst = []
    for step, record in enumerate(replay.records):
        for r, rank in enumerate(ranks):
            mine = rank["records"][step]
            rows = slice(r * NUM_GENERATIONS, (r + 1) * NUM_GENERATIONS)
            width = mine["completion_ids"].shape[1]
            assert torch.equal(record["completion_ids"][rows, :width], mine["completion_ids"])
            assert torch.equal(record["appo_rewards"][rows], mine["appo_rewards"])
            torch.testing.assert_close(record["appo_base_advantages"][rows, :width],
                                       mine["appo_base_advantages"], atol=1e-6, rtol=0)
            expected, got = record["advantages"][rows, :width], mine["advantages"]
            worst.append(float((expected - got).abs().max()))
            tolerance = {"atol": 1e-6, "rtol": 0} if step < 2 else {"atol": 1e-6, "rtol": 1e-5}
            torch.testing.assert_close(expected, got, **tolerance)
            assert not record["advantages"][rows, width:].any()
    print(f"largest |advantage difference| per step and rank: {worst}")
    params = dict(replay.model.named_parameters())
    for name, value in ranks[0]["params"].items():
        torch.testing.assert_close(params[name].detach(), value, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ TRL tools
# A real tool-calling setup, offline (_trl_ranks.py): SmolLM2's tokenizer with the Qwen3-Instruct-2507 chat
# template that TRL ships (TRL recognises it, so `add_response_schema` gives it Qwen's tool-call parser), and
# a tiny Qwen2 model fine-tuned for a few seconds to answer every prompt with `<tool_call>{"name": "add",
# "arguments": {"a": x, "b": y}}</tool_call>` (x, y random digits: the high-entropy tokens where APPO
# branches), then "Done." after the tool result. TRL parses and executes the calls; APPO's branches run TRL's
# tool loop.

TOOL_PROMPTS = ranks_helper.TOOL_PROMPTS
TOOL_MAX_COMPLETION = ranks_helper.TOOL_MAX_COMPLETION
TOOL_CALLS = ranks_helper.TOOL_CALLS
add, tool_result_reward = ranks_helper.add, ranks_helper.tool_result_reward
_tool_call, _render = ranks_helper.tool_call, ranks_helper.render


@pytest.fixture(scope="module")
def tool_tokenizer():
    return ranks_helper.tool_tokenizer()


@pytest.fixture(scope="module")
def tool_trained():
    return ranks_helper.tool_run()


def test_tools_training_step_updates_parameters_and_logs_branches(tool_trained):
    trainer, before = tool_trained
    changed = [name for name, p in trainer.model.named_parameters()
               if not torch.equal(p.detach(), before[name])]
    assert len(changed) == len(before)
    logs = [entry for entry in trainer.state.log_history if "appo/branches" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["appo/branches"] == BRANCHES * 8               # every micro-batch: 2 prompts x 4 rows
    assert logs[0]["tools/call_frequency"] > 0                      # TRL's own rollouts called the tool
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
              "prompt_mask": torch.ones(1, len(prompt), dtype=torch.long), "appo_row": torch.tensor([0])}
    parent_messages = [_tool_call(1, 2), {"role": "tool", "name": "add", "content": "3"}, _tool_call(3, 4)]
    position = len(completion) - len(second_call) + 5                    # inside the second call
    saved = (trainer._appo_context, trainer.max_tool_calling_iterations, trainer.max_completion_length)
    trainer._appo_context = {"inputs": [{"prompt": messages}], "prompts": [messages],
                             "completions": [parent_messages]}
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
        (trainer._appo_context, trainer.max_tool_calling_iterations,
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
