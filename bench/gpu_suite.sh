#!/usr/bin/env bash
# The whole GPU pass in one call on a fresh H200 (issue 13), in at most 8 minutes of wall time:
#   1. tools: python, torch (CUDA), triton, nvcc, pytest, pytest-benchmark; ninja, compute-sanitizer and
#      liger_kernel when present (the wheels in $APPO_WHEELS, default .benchmarks/wheels, e.g. Liger-Kernel's,
#      are installed offline first: carry that folder with the call); then appo made importable (an offline
#      editable install, or the tree on PYTHONPATH) on a machine where the copy is not installed;
#   2. appo._C with CUDA, built in the background while step 3 runs (python setup.py build_ext --inplace,
#      with ninja when there is one); the suite fails loudly when the CUDA op is missing;
#   3. the device's own ceilings (device-to-device copy, bf16 matmul) and full-size correctness checks:
#      token stats at T = 32,768 x V = 152,064 bf16 against fp64 on sampled rows (the last rows among them),
#      the fused LM-head forward and backward against the chunked torch path, the future-value scan;
#   4. the gather (Qwen2.5-7B-shaped caches) against its reference, once the build is done;
#   5. the benchmarks at full size against eager torch, torch.compile and (when installed) Liger-Kernel;
#   6. the GPU tests (pytest -m gpu);
#   7. compute-sanitizer (memcheck) on small launches of every op, last;
#   8. the summary: at most 40 lines of ratios, printed last.
# Steps that would overrun the budget are skipped and say so in the summary.
#
# Output. Every log and json goes to a run folder ($APPO_SUITE_DIR, else a temporary one). $OUT (the only
# folder that comes back from the GPU machine, at most 8 files) receives three: summary.txt, gpu-suite.json
# (the merged record: tools, ceilings, checks, steps and every benchmark row) and raw.tar.gz (the run folder,
# repacked after every step, so that a run cut short still returns what it measured; `python
# bench/gpu_suite.py summary --run-dir DIR --out DIR` rebuilds the other two from it).
#
#   usage: bash bench/gpu_suite.sh [--dry-run]
#   --dry-run: the same steps at tiny sizes on the CPU (Triton under TRITON_INTERPRET=1; the build step
#   only loads the CPU extension; the GPU tests are collected, not run; no sanitizer). tests/kernels/
#   test_gpu_suite.py runs it, so that the script cannot rot.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "usage: bash bench/gpu_suite.sh [--dry-run]" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-$(mktemp -d -t appo-gpu-suite-out.XXXXXX)}"
RUN="${APPO_SUITE_DIR:-$(mktemp -d -t appo-gpu-suite.XXXXXX)}"
mkdir -p "$OUT" "$RUN"
BUDGET_S="${APPO_SUITE_BUDGET_S:-480}"
START=$SECONDS
# The GPU machine's python is python3 (no plain python there); pytest from the same environment.
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
if command -v pytest > /dev/null; then PYTEST=(pytest); else PYTEST=("$PYTHON" -m pytest); fi
export PYTHONUNBUFFERED=1 APPO_BENCH_RESULTS="$RUN"
if [ "$DRY_RUN" = 1 ]; then
  export TRITON_INTERPRET=1 APPO_BENCH_TINY=1 CUDA_VISIBLE_DEVICES=""
  DRY=(--dry-run)
else
  export TRITON_INTERPRET=0
  DRY=()
fi
echo "appo GPU suite: run folder $RUN, results in $OUT (budget ${BUDGET_S}s)"

STEPS="$RUN/steps.tsv"
: > "$STEPS"
FAILED=0
publish() {  # the run folder, packed into $OUT (cheap: logs and json only)
  tar -czf "$OUT/raw.tar.gz.part" -C "$RUN" . 2> /dev/null && mv "$OUT/raw.tar.gz.part" "$OUT/raw.tar.gz"
}
# step NAME MAX_SECONDS COMMAND...: runs COMMAND with a timeout (never past the budget, keeping RESERVE_S
# for the steps after it: the sanitizer and the summary), logs to $RUN/NAME.log, records the status. A
# skipped or failed step fails the run.
RESERVE_S=80
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START) - RESERVE_S))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "== $name: skipped (budget spent)"
    printf '%s\tskipped\t0\n' "$name" >> "$STEPS"
    FAILED=1
    return
  fi
  echo "== $name (limit ${limit}s)"
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$RUN/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status=timeout
  [ "$rc" -ne 0 ] && [ "$status" = ok ] && status="failed($rc)"
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - started))" >> "$STEPS"
  tail -n 5 "$RUN/$name.log"
  [ "$status" = ok ] || FAILED=1
  publish
}

