"""The learning study's report: contrasts (bench/study_stats.py), a markdown table, a plot and one json, from
whatever records bench/study.py has written (a folder of records, or an older study's single json).

    python bench/study_report.py          # bench/results/study/ -> report.md, report.png, analysis.json
    python bench/study_report.py bench/results/study-20261130T200658Z.json     # the 3-seed study, re-analysed
    python bench/study_report.py --readme  # also rewrite the README's study block from bench/results/study/

Each contrast (arm A minus arm B, ``PRIMARY`` and ``SECONDARY`` as pre-registered in docs/study.md; a primary
contrast is primary at one budget and "supporting" at the others) is taken at four equal budgets: trajectories sampled, sequences optimised, generated tokens and seconds of training.
At a budget x* (the largest every run of both arms reached) each run's per-question scores are interpolated
linearly between its two evaluations around x* (the start model is the evaluation at 0;
``study_stats.at_budget``). Seconds come from the idle step-cost records (``study.py --step-cost``: each arm's
cumulative seconds at step k, mean over the measured seeds) when both arms have them, else from the runs' own
``time/step`` (labelled: shared cores). Every contrast reports the mean difference over seeds, the per-seed
paired t-interval, p, the MDD at 80% power and the crossed seeds x questions interval (the check).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import study_stats as stats
from study import ARMS, COST_SEEDS, SEEDS

REPO = Path(__file__).resolve().parents[1]
# The primary contrasts, each with its primary budget (both arms measured at their last evaluation there);
# the same pair at the other budgets is reported as "supporting".
PRIMARY = {("appo", "grpo-m4"): "optimised", ("appo", "appo-uniform"): "trajectories"}
# What each primary contrast asks (the reading's words).
QUESTIONS = {("appo", "grpo-m4"): "does branching beat plain sampling when both optimise the same sequences?",
             ("appo", "appo-uniform"): "does the Branching Score's choice of points beat a uniform choice?"}
SECONDARY = (("appo", "grpo"), ("appo", "appo-entropy"), ("appo-entropy", "appo-uniform"))
ORDER = ("appo", "grpo", "grpo-m4", "appo-entropy", "appo-uniform")
BUDGETS = {"trajectories": "trajectories", "optimised": "optimised sequences",
           "generated_tokens": "generated tokens", "time": "s of training"}
PHASES = ("rollout", "old_logprobs", "branch", "update")


# ---------------------------------------------------------------------------------------------- records
def load(source: str | Path) -> list[dict]:
    """The records of ``source``: a folder of study.py records (start-*, run-*, step-cost-*.json) or one
    older study json (its "start" and "run" rows)."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for pattern in ("start-s*.json", "run-*.json", "step-cost-*.json")
                       for p in source.glob(pattern))
        return [json.loads(p.read_text()) for p in paths]
    if source.is_file():
        return [r for r in json.loads(source.read_text())["rows"] if r.get("kind") in ("start", "run")]
    raise ValueError(f"source: no records folder or study json at {source}")


def _questions(record: dict) -> str:
    """What names the held-out questions a record was evaluated on."""
    heldout = record.get("heldout")
    return heldout["sha256"] if heldout else json.dumps(record.get("ids") or record["evals"][0]["ids"])


def _split(records: list[dict]):
    """(starts {seed: record}, runs {(variant, seed): record}, costs {variant: [records]}), checked: one
    held-out set, one question count, one steps x prompts schedule."""
    starts = {r["seed"]: r for r in records if r["kind"] == "start"}
    runs = {(r["variant"], r["seed"]): r for r in records if r["kind"] == "run"}
    costs: dict[str, list[dict]] = {}
    for r in records:
        if r["kind"] == "step_cost":
            costs.setdefault(r["variant"], []).append(r)
    if not runs:
        raise ValueError("records: no finished run")
    evaluated = [*starts.values(), *runs.values()]
    if len({_questions(r) for r in evaluated}) != 1:
        raise ValueError("records: the evaluations did not all use the same held-out questions")
    counts = {len(r["correct"]) for r in starts.values()} | {len(e["correct"]) for r in runs.values()
                                                             for e in r["evals"]}
    if len(counts) != 1:
        raise ValueError(f"records: evaluations of different sizes {sorted(counts)}")
    schedules = {(r["steps"], r["prompts_per_step"]) for r in runs.values()}
    if len(schedules) != 1:
        raise ValueError(f"records: runs of different schedules (steps, prompts per step): "
                         f"{sorted(schedules)}")
    return starts, runs, costs


