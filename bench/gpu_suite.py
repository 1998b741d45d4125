"""The Python steps of bench/gpu_suite.sh (see there for the order), its plan, and the pytest plugin that
records each test and benchmark as it ends.

    python bench/gpu_suite.py plan     [--check] [--shell] [--out RUN]
    python bench/gpu_suite.py setup    --out RUN --site DIR [--wheels DIR]
    python bench/gpu_suite.py tools    --out RUN [--dry-run]
    python bench/gpu_suite.py build    --out RUN [--dry-run]
    python bench/gpu_suite.py checks   --out RUN [--dry-run] --part triton|gather
    python bench/gpu_suite.py train    --out RUN --work DIR [--dry-run]
    python bench/gpu_suite.py sanitize           [--dry-run]
    python bench/gpu_suite.py publish  --run-dir RUN --out OUT
    python bench/gpu_suite.py summary  --run-dir RUN --out OUT

Every step writes its own json into the run folder RUN as it ends (pytest steps: one json line per test as
it ends, through ``-p gpu_suite``), each record carrying the commit (``$APPO_COMMIT``: no .git travels to
the GPU machine). ``publish`` rebuilds summary.txt and the merged gpu-suite.json from RUN, packs RUN into
raw.tar.gz, all three into OUT (the GPU machine's $OUT: at most 8 files come back), and checks OUT against
the return limits. --dry-run runs the same code at tiny sizes on the CPU (Triton under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

# Imports: appo from the private site folder (bench/gpu_suite.sh puts it on PYTHONPATH) or an installed copy,
# never from the tree's root (its kernels/ would shadow the Hugging Face `kernels`); bench/_record (the commit,
# shared with the benchmarks) from bench/: the script's own folder, or PYTHONPATH under PYTHONSAFEPATH.
REPO = Path(__file__).resolve().parents[1]

# Full sizes (issue 13: T = 32,768 tokens, V = 152,064, H = 3,584, bf16) and the dry run's tiny ones.
FULL = {"tokens": 32_768, "vocab": 152_064, "hidden": 3_584, "scan_rows": 64, "scan_length": 32_768,
        "gather": (28, 4, 8_192, 4, 128), "sampled_rows": 256, "last_rows": 64}
TINY = {"tokens": 64, "vocab": 1_031, "hidden": 64, "scan_rows": 4, "scan_length": 3_000,
        "gather": (3, 4, 40, 2, 16), "sampled_rows": 16, "last_rows": 8}
REQUIRED = ("torch", "triton", "pytest", "pytest_benchmark")
OPTIONAL = ("ninja", "liger_kernel", "transformers", "tokenizers", "xdist", "pytest_timeout")
# Targets as fractions of the ceilings this run measured on its own card (copy bandwidth, matmul in the
# benchmark dtype), so that one summary reads right on an H100 (~3.0 TB/s, ~800 TFLOP/s bf16 as seen on
# this workplace's machines) or an H200 (~4.3 TB/s, ~790 TFLOP/s); the others are ratios of two timings.
TARGETS = {"token_stats_copy_fraction": 0.85, "token_stats_over_eager": 3.0, "forward_matmul_fraction": 0.75,
           "fwd_bwd_over_liger": 1.0, "scan_over_dense": 100.0, "gather_copy_fraction": 0.80}
# What comes back from the GPU machine's $OUT (the device tool's limits).
RETURN_LIMITS = {"files": 8, "file_bytes": 16 * 2**20, "total_bytes": 64 * 2**20, "depth": 2}
PACKED_FILE_BYTES = 2 * 2**20  # a log longer than this travels as its last 2 MiB


# ------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class PlanStep:
    """One step of the GPU pass: its name (its log and json in the run folder), its time limit in seconds,
    and, for a step run in the background, the step before which it must have finished."""

    name: str
    limit_s: int
    what: str
    joins_before: str | None = None


BUDGET_S = 480  # the whole pass, installs, the extension build and the summary included
PLAN = (
    PlanStep("setup", 15, "carried wheels installed offline into a private folder, appo copied beside them"),
    PlanStep("tools", 15, "versions, the device, which optional tools are there"),
    PlanStep("build", 180, "appo._C with its CUDA kernel, for this device only, in the background",
             joins_before="checks_gather"),
    PlanStep("checks_triton", 75, "the ceilings; token stats, fused LM head and scan at full size"),
    PlanStep("bench_token_stats", 30, "token stats vs eager torch and the copy"),
    PlanStep("bench_linear_token_stats", 50, "fused LM head vs the chunked torch path, Liger, the matmul"),
    PlanStep("bench_future_value", 25, "the scan vs the dense form"),
    PlanStep("checks_gather", 20, "the CUDA gather, bitwise, on a Qwen2.5-7B-shaped cache"),
    PlanStep("train", 70, "appo train, 2 steps on CUDA: a random Llama, bf16 autocast, the kernels"),
    PlanStep("bench_prefix_cache", 20, "the gather vs the torch reference and the copy"),
    PlanStep("bench_token_stats_compile", 45, "torch.compile of the eager reference, cold start included"),
    PlanStep("gpu_tests", 60, "pytest -m gpu in parallel workers"),
    PlanStep("sanitizer", 45, "compute-sanitizer memcheck on small launches of every op"),
    PlanStep("summary", 10, "the summary and the record, packed into $OUT (kept in reserve)"),
)


def plan_wall_s(plan=PLAN) -> int:
    """The longest the plan can take: the foreground limits in order, plus whatever of a background step's
    limit is still left when the step it joins before comes up."""
    elapsed, waiting = 0, {}  # join step -> the time its background step may run until
    for step in plan:
        if step.name in waiting:
            elapsed = max(elapsed, waiting.pop(step.name))
        if step.joins_before:
            waiting[step.joins_before] = elapsed + step.limit_s
        else:
            elapsed += step.limit_s
    return max([elapsed, *waiting.values()])


def check_plan(plan=PLAN, budget_s: int = BUDGET_S) -> list[str]:
    """What is wrong with ``plan`` (empty when nothing): names unique and file-safe, limits positive, each
    background step joined by a later step, and the longest run within ``budget_s``."""
    problems, names = [], [step.name for step in plan]
    if len(set(names)) != len(names):
        problems.append(f"step names repeat: {names}")
    for index, step in enumerate(plan):
        if not re.fullmatch(r"[a-z0-9_]+", step.name) or step.limit_s <= 0:
            problems.append(f"{step.name}: a name of [a-z0-9_] and a positive limit, got {step.limit_s}")
        if step.joins_before and step.joins_before not in names[index + 1:]:
            problems.append(f"{step.name}: joins before {step.joins_before!r}, which does not come after it")
    wall = plan_wall_s(plan)
    if wall > budget_s:
        problems.append(f"the limits add up to {wall} s, over the {budget_s} s budget")
    return problems


def plan_command(out: Path | None, check: bool, shell: bool, dry_run: bool = False, scale: int = 1) -> int:
    """Print the plan (as shell assignments with --shell, every limit and the budget times ``scale``), write
    plan.json into ``out``; with --check, exit 1 when the plan does not fit its budget."""
    problems = check_plan()
    if shell:
        print(f"BUDGET_S={BUDGET_S * scale}")
        for step in PLAN:
            print(f"LIMIT_{step.name}={step.limit_s * scale}")
        return 0
    for step in PLAN:
        where = f" (background, done before {step.joins_before})" if step.joins_before else ""
        print(f"  {step.name:<26} {step.limit_s:>4} s  {step.what}{where}")
    print(f"  at most {plan_wall_s()} s of the {BUDGET_S} s budget")
    for problem in problems:
        print(f"PLAN: {problem}")
    if out is not None:
        write_json(out, "plan", {"budget_s": BUDGET_S, "wall_s": plan_wall_s(), "problems": problems,
                                 "dry_run": dry_run,
                                 "steps": [step.__dict__ for step in PLAN]})
    return 1 if check and problems else 0


# --------------------------------------------------------------------------------------------- records
def commit() -> str:
    """The commit the results belong to: $APPO_COMMIT (the GPU machine gets no .git), else git's HEAD."""
    from _record import git_commit

    return git_commit()


