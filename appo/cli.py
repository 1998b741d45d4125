"""The ``appo`` command line.

    appo train [--algo appo|grpo|arpo] [--config file.yaml] [--print-config] [--allow-config-change]
               [key=value ...]
    appo eval  [--model PATH] [--data file.jsonl] [--limit N] [--samples K] [--out results.jsonl]
               [key=value ...]
    appo plot  run1/metrics.jsonl [run2/metrics.jsonl ...] --out curves.png

``key=value`` overrides use the dotted config keys of ``appo.config`` (e.g. ``algo.rollouts_per_prompt=8
optim.lr=2e-6``); ``--print-config`` prints them all with their effective values, as YAML ``--config`` reads.
Bad input (a config value, a data row, a checkpoint that cannot be resumed) is reported as one line naming the
key, the file and the line, before any model loads: exit status 2 for usage, 1 for a checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from appo.algorithms import ALGORITHMS
from appo.config import ConfigError, check_available, dump_yaml, load_config
from appo.runs import resolve_model
from appo.tasks.data import read_jsonl

# The fields of an `appo eval --data` row, and the types their values may have.
EVAL_FIELDS = {"question": str, "answer": (str, int, float)}


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of all sub-commands (exposed for tests and shell completion)."""
    parser = argparse.ArgumentParser(prog="appo",
                                     description="APPO / GRPO / ARPO training for tool-using LLM agents")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a policy (the default config is the CPU demo)")
    train.add_argument("--algo", choices=list(ALGORITHMS), help="shorthand for algo.name=...")
    train.add_argument("--config", help="YAML file applied on top of the defaults (the CPU demo)")
    train.add_argument("--print-config", action="store_true",
                       help="print the effective config (defaults + --config + overrides) as YAML and exit")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume even though the config differs from the checkpoint's, applying each change "
                            "(same as allow_config_change=true)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    evaluate = commands.add_parser("eval", help="pass@1 / pass@k of a model on a task file (sampled, with tools)")
    evaluate.add_argument("--model", default="smollm2-135m-instruct",
                          help="'smollm2-135m-instruct', a transformers model folder, or what `appo train` "
                               "wrote (the run folder, e.g. runs/appo-demo, or one of its checkpoints)")
    evaluate.add_argument("--data", default=None,
                          help="a .jsonl file with question / answer fields (default: the dev split of "
                               "data.task)")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    evaluate.add_argument("--out", default=None, help="write per-item results to this .jsonl file")
    evaluate.add_argument("--samples", type=int, default=1, help="rollouts per question (pass@k with k = N)")
    evaluate.add_argument("--config", help="YAML file for the rollout / data settings")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    plot = commands.add_parser("plot", help="plot metrics.jsonl curves of one or several runs")
    plot.add_argument("metrics", nargs="+", help="metrics.jsonl files")
    plot.add_argument("--out", required=True, help="the PNG to write")
    return parser


class UsageError(ValueError):
    """Bad command-line input: reported as one line with exit status 2 (errors while running keep
    tracebacks)."""


def _config_from(args: argparse.Namespace):
    overrides = list(args.overrides)
    if getattr(args, "algo", None):
        overrides.insert(0, f"algo.name={args.algo}")
    if getattr(args, "allow_config_change", False):
        overrides.append("allow_config_change=true")
    try:
        return load_config(args.config, overrides)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _train(args: argparse.Namespace) -> int:
    config = _config_from(args)
    if args.print_config:
        print(dump_yaml(config), end="")
        return 0
    try:
        summary = importlib.import_module("appo.trainer").train(config)
    except ConfigError as err:  # what this machine lacks (no CUDA, a missing model folder, ...)
        raise UsageError(str(err)) from err
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    """The few lines ``appo train`` ends with: what ran, how it did, how long each phase took, where the
    metrics and the plot are."""
    last = summary.get("last_step") or {}
    lines = [f"appo train: {summary['algo']}, {summary['steps']} steps -> {summary['output_dir']}"]
    if last:
        phases = ", ".join(f"{k.split('/')[1]} {v:.1f} s" for k, v in last.items()
                           if k.startswith("time/") and k != "time/step")
        lines.append(f"  last step: reward {last['reward']:.3f}, accuracy {last['accuracy']:.3f}, "
                     f"tool calls/rollout {last['tool_calls']:.2f}, {last['time/step']:.1f} s ({phases})")
    if "mean_time_per_step" in summary:
        lines.append(f"  mean over steps: reward {summary['mean_reward']:.3f}, "
                     f"{summary['mean_time_per_step']:.1f} s/step")
    if "eval" in summary:
        ev = summary["eval"]
        at_k = f", pass@{ev['k']} {ev['pass@k']:.3f}" if ev["k"] > 1 else ""
        lines.append(f"  held-out ({ev['items']} questions): pass@1 {ev['pass@1']:.3f}{at_k}, "
                     f"tool calls/rollout {ev['tool_calls']:.2f}")
    lines.append(f"  metrics: {summary['metrics']}")
    lines.append(f"  plot:    {summary['plot']}")
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit: must be >= 1, got {args.limit}")
    if args.samples < 1:
        raise UsageError(f"--samples: must be >= 1, got {args.samples}")
    config = _config_from(args)
    try:
        check_available(config, model=False, data=args.data is None)  # --data replaces the task's data
        if args.data is not None:
            read_jsonl(args.data, required=EVAL_FIELDS)
        resolve_model(args.model)  # a wrong --model: one line saying what was expected, before any load
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from err
    if args.out is not None and not Path(args.out).resolve().parent.is_dir():
        raise UsageError(f"--out: the folder of {args.out} does not exist")
    summary = importlib.import_module("appo.trainer").evaluate(config, model_path=args.model,
                                                               data_path=args.data, limit=args.limit, samples=args.samples,
                                                               out_path=args.out)
    print(json.dumps(summary))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from appo.metrics import plot_metrics

    print(plot_metrics(args.metrics, args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``appo`` in pyproject). Returns the exit status; bad input exits with status 2."""
    parser = build_parser()
    # key=value overrides may come before and after the options (argparse alone takes only one run of them)
    args, rest = parser.parse_known_args(argv)
    if rest and (not hasattr(args, "overrides") or any(item.startswith("-") for item in rest)):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    handler = {"train": _train, "eval": _eval, "plot": _plot}[args.command]
    try:
        return handler(args)
    except UsageError as err:
        parser.exit(2, f"appo {args.command}: error: {err}\n")
    except ValueError as err:  # a checkpoint that cannot be resumed: one line too (appo.checkpoint loads torch)
        from appo.checkpoint import CheckpointError

        if not isinstance(err, CheckpointError):
            raise
        parser.exit(1, f"appo {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
