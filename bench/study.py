"""The learning study (issue 24), the project's one experiment driver: does APPO's branching help?

Every run trains SmolLM2-135M with the committed recipe (configs/arithmetic-learn.yaml) and differs from the
others only in its arm's algorithm keys (``ARMS``, pre-registered in docs/study.md): the same prompts in the
same order for a given seed, the same steps. A run is trained in segments (``train`` resumes each from its
checkpoint) and evaluated after each on the study's held-out questions (``heldout_examples``: a fresh seeded
stream of the task that nobody tuned on, disjoint from training and from the recipe's tuning questions), one
sampled answer per question with the run's seed as sampling seed; the start model is evaluated once per seed
with that seed.

Each finished run becomes one small json record (per-question results of each evaluation, what the run spent
up to it, its per-step metrics, its config) in the records folder, written as it lands. The study resumes from
there: a run whose record exists is skipped, an unfinished one goes on from its last evaluated segment, and a
record made with another recipe is refused. bench/study_report.py turns whatever records exist into contrasts,
a table and a plot. The driver commits nothing.

    python bench/study.py --jobs 2               # the five arms x seeds 0-11 -> bench/results/study/
    python bench/study.py --step-cost            # each arm's step cost, one run at a time (idle machine)
    python bench/study.py --quick                # the whole pipeline in minutes (CI: tests/test_study.py)
    python bench/study.py --report-only          # the table / plot / analysis from the records
    python bench/study.py --variants appo arpo --seeds 0 1 2 --records-dir runs/other   # other variants
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

RECIPE = REPO / "configs" / "arithmetic-learn.yaml"
RECORDS = REPO / "bench" / "results" / "study"
# The pre-registered arms (docs/study.md): algorithm keys on top of the recipe (M = 8, N = 4, B = 1 for all).
# "{N}" is the recipe's N: GRPO then optimises as many sequences per prompt as APPO does.
ARMS = {
    "appo": [],                                        # the recipe as it is
    "grpo": ["algo.name=grpo"],                                     # M = 8: equal trajectories
    "grpo-m4": ["algo.name=grpo", "algo.rollouts_per_prompt={N}"],  # M = N = 4: equal optimised sequences
    "appo-entropy": ["algo.appo.entropy_only=true"],      # the Branching Score without Omega (paper's ablation)
    "appo-uniform": ["algo.appo.uniform_points=true"],    # branch points uniform over the same candidates
}
# Not part of the study; available with --variants.
EXTRA = {"arpo": ["algo.name=arpo"], "appo-no-afut": ["algo.appo.future_scale=0"],
         "appo-one-group": ["algo.appo.one_group=true"]}
VARIANTS = {**ARMS, **EXTRA}
SEEDS = list(range(12))
COST_SEEDS = [0, 1]  # --step-cost: each arm's step cost is the mean over these seeds' runs
IDLE_LOAD, IDLE_WAIT_S = 0.5, 180  # --step-cost waits (at most 180 s) for a 1-minute load average below 0.5
# The held-out stream: the task's "dev" stream under this task seed (the recipe trains and was tuned on
# task seed 0).
HELDOUT_TASK_SEED = 24
# --quick: the recipe shrunk to a pipeline check that fits CI: 1 step of 2 prompts x M = 4 (APPO N = 2, B = 1;
# one prompt per mini-batch, so APPO's second mini-batch branches after an update), 4 held-out questions, short
# answers, one evaluation per run.
QUICK = ["steps=1", "prompts_per_step=2", "optim.minibatches_per_step=2", "algo.rollouts_per_prompt=4",
         "algo.initial_rollouts=2", "algo.appo.branches_per_rollout=1", "data.train_size=64", "data.eval_size=4",
         "rollout.max_new_tokens_per_turn=24"]
# Per-step metrics kept in a record (besides every time/*, tokens/*, branches/* and tool_calls/* key); the
# rest stays in metrics.jsonl.
STEP_KEYS = ("step", "reward", "accuracy", "rollouts", "rollouts_per_prompt", "response_length", "tool_calls",
             "branches", "branches_filled", "branches_fresh")
# The trainer's per-step counts (step totals) behind what a record reports; read when present.
COUNTS = {"generated_tokens": "tokens/generated", "optimised_tokens": "tokens/optimised",
          "tool_calls": "tool_calls/run", "branches_filled": "branches/filled",
          "branches_fresh": "branches/fresh"}
# Keys that change where a run goes, how fast it computes or how often it saves, never its numbers.
NOT_COMPARED = {"output_dir", "threads", "device", "resume", "allow_config_change", "checkpoint_every",
                "keep_checkpoints", "tensorboard", "eval_every", "eval_at_end"}


# ---------------------------------------------------------------------------------------------- configs
def run_config(variant: str, seed: int, args: argparse.Namespace, folder: str | None = None):
    """The TrainConfig of one run: recipe, ``--quick``'s keys, ``--override`` (every run alike), then the
    variant's algorithm keys and the study's own keys. ``folder``: the run's working folder (default
    <runs-dir>/<variant>-s<seed>)."""
    from appo.config import load_config

    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(VARIANTS)}, got {variant!r}")
    shared = [*(QUICK if args.quick else []), *args.override]
    base = load_config(args.config, shared)
    keys = [k.format(N=base.algo.initial_rollouts) for k in VARIANTS[variant]]
    folder = folder or str(Path(args.runs_dir) / f"{variant}-s{seed}")
    config = load_config(args.config, [*shared, *keys, f"seed={seed}", f"output_dir={folder}", "eval_every=0",
                                       "eval_at_end=false", "keep_checkpoints=1", "resume=true",
                                       *(["threads=1"] if args.jobs > 1 and not args.step_cost else [])])
    config.checkpoint_every = config.steps  # a checkpoint at each segment's end (train saves its last step)
    return config


def comparable(config, drop: tuple[str, ...] = ()) -> dict:
    """The config keys that decide what a run computes (``NOT_COMPARED`` and keys starting with ``drop``
    left out), flat."""
    from appo.config import flat_dict

    return {k: v for k, v in flat_dict(config).items() if k not in NOT_COMPARED and not k.startswith(drop)}


def eval_steps(steps: int, evals: int) -> list[int]:
    """``evals`` evaluation points spread evenly over ``steps`` (the last one at ``steps``), e.g. 12, 4 ->
    [3, 6, 9, 12]; duplicates dropped when evals > steps."""
    if steps < 1 or evals < 1:
        raise ValueError(f"steps, evals: must be >= 1, got {steps}, {evals}")
    return sorted({max(1, round(steps * k / evals)) for k in range(1, evals + 1)})


# ---------------------------------------------------------------------------------------------- held-out set
def heldout_examples(config) -> list:
    """The study's held-out questions (appo.tasks.Example), ``data.eval_size`` of them: the arithmetic task
    with the recipe's options but task seed ``HELDOUT_TASK_SEED``, its "dev" stream in order, skipping every
    question of the recipe's training split and of its own "dev" stream (the questions the recipe was tuned
    on). Ids are "heldout-<i>". Another task keeps its own dev split (no fresh stream exists for it)."""
    from appo.tasks import get_task
    from appo.tasks.base import Example

    data = config.data
    if data.task != "arithmetic":
        task = get_task(data.task, path=data.path, **data.task_options)
        return task.examples("dev")[:data.eval_size]
    recipe = get_task("arithmetic", **data.task_options)
    seen = {e.question for split in ("train", "dev") for e in recipe.examples(split)}
    fresh = get_task("arithmetic", **{**data.task_options, "seed": HELDOUT_TASK_SEED,
                                      "num_dev": data.eval_size + 64})
    kept = [e for e in fresh.examples("dev") if e.question not in seen][:data.eval_size]
    if len(kept) < data.eval_size:
        raise ValueError(f"data.eval_size: only {len(kept)} fresh held-out questions, asked for "
                         f"{data.eval_size}")
    return [Example(id=f"heldout-{i}", question=e.question, answer=e.answer, meta=e.meta)
            for i, e in enumerate(kept)]


def write_heldout(config, path: Path) -> dict:
    """Write the held-out questions to ``path`` (.jsonl with id, question, answer; what ``evaluate`` reads)
    and return {"task", "task_seed", "size", "sha256"} naming them."""
    examples = heldout_examples(config)
    rows = ({"id": e.id, "question": e.question, "answer": e.answer} for e in examples)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:  # workers may get here together: replace atomically
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(text)
        partial.replace(path)
    seed = HELDOUT_TASK_SEED if config.data.task == "arithmetic" else None
    return {"task": config.data.task, "task_seed": seed, "size": len(examples),
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


# ---------------------------------------------------------------------------------------------- evaluation
def read_eval(path: Path) -> dict:
    """{"correct": per-question mean correctness over its samples, in question order} of the per-rollout
    records ``appo.trainer.evaluate(out_path=...)`` wrote."""
    totals: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            totals.setdefault(row["id"], []).append(float(row["correct"]))
    if not totals:
        raise ValueError(f"{path}: no evaluation records")
    return {"correct": [sum(v) / len(v) for v in totals.values()]}


def evaluate_into(config, path: Path, heldout: Path, model_path: str | None = None) -> dict:
    """Evaluate ``model_path`` (None: the start model) on the held-out questions of ``heldout`` with
    ``config``'s sampling settings and seed; the per-rollout records go to ``path`` (whole or not at all)."""
    import torch

    from appo.trainer import evaluate

    if config.threads > 0:  # as the trainer does (a worker that only evaluates never built one)
        torch.set_num_threads(config.threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    started = time.perf_counter()
    data = str(heldout) if config.data.task == "arithmetic" else None
    evaluate(config, model_path=model_path, data_path=data, samples=config.eval_samples,
             out_path=str(partial))
    partial.replace(path)
    return {**read_eval(path), "eval_s": time.perf_counter() - started}


def _write_record(path: Path, record: dict) -> None:
    """Write one record atomically (a reader never sees half a file)."""
    from _record import device_info, git_commit

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    stamped = {**record, "commit": git_commit(), "machine": device_info()}
    partial.write_text(json.dumps(stamped, indent=1) + "\n")
    partial.replace(path)


def _reuse(path: Path, config: dict) -> dict | None:
    """The record at ``path`` when it exists and was made with ``config`` (else a ValueError naming the keys
    that differ); None when there is none."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    made_with = record["config"]
    changed = sorted(k for k in set(config) | set(made_with) if made_with.get(k) != config.get(k))
    if changed:
        raise ValueError(f"--records-dir: {path.name} was made with other values of {changed}; use another "
                         "--records-dir (or delete the record) to run with the current recipe")
    return record


def record_of(task: tuple[str, int] | int, args: argparse.Namespace) -> tuple[Path, dict, object]:
    """(record path, the config values its record must have been made with, the TrainConfig) of one task:
    a seed's start evaluation (an int), a (variant, seed) run, or with ``--step-cost`` a step-cost run."""
    records = Path(args.records_dir)
    if isinstance(task, int):
        config = run_config("appo", task, args)
        return (records / f"start-s{task}.json",
                comparable(config, drop=("algo.", "optim.", "steps", "prompts_per_step")), config)
    variant, seed = task
    if args.step_cost:
        folder = Path(args.runs_dir) / "step-cost" / f"{variant}-s{seed}"
        config = run_config(variant, seed, args, folder=str(folder))
        return records / f"step-cost-{variant}-s{seed}.json", comparable(config), config
    config = run_config(variant, seed, args)
    return records / f"run-{variant}-s{seed}.json", comparable(config), config


def start_eval(seed: int, args: argparse.Namespace) -> dict:
    """The untrained model's held-out evaluation for ``seed`` (the point every curve of that seed starts
    from): the record <records-dir>/start-s<seed>.json, made once."""
    path, settings, config = record_of(seed, args)
    record = _reuse(path, settings)
    if record is None:
        heldout = write_heldout(config, Path(args.runs_dir) / "heldout.jsonl")
        result = evaluate_into(config, Path(args.runs_dir) / f"start-s{seed}" / "eval.jsonl",
                               Path(args.runs_dir) / "heldout.jsonl")
        record = {"kind": "start", "seed": seed, "heldout": heldout, **result, "config": settings}
        _write_record(path, record)
    return record


# ---------------------------------------------------------------------------------------------- spend
def step_spend(row: dict, config) -> dict:
    """What one training step spent, from its metrics.jsonl record: trajectories sampled, sequences optimised
    (APPO: its initial rollouts, i.e. all minus the branches; GRPO / ARPO: all), generated and optimised
    tokens, tool calls run, branches and the fill rule's share of them (filled; fresh: re-samples of the
    prompt), and the step's seconds. The trainer's own counts (``COUNTS``) are used where it records them;
    a record without them (an older trainer) falls back to what is exact there: optimised tokens of APPO and
    GRPO and generated tokens of GRPO are ``response_length`` (the mean over the initial rollouts, which are
    the optimised ones) times their number, tool calls are ``tool_calls`` (per rollout) times the rollouts,
    and APPO's per-micro-batch ``branches_filled`` / ``branches_fresh`` are summed over its micro-batches;
    anything else is None."""
    algo = config.algo.name
    rollouts = int(row["rollouts"])
    branches = int(row.get("branches") or 0)
    optimised = rollouts - branches if algo == "appo" else rollouts
    per_row = row.get("response_length")
    micro = config.optim.minibatches_per_step * config.optim.grad_accumulation
    fallback = {
        "generated_tokens": per_row * rollouts if per_row is not None and algo == "grpo" else None,
        "optimised_tokens": per_row * optimised if per_row is not None and algo in ("appo", "grpo") else None,
        "tool_calls": row["tool_calls"] * rollouts if row.get("tool_calls") is not None else None,
        "branches_filled": (row.get("branches_filled") or 0.0) * micro if algo == "appo" else 0.0,
        "branches_fresh": (row.get("branches_fresh") or 0.0) * micro if algo == "appo" else 0.0,
    }
    counted = {k: row[key] if row.get(key) is not None else fallback[k] for k, key in COUNTS.items()}
    return {"trajectories": row["rollouts_per_prompt"] * config.prompts_per_step, "optimised": optimised,
            **counted, "branches": branches, "train_s": row["time/step"]}


def cumulative(history: list[dict], config, step: int) -> dict:
    """``step_spend`` summed over the steps up to ``step`` (a total is None if any step's is)."""
    rows = [step_spend(r, config) for r in history if r["step"] <= step]
    if len(rows) != step:
        raise ValueError(f"history: metrics for {len(rows)} of the first {step} steps")
    return {k: None if any(r[k] is None for r in rows) else float(sum(r[k] for r in rows)) for k in rows[0]}


# ---------------------------------------------------------------------------------------------- one run
def run_one(variant: str, seed: int, args: argparse.Namespace) -> dict:
    """Train and evaluate one (variant, seed) run, segment by segment, or reuse its record; returns the record
    (also written to <records-dir>/run-<variant>-s<seed>.json)."""
    from appo.metrics import read_metrics
    from appo.trainer import train

    record_path, settings, config = record_of((variant, seed), args)
    reused = _reuse(record_path, settings)
    if reused is not None:
        return reused
    run, heldout_path = Path(config.output_dir), Path(args.runs_dir) / "heldout.jsonl"
    heldout = write_heldout(config, heldout_path)
    started, evals = time.perf_counter(), []
    for step in eval_steps(config.steps, args.evals):
        path = run / "evals" / f"step-{step:06d}.jsonl"
        if path.is_file():
            evals.append({"step": step, **read_eval(path), "eval_s": None})
            continue
        train(dataclasses.replace(config, steps=step))
        checkpoint = run / "checkpoints" / f"step-{step:08d}"
        evals.append({"step": step, **evaluate_into(config, path, heldout_path, str(checkpoint))})
    history = read_metrics(run / "metrics.jsonl")
    for point in evals:
        point.update(cumulative(history, config, point["step"]))
    counters = ("time/", "tokens/", "branches/", "tool_calls/")
    keep = [{k: v for k, v in r.items() if k in STEP_KEYS or k.startswith(counters)} for r in history]
    record = {"kind": "run", "variant": variant, "algo": config.algo.name, "seed": seed,
              "steps": config.steps, "prompts_per_step": config.prompts_per_step,
              "rollouts_per_prompt": config.algo.rollouts_per_prompt,
              "initial_rollouts": config.algo.initial_rollouts,
              "threads": config.threads, "jobs": args.jobs, "heldout": heldout,
              "wall_s": time.perf_counter() - started, "evals": evals, "history": keep,
              "config": settings}
    _write_record(record_path, record)
    if not args.keep_checkpoints:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # weights + AdamW: ~1.6 GB for SmolLM2
    return record


def wait_for_idle() -> tuple[float, float, float]:
    """Wait (at most ``IDLE_WAIT_S``) until the 1-minute load average is below ``IDLE_LOAD``: the previous
    step-cost run's own load takes about 1.5 minutes to decay. Returns the load averages then."""
    deadline = time.monotonic() + IDLE_WAIT_S
    while os.getloadavg()[0] > IDLE_LOAD and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()


def step_cost_one(variant: str, seed: int, args: argparse.Namespace) -> dict:
    """Measure one arm's step cost: the recipe's steps in one uninterrupted run with no evaluation, alone
    (``--step-cost`` runs them one at a time, with the recipe's threads), recording each step's seconds per
    phase and the load average before and after (an idle machine shows about 0 before); the record is
    <records-dir>/step-cost-<variant>-s<seed>.json, made once."""
    from appo.metrics import read_metrics
    from appo.trainer import train

    record_path, settings, config = record_of((variant, seed), args)
    reused = _reuse(record_path, settings)
    if reused is not None:
        return reused
    folder = Path(config.output_dir)
    shutil.rmtree(folder, ignore_errors=True)  # one uninterrupted run: never resumed
    load_before = wait_for_idle()
    if load_before[0] > IDLE_LOAD:
        print(f"study: load average {load_before[0]:.1f} before the step-cost run of {variant} seed {seed}; "
              "the machine is not idle", file=sys.stderr)
    train(config)
    history = read_metrics(folder / "metrics.jsonl")
    record = {"kind": "step_cost", "variant": variant, "algo": config.algo.name, "seed": seed,
              "threads": config.threads, "cpu_count": os.cpu_count(), "load_before": load_before,
              "load_after": os.getloadavg(),
              "history": [{k: v for k, v in r.items() if k == "step" or k.startswith("time/")}
                          for r in history],
              "config": settings}
    _write_record(record_path, record)
    shutil.rmtree(folder, ignore_errors=True)
    return record


# ---------------------------------------------------------------------------------------------- the study
def plan(args: argparse.Namespace) -> list[tuple[str, int] | int]:
    """Every task, seed-major (an interrupted study has whole seeds first): per seed its start evaluation
    (an int) then its (variant, seed) runs. ``--step-cost``: the runs only."""
    return [task for seed in args.seeds
            for task in ([] if args.step_cost else [seed]) + [(v, seed) for v in args.variants]]


def worker_command(task: tuple[str, int] | int, args: argparse.Namespace) -> list[str]:
    """The command line that runs one task in its own process, with this study's settings."""
    which = ["--start", str(task)] if isinstance(task, int) else ["--run", task[0], str(task[1])]
    return [sys.executable, str(Path(__file__).resolve()), *which, "--config", str(args.config),
            "--runs-dir", str(args.runs_dir), "--records-dir", str(args.records_dir),
            "--evals", str(args.evals), "--jobs", str(args.jobs), *(["--quick"] if args.quick else []),
            *(["--keep-checkpoints"] if args.keep_checkpoints else []),
            *(["--override", *args.override] if args.override else [])]


def do(task: tuple[str, int] | int, args: argparse.Namespace) -> dict:
    """Run one task in this process."""
    if isinstance(task, int):
        return start_eval(task, args)
    return (step_cost_one if args.step_cost else run_one)(task[0], task[1], args)


def run_all(args: argparse.Namespace) -> list[str]:
    """Every task of the plan (``--jobs`` at a time, each in its own process when > 1; ``--step-cost``: one
    at a time) under one progress bar; a failed task is logged and the others go on. Returns the failures."""
    from tqdm import tqdm

    tasks, failures = plan(args), []
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(tasks), desc="study", unit="task") as bar:
        if args.jobs == 1 or args.step_cost:
            for task in tasks:
                bar.set_postfix_str(str(task))
                try:
                    do(task, args)
                except Exception as error:  # noqa: BLE001 - the other runs go on; main() exits non-zero
                    failures.append(f"{task}: {error!r}")
                    traceback.print_exc()
                bar.update(1)
            return failures
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {}
            for task in tasks:
                name = f"start-s{task}" if isinstance(task, int) else f"{task[0]}-s{task[1]}"
                futures[pool.submit(_run_logged, worker_command(task, args), runs_dir / f"{name}.log")] = name
            for future in as_completed(futures):
                error = future.exception()
                if error is not None:
                    failures.append(str(error))
                    print(f"study: {error}", file=sys.stderr)
                bar.set_postfix_str(f"done: {futures[future]}")
                bar.update(1)
    return failures