def write_json(out: Path, name: str, payload: dict) -> Path:
    """``out/name.json`` holding ``payload`` and the commit (``payload``'s own, if it names one), written
    whole (a reader never sees half)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    part = path.with_suffix(".json.part")
    part.write_text(json.dumps({"commit": commit(), **payload}, indent=2, default=str) + "\n")
    os.replace(part, path)
    return path


def _append_record(line: dict) -> None:
    """One json line into the file $APPO_SUITE_RECORD names (the step's .jsonl), if it names one."""
    path = os.environ.get("APPO_SUITE_RECORD")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({**line, "commit": commit()}, default=str) + "\n")


# ------------------------------------------------------------------------- pytest plugin (-p gpu_suite)
def pytest_runtest_logreport(report) -> None:
    """Each test's outcome as it ends (in the xdist controller only, which sees every worker's reports)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # an xdist worker: its controller writes the line
    if report.when != "call" and report.outcome == "passed":
        return
    line = {"kind": "test", "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
            "seconds": round(report.duration, 3)}
    if report.failed:
        line["error"] = str(report.longrepr)[-800:]
    _append_record(line)


def pytest_runtest_makereport(item, call):
    """A benchmark's row (its extra_info and median) as soon as its test body returns; returns None, so
    pytest makes the report as usual."""
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if call.when != "call" or call.excinfo is not None or bench is None or not bench.extra_info:
        return
    stats = getattr(getattr(bench, "stats", None), "stats", None)
    median = bench.extra_info.get("median_s", getattr(stats, "median", None))
    _append_record({"kind": "benchmark", "nodeid": item.nodeid, **bench.extra_info, "median_s": median,
                    "test_seconds": round(call.duration, 3)})
    return


# ------------------------------------------------------------------------------------------ setup, tools
def setup(out: Path, site: Path, wheels: Path | None) -> int:
    """The private site folder the later steps import from (PYTHONPATH): the carried wheels installed by pip
    (offline, no dependencies, no version check, into ``site``: the machine's own environment is not
    touched), and appo laid out as its wheel installs it (appo/, kernels/ as appo/kernels, csrc/ as
    appo/_csrc), copied from the tree: nothing to build, nothing fetched."""
    started = time.perf_counter()
    site.mkdir(parents=True, exist_ok=True)
    report = {"site": str(site), "wheels": sorted(p.name for p in wheels.glob("*.whl")) if wheels else []}
    if report["wheels"]:
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--disable-pip-version-check", "--root-user-action=ignore", "--upgrade",
                   "--target", str(site),
                   *(str(wheels / name) for name in report["wheels"])]
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        report["pip_rc"], report["pip_output"] = done.returncode, (done.stdout + done.stderr)[-2000:]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.rmtree(site / "appo", ignore_errors=True)
    shutil.copytree(REPO / "appo", site / "appo", ignore=ignore, symlinks=True)
    shutil.copytree(REPO / "kernels", site / "appo" / "kernels", ignore=ignore)
    shutil.copytree(REPO / "csrc", site / "appo" / "_csrc", ignore=ignore)
    report["seconds"] = round(time.perf_counter() - started, 2)
    write_json(out, "setup", report)
    print(json.dumps(report, indent=1)[:2000])
    return 1 if report.get("pip_rc") else 0


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
    for distribution in (module, module.replace("_", "-"), f"pytest-{module}"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "present"


def tools(out: Path, dry_run: bool) -> int:
    """Versions of everything the suite uses, where appo is imported from; exit 1 when a required one is
    missing."""
    report = {"python": platform.python_version(), "executable": sys.executable, "dry_run": dry_run,
              "missing": []}
    for name in REQUIRED + OPTIONAL:
        report[name] = _version(name)  # found without importing (importing transformers alone takes seconds)
        if report[name] is None and name in REQUIRED:
            report["missing"].append(name)
    import torch

    import appo

    report["appo_from"] = str(Path(appo.__file__).parent)
    report["cuda_available"] = torch.cuda.is_available()
    report["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        report["device"] = properties.name
        report["capability"] = f"{properties.major}.{properties.minor}"
        report["sms"] = properties.multi_processor_count
        report["memory_gib"] = round(properties.total_memory / 2**30, 1)
    elif not dry_run:
        report["missing"].append("a CUDA device")
    nvcc = shutil.which("nvcc")
    version = nvcc and subprocess.run([nvcc, "--version"], check=False, capture_output=True, text=True)
    report["nvcc"] = version.stdout.strip().splitlines()[-1] if version and version.stdout.strip() else None
    if nvcc is None and not dry_run:
        report["missing"].append("nvcc")
    report["compute_sanitizer"] = find_sanitizer()
    report["cpus"] = os.cpu_count()
    write_json(out, "tools", report)
    for key, value in report.items():
        print(f"  {key}: {value}")
    if report["missing"]:
        print(f"MISSING: {', '.join(report['missing'])}", file=sys.stderr)
        return 1
    return 0


def build(out: Path, dry_run: bool) -> int:
    """appo._C through its own first-use build (appo/_extension.py: ninja, cached for the later steps), for
    this device's architecture only (TORCH_CUDA_ARCH_LIST) with a job per CPU; exit 1 when the CUDA gather
    (the dry run: the C++ one) is not registered afterwards. The caller bounds it with a timeout and, when it
    fails, turns the first-use build off for every later process (APPO_BUILD_EXTENSION=0)."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    started = time.perf_counter()
    from appo import prefix_cache as pc

    report = {"status": pc.EXTENSION_STATUS, "loaded": pc.EXTENSION_LOADED, "has_cuda": pc.EXTENSION_HAS_CUDA,
              "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"), "seconds": 0.0}
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["passed"] = report["loaded"] if dry_run else report["has_cuda"]
    write_json(out, "build", report)
    print(json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


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
    (an 8192^3 product and a 4,096-row LM-head chunk, the faster of the two), inputs drawn on the device."""
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
    layers, 4 rollouts x 8,192 positions, 4 KV heads of 128, bf16, drawn on the device) in the contiguous
    and time-major layouts; fails when the extension (with its CUDA kernel, on a GPU) is not loaded."""
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
    """The checks of ``part`` one after another, checks-<part>.json rewritten after each one."""
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
        write_json(out, f"checks-{part}", report)
        if device == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------- the training
TOKENIZER_VOCAB = 8_192
# The policy appo train starts from (random weights, written by the step itself: no weights travel).
TRAIN_MODEL = {"gpu": {"hidden_size": 576, "num_hidden_layers": 8, "num_attention_heads": 9,
                       "num_key_value_heads": 3, "intermediate_size": 1_536},
               "cpu": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "intermediate_size": 128}}
