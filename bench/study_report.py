"""The learning study's report: intervals (bench/study_stats.py), a markdown table, a plot and one json.

``analyse(starts, runs)`` works on the plain dicts bench/study.py writes (``start_eval`` / ``run_one``), so it
can be tested on synthetic runs. Two comparisons:

- **equal trajectories**: every run's last evaluation (the same steps x prompts x M trajectories for all);
- **equal wall time**: every run at T*, the shortest training time of all runs, its per-question scores
  interpolated linearly between the two evaluations around T* (``study_stats.at_time``; the start model is
  the evaluation at time 0). An algorithm with cheaper steps has trained more steps by T*.

Each gives the mean held-out accuracy per variant with its 95% interval, the paired difference to GRPO and
the gain over the start model (paired by seed and question, over the same bootstrap resamples).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import study_stats as stats


def _fmt(interval: dict, digits: int = 3, sign: bool = False) -> str:
    plus = "+" if sign else ""
    return (f"{interval['mean']:{plus}.{digits}f} [{interval['lo']:{plus}.{digits}f}, "
            f"{interval['hi']:{plus}.{digits}f}]")


def _check(starts: list[dict], runs: list[dict]) -> tuple[list[int], list[str], list[str]]:
    """(seeds, variants in first-seen order, question ids) of a complete study, or a ValueError saying what
    is missing or does not match: every variant has a run for every seed that has a start evaluation, every
    evaluation covers the same questions in the same order, and every run had the same budget."""
    if not runs:
        raise ValueError("runs: need at least one finished run")
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    if "grpo" not in variants:
        raise ValueError(f"runs: the report compares with grpo, which has no run (got {variants})")
    seeds = sorted(s["seed"] for s in starts)
    have = {(r["variant"], r["seed"]) for r in runs}
    missing = [f"{v}-s{s}" for s in seeds for v in variants if (v, s) not in have]
    extra = sorted({r["seed"] for r in runs} - set(seeds))
    if missing or extra or not seeds:
        raise ValueError(f"runs: an incomplete study (missing runs {missing}, seeds without a start "
                         f"evaluation {extra}); finish it or pass only complete seeds")
    ids = starts[0]["ids"]
    for item in [*starts, *(e for r in runs for e in r["evals"])]:
        if item["ids"] != ids:
            raise ValueError("runs: the evaluations did not all use the same held-out questions")
    budgets = {(r["steps"], r["prompts_per_step"], r["M"], r["evals"][-1]["trajectories"]) for r in runs}
    if len(budgets) != 1:
        raise ValueError(f"runs: unequal budgets (steps, prompts per step, M, trajectories): {sorted(budgets)}")
    return seeds, variants, ids


def analyse(starts: list[dict], runs: list[dict], draws: int = stats.DRAWS) -> dict:
    """Intervals of the study: {"seeds", "questions", "t_star", "start": interval, "variants": [per variant:
    final (equal trajectories) and at_time (equal wall time) intervals, their paired differences to GRPO and
    gains over the start, the curve of held-out accuracy per evaluation point, mean training seconds]}."""
    seeds, variants, ids = _check(starts, runs)
    w = stats.weights(len(seeds), len(ids), draws=draws)
    start = np.array([next(s for s in starts if s["seed"] == seed)["correct"] for seed in seeds])
    by = {(r["variant"], r["seed"]): r for r in runs}
    t_star = min(r["evals"][-1]["train_s"] for r in runs)

    def matrix(variant: str, pick) -> np.ndarray:
        return np.array([pick(by[variant, seed], start[i]) for i, seed in enumerate(seeds)])

    def final(run, _start):
        return run["evals"][-1]["correct"]

    def at_t_star(run, start_row):
        times = [0.0, *(e["train_s"] for e in run["evals"])]
        return stats.at_time(times, [start_row, *(e["correct"] for e in run["evals"])], t_star)

    grpo = {"final": matrix("grpo", final), "time": matrix("grpo", at_t_star)}
    entries = []
    for variant in variants:
        own = {"final": matrix(variant, final), "time": matrix(variant, at_t_star)}
        group = [by[variant, seed] for seed in seeds]
        curve = []
        for k in range(len(group[0]["evals"])):
            points = [r["evals"][k] for r in group]
            curve.append({"step": points[0]["step"], "trajectories": points[0]["trajectories"],
                          "train_s": float(np.mean([p["train_s"] for p in points])),
                          "accuracy": stats.interval([p["correct"] for p in points], w).as_dict()})
        steps_by_t = [float(np.interp(t_star, [0.0, *(e["train_s"] for e in r["evals"])],
                                      [0, *(e["step"] for e in r["evals"])])) for r in group]
        entries.append({
            "variant": variant, "algo": group[0]["algo"], "seeds": seeds,
            "final": stats.interval(own["final"], w).as_dict(),
            "final_vs_grpo": stats.paired_difference(own["final"], grpo["final"], w).as_dict(),
            "final_gain": stats.paired_difference(own["final"], start, w).as_dict(),
            "at_time": stats.interval(own["time"], w).as_dict(),
            "at_time_vs_grpo": stats.paired_difference(own["time"], grpo["time"], w).as_dict(),
            "at_time_gain": stats.paired_difference(own["time"], start, w).as_dict(),
            "steps_by_t_star": float(np.mean(steps_by_t)), "curve": curve,
            "train_s": float(np.mean([r["train_s"] for r in group])),
            "train_s_per_step": float(np.mean([r["train_s"] / r["steps"] for r in group])),
            "trajectories": group[0]["evals"][-1]["trajectories"], "steps": group[0]["steps"],
            "phases_per_step": _phases(group),
        })
    return {"seeds": seeds, "questions": len(ids), "draws": draws, "t_star": t_star,
            "start": stats.interval(start, w).as_dict(), "variants": entries}


PHASES = ("rollout", "old_logprobs", "branch", "update")


def _phases(group: list[dict]) -> dict:
    """Mean seconds per step of each trainer phase (``time/<phase>`` in the runs' histories; 0 where a
    variant has no such phase, e.g. GRPO's branch)."""
    steps = [h for r in group for h in r.get("history", [])]
    return {p: float(np.mean([h.get(f"time/{p}") or 0.0 for h in steps])) if steps else None for p in PHASES}


def markdown_table(analysis: dict) -> str:
    """GitHub tables: equal trajectories and equal wall time (95% intervals in brackets), then the cost of a
    step per phase when the runs carry their per-step times."""
    entries = analysis["variants"]
    first = entries[0]
    head = (f"Held-out accuracy on {analysis['questions']} questions, mean over seeds {analysis['seeds']} "
            f"[95% bootstrap interval over seeds and questions]. Start model: {_fmt(analysis['start'])}.\n\n")
    lines = [f"**Equal trajectories** ({first['trajectories']} per run: {first['steps']} steps)\n",
             "| variant | accuracy | gain over start | vs GRPO | training s / run | s / step |",
             "|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['variant']} | {_fmt(e['final'])} | {_fmt(e['final_gain'], sign=True)} "
                     f"| {_fmt(e['final_vs_grpo'], sign=True) if e['variant'] != 'grpo' else '(baseline)'} "
                     f"| {e['train_s']:.0f} | {e['train_s_per_step']:.1f} |")
    lines += ["", (f"**Equal wall time** (T* = {analysis['t_star']:.0f} s of training, the shortest run; "
                   "accuracy interpolated between evaluations)\n"),
              "| variant | steps by T* | accuracy | gain over start | vs GRPO |", "|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['variant']} | {e['steps_by_t_star']:.1f} | {_fmt(e['at_time'])} "
                     f"| {_fmt(e['at_time_gain'], sign=True)} "
                     f"| {_fmt(e['at_time_vs_grpo'], sign=True) if e['variant'] != 'grpo' else '(baseline)'} |")
    if all(e.get("phases_per_step") and None not in e["phases_per_step"].values() for e in entries):
        grpo = next((e["train_s_per_step"] for e in entries if e["variant"] == "grpo"), None)
        lines += ["", "**Cost of a step** (mean seconds per step, from the trainer's `time/*` metrics)\n",
                  "| variant | s / step | rollout | pi_old recompute | branch | update | vs GRPO |",
                  "|---|---|---|---|---|---|---|"]
        for e in entries:
            ph = e["phases_per_step"]
            ratio = f"{e['train_s_per_step'] / grpo:.2f}x" if grpo else ""
            lines.append(f"| {e['variant']} | {e['train_s_per_step']:.1f} | {ph['rollout']:.1f} "
                         f"| {ph['old_logprobs']:.1f} | {ph['branch']:.1f} | {ph['update']:.1f} | {ratio} |")
    return head + "\n".join(lines) + "\n"


def plot(analysis: dict, out_png: str | Path) -> Path:
    """Left: held-out accuracy against trajectories sampled; middle: against training wall time (T* dashed);
    right: each variant's difference to GRPO at equal trajectories and at equal wall time. Points are means
    over seeds with their 95% intervals. Returns ``out_png``."""
    import matplotlib

    from appo.metrics import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_traj, by_time, diffs) = plt.subplots(1, 3, figsize=(16, 4.4))
    start = analysis["start"]
    for e in analysis["variants"]:
        acc = [start, *(p["accuracy"] for p in e["curve"])]
        mean = [a["mean"] for a in acc]
        err = np.array([[a["mean"] - a["lo"] for a in acc], [a["hi"] - a["mean"] for a in acc]])
        for axis, xs in ((by_traj, [0, *(p["trajectories"] for p in e["curve"])]),
                         (by_time, [0.0, *(p["train_s"] for p in e["curve"])])):
            axis.errorbar(xs, mean, yerr=err, marker="o", capsize=3, label=e["variant"])
    by_traj.set_xlabel("trajectories sampled per run")
    by_time.set_xlabel("training wall time (s, mean over seeds)")
    by_time.axvline(analysis["t_star"], color="k", linestyle="--", linewidth=1, label="T* (equal time)")
    for axis in (by_traj, by_time):
        axis.set_ylabel("held-out accuracy")
        axis.legend(fontsize=8)
    by_traj.set_title(f"{analysis['questions']} held-out questions, seeds {analysis['seeds']}")
    others = [e for e in analysis["variants"] if e["variant"] != "grpo"]
    for offset, key, label in ((-0.15, "final_vs_grpo", "equal trajectories"),
                               (0.15, "at_time_vs_grpo", "equal wall time")):
        ys = [i + offset for i in range(len(others))]
        means = [e[key]["mean"] for e in others]
        err = np.array([[e[key]["mean"] - e[key]["lo"] for e in others],
                        [e[key]["hi"] - e[key]["mean"] for e in others]])
        diffs.errorbar(means, ys, xerr=err, fmt="o", capsize=3, label=label)
    diffs.axvline(0.0, color="k", linewidth=1)
    diffs.set_yticks(range(len(others)), [e["variant"] for e in others])
    diffs.set_xlabel("accuracy minus GRPO's (95% interval)")
    diffs.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, out_png)


def write_report(starts: list[dict], runs: list[dict], settings: dict, name: str = "study") -> dict:
    """Record every start evaluation, run and interval (``_record.record``: <results>/<name>-<utc>.json),
    then the table (.md) and plot (.png) beside it; returns their paths and the table."""
    from _record import record

    analysis = analyse(starts, runs)
    json_path = record(name, [*({"kind": "start", **s} for s in starts), *({"kind": "run", **r} for r in runs),
                              {"kind": "analysis", **analysis}, {"kind": "settings", **settings}])
    table = markdown_table(analysis)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(table)
    png_path = plot(analysis, json_path.with_suffix(".png"))
    return {"json": json_path, "md": md_path, "png": png_path, "table": table, "analysis": analysis}
