#!/usr/bin/env bash
# A separate virtual environment for testing appo.integrations.verl against the real verl package on CPU.
#
# verl 0.9.1 pins transformers<5.11 (appo's environment pins 5.17.0), so it gets its own venv with what verl's
# CPU-runnable pieces import: its registries and DataProto, its Ray worker group, its HF rollout, its v1 trainer
# module (where APPO's trainer mode registers) and TransferQueue:
#   torch 2.13.0 (the local CPU wheel, installed FIRST so nothing pulls a CUDA build), numpy<2.4,
#   verl 0.9.1 and TransferQueue 0.1.11 without their dependencies (no vllm/sglang/wandb/ray[default]...), then
#   ray, tensordict, omegaconf, hydra-core, transformers (verl's pin), peft, datasets, torchdata, pillow,
#   fastapi, uvicorn, aiohttp, cachetools, pyzmq, msgspec, psutil, prometheus_client, codetiming, orjson.
# appo itself is not installed there: the test runs that python with PYTHONPATH=<repo root>.
#
# Idempotent: a stamp file inside the venv records a completed, verified install; with it present the script
# only prints the interpreter's path (milliseconds). A from-scratch run takes a few minutes.
# Usage: bash scripts/verl_env.sh            -> prints the venv's python on the last line of stdout
# Env:   APPO_VERL_VENV (default ~/.cache/appo/verl-venv), PYTHON (the interpreter that creates the venv).
set -euo pipefail
VENV=${APPO_VERL_VENV:-$HOME/.cache/appo/verl-venv}
STAMP_TEXT="verl==0.9.1 torch==2.13.0 tensordict==0.10.0 transformers<5.11 transferqueue==0.1.11 v2"
STAMP="$VENV/.appo-verl-env"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_TEXT" ] && [ -x "$VENV/bin/python" ]; then
  echo "$VENV/bin/python"
  exit 0
fi
PY=${PYTHON:-python3}
"$PY" -m venv "$VENV"
TORCH="torch==${APPO_TORCH_VERSION:-2.13.0}"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "$TORCH" "numpy<2.4"
"${PIP[@]}" --no-deps "verl==0.9.1" "TransferQueue==0.1.11"
"${PIP[@]}" packaging ray "tensordict==0.10.0" "omegaconf>=2.2,<2.4" "hydra-core==1.3.8" \
  "transformers>=5.5.3,<5.11,!=5.6.0" peft datasets "torchdata==0.11.0" pillow fastapi uvicorn aiohttp \
  cachetools pyzmq msgspec psutil "prometheus_client>=0.20.0" codetiming orjson "$TORCH" "numpy<2.4"
"$VENV/bin/python" -c "import verl.trainer.ppo.core_algos, verl.trainer.ppo.v1, transfer_queue; from verl import DataProto" >&2
echo "$STAMP_TEXT" > "$STAMP"
echo "$VENV/bin/python"