# The run: arithmetic (generated, no data), the calculator tool (no sandbox needed on the GPU machine).
TRAIN_SETTINGS = {
    "common": ["data.task=arithmetic", "data.tool=calculator", "data.few_shot=1",
               "rollout.response_prefix=''", "rollout.max_prompt_tokens=224", "algo.name=appo",
               "optim.minibatches_per_step=2", "eval_at_end=false", "checkpoint_every=1",
               "keep_checkpoints=1", "seed=0"],
    "gpu": ["device=cuda", "bf16=true", "prompts_per_step=8", "algo.rollouts_per_prompt=8",
            "algo.initial_rollouts=4", "algo.appo.branches_per_rollout=1",
            "rollout.max_new_tokens_per_turn=48", "rollout.max_total_tokens=320", "data.train_size=64"],
    "cpu": ["device=cpu", "threads=1", "prompts_per_step=2", "algo.rollouts_per_prompt=4",
            "algo.initial_rollouts=2", "algo.appo.branches_per_rollout=1",
            "rollout.max_new_tokens_per_turn=16", "rollout.max_total_tokens=256", "data.train_size=8"],
}
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_train_model(folder: Path, shape: dict, seed: int = 0) -> dict:
    """A transformers model folder that ``appo train model.name_or_path=folder`` loads: a byte-level BPE
    tokenizer of TOKENIZER_VOCAB tokens trained on appo's own sources and docs (they travel with the tree;
    the GPU machine has no hub and no SmolLM2), a ChatML chat template, and a randomly initialised Llama
    of ``shape`` (float32, seeded). Returns {"vocab", "parameters", "seconds"}."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    started = time.perf_counter()
    corpus = [path.read_text(encoding="utf-8") for pattern in ("appo/**/*.py", "docs/*.md", "README.md")
              for path in sorted(REPO.glob(pattern))]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1_024, tie_word_embeddings=False,
                         bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"vocab": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()), **shape,
            "seconds": round(time.perf_counter() - started, 2)}


def _count_backends() -> dict:
    """Counts, by name, the calls of each backend a training step can take: the fused LM head (Triton or
    torch, with the dtype it got), the future-value scan, and the implementation the gather chose. The
    trainer looks these up at call time, so wrapping the module attributes sees every call."""
    import appo.kernels.future_value as triton_scan
    import appo.kernels.linear_token_stats as triton_head

    import appo.ops.future_value as torch_scan
    import appo.ops.linear_token_stats as torch_head
    from appo import prefix_cache

    counts: dict[str, int] = {}

    def count(name):
        counts[name] = counts.get(name, 0) + 1

    def wrap(module, attribute, label):
        original = getattr(module, attribute)

        def counted(*args, **kwargs):
            dtype = getattr(args[0], "dtype", None) if args else None
            count(f"{label}[{str(dtype).replace('torch.', '')}]" if dtype is not None else label)
            return original(*args, **kwargs)
        setattr(module, attribute, counted)

    wrap(triton_head, "linear_token_stats_triton", "lm_head_triton")
    wrap(torch_head, "linear_token_stats_torch", "lm_head_torch")
    wrap(triton_scan, "discounted_log_ratio_sum_triton", "scan_triton")
    wrap(torch_scan, "discounted_log_ratio_sum_torch", "scan_torch")
    choose = prefix_cache._choose_impl

    def chosen(impl, device):
        result = choose(impl, device)
        count(f"gather_{result}")
        return result
    prefix_cache._choose_impl = chosen
    return counts


STEP_FIELDS = ("step", "time/step", "time/rollout", "time/old_logprobs", "time/branch", "time/update",
               "rollouts", "branches", "response_length", "reward", "grad_norm", "bs_entropy_only",
               "omega_min", "omega_max", "loss/ratio_max", "loss/ratio_mean", "loss/approx_kl")


def train(out: Path, work: Path, dry_run: bool) -> int:
    """``appo train`` (its entry point, in this process) for two steps from a random Llama: step 1 at lr = 0,
    where pi_old, recomputed before the update, must equal pi_theta bit for bit (every Branching Score
    entropy-only, Omega = 1, PPO ratio 1), then step 2 resumed from step 1's checkpoint at the config's lr.
    On the GPU: bf16 autocast, the fused Triton LM head and scan, the CUDA gather for the branches. Records
    per step the time of each phase, per call the peak memory, and which backends ran; train.json is
    rewritten after each call, so a step cut short keeps step 1."""
    import torch

    from appo.cli import main as appo

    kind = "cpu" if dry_run else "gpu"
    folder, run_dir = work / "train-model", work / "train-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    report = {"dry_run": dry_run, "device": torch.cuda.get_device_name(0) if not dry_run else "cpu",
              "model": make_train_model(folder, TRAIN_MODEL[kind]), "calls": [], "steps": []}
    counts = _count_backends()
    settings = [f"model.name_or_path={folder}", f"output_dir={run_dir}", *TRAIN_SETTINGS["common"],
                *TRAIN_SETTINGS[kind]]
    for steps, extra in ((1, ["optim.lr=0"]), (2, ["--allow-config-change"])):
        argv = ["train", *settings, f"steps={steps}", *extra]
        if not dry_run:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            rc = appo(argv)
        except SystemExit as exit_:  # a usage error: appo prints it and exits
            rc = exit_.code
        call = {"argv": argv, "rc": rc, "seconds": round(time.perf_counter() - started, 2)}
        if dry_run:
            import resource

            call["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            call["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            call["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        report["calls"].append(call)
        metrics = run_dir / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        report["steps"] = [{k: v for k, v in json.loads(line).items() if k in STEP_FIELDS} for line in lines]
        report["backends"] = dict(counts)
        write_json(out, "train", report)
        if rc:
            break
    report["checks"] = train_checks(report, dry_run)
    report["passed"] = all(report["checks"].values())
    write_json(out, "train", report)
    print(json.dumps({k: report[k] for k in ("model", "steps", "backends", "checks", "passed")}, indent=1))
    return 0 if report["passed"] else 1


def train_checks(report: dict, dry_run: bool) -> dict:
    """What the training record must show: both calls done, two steps logged, step 1 (lr = 0) without any
    policy shift, and on the GPU the Triton LM head and scan and the CUDA gather (no torch fallback)."""
    steps, used = report["steps"], report.get("backends", {})
    first = steps[0] if steps else {}
    result = {"two_steps": [s.get("step") for s in steps] == [1, 2]
              and all(call["rc"] == 0 for call in report["calls"]),
              "lr0_entropy_only": first.get("bs_entropy_only") == 1.0
              and first.get("omega_min") == first.get("omega_max") == 1.0,
              "lr0_ratio_one": first.get("loss/ratio_max") == 1.0,
              "branched": all(s.get("branches", 0) > 0 for s in steps) and bool(steps)}
    if not dry_run:
        result["triton_lm_head"] = any(k.startswith("lm_head_triton") for k in used) and not any(
            k.startswith("lm_head_torch") for k in used)
        result["triton_scan"] = any(k.startswith("scan_triton") for k in used)
        result["cuda_gather"] = used.get("gather_cuda", 0) > 0 and used.get("gather_torch", 0) == 0
    return result


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


# Lines of a memcheck report that are findings about the program's memory (API errors are left out by
# --report-api-errors no: a probe of an optional driver entry point is no bug of appo's kernels).
SANITIZER_FINDINGS = re.compile(r"Invalid __(global|shared|local)__|Misaligned|Out-of-range|"
                                r"Hardware exception|Malloc/Free|Leaked|Cuda graph|Barrier error")


def sanitizer_verdict(text: str) -> dict:
    """The memcheck log's verdict: its ERROR SUMMARY line, the real findings counted, API errors apart."""
    summary = [line.split("ERROR SUMMARY:", 1)[1].strip() for line in text.splitlines()
               if "ERROR SUMMARY:" in line]
    findings = sum(1 for line in text.splitlines() if SANITIZER_FINDINGS.search(line))
    api = sum(1 for line in text.splitlines() if "Program hit" in line)
    unsupported = "Device not supported" in text
    return {"error_summary": summary[-1] if summary else None, "memory_errors": findings,
            "api_errors": api, "unsupported": unsupported,
            "finished": "sanitizer launches finished" in text}


