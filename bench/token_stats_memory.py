"""Peak memory beyond the input: eager log_softmax token stats vs appo's chunked torch path (CPU, fp32).

Acceptance point: at T = 8,192 tokens and V = 152,064 (fp32 logits given), ``token_stats_torch`` must use
under 10% of the memory the eager path allocates beyond its input.

Each method runs in a fresh subprocess, which allocates the logits, notes its peak resident set size
(ru_maxrss), runs the method once and notes the peak again; the difference is the method's peak extra
memory. A tiny warm-up call before the big input keeps one-time allocations (thread pools, kernels' lazy
setup) out of the difference.

Run: ``python bench/token_stats_memory.py --tokens 8192 --vocab 152064`` (the full size needs ~21 GB free:
5 GB of logits plus ~15 GB for the eager path). Writes bench/results/token_stats_memory-<time>.json.
"""

import argparse
import json
import resource
import subprocess
import sys

import torch
from _record import record

from appo.ops.token_stats import token_stats_torch


def eager_token_stats(logits, tokens):
    """log_softmax + exp + mul + sum as people write it: three [T, V] fp32 tensors alive at the peak."""
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return log_p.gather(-1, tokens[:, None]).squeeze(-1), entropy


def appo_torch_token_stats(logits, tokens):
    return token_stats_torch(logits, tokens)


METHODS = {"eager": eager_token_stats, "appo_torch": appo_torch_token_stats}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_in_this_process(method: str, num_tokens: int, vocab_size: int) -> dict:
    """Peak resident memory of one call of ``method`` beyond the [num_tokens, vocab_size] fp32 input."""
    run = METHODS[method]
    generator = torch.Generator().manual_seed(0)
    run(torch.randn(4, 1000, generator=generator), torch.zeros(4, dtype=torch.int64))  # warm-up
    logits = torch.randn(num_tokens, vocab_size, generator=generator)
    tokens = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    before = peak_rss_bytes()
    logprobs, entropy = run(logits, tokens)
    after = peak_rss_bytes()
    if not (torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()):
        raise RuntimeError(f"{method} produced non-finite statistics")
    return {"method": method, "tokens": num_tokens, "vocab": vocab_size, "dtype": "float32",
            "input_bytes": logits.numel() * logits.element_size(), "peak_extra_bytes": after - before}


def measure_in_subprocess(method: str, num_tokens: int, vocab_size: int) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--tokens", str(num_tokens),
               "--vocab", str(vocab_size)]
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="rows T of the fp32 logits")
    parser.add_argument("--vocab", type=int, default=152_064, help="vocabulary size V")
    parser.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokens < 1 or args.vocab < 1:
        raise ValueError(f"--tokens and --vocab must be positive, got {args.tokens} and {args.vocab}")
    if args.worker:
        print(json.dumps(measure_in_this_process(args.worker, args.tokens, args.vocab)))
        return

    rows = [measure_in_subprocess(method, args.tokens, args.vocab) for method in METHODS]
    eager, appo = rows
    ratio = appo["peak_extra_bytes"] / eager["peak_extra_bytes"]
    for row in rows:
        print(f"{row['method']:>10}: input {row['input_bytes'] / 2**30:6.2f} GiB, "
              f"peak extra {row['peak_extra_bytes'] / 2**30:6.3f} GiB")
    verdict = "meets" if ratio < 0.10 else "misses"
    print(f"appo_torch / eager peak extra memory = {ratio:.3%} ({verdict} the < 10% acceptance point)")
    rows.append({"method": "ratio_appo_torch_over_eager", "tokens": args.tokens, "vocab": args.vocab,
                 "ratio": ratio})
    print(f"written to {record('token_stats_memory', rows)}")


if __name__ == "__main__":
    main()
