"""appo's verl integration, tested against the real verl 0.9.1 package in its own virtual environment.

verl pins transformers<5.11 (appo's environment has 5.17.0), so ``scripts/verl_env.sh`` builds a separate venv
(about 1-2 minutes the first time, instant afterwards). The checks below run there in ONE subprocess: this
file executed as a script (``python test_verl.py``) prints a JSON report, which the pytest tests read. The
tests skip only when that environment cannot be created.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ checks run inside the venv
def _reference_dual_group(rewards, groups, parent, branch_pos, mask, combine="avg"):
    """fp64 loop form of METHOD.md Eqs. 6-7 for the initial rows (branch rows stay 0)."""
    import torch

    def zscore(values):
        values = torch.tensor(values, dtype=torch.float64)
        return (values - values.mean()) / (values.std(correction=0) + 1e-6)

    rows, width = mask.shape
    out = torch.zeros(rows, width, dtype=torch.float64)
    for group in sorted(set(groups)):
        initial = [r for r in range(rows) if groups[r] == group and parent[r] < 0]
        branches = [r for r in range(rows) if groups[r] == group and parent[r] >= 0]
        a_init = dict(zip(initial, zscore([rewards[r] for r in initial]).tolist()))
        a_br = dict(zip(branches, zscore([rewards[r] for r in branches]).tolist())) if branches else {}
        for n in initial:
            for i in range(width):
                if not mask[n, i]:
                    continue
                shared = [a_br[b] for b in branches if parent[b] == n and branch_pos[b] > i]
                if not shared:
                    out[n, i] = a_init[n]
                else:
                    total = a_init[n] + sum(shared) / len(shared)
                    out[n, i] = total / 2 if combine == "avg" else total
    return out


def _reference_future_value(logprobs, old, mask, gamma=2 ** (-1 / 32), lo=1.0, hi=1.2):
    """fp64 loop of clip(exp(sum_{k>=i} gamma^(k-i) (l_k - l_old_k) m_k), lo, hi)."""
    import torch

    rows, width = logprobs.shape
    out = torch.zeros(rows, width, dtype=torch.float64)
    for r in range(rows):
        for i in range(width):
            s = sum(gamma ** (k - i) * float(logprobs[r, k] - old[r, k]) * float(mask[r, k])
                    for k in range(i, width))
            out[r, i] = min(max(torch.exp(torch.tensor(max(min(s, 20.0), -20.0))).item(), lo), hi)
    return out


def run_checks() -> dict:
    """Everything that needs verl; returns plain numbers and flags (JSON-serialisable)."""
    import numpy as np
    import torch
    from verl import DataProto
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn
    from verl.workers.config import ActorConfig

    from appo.algos.advantages import dual_group_advantages
    from appo.integrations import verl as appo_verl

    report: dict = {}
    code = "import sys, appo.integrations.verl; print('verl' in sys.modules)"
    lazy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    report["import_pulls_verl"] = lazy.stdout.strip() if lazy.returncode == 0 else lazy.stderr[-500:]
    appo_verl.register()
    report["estimator_is_appo"] = get_adv_estimator_fn("appo") is appo_verl.appo_advantage
    report["policy_loss_is_appo"] = get_policy_loss_fn("appo") is appo_verl.appo_policy_loss

    # Two prompts x 3 initial rollouts + 5 branches, interleaved rows, response length 7.
    gen = torch.Generator().manual_seed(5)
    parent = [-1, -1, 0, -1, 1, -1, 8, -1, -1, 5, 7]
    uids = ["p0", "p0", "p0", "p0", "p0", "p1", "p1", "p1", "p1", "p1", "p1"]
    branch_pos = [0, 0, 3, 0, 5, 0, 2, 0, 0, 4, 1]
    rows, width = len(parent), 7
    lengths = torch.tensor([7, 5, 6, 6, 7, 4, 5, 7, 3, 6, 7])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    rewards = torch.randn(rows, generator=gen) + 0.5
    token_level_rewards = torch.zeros(rows, width)
    token_level_rewards[torch.arange(rows), lengths - 1] = rewards
    data = DataProto.from_dict(
        tensors={"token_level_rewards": token_level_rewards, "response_mask": mask},
        non_tensors={"uid": np.array(uids, dtype=object), "appo_parent": np.array(parent),
                     "appo_branch_pos": np.array(branch_pos)})
    full = appo_verl.compute_advantage(data, drop_branches=False)
    advantages = full.batch["advantages"]
    initial = torch.tensor(parent) < 0
    group_ids = torch.tensor([0 if u == "p0" else 1 for u in uids])
    direct = dual_group_advantages(rewards, group_ids, torch.tensor(parent), torch.tensor(branch_pos),
                                   mask[initial].bool())
    reference = _reference_dual_group(rewards.tolist(), uids, parent, branch_pos, mask.bool())
    report["adv_vs_appo_max_abs"] = float((advantages[initial] - direct).abs().max())
    report["adv_vs_fp64_max_abs"] = float((advantages.double() - reference).abs().max())
    report["branch_rows_zero"] = bool((advantages[~initial] == 0).all())
    report["adv_uses_branches"] = bool((reference[initial] != reference[initial][:, :1]).any())
    dropped = appo_verl.compute_advantage(data)
    report["dropped_rows"] = len(dropped)
    report["dropped_match"] = bool(torch.equal(dropped.batch["advantages"], advantages[initial]))
    try:
        appo_verl.appo_advantage(token_level_rewards, mask, np.array(uids, dtype=object))
        report["missing_metadata_error"] = ""
    except ValueError as err:
        report["missing_metadata_error"] = str(err)

    # Policy loss: verl's vanilla PPO loss on A * (1 + 0.5 * A_fut), A_fut from the current log-probs.
    old = -torch.rand(rows, width, generator=gen, dtype=torch.float32) * 3
    new = (old + 0.08 * torch.randn(rows, width, generator=gen)).requires_grad_(True)
    base = (torch.randn(rows, width, generator=gen) + 1.0) * mask
    config = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, rollout_n=1, clip_ratio_low=0.2,
                         clip_ratio_high=0.28)
    loss, metrics = get_policy_loss_fn("appo")(old, new, base, mask, "token-mean", config)
    future = _reference_future_value(new.detach(), old, mask)
    scaled = (base.double() * (1 + 0.5 * future)).float()
    expected, _ = get_policy_loss_fn("vanilla")(old, new.detach(), scaled, mask, "token-mean", config)
    plain, _ = get_policy_loss_fn("vanilla")(old, new.detach(), base * 1.5, mask, "token-mean", config)
    loss.backward()
    report["loss"], report["loss_expected"] = float(loss), float(expected)
    report["loss_without_future"] = float(plain)
    report["future_value_spread"] = float(future[mask.bool()].max() - future[mask.bool()].min())
    report["grad_finite_nonzero"] = bool(torch.isfinite(new.grad).all() and new.grad.abs().sum() > 0)
    report["loss_metric_keys"] = sorted(metrics)
    report.update(branching_checks())
    return report


def _initial_rollouts(prompt_width=5, width=10, vocab=50, pad=0):
    """verl-shaped step after generation + compute_log_prob: 2 prompts x 3 rollouts, left-padded prompts
    [6, 5], right-padded responses [6, 10], a tool result (response_mask 0) inside row 1. Returns
    (data, log_probs) as verl's fit holds them: ``entropys`` only in the compute_log_prob output."""
    import numpy as np
    import torch
    from verl import DataProto

    gen = torch.Generator().manual_seed(11)
    rows = 6
    prompt_lens = torch.tensor([3, 3, 3, 5, 5, 5])
    response_lens = torch.tensor([10, 8, 6, 9, 7, 10])
    cols_p, cols_r = torch.arange(prompt_width)[None, :], torch.arange(width)[None, :]
    prompt_mask = (cols_p >= prompt_width - prompt_lens[:, None]).long()
    response_attention = (cols_r < response_lens[:, None]).long()
    prompts = torch.randint(1, vocab, (rows, prompt_width), generator=gen)
    prompts = torch.where(prompt_mask.bool(), prompts, pad)
    prompts[3:] = prompts[3]          # a prompt's rollouts share its tokens
    prompts[:3] = prompts[0]
    responses = torch.randint(1, vocab, (rows, width), generator=gen)
    responses = torch.where(response_attention.bool(), responses, pad)
    response_mask = response_attention.clone()
    response_mask[1, 3:5] = 0         # a tool result: in the response, not a model token
    attention = torch.cat([prompt_mask, response_attention], dim=1)
    current = -torch.rand(rows, width, generator=gen) * 2 * response_mask
    sampling = (current + 0.3 * torch.randn(rows, width, generator=gen)) * response_mask
    data = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "response_mask": response_mask,
                 "input_ids": torch.cat([prompts, responses], dim=1), "attention_mask": attention,
                 "position_ids": (attention.cumsum(-1) - 1).clamp(min=0), "rollout_log_probs": sampling,
                 "old_log_probs": current},
        non_tensors={"uid": np.array(["a", "a", "a", "b", "b", "b"], dtype=object),
                     "agent_name": np.array(["single_turn_agent"] * rows, dtype=object),
                     "data_source": np.array(["toy"] * rows, dtype=object)},
        meta_info={"eos_token_id": 2, "pad_token_id": pad, "temperature": 1.0})
    log_probs = DataProto.from_dict(tensors={"old_log_probs": current,
                                             "entropys": torch.rand(rows, width, generator=gen) * 3})
    return data, log_probs


