#!/usr/bin/env bash
# verl's full main_ppo with APPO registered through verl's plugin mechanism, on a GPU machine with vLLM.
#
# GPU-gated: without a CUDA device, or without verl (>= 0.9.1, v1 trainer) and vLLM in $VERL_PYTHON, it prints
# why and exits 77 (skipped). Two steps on appo's arithmetic task with a small instruct model:
#   VERL_USE_EXTERNAL_MODULES=appo.integrations.verl_plugin   verl imports appo's plugin in every process
#   trainer.v1.trainer_mode=appo                              APPO's trainer (branching + advantages)
#   rollout.agent.default_agent_loop=appo_agent               appo's tool loop (calculator) for rollouts and
#                                                             branches, configured by $OUT/agent_loops.yaml
#   algorithm.adv_estimator=appo                              dual-group advantages
#   actor_rollout_ref.actor.policy_loss.loss_mode=appo        A_fut at every update, then verl's PPO loss
#   actor_rollout_ref.actor.policy_loss._target_=appo.integrations.verl_config.APPOPolicyLossConfig
#   +actor_rollout_ref.actor.policy_loss.appo.branches_per_rollout=3
#                                                             APPO's settings block (appo.algos.chain.
#                                                             APPOSettings: appo train's algo.appo), read by
#                                                             the trainer and by every actor worker's loss
# Usage: bash scripts/verl_main_ppo.sh [extra hydra overrides...]
# Env:   VERL_PYTHON (default python3), APPO_VERL_MODEL (default HuggingFaceTB/SmolLM2-135M-Instruct),
#        APPO_VERL_OUT (default /tmp/appo_verl_main_ppo: data files and verl's outputs)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY=${VERL_PYTHON:-python3}
MODEL=${APPO_VERL_MODEL:-HuggingFaceTB/SmolLM2-135M-Instruct}
OUT=${APPO_VERL_OUT:-/tmp/appo_verl_main_ppo}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "skipped: no CUDA device visible to $PY (verl's rollouts run on vLLM/SGLang servers, which need a GPU)"
  exit 77
fi
if ! "$PY" -c "import vllm, verl.trainer.ppo.v1" 2>/dev/null; then
  echo "skipped: $PY lacks vllm or verl's v1 trainer (pip install 'verl[vllm]==0.9.1')"
  exit 77
fi

mkdir -p "$OUT"
"$PY" - "$OUT" <<'PYEOF'
import sys

import pandas as pd

from appo.tasks import Arithmetic

out = sys.argv[1]
task = Arithmetic(num_train=64, num_dev=16, max_operands=2, max_operand=20)
instruction = (" You may compute with <calculator>expression</calculator>. Then give only the number inside "
               "<answer></answer>.")
for split, name in (("train", "train"), ("dev", "val")):
    rows = [{"data_source": "appo/arithmetic",
             "prompt": [{"role": "user", "content": e.question + instruction}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": e.answer},
             "extra_info": {"index": i, "question": e.question}} for i, e in enumerate(task.examples(split))]
    pd.DataFrame(rows).to_parquet(f"{out}/{name}.parquet")
PYEOF

cat > "$OUT/agent_loops.yaml" <<'YAML'
- name: appo_agent
  _target_: appo.integrations.verl_agent.APPOAgentLoop
  appo_tools: [calculator]
  stop_tags: ["</calculator>", "</answer>"]
  max_tool_calls: 2
  max_new_tokens_per_turn: 256
  response_prefix: ""
  result_template: "<result>\n{result}\n</result>\n"
YAML

export VERL_USE_EXTERNAL_MODULES=appo.integrations.verl_plugin
cd "$OUT"
"$PY" -m verl.trainer.main_ppo \
  trainer.use_v1=True trainer.v1.trainer_mode=appo \
  algorithm.adv_estimator=appo actor_rollout_ref.actor.policy_loss.loss_mode=appo \
  actor_rollout_ref.actor.policy_loss._target_=appo.integrations.verl_config.APPOPolicyLossConfig \
  +actor_rollout_ref.actor.policy_loss.appo.branches_per_rollout=3 \
  actor_rollout_ref.actor.clip_ratio_low=0.2 actor_rollout_ref.actor.clip_ratio_high=0.28 \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=4 \
  actor_rollout_ref.rollout.agent.default_agent_loop=appo_agent \
  actor_rollout_ref.rollout.agent.agent_loop_config_path="$OUT/agent_loops.yaml" \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.4 \
  actor_rollout_ref.actor.ppo_mini_batch_size=4 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  data.train_files="$OUT/train.parquet" data.val_files="$OUT/val.parquet" \
  data.train_batch_size=8 data.max_prompt_length=128 data.max_response_length=96 \
  reward.custom_reward_function.path="$REPO/scripts/verl_appo_reward.py" \
  reward.custom_reward_function.name=compute_score \
  trainer.n_gpus_per_node=1 trainer.nnodes=1 trainer.total_training_steps=2 \
  trainer.val_before_train=False trainer.test_freq=-1 trainer.save_freq=-1 \
  trainer.logger='["console"]' trainer.project_name=appo trainer.experiment_name=verl_main_ppo \
  "$@"
