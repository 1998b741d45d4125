"""The Python steps of bench/gpu_suite.sh (see there for the order): tool check, the device's own ceilings,
full-size correctness checks, the small launches compute-sanitizer runs, and the summary of ratios.

    python bench/gpu_suite.py tools    --out RUN [--dry-run]
    python bench/gpu_suite.py checks   --out RUN [--dry-run] --part triton|gather
    python bench/gpu_suite.py sanitize           [--dry-run]
    python bench/gpu_suite.py summary  --run-dir RUN --out OUT

Every step writes json into the run folder RUN; the summary reads it and writes summary.txt and the merged
gpu-suite.json into OUT (the GPU machine's $OUT, the only folder that comes back, at most 8 files).
--dry-run runs the same code at tiny sizes on the CPU (Triton under TRITON_INTERPRET=1), so that tests keep
the suite working without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Full sizes (issue 13: T = 32,768 tokens, V = 152,064, H = 3,584, bf16) and the dry run's tiny ones.
FULL = {"tokens": 32_768, "vocab": 152_064, "hidden": 3_584, "scan_rows": 64, "scan_length": 32_768,
        "gather": (28, 4, 8_192, 4, 128), "sampled_rows": 256, "last_rows": 64}
TINY = {"tokens": 64, "vocab": 1_031, "hidden": 64, "scan_rows": 4, "scan_length": 3_000,
        "gather": (3, 4, 40, 2, 16), "sampled_rows": 16, "last_rows": 8}
REQUIRED = ("torch", "triton", "pytest", "pytest_benchmark")
TARGETS = {"token_stats_copy_fraction": 0.85, "token_stats_over_eager": 3.0, "forward_tflops": 600.0,
           "fwd_bwd_over_liger": 1.0, "scan_over_dense": 100.0, "gather_copy_fraction": 0.80}


def write_json(out: Path, name: str, payload: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ tools
def find_sanitizer() -> str | None:
    """compute-sanitizer on PATH or in the CUDA toolkit beside nvcc, or None."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    nvcc = shutil.which("nvcc")
    roots = [Path(nvcc).resolve().parents[1]] if nvcc else []
    roots += [Path("/usr/local/cuda")]
    for root in roots:
        for candidate in (root / "bin" / "compute-sanitizer",
                          root / "compute-sanitizer" / "compute-sanitizer"):
            if candidate.is_file():
                return str(candidate)
    return None


def _version(module: str) -> str | None:
    """The installed version of ``module`` (its distribution's), "present" when only the module is found,
    None when it is not installed."""
    from importlib import metadata, util

    if util.find_spec(module) is None:
        return None
    for distribution in (module, module.replace("_", "-")):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "present"


