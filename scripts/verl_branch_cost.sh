#!/usr/bin/env bash
# What APPO's verl trainer mode adds to a step, measured on CPU: the weight syncs before each part's branches
# (appo_sync) and the log-prob pass of the actor after each update (appo_logprob), beside verl's own phases.
#
# Runs APPOTrainer through verl 0.9.1's own step (PPOTrainer.step: replay buffer, agent loops, balancing,
# old-log-prob pass, TransferQueue) on the CPU stand-ins of tests/integrations/_verl_cpu.py: 2 gloo actor
# ranks and a CPU rollout server holding the model, 4 prompts x N = 2, B = 2 (policy_loss.appo in verl's
# config tree), two update parts per step, 24-token responses.
# These are CPU figures (the stand-ins' sync is a state_dict through Ray's object store, not verl's CUDA IPC).
# Usage: bash scripts/verl_branch_cost.sh [--model smollm2-135m-instruct|PATH] [--steps K]
#        (default: SmolLM2-135M-Instruct, 3 steps). Prints one JSON line, seconds per step and phase; the
#        first step includes the warm-up (the branch agent-loop workers start then).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY=$(bash "$REPO/scripts/verl_env.sh" | tail -n 1)
ARGS=("$@")
if [ ${#ARGS[@]} -eq 0 ]; then
  ARGS=(--model smollm2-135m-instruct --steps 3)
fi
cd "$REPO"
LOG=$(mktemp)
trap 'rm -f "$LOG" "$LOG.out"' EXIT
if ! VERL_USE_EXTERNAL_MODULES=appo.integrations.verl_plugin \
     PYTHONPATH="$REPO:$REPO/tests/integrations" \
     RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1 \
     "$PY" "$REPO/tests/integrations/_verl_cpu.py" cost "${ARGS[@]}" >"$LOG.out" 2>"$LOG"; then
  tail -n 40 "$LOG" >&2
  exit 1
fi
tail -n 1 "$LOG.out"