# ------------------------------------------------------------------------------------------- summary
def load_json(run: Path, name: str) -> dict:
    path = run / f"{name}.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return {}


def load_lines(run: Path, kind: str, step: str = "*") -> list[dict]:
    """Every json line of that kind ("test", "benchmark") that the .jsonl files of ``step`` (default: every
    step) hold, in file order."""
    rows = []
    for path in sorted(run.glob(f"{step}.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the last line of a process killed while writing it
                continue
            if row.get("kind") == kind:
                rows.append({**row, "step": path.stem})
    return rows


def _find(rows: list[dict], **match) -> dict | None:
    for row in rows:
        if all(row.get(key) == value for key, value in match.items()):
            return row
    return None


def read_steps(run: Path) -> list[dict]:
    """The steps.tsv rows: name, status, seconds, limit."""
    path, rows = run / "steps.tsv", []
    for line in (path.read_text().splitlines() if path.exists() else []):
        fields = line.split("\t")
        if len(fields) >= 3:
            rows.append({"name": fields[0], "status": fields[1], "seconds": int(fields[2]),
                         "limit_s": int(fields[3]) if len(fields) > 3 else None})
    return rows


def ceilings_of(triton_checks: dict, rows: list[dict]) -> tuple[float | None, float | None, str]:
    """(copy TB/s, matmul TFLOP/s, where from): the checks step's, else the benchmarks' own ceiling rows."""
    ceiling = triton_checks.get("ceilings", {})
    copy, matmul = ceiling.get("copy_tb_per_s"), ceiling.get("matmul_tflops")
    source = "checks" if copy else "benchmarks"
    if not copy and (row := _find(rows, bench="token_stats", impl="copy_ceiling")):
        copy = row["gb_per_s"] / 1e3
    if not matmul and (row := _find(rows, bench="linear_token_stats", impl="matmul_ceiling")):
        matmul = row["tflops"]
    return copy, matmul, source


def _verdict(value: float | None, target: float, dry_run: bool, higher_is_better: bool = True) -> str:
    if dry_run:
        return "dry run"
    if value is None:
        return "not measured"
    ok = value >= target if higher_is_better else value <= target
    return "MET" if ok else "MISSED"


def _nan(value):
    return float("nan") if value is None else value


def run_commit(run: Path) -> str:
    """The commit the run folder's records name (a summary rebuilt elsewhere keeps it), else this one's."""
    for name in ("plan", "tools", "setup"):
        if load_json(run, name).get("commit"):
            return load_json(run, name)["commit"]
    return commit()


def summary_lines(run: Path, out: Path | None = None) -> list[str]:
    """At most 40 lines: the run and its plan, the ceilings, the checks, each target as a fraction of the
    ceilings this card measured, the training step, the GPU tests, the sanitizer (``run``: the run folder;
    ``out``: the folder that comes back, whose files are counted)."""
    tools_report, triton_checks = load_json(run, "tools"), load_json(run, "checks-triton")
    gather_checks, train_report = load_json(run, "checks-gather"), load_json(run, "train")
    dry = bool(tools_report.get("dry_run", load_json(run, "plan").get("dry_run")))
    rows = load_lines(run, "benchmark")
    steps = read_steps(run)
    lines = [f"appo GPU suite: {tools_report.get('device', 'no GPU')} | torch {tools_report.get('torch')} "
             f"(CUDA {tools_report.get('torch_cuda')}) | triton {tools_report.get('triton')} | "
             f"liger {tools_report.get('liger_kernel') or 'absent'} | commit {run_commit(run)[:12]}"
             + (" | DRY RUN (CPU, tiny sizes)" if dry else "")]
    done = {s["name"] for s in steps}
    lines.append("steps: " + ", ".join(f"{s['name']} {s['status']} {s['seconds']}s" for s in steps)
                 + "".join(f", {p.name} -" for p in PLAN if p.name not in done and p.name != "summary"))
    used = sum(s["seconds"] for s in steps if s["name"] != "build")
    lines.append(f"plan: limits add up to at most {plan_wall_s()} s of the {BUDGET_S} s budget; "
                 f"{used} s spent in the foreground steps so far")
    copy_tbs, matmul, ceiling_source = ceilings_of(triton_checks, rows)
    ceiling = triton_checks.get("ceilings", {})
    if copy_tbs:
        lines.append(f"ceilings ({ceiling_source}): copy {copy_tbs:.2f} TB/s (read+write), "
                     f"{ceiling.get('matmul_dtype', 'benchmark dtype')} matmul {_nan(matmul):.0f} TFLOP/s"
                     + (f" (square {ceiling['matmul_square_tflops']:.0f}, LM-head chunk "
                        f"{ceiling['matmul_lm_head_tflops']:.0f})" if ceiling else "")
                     + "; targets below are fractions of these")
    for name, check in list(triton_checks.items()) + list(gather_checks.items()):
        if isinstance(check, dict) and "passed" in check and name != "ceilings":
            detail = {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in check.items()
                      if k.endswith(("error", "equal", "over_tolerance"))
                      or (k == "extension" and not check["passed"])}
            lines.append(f"check {name}: {'PASS' if check['passed'] else 'FAIL'} {detail}"[:230])
    build_report = load_json(run, "build")
    if build_report and not build_report.get("passed"):
        lines.append(f"build: FAILED once, not retried by later steps: {build_report.get('status')}"[:230])
    lines += _benchmark_lines(rows, copy_tbs, matmul, dry)
    if train_report:
        lines += _train_lines(train_report)
    tests = load_lines(run, "test", "gpu_tests")
    if tests:
        outcomes = {}
        for test in tests:
            outcomes[test["outcome"]] = outcomes.get(test["outcome"], 0) + 1
        failed = [t["nodeid"].split("::")[-1] for t in tests if t["outcome"] == "failed"][:3]
        lines.append("gpu tests: " + ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()))
                     + (f" (first failures: {', '.join(failed)})" if failed else ""))
    sanitizer = run / "sanitizer.log"
    if sanitizer.exists():
        verdict = sanitizer_verdict(sanitizer.read_text(errors="replace"))
        errors = verdict["error_summary"] or "- (not run under it)"
        lines.append(f"compute-sanitizer: ERROR SUMMARY {errors}; "
                     f"{verdict['memory_errors']} memory findings; API errors not counted"
                     + (" | device not supported by this runtime" if verdict["unsupported"] else "")
                     + ("" if verdict["finished"] else " | the launches did not finish"))
    if out is not None:
        problems = check_out(out)
        files = [p for p in out.rglob("*") if p.is_file()]
        lines.append(f"return: {len(files)} files, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB "
                     f"in $OUT (limits: {RETURN_LIMITS['files']} files, 16 MiB each)"
                     + (f"; PROBLEMS: {'; '.join(problems)}" if problems else ""))
    return lines[:40]


