"""The ``appo`` command line.

    appo train [--algo grpo|arpo|appo] [--config file.yaml] [--print-config] [key=value ...]
    appo eval  [--model PATH] --data file.jsonl [--limit N] [--out results.jsonl] [key=value ...]
    appo plot  run1/metrics.jsonl [run2/metrics.jsonl ...] --out curves.png

``key=value`` overrides use the dotted config keys of ``appo.config`` (e.g. ``algo.M=8 optim.lr=2e-6``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import yaml

from appo.config import load_config, to_dict


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of all sub-commands (exposed for tests and shell completion)."""
    parser = argparse.ArgumentParser(prog="appo",
                                     description="APPO / GRPO / ARPO training for tool-using LLM agents")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a policy (the default config is the CPU demo)")
    train.add_argument("--algo", choices=("appo", "grpo", "arpo"), help="shorthand for algo.algo=...")
    train.add_argument("--config", help="YAML file applied on top of the built-in default")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    evaluate = commands.add_parser("eval", help="accuracy of a model on a task file (greedy, with tools)")
    evaluate.add_argument("--model", default="smollm2-135m-instruct",
                          help="'smollm2-135m-instruct' or a checkpoint directory")
    evaluate.add_argument("--data", required=True, help="a .jsonl file with question / answer fields")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    evaluate.add_argument("--out", default=None, help="write per-item results to this .jsonl file")
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
        overrides.insert(0, f"algo.algo={args.algo}")
    try:
        return load_config(args.config, overrides)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _train(args: argparse.Namespace) -> int:
    config = _config_from(args)
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return 0
    importlib.import_module("appo.trainer").train(config)
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit: must be >= 1, got {args.limit}")
    config = _config_from(args)
    summary = importlib.import_module("appo.trainer").evaluate(config, model_path=args.model,
                                                               data_path=args.data, limit=args.limit,
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
    args = parser.parse_args(argv)
    handler = {"train": _train, "eval": _eval, "plot": _plot}[args.command]
    try:
        return handler(args)
    except UsageError as err:
        parser.exit(2, f"appo {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
