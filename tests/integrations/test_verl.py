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
    return report


# ------------------------------------------------------------------------------------------ pytest side
if __name__ != "__main__":
    import pytest

    pytestmark = pytest.mark.slow  # the first run builds the verl venv (about 1-2 minutes)

    @pytest.fixture(scope="module")
    def verl_report():
        try:
            made = subprocess.run(["bash", str(REPO / "scripts" / "verl_env.sh")], capture_output=True,
                                  text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip("scripts/verl_env.sh did not finish in 600 s: no verl environment could be created")
        if made.returncode != 0:
            pytest.skip(f"scripts/verl_env.sh failed, no verl environment: {made.stderr.strip()[-400:]}")
        python = made.stdout.strip().splitlines()[-1]
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

    def test_importing_the_module_does_not_import_verl(verl_report):
        # checked where verl IS installed: only register() may import it
        assert verl_report["import_pulls_verl"] == "False"

else:
    print(json.dumps(run_checks()))
