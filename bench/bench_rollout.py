"""Rollout engine on SmolLM2-135M-Instruct with the python tool, on CPU.

Benchmarks (``pytest bench/bench_rollout.py --benchmark-only -s``): a batch of 4 rollouts with tools,
generated once with the multi-turn cache kept across tool turns (``reuse_cache=True``, the engine's default)
and once re-prefilling every row's history after each tool turn (``reuse_cache=False``), same seed. The
prompts are procedural arithmetic questions (no data needed) and, when $APPO_DATA_DIR holds this project's
data, GSM8K train problems too (the README's figure). Each case prints the wall time, generated tokens/s, the
tokens forwarded (real and padding), the tool calls and the time spent inside tools, and the re-prefill /
reuse time ratio; the rows are recorded through bench/_record.py (rollout-<time>.json, in .benchmarks/appo/
unless ``--results-dir`` or $APPO_BENCH_RESULTS says otherwise).

Script (``python bench/bench_rollout.py --prompts 32 --samples 8 --temperature 0.7 --few-shot 4``): 8 rollouts
for each of the first 32 GSM8K-train prompts (``--sample-seed S`` takes a seeded random sample instead; the
data comes from $APPO_DATA_DIR or the Hugging Face hub, see appo.tasks.data); reports the fraction of rollouts
that ran a python call, the correct rollouts, the prompts with at least one correct rollout (pass@k), the
format-penalised rollouts, finish reasons, throughput and peak RSS; records rollout_gsm8k-<time>.json
(``--keep-rollouts`` adds every rollout's text and grade).

Prompting: the library's ``render_prompt`` (system prompt and ``--few-shot`` python demonstrations from
``appo.tasks.prompts``), and the response opened with "<python>" (``RolloutConfig.response_prefix``): without
that, SmolLM2-135M answers in prose and almost never calls the tool. Torch runs with APPO_BENCH_CPU_THREADS
threads (default 1; shared machines punish multi-threaded pools).
"""

from __future__ import annotations

import argparse
import resource
import time
from collections import Counter

import pytest
import torch
from _record import CPU_THREADS, record


