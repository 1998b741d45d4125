#!/usr/bin/env bash
# The whole GPU pass in one call of the device tool on a fresh H100 or H200 (issues 13 and 23), within an
# 8-minute budget that its plan adds up to (bench/gpu_suite.py PLAN: every step's time limit, installs, the
# extension build and the summary included; `python bench/gpu_suite.py plan` prints it):
#   1. setup: the carried wheels ($APPO_WHEELS, default .benchmarks/wheels, made by
#      bench/prepare_gpu_carry.sh: Liger-Kernel) installed by pip offline, without dependencies or version
#      check, into a private folder, and appo copied beside them as its wheel lays it out; every later
#      process imports from there (PYTHONPATH, PYTHONSAFEPATH: the machine's own environment is left alone);
#   2. tools: versions, the device, and which optional tools are there (xdist, pytest-timeout, Liger);
#   3. build, in the background until step 8: appo._C with its CUDA kernel (nvcc for this device only). Every
#      other process runs with APPO_BUILD_EXTENSION=0 meanwhile; when the build fails or runs out of time,
#      that stays so: the failure is recorded once and no later process builds again;
#   4. checks_triton: the card's own ceilings (copy, bf16 matmul) and the full-size checks against fp64: token
#      stats at T = 32,768 x V = 152,064, the fused LM head forward and backward, the future-value scan;
#   5-7. the benchmarks of token stats, the fused LM head (against Liger-Kernel when carried), the scan;
#   8. checks_gather: the CUDA gather, bitwise, on a Qwen2.5-7B-shaped cache;
#   9. train: `appo train` for two steps on the GPU from a small random Llama (bf16 autocast, the Triton LM
#      head and scan, the CUDA gather for branches; step 1 at lr = 0 checks that the recomputed pi_old equals
#      pi_theta bit for bit); time per phase and peak memory;
#   10-11. the gather benchmark, then torch.compile's (its cold compile counted in its own limit);
#   12. the GPU tests (python3 -m pytest -m gpu, in parallel workers when xdist is there);
#   13. compute-sanitizer memcheck on small launches of every op (API errors not counted);
#   14. the summary: at most 40 lines, targets as fractions of the ceilings this card measured.
# Inputs are drawn on the GPU. A step that would overrun the budget is skipped and says so.
#
# Output. Logs and json go to the run folder ($APPO_SUITE_DIR, else one under $APPO_SUITE_WORK, a scratch
# folder). $OUT (the only folder that comes back from the GPU machine, at most 8 files) receives three,
# rebuilt after every step, so that a call cut short still returns what it measured: summary.txt,
# gpu-suite.json (the merged record) and raw.tar.gz (the run folder; `python bench/gpu_suite.py summary
# --run-dir DIR --out DIR` rebuilds the other two from it). Pytest steps write a json line per test as it
# ends. Every record carries $APPO_COMMIT (no .git travels; bench/prepare_gpu_carry.sh prints the call).
#
#   usage: bash bench/gpu_suite.sh [--dry-run]
#   --dry-run: the same steps at tiny sizes on the CPU (Triton under TRITON_INTERPRET=1; the build step
#   loads the CPU extension; the GPU tests are collected, not run; the training step's CPU stand-in is the
#   same two-step train on a tiny model), and the plan's own checks: the limits within the budget, $OUT
#   within the return limits. tests/kernels/test_gpu_suite.py runs it, so that the script cannot rot.
#   APPO_SUITE_STEPS=setup,tools,train (a comma list) runs only those steps, e.g. to redo what a call lost.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "usage: bash bench/gpu_suite.sh [--dry-run]" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-$(mktemp -d -t appo-gpu-suite-out.XXXXXX)}"
WORK="${APPO_SUITE_WORK:-$(mktemp -d -t appo-gpu-suite-work.XXXXXX)}"
RUN="${APPO_SUITE_DIR:-$WORK/run}"
SITE="$WORK/site"
WHEELS="${APPO_WHEELS:-$REPO/.benchmarks/wheels}"
mkdir -p "$OUT" "$RUN" "$SITE"
# The interpreter that holds torch (python3 on the GPU machine); pytest always through it.
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
SUITE=("$PYTHON" "$REPO/bench/gpu_suite.py")
# Every process imports appo from $SITE and bench/'s modules (_record, the plugin -p gpu_suite) from bench/,
# never the tree's root (PYTHONSAFEPATH: its kernels/ would shadow the Hugging Face `kernels`).
APPO_COMMIT="${APPO_COMMIT:-$(PYTHONSAFEPATH=1 PYTHONPATH="$REPO/bench" "$PYTHON" -c 'import _record
print(_record.git_commit())')}"
export APPO_COMMIT PYTHONUNBUFFERED=1 APPO_BENCH_RESULTS="$RUN" PIP_DISABLE_PIP_VERSION_CHECK=1 \
  PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  PYTHONSAFEPATH=1 PYTHONPATH="$SITE:$REPO/bench${PYTHONPATH:+:$PYTHONPATH}"
