"""The learning study (issue 16): does APPO teach SmolLM2-135M more than GRPO and ARPO at the same budget?

Every run trains with the committed recipe (configs/arithmetic-learn.yaml) and differs from the others only
in its algorithm keys (``VARIANTS``): the same M trajectories per prompt, the same prompts in the same order
for a given seed, the same steps. A run is trained in segments (``train`` resumes each from its checkpoint)
and evaluated after each on the same held-out questions (the task's own seeded dev stream, disjoint from
training), one sampled answer per question, with the run's seed as sampling seed; the start model is
evaluated once per seed with that same seed. So each run gives a curve of held-out accuracy against
trajectories sampled and against training wall time (the sum of the trainer's ``time/step``: evaluation and
checkpoints left out). bench/study_report.py turns the runs into intervals, a table and a plot.

    python bench/study.py                    # APPO, GRPO, ARPO x seeds 0 1 2 (docs/study.md, README)
    python bench/study.py --ablations        # + APPO w/o A_fut, w/o dual-group, BS -> entropy
    python bench/study.py --jobs 2           # two runs at a time, one torch thread each
    python bench/study.py --quick            # the whole pipeline in minutes (CI: tests/test_study.py)
    python bench/study.py --report-only      # the json / table / plot from the finished runs

Unattended and resumable: a finished run (result.json) is reused, an unfinished one goes on from its last
evaluated segment; a run whose config differs from the recipe's is refused (use another --runs-dir).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

RECIPE = REPO / "configs" / "arithmetic-learn.yaml"
# The algorithm keys of each variant, on top of the recipe (which sets algo.M, N, B for all of them).
VARIANTS = {
    "appo": [],
    "grpo": ["algo.algo=grpo"],
    "arpo": ["algo.algo=arpo"],
    "appo-no-afut": ["algo.b=0"],                # the paper's "w/o A_fut"
    "appo-one-group": ["algo.one_group=true"],   # "w/o dual-group"
    "appo-entropy-bs": ["algo.entropy_only=true"],  # "BS -> entropy"
}
MAIN, ABLATIONS = ("appo", "grpo", "arpo"), ("appo-no-afut", "appo-one-group", "appo-entropy-bs")
# --quick: the recipe shrunk to a pipeline check: 2 steps of 2 prompts x M = 4 (APPO N = 2, B = 1; one prompt
# per mini-batch, so APPO's second mini-batch sees a policy shift), 4 held-out questions, short answers.
QUICK = ["steps=2", "prompts_per_step=2", "optim.minibatches_per_step=2", "algo.M=4", "algo.N=2", "algo.B=1",
         "data.train_size=64", "data.eval_size=4", "rollout.max_new_tokens_per_turn=24"]
# Metrics kept per step in result.json (the rest stays in the run's metrics.jsonl).
STEP_KEYS = ("step", "reward", "accuracy", "rollouts", "rollouts_per_prompt", "time/step", "time/rollout",
             "time/old_logprobs", "time/branch", "time/update")


# ---------------------------------------------------------------------------------------------- configs
def run_config(variant: str, seed: int, args: argparse.Namespace):
    """The TrainConfig of one run: recipe, the variant's algorithm keys, the study's own keys, then
    ``--override`` (applied to every run alike)."""
    from appo.config import load_config

    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(VARIANTS)}, got {variant!r}")
    overrides = [*VARIANTS[variant], f"seed={seed}", f"output_dir={Path(args.runs_dir) / f'{variant}-s{seed}'}",
                 "eval_every=0", "eval_at_end=false", "keep_checkpoints=1", "resume=true",
                 *(QUICK if args.quick else []), *(["threads=1"] if args.jobs > 1 else []), *args.override]
    config = load_config(args.config, overrides)
    config.checkpoint_every = config.steps  # a checkpoint at each segment's end (train saves at its last step)
    return config


def eval_steps(steps: int, evals: int) -> list[int]:
    """``evals`` evaluation points spread evenly over ``steps`` (the last one at ``steps``), e.g. 12, 4 ->
    [3, 6, 9, 12]; duplicates dropped when evals > steps."""
    if steps < 1 or evals < 1:
        raise ValueError(f"steps, evals: must be >= 1, got {steps}, {evals}")
    return sorted({max(1, round(steps * k / evals)) for k in range(1, evals + 1)})


# ---------------------------------------------------------------------------------------------- evaluation
def read_eval(path: Path) -> dict:
    """{"ids": question ids in order, "correct": per-question mean correctness over its samples} of the
    per-rollout records ``appo.trainer.evaluate(out_path=...)`` wrote."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ids, totals, counts = [], {}, {}
    for row in rows:
        if row["id"] not in totals:
            ids.append(row["id"])
            totals[row["id"]], counts[row["id"]] = 0.0, 0
        totals[row["id"]] += float(row["correct"])
        counts[row["id"]] += 1
    if not ids:
        raise ValueError(f"{path}: no evaluation records")
    return {"ids": ids, "correct": [totals[i] / counts[i] for i in ids]}