def _cost_curve(records: list[dict]) -> dict[int, float] | None:
    """{step k: cumulative seconds of steps 1..k}, mean over the step-cost records of one arm."""
    if not records:
        return None
    steps = min(len(r["history"]) for r in records)
    per_step = [np.mean([r["history"][k]["time/step"] for r in records]) for k in range(steps)]
    return {k + 1: float(sum(per_step[:k + 1])) for k in range(steps)}


def _budgets(run: dict, axis: str, cost: dict[int, float] | None) -> list[float] | None:
    """The run's budget on ``axis`` at each of its evaluations (None when a run did not record it)."""
    if axis == "time" and cost is not None:
        return [cost.get(e["step"]) for e in run["evals"]] if all(e["step"] in cost for e in run["evals"]) \
            else None
    key = "train_s" if axis == "time" else axis
    values = [e.get(key) for e in run["evals"]]
    return None if any(v is None for v in values) else [float(v) for v in values]


# ---------------------------------------------------------------------------------------------- analysis
def contrasts_for(variants: list[str]) -> list[tuple[str, str, str]]:
    """(A, B, role) of every contrast whose two arms have runs: the pre-registered ones, then every other
    variant against GRPO (role "extra")."""
    chosen = [(a, b, role) for role, pairs in (("primary", PRIMARY), ("secondary", SECONDARY))
              for a, b in pairs if a in variants and b in variants]
    covered = {v for a, b, _ in chosen for v in (a, b)}
    if "grpo" in variants:
        chosen += [(v, "grpo", "extra") for v in variants if v not in covered and v != "grpo"]
    return chosen


def analyse(records: list[dict]) -> dict:
    """The study's numbers from its records: {"questions", "seeds", "start", "variants": [per variant: seeds,
    final accuracy, gain over the start, spend per run, step cost, curve], "contrasts": [per contrast and
    budget: x*, seeds, the study_stats.Contrast fields, mean steps of each arm by x*]}."""
    starts, runs, costs = _split(records)
    seen = list(dict.fromkeys(v for v, _ in runs))
    variants = [v for v in ORDER if v in seen] + [v for v in seen if v not in ORDER]
    curves = {v: _cost_curve(costs.get(v, [])) for v in variants}
    start_seeds = sorted(starts)
    entries = [_variant(v, starts, runs, curves[v]) for v in variants]
    contrasts = []
    for a, b, role in contrasts_for(variants):
        for axis in BUDGETS:
            role_here = "supporting" if role == "primary" and PRIMARY[a, b] != axis else role
            contrasts.append({"a": a, "b": b, "role": role_here, "budget": axis,
                              **_contrast(a, b, axis, starts, runs, curves)})
    questions = len(next(iter(runs.values()))["evals"][0]["correct"])
    start = stats.accuracy([starts[s]["correct"] for s in start_seeds]).as_dict() if starts else None
    return {"questions": questions, "seeds": start_seeds, "start": start, "variants": entries,
            "contrasts": contrasts}


