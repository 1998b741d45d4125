"""Branch prefix caches: the extension's gather vs the torch reference, and branching end to end.

Run: ``pytest bench/bench_prefix_cache.py --benchmark-only -s``. All rows go to
bench/results/prefix_cache-<time>.json.

Gather cases (median time and GB/s = (bytes read + bytes written) / time, K = 12 branches):
  CPU  SmolLM2-shaped cache: 30 layers, 4 rollouts x 512 tokens, 3 KV heads, head dim 64, fp32, P = 512
       (target: the C++ op >= 2x faster than the torch reference);
  CUDA Qwen2.5-7B-shaped cache: 28 layers, 4 rollouts x 8,192 tokens, 4 KV heads, head dim 128, bf16, plus a
       device-to-device copy of as many bytes as the ceiling (target: >= 0.8 of it; skipped without a GPU);
  APPO_BENCH_TINY=1 (the GPU suite's dry run): the CPU case at 3 layers x 64 tokens, few rounds.
End to end (CPU, SmolLM2-135M-Instruct, marked slow): 12 greedy continuations of 128 tokens from 4 rollouts of
512 tokens, decoded from gathered caches vs from a re-prefill of the 12 prefixes (left-padded batch). The
rollout forward itself is timed apart: appo's training step runs it anyway. Both paths decode into caches
with room for the 128 tokens (``room=`` / ``reserve_cache``: no per-step re-concatenation of the cache).
Target: gathered <= 0.6x re-prefill, in CPU time of the (single-threaded) process, which a shared machine's
load does not inflate; wall times are printed and recorded beside it. Two rounds, in opposite orders (a
process's first decode loop runs ~10% slower), best of each. The rollouts are random token ids (timing does
not depend on the text). No asserts: the figures and their targets are printed, not judged, here.

CPU cases run with APPO_BENCH_CPU_THREADS torch threads (default 1, all impls alike): on shared machines a
multi-threaded pool turns every op into a wait for a descheduled thread.
"""

import functools
import os
import time

import pytest
import torch
from _record import CPU_THREADS, record, torch_threads

from appo import prefix_cache as pc

BRANCHES = 12
# (device, layers, rollouts, tokens, kv_heads, head_dim, dtype)
TINY = os.environ.get("APPO_BENCH_TINY") == "1"
GATHER_CASES = ({"cpu-tiny": ("cpu", 3, 4, 64, 3, 64, torch.float32)} if TINY else
                {"cpu-smollm2": ("cpu", 30, 4, 512, 3, 64, torch.float32),
                 "cuda-qwen2.5-7b": ("cuda", 28, 4, 8_192, 4, 128, torch.bfloat16)})
TARGET_CPP_SPEEDUP = 2.0
TARGET_E2E_RATIO = 0.6
RESULTS: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if RESULTS:
        print(f"\nprefix_cache results written to {record('prefix_cache', RESULTS)}")


def branch_points(rollouts, tokens, generator):
    """K branch points with include_token=True: spread over the rollouts, one at the last token (so P = T)."""
    src = torch.arange(BRANCHES) % rollouts
    pos = torch.randint(1, tokens, (BRANCHES,), generator=generator)
    pos[0] = tokens - 1
    return src, pos


@functools.lru_cache(maxsize=1)  # drawn once per case, shared by its impls
def gather_inputs(case):
    device, layers, rollouts, tokens, heads, head_dim, dtype = GATHER_CASES[case]
    generator = torch.Generator().manual_seed(0)
    # The CUDA case's ~1e9 numbers are drawn on the GPU (on the CPU that alone took most of its time).
    draw = generator if device == "cpu" else torch.Generator(device=device).manual_seed(0)
    keys = [torch.randn(rollouts, heads, tokens, head_dim, generator=draw, device=device).to(dtype)
            for _ in range(layers)]
    values = [torch.randn(rollouts, heads, tokens, head_dim, generator=draw, device=device).to(dtype)
              for _ in range(layers)]
    src, pos = branch_points(rollouts, tokens, generator)
    cached = pos  # include_token=True: prefix pos + 1 tokens, of which pos are cached
    return keys, values, src.to(device), cached.to(device), int(cached.max())