def evaluate_into(config, path: Path, model_path: str | None = None) -> dict:
    """Evaluate ``model_path`` (None: the start model) on the held-out questions with ``config``'s sampling
    settings and seed; the per-rollout records go to ``path`` (written whole or not at all)."""
    import torch

    from appo.trainer import evaluate

    if config.threads > 0:  # as the trainer does (a worker that only evaluates never built one)
        torch.set_num_threads(config.threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    started = time.perf_counter()
    evaluate(config, model_path=model_path, samples=config.eval_samples, out_path=str(partial))
    partial.replace(path)
    return {**read_eval(path), "eval_s": time.perf_counter() - started}


def start_eval(seed: int, args: argparse.Namespace) -> dict:
    """The untrained model's held-out evaluation for ``seed`` (the point every curve of that seed starts from),
    cached in <runs-dir>/start-s<seed>/eval.jsonl."""
    config = run_config("grpo", seed, args)
    path = Path(args.runs_dir) / f"start-s{seed}" / "eval.jsonl"
    result = {**read_eval(path), "eval_s": None} if path.is_file() else evaluate_into(config, path)
    return {"kind": "start", "seed": seed, "step": 0, "trajectories": 0, "train_s": 0.0, **result}


# ---------------------------------------------------------------------------------------------- one run
# Keys that change where a run goes, how fast it computes or how often it saves, never its numbers.
NOT_COMPARED = {"output_dir", "threads", "device", "resume", "allow_config_change", "checkpoint_every",
                "keep_checkpoints", "tensorboard", "eval_every", "eval_at_end"}


def comparable(config) -> dict:
    """The config keys that decide what a run computes (``NOT_COMPARED`` left out), flat."""
    from appo.config import flat_dict

    return {k: v for k, v in flat_dict(config).items() if k not in NOT_COMPARED}


def run_one(variant: str, seed: int, args: argparse.Namespace, progress=None) -> dict:
    """Train and evaluate one (variant, seed) run, segment by segment, or reuse it when finished; returns its
    result (also written to <run>/result.json). ``progress``: called after each evaluated segment."""
    from appo.metrics import read_metrics
    from appo.trainer import train

    config = run_config(variant, seed, args)
    run = Path(config.output_dir)
    result_path = run / "result.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        changed = sorted(k for k, v in comparable(config).items() if result["config"].get(k) != v)
        if changed:
            raise ValueError(f"--runs-dir: the finished run {run} was trained with other values of {changed}; "
                             "use another --runs-dir (or delete the run) to train with the current recipe")
        return result
    started, evals = time.perf_counter(), []
    for step in eval_steps(config.steps, args.evals):
        path = run / "evals" / f"step-{step:06d}.jsonl"
        if path.is_file():
            evals.append({"step": step, **read_eval(path), "eval_s": None})
            continue
        train(dataclasses.replace(config, steps=step))
        checkpoint = run / "checkpoints" / f"step-{step:08d}"
        evals.append({"step": step, **evaluate_into(config, path, str(checkpoint))})
        if progress is not None:
            progress(variant, seed, step, evals[-1])
    history = read_metrics(run / "metrics.jsonl")
    for point in evals:
        done = [r for r in history if r["step"] <= point["step"]]
        point["train_s"] = sum(r["time/step"] for r in done)
        point["trajectories"] = round(sum(r["rollouts_per_prompt"] for r in done) * config.prompts_per_step)
    result = {"kind": "run", "variant": variant, "algo": config.algo.algo, "seed": seed, "steps": config.steps,
              "prompts_per_step": config.prompts_per_step, "M": config.algo.M, "threads": config.threads,
              "jobs": args.jobs, "train_s": evals[-1]["train_s"], "wall_s": time.perf_counter() - started,
              "evals": evals, "history": [{k: r.get(k) for k in STEP_KEYS} for r in history],
              "config": comparable(config)}
    result_path.write_text(json.dumps(result, indent=1))
    if not args.keep_checkpoints:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # weights + AdamW: ~1.6 GB for SmolLM2
    return result


# ---------------------------------------------------------------------------------------------- the study
def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(variant, seed) of every run, seed-major so that an interrupted study has whole seeds first."""
    variants = [*args.variants, *(v for v in ABLATIONS if args.ablations and v not in args.variants)]
    return [(variant, seed) for seed in args.seeds for variant in variants]


def worker_command(task: tuple[str, int] | int, args: argparse.Namespace) -> list[str]:
    """The command line that runs one task (a (variant, seed) run or a seed's start evaluation) in its own
    process, with this study's settings."""
    which = ["--start", str(task)] if isinstance(task, int) else ["--run", task[0], str(task[1])]
    return [sys.executable, str(Path(__file__).resolve()), *which, "--config", str(args.config),
            "--runs-dir", str(args.runs_dir), "--evals", str(args.evals), "--jobs", str(args.jobs),
            *(["--quick"] if args.quick else []), *(["--keep-checkpoints"] if args.keep_checkpoints else []),
            *(["--override", *args.override] if args.override else [])]


def run_all(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Every start evaluation and run of the plan (``--jobs`` at a time, each in its own process when > 1),
    under one progress bar; returns (starts, runs)."""
    from tqdm import tqdm

    runs = plan(args)
    # The start evaluations last: with --jobs 2, every run then has a partner on the other core nearly all the
    # time (a run alone at the end would train faster than the others).
    tasks = [*runs, *args.seeds]
    runs_dir = Path(args.runs_dir)
    with tqdm(total=len(tasks), desc="study", unit="run") as bar:
        if args.jobs == 1:
            starts = []
            for seed in args.seeds:
                starts.append(start_eval(seed, args))
                bar.update(1)
            results = []
            for variant, seed in runs:
                bar.set_postfix_str(f"{variant} seed {seed}")
                results.append(run_one(variant, seed, args))
                bar.update(1)
            return starts, results
        runs_dir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {}
            for task in tasks:
                log = runs_dir / (f"start-s{task}.log" if isinstance(task, int) else f"{task[0]}-s{task[1]}.log")
                futures[pool.submit(_run_logged, worker_command(task, args), log)] = task
            for future in as_completed(futures):
                future.result()
                bar.set_postfix_str(f"done: {futures[future]}")
                bar.update(1)
    return [start_eval(seed, args) for seed in args.seeds], [run_one(v, s, args) for v, s in runs]


def _run_logged(command: list[str], log: Path) -> None:
    with open(log, "a", encoding="utf-8") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, check=False).returncode
    if code:
        raise RuntimeError(f"{' '.join(command[2:])} failed (exit {code}); see {log}")


def finished(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The start evaluations and runs of the seeds whose every run of the plan is finished (--report-only);
    the other seeds are named on stderr and left out."""
    runs_dir, runs = Path(args.runs_dir), plan(args)
    complete = [s for s in args.seeds if (runs_dir / f"start-s{s}" / "eval.jsonl").is_file()
                and all((runs_dir / f"{v}-s{seed}" / "result.json").is_file() for v, seed in runs if seed == s)]
    if complete != args.seeds:
        print(f"study: seeds {sorted(set(args.seeds) - set(complete))} are unfinished and left out",
              file=sys.stderr)
    return ([start_eval(s, args) for s in complete],
            [run_one(v, s, args) for v, s in runs if s in complete])


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(RECIPE), help="the recipe (YAML) every run starts from")
    parser.add_argument("--variants", nargs="+", default=list(MAIN), choices=list(VARIANTS))
    parser.add_argument("--ablations", action="store_true", help="also run the three APPO ablations")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2 (0 1 with --quick)")
    parser.add_argument("--evals", type=int, help="held-out evaluations per run, evenly spaced; default: 2 "
                        "(steps 3 and 6 of the recipe)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (> 1: one torch thread each)")
    parser.add_argument("--runs-dir", default=None, help="default: runs/study (runs/study-quick with --quick)")
    parser.add_argument("--override", nargs="*", default=[], metavar="key=value",
                        help="config overrides applied to every run alike")
    parser.add_argument("--quick", action="store_true", help="a pipeline check: 2 seeds, 2 steps, 4 questions")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs")
    parser.add_argument("--run", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, metavar="SEED", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and checked arguments (each error names its option)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0, 1] if args.quick else [0, 1, 2]
    if args.evals is None:
        args.evals = 2
    args.runs_dir = args.runs_dir or str(REPO / "runs" / ("study-quick" if args.quick else "study"))
    for name in ("evals", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: each seed once, got {args.seeds}")
    if "grpo" not in args.variants:
        parser.error("--variants: the report compares every variant with grpo, so it must be included")
    if not Path(args.config).is_file():
        parser.error(f"--config: no recipe at {args.config}")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    """Run (or reuse) the study and write its report; returns the report's paths."""
    from study_report import write_report

    args = parse_args(argv)
    if args.run:  # one run in a worker process
        run_one(args.run[0], int(args.run[1]), args)
        return None
    if args.start is not None:
        start_eval(args.start, args)
        return None
    for variant, seed in plan(args):  # every config is checked before anything trains
        run_config(variant, seed, args)
    started = time.perf_counter()
    starts, runs = finished(args) if args.report_only else run_all(args)
    if not runs:
        raise SystemExit(f"--runs-dir: no finished run in {args.runs_dir}")
    settings = {"argv": sys.argv[1:] if argv is None else argv, "recipe": Path(args.config).read_text(),
                "jobs": args.jobs, "evals": args.evals, "quick": args.quick,
                "study_wall_s": time.perf_counter() - started}
    paths = write_report(starts, runs, settings, name="study-quick" if args.quick else "study")
    print(paths["table"])
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return paths


if __name__ == "__main__":
    main()