def _variant(variant: str, starts: dict, runs: dict, cost: dict | None) -> dict:
    group = [runs[v, s] for v, s in sorted(runs) if v == variant]
    seeds = [r["seed"] for r in group]
    final = np.array([r["evals"][-1]["correct"] for r in group])
    paired = [s for s in seeds if s in starts]
    gain = stats.contrast([runs[variant, s]["evals"][-1]["correct"] for s in paired],
                          [starts[s]["correct"] for s in paired]).as_dict() if paired else None
    spend_keys = ("trajectories", "optimised", "generated_tokens", "optimised_tokens", "tool_calls",
                  "branches", "branches_filled", "branches_fresh", "train_s")
    spend = {}
    for key in spend_keys:
        values = [r["evals"][-1].get(key) for r in group]
        spend[key] = None if any(v is None for v in values) else float(np.mean(values))
    history = [h for r in group for h in r.get("history", [])]
    phases = {p: float(np.mean([h.get(f"time/{p}") or 0.0 for h in history])) if history else None
              for p in ("step", *PHASES)}
    curve = []
    for k, point in enumerate(group[0]["evals"]):
        at_k = [r["evals"][k] for r in group]
        curve.append({"step": point["step"],
                      "accuracy": stats.accuracy([p["correct"] for p in at_k]).as_dict(),
                      **{axis: (float(np.mean([_budgets(r, axis, cost)[k] for r in group]))
                                if all(_budgets(r, axis, cost) is not None for r in group) else None)
                         for axis in BUDGETS}})
    idle = None
    if cost is not None:
        idle = {"s_per_step": cost[max(cost)] / max(cost)}
    return {"variant": variant, "algo": group[0]["algo"], "seeds": seeds, "steps": group[0]["steps"],
            "final": stats.accuracy(final).as_dict(), "gain": gain, "spend": spend, "phases": phases,
            "idle": idle, "curve": curve}


def _contrast(a: str, b: str, axis: str, starts: dict, runs: dict, curves: dict) -> dict:
    """One contrast at one budget (``analyse``); {"missing": why} when it cannot be taken."""
    seeds = [s for s in sorted(starts) if (a, s) in runs and (b, s) in runs]
    if not seeds:
        return {"missing": "no seed with a start evaluation and runs of both arms"}
    idle = curves[a] is not None and curves[b] is not None
    source = {v: curves[v] if axis == "time" and idle else None for v in (a, b)}
    budgets = {(v, s): _budgets(runs[v, s], axis, source[v]) for v in (a, b) for s in seeds}
    if any(x is None for x in budgets.values()):
        return {"missing": f"{BUDGETS[axis]} not recorded"}
    x_star = min(x[-1] for x in budgets.values())

    def scores(variant: str) -> tuple[np.ndarray, float]:
        rows, steps = [], []
        for s in seeds:
            run, xs = runs[variant, s], [0.0, *budgets[variant, s]]
            rows.append(stats.at_budget(xs, [starts[s]["correct"], *(e["correct"] for e in run["evals"])],
                                        x_star))
            steps.append(float(np.interp(x_star, xs, [0, *(e["step"] for e in run["evals"])])))
        return np.array(rows), float(np.mean(steps))

    (score_a, steps_a), (score_b, steps_b) = scores(a), scores(b)
    result = stats.contrast(score_a, score_b).as_dict()
    time_source = ("idle step cost" if idle else "the runs' own time/step (shared cores)") if axis == "time" \
        else None
    return {"x": x_star, "seeds": seeds, "steps_a": steps_a, "steps_b": steps_b, "time_source": time_source,
            **{k: v for k, v in result.items() if k != "seeds"}}


# ---------------------------------------------------------------------------------------------- output
def _pts(value: float | None, sign: bool = True) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{100 * value:{'+' if sign else ''}.1f}"


def _interval(lo: float, hi: float, sign: bool = True) -> str:
    return "n/a" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{_pts(lo, sign)}, {_pts(hi, sign)}]"


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else ("< 0.001" if p < 0.001 else f"{p:.2g}")