def task_prompts(tokenizer, count: int, few_shot: int = 4, sample_seed: int | None = None, task=None):
    """(examples, prompt token lists) for ``count`` train problems of ``task`` (default GSM8K) rendered by the
    library's ``render_prompt`` with ``few_shot`` python demonstrations: the first ``count`` of the train
    split, or a ``random.Random(sample_seed)`` sample of it when ``sample_seed`` is given."""
    import random

    from appo.tasks import GSM8K, render_prompt

    examples = (task or GSM8K()).examples("train")
    examples = (examples[:count] if sample_seed is None
                else random.Random(sample_seed).sample(examples, count))
    return examples, [render_prompt(tokenizer, e, tools=("python",), few_shot=few_shot) for e in examples]


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
                 max_new_tokens_per_turn: int = 64, few_shot: int = 4, seed: int = 0,
                 batch_size: int | None = None, samples: int = 1, sample_seed: int | None = None,
                 keep_rollouts: bool = False, task_name: str = "gsm8k") -> dict:
    """Generate ``samples`` rollouts for each of ``count`` prompts of ``task_name`` ("gsm8k" or "arithmetic";
    ``batch_size`` rows decoded together, default all at once); return a result row (throughput, work
    counters, task figures; with ``keep_rollouts`` every rollout's text, answer, gold and reward)."""
    from appo.rollout.engine import RolloutConfig, RolloutEngine
    from appo.tasks import get_task
    from appo.tools import make_tools

    task = get_task(task_name)
    examples, prompts = task_prompts(tokenizer, count, few_shot, sample_seed, task)
    tools = make_tools(["python"])
    timer = TimedTool(tools["python"])
    rows = count * samples
    config = RolloutConfig(temperature=temperature, max_new_tokens_per_turn=max_new_tokens_per_turn,
                           max_total_tokens=1024, max_tool_calls=2, reuse_cache=reuse_cache,
                           result_template="<result>{result}</result>\n", response_prefix="<python>",
                           max_batch_rows=batch_size or rows)
    engine = RolloutEngine(model, tokenizer, tools, config, seed=seed)
    rewards = {}

    def score(group, text):
        reward = task.reward(text, examples[group])
        rewards.setdefault((group, text), reward)
        return reward.score, reward.correct

    start = time.perf_counter()
    batch = engine.generate([p for p in prompts for _ in range(samples)],
                            [g for g in range(count) for _ in range(samples)], score=score)
    seconds = time.perf_counter() - start
    stats = engine.stats
    groups = batch.group_ids.tolist()
    graded = [rewards[(g, t)] for g, t in zip(groups, batch.texts)]
    correct = [bool(c) for c in batch.correct]
    solved = sorted({g for g, c in zip(groups, correct) if c})
    row = {
        "rollouts": rows, "prompts": count, "samples_per_prompt": samples,
        "task": task_name,
        "prompt_set": ("first" if sample_seed is None else f"random.Random({sample_seed}).sample")
                      + f" {count} of get_task({task_name!r}).examples('train')",
        "prompt_ids": [e.id for e in examples], "few_shot": few_shot,
        "mean_prompt_tokens": sum(map(len, prompts)) / count,
        "batch_size": config.max_batch_rows, "reuse_cache": reuse_cache, "temperature": temperature,
        "max_new_tokens_per_turn": max_new_tokens_per_turn, "seed": seed,
        "seconds": seconds, "generated_tokens": stats.generated_tokens,
        "generated_tokens_per_s": stats.generated_tokens / seconds,
        "forward_tokens": stats.forward_tokens, "padded_tokens": stats.padded_tokens,
        "prefill_tokens": stats.prefill_tokens, "result_tokens": stats.result_tokens,
        "decode_steps": stats.decode_steps, "tool_calls": stats.tool_calls, "tool_seconds": timer.seconds,
        "forward_tokens_per_s": (stats.forward_tokens + stats.padded_tokens) / seconds,
        "frac_called_tool": sum(bool(calls) for calls in batch.tool_calls) / rows,
        "frac_reward_positive": float((batch.rewards > 0).float().mean()),
        "frac_reward_nonzero": float((batch.rewards != 0).float().mean()),
        "correct_rollouts": sum(correct), "frac_correct": sum(correct) / rows,
        "prompts_with_a_correct_rollout": len(solved), "pass_at_k": len(solved) / count,
        "solved_prompt_ids": [examples[g].id for g in solved],
        "format_penalized": sum(not r.format_ok for r in graded),
        "with_answer": sum(r.answer is not None for r in graded),
        "finish_reasons": dict(Counter(batch.finish_reasons)), "sample_texts": batch.texts[:4],
        "correct_texts": [t for t, c in zip(batch.texts, correct) if c],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }
    if keep_rollouts:
        row["all_rollouts"] = [
            {"id": examples[g].id, "gold": examples[g].answer, "answer": r.answer, "correct": c,
             "reward": float(batch.rewards[i]), "format_ok": r.format_ok, "finish": batch.finish_reasons[i],
             "tool_calls": len(batch.tool_calls[i]), "text": batch.texts[i]}
            for i, (g, r, c) in enumerate(zip(groups, graded, correct))]
    return row


def describe(row: dict) -> str:
    return (f"reuse_cache={row['reuse_cache']}: {row['seconds']:.1f} s, {row['generated_tokens_per_s']:.1f} "
            f"generated tok/s ({row['generated_tokens']} generated), forwarded {row['forward_tokens']} real"
            f" + {row['padded_tokens']} padding tokens ({row['prefill_tokens']} prefill), "
            f"{row['tool_calls']} tool calls in {row['tool_seconds']:.1f} s, "
            f"peak RSS {row['peak_rss_mib']:.0f} MiB")