def _benchmark_lines(rows: list[dict], copy_tbs, matmul, dry: bool) -> list[str]:
    lines = []
    token = {impl: _find(rows, impl=impl, bench="token_stats") for impl in
             ("appo_triton", "appo_torch", "eager_torch", "compiled_torch")}
    t = token["appo_triton"] or token["appo_torch"]  # the torch path only in a dry run (no GPU)
    if t:
        fraction = t["gb_per_s"] / 1e3 / copy_tbs if copy_tbs else None
        over_eager = token["eager_torch"]["median_s"] / t["median_s"] if token["eager_torch"] else None
        copy_verdict = _verdict(fraction, TARGETS["token_stats_copy_fraction"], dry)
        eager_verdict = _verdict(over_eager, TARGETS["token_stats_over_eager"], dry)
        parts = [(f"{t['median_s'] * 1e3:.3f} ms, {t['gb_per_s'] / 1e3:.2f} TB/s = {_nan(fraction):.2f} "
                  f"of copy [{copy_verdict} >= 0.85]"),
                 f"{_nan(over_eager):.1f}x eager [{eager_verdict} >= 3]"]
        compiled = token["compiled_torch"]
        if compiled:
            warm_up = compiled.get("test_seconds")
            parts.append(f"{compiled['median_s'] / t['median_s']:.1f}x torch.compile (its cold compile and "
                         f"rounds: {_nan(warm_up):.0f} s)")
        lines.append(f"token stats ({t['impl']}): " + "; ".join(parts))
    ours = "appo_triton" if _find(rows, impl="appo_triton", bench="linear_token_stats") else "appo_torch"
    forward = _find(rows, impl=ours, mode="forward", bench="linear_token_stats")
    if forward:
        fraction = forward["tflops"] / matmul if matmul else None
        lines.append(f"fused forward ({ours}): {forward['median_s'] * 1e3:.1f} ms, {forward['tflops']:.0f} "
                     f"TFLOP/s = {_nan(fraction):.2f} of matmul "
                     f"[{_verdict(fraction, TARGETS['forward_matmul_fraction'], dry)} >= 0.75]")
    both = _find(rows, impl=ours, mode="forward_backward", bench="linear_token_stats")
    liger = _find(rows, impl="liger", mode="forward_backward", bench="linear_token_stats")
    if both:
        ratio = both["median_s"] / liger["median_s"] if liger else None
        lines.append(f"fused fwd+bwd: {both['median_s'] * 1e3:.1f} ms ({both['tflops_executed']:.0f} TFLOP/s "
                     "executed); " + (f"{ratio:.2f}x Liger's {liger['median_s'] * 1e3:.1f} ms "
                                      f"[{_verdict(ratio, TARGETS['fwd_bwd_over_liger'], dry, False)} <= 1]"
                                      if ratio else "Liger not run (no wheel)"))
    scan = [r for r in rows if r.get("bench") == "future_value" and r.get("impl") == "appo_triton"]
    torch_scan = [r for r in rows if r.get("bench") == "future_value" and r.get("impl") == "appo_torch"]
    for row in scan or torch_scan:
        speedup = row.get("speedup_over_dense")
        lines.append(f"future value ({row['impl']}) B={row['rows']} T={row['length']}: "
                     f"{row['median_s'] * 1e6:.1f} us, {_nan(speedup):.0f}x dense "
                     f"[{_verdict(speedup, TARGETS['scan_over_dense'], dry)} >= 100]")
    gather = _find(rows, bench="gather", impl="cuda") or _find(rows, bench="gather", impl="cpp")
    if gather:
        fraction = gather["gb_per_s"] / 1e3 / copy_tbs if copy_tbs else None
        lines.append(f"gather {gather['case']} ({gather['impl']}): {gather['median_s'] * 1e3:.2f} ms, "
                     f"{gather['gb_per_s'] / 1e3:.2f} TB/s = {_nan(fraction):.2f} of copy "
                     f"[{_verdict(fraction, TARGETS['gather_copy_fraction'], dry)} >= 0.80]")
    return lines