def _fake_generate_sequences(requests, vocab=50, pad=0):
    """A deterministic stand-in for verl's rollout (HF-rollout output layout, non_tensor_batch dropped as
    HFRollout does): even branches write the whole ``response_length`` budget, odd ones 3 tokens; token j of
    branch k is (7 * last prefix token + 3 * j + k) % (vocab - 1) + 1."""
    import torch
    from verl import DataProto

    ids, attention = requests.batch["input_ids"], requests.batch["attention_mask"]
    budget = requests.meta_info["response_length"]
    branches = ids.shape[0]
    new = torch.full((branches, budget), pad, dtype=torch.long)
    for k in range(branches):
        count = budget if k % 2 == 0 else min(3, budget)
        new[k, :count] = (7 * ids[k, -1] + 3 * torch.arange(count) + k) % (vocab - 1) + 1
    new_attention = (new != pad).long()
    full_attention = torch.cat([attention, new_attention], dim=1)
    return DataProto.from_dict(tensors={
        "prompts": ids, "responses": new, "input_ids": torch.cat([ids, new], dim=1),
        "attention_mask": full_attention, "position_ids": (full_attention.cumsum(-1) - 1).clamp(min=0),
        "rollout_log_probs": -0.5 * new_attention.float()})


def _toy_rewards(data):
    """A deterministic reward on the merged rows' valid response tokens, at the last one ([R, L])."""
    import torch

    responses = data.batch["responses"]
    attention = data.batch["attention_mask"][:, -responses.shape[1]:]
    lengths = attention.sum(1)
    score = ((responses * attention).sum(1) % 7).float() / 3 - 1
    rewards = torch.zeros(responses.shape)
    rewards[torch.arange(len(lengths)), lengths - 1] = score
    return rewards