# ---------------------------------------------------------------- pytest-benchmark
_ROWS: list[dict] = []
TASKS = [pytest.param("arithmetic", id="arithmetic"),
         pytest.param("gsm8k", id="gsm8k", marks=pytest.mark.data)]  # GSM8K: the project's data only


@pytest.fixture(scope="module")
def smollm2():
    from appo.models import load_model

    torch.set_num_threads(CPU_THREADS)
    model, tokenizer = load_model()
    yield model, tokenizer
    if _ROWS:
        print("recorded", record("rollout", _ROWS))


@pytest.mark.parametrize("reuse_cache", [True, False], ids=["reuse_cache", "reprefill"])
@pytest.mark.parametrize("task_name", TASKS)
def test_rollout_throughput(benchmark, smollm2, reuse_cache, task_name):
    model, tokenizer = smollm2
    row = benchmark.pedantic(run_rollouts, args=(model, tokenizer, 4), rounds=1, iterations=1,
                             kwargs={"reuse_cache": reuse_cache, "task_name": task_name})
    _ROWS.append(row)
    print(f"\n{task_name} " + describe(row))
    pair = [r for r in _ROWS if r["task"] == task_name]
    if len(pair) == 2:
        reuse, reprefill = sorted(pair, key=lambda r: not r["reuse_cache"])
        print(f"{task_name}: re-prefill / reuse time {reprefill['seconds'] / reuse['seconds']:.2f}x, "
              f"forwarded tokens {reprefill['forward_tokens']} vs {reuse['forward_tokens']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1, help="rollouts per prompt (pass@k with k = samples)")
    parser.add_argument("--temperature", type=float, default=0.3)
    parser.add_argument("--few-shot", type=int, default=4, help="python demonstrations in the prompt")
    parser.add_argument("--max-new", type=int, default=64, help="generated tokens per turn at most")
    parser.add_argument("--batch-size", type=int, default=8, help="rows decoded together (max_batch_rows)")
    parser.add_argument("--seed", type=int, default=0, help="the engine's sampling seed")
    parser.add_argument("--sample-seed", type=int, default=None,
                        help="take a random.Random(seed) sample of the train split instead of its first prompts")
    parser.add_argument("--keep-rollouts", action="store_true", help="record every rollout's text and grade")
    parser.add_argument("--no-record", action="store_true", help="print only (exploration runs)")
    args = parser.parse_args()
    from appo.models import load_model

    torch.set_num_threads(CPU_THREADS)
    model, tokenizer = load_model()
    row = run_rollouts(model, tokenizer, args.prompts, temperature=args.temperature, few_shot=args.few_shot,
                       max_new_tokens_per_turn=args.max_new, batch_size=args.batch_size, seed=args.seed,
                       samples=args.samples, sample_seed=args.sample_seed, keep_rollouts=args.keep_rollouts)
    print(describe(row))
    print(f"{row['rollouts']} rollouts ({row['prompts']} prompts x {row['samples_per_prompt']}): "
          f"called the python tool {row['frac_called_tool']:.1%}; "
          f"correct {row['correct_rollouts']} ({row['frac_correct']:.1%}); "
          f"prompts with a correct rollout {row['prompts_with_a_correct_rollout']}/{row['prompts']} "
          f"({row['solved_prompt_ids']}); format penalty {row['format_penalized']}; "
          f"reward > 0: {row['frac_reward_positive']:.1%}; finish reasons: {row['finish_reasons']}")
    for text in row["correct_texts"]:
        print("correct:", repr(text))
    if args.keep_rollouts and args.no_record:
        for r in row["all_rollouts"]:
            print(f"--- {r['id']} gold {r['gold']} answer {r['answer']!r} reward {r['reward']:+.1f} "
                  f"{r['finish']}\n{r['text']}")
    if not args.no_record:
        print("recorded", record("rollout_gsm8k", [row]))


if __name__ == "__main__":
    main()