# 1. tools (wheels that travelled with the call, e.g. Liger-Kernel's, are installed first, offline)
WHEELS="${APPO_WHEELS:-.benchmarks/wheels}"
if [ "$DRY_RUN" = 0 ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PYTHON" -m pip install --no-deps --no-index -q "$WHEELS"/*.whl > "$RUN/wheels-install.log" 2>&1 \
    || echo "installing the wheels in $WHEELS failed (see wheels-install.log)"
fi
step tools 60 "$PYTHON" bench/gpu_suite.py tools --out "$RUN" "${DRY[@]}"

# appo importable as installed (kernels/ is the subpackage appo.kernels): on a machine where the clone is not
# installed (the lent GPU's fresh copy), an editable install without the extension (seconds; offline), and
# when that fails (an old setuptools, say), the tree on PYTHONPATH with appo/kernels linked to kernels/.
if ! "$PYTHON" -c "import appo.kernels" 2> /dev/null; then
  if APPO_SKIP_EXTENSION=1 "$PYTHON" -m pip install --no-deps --no-build-isolation -q -e . \
      > "$RUN/install.log" 2>&1; then
    echo "appo installed in editable mode (without the extension, built next)"
  else
    echo "editable install failed (see install.log): the tree on PYTHONPATH, appo/kernels -> kernels/"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    [ -e appo/kernels ] || ln -s ../kernels appo/kernels
  fi
fi
if "$PYTHON" -c "import appo.kernels.token_stats" >> "$RUN/install.log" 2>&1; then
  printf 'install\tok\t0\n' >> "$STEPS"
else
  echo "== install: appo.kernels cannot be imported (see install.log)"
  printf 'install\tfailed\t0\n' >> "$STEPS"
fi

# 2. the extension, built in the background (CPU only) while the Triton checks use the GPU. setup.py builds
#    appo/_C in place (ninja when installed, else one source at a time; the dry run only loads what is there),
#    then a fresh process checks that the CUDA op is registered.
BUILD_CHECK='import appo.prefix_cache as pc, sys; print(pc.EXTENSION_STATUS)
ok = pc.EXTENSION_LOADED if "--dry-run" in sys.argv else pc.EXTENSION_HAS_CUDA
sys.exit(0 if ok else "the CUDA gather op is missing: " + pc.EXTENSION_STATUS)'
BUILD_STARTED=$SECONDS
(
  if [ "$DRY_RUN" = 0 ]; then
    MAX_JOBS="${MAX_JOBS:-16}" timeout 300 "$PYTHON" setup.py build_ext --inplace > "$RUN/build.log" 2>&1 \
      || echo "setup.py build_ext failed" >> "$RUN/build.log"
  fi
  timeout 300 "$PYTHON" -c "$BUILD_CHECK" "${DRY[@]}" >> "$RUN/build.log" 2>&1
  echo $? > "$RUN/build.rc"
) &
BUILD_PID=$!

# 3. ceilings and full-size correctness of the Triton kernels
step checks_triton 150 "$PYTHON" bench/gpu_suite.py checks --part triton --out "$RUN" "${DRY[@]}"

# 4. the build's verdict, then the gather against its reference
wait "$BUILD_PID"
BUILD_RC=$(cat "$RUN/build.rc" 2> /dev/null || echo 1)
if [ "$BUILD_RC" = 0 ]; then BUILD_STATUS=ok; else BUILD_STATUS="failed($BUILD_RC)"; FAILED=1; fi
printf 'build\t%s\t%s\n' "$BUILD_STATUS" "$((SECONDS - BUILD_STARTED))" >> "$STEPS"
echo "== build: $BUILD_STATUS"; tail -n 3 "$RUN/build.log"
step checks_gather 60 "$PYTHON" bench/gpu_suite.py checks --part gather --out "$RUN" "${DRY[@]}"

# 5. the benchmarks, one pytest per module (a module that overruns its limit loses only its own figures):
#    $RUN/benchmarks-<name>.json (pytest-benchmark) and the <bench>-<time>.json files bench/_record.py writes
#    (the dry run, whose cost is mostly start-up, runs the four modules in one pytest)
if [ "$DRY_RUN" = 1 ]; then
  step bench_all 120 "${PYTEST[@]}" -q -s -p no:cacheprovider --benchmark-only \
    --benchmark-json="$RUN/benchmarks-all.json" bench/bench_token_stats.py bench/bench_linear_token_stats.py \
    bench/bench_future_value.py bench/bench_prefix_cache.py
else
  # name:limit:module:-k filter (torch.compile's build of the eager reference runs on its own: it may be long)
  for entry in "token_stats:60:token_stats:not compiled_torch" "token_stats_compile:90:token_stats:compiled_torch" \
               "linear_token_stats:100:linear_token_stats:" "future_value:40:future_value:" \
               "prefix_cache:40:prefix_cache:"; do
    IFS=: read -r name limit module filter <<< "$entry"
    select=()
    [ -n "$filter" ] && select=(-k "$filter")
    step "bench_$name" "$limit" "${PYTEST[@]}" -q -s -p no:cacheprovider --benchmark-only \
      --benchmark-json="$RUN/benchmarks-$name.json" ${select[@]+"${select[@]}"} "bench/bench_$module.py"
  done
fi

# 6. the GPU tests
GPU_TESTS=(tests/kernels tests/test_prefix_cache.py tests/test_scoring.py)
if [ "$DRY_RUN" = 1 ]; then
  step gpu_tests 60 "${PYTEST[@]}" -q -m gpu --collect-only -p no:cacheprovider "${GPU_TESTS[@]}"
else
  step gpu_tests 150 "${PYTEST[@]}" -q -m gpu -p no:cacheprovider --junitxml="$RUN/gpu-tests.xml" \
    "${GPU_TESTS[@]}"
fi

# 7. compute-sanitizer, last, on small launches of every op. Some of the lent machines' runtimes refuse it
#    ("Device not supported"): that is recorded as unsupported, not as a failure of appo's kernels.
SANITIZER=$("$PYTHON" -c "import sys; sys.path.insert(0, 'bench'); import gpu_suite; print(gpu_suite.find_sanitizer() or '')" 2> /dev/null)
if [ "$DRY_RUN" = 1 ]; then
  step sanitizer 60 "$PYTHON" bench/gpu_suite.py sanitize --dry-run
elif [ -n "$SANITIZER" ]; then
  RESERVE_S=10 step sanitizer 120 "$SANITIZER" --tool memcheck --error-exitcode 9 \
    "$PYTHON" bench/gpu_suite.py sanitize
  if grep -q "Device not supported" "$RUN/sanitizer.log" 2> /dev/null; then
    sed -i 's/^sanitizer\t[^\t]*/sanitizer\tunsupported/' "$STEPS"
  fi
else
  echo "== sanitizer: compute-sanitizer not found"
  printf 'sanitizer\tmissing\t0\n' >> "$STEPS"
  FAILED=1
fi

# 8. the summary and the merged record, printed last
"$PYTHON" - "$STEPS" "$RUN/steps.json" "$((SECONDS - START))" <<'PY'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
steps = [{"name": n, "status": s, "seconds": int(t)} for n, s, t in rows]
json.dump({"steps": steps, "total_seconds": int(sys.argv[3])}, open(sys.argv[2], "w"), indent=2)
PY
publish
echo "== summary after $((SECONDS - START)) s"
"$PYTHON" bench/gpu_suite.py summary --run-dir "$RUN" --out "$OUT"
# the verdict: every step ok (a sanitizer the machine's runtime refuses does not count against appo)
FAILED=$(awk -F'\t' '$2 != "ok" && $2 != "unsupported" {bad = 1} END {print bad + 0}' "$STEPS")
exit "$FAILED"