def bytes_moved(keys, cached, out_len):
    """Bytes read (the cached prefix rows) + written (the whole padded output), over all layers, K and V."""
    per_row = keys[0].shape[1] * keys[0].shape[3] * keys[0].element_size()  # one position of one layer
    read = int(cached.sum()) * per_row
    written = BRANCHES * out_len * per_row
    return 2 * len(keys) * (read + written)


def timed(run, device):
    def call():
        out = run()
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    return call


@pytest.mark.parametrize("impl", ["torch", "cpp", "copy_ceiling", "cuda"])  # the ceiling before the op
@pytest.mark.parametrize("case", list(GATHER_CASES))
def test_gather_bandwidth(benchmark, capsys, case, impl):
    device = GATHER_CASES[case][0]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA case: no CUDA device")
    if (impl == "cuda") != (device == "cuda") and impl in ("cpp", "cuda"):
        pytest.skip(f"impl {impl} does not run on {device}")
    if impl == "copy_ceiling" and device != "cuda":
        pytest.skip("the copy ceiling is measured on CUDA")
    keys, values, src, cached, out_len = gather_inputs(case)
    moved = bytes_moved(keys, cached.cpu(), out_len)
    if impl == "copy_ceiling":  # read + write of moved / 2 bytes: the same traffic as the gather
        source = torch.empty(moved // 2, dtype=torch.uint8, device=device)
        run = timed(lambda: source.clone(), device)
    else:
        run = timed(lambda: pc.gather_kv(keys, values, src, cached, out_len, impl=impl), device)
    with torch_threads(device):
        run()
        benchmark.pedantic(run, rounds=2 if TINY else 15, warmup_rounds=0 if TINY else 1)
    median_s = benchmark.stats.stats.median
    reference_s = next((r["median_s"] for r in RESULTS if r.get("case") == case and r["impl"] == "torch"),
                       None)
    row = {"bench": "gather", "case": case, "impl": impl, "device": device, "branches": BRANCHES,
           "layers": len(keys), "out_len": out_len, "dtype": str(keys[0].dtype), "bytes_moved": moved,
           "threads": CPU_THREADS if device == "cpu" else None, "median_s": median_s,
           "min_s": benchmark.stats.stats.min, "gb_per_s": moved / median_s / 1e9,
           "speedup_over_torch": reference_s / median_s if reference_s else None}
    RESULTS.append(row)
    benchmark.extra_info.update(row)
    speedup = f", {row['speedup_over_torch']:5.2f}x torch" if reference_s else ""
    if impl == "cpp" and reference_s:
        speedup += f" (target >= {TARGET_CPP_SPEEDUP:.0f}x)"
    ceiling = next((r["gb_per_s"] for r in RESULTS if r.get("case") == case and r["impl"] == "copy_ceiling"),
                   None)
    if ceiling and impl != "copy_ceiling":
        speedup += f", {row['gb_per_s'] / ceiling:.2f} of the copy (target >= 0.8)"
    with capsys.disabled():
        print(f"\n  gather {case} {impl:>12}: {median_s * 1e3:9.2f} ms {row['gb_per_s']:8.2f} GB/s{speedup}")


@torch.no_grad()
def greedy_decode(model, first_ids, attention_mask, first_positions, cache, steps):
    """``steps`` greedy tokens [K, steps] from a batch whose last input column is ``first_ids`` [K, 1]."""
    input_ids, positions, chosen = first_ids, first_positions, []
    for _ in range(steps):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                    past_key_values=cache, use_cache=True)
        input_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        chosen.append(input_ids)
        cache = out.past_key_values
        attention_mask = torch.cat([attention_mask, torch.ones_like(input_ids)], dim=1)
        positions = positions[:, -1:] + 1
    return torch.cat(chosen, dim=1)


