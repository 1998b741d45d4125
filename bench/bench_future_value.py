"""Future value (docs/method.md, Eq. 4): appo's O(T) reverse scan vs the authors' dense [T, T] decay-matrix
form.

Run: ``pytest bench/bench_future_value.py --benchmark-only -s``. Cases: CPU B=16 x T=8,192 (the torch scan's
target: >= 50x faster than the dense form) and CUDA B=64 x T=8,192 and 32,768 (the Triton scan's target:
>= 100x; skipped without a GPU); APPO_BENCH_TINY=1 (the GPU suite's dry run): CPU B=4 x T=2,048, few rounds.
Each case prints the median time, the speedup over the dense form and the achieved bandwidth: the bytes the op
must move (read logprobs, old_logprobs fp32 and the bool mask, write s fp32: 13 bytes per token) / time; on
CUDA also the peak memory allocated beyond the inputs. All rows go to future_value-<time>.json in
bench/_record.py's results folder. No asserts: the figures are reported, not judged, here.
The dense form is skipped, with the reason printed, where its [T, T] fp32 matrix would not fit in memory.

CPU cases run with APPO_BENCH_CPU_THREADS torch threads (default 1, both forms alike): on shared machines a
multi-threaded pool turns every small op into a wait for a descheduled thread (medians 100x the minimum).
"""

import os

import pytest
import torch
from _record import CPU_THREADS, peak_extra_bytes, record, torch_threads

from appo.ops.future_value import dense_future_value_torch, discounted_log_ratio_sum_torch

GAMMA = 2 ** (-1 / 32)
TINY = os.environ.get("APPO_BENCH_TINY") == "1"
CASES = [("cpu", 4, 2_048)] if TINY else [("cpu", 16, 8_192), ("cuda", 64, 8_192), ("cuda", 64, 32_768)]
TARGET_SPEEDUP = {"cpu": 50.0, "cuda": 100.0}


def triton_scan(logprobs, old_logprobs, mask, gamma):
    from appo.kernels.future_value import discounted_log_ratio_sum_triton
    return discounted_log_ratio_sum_triton(logprobs, old_logprobs, mask, gamma)


# dense first, so that every appo row can print its speedup over it
IMPLS = {"dense_torch": dense_future_value_torch, "appo_torch": discounted_log_ratio_sum_torch,
         "appo_triton": triton_scan}
RESULTS: dict[tuple, dict] = {}  # (device, rows, length, impl) -> row


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if RESULTS:
        print(f"\nfuture_value results written to {record('future_value', list(RESULTS.values()))}")


def make_inputs(device, rows, length):
    generator = torch.Generator().manual_seed(0)
    logprobs = -4.0 * torch.rand(rows, length, generator=generator)
    old_logprobs = logprobs + 0.1 * torch.randn(rows, length, generator=generator)
    mask = torch.rand(rows, length, generator=generator) < 0.8
    return logprobs.to(device), old_logprobs.to(device), mask.to(device)


def synchronized(fn, *args, repeat=1):
    """fn(*args) ``repeat`` times, then a device sync: on CUDA a microsecond-scale kernel is timed over many
    back-to-back launches (the sync and Python overhead of a single call would dominate it)."""
    def run():
        for _ in range(repeat):
            out = fn(*args)
        if args[0].is_cuda:
            torch.cuda.synchronize()
        return out
    return run


def dense_does_not_fit(device, length):
    """The reason the dense form cannot run (its [T, T] fp32 matrix exceeds free memory), or None."""
    need = 4 * length**2
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = 3 * 2**30  # this project's per-process budget on shared CPU machines
    if need > 0.9 * free:
        return f"dense [T, T] fp32 matrix needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device,rows,length", CASES)
def test_future_value(benchmark, capsys, device, rows, length, impl):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA case: no CUDA device")
    if impl == "appo_triton" and device != "cuda":
        pytest.skip("the Triton kernel is benchmarked on CUDA only")
    key = (device, rows, length)
    if impl == "dense_torch" and (reason := dense_does_not_fit(device, length)):
        with capsys.disabled():
            print(f"\n  dense_torch {device} B={rows} T={length}: skipped, {reason}")
        RESULTS[key + (impl,)] = {"bench": "future_value", "impl": impl, "device": device, "rows": rows,
                                  "length": length, "skipped": reason}
        pytest.skip(reason)
    logprobs, old_logprobs, mask = make_inputs(device, rows, length)
    repeat = 100 if device == "cuda" and impl != "dense_torch" else 1
    run = synchronized(IMPLS[impl], logprobs, old_logprobs, mask, GAMMA, repeat=repeat)
    with torch_threads(device):
        run()  # warm-up: compiles the Triton kernel
        peak = peak_extra_bytes(run, device)
        benchmark.pedantic(run, rounds=1 if TINY else 3 if impl == "dense_torch" else 30,
                           warmup_rounds=0 if TINY else 1)
    median_s = benchmark.stats.stats.median / repeat
    bytes_moved = logprobs.numel() * (logprobs.element_size() + old_logprobs.element_size()
                                      + mask.element_size() + 4)
    dense_s = RESULTS.get(key + ("dense_torch",), {}).get("median_s")
    row = {"bench": "future_value", "impl": impl, "device": device, "rows": rows, "length": length,
           "gamma": GAMMA,
           "threads": CPU_THREADS if device == "cpu" else None, "median_s": median_s,
           "min_s": benchmark.stats.stats.min / repeat, "repeat": repeat,
           "gb_per_s": bytes_moved / median_s / 1e9,
           "peak_extra_bytes": peak, "speedup_over_dense": dense_s / median_s if dense_s else None}
    RESULTS[key + (impl,)] = row
    benchmark.extra_info.update(row)
    speedup = (f", {row['speedup_over_dense']:8.1f}x dense (target >= {TARGET_SPEEDUP[device]:.0f}x)"
               if dense_s else "")
    peak_text = f", peak extra {peak / 2**20:.1f} MiB" if peak is not None else ""
    with capsys.disabled():
        print(f"\n  {impl:>12} {device} B={rows} T={length}: {median_s * 1e3:10.3f} ms "
              f"{row['gb_per_s']:8.2f} GB/s{speedup}{peak_text}")
