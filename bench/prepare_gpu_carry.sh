#!/usr/bin/env bash
# Prepares the one call of bench/gpu_suite.sh on a lent GPU machine (an H100 or H200 of the device tool) and
# prints it: the command, the paths to carry, the timeout and the environment (the commit id among it).
#
# The GPU machines reach no package index, so every wheel the suite needs that their image lacks travels with
# the call, downloaded here for their Python (3.12, x86-64): Liger-Kernel, for the fused LM head comparison
# (pure Python; torch and triton, its only requirements, are there). pytest-xdist, execnet, pytest-timeout,
# pytest-benchmark, transformers and tokenizers are in the image's package list (the device tool's KINDS.md,
# read 2026-11-17), so they do not travel; APPO_CARRY_EXTRA="name==version ..." adds wheels should that
# change.
# The wheels go to .benchmarks/wheels, which .gitignore keeps out of commits; the carry must stay under
# 16 MiB (at most 64 MiB travels with the working tree in all).
#
#   usage: bash bench/prepare_gpu_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=("liger-kernel==0.8.5" ${APPO_CARRY_EXTRA:-})
CARRY_LIMIT=$((16 * 2**20))
TREE_LIMIT=$((64 * 2**20))
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

mkdir -p "${APPO_WHEELS:-.benchmarks/wheels}"
CARRY=$(realpath --relative-to=. "${APPO_WHEELS:-.benchmarks/wheels}")  # the suite reads APPO_WHEELS too
if [[ "$CARRY" == ../* ]]; then
  echo "note: $CARRY is outside the repository, which the device tool cannot carry (a rehearsal only)"
elif ! git check-ignore -q "$CARRY/x.whl"; then
  echo "prepare_gpu_carry: $CARRY is not ignored by git (.gitignore should name .benchmarks/)" >&2
  exit 1
fi
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 \
  -d "$CARRY" "${WHEELS[@]}"
# One version of each: a wheel left from an earlier preparation, not asked for now, would be installed too.
"$PYTHON" - "$CARRY" "${WHEELS[@]}" <<'PY'
import re, sys
from pathlib import Path

def key(name):
    return re.sub(r"[-_.]+", "_", name).lower()

folder, wanted = Path(sys.argv[1]), [spec.split("==") for spec in sys.argv[2:]]
keep = {(key(name), version) for name, version in wanted}
for wheel in folder.glob("*.whl"):
    name, version = wheel.name.split("-")[:2]
    if (key(name), version) not in keep:
        print(f"removing {wheel.name} (not asked for now)")
        wheel.unlink()
PY

carry_bytes=$(find "$CARRY" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2> /dev/null \
  | awk '{s += $1} END {print s + 0}')
echo "carry: $CARRY, $(ls "$CARRY" | tr '\n' ' ')($carry_bytes bytes, $((carry_bytes / 1024)) KiB)"
echo "working tree that travels besides: $((tree_bytes / 1024)) KiB (with the carry at most 64 MiB)"
if [ "$carry_bytes" -ge "$CARRY_LIMIT" ] || [ $((carry_bytes + tree_bytes)) -ge "$TREE_LIMIT" ]; then
  echo "prepare_gpu_carry: too large to travel (the carry must stay under 16 MiB)" >&2
  exit 1
fi

COMMIT=$(git rev-parse HEAD)
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  COMMIT="$COMMIT+dirty"
  echo "note: tracked files have uncommitted changes; the working tree travels as it is (commit first so that"
  echo "      the commit id names what ran)"
fi
eval "$("$PYTHON" bench/gpu_suite.py plan --shell | grep '^BUDGET_S=')"
TIMEOUT_S=$((BUDGET_S + 60))  # the suite's own budget, plus the summary and the grace of a killed step
echo
echo "Rehearse it here first: bash bench/gpu_suite.sh --dry-run"
echo "Then the one call of the device tool's run (kind left out: an H100, or an H200 when none is free):"
"$PYTHON" - "$COMMIT" "$CARRY" "$TIMEOUT_S" <<'PY'
import json, sys

commit, carry, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3])
print(json.dumps({"command": f"APPO_COMMIT={commit} bash bench/gpu_suite.sh", "carry": [carry],
                  "timeout_s": timeout}, indent=2))
PY
echo "Environment there: APPO_COMMIT (above; no .git travels), OUT (set by the tool: summary.txt,"
echo "gpu-suite.json and raw.tar.gz come back), APPO_WHEELS defaults to $CARRY; python3 is the interpreter"
echo "that holds torch."