def _run_logged(command: list[str], log: Path) -> None:
    with open(log, "a", encoding="utf-8") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                              check=False).returncode
    if code:
        raise RuntimeError(f"{' '.join(command[2:5])} failed (exit {code}); see {log}")


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(RECIPE), help="the recipe (YAML) every run starts from")
    parser.add_argument("--variants", nargs="+", default=list(ARMS), choices=list(VARIANTS),
                        help=f"default: the study's arms {list(ARMS)}")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="default: 0-11 (0 with --quick, 0 1 with --step-cost)")
    parser.add_argument("--evals", type=int, help="held-out evaluations per run, evenly spaced (default 2: "
                        "steps 3 and 6 of the recipe; 1 with --quick)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (> 1: one torch thread each)")
    parser.add_argument("--runs-dir", default=None, help="working folders (checkpoints, evaluation records): "
                        "default runs/study (runs/study-quick with --quick)")
    parser.add_argument("--records-dir", default=None, help="one json per finished run: default "
                        "bench/results/study (<runs-dir>/records with --quick)")
    parser.add_argument("--override", nargs="*", default=[], metavar="key=value",
                        help="config overrides applied to every run alike")
    parser.add_argument("--quick", action="store_true",
                        help="a pipeline check: 1 seed, 1 step, 1 evaluation of 4 questions")
    parser.add_argument("--step-cost", action="store_true",
                        help="measure each arm's step cost alone (no evaluation), one run at a time")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the records")
    parser.add_argument("--run", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, metavar="SEED", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and checked arguments (each error names its option)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else COST_SEEDS if args.step_cost else list(SEEDS)
    if args.evals is None:
        args.evals = 1 if args.quick else 2
    args.runs_dir = str(args.runs_dir or REPO / "runs" / ("study-quick" if args.quick else "study"))
    args.records_dir = str(args.records_dir or (Path(args.runs_dir) / "records" if args.quick else RECORDS))
    for name in ("evals", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be >= 1, got {getattr(args, name)}")
    for name in ("seeds", "variants"):
        if len(set(getattr(args, name))) != len(getattr(args, name)):
            parser.error(f"--{name}: each once, got {getattr(args, name)}")
    if not Path(args.config).is_file():
        parser.error(f"--config: no recipe at {args.config}")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    """Run (or resume) the study, then report every record there is; returns the report's paths."""
    from study_report import write_report

    args = parse_args(argv)
    if args.run:  # one task in a worker process
        run_one(args.run[0], int(args.run[1]), args)
        return None
    if args.start is not None:
        start_eval(args.start, args)
        return None
    failures = []
    if not args.report_only:
        for task in plan(args):  # every config, and every record already there, is checked before a run
            path, settings, _ = record_of(task, args)
            _reuse(path, settings)
        write_heldout(run_config("appo", args.seeds[0], args), Path(args.runs_dir) / "heldout.jsonl")
        failures = run_all(args)
    if args.step_cost:
        costs = {v: [json.loads((Path(args.records_dir) / f"step-cost-{v}-s{s}.json").read_text())
                     for s in args.seeds] for v in args.variants}
        for variant, records in costs.items():
            steps = [h["time/step"] for r in records for h in r["history"]]
            print(f"{variant}: {sum(steps) / len(steps):.1f} s per step alone ({len(records)} seeds)")
        return {"costs": costs}
    if failures:
        if any(Path(args.records_dir).glob("run-*.json")):
            write_report(args.records_dir)
        raise SystemExit(f"study: {len(failures)} task(s) failed (the others are recorded): {failures}")
    paths = write_report(args.records_dir)
    print(paths["table"])
    print(f"wrote {paths['md']}, {paths['png']}, {paths['json']}")
    return paths


if __name__ == "__main__":
    main()