PYTEST=("$PYTHON" -m pytest)
# The dry run gives every step 3x its limit (and the budget 3x): a shared 2-core CPU starts Python and torch
# several times slower than the GPU machine's 16 cores, and its steps are mostly start-up.
if [ "$DRY_RUN" = 1 ]; then
  export TRITON_INTERPRET=1 APPO_BENCH_TINY=1 CUDA_VISIBLE_DEVICES=""
  DRY=(--dry-run)
  SCALE=3
else
  export TRITON_INTERPRET=0
  DRY=()
  SCALE=1
fi
eval "$("${SUITE[@]}" plan --shell --scale "$SCALE")"  # BUDGET_S and LIMIT_<step> for every step
echo "appo GPU suite at $APPO_COMMIT: run folder $RUN, results in $OUT (budget ${BUDGET_S}s)"
PLAN_OK=1
"${SUITE[@]}" plan --check --out "$RUN" "${DRY[@]}" || PLAN_OK=0

STEPS="$RUN/steps.tsv"
: > "$STEPS"
START=$SECONDS
RESERVE_S=$LIMIT_summary
publish() {  # summary.txt, gpu-suite.json and raw.tar.gz into $OUT (one writer at a time)
  "${SUITE[@]}" publish --run-dir "$RUN" --out "$OUT" > /dev/null 2>> "$RUN/publish.log"
}
selected() { [ -z "${APPO_SUITE_STEPS:-}" ] || [[ ",$APPO_SUITE_STEPS," == *",$1,"* ]]; }
# step NAME COMMAND...: COMMAND under the plan's limit for NAME (never past the budget, keeping the summary's
# reserve), logged to $RUN/NAME.log, its status recorded, then published. Pytest steps append a json line
# per test to $RUN/NAME.jsonl as each ends (APPO_SUITE_RECORD, read by -p gpu_suite).
step() {
  local name=$1
  shift
  selected "$name" || return 0
  local planned="LIMIT_$name"
  if [ -z "${!planned:-}" ]; then
    echo "step $name is not in the plan (bench/gpu_suite.py PLAN)" >&2
    exit 3
  fi
  local limit=${!planned} left=$((BUDGET_S - (SECONDS - START) - RESERVE_S))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "== $name: skipped (budget spent)"
    printf '%s\tskipped\t0\t%s\n' "$name" "${!planned}" >> "$STEPS"
    publish
    return
  fi
  echo "== $name (limit ${limit}s)"
  local started=$SECONDS
  APPO_SUITE_RECORD="$RUN/$name.jsonl" timeout --kill-after=5 "$limit" "$@" > "$RUN/$name.log" 2>&1
  local rc=$? status=ok
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && status=timeout
  [ "$rc" -ne 0 ] && [ "$status" = ok ] && status="failed($rc)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - started))" "$limit" >> "$STEPS"
  tail -n 4 "$RUN/$name.log"
  publish
}
bench() {  # bench NAME MODULE [pytest arguments]: one benchmark module in its own pytest
  local name=$1 module=$2
  shift 2
  step "$name" "${PYTEST[@]}" -q -s -p no:cacheprovider -p gpu_suite --benchmark-only \
    --benchmark-json="$RUN/$name.benchmarks.json" "$@" "bench/bench_$module.py"
}
publish

# 1-2. the private site folder, the tools
step setup "${SUITE[@]}" setup --out "$RUN" --site "$SITE" --wheels "$WHEELS"
step tools "${SUITE[@]}" tools --out "$RUN" "${DRY[@]}"

