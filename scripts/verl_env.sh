#!/usr/bin/env bash
# A separate virtual environment for testing appo.integrations.verl against the real verl package.
#
# verl 0.9.1 pins transformers<5.11 (appo's environment pins 5.17.0), so it gets its own venv with only what
# `import verl.trainer.ppo.core_algos` and `from verl import DataProto` need:
#   torch 2.13.0 (the local CPU wheel, installed FIRST so nothing pulls a CUDA build), numpy<2.4,
#   verl 0.9.1 without its dependencies (no vllm/sglang/wandb/peft...), then ray, tensordict, omegaconf,
#   transformers (verl's pin), codetiming, orjson, packaging.
# appo itself is not installed there: the test runs that python with PYTHONPATH=<repo root>.
#
# Idempotent: a stamp file inside the venv records a completed, verified install; with it present the script
# only prints the interpreter's path (milliseconds). A from-scratch run takes about 1.5-2 minutes here.
# Usage: bash scripts/verl_env.sh            -> prints the venv's python on the last line of stdout
# Env:   APPO_VERL_VENV (default ~/.cache/appo/verl-venv), PYTHON (the interpreter that creates the venv).
set -euo pipefail
VENV=${APPO_VERL_VENV:-$HOME/.cache/appo/verl-venv}
STAMP_TEXT="verl==0.9.1 torch==2.13.0 tensordict==0.10.0 transformers<5.11 v1"
STAMP="$VENV/.appo-verl-env"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_TEXT" ] && [ -x "$VENV/bin/python" ]; then
  echo "$VENV/bin/python"
  exit 0
fi
PY=${PYTHON:-python3}
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "torch==${APPO_TORCH_VERSION:-2.13.0}" "numpy<2.4"
"${PIP[@]}" --no-deps "verl==0.9.1"
"${PIP[@]}" packaging ray "tensordict==0.10.0" omegaconf "transformers>=5.5.3,<5.11,!=5.6.0" \
  codetiming orjson "torch==${APPO_TORCH_VERSION:-2.13.0}" "numpy<2.4"
"$VENV/bin/python" -c "import verl.trainer.ppo.core_algos; from verl import DataProto" >&2
echo "$STAMP_TEXT" > "$STAMP"
echo "$VENV/bin/python"