def _train_lines(report: dict) -> list[str]:
    model = report.get("model", {})
    lines = [f"train ({report.get('device')}, random Llama {model.get('num_hidden_layers')}x"
             f"{model.get('hidden_size')}, V={model.get('vocab')}, "
             f"{model.get('parameters', 0) / 1e6:.1f} M parameters): "
             + ("PASS" if report.get("passed") else f"FAIL {report.get('checks', 'unfinished')}")]
    for step in report.get("steps", []):
        phases = ", ".join(f"{k.split('/')[1]} {step[k]:.2f}" for k in STEP_FIELDS
                           if k.startswith("time/") and k != "time/step" and k in step)
        lines.append(f"  step {step['step']}: {step['time/step']:.2f} s ({phases}); entropy-only "
                     f"{step.get('bs_entropy_only', float('nan')):.2f}, ratio max "
                     f"{step.get('loss/ratio_max', float('nan')):.4f}")
    peaks = [call.get("peak_allocated_bytes", call.get("peak_rss_bytes", 0)) / 2**30
             for call in report.get("calls", [])]
    lines.append(f"  peak memory per call: {', '.join(f'{p:.2f}' for p in peaks)} GiB; backends: "
                 f"{report.get('backends')}"[:230])
    return lines


def check_out(out: Path) -> list[str]:
    """What in ``out`` would not come back from the GPU machine (empty when all of it does): more than 8
    files, a file over 16 MiB or 64 MiB in all, a file more than 2 folders down, a name other than letters,
    digits, '.', '_' and '-', anything that is not a plain file or folder."""
    problems, files = [], []
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            problems.append(f"{relative}: not a plain file")
        elif path.is_file():
            files.append(path)
            if len(relative.parts) - 1 > RETURN_LIMITS["depth"]:
                problems.append(f"{relative}: more than {RETURN_LIMITS['depth']} folders down")
            if path.stat().st_size > RETURN_LIMITS["file_bytes"]:
                problems.append(f"{relative}: {path.stat().st_size} bytes, over 16 MiB")
        if not all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in relative.parts):
            problems.append(f"{relative}: a name of other characters than letters, digits, '.', '_', '-'")
    if len(files) > RETURN_LIMITS["files"]:
        problems.append(f"{len(files)} files, over {RETURN_LIMITS['files']}")
    if sum(p.stat().st_size for p in files) > RETURN_LIMITS["total_bytes"]:
        problems.append("over 64 MiB in all")
    return problems


