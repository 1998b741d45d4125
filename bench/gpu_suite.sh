#!/usr/bin/env bash
# The whole GPU pass in one script (issue 7): build the extension with CUDA, run the GPU tests, run
# compute-sanitizer on the extension's CUDA op and one launch of each Triton kernel, then every benchmark at
# full size (T = 32,768, V = 152,064, H = 3,584, bf16; Qwen2.5-7B-shaped KV gather). Results land in
# bench/results/*.json with device, date and commit. Meant for the lent GPU machine (no internet there:
# nothing is downloaded; liger_kernel is benchmarked only if already importable).
#   usage: bash bench/gpu_suite.sh [quick]      # "quick": tests + sanitizer only
set -uo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" || exit 1

echo "== build appo._C with CUDA"
pip install --no-build-isolation --no-deps -q -e . || exit 1
python -c "import appo.prefix_cache as pc; print(pc.EXTENSION_STATUS); assert pc.EXTENSION_HAS_CUDA"

echo "== GPU tests"
pytest -q -m gpu tests/kernels tests/test_prefix_cache.py tests/test_scoring.py tests/test_attention.py
status=$?

echo "== compute-sanitizer (memcheck) on one launch of each op"
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 python - <<'PY' || status=9
import torch, appo
from appo import prefix_cache as pc
g = torch.Generator(device="cuda").manual_seed(0)
logits = torch.randn(37, 5003, device="cuda", dtype=torch.bfloat16, generator=g)
tokens = torch.randint(0, 5003, (37,), device="cuda", generator=g)
appo.token_stats(logits, tokens, impl="triton")
h = torch.randn(37, 257, device="cuda", dtype=torch.bfloat16, requires_grad=True, generator=g)
w = torch.randn(5003, 257, device="cuda", dtype=torch.bfloat16, requires_grad=True, generator=g)
appo.token_stats(hidden=h, weight=w, tokens=tokens, impl="triton").logprobs.sum().backward()
lp = torch.randn(3, 1001, device="cuda", generator=g)
appo.future_value(lp, lp + 0.1, torch.ones_like(lp, dtype=torch.bool), impl="triton")
keys = [torch.randn(4, 2, 301, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
pc.gather_kv(keys, [k.clone() for k in keys], torch.tensor([0, 1, 3], device="cuda"),
             torch.tensor([5, 300, 1], device="cuda"), 300, impl="cuda")
torch.cuda.synchronize()
print("sanitizer run finished")
PY
else
  echo "compute-sanitizer not found: skipped"
fi
[ "${1:-}" = "quick" ] && exit $status

echo "== benchmarks at full size"
pytest bench/ --benchmark-only -s -q -k "not end_to_end" || status=1
exit $status