def branching_checks() -> dict:
    """branch_requests -> (fake) generate -> merge_branches -> rewards -> compute_advantage, on DataProtos."""
    import numpy as np
    import torch

    import appo
    from appo.algos.advantages import dual_group_advantages
    from appo.integrations import verl as appo_verl

    report: dict = {}
    data, log_probs = _initial_rollouts()
    t = {key: data.batch[key] for key in data.batch.keys()}
    requests = appo_verl.branch_requests(data, log_probs=log_probs, branches_per_rollout=2)

    # the same choice made directly by appo on the same tensors
    score = appo.branching_score(tokens=t["responses"], old_logprobs=t["rollout_log_probs"],
                                 mask=t["response_mask"].bool(), entropy=log_probs.batch["entropys"],
                                 logprobs=t["old_log_probs"])
    rows, positions = appo.select_branch_points(score.score, 2, allow_fewer=True)
    parent = requests.non_tensor_batch["appo_parent"]
    shared = requests.non_tensor_batch["appo_branch_pos"]
    report["branches"] = len(requests)
    report["branch_rows_per_parent"] = np.bincount(parent, minlength=6).tolist()
    report["positions_match_appo"] = (parent.tolist() == rows.tolist()
                                      and shared.tolist() == positions.tolist())
    report["entropy_only_rows"] = int(score.entropy_only.sum())
    report["positions_are_model_tokens"] = bool(t["response_mask"][rows, positions].all())

    prefix_ok, positions_ok = True, True
    for k in range(len(requests)):
        r, s = int(parent[k]), int(shared[k])
        real = requests.batch["attention_mask"][k].bool()
        expected = torch.cat([t["prompts"][r][t["attention_mask"][r, :5].bool()], t["responses"][r, :s]])
        prefix_ok &= torch.equal(requests.batch["input_ids"][k][real], expected)
        prefix_ok &= bool(requests.batch["attention_mask"][k, -1] == 1)       # left padding
        positions_ok &= torch.equal(requests.batch["position_ids"][k][real], torch.arange(len(expected)))
        prefix_ok &= requests.non_tensor_batch["raw_prompt_ids"][k] == expected.tolist()
    report["prefix_is_prompt_plus_response_head"] = bool(prefix_ok)
    report["prefix_position_ids"] = bool(positions_ok)
    report["request_uid_is_parents"] = requests.non_tensor_batch["uid"].tolist() == [
        data.non_tensor_batch["uid"][r] for r in parent]
    report["request_agent_name"] = sorted(set(requests.non_tensor_batch["agent_name"]))
    report["request_meta"] = {key: requests.meta_info.get(key) for key in ("do_sample", "response_length",
                                                                           "eos_token_id", "pad_token_id")}
    report["request_budget_expected"] = int(10 - shared.min())

    output = _fake_generate_sequences(requests)
    merged = appo_verl.merge_branches(data, output, requests=requests)
    branches, initial_rows = len(requests), len(data)
    report["merged_rows"] = len(merged)
    m = {key: merged.batch[key] for key in merged.batch.keys()}
    report["initial_rows_unchanged"] = all(torch.equal(m[key][:initial_rows], t[key]) for key in t)
    report["merged_parent"] = merged.non_tensor_batch["appo_parent"].tolist()
    report["merged_branch_pos"] = merged.non_tensor_batch["appo_branch_pos"].tolist()
    report["merged_uid_is_parents"] = all(
        merged.non_tensor_batch["uid"][initial_rows + k] == data.non_tensor_batch["uid"][parent[k]]
        for k in range(branches))
    layout_ok = True
    for k in range(branches):
        r, s, row = int(parent[k]), int(shared[k]), initial_rows + k
        new_width = output.batch["responses"].shape[1]
        new = output.batch["responses"][k][output.batch["attention_mask"][k, -new_width:].bool()]
        n = min(len(new), 10 - s)
        layout_ok &= torch.equal(m["prompts"][row], t["prompts"][r])
        layout_ok &= torch.equal(m["attention_mask"][row, :5], t["attention_mask"][r, :5])
        layout_ok &= torch.equal(m["position_ids"][row, :5], t["position_ids"][r, :5])
        layout_ok &= torch.equal(m["responses"][row, :s], t["responses"][r, :s])
        layout_ok &= torch.equal(m["responses"][row, s:s + n], new[:n])
        layout_ok &= bool((m["responses"][row, s + n:] == 0).all())
        layout_ok &= torch.equal(m["response_mask"][row, :s], t["response_mask"][r, :s])
        layout_ok &= bool(m["response_mask"][row, s:s + n].all())
        layout_ok &= not m["response_mask"][row, s + n:].any()
        layout_ok &= bool(m["attention_mask"][row, 5:].sum() == s + n)
        layout_ok &= torch.equal(m["input_ids"][row], torch.cat([m["prompts"][row], m["responses"][row]]))
        verl_positions = (m["attention_mask"][row].cumsum(0) - 1).clamp(min=0)  # verl's position ids
        layout_ok &= torch.equal(m["position_ids"][row], verl_positions)
        layout_ok &= torch.equal(m["rollout_log_probs"][row, :s], t["rollout_log_probs"][r, :s])
        layout_ok &= bool((m["rollout_log_probs"][row, s:s + n] == -0.5).all())
        layout_ok &= bool((m["old_log_probs"][row] == 0).all())               # placeholder, dropped later
    report["merged_layout"] = bool(layout_ok)
    report["some_branch_truncated"] = any(
        int(output.batch["attention_mask"][k].sum()) - int(requests.batch["attention_mask"][k].sum())
        > 10 - int(shared[k]) for k in range(branches))
    # the same merge from an output that kept the requests' non_tensor_batch (verl's agent loop does)
    output.non_tensor_batch.update(requests.non_tensor_batch)
    again = appo_verl.merge_branches(data, output)
    report["merge_from_output_metadata"] = all(torch.equal(again.batch[key], m[key]) for key in m)
    report["caller_data_untouched"] = "appo_parent" not in data.non_tensor_batch

    # rewards on the merged rows, then verl's registered estimator vs appo's own advantages
    merged.batch["token_level_rewards"] = _toy_rewards(merged)
    appo_verl.register()
    full = appo_verl.compute_advantage(merged, drop_branches=False)
    rewards = merged.batch["token_level_rewards"].sum(-1)
    uids = merged.non_tensor_batch["uid"].tolist()
    all_parent = merged.non_tensor_batch["appo_parent"].tolist()
    all_pos = merged.non_tensor_batch["appo_branch_pos"].tolist()
    initial = torch.tensor(all_parent) < 0
    direct = dual_group_advantages(rewards, torch.tensor([0 if u == "a" else 1 for u in uids]),
                                   torch.tensor(all_parent), torch.tensor(all_pos),
                                   m["response_mask"][initial].bool())
    reference = _reference_dual_group(rewards.tolist(), uids, all_parent, all_pos, m["response_mask"].bool())
    advantages = full.batch["advantages"]
    report["pipeline_adv_vs_appo_max_abs"] = float((advantages[initial] - direct).abs().max())
    report["pipeline_adv_vs_fp64_max_abs"] = float((advantages.double() - reference).abs().max())
    report["pipeline_adv_uses_branches"] = bool((reference[initial] != reference[initial][:, :1]).any())
    report["pipeline_branch_rewards_spread"] = float(rewards[~initial].std())

    # a reward key the initial rows already had is NaN on branch rows until the branches are scored
    scored = data.select_idxs(np.arange(len(data)))
    scored.batch["token_level_rewards"] = _toy_rewards(scored)
    unscored = appo_verl.merge_branches(scored, output, requests=requests)
    report["unscored_branch_rewards_nan"] = bool(
        torch.isnan(unscored.batch["token_level_rewards"][initial_rows:]).all())
    try:
        appo_verl.compute_advantage(unscored)
        report["unscored_error"] = ""
    except ValueError as err:
        report["unscored_error"] = str(err)

    # bad input names the key
    errors = {}
    without_entropy = data      # verl's fit keeps old_log_probs in the batch but pops entropys
    for name, call in {
        "entropys": lambda: appo_verl.branch_requests(without_entropy),
        "response_mask": lambda: appo_verl.branch_requests(_drop(data, "response_mask"), log_probs=log_probs),
        "appo_parent": lambda: appo_verl.merge_branches(data, _fake_generate_sequences(requests)),
        "responses": lambda: appo_verl.merge_branches(data, _drop(output, "responses"), requests=requests),
    }.items():
        try:
            call()
            errors[name] = ""
        except ValueError as err:
            errors[name] = str(err)
    report["bad_input_errors"] = errors
    no_branches = appo_verl.merge_branches(data, None)
    report["no_branches_merge"] = no_branches.non_tensor_batch["appo_parent"].tolist()
    return report