@pytest.mark.slow
def test_end_to_end_branching(benchmark, capsys):
    from appo.models import load_model

    steps, rollouts, tokens_per_rollout = 128, 4, 512
    model, tokenizer = load_model()
    model.eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.config.vocab_size, (rollouts, tokens_per_rollout), generator=generator)
    lengths = torch.full((rollouts,), tokens_per_rollout)
    src, pos = branch_points(rollouts, tokens_per_rollout, generator)
    batch = pc.build_branch_batch(tokens, lengths, src, pos, pad_id=tokenizer.pad_token_id)
    timings = {}

    def clock():
        return time.perf_counter(), time.process_time()

    def since(name, start):  # the best of the rounds
        wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
        timings[name + "_s"] = min(wall, timings.get(name + "_s", wall))
        timings[name + "_cpu_s"] = min(cpu, timings.get(name + "_cpu_s", cpu))

    rounds_run = []

    def measure():  # two rounds in opposite orders: the first decode of a process runs slower
        rounds_run.append(len(rounds_run))
        if len(rounds_run) % 2 == 0:
            reprefilled = run_reprefill()
            gathered = run_gathered()
        else:
            gathered = run_gathered()
            reprefilled = run_reprefill()
        return gathered, reprefilled

    def run_gathered():
        start = clock()
        past = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), use_cache=True,
                     logits_to_keep=1).past_key_values
        since("rollout_forward", start)

        start = clock()
        cache = pc.gather_prefix_kv(past, src, pos, lengths=lengths, room=steps)
        since("gather", start)
        gathered = greedy_decode(model, batch.input_ids[:, -1:], batch.attention_mask,
                                 batch.position_ids[:, -1:], cache, steps)
        since("gathered", start)
        return gathered

    def run_reprefill():
        start = clock()
        prefill = model(input_ids=batch.input_ids[:, :-1], attention_mask=batch.attention_mask[:, :-1],
                        position_ids=batch.position_ids[:, :-1], use_cache=True, logits_to_keep=1)
        since("prefill", start)
        cache = pc.reserve_cache(prefill.past_key_values, steps)
        reprefilled = greedy_decode(model, batch.input_ids[:, -1:], batch.attention_mask,
                                    batch.position_ids[:, -1:], cache, steps)
        since("reprefill", start)
        return reprefilled

    with torch_threads("cpu"), torch.no_grad():
        gathered, reprefilled = benchmark.pedantic(measure, rounds=2, iterations=1)
    ratio = timings["gathered_cpu_s"] / timings["reprefill_cpu_s"]
    wall_ratio = timings["gathered_s"] / timings["reprefill_s"]
    agree = (gathered == reprefilled).float().mean().item()
    row = {"bench": "end_to_end", "model": "SmolLM2-135M-Instruct", "device": "cpu", "rollouts": rollouts,
           "rollout_tokens": tokens_per_rollout, "branches": BRANCHES, "new_tokens": steps,
           "prefix_tokens": int(batch.prefix_lengths.sum()), "threads": CPU_THREADS,
           "rounds": len(rounds_run), **timings,
           "gathered_over_reprefill_cpu_time": ratio, "gathered_over_reprefill_wall": wall_ratio,
           "greedy_token_agreement": agree}
    RESULTS.append(row)
    with capsys.disabled():
        print(f"\n  end to end (CPU time of the process; wall in brackets): rollout forward "
              f"{timings['rollout_forward_cpu_s']:.2f} s (not counted); "
              f"gathered {timings['gathered_cpu_s']:.2f} s "
              f"[{timings['gathered_s']:.2f}] (gather {timings['gather_cpu_s'] * 1e3:.0f} ms) vs re-prefill "
              f"{timings['reprefill_cpu_s']:.2f} s [{timings['reprefill_s']:.2f}] (prefill "
              f"{timings['prefill_cpu_s']:.2f} s): {ratio:.2f}x [{wall_ratio:.2f}x] (target <= "
              f"{TARGET_E2E_RATIO}x); greedy tokens agree {agree:.1%}")