def _amount(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 10 or x == round(x) else f"{x:.1f}"


CONTRASTS_NOTE = ("Differences in points (A - B), mean over seeds; 95% t-interval over the per-seed paired "
                  "differences (S - 1 degrees of freedom), two-sided p; MDD: the smallest true difference "
                  "the test detects with 80% power at this spread; crossed: the seeds x questions "
                  "random-effects interval (a check). x*: the largest budget every run of both arms reached; "
                  "scores there are interpolated between evaluations.")
ARMS_NOTE = ("Per arm, mean over its seeds; spend per run; branches filled / fresh: points the fill rule "
             "added / fresh re-samples among them.")
COST_NOTE = ("Cost of a step (mean seconds per step by phase, the trainer's `time/*` metrics, in the study's "
             "runs; idle: `study.py --step-cost`, one run at a time)")


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _head(*names) -> list[str]:
    return [_row(*names), "|" + "---|" * len(names)]


def markdown_table(analysis: dict) -> str:
    """GitHub tables: the contrasts (one row per contrast and budget), the arms (accuracy, gain, spend per
    run) and the cost of a step by phase."""
    lines = [f"Held-out accuracy on {analysis['questions']} questions. {CONTRASTS_NOTE}", "",
             *_head("contrast", "role", "equal", "at x*", "seeds", "A - B", "95% t-interval", "p", "MDD",
                    "crossed", "steps A / B")]
    for c in analysis["contrasts"]:
        name, budget = f"{c['a']} - {c['b']}", BUDGETS[c["budget"]]
        if "missing" in c:
            lines.append(_row(name, c["role"], budget, c["missing"], *[""] * 7))
            continue
        at = _amount(c["x"]) + (f" ({c['time_source']})" if c["time_source"] else "")
        lines.append(_row(name, c["role"], budget, at, len(c["seeds"]), f"**{_pts(c['mean'])}**",
                          _interval(c["lo"], c["hi"]), _p(c["p"]), _pts(c["mdd"], sign=False),
                          _interval(c["re_lo"], c["re_hi"]), f"{c['steps_a']:.1f} / {c['steps_b']:.1f}"))
    start = analysis["start"]
    if start:
        interval = _interval(start["lo"], start["hi"], False)
        seeds = analysis["seeds"]
        lines += ["", f"Start model: {_pts(start['mean'], sign=False)}% {interval} (seeds {seeds})."]
    lines += ["", ARMS_NOTE, "",
              *_head("arm", "seeds", "accuracy after all steps", "gain over start", "trajectories",
                     "optimised sequences", "generated tokens", "optimised tokens", "tool calls",
                     "branches (filled / fresh)")]
    for e in analysis["variants"]:
        f, g, s = e["final"], e["gain"], e["spend"]
        gain = f"{_pts(g['mean'])} {_interval(g['lo'], g['hi'])}" if g else "n/a"
        branches = "n/a"
        if s["branches"] is not None and s["branches_filled"] is not None:
            branches = (f"{_amount(s['branches'])} ({_amount(s['branches_filled'])} / "
                        f"{_amount(s['branches_fresh'])})")
        lines.append(_row(e["variant"], len(e["seeds"]), f"{_pts(f['mean'], False)}% "
                          f"{_interval(f['lo'], f['hi'], False)}", gain, _amount(s["trajectories"]),
                          *(_amount(s[k]) for k in ("optimised", "generated_tokens", "optimised_tokens",
                                                    "tool_calls")), branches))
    lines += ["", COST_NOTE, "",
              *_head("arm", "s / step (runs)", "rollout", "pi_old recompute", "branch", "update",
                     "s / step (idle)")]
    for e in analysis["variants"]:
        ph = e["phases"]
        idle = f"{e['idle']['s_per_step']:.1f}" if e["idle"] else "not measured"
        lines.append(_row(e["variant"], *(f"{ph[k]:.1f}" for k in ("step", *PHASES)), idle))
    return "\n".join(lines) + "\n"


_EQUAL = {**BUDGETS, "time": "seconds of training"}


def _p_is(p: float) -> str:
    text = _p(p)
    return text if text.startswith("<") else f"= {text}"


def _verdict(c: dict) -> str:
    """One primary contrast read by the rule docs/study.md fixed before the runs."""
    head = f"`{c['a']} - {c['b']}` at equal {_EQUAL[c['budget']]} ({QUESTIONS[c['a'], c['b']]}): "
    if "missing" in c:
        return head + f"not taken ({c['missing']})."
    figures = (f"{_pts(c['mean'])} points, 95% t-interval {_interval(c['lo'], c['hi'])}, p {_p_is(c['p'])}, "
               f"MDD {_pts(c['mdd'], sign=False)} points, {len(c['seeds'])} seeds")
    if not math.isfinite(c["p"]):
        return head + f"{figures}: too few seeds for an interval; nothing can be read."
    if c["p"] < 0.05:
        side = "ahead of" if c["mean"] > 0 else "behind"
        strict = "also" if c["p"] < 0.025 else "not"
        said = (f"{figures}. `{c['a']}` is {side} `{c['b']}` at the pre-registered 5% level ({strict} at the "
                "Bonferroni 2.5% for the two primary tests).")
    else:
        widest = max(abs(c["lo"]), abs(c["hi"]))
        said = (f"{figures}. No difference was detected. That is not evidence of no difference: the interval "
                f"still holds true differences of up to {_pts(widest, sign=False)} points, and the test had 80% "
                f"power only for differences of about {_pts(c['mdd'], sign=False)} points or more.")
    if math.isfinite(c["re_lo"]) and math.isfinite(c["re_hi"]):
        agree = (c["re_lo"] > 0 or c["re_hi"] < 0) == (c["p"] < 0.05)
        said += (f" The crossed seeds x questions interval {_interval(c['re_lo'], c['re_hi'])} "
                 f"{'agrees' if agree else 'disagrees: read the contrast as uncertain'}.")
    return head + said


def reading(analysis: dict) -> str:
    """What the analysis says, by the rule docs/study.md fixed before the runs: each primary contrast at its
    primary budget (significant at 5%, and whether also at the Bonferroni 2.5%; otherwise how large a
    difference the interval and the MDD leave open), how many of the other contrasts have p < 0.05 (read
    as exploratory: no correction), and which arms' gains over the start model exclude 0. Markdown."""
    primary = [c for c in analysis["contrasts"] if c["role"] == "primary"]
    lines = [f"- {_verdict(c)}" for c in primary] or ["- These records hold no primary contrast."]
    others = [c for c in analysis["contrasts"] if c["role"] != "primary" and "missing" not in c
              and math.isfinite(c["p"])]
    below = [f"`{c['a']} - {c['b']}` at equal {_EQUAL[c['budget']]} ({_pts(c['mean'])})" for c in others
             if c["p"] < 0.05]
    named = f": {'; '.join(below)}." if below else "."
    lines.append(f"- Supporting and secondary contrasts (exploratory, no correction for their number): "
                 f"{len(below)} of {len(others)} with p < 0.05, where {0.05 * len(others):.1f} would be "
                 f"expected by chance if no arm differed from another{named}")
    gains = [(e["variant"], e["gain"]) for e in analysis["variants"] if e["gain"]]
    excluded = [v for v, g in gains if math.isfinite(g["lo"]) and (g["lo"] > 0 or g["hi"] < 0)]
    if gains:
        verdict = ("every arm's gain over the start model excludes 0" if len(excluded) == len(gains) else
                   f"the gain over the start model excludes 0 for {', '.join(excluded) or 'no arm'} and not "
                   f"for {', '.join(v for v, _ in gains if v not in excluded)}")
        lines.append(f"- Training on the recipe: {verdict} (t-intervals over seeds in the arms table).")
    return "\n".join(lines) + "\n"


def plot(analysis: dict, out_png: str | Path) -> Path:
    """Left: held-out accuracy against trajectories sampled; middle: against seconds of training (idle step
    cost where measured); right: every contrast at each budget with its 95% t-interval. Points are means over
    seeds with their t-intervals. Returns ``out_png``."""
    import matplotlib

    from appo.metrics import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_traj, by_time, forest) = plt.subplots(1, 3, figsize=(17, 4.8))
    start = analysis["start"]
    for e in analysis["variants"]:
        points = ([{"accuracy": start, "trajectories": 0.0, "time": 0.0}] if start else []) + e["curve"]
        mean = np.array([p["accuracy"]["mean"] for p in points])
        err = np.nan_to_num(np.array([[p["accuracy"]["mean"] - p["accuracy"]["lo"] for p in points],
                                      [p["accuracy"]["hi"] - p["accuracy"]["mean"] for p in points]]))
        for axis, key in ((by_traj, "trajectories"), (by_time, "time")):
            xs = [p[key] for p in points]
            if None not in xs:
                axis.errorbar(xs, mean, yerr=err, marker="o", capsize=3, label=e["variant"])
    by_traj.set_xlabel("trajectories sampled per run")
    by_time.set_xlabel("seconds of training (idle step cost where measured)")
    for axis in (by_traj, by_time):
        axis.set_ylabel("held-out accuracy")
        axis.legend(fontsize=8)
    figure.suptitle(f"{analysis['questions']} held-out questions; accuracy: mean over seeds (95% t-interval)")
    rows = [c for c in analysis["contrasts"] if "missing" not in c]
    labels = [f"{c['a']} - {c['b']}, equal {BUDGETS[c['budget']]}" for c in rows]
    means = np.array([100 * c["mean"] for c in rows])
    err = np.nan_to_num(np.array([[100 * (c["mean"] - c["lo"]) for c in rows],
                                  [100 * (c["hi"] - c["mean"]) for c in rows]]))
    colours = ["tab:red" if c["role"] == "primary" else "tab:blue" for c in rows]
    for y, (m, lo, hi, colour) in enumerate(zip(means, err[0], err[1], colours)):
        forest.errorbar([m], [y], xerr=[[lo], [hi]], fmt="o", capsize=3, color=colour)
    forest.axvline(0.0, color="k", linewidth=1)
    forest.set_yticks(range(len(rows)), labels, fontsize=7)
    forest.invert_yaxis()
    forest.set_xlabel("A - B, points (95% t-interval; red: primary)")
    figure.tight_layout()
    return save_figure(figure, out_png)