def _drop(proto, key):
    """A copy of ``proto`` without batch[key]."""
    import numpy as np

    copy = proto.select_idxs(np.arange(len(proto)))
    copy.batch = copy.batch.exclude(key)
    return copy


# ------------------------------------------------------------------------------------------ pytest side
if __name__ != "__main__":
    import pytest

    sys.path.insert(0, str(REPO / "tests"))
    from _venv import venv_python

    pytestmark = pytest.mark.slow  # the first run builds the verl venv (about 1-2 minutes)

    @pytest.fixture(scope="module")
    def verl_report():
        python = venv_python("verl_env.sh", "verl", timeout=600)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        done = subprocess.run([python, __file__], capture_output=True, text=True, timeout=300, env=env,
                              cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def test_registry_resolves_appo(verl_report):
        assert verl_report["estimator_is_appo"]
        assert verl_report["policy_loss_is_appo"]

    def test_estimator_matches_appo_advantages_on_a_dataproto(verl_report):
        assert verl_report["adv_vs_appo_max_abs"] <= 1e-6
        assert verl_report["adv_vs_fp64_max_abs"] <= 1e-5
        assert verl_report["adv_uses_branches"]
        assert verl_report["branch_rows_zero"]

    def test_compute_advantage_keeps_only_initial_rows(verl_report):
        assert verl_report["dropped_rows"] == 6
        assert verl_report["dropped_match"]

    def test_estimator_without_branch_metadata_names_the_argument(verl_report):
        assert "non_tensor_batch" in verl_report["missing_metadata_error"]

    def test_policy_loss_applies_future_aware_scaling(verl_report):
        assert verl_report["future_value_spread"] > 0.01  # A_fut really varies, so the check below can fail
        assert abs(verl_report["loss"] - verl_report["loss_expected"]) <= 1e-5
        assert abs(verl_report["loss"] - verl_report["loss_without_future"]) > 1e-4
        assert verl_report["grad_finite_nonzero"]
        assert "appo/future_value_mean" in verl_report["loss_metric_keys"]

    def test_branch_requests_pick_appo_branch_points(verl_report):
        assert verl_report["branches"] >= 6
        assert verl_report["positions_match_appo"]      # == branching_score + select_branch_points directly
        assert verl_report["positions_are_model_tokens"]
        assert max(verl_report["branch_rows_per_parent"]) == 2

    def test_branch_requests_are_prompt_plus_response_prefix(verl_report):
        assert verl_report["prefix_is_prompt_plus_response_head"]
        assert verl_report["prefix_position_ids"]
        assert verl_report["request_uid_is_parents"]
        assert verl_report["request_agent_name"] == ["appo_branch"]   # not a stock loop (drops the prefix)
        meta = verl_report["request_meta"]
        assert meta["do_sample"] is True and meta["eos_token_id"] == 2 and meta["pad_token_id"] == 0
        assert meta["response_length"] == verl_report["request_budget_expected"]

    def test_merge_branches_lays_out_rows_like_the_initial_ones(verl_report):
        branches = verl_report["branches"]
        assert verl_report["merged_rows"] == 6 + branches
        assert verl_report["initial_rows_unchanged"]
        assert verl_report["merged_parent"][:6] == [-1] * 6 and min(verl_report["merged_parent"][6:]) >= 0
        assert verl_report["merged_branch_pos"][:6] == [0] * 6
        assert verl_report["merged_uid_is_parents"]
        assert verl_report["merged_layout"]
        assert verl_report["some_branch_truncated"]      # a continuation longer than L - pos was cut
        assert verl_report["merge_from_output_metadata"]
        assert verl_report["caller_data_untouched"]
        assert verl_report["no_branches_merge"] == [-1] * 6

    def test_branching_pipeline_advantages_match_appo(verl_report):
        assert verl_report["pipeline_branch_rewards_spread"] > 0.1
        assert verl_report["pipeline_adv_uses_branches"]
        assert verl_report["pipeline_adv_vs_appo_max_abs"] <= 1e-6
        assert verl_report["pipeline_adv_vs_fp64_max_abs"] <= 1e-5

    def test_unscored_branches_fail_loudly(verl_report):
        assert verl_report["unscored_branch_rewards_nan"]
        assert "rewards" in verl_report["unscored_error"]

    def test_branching_bad_input_names_the_key(verl_report):
        for key, message in verl_report["bad_input_errors"].items():
            assert key in message, (key, message)

    def test_importing_the_module_does_not_import_verl(verl_report):
        # checked where verl IS installed: only register() may import it
        assert verl_report["import_pulls_verl"] == "False"

else:
    print(json.dumps(run_checks()))
