"""Rollout engine on SmolLM2-135M-Instruct with the python tool, on CPU.

Benchmarks (``pytest bench/bench_rollout.py --benchmark-only -s``): a batch of GSM8K rollouts with tools,
generated once with the multi-turn cache kept across tool turns (``reuse_cache=True``, the engine's default)
and once re-prefilling every row's history after each tool turn (``reuse_cache=False``), same seed. Each
prints the wall time, generated tokens/s, the tokens forwarded (real and padding), the tool calls and the
time spent inside tools, and records the rows to bench/results/rollout-<time>.json.

Script (``python bench/bench_rollout.py --prompts 32``): 32 GSM8K-train prompts with few-shot prompting;
reports the fraction of rollouts that ran a python call, the fractions with reward > 0 and reward != 0,
finish reasons and throughput; records to bench/results/rollout_gsm8k-<time>.json.

Prompting (tuned for a 135M model): the tasks' system prompt and its 2 python demonstrations plus
``EXTRA_DEMOS`` below, and the response opened with "<python>" (``RolloutConfig.response_prefix``): without
that, SmolLM2-135M answers in prose and almost never calls the tool. Torch runs with
APPO_BENCH_CPU_THREADS threads (default 1; shared machines punish multi-threaded pools).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

EXTRA_DEMOS = [
    ("A baker makes 24 muffins and sells 3 boxes of 6 muffins. How many muffins are left?",
     "<python>24 - 3 * 6</python>\n<result>6</result>\n<answer>6</answer>"),
    ("Lisa earns $12 an hour. She worked 5 hours on Monday and 3 hours on Tuesday. How much did she earn?",
     "<python>12 * (5 + 3)</python>\n<result>96</result>\n<answer>96</answer>"),
    ("A farm has 40 cows and half as many horses. How many animals are there in total?",
     "<python>40 + 40 / 2</python>\n<result>60.0</result>\n<answer>60</answer>"),
    ("Sam reads 14 pages a day for 2 weeks. How many pages does he read?",
     "<python>14 * 7 * 2</python>\n<result>196</result>\n<answer>196</answer>"),
]
CPU_THREADS = int(os.environ.get("APPO_BENCH_CPU_THREADS", 1))


def gsm8k_prompts(tokenizer, count: int, extra_demos: int = len(EXTRA_DEMOS)):
    """(examples, prompt token lists) for the first ``count`` GSM8K-train problems, few-shot rendered."""
    from appo.tasks import GSM8K, build_messages

    examples = GSM8K().examples("train")[:count]
    demos = [m for q, a in EXTRA_DEMOS[:extra_demos]
             for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    prompts = []
    for example in examples:
        messages = build_messages(example, tools=("python",), few_shot=2)
        ids = tokenizer.apply_chat_template(messages[:1] + demos + messages[1:], add_generation_prompt=True,
                                            tokenize=True)
        prompts.append([int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)])
    return examples, prompts


class TimedTool:
    """Wraps a Tool's run_batch to accumulate the seconds spent in tools."""

    def __init__(self, tool):
        self.tool, self.seconds = tool, 0.0
        original = tool.run_batch

        def timed(texts, **kwargs):
            start = time.perf_counter()
            try:
                return original(texts, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        tool.run_batch = timed


def run_rollouts(model, tokenizer, count: int, *, reuse_cache: bool = True, temperature: float = 0.3,
                 max_new_tokens_per_turn: int = 64, extra_demos: int = len(EXTRA_DEMOS), seed: int = 0,
                 batch_size: int | None = None) -> dict:
    """Generate ``count`` GSM8K rollouts (``batch_size`` at a time, default all at once); return a result row
    (throughput, work counters, task figures)."""
    from appo.rollout.batch import concat
    from appo.rollout.engine import RolloutConfig, RolloutEngine
    from appo.tasks import GSM8K
    from appo.tools import make_tools

    task = GSM8K()
    examples, prompts = gsm8k_prompts(tokenizer, count, extra_demos)
    tools = make_tools(["python"])
    timer = TimedTool(tools["python"])
    config = RolloutConfig(temperature=temperature, max_new_tokens_per_turn=max_new_tokens_per_turn,
                           max_total_tokens=1024, max_tool_calls=2, seed=seed, reuse_cache=reuse_cache,
                           result_template="<result>{result}</result>\n", response_prefix="<python>")
    engine = RolloutEngine(model, tokenizer, tools, config)

    def score(group, text):
        reward = task.reward(text, examples[group])
        return reward.score, reward.correct

    start = time.perf_counter()
    step = batch_size or count
    batch = concat([engine.generate(prompts[i:i + step], list(range(i, min(i + step, count))), score=score)
                    for i in range(0, count, step)])
    seconds = time.perf_counter() - start
    stats = engine.stats
    return {
        "rollouts": count, "batch_size": step, "reuse_cache": reuse_cache, "temperature": temperature,
        "seconds": seconds, "generated_tokens": stats.generated_tokens,
        "generated_tokens_per_s": stats.generated_tokens / seconds,
        "forward_tokens": stats.forward_tokens, "padded_tokens": stats.padded_tokens,
        "prefill_tokens": stats.prefill_tokens, "result_tokens": stats.result_tokens,
        "decode_steps": stats.decode_steps, "tool_calls": stats.tool_calls, "tool_seconds": timer.seconds,
        "forward_tokens_per_s": (stats.forward_tokens + stats.padded_tokens) / seconds,
        "frac_called_tool": sum(bool(calls) for calls in batch.tool_calls) / count,
        "frac_reward_positive": float((batch.rewards > 0).float().mean()),
        "frac_reward_nonzero": float((batch.rewards != 0).float().mean()),
        "frac_correct": sum(batch.correct) / count,
        "finish_reasons": dict(Counter(batch.finish_reasons)), "sample_texts": batch.texts[:4],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def describe(row: dict) -> str:
    return (f"reuse_cache={row['reuse_cache']}: {row['seconds']:.1f} s, {row['generated_tokens_per_s']:.1f} "
            f"generated tok/s ({row['generated_tokens']} generated), forwarded {row['forward_tokens']} real"
            f" + {row['padded_tokens']} padding tokens ({row['prefill_tokens']} prefill), "
            f"{row['tool_calls']} tool calls in {row['tool_seconds']:.1f} s, "
            f"peak RSS {row['peak_rss_mib']:.0f} MiB")


# ---------------------------------------------------------------- pytest-benchmark
_ROWS: list[dict] = []


@pytest.fixture(scope="module")
def smollm2():
    from appo.models import load_model

    torch.set_num_threads(CPU_THREADS)
    model, tokenizer = load_model()
    yield model, tokenizer
    if _ROWS:
        from _record import record
        print("recorded", record("rollout", _ROWS))


@pytest.mark.parametrize("reuse_cache", [True, False], ids=["reuse_cache", "reprefill"])
def test_rollout_throughput(benchmark, smollm2, reuse_cache):
    model, tokenizer = smollm2
    row = benchmark.pedantic(run_rollouts, args=(model, tokenizer, 4), kwargs={"reuse_cache": reuse_cache},
                             rounds=1, iterations=1)
    _ROWS.append(row)
    print("\n" + describe(row))
    assert row["generated_tokens"] > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.3)
    parser.add_argument("--extra-demos", type=int, default=len(EXTRA_DEMOS))
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    from appo.models import load_model
    from _record import record

    torch.set_num_threads(CPU_THREADS)
    model, tokenizer = load_model()
    row = run_rollouts(model, tokenizer, args.prompts, temperature=args.temperature,
                       extra_demos=args.extra_demos,
                       batch_size=args.batch_size)
    print(describe(row))
    print(f"called the python tool: {row['frac_called_tool']:.1%}; "
          f"reward > 0: {row['frac_reward_positive']:.1%}; "
          f"reward != 0: {row['frac_reward_nonzero']:.1%}; correct: {row['frac_correct']:.1%}; "
          f"finish reasons: {row['finish_reasons']}")
    print("recorded", record("rollout_gsm8k", [row]))


if __name__ == "__main__":
    main()
