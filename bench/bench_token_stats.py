"""Token statistics over existing logits: appo's kernels vs the ways people write it in torch.

Run: ``pytest bench/bench_token_stats.py --benchmark-only``. Each case prints its median time, the achieved
bandwidth (bytes of logits read / time) and, on CUDA, the peak memory allocated beyond the inputs; the last
case prints the ratios (appo's kernel over eager torch and torch.compile, and as a fraction of the copy
ceiling). All rows go to token_stats-<time>.json in bench/_record.py's results folder. The copy case
measures the machine's ceiling in the same run: a device-to-device copy of a buffer as large as the logits
(its GB/s counts bytes read + written). No asserts: the figures are reported, not judged, here.

Sizes: CUDA N = 32,768 tokens x V = 152,064 bf16 (10 GB of logits); CPU N = 1,024 x V = 32,000 fp32;
APPO_BENCH_TINY=1 (the GPU suite's dry run) N = 64 x V = 1,031, one round. Override with APPO_BENCH_ROWS /
APPO_BENCH_VOCAB.
"""

import gc
import os

import pytest
import torch
from _record import peak_extra_bytes, record

from appo.ops.token_stats import token_stats_torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TINY = os.environ.get("APPO_BENCH_TINY") == "1"
NUM_ROWS = int(os.environ.get("APPO_BENCH_ROWS", 64 if TINY else 32_768 if CUDA else 1_024))
VOCAB = int(os.environ.get("APPO_BENCH_VOCAB", 1_031 if TINY else 152_064 if CUDA else 32_000))
DTYPE = torch.bfloat16 if CUDA else torch.float32
TEMPERATURE = 1.0
ROUNDS = 1 if TINY else 10 if CUDA else 3

RESULTS: list[dict] = []


def eager_token_stats(logits, tokens, temperature=1.0):
    """log_softmax + entropy as people write it: several [N, V] fp32 temporaries."""
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return log_p.gather(-1, tokens[:, None]).squeeze(-1), entropy


_compiled = {}


def compiled_token_stats(logits, tokens, temperature=1.0):
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(eager_token_stats, dynamic=False)
    return _compiled["fn"](logits, tokens, temperature)


def triton_token_stats(logits, tokens, temperature=1.0):
    from appo.kernels.token_stats import token_stats_triton
    return token_stats_triton(logits, tokens, temperature)


IMPLS = {
    "appo_triton": triton_token_stats,
    "appo_torch": token_stats_torch,
    "eager_torch": eager_token_stats,
    "compiled_torch": compiled_token_stats,
}


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(NUM_ROWS, VOCAB, generator=generator, device=DEVICE, dtype=DTYPE)
    tokens = torch.randint(0, VOCAB, (NUM_ROWS,), generator=generator, device=DEVICE)
    yield logits, tokens
    if RESULTS:
        print_ratios()
        print(f"\ntoken_stats results written to {record('token_stats', RESULTS)}")


def print_ratios():
    """appo's kernel (Triton on CUDA, else the chunked torch path) against eager torch, torch.compile and the
    copy ceiling of this run (printed with -s; the GPU suite's summary reads the json instead)."""
    timing = {row["impl"]: row for row in RESULTS if "median_s" in row}
    ours = timing.get("appo_triton") or timing.get("appo_torch")
    if ours is None:
        return
    parts = [f"{timing[other]['median_s'] / ours['median_s']:.2f}x {other}" for other in
             ("eager_torch", "compiled_torch") if other in timing]
    if "copy_ceiling" in timing:
        parts.append(f"{ours['gb_per_s'] / timing['copy_ceiling']['gb_per_s']:.2f} of the copy bandwidth")
    print(f"\n  {ours['impl']}: {', '.join(parts)}")


def synchronized(fn, *args):
    def run():
        out = fn(*args)
        if CUDA:
            torch.cuda.synchronize()
        return out
    return run


def fits_in_memory(run) -> bool:
    """Runs ``run`` once; False (and the memory it held freed, outside the except block, where the error's
    frames no longer pin its tensors) when it runs out of memory."""
    try:
        run()
        return True
    except torch.OutOfMemoryError:
        pass
    gc.collect()
    torch.cuda.empty_cache()
    return False


def measure(benchmark, capsys, impl, run, bytes_moved):
    if not fits_in_memory(run):  # warm-up (compiles torch.compile / Triton) and fails early on OOM
        RESULTS.append({"bench": "token_stats", "impl": impl, "rows": NUM_ROWS, "vocab": VOCAB,
                        "dtype": str(DTYPE), "oom": True})
        pytest.skip(f"{impl}: out of memory at N={NUM_ROWS}, V={VOCAB}")
    peak = peak_extra_bytes(run, "cuda" if CUDA else "cpu")
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=0 if TINY else 1)
    median_s = benchmark.stats.stats.median
    gb_per_s = bytes_moved / median_s / 1e9
    row = {"bench": "token_stats", "impl": impl, "rows": NUM_ROWS, "vocab": VOCAB, "dtype": str(DTYPE),
           "temperature": TEMPERATURE,
           "median_s": median_s, "gb_per_s": gb_per_s, "peak_extra_bytes": peak}
    RESULTS.append(row)
    benchmark.extra_info.update(row)
    peak_text = f", peak extra {peak / 2**30:.2f} GiB" if peak is not None else ""
    with capsys.disabled():
        print(f"\n  {impl:>15} N={NUM_ROWS} V={VOCAB} {DTYPE}: {median_s * 1e3:9.3f} ms "
              f"{gb_per_s:8.1f} GB/s{peak_text}")


@pytest.mark.parametrize("impl", list(IMPLS))
def test_token_stats(benchmark, capsys, inputs, impl):
    if impl == "appo_triton" and (not CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the Triton kernel is benchmarked on CUDA only (and not under TRITON_INTERPRET=1)")
    if impl == "compiled_torch" and TINY and not CUDA:
        pytest.skip("torch.compile is left out of the tiny CPU run (its C++ build alone takes ~25 s)")
    logits, tokens = inputs
    run = synchronized(IMPLS[impl], logits, tokens, TEMPERATURE)
    measure(benchmark, capsys, impl, run, logits.numel() * logits.element_size())


def test_copy_bandwidth_ceiling(benchmark, capsys, inputs):
    """Device-to-device copy as large as the logits: the bandwidth ceiling (bytes read + written)."""
    logits, _ = inputs
    destination = torch.empty_like(logits)
    run = synchronized(destination.copy_, logits)
    measure(benchmark, capsys, "copy_ceiling", run, 2 * logits.numel() * logits.element_size())