# 3. the extension, in the background; no other process builds it meanwhile, nor after a failed build
BUILD_PID=
if selected build; then
  export APPO_BUILD_EXTENSION=0
  ( export APPO_BUILD_EXTENSION=1; step build "${SUITE[@]}" build --out "$RUN" "${DRY[@]}" ) \
    > "$WORK/build.out" 2>&1 &
  BUILD_PID=$!
fi
join_build() {
  [ -n "$BUILD_PID" ] || return 0
  wait "$BUILD_PID"
  BUILD_PID=
  cat "$WORK/build.out"
  if grep -q "^build	ok" "$STEPS"; then
    export APPO_BUILD_EXTENSION=1
  else
    echo "== the extension build failed (build.log): later steps use the torch gather, none builds again"
  fi
}

# 4-7. ceilings and full-size checks of the Triton kernels, then their benchmarks
step checks_triton "${SUITE[@]}" checks --part triton --out "$RUN" "${DRY[@]}"
bench bench_token_stats token_stats -k "not compiled_torch"
bench bench_linear_token_stats linear_token_stats
bench bench_future_value future_value

# 8-11. the gather, the training step, the gather's benchmark, torch.compile's
join_build
step checks_gather "${SUITE[@]}" checks --part gather --out "$RUN" "${DRY[@]}"
step train "${SUITE[@]}" train --out "$RUN" --work "$WORK" "${DRY[@]}"
bench bench_prefix_cache prefix_cache
bench bench_token_stats_compile token_stats -k compiled_torch

# 12. the GPU tests: in parallel workers when xdist is there, each test bounded when pytest-timeout is
GPU_TESTS=(tests/kernels tests/test_prefix_cache.py tests/test_scoring.py)
if [ "$DRY_RUN" = 1 ]; then
  step gpu_tests "${PYTEST[@]}" -q -m gpu --collect-only -p no:cacheprovider -p gpu_suite "${GPU_TESTS[@]}"
else
  WORKERS=$(( $(nproc) / 2 ))
  [ "$WORKERS" -gt 8 ] && WORKERS=8
  PARALLEL=()
  "$PYTHON" -c "import xdist" 2> /dev/null && [ "$WORKERS" -gt 1 ] && PARALLEL=(-n "$WORKERS")
  "$PYTHON" -c "import pytest_timeout" 2> /dev/null && PARALLEL+=(--timeout 90)
  step gpu_tests "${PYTEST[@]}" -q -m gpu -p no:cacheprovider -p gpu_suite -rfE \
    ${PARALLEL[@]+"${PARALLEL[@]}"} "${GPU_TESTS[@]}"
fi

# 13. compute-sanitizer, last. API errors (a probe of an optional driver entry point) are not counted; some
#     runtimes refuse the device ("Device not supported"): recorded as unsupported, not as appo's failure.
if [ "$DRY_RUN" = 1 ]; then
  step sanitizer "${SUITE[@]}" sanitize --dry-run
elif SANITIZER=$("$PYTHON" -c "import gpu_suite
print(gpu_suite.find_sanitizer() or '')" 2> /dev/null) && [ -n "$SANITIZER" ]; then
  step sanitizer "$SANITIZER" --tool memcheck --report-api-errors no --error-exitcode 9 "${SUITE[@]}" sanitize
  if grep -q "Device not supported" "$RUN/sanitizer.log" 2> /dev/null; then
    sed -i 's/^sanitizer\t[^\t]*/sanitizer\tunsupported/' "$STEPS"
  fi
elif selected sanitizer; then
  echo "== sanitizer: compute-sanitizer not found"
  printf 'sanitizer\tmissing\t0\t0\n' >> "$STEPS"
fi
join_build  # when checks_gather was not selected

# 14. the summary, printed last; the verdict: the plan fits, $OUT comes back whole, every step ok (a
#     sanitizer the machine's runtime refuses does not count against appo)
echo "== summary after $((SECONDS - START)) s"
RETURN_OK=1
publish || RETURN_OK=0
cat "$OUT/summary.txt"
FAILED=$(awk -F'\t' '$2 != "ok" && $2 != "unsupported" {bad = 1} END {print bad + 0}' "$STEPS")
[ "$PLAN_OK" = 1 ] || { echo "the plan overruns its budget (plan.json)"; FAILED=1; }
[ "$RETURN_OK" = 1 ] || { echo "\$OUT would not come back whole (see the summary's return line)"; FAILED=1; }
exit "$FAILED"