def _plain(value):
    """``value`` with every NaN as None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_report(source: str | Path, out: str | Path | None = None) -> dict:
    """Analyse the records of ``source`` and write report.md, report.png and analysis.json into ``out``
    (default: the records folder itself; for a single study json, .benchmarks/appo/<its name>-reanalysis-*).
    Returns their paths, the table and the analysis."""
    source = Path(source)
    analysis = analyse(load(source))
    if out is None:
        out = source if source.is_dir() else REPO / ".benchmarks" / "appo"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = "report" if source.is_dir() else f"{source.stem}-reanalysis"
    names = ("analysis.json", f"{prefix}.md", f"{prefix}.png") if source.is_dir() else \
        (f"{prefix}.json", f"{prefix}.md", f"{prefix}.png")
    json_path, md_path, png_path = (out / n for n in names)
    json_path.write_text(json.dumps(_plain(analysis), indent=1) + "\n")
    table = markdown_table(analysis)
    md_path.write_text(f"{reading(analysis)}\n{table}" if source.is_dir() else table)
    plot(analysis, png_path)
    return {"json": json_path, "md": md_path, "png": png_path, "table": table, "analysis": analysis}


# ---------------------------------------------------------------------------------------------- README block
README = REPO / "README.md"
BLOCK_BEGIN = ("<!-- study-report:begin (written by `python bench/study_report.py --readme` from "
               "bench/results/study/; do not edit by hand) -->")
BLOCK_END = "<!-- study-report:end -->"


def _seed_ranges(seeds: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans: list[list[int]] = []
    for s in sorted(seeds):
        if spans and s == spans[-1][1] + 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans) or "none"


def progress(records: list[dict], arms: tuple[str, ...] = tuple(ARMS), seeds: tuple[int, ...] = tuple(SEEDS),
             cost_seeds: tuple[int, ...] = tuple(COST_SEEDS), folder: str = "bench/results/study") -> dict:
    """What of the pre-registered study the ``records`` hold: {"complete": every arm has a run for every seed
    and every seed its start evaluation, "counts": one sentence saying how many runs, start evaluations and
    idle step-cost runs exist, which seeds, and the commit they were made from}."""
    runs = {(r["variant"], r["seed"]) for r in records if r["kind"] == "run"}
    starts = {r["seed"] for r in records if r["kind"] == "start"} & set(seeds)
    costs = {(r["variant"], r["seed"]) for r in records if r["kind"] == "step_cost"}
    commits = sorted({r["commit"][:7] for r in records if r.get("commit")})
    per_arm = {a: sorted(s for v, s in runs if v == a and s in seeds) for a in arms}
    if len({tuple(v) for v in per_arm.values()}) == 1:
        done = f"seeds {_seed_ranges(per_arm[arms[0]])} of every arm"
    else:
        done = "; ".join(f"{a}: seeds {_seed_ranges(per_arm[a])}" for a in arms)
    n_costs = len(costs & {(a, s) for a in arms for s in cost_seeds})
    made = f", made from commit {', '.join(commits)}" if commits else ""
    counts = (f"{sum(map(len, per_arm.values()))} of the {len(arms) * len(seeds)} runs ({done}), {len(starts)} "
              f"of the {len(seeds)} start evaluations and {n_costs} of the {len(arms) * len(cost_seeds)} idle "
              f"step-cost runs are in `{folder}/`, one record per run{made}")
    complete = all(per_arm[a] == sorted(seeds) for a in arms) and starts == set(seeds)
    return {"complete": complete, "counts": counts}


def readme_block(records: list[dict], folder: str = "bench/results/study", **study) -> str:
    """The README's study block from the study's ``records`` (``study``: arms, seeds, cost_seeds of
    ``progress``, the pre-registered ones by default). Until the study is complete, only a status line: no
    contrast is computed, so no result is read early (docs/study.md); then the status, the tables of
    ``markdown_table`` and the plot that ``write_report`` puts in ``folder``."""
    state = progress(records, folder=folder, **study)

    def paragraph(text: str) -> str:
        return textwrap.fill(text, width=110, break_long_words=False, break_on_hyphens=False) + "\n"

    if not state["complete"]:
        seeds = len(study.get("seeds", SEEDS))
        return paragraph(f"**Status: designed and pre-registered in [docs/study.md](docs/study.md); the runs are "
                         f"under way: {state['counts']}. This section reports no result for the question until "
                         f"every arm has its {seeds} seeds.**")
    arms = set(study.get("arms", ARMS))
    analysis = analyse([r for r in records if r["kind"] != "run" or r["variant"] in arms])
    status = paragraph(f"**Status: complete ({state['counts']}).** The reading, the tables and the plot below "
                       "are written from those records by `python bench/study_report.py --readme`; the reading "
                       "follows the rule docs/study.md fixed before the runs.")
    return (f"{status}\n**What the data say** (primary contrasts at their primary budgets):\n\n"
            f"{reading(analysis)}\n{markdown_table(analysis)}\n![the study]({folder}/report.png)\n")


def _readme_parts(readme: Path) -> tuple[str, str, str]:
    """(before the study block, the block, after it) of ``readme``; a ValueError naming the file when its
    markers are missing, repeated or out of order."""
    text = readme.read_text()
    if text.count(BLOCK_BEGIN) != 1 or text.count(BLOCK_END) != 1 or text.index(BLOCK_BEGIN) > text.index(
            BLOCK_END):
        raise ValueError(f"readme: {readme} needs one '{BLOCK_BEGIN}' line and, after it, one '{BLOCK_END}'")
    head, rest = text.split(BLOCK_BEGIN + "\n")
    block, tail = rest.split(BLOCK_END)
    return head, block, tail


def write_readme_block(block: str, readme: str | Path = README) -> Path:
    """Replace what lies between the README's study-report markers with ``block``."""
    readme = Path(readme)
    head, _, tail = _readme_parts(readme)
    readme.write_text(f"{head}{BLOCK_BEGIN}\n{block}{BLOCK_END}{tail}")
    return readme


