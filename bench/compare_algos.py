"""APPO vs GRPO vs ARPO from the same start, with the same budget M, prompts and seeds (issue 5, item 4).

Each (algorithm, seed) pair trains SmolLM2-135M-Instruct with ``appo.trainer.train`` into
``runs/compare/<algo>-s<seed>``, then evaluates it on held-out dev questions (pass@1 and pass@k). The same
seed gives every algorithm the same prompts in the same order (the trainer's data generator is seeded by
``seed`` only). The per-run rows, the per-algorithm aggregate, a markdown table and a plot go to
bench/results/compare-<utc time>.{json,md,png}.

    python bench/compare_algos.py --task arithmetic --seeds 0 1 2 --steps 2 --prompts-per-step 2 \
        --eval-size 8 --eval-samples 2 --override data.few_shot=1 --eval-start   # docs/comparison.md

Importable: ``aggregate``, ``markdown_table`` and ``plot_comparison`` work on plain dicts, so they can be
tested on fake metrics without training anything.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

# The same budget M = 4 rollouts per prompt for every algorithm (APPO: M = (B + 1) * N).
ALGO_OVERRIDES = {
    "appo": ["algo.algo=appo", "algo.M=4", "algo.N=2", "algo.B=1"],
    "grpo": ["algo.algo=grpo", "algo.M=4"],
    "arpo": ["algo.algo=arpo", "algo.M=4", "algo.N=2"],
}
PHASES = ("rollout", "branch", "update")
# Per-run quantities aggregated over seeds (mean and sample std).
RUN_KEYS = ("pass@1", "pass@k", "final_reward", "mean_reward", "eval_tool_calls", "train_tool_calls",
            "time_per_step", *(f"time_{p}" for p in PHASES))


# ---------------------------------------------------------------------------------------------- one run
def run_overrides(algo: str, seed: int, args: argparse.Namespace) -> list[str]:
    """The ``key=value`` config overrides of one run: identical for all algorithms except ``algo.*``."""
    if algo not in ALGO_OVERRIDES:
        raise ValueError(f"algo: expected one of {sorted(ALGO_OVERRIDES)}, got {algo!r}")
    return [*ALGO_OVERRIDES[algo], f"data.task={args.task}", f"data.tool={args.tool}",
            f"steps={args.steps}", f"prompts_per_step={args.prompts_per_step}", f"seed={seed}",
            f"data.eval_size={args.eval_size}", f"eval_samples={args.eval_samples}", "eval_at_end=true",
            f"rollout.temperature={args.temperature}",
            f"rollout.max_new_tokens_per_turn={args.max_new_tokens_per_turn}",
            f"checkpoint_every={args.steps}", "keep_checkpoints=1",
            f"output_dir={Path(args.runs_dir) / f'{algo}-s{seed}'}", *args.override]


def run_row(algo: str, seed: int, summary: dict, history: list[dict]) -> dict:
    """One row of the comparison from a run's ``train`` summary and its metrics.jsonl records.

    final_reward: train reward (initial rollouts) of the last step; mean_reward: over all steps;
    train_tool_calls: tool calls per rollout (all rollouts incl. branches), mean over steps; time_*: seconds
    per step, mean over steps; ``rewards``: the per-step train reward curve.
    """
    if not history:
        raise ValueError(f"history: run {algo}-s{seed} has no metrics records")
    evaluation = summary.get("eval")
    if not evaluation:
        raise ValueError(f"summary: run {algo}-s{seed} has no held-out evaluation (eval_at_end)")

    def mean_of(key: str) -> float:
        values = [r[key] for r in history if r.get(key) is not None]
        return sum(values) / len(values) if values else 0.0

    row = {"algo": algo, "seed": seed, "steps": len(history), "pass@1": evaluation["pass@1"],
           "pass@k": evaluation["pass@k"], "k": evaluation["k"], "eval_items": evaluation["items"],
           "eval_tool_calls": evaluation["tool_calls"], "final_reward": history[-1]["reward"],
           "mean_reward": mean_of("reward"), "train_tool_calls": mean_of("tool_calls"),
           "time_per_step": mean_of("time/step"), "rewards": [r["reward"] for r in history]}
    row.update({f"time_{phase}": mean_of(f"time/{phase}") for phase in PHASES})
    return row


def run_one(algo: str, seed: int, args: argparse.Namespace) -> dict:
    """Train and evaluate one (algo, seed) run (or reuse its summary.json when it finished before)."""
    from appo.config import load_config
    from appo.metrics import read_metrics
    from appo.trainer import train

    config = load_config(None, run_overrides(algo, seed, args))
    out = Path(config.output_dir)
    summary_path = out / "summary.json"
    if args.reuse and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    else:
        if out.exists():
            shutil.rmtree(out)  # a fresh start: never resume a half-finished run of an older sweep
        started = time.perf_counter()
        summary = train(config)
        summary["wall_s"] = time.perf_counter() - started
        gc.collect()  # release the run's model, optimizer and engine before the next run
        summary_path.write_text(json.dumps(summary, indent=2, default=str))
        if not args.keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # ~1.6 GB each (weights + AdamW)
    row = run_row(algo, seed, summary, read_metrics(out / "metrics.jsonl"))
    row["wall_s"] = summary.get("wall_s")
    return row


def evaluate_start(seed: int, args: argparse.Namespace) -> dict:
    """Held-out pass@1 / pass@k of the untrained start model with the runs' settings and seed (the row every
    algorithm started from); cached in <runs-dir>/start-s<seed>/eval.json."""
    from appo.config import load_config
    from appo.trainer import evaluate

    path = Path(args.runs_dir) / f"start-s{seed}" / "eval.json"
    if (args.reuse or args.aggregate_only) and path.is_file():
        return json.loads(path.read_text())
    if args.aggregate_only:
        return {}
    config = load_config(None, run_overrides("grpo", seed, args))
    result = {"seed": seed, **evaluate(config, samples=args.eval_samples)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------- aggregation
def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof=1; 0 for a single value) of a non-empty list."""
    if not values:
        raise ValueError("values: need at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(rows: list[dict]) -> list[dict]:
    """Per algorithm (in first-seen order): ``<key>_mean`` / ``<key>_std`` over seeds for every RUN_KEYS
    entry, ``seeds``, ``k``, the per-step reward curve (``reward_curve_mean``/``_min``/``_max`` over seeds)
    and ``time_vs_grpo`` (``_std``): mean over seeds of seconds per step / GRPO's seconds per step in the same
    seed (None when no seed has a GRPO run)."""
    if not rows:
        raise ValueError("rows: need at least one run")
    by_algo: dict[str, list[dict]] = {}
    for row in rows:
        by_algo.setdefault(row["algo"], []).append(row)
    result = []
    for algo, runs in by_algo.items():
        entry = {"algo": algo, "seeds": sorted(r["seed"] for r in runs), "k": runs[0]["k"]}
        for key in RUN_KEYS:
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std([float(r[key]) for r in runs])
        steps = min(len(r["rewards"]) for r in runs)
        curves = [[r["rewards"][s] for r in runs] for s in range(steps)]
        entry["reward_curve_mean"] = [sum(c) / len(c) for c in curves]
        entry["reward_curve_min"] = [min(c) for c in curves]
        entry["reward_curve_max"] = [max(c) for c in curves]
        result.append(entry)
    # Paired by seed: each algorithm's seconds per step over GRPO's in the same seed (runs of one seed ran
    # back to back, so they share the machine's load far more than runs of different seeds do).
    grpo_time = {r["seed"]: r["time_per_step"] for r in by_algo.get("grpo", []) if r["time_per_step"] > 0}
    for entry in result:
        ratios = [r["time_per_step"] / grpo_time[r["seed"]] for r in by_algo[entry["algo"]]
                  if r["seed"] in grpo_time]
        entry["time_vs_grpo"], entry["time_vs_grpo_std"] = mean_std(ratios) if ratios else (None, None)
    return result


def markdown_table(entries: list[dict], start: list[dict] | None = None) -> str:
    """A GitHub markdown table of ``aggregate``'s output: mean ± std over seeds. ``start``: held-out
    evaluations of the untrained model (``evaluate_start``), shown as a first row when given."""
    if not entries:
        raise ValueError("entries: need at least one aggregated algorithm")
    k = entries[0]["k"]

    def pm(entry: dict, key: str, digits: int = 3) -> str:
        return f"{entry[f'{key}_mean']:.{digits}f} ± {entry[f'{key}_std']:.{digits}f}"

    lines = [f"| algo | seeds | pass@1 | pass@{k} | final train reward | tool calls / rollout (train) "
             "| s / step | rollout s | branch s | update s | time vs GRPO |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    if start:
        p1, pk = mean_std([s["pass@1"] for s in start]), mean_std([s["pass@k"] for s in start])
        lines.append(f"| start (no training) | {len(start)} | {p1[0]:.3f} ± {p1[1]:.3f} "
                     f"| {pk[0]:.3f} ± {pk[1]:.3f} | | | | | | | |")
    for e in entries:
        ratio = (f"{e['time_vs_grpo']:.2f}x ± {e['time_vs_grpo_std']:.2f}" if e["time_vs_grpo"] is not None
                 else "n/a")
        lines.append(f"| {e['algo']} | {len(e['seeds'])} | {pm(e, 'pass@1')} | {pm(e, 'pass@k')} "
                     f"| {pm(e, 'final_reward')} | {pm(e, 'train_tool_calls', 2)} | {pm(e, 'time_per_step', 1)} "
                     f"| {e['time_rollout_mean']:.1f} | {e['time_branch_mean']:.1f} | {e['time_update_mean']:.1f} "
                     f"| {ratio} |")
    return "\n".join(lines) + "\n"


def plot_comparison(entries: list[dict], out_png: str | Path, start: list[dict] | None = None) -> Path:
    """Left: train reward per step per algorithm (mean over seeds, shaded min-max spread). Middle: held-out
    pass@1 and pass@k, mean ± std over seeds (dashed: the untrained start's pass@1 when ``start`` is given).
    Right: seconds per step split into rollout / branch / update (stacked bars). Returns ``out_png``."""
    import matplotlib

    from appo.metrics import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not entries:
        raise ValueError("entries: need at least one aggregated algorithm")
    figure, (curves, scores, bars) = plt.subplots(1, 3, figsize=(14, 3.8))
    for entry in entries:
        steps = list(range(1, len(entry["reward_curve_mean"]) + 1))
        line, = curves.plot(steps, entry["reward_curve_mean"], marker="o",
                            label=f"{entry['algo']} (n={len(entry['seeds'])})")
        curves.fill_between(steps, entry["reward_curve_min"], entry["reward_curve_max"],
                            color=line.get_color(), alpha=0.2)
    curves.set_xticks(steps)
    curves.set_xlabel("step")
    curves.set_ylabel("train reward (initial rollouts)")
    curves.set_title("reward: mean over seeds, min-max band")
    curves.legend(fontsize=8)
    names = [e["algo"] for e in entries]
    width, k = 0.38, entries[0]["k"]
    for offset, key, label in ((-width / 2, "pass@1", "pass@1"), (width / 2, "pass@k", f"pass@{k}")):
        scores.bar([x + offset for x in range(len(entries))], [e[f"{key}_mean"] for e in entries], width,
                   yerr=[e[f"{key}_std"] for e in entries], capsize=3, label=label)
    if start:
        scores.axhline(mean_std([s["pass@1"] for s in start])[0], color="k", linestyle="--", linewidth=1,
                       label="start pass@1")
    scores.set_xticks(range(len(entries)), names)
    scores.set_ylim(0, 1)
    scores.set_title("held-out accuracy (mean ± std over seeds)")
    scores.legend(fontsize=8)
    bottom = [0.0] * len(entries)
    for phase in PHASES:
        heights = [e[f"time_{phase}_mean"] for e in entries]
        bars.bar(names, heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for x, entry in enumerate(entries):
        bars.text(x, bottom[x], f"{entry['time_per_step_mean']:.1f}s", ha="center", va="bottom", fontsize=8)
    bars.set_ylabel("seconds per step (mean over steps and seeds)")
    bars.set_title("time per step by phase")
    bars.legend(fontsize=8)
    return save_figure(figure, out_png)


def write_results(rows: list[dict], args: argparse.Namespace | None = None,
                  wall_s: float | None = None, start: list[dict] | None = None) -> dict[str, Path]:
    """Record the rows and aggregate (bench/results/compare-<time>.json via ``_record.record``), then the
    table (.md) and plot (.png) beside it; returns their paths."""
    from _record import record

    entries = aggregate(rows)
    start = [s for s in (start or []) if s]
    settings = {k: v for k, v in vars(args).items()} if args is not None else {}
    json_path = record("compare", [*({"kind": "run", **r} for r in rows),
                                   *({"kind": "start_eval", **s} for s in start),
                                   *({"kind": "aggregate", **e} for e in entries),
                                   {"kind": "settings", "argv": sys.argv[1:], "sweep_wall_s": wall_s,
                                    **settings}])
    table = markdown_table(entries, start)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(table)
    png_path = plot_comparison(entries, json_path.with_suffix(".png"), start)
    return {"json": json_path, "md": md_path, "png": png_path, "table": table}


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="+", default=["appo", "grpo", "arpo"], choices=sorted(ALGO_OVERRIDES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--task", default="arithmetic", choices=("arithmetic", "gsm8k", "hotpotqa"))
    parser.add_argument("--tool", default="python", choices=("python", "calculator", "search"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--eval-size", type=int, default=16, help="held-out dev questions")
    parser.add_argument("--eval-samples", type=int, default=2, help="samples per question (pass@k, k = this)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens-per-turn", type=int, default=64)
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "compare"))
    parser.add_argument("--override", nargs="*", default=[], metavar="key=value",
                        help="extra config overrides applied to every run (keep the comparison fair)")
    parser.add_argument("--reuse", action="store_true", help="reuse runs whose summary.json exists")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--eval-start", action="store_true",
                        help="also evaluate the untrained start model once per seed (a reference row)")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="train nothing: aggregate the finished runs (summary.json) found in --runs-dir")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep (seed by seed, every algorithm per seed) and write the results; returns their paths."""
    args = build_parser().parse_args(argv)
    for name in ("steps", "prompts_per_step", "eval_size", "eval_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    started = time.perf_counter()
    rows, start = [], []
    for seed in args.seeds:
        if args.eval_start or args.aggregate_only:
            start.append(evaluate_start(seed, args))
        for algo in args.algos:
            if args.aggregate_only:
                if (Path(args.runs_dir) / f"{algo}-s{seed}" / "summary.json").is_file():
                    rows.append(run_one(algo, seed, argparse.Namespace(**{**vars(args), "reuse": True})))
                continue
            tick = time.perf_counter()
            rows.append(run_one(algo, seed, args))
            print(f"[compare] {algo} seed {seed}: pass@1 {rows[-1]['pass@1']:.3f} "
                  f"final reward {rows[-1]['final_reward']:.3f} {time.perf_counter() - tick:.0f}s", flush=True)
    wall_s = time.perf_counter() - started
    if args.aggregate_only:  # the sum of the finished runs' own wall times
        wall_s = sum(r["wall_s"] or 0.0 for r in rows)
    paths = write_results(rows, args, wall_s, start)
    print(paths["table"])
    print(f"sweep wall time {wall_s:.0f}s; wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return paths


if __name__ == "__main__":
    main()