def pack(run: Path, target: Path, per_file: int = PACKED_FILE_BYTES) -> None:
    """``run`` as a .tar.gz at ``target``; a file longer than ``per_file`` travels as its last bytes."""
    with tarfile.open(target, "w:gz") as archive:
        for path in sorted(run.rglob("*")):
            if not path.is_file() or path.suffix in (".part", ".lock"):
                continue
            data = path.read_bytes()
            if len(data) > per_file:
                data = f"[the first {len(data) - per_file} bytes were left out]\n".encode() + data[-per_file:]
            info = tarfile.TarInfo(str(path.relative_to(run)))
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            archive.addfile(info, io.BytesIO(data))


def summary(run: Path, out: Path, packed: bool = False) -> int:
    """summary.txt and gpu-suite.json (plan, tools, checks, build, train, steps, every benchmark and test
    row, the summary) into ``out``; with ``packed`` (publish), raw.tar.gz too, and exit 1 when ``out`` would
    not come back whole from the GPU machine (``check_out``). One writer at a time (a lock)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    with open(run / ".publish.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        if packed:
            part = out / "raw.tar.gz.part"
            pack(run, part)
            if part.stat().st_size > RETURN_LIMITS["file_bytes"]:
                pack(run, part, per_file=PACKED_FILE_BYTES // 8)
            os.replace(part, out / "raw.tar.gz")
        lines = summary_lines(run, out if packed else None)
        record = {name: load_json(run, name) for name in ("plan", "setup", "tools", "build", "checks-triton",
                                                           "checks-gather", "train")}
        record.update(commit=run_commit(run), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      targets=TARGETS,
                      steps=read_steps(run), benchmarks=load_lines(run, "benchmark"),
                      tests=load_lines(run, "test", "gpu_tests"), summary=lines)
        sanitizer = run / "sanitizer.log"
        if sanitizer.exists():
            record["sanitizer"] = sanitizer_verdict(sanitizer.read_text(errors="replace"))
        write_json(out, "gpu-suite", record)
        (out / "summary.txt.part").write_text("\n".join(lines) + "\n")
        os.replace(out / "summary.txt.part", out / "summary.txt")
    return 1 if packed and check_out(out) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["plan", "setup", "tools", "build", "checks", "train", "sanitize",
                                         "publish", "summary"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--part", choices=["triton", "gather"], default="triton")
    parser.add_argument("--run-dir", type=Path, default=None, help="publish / summary: the run folder")
    parser.add_argument("--work", type=Path, default=None, help="train: where the model and run go")
    parser.add_argument("--site", type=Path, default=None, help="setup: the private site folder")
    parser.add_argument("--wheels", type=Path, default=None, help="setup: the carried wheels")
    parser.add_argument("--check", action="store_true", help="plan: exit 1 when it overruns its budget")
    parser.add_argument("--shell", action="store_true", help="plan: print BUDGET_S= and LIMIT_<step>=")
    parser.add_argument("--scale", type=int, default=1, help="plan --shell: the limits times this")
    args = parser.parse_args(argv)
    if args.step not in ("sanitize", "plan") and args.out is None:
        parser.error("--out is required")
    if args.step == "plan":
        return plan_command(args.out, args.check, args.shell, args.dry_run, args.scale)
    if args.step == "setup":
        if args.site is None:
            parser.error("setup: --site is required")
        return setup(args.out, args.site, args.wheels)
    if args.step == "tools":
        return tools(args.out, args.dry_run)
    if args.step == "build":
        return build(args.out, args.dry_run)
    if args.step == "checks":
        return checks(args.out, args.dry_run, args.part)
    if args.step == "train":
        if args.work is None:
            parser.error("train: --work is required")
        return train(args.out, args.work, args.dry_run)
    if args.step == "sanitize":
        return sanitize(args.dry_run)
    return summary(args.run_dir or args.out, args.out, packed=args.step == "publish")


if __name__ == "__main__":
    raise SystemExit(main())