def tools(out: Path, dry_run: bool) -> int:
    """Versions of everything the suite uses; exit 1 when a required one is missing."""
    report = {"python": platform.python_version(), "dry_run": dry_run, "missing": []}
    for name in REQUIRED + ("ninja", "liger_kernel", "transformers"):
        report[name] = _version(name)  # found without importing (importing transformers alone takes seconds)
        if report[name] is None and name in REQUIRED:
            report["missing"].append(name)
    import torch

    report["cuda_available"] = torch.cuda.is_available()
    report["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        report["device"] = properties.name
        report["sms"] = properties.multi_processor_count
        report["memory_gib"] = round(properties.total_memory / 2**30, 1)
    elif not dry_run:
        report["missing"].append("a CUDA device")
    nvcc = shutil.which("nvcc")
    report["nvcc"] = (subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip()
                      .splitlines()[-1] if nvcc else None)
    if nvcc is None and not dry_run:
        report["missing"].append("nvcc")
    report["compute_sanitizer"] = find_sanitizer()
    write_json(out, "tools", report)
    for key, value in report.items():
        print(f"  {key}: {value}")
    if report["missing"]:
        print(f"MISSING: {', '.join(report['missing'])}", file=sys.stderr)
        return 1
    return 0


# -------------------------------------------------------------------------------------------- ceilings
def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over ``repeats`` runs (CUDA events on GPU, perf_counter on CPU)."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def ceilings(device: str, dry_run: bool) -> dict:
    """The machine's own ceilings: device-to-device copy (bytes read + written per second) and bf16 matmul
    (an 8192^3 product and a 4,096-row LM-head chunk, the faster of the two)."""
    import torch

    copy_bytes = 2**20 if dry_run else 4 * 2**30
    source = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_s = timed(lambda: target.copy_(source), 3 if dry_run else 20)
    dtype = torch.float32 if dry_run else torch.bfloat16
    n = 128 if dry_run else 8_192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    square_s = timed(lambda: a @ b, 3 if dry_run else 20)
    rows, hidden, vocab = (64, 64, 256) if dry_run else (4_096, FULL["hidden"], FULL["vocab"])
    h = torch.randn(rows, hidden, device=device, dtype=dtype)
    w = torch.randn(vocab, hidden, device=device, dtype=dtype)
    head_s = timed(lambda: h @ w.T, 3 if dry_run else 20)
    square, head = 2 * n**3 / square_s / 1e12, 2 * rows * hidden * vocab / head_s / 1e12
    return {"copy_tb_per_s": 2 * copy_bytes / copy_s / 1e12, "copy_bytes": copy_bytes,
            "matmul_square_tflops": square, "matmul_lm_head_tflops": head, "matmul_tflops": max(square, head),
            "matmul_dtype": str(dtype)}


# ---------------------------------------------------------------------------------------- correctness
def check_token_stats(device: str, sizes: dict) -> dict:
    """Triton token stats over [T, V] bf16 logits (some rows vocabulary-masked with -inf, some peaked)
    against fp64 on sampled rows, the last rows among them (64-bit offsets: T x V > 2^31 at full size).
    Passes when the error is at most 2x that of torch's fp32 computation on the same rows (+ 2e-5)."""
    import torch

    from appo.kernels.token_stats import token_stats_triton

    tokens, vocab = sizes["tokens"], sizes["vocab"]
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(tokens, vocab, device=device, dtype=torch.bfloat16, generator=generator).mul_(2)
    sampled = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
    logits[::7, :vocab // 2] = float("-inf")  # masked vocabulary in every 7th row (first half)
    sampled[::7] = vocab // 2 + sampled[::7] % (vocab - vocab // 2)
    logits[3::11].scatter_(1, sampled[3::11, None], 40.0)  # peaked rows at the sampled token
    logprobs, entropy = token_stats_triton(logits, sampled)
    rows = torch.cat([torch.randperm(tokens, device=device, generator=generator)[:sizes["sampled_rows"]],
                      torch.arange(tokens - sizes["last_rows"], tokens, device=device)])
    errors = {}
    for compute in (torch.float64, torch.float32):
        log_p = torch.log_softmax(logits[rows].to(compute), dim=-1)
        ent = -torch.where(log_p == -math.inf, 0.0, log_p.exp() * log_p).sum(-1)
        errors[compute] = (log_p.gather(1, sampled[rows, None]).squeeze(1).double(), ent.double())
    ref_logprobs, ref_entropy = errors[torch.float64]
    fp32_logprobs, fp32_entropy = errors[torch.float32]
    result = {"rows_checked": int(rows.numel()), "last_row_checked": int(rows.max()),
              "logprob_error": (logprobs[rows].double() - ref_logprobs).abs().max().item(),
              "entropy_error": (entropy[rows].double() - ref_entropy).abs().max().item(),
              "torch_fp32_logprob_error": (fp32_logprobs - ref_logprobs).abs().max().item(),
              "torch_fp32_entropy_error": (fp32_entropy - ref_entropy).abs().max().item(),
              "all_finite": bool(torch.isfinite(logprobs).all() and torch.isfinite(entropy).all())}
    result["passed"] = (result["all_finite"]
                        and result["logprob_error"] <= 2 * result["torch_fp32_logprob_error"] + 2e-5
                        and result["entropy_error"] <= 2 * result["torch_fp32_entropy_error"] + 2e-5)
    return result


def check_linear(device: str, sizes: dict) -> dict:
    """Fused LM-head forward and chunked backward (Triton + cuBLAS) against the chunked torch path (fp32
    math) at [N, H] x [V, H] bf16: statistics within 2e-3 (fp32 sums in different orders over bf16
    products), gradients within 2e-2 of the reference's largest entry (bf16 outputs round at 4e-3)."""
    import torch

    from appo.kernels.linear_token_stats import linear_token_stats_triton
    from appo.ops.linear_token_stats import linear_token_stats_torch

    n, v, h = sizes["tokens"], sizes["vocab"], sizes["hidden"]
    generator = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(n, h, device=device, dtype=torch.bfloat16, generator=generator)
    weight = (torch.randn(v, h, device=device, generator=generator) * (3.0 / h**0.5)).to(torch.bfloat16)
    tokens = torch.randint(0, v, (n,), device=device, generator=generator)
    upstream = torch.randn(n, device=device, generator=generator)
    outputs = {}
    for name, fn in (("triton", linear_token_stats_triton), ("torch", linear_token_stats_torch)):
        leaf_hidden = hidden.clone().requires_grad_()
        leaf_weight = weight.clone().requires_grad_()
        logprobs, entropy = fn(leaf_hidden, leaf_weight, tokens)
        logprobs.backward(upstream)
        outputs[name] = (logprobs.detach(), entropy, leaf_hidden.grad, leaf_weight.grad)
        del leaf_hidden, leaf_weight, logprobs
        if device == "cuda":
            torch.cuda.empty_cache()
    result = {}
    for index, name in enumerate(("logprobs", "entropy", "grad_hidden", "grad_weight")):
        got, want = outputs["triton"][index].double(), outputs["torch"][index].double()
        error = (got - want).abs().max().item()
        result[f"{name}_error"] = error
        if name.startswith("grad"):
            result[f"{name}_relative_error"] = error / max(want.abs().max().item(), 1e-30)
    result["passed"] = (result["logprobs_error"] <= 2e-3 and result["entropy_error"] <= 2e-3
                        and result["grad_hidden_relative_error"] <= 2e-2
                        and result["grad_weight_relative_error"] <= 2e-2)
    return result


def check_scan(device: str, sizes: dict) -> dict:
    """Triton future-value scan (both chunk paths) against the fp64 torch scan: error at most 1e-5 of the
    discounted sum of |d| (plus 1e-35)."""
    import torch

    from appo.kernels.future_value import discounted_log_ratio_sum_triton
    from appo.ops.future_value import discounted_log_ratio_sum_torch

    rows, length = sizes["scan_rows"], sizes["scan_length"]
    generator = torch.Generator(device=device).manual_seed(2)
    logprobs = -4 * torch.rand(rows, length, device=device, generator=generator)
    old = logprobs + 0.3 * torch.randn(rows, length, device=device, generator=generator)
    mask = torch.rand(rows, length, device=device, generator=generator) < 0.8
    result = {"passed": True}
    for gamma in (2 ** (-1 / 32), 0.5):
        got = discounted_log_ratio_sum_triton(logprobs, old, mask, gamma)
        want = discounted_log_ratio_sum_torch(logprobs, old, mask, gamma)
        scale = discounted_log_ratio_sum_torch((logprobs - old).abs(), torch.zeros_like(old), mask, gamma)
        worst = ((got - want).abs() / (1e-5 * scale + 1e-35)).max().item()
        result[f"gamma_{gamma:.4f}_worst_error_over_tolerance"] = worst
        result["passed"] &= worst <= 1.0
    return result


def check_gather(device: str, sizes: dict) -> dict:
    """The extension's gather against the torch reference, bitwise, on a Qwen2.5-7B-shaped cache (28
    layers, 4 rollouts x 8,192 positions, 4 KV heads of 128, bf16) in the contiguous and time-major
    layouts; fails when the extension (with its CUDA kernel, on a GPU) is not loaded."""
    import torch

    from appo import prefix_cache as pc

    impl = "cuda" if device == "cuda" else "cpp"
    result = {"extension": pc.EXTENSION_STATUS, "impl": impl}
    ready = pc.EXTENSION_HAS_CUDA if device == "cuda" else pc.EXTENSION_LOADED
    if not ready:
        result["passed"] = False
        return result
    layers, rollouts, length, heads, dim = sizes["gather"]
    generator = torch.Generator(device=device).manual_seed(3)
    src = torch.arange(12, device=device) % rollouts  # 12 branches spread over the rollouts
    cached = torch.randint(0, length, (src.numel(),), device=device, generator=generator)
    cached[0] = length
    passed = True
    for layout in ("contiguous", "time_major"):
        def one():
            if layout == "time_major":
                return torch.randn(rollouts, length, heads, dim, device=device, dtype=torch.bfloat16,
                                   generator=generator).transpose(1, 2)
            return torch.randn(rollouts, heads, length, dim, device=device, dtype=torch.bfloat16,
                               generator=generator)
        keys, values = [one() for _ in range(layers)], [one() for _ in range(layers)]
        got = pc.gather_kv(keys, values, src, cached, length, impl=impl)
        want = pc.gather_kv(keys, values, src, cached, length, impl="torch")
        same = all(torch.equal(g, w) for g, w in zip(got[0] + got[1], want[0] + want[1]))
        result[f"{layout}_bitwise_equal"] = same
        passed &= same
        del keys, values, got, want
    result["passed"] = passed
    return result


def checks(out: Path, dry_run: bool, part: str) -> int:
    import torch

    device = "cpu" if dry_run else "cuda"
    sizes = TINY if dry_run else FULL
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
              "sizes": sizes, "dry_run": dry_run}
    steps = {"triton": [("ceilings", lambda: ceilings(device, dry_run)),
                        ("token_stats", lambda: check_token_stats(device, sizes)),
                        ("linear_token_stats", lambda: check_linear(device, sizes)),
                        ("future_value", lambda: check_scan(device, sizes))],
             "gather": [("gather_prefix_kv", lambda: check_gather(device, sizes))]}[part]
    failed = False
    for name, step in steps:
        started = time.perf_counter()
        try:
            report[name] = step()
        except Exception as err:  # record and go on: the summary says which check broke and how
            report[name] = {"passed": False, "error": f"{type(err).__name__}: {err}"[-2000:]}
        report[name]["seconds"] = round(time.perf_counter() - started, 2)
        failed |= report[name].get("passed") is False
        print(f"  {name}: {json.dumps(report[name], default=str)[:400]}")
        if device == "cuda":
            torch.cuda.empty_cache()
    write_json(out, f"checks-{part}", report)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------- sanitizer
def sanitize(dry_run: bool) -> int:
    """One small launch of every op (what compute-sanitizer watches): token stats, fused forward and
    backward (several splits and chunks), both future-value paths over several chunks, the CUDA gather."""
    import torch

    import appo

    device = "cpu" if dry_run else "cuda"
    vocab, hidden_size = (503, 40) if dry_run else (5003, 257)
    generator = torch.Generator(device=device).manual_seed(4)
    logits = torch.randn(37, vocab, device=device, dtype=torch.bfloat16, generator=generator)
    tokens = torch.randint(0, vocab, (37,), device=device, generator=generator)
    logits[5, :vocab // 2] = float("-inf")
    tokens[5] = vocab - 3
    impl = "torch" if dry_run and os.environ.get("TRITON_INTERPRET") != "1" else "triton"
    appo.token_stats(logits, tokens, impl=impl)
    hidden = torch.randn(37, hidden_size, device=device, dtype=torch.bfloat16, generator=generator)
    weight = torch.randn(vocab, hidden_size, device=device, dtype=torch.bfloat16, generator=generator)
    hidden.requires_grad_()
    weight.requires_grad_()
    from appo.kernels.linear_token_stats import linear_token_stats_triton

    linear_token_stats_triton(hidden, weight, tokens, chunk_rows=16)[0].sum().backward()
    logprobs = torch.randn(3, 2100, device=device, generator=generator)
    for gamma in (2 ** (-1 / 32), 0.5):
        appo.future_value(logprobs, logprobs + 0.1, torch.ones_like(logprobs, dtype=torch.bool), gamma=gamma,
                          impl=impl)
    from appo import prefix_cache as pc

    if pc.EXTENSION_LOADED:
        keys = [torch.randn(4, 2, 301, 128, device=device, dtype=torch.bfloat16, generator=generator)
                for _ in range(3)]
        values = [k.transpose(1, 2).contiguous().transpose(1, 2) for k in keys]  # time-major: strided rows
        pc.gather_kv(keys, values, torch.tensor([0, 1, 3], device=device),
                     torch.tensor([5, 300, 1], device=device), 300,
                     impl="cuda" if device == "cuda" else "cpp")
    if device == "cuda":
        torch.cuda.synchronize()
    print("sanitizer launches finished")
    return 0


# ------------------------------------------------------------------------------------------- summary
def _benchmarks(out: Path) -> list[dict]:
    """Every benchmark of the run (benchmarks-<module>.json), as its extra_info row."""
    rows = []
    for path in sorted(out.glob("benchmarks-*.json")):
        for bench in json.loads(path.read_text()).get("benchmarks", []):
            rows.append({**bench.get("extra_info", {}), "name": bench["name"],
                         "median_s": bench.get("extra_info", {}).get("median_s", bench["stats"]["median"])})
    return rows


def _find(rows: list[dict], **match) -> dict | None:
    for row in rows:
        if all(row.get(key) == value for key, value in match.items()):
            return row
    return None


DRY_RUN_VERDICT = False  # set by summary_lines: in a dry run the figures are CPU ones, never judged


def _verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if DRY_RUN_VERDICT:
        return "dry run"
    if value is None:
        return "not measured"
    ok = value >= target if higher_is_better else value <= target
    return "MET" if ok else "MISSED"


def load_json(run: Path, name: str) -> dict:
    path = run / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def summary_lines(out: Path) -> list[str]:
    """At most 40 lines: the run, the ceilings, the checks, and each acceptance ratio against its target
    (``out``: the run folder)."""
    def load(name):
        return load_json(out, name)

    global DRY_RUN_VERDICT
    tools_report, triton_checks, gather_checks = load("tools"), load("checks-triton"), load("checks-gather")
    DRY_RUN_VERDICT = bool(tools_report.get("dry_run"))
    steps = load("steps").get("steps", [])
    rows = _benchmarks(out)
    lines = [f"appo GPU suite: {tools_report.get('device', 'no GPU')} | torch {tools_report.get('torch')} "
             f"(CUDA {tools_report.get('torch_cuda')}) | triton {tools_report.get('triton')} | "
             f"liger {tools_report.get('liger_kernel') or 'absent'}"
             + (" | DRY RUN (CPU, tiny sizes)" if tools_report.get("dry_run") else "")]
    lines.append("steps: " + ", ".join(f"{s['name']} {s['status']} {s['seconds']}s" for s in steps))
    ceiling = triton_checks.get("ceilings", {})
    copy_tbs, matmul = ceiling.get("copy_tb_per_s"), ceiling.get("matmul_tflops")
    if copy_tbs:
        lines.append(f"ceilings: copy {copy_tbs:.2f} TB/s (read+write), {ceiling['matmul_dtype']} matmul "
                     f"{matmul:.0f} TFLOP/s (square {ceiling['matmul_square_tflops']:.0f}, LM-head chunk "
                     f"{ceiling['matmul_lm_head_tflops']:.0f})")
    for name, check in list(triton_checks.items()) + list(gather_checks.items()):
        if isinstance(check, dict) and "passed" in check:
            detail = {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in check.items()
                      if k.endswith(("error", "equal", "over_tolerance"))
                      or (k == "extension" and not check["passed"])}
            lines.append(f"check {name}: {'PASS' if check['passed'] else 'FAIL'} {detail}"[:230])

    token = {impl: _find(rows, impl=impl, bench="token_stats") for impl in
             ("appo_triton", "appo_torch", "eager_torch", "compiled_torch", "copy_ceiling")}
    t = token["appo_triton"] or token["appo_torch"]  # the torch path only in a dry run (no GPU)
    if t:
        fraction = t["gb_per_s"] / 1e3 / copy_tbs if copy_tbs else None
        over_eager = token["eager_torch"]["median_s"] / t["median_s"] if token["eager_torch"] else None
        parts = [f"{t['median_s'] * 1e3:.3f} ms, {t['gb_per_s'] / 1e3:.2f} TB/s = "
                 f"{fraction or float('nan'):.2f} "
                 f"of copy [{_verdict(fraction, TARGETS['token_stats_copy_fraction'])} >= 0.85]",
                 f"{over_eager or float('nan'):.1f}x eager [{_verdict(over_eager, 3.0)} >= 3]"]
        if token["compiled_torch"]:
            parts.append(f"{token['compiled_torch']['median_s'] / t['median_s']:.1f}x torch.compile")
        lines.append(f"token stats ({t['impl']}): " + "; ".join(parts))
    ours = "appo_triton" if _find(rows, impl="appo_triton", bench="linear_token_stats") else "appo_torch"
    forward = _find(rows, impl=ours, mode="forward", bench="linear_token_stats")
    if forward:
        lines.append(f"fused forward ({ours}): {forward['median_s'] * 1e3:.1f} ms, "
                     f"{forward['tflops']:.0f} TFLOP/s = "
                     f"{forward['tflops'] / matmul if matmul else float('nan'):.2f} of matmul "
                     f"[{_verdict(forward['tflops'], TARGETS['forward_tflops'])} >= 600]")
    both = _find(rows, impl=ours, mode="forward_backward", bench="linear_token_stats")
    liger = _find(rows, impl="liger", mode="forward_backward", bench="linear_token_stats")
    if both:
        ratio = both["median_s"] / liger["median_s"] if liger and "median_s" in liger else None
        lines.append(f"fused fwd+bwd: {both['median_s'] * 1e3:.1f} ms ({both['tflops_executed']:.0f} TFLOP/s "
                     f"executed); " + (f"{ratio:.2f}x Liger's {liger['median_s'] * 1e3:.1f} ms "
                                       f"[{_verdict(ratio, 1.0, higher_is_better=False)} <= 1]"
                                       if ratio else "Liger not run (no wheel)"))
    scan = [r for r in rows if r.get("bench") == "future_value" and r.get("impl") == "appo_triton"]
    torch_scan = [r for r in rows if r.get("bench") == "future_value" and r.get("impl") == "appo_torch"]
    for row in scan or torch_scan:
        speedup = row.get("speedup_over_dense")
        lines.append(f"future value ({row['impl']}) B={row['rows']} T={row['length']}: "
                     f"{row['median_s'] * 1e6:.1f} us, "
                     f"{speedup or float('nan'):.0f}x dense [{_verdict(speedup, 100.0)} >= 100]")
    gather = _find(rows, bench="gather", impl="cuda") or _find(rows, bench="gather", impl="cpp")
    if gather:
        fraction = gather["gb_per_s"] / 1e3 / copy_tbs if copy_tbs else None
        lines.append(f"gather {gather['case']} ({gather['impl']}): {gather['median_s'] * 1e3:.2f} ms, "
                     f"{gather['gb_per_s'] / 1e3:.2f} TB/s = {fraction or float('nan'):.2f} of copy "
                     f"[{_verdict(fraction, TARGETS['gather_copy_fraction'])} >= 0.80]")
    sanitizer = (out / "sanitizer.log")
    if sanitizer.exists():
        text = sanitizer.read_text()
        tail = [line for line in text.splitlines() if "ERROR SUMMARY" in line] or text.splitlines()[-1:]
        lines.append(f"compute-sanitizer: {tail[-1].strip() if tail else 'no output'}")
    return lines[:40]


def summary(run: Path, out: Path) -> int:
    """summary.txt and gpu-suite.json (tools, checks, steps, every benchmark row, the summary) into out."""
    lines = summary_lines(run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    sanitizer = run / "sanitizer.log"
    record = {name: load_json(run, name) for name in ("tools", "checks-triton", "checks-gather", "steps")}
    record.update(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), commit=_commit(),
                  targets=TARGETS, benchmarks=_benchmarks(run), summary=lines,
                  sanitizer_tail=sanitizer.read_text().splitlines()[-20:] if sanitizer.exists() else None)
    write_json(out, "gpu-suite", record)
    print("\n".join(lines))
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["tools", "checks", "sanitize", "summary"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--part", choices=["triton", "gather"], default="triton")
    parser.add_argument("--run-dir", type=Path, default=None, help="summary: the run folder to read")
    args = parser.parse_args(argv)
    if args.step != "sanitize" and args.out is None:
        parser.error("--out is required")
    if args.step == "tools":
        return tools(args.out, args.dry_run)
    if args.step == "checks":
        return checks(args.out, args.dry_run, args.part)
    if args.step == "sanitize":
        return sanitize(args.dry_run)
    return summary(args.run_dir or args.out, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