def readme_block_now(readme: str | Path = README) -> str:
    """What the README's study block holds now (between the markers)."""
    return _readme_parts(Path(readme))[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", default=str(REPO / "bench" / "results" / "study"),
                        help="a folder of study records (default bench/results/study) or an older study json")
    parser.add_argument("--out", default=None, help="where report.md / .png / analysis.json go")
    parser.add_argument("--readme", action="store_true",
                        help="rewrite the README's study block from the study's records (bench/results/study; "
                             "only a status line until every arm has every seed)")
    args = parser.parse_args(argv)
    if args.readme:
        records_dir = REPO / "bench" / "results" / "study"
        if Path(args.source).resolve() != records_dir.resolve() or args.out is not None:
            parser.error("--readme: reads the study's own records (bench/results/study); give no source or --out")
        records = load(records_dir) if records_dir.is_dir() else []
        block = readme_block(records)
        try:
            if progress(records)["complete"]:
                write_report(records_dir)
            write_readme_block(block)
        except ValueError as err:
            parser.error(str(err))
        print(block)
        print(f"wrote the study block of {README}", file=sys.stderr)
        return {"block": block}
    try:
        paths = write_report(args.source, args.out)
    except ValueError as err:  # no records yet, or records that do not belong together
        parser.error(str(err))
    print(paths["table"])
    print(f"wrote {paths['md']}, {paths['png']}, {paths['json']}", file=sys.stderr)
    return paths


if __name__ == "__main__":
    main()
