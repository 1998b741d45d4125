"""Fused LM head + token statistics (hidden [N, H], weight [V, H] -> logprob, entropy): appo's Triton kernel
and chunked torch reference vs materialised eager torch and Liger-Kernel's fused linear cross entropy.

Run: ``pytest bench/bench_linear_token_stats.py --benchmark-only``. Each case prints its median time, achieved
TFLOP/s and, on CUDA, the peak memory allocated beyond the inputs; at the end, appo's forward + backward time
over Liger's and eager torch's. Rows go to linear_token_stats-<time>.json in bench/_record.py's results
folder. The matmul case measures the machine's ceiling in the same run: one hidden @ weight.T chunk of 4,096
rows in the benchmark dtype. No asserts: the figures are reported, not judged, here.

FLOP counts (NVH = N * V * H):
  * forward: 2 NVH for every implementation (the logits matmul; the softmax statistics are not counted);
  * forward+backward, "useful" = 6 NVH (logits + grad_hidden + grad_weight), the figure in ``tflops``;
    "executed" = what each implementation runs, in ``tflops_executed``: appo_triton and appo_torch 8 NVH
    (the backward recomputes the logits once, chunk by chunk), eager_torch 6 NVH (keeps the [N, V] logits),
    liger 6 NVH (gradients computed inside its forward, for a scalar loss).
The backward is driven by -logprobs.sum() (the cross-entropy with reduction="sum", which Liger computes; Liger
returns no entropy, so it does less work than the others in its forward).

Sizes: CUDA N = 32,768 x V = 152,064 x H = 3,584 bf16 (Qwen2.5-7B's LM head); CPU N = 512 x V = 8,192 x
H = 256 fp32; APPO_BENCH_TINY=1 (the GPU suite's dry run) N = 64 x V = 300 x H = 64, one round. Override with
APPO_BENCH_ROWS / APPO_BENCH_VOCAB / APPO_BENCH_HIDDEN.
"""

import gc
import os
import time

import pytest
import torch
from _record import record

from appo.ops.linear_token_stats import linear_token_stats_torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TINY = os.environ.get("APPO_BENCH_TINY") == "1"
NUM_ROWS = int(os.environ.get("APPO_BENCH_ROWS", 64 if TINY else 32_768 if CUDA else 512))
VOCAB = int(os.environ.get("APPO_BENCH_VOCAB", 300 if TINY else 152_064 if CUDA else 8_192))
HIDDEN = int(os.environ.get("APPO_BENCH_HIDDEN", 64 if TINY else 3_584 if CUDA else 256))
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = 1 if TINY else 5 if CUDA else 3
SLOW_S = 2.0
NVH = NUM_ROWS * VOCAB * HIDDEN
EXECUTED_FWD_BWD_FLOPS = {"appo_triton": 8 * NVH, "appo_torch": 8 * NVH, "eager_torch": 6 * NVH,
                          "liger": 6 * NVH}

RESULTS: list[dict] = []


def eager_linear_token_stats(hidden, weight, tokens, bias=None, temperature=1.0):
    """As people write it: [N, V] logits in the input dtype, then fp32 log_softmax and entropy temporaries."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return log_p.gather(-1, tokens[:, None]).squeeze(-1), entropy.detach()


def triton_linear_token_stats(hidden, weight, tokens, bias=None, temperature=1.0):
    from appo.kernels.linear_token_stats import linear_token_stats_triton
    return linear_token_stats_triton(hidden, weight, tokens, bias, temperature)


_liger = {}


def liger_cross_entropy(hidden, weight, tokens, bias=None, temperature=1.0):
    """Liger's fused linear cross entropy (sum of -logprob); no entropy, temperature 1 only."""
    if "loss" not in _liger:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        _liger["loss"] = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return -_liger["loss"](weight, hidden, tokens, bias), None


IMPLS = {
    "appo_triton": triton_linear_token_stats,
    "appo_torch": linear_token_stats_torch,
    "eager_torch": eager_linear_token_stats,
    "liger": liger_cross_entropy,
}


def unavailable(impl):
    """Why ``impl`` cannot run here, or None."""
    if impl in ("appo_triton", "liger") and (not CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
        return f"{impl} is benchmarked on CUDA only (and not under TRITON_INTERPRET=1)"
    if impl == "liger":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger_kernel is not installed"
    return None


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(NUM_ROWS, HIDDEN, generator=generator, device=DEVICE, dtype=DTYPE)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator, device=DEVICE, dtype=DTYPE) / HIDDEN**0.5
    tokens = torch.randint(0, VOCAB, (NUM_ROWS,), generator=generator, device=DEVICE)
    yield hidden, weight, tokens
    if RESULTS:
        print_ratios()
        print(f"\nlinear_token_stats results written to {record('linear_token_stats', RESULTS)}")


def print_ratios():
    """appo's forward + backward time over Liger's and eager torch's, and its forward against the matmul
    ceiling of this run (printed with -s; the GPU suite's summary reads the json instead)."""
    timing = {(row["impl"], row["mode"]): row for row in RESULTS if "median_s" in row}
    ours = timing.get(("appo_triton", "forward_backward")) or timing.get(("appo_torch", "forward_backward"))
    if ours is None:
        return
    parts = [f"{ours['median_s'] / timing[(other, 'forward_backward')]['median_s']:.2f}x {other}'s time"
             for other in ("liger", "eager_torch") if (other, "forward_backward") in timing]
    forward = timing.get((ours["impl"], "forward"))
    ceiling = timing.get(("matmul_ceiling", "forward"))
    if forward and ceiling:
        parts.append(f"forward at {forward['tflops'] / ceiling['tflops']:.2f} of the matmul ceiling")
    print(f"\n  {ours['impl']} forward+backward: {', '.join(parts) or 'no comparison ran'}")


def forward_run(fn, hidden, weight, tokens):
    def run():
        with torch.no_grad():
            out = fn(hidden, weight, tokens)
        if CUDA:
            torch.cuda.synchronize()
        return out
    return run


def forward_backward_run(fn, hidden, weight, tokens):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()

    def run():
        hidden.grad = weight.grad = None
        logprobs, _ = fn(hidden, weight, tokens)
        (-logprobs.sum()).backward()
        if CUDA:
            torch.cuda.synchronize()
    return run


def timed_warm_up(run):
    """One call (compiles Triton) -> (seconds, on CUDA the bytes allocated at its peak beyond the inputs)."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if CUDA else 0
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return seconds, (torch.cuda.max_memory_allocated() - before if CUDA else None)


def measure(benchmark, capsys, impl, mode, run, useful_flops, executed_flops):
    base = {"bench": "linear_token_stats", "impl": impl, "mode": mode, "rows": NUM_ROWS, "vocab": VOCAB,
            "hidden": HIDDEN, "dtype": str(DTYPE)}
    warmed = None
    try:
        warmed = timed_warm_up(run)
    except torch.OutOfMemoryError:
        pass
    if warmed is None:  # freed outside the except block, where the error's frames no longer pin the tensors
        gc.collect()
        torch.cuda.empty_cache()
        RESULTS.append({**base, "oom": True})
        pytest.skip(f"{impl} {mode}: out of memory at N={NUM_ROWS}, V={VOCAB}, H={HIDDEN}")
    warm_up_s, peak = warmed
    # Cases slower than SLOW_S per call (the fp32-matmul torch reference at the CUDA size) run fewer rounds.
    benchmark.pedantic(run, rounds=ROUNDS if warm_up_s < SLOW_S else min(ROUNDS, 2), warmup_rounds=0)
    median_s = benchmark.stats.stats.median
    row = {**base, "median_s": median_s, "tflops": useful_flops / median_s / 1e12,
           "tflops_executed": executed_flops / median_s / 1e12, "peak_extra_bytes": peak}
    RESULTS.append(row)
    benchmark.extra_info.update(row)
    peak_text = f", peak extra {peak / 2**30:.2f} GiB" if peak is not None else ""
    with capsys.disabled():
        print(f"\n  {impl:>14} {mode:>16} N={NUM_ROWS} V={VOCAB} H={HIDDEN} {DTYPE}: "
              f"{median_s * 1e3:9.2f} ms "
              f"{row['tflops']:7.2f} TFLOP/s (executed {row['tflops_executed']:7.2f}){peak_text}")


@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward(benchmark, capsys, inputs, impl):
    if reason := unavailable(impl):
        pytest.skip(reason)
    run = forward_run(IMPLS[impl], *inputs)
    measure(benchmark, capsys, impl, "forward", run, 2 * NVH, 2 * NVH)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward(benchmark, capsys, inputs, impl):
    if reason := unavailable(impl):
        pytest.skip(reason)
    run = forward_backward_run(IMPLS[impl], *inputs)
    measure(benchmark, capsys, impl, "forward_backward", run, 6 * NVH, EXECUTED_FWD_BWD_FLOPS[impl])


def test_matmul_ceiling(benchmark, capsys, inputs):
    """The machine's matmul ceiling in the benchmark dtype: 4,096 rows of hidden @ weight.T."""
    hidden, weight, _ = inputs
    rows = hidden[: min(4_096, NUM_ROWS)]
    out = torch.empty(rows.shape[0], VOCAB, device=DEVICE, dtype=DTYPE)

    def run():
        torch.mm(rows, weight.T, out=out)
        if CUDA:
            torch.cuda.synchronize()
    flops = 2 * rows.shape[0] * VOCAB * HIDDEN
    measure(benchmark, capsys, "matmul_ceiling", "forward", run, flops, flops)
