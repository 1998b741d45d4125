"""bench/study.py and bench/study_report.py: the report on synthetic records with known answers and on the
committed 3-seed study, the pre-registered arms and held-out set, what a run spent, then the whole pipeline
(train in segments -> evaluate -> one record per run -> report; reuse; resume; workers) on a tiny model, and
`--quick` on SmolLM2 (slow, run by CI's `pytest -m slow`)."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
OLD_STUDY = REPO / "bench" / "results" / "study-20261130T200658Z.json"
Q = 40
HELD = {"task": "arithmetic", "task_seed": 24, "size": Q, "sha256": "synthetic"}
# The study's held-out set, fixed before the runs (docs/study.md): sha256 of the .jsonl study.py writes.
HELDOUT_SHA256 = "e73beeb65d5e704a02d56e375ec3aff3ec3f52a7d5940eff19d9a08ceb8c2332"


@pytest.fixture(scope="module")
def study():
    # bench/ is on the import path through pyproject's pytest pythonpath
    return importlib.import_module("study")


@pytest.fixture(scope="module")
def report():
    # bench/ is on the import path through pyproject's pytest pythonpath
    return importlib.import_module("study_report")


# ---------------------------------------------------------------------------------------------- the report
def first(n: int) -> list[float]:
    """Per-question correctness: the first ``n`` of the Q questions right."""
    return [1.0] * n + [0.0] * (Q - n)


def run(variant: str, seed: int, right: tuple[int, int], per_step: dict, algo: str = "appo") -> dict:
    """A finished run shaped like study.run_one's record: 4 steps, evaluated at steps 2 and 4 with ``right``
    questions right; ``per_step``: what each step spent (trajectories, optimised, generated_tokens,
    train_s)."""
    evals = [{"step": step, "correct": first(n), **{k: v * step for k, v in per_step.items()}}
             for step, n in zip((2, 4), right)]
    s = per_step["train_s"]
    branch, update = (s / 4, s / 4) if algo == "appo" else (0.0, s / 2)
    history = [{"step": k + 1, "time/step": s, "time/rollout": s / 4, "time/old_logprobs": s / 4,
                "time/branch": branch, "time/update": update} for k in range(4)]
    return {"kind": "run", "variant": variant, "algo": algo, "seed": seed, "steps": 4, "prompts_per_step": 2,
            "heldout": HELD, "evals": evals, "history": history}


def cost(variant: str, seconds: float, seed: int = 0) -> dict:
    return {"kind": "step_cost", "variant": variant, "seed": seed,
            "history": [{"step": k + 1, "time/step": seconds} for k in range(4)]}


def records() -> list[dict]:
    """Seeds 0 and 1 alike; start: 2 of 40 right.
    appo:         8 trajectories, 4 optimised, 100 tokens, 25 s per step; 12 then 28 right at steps 2 / 4;
    grpo-m4:      4 trajectories, 4 optimised,  50 tokens, 20 s per step; 10 then 20 right;
    appo-uniform: as appo in cost; 10 then 24 right."""
    appo = {"trajectories": 8, "optimised": 4, "generated_tokens": 100, "train_s": 25.0}
    m4 = {"trajectories": 4, "optimised": 4, "generated_tokens": 50, "train_s": 20.0}
    rows = [{"kind": "start", "seed": s, "heldout": HELD, "correct": first(2)} for s in (0, 1)]
    for s in (0, 1):
        rows += [run("appo", s, (12, 28), appo), run("grpo-m4", s, (10, 20), m4, algo="grpo"),
                 run("appo-uniform", s, (10, 24), appo)]
    return rows


def find(analysis: dict, a: str, b: str, budget: str) -> dict:
    return next(c for c in analysis["contrasts"] if (c["a"], c["b"], c["budget"]) == (a, b, budget))


def test_contrasts_at_each_equal_budget_have_the_known_values(report):
    analysis = report.analyse(records())
    # equal trajectories: grpo-m4 reached 16, appo had 16 at step 2 (12 right) against grpo-m4's 20
    traj = find(analysis, "appo", "grpo-m4", "trajectories")
    assert (traj["x"], traj["mean"], traj["steps_a"], traj["steps_b"]) == pytest.approx((16, -0.2, 2, 4))
    assert traj["role"] == "supporting" and traj["seeds"] == [0, 1]
    assert find(analysis, "appo", "grpo-m4", "optimised")["role"] == "primary"
    assert find(analysis, "appo", "appo-uniform", "trajectories")["role"] == "primary"
    # equal optimised sequences: both 16 at step 4
    assert find(analysis, "appo", "grpo-m4", "optimised")["mean"] == pytest.approx(0.7 - 0.5)
    assert find(analysis, "appo", "grpo-m4", "generated_tokens")["mean"] == pytest.approx(0.3 - 0.5)
    # equal time from the runs' own seconds: x* = 80 s, appo 60% of the way from step 2 (50 s) to 4 (100 s)
    time = find(analysis, "appo", "grpo-m4", "time")
    assert time["x"] == 80 and time["mean"] == pytest.approx((12 + 0.6 * 16) / Q - 0.5)
    assert time["time_source"].startswith("the runs' own")
    assert find(analysis, "appo", "appo-uniform", "trajectories")["mean"] == pytest.approx(0.7 - 0.6)
    # seeds alike: a zero-width interval, p = 0; the crossed interval sees the questions vary
    assert (traj["lo"], traj["hi"], traj["p"], traj["mdd"]) == pytest.approx((-0.2, -0.2, 0.0, 0.0))
    entries = {e["variant"]: e for e in analysis["variants"]}
    assert list(entries) == ["appo", "grpo-m4", "appo-uniform"]
    appo = entries["appo"]
    assert appo["final"]["mean"] == pytest.approx(0.7) and appo["gain"]["mean"] == pytest.approx(0.65)
    assert appo["spend"]["generated_tokens"] == 400 and appo["spend"]["optimised"] == 16
    assert [(p["step"], p["trajectories"], p["time"]) for p in appo["curve"]] == [(2, 16, 50), (4, 32, 100)]
    assert appo["phases"]["step"] == 25 and entries["grpo-m4"]["phases"]["update"] == 10


def test_equal_time_uses_the_idle_step_cost_when_both_arms_have_one(report):
    """Measured alone, appo costs 10 s a step and grpo-m4 20 s: by 40 s appo has trained 4 steps, grpo-m4
    2."""
    rows = [*records(), cost("appo", 10.0), cost("appo", 10.0, seed=1), cost("grpo-m4", 20.0)]
    analysis = report.analyse(rows)
    time = find(analysis, "appo", "grpo-m4", "time")
    assert time["time_source"] == "idle step cost" and time["x"] == 40
    assert (time["mean"], time["steps_a"], time["steps_b"]) == pytest.approx((0.7 - 10 / Q, 4, 2))
    assert find(analysis, "appo", "appo-uniform", "time")["time_source"].startswith("the runs' own")
    assert {e["variant"]: e["idle"] for e in analysis["variants"]}["appo"] == {"s_per_step": 10.0}


def test_the_report_aggregates_whatever_records_exist(report):
    rows = [r for r in records() if (r.get("variant"), r["seed"]) != ("appo-uniform", 1)]
    analysis = report.analyse(rows)
    partial = find(analysis, "appo", "appo-uniform", "trajectories")
    assert partial["seeds"] == [0] and np.isnan(partial["lo"])  # one seed: a mean, no interval
    assert find(analysis, "appo", "grpo-m4", "trajectories")["seeds"] == [0, 1]
    missing = [c for c in report.analyse([r for r in rows if r["kind"] != "start"])["contrasts"]]
    assert all(c["missing"].startswith("no seed with a start") for c in missing)


@pytest.mark.parametrize("change, words", [
    (lambda rows: rows[3].update(heldout={**HELD, "sha256": "other"}), "same held-out questions"),
    (lambda rows: rows[3].update(steps=6), "different schedules"),
    (lambda rows: rows[0].update(correct=first(2)[:-1]), "different sizes"),
    (lambda rows: [rows.pop() for _ in range(6)], "no finished run"),
])
def test_records_that_do_not_belong_together_are_refused(report, change, words):
    rows = records()
    change(rows)
    with pytest.raises(ValueError, match=words):
        report.analyse(rows)


def test_the_committed_3_seed_study_re_analysed(report, tmp_path):
    """The issue's audit, recomputed from the committed json: at equal wall time APPO - GRPO is +16.2
    [-11.4, +43.9], p = 0.13 (the shipped bootstrap said [+6.5, +29.0]); at equal trajectories +0.0 +/- 25."""
    paths = report.write_report(OLD_STUDY, tmp_path)
    analysis = paths["analysis"]
    time = find(analysis, "appo", "grpo", "time")
    assert (time["mean"], time["lo"], time["hi"], time["p"]) == pytest.approx((0.162, -0.114, 0.439, 0.127),
                                                                              abs=1e-3)
    traj = find(analysis, "appo", "grpo", "trajectories")
    assert traj["mean"] == pytest.approx(0.0) and traj["hi"] == pytest.approx(0.252, abs=1e-3)
    assert find(analysis, "arpo", "grpo", "trajectories")["role"] == "extra"
    assert "| appo - grpo | secondary | s of training | 255 (the runs' own" in paths["table"]
    assert "**+16.2** | [-11.4, +43.9] | 0.13 |" in paths["table"]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def refuse(text):
        raise AssertionError(f"not strict JSON: {text}")

    json.loads(paths["json"].read_text(), parse_constant=refuse)  # NaN written as null


def test_readme_block_reads_no_result_until_every_arm_has_every_seed(report):
    arms, seeds = ("appo", "grpo-m4", "appo-uniform"), (0, 1)
    partial = [r for r in records() if (r.get("variant"), r["seed"]) != ("appo-uniform", 1)]
    block = " ".join(report.readme_block(partial, arms=arms, seeds=seeds, cost_seeds=(0,)).split())
    assert ("5 of the 6 runs (appo: seeds 0-1; grpo-m4: seeds 0-1; appo-uniform: seeds 0), 2 of the 2 start "
            "evaluations and 0 of the 3 idle step-cost runs") in block
    assert "no result for the question until every arm has its 2 seeds" in block and "A - B" not in block
    no_start = [r for r in records() if (r["kind"], r["seed"]) != ("start", 1)]
    assert "Status: complete" not in report.readme_block(no_start, arms=arms, seeds=seeds, cost_seeds=(0,))
    full = report.readme_block([*records(), cost("appo", 10.0)], arms=arms, seeds=seeds, cost_seeds=(0,))
    assert "6 of the 6 runs (seeds 0-1 of every arm)" in " ".join(full.split())
    assert "Status: complete" in full and "1 of the 3 idle step-cost runs" in " ".join(full.split())
    assert "| appo - grpo-m4 | primary | optimised sequences | 16 | 2 | **+20.0** |" in full
    assert "**What the data say**" in full and "`appo` is ahead of `grpo-m4`" in " ".join(full.split())
    assert full.rstrip().endswith("![the study](bench/results/study/report.png)")


def test_the_reading_follows_the_pre_registered_rule(report):
    """Seeds alike: both primaries read as significant (appo ahead by 20 and 10 points). Seeds that disagree
    (appo ahead of appo-uniform on seed 0, behind on seed 1): no difference detected, with how large a
    difference the interval and the MDD leave open; a contrast with one seed reads nothing."""
    text = " ".join(report.reading(report.analyse(records())).split())
    assert ("`appo - grpo-m4` at equal optimised sequences (does branching beat plain sampling when both "
            "optimise the same sequences?): +20.0 points, 95% t-interval [+20.0, +20.0], p < 0.001") in text
    assert text.count("`appo` is ahead of") == 2 and "also at the Bonferroni 2.5%" in text
    assert "6 of 6 with p < 0.05, where 0.3 would be expected by chance" in text
    assert "every arm's gain over the start model excludes 0" in text
    appo = {"trajectories": 8, "optimised": 4, "generated_tokens": 100, "train_s": 25.0}
    mixed = [r for r in records() if r.get("variant") != "appo-uniform"]
    mixed += [run("appo-uniform", 0, (10, 24), appo), run("appo-uniform", 1, (10, 32), appo)]
    analysis = report.analyse(mixed)
    uniform = find(analysis, "appo", "appo-uniform", "trajectories")
    assert uniform["mean"] == pytest.approx(0.0) and uniform["p"] > 0.05
    text = " ".join(report.reading(analysis).split())
    verdict = text.split("`appo - appo-uniform` at equal trajectories")[1].split("- Supporting")[0]
    assert "No difference was detected. That is not evidence of no difference" in verdict
    assert f"up to {100 * max(-uniform['lo'], uniform['hi']):.1f} points" in verdict
    assert f"about {100 * uniform['mdd']:.1f} points or more" in verdict and "ahead" not in verdict
    one_seed = [r for r in records() if r["seed"] == 0]
    assert "too few seeds for an interval; nothing can be read" in report.reading(report.analyse(one_seed))


def test_the_readme_block_replaces_only_what_lies_between_its_markers(report, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\n\nbefore\n{report.BLOCK_BEGIN}\nold\n{report.BLOCK_END}\nafter\n")
    report.write_readme_block("new\n", readme)
    assert readme.read_text() == f"# t\n\nbefore\n{report.BLOCK_BEGIN}\nnew\n{report.BLOCK_END}\nafter\n"
    assert report.readme_block_now(readme) == "new\n"
    readme.write_text(f"{report.BLOCK_END}\n{report.BLOCK_BEGIN}\n")
    with pytest.raises(ValueError, match="readme: .*README.md needs one"):
        report.write_readme_block("new\n", readme)


def test_readme_study_block_is_what_the_committed_records_say(report):
    """The README's study figures and counts come from bench/results/study/ by one command, never by hand."""
    committed = report.load(REPO / "bench" / "results" / "study")
    assert report.readme_block_now() == report.readme_block(committed), \
        "README's study block is stale: run python bench/study_report.py --readme"


def test_readme_option_takes_no_source(report, capsys):
    with pytest.raises(SystemExit):
        report.main([str(OLD_STUDY), "--readme"])
    assert "--readme: reads the study's own records" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the driver
def test_arms_differ_only_in_their_algorithm_keys(study):
    args = study.parse_args([])
    assert args.seeds == list(range(12)) and args.evals == 2
    assert args.records_dir.endswith("bench/results/study")
    configs = {v: study.run_config(v, 1, args) for v in study.ARMS}
    flat = {v: study.comparable(c) for v, c in configs.items()}
    for variant, keys in flat.items():
        differing = {k for k in set(keys) | set(flat["appo"]) if keys.get(k) != flat["appo"].get(k)}
        assert differing <= {"algo.name", "algo.rollouts_per_prompt", "algo.appo.entropy_only",
                             "algo.appo.uniform_points"}, variant
        assert configs[variant].seed == 1 and configs[variant].steps == 6
    appo, grpo, m4 = (configs[v].algo for v in ("appo", "grpo", "grpo-m4"))
    assert (appo.rollouts_per_prompt, appo.initial_rollouts, appo.appo.branches_per_rollout) == (8, 4, 1)
    assert grpo.rollouts_per_prompt == 8 and m4.rollouts_per_prompt == appo.initial_rollouts
    assert configs["appo-entropy"].algo.appo.entropy_only and configs["appo-uniform"].algo.appo.uniform_points
    assert configs["appo"].checkpoint_every == configs["appo"].steps and configs["appo"].threads == 0
    quick = study.parse_args(["--quick", "--jobs", "2"])
    assert (quick.seeds, quick.evals) == ([0], 1) and quick.records_dir.endswith("study-quick/records")
    assert study.parse_args(["--step-cost"]).seeds == [0, 1]
    m4 = study.run_config("grpo-m4", 0, quick)
    assert (m4.steps, m4.algo.rollouts_per_prompt, m4.threads) == (1, 2, 1)  # quick: N = 2; 2 jobs: 1 thread each
    assert [t for t in study.plan(study.parse_args(["--seeds", "3", "--variants", "grpo", "appo"]))] == [
        3, ("grpo", 3), ("appo", 3)]


def test_heldout_set_is_fixed_fresh_and_disjoint_from_training_and_tuning(study, tmp_path):
    from appo.tasks import get_task

    config = study.run_config("appo", 0, study.parse_args([]))
    heldout = study.heldout_examples(config)
    recipe = get_task("arithmetic", **config.data.task_options)
    training = {e.question for e in recipe.examples("train")[:config.data.train_size]}
    tuned = {e.question for e in recipe.examples("dev")}  # 128 tuned on, all 256 evaluated by the old study
    questions = [e.question for e in heldout]
    assert len(questions) == len(set(questions)) == 256 and len(training) == 1000 and len(tuned) == 256
    assert not set(questions) & training and not set(questions) & tuned
    assert [e.id for e in heldout[:2]] == ["heldout-0", "heldout-1"]
    named = study.write_heldout(config, tmp_path / "heldout.jsonl")
    assert named == {"task": "arithmetic", "task_seed": 24, "size": 256, "sha256": HELDOUT_SHA256}
    rows = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == questions and rows[0]["answer"] == heldout[0].answer
    quick = study.heldout_examples(study.run_config("appo", 0, study.parse_args(["--quick"])))
    assert [e.question for e in quick] == questions[:4]


def test_step_spend_counts_what_each_algorithm_spent(study):
    args = study.parse_args([])
    appo, grpo = study.run_config("appo", 0, args), study.run_config("grpo", 0, args)
    # APPO: 8 initial rollouts (N = 4 x 2 prompts) + 8 branches, 3 of them filled, 1 fresh (trainer's counts)
    row = {"step": 1, "rollouts": 16, "rollouts_per_prompt": 8.0, "response_length": 30.0, "tool_calls": 0.75,
           "branches": 8, "branches_filled": 1.5, "branches_fresh": 0.5, "time/step": 40.0,
           "tokens/generated": 420, "tokens/optimised": 240, "tool_calls/run": 12, "branches/filled": 3,
           "branches/fresh": 1}
    spend = study.step_spend(row, appo)
    assert spend == {"trajectories": 16.0, "optimised": 8, "generated_tokens": 420, "optimised_tokens": 240,
                     "tool_calls": 12, "branches_filled": 3, "branches_fresh": 1, "branches": 8,
                     "train_s": 40.0}
    # an older record without the counts: what is exact there (filled / fresh: per micro-batch, 2 of them)
    older = {k: v for k, v in row.items() if "/" not in k or k == "time/step"}
    assert study.step_spend(older, appo) == {**spend, "generated_tokens": None, "tool_calls": 12.0}
    g = study.step_spend({"step": 1, "rollouts": 16, "rollouts_per_prompt": 8.0, "response_length": 30.0,
                          "tool_calls": 1.0, "time/step": 80.0}, grpo)
    assert (g["optimised"], g["optimised_tokens"], g["generated_tokens"], g["branches"]) == (16, 480, 480, 0)
    total = study.cumulative([older, {**older, "step": 2}], appo, 2)
    assert (total["trajectories"], total["optimised_tokens"], total["generated_tokens"]) == (32, 480, None)
    with pytest.raises(ValueError, match="history"):
        study.cumulative([row], appo, 2)


def test_a_failed_run_is_reported_and_the_others_go_on(study, tmp_path, monkeypatch):
    done = []

    def do(task, args):
        done.append(task)
        if task == ("grpo", 0):
            raise RuntimeError("out of memory")

    monkeypatch.setattr(study, "do", do)
    monkeypatch.setattr(study, "write_heldout", lambda config, path: None)
    with pytest.raises(SystemExit, match="1 task\\(s\\) failed .*grpo.*out of memory"):
        study.main(["--seeds", "0", "1", "--variants", "grpo", "appo", "--runs-dir", str(tmp_path / "runs"),
                    "--records-dir", str(tmp_path / "records")])
    assert done == [0, ("grpo", 0), ("appo", 0), 1, ("grpo", 1), ("appo", 1)]


@pytest.mark.parametrize("argv, words", [
    (["--evals", "0"], "--evals"), (["--jobs", "0"], "--jobs"), (["--seeds", "1", "1"], "--seeds"),
    (["--variants", "appo", "appo"], "--variants"), (["--variants", "ppo"], "--variants"),
    (["--config", "nope.yaml"], "--config"),
])
def test_bad_arguments_are_refused_naming_the_option(study, argv, words, capsys):
    with pytest.raises(SystemExit):
        study.parse_args(argv)
    assert words in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def sandbox():
    """The study's task uses the python tool, which runs model code only inside its sandbox: without one,
    training refuses to start, and so do these tests, saying why (as tests/test_quickstart.py does)."""
    from appo.tools.python_sandbox import PythonTool, SandboxUnavailable

    try:
        PythonTool()
    except SandboxUnavailable as err:
        pytest.skip(f"the python tool has no sandbox on this machine: {err}")


@pytest.fixture(scope="module")
def model_dir(sandbox, tiny_model_dir):
    """tests/conftest.py's tiny llama, on a machine whose python tool has a sandbox."""
    return tiny_model_dir


def tiny(model_dir) -> list[str]:
    """--quick on the tiny model, with 2 steps (so that runs can be trained and evaluated in 2 segments)."""
    return ["--override", f"model.name_or_path={model_dir}", "device=cpu", "threads=1", "steps=2",
            "rollout.max_prompt_tokens=1500", "rollout.max_total_tokens=1540",
            "rollout.max_new_tokens_per_turn=8"]


def test_quick_pipeline_writes_one_record_per_run_then_reuses_them(study, model_dir, tmp_path, monkeypatch):
    import appo.trainer

    records = tmp_path / "records"
    argv = ["--quick", "--evals", "2", "--runs-dir", str(tmp_path / "runs"), "--records-dir", str(records),
            *tiny(model_dir)]
    paths = study.main(argv)
    assert sorted(p.name for p in records.glob("*.json")) == sorted(
        ["start-s0.json", "analysis.json", *(f"run-{v}-s0.json" for v in study.ARMS)])
    runs = {v: json.loads((records / f"run-{v}-s0.json").read_text()) for v in study.ARMS}
    for r in runs.values():
        assert [e["step"] for e in r["evals"]] == [1, 2] and len(r["evals"][0]["correct"]) == 4
        m = r["rollouts_per_prompt"]
        assert [e["trajectories"] for e in r["evals"]] == [2 * m, 4 * m]  # exactly M per prompt
        assert 0 < r["evals"][0]["train_s"] < r["evals"][1]["train_s"] and len(r["history"]) == 2
        assert r["evals"][-1]["optimised_tokens"] > 0 and r["heldout"]["size"] == 4
        assert r["commit"] and r["machine"]["cpu"]
        assert not (tmp_path / "runs" / f"{r['variant']}-s0" / "checkpoints").exists()
    # equal optimised sequences by design: APPO's N = 2 initial rollouts per prompt, GRPO with M = 2
    optimised = {v: [e["optimised"] for e in runs[v]["evals"]] for v in ("appo", "grpo-m4")}
    assert optimised["appo"] == optimised["grpo-m4"]
    assert runs["appo"]["evals"][-1]["branches"] == 2 * 2 * 2  # B * N per prompt, 2 prompts, 2 steps
    assert runs["grpo"]["evals"][-1]["generated_tokens"] == runs["grpo"]["evals"][-1]["optimised_tokens"]
    assert "| appo - grpo-m4 | primary | optimised sequences | 8 | 1 |" in paths["table"]

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    written = paths["json"].read_text()
    monkeypatch.setattr(appo.trainer, "train", refuse)
    monkeypatch.setattr(appo.trainer, "evaluate", refuse)
    assert study.main(argv)["json"].read_text() == written
    changed = "--records-dir: run-appo-s0.json .* other values of \\['optim.lr'\\]"
    with pytest.raises(ValueError, match=changed):
        study.main([*argv, "optim.lr=1e-3"])


def test_an_interrupted_run_resumes_to_the_same_result(study, model_dir, tmp_path, monkeypatch):
    def args(name):
        return study.parse_args(["--quick", "--evals", "2", "--runs-dir", str(tmp_path / name),
                                 "--records-dir", str(tmp_path / name / "records"), *tiny(model_dir)])

    straight = study.run_one("appo", 0, args("a"))
    real = study.evaluate_into
    calls = []

    def fail_at_step_2(config, path, heldout, model_path=None):
        calls.append(path.name)
        if path.name.startswith("step-000002") and calls.count(path.name) == 1:
            raise KeyboardInterrupt  # the machine went down after step 2 was trained
        return real(config, path, heldout, model_path)

    monkeypatch.setattr(study, "evaluate_into", fail_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        study.run_one("appo", 0, args("b"))
    assert not (tmp_path / "b" / "records" / "run-appo-s0.json").exists()
    resumed = study.run_one("appo", 0, args("b"))
    assert calls == ["step-000001.jsonl", "step-000002.jsonl", "step-000002.jsonl"]  # step 1 not redone

    def numbers(result):
        return ([{k: v for k, v in e.items() if k not in ("train_s", "eval_s")} for e in result["evals"]],
                [{k: v for k, v in r.items() if not k.startswith("time/")} for r in result["history"]])

    assert numbers(resumed) == numbers(straight)


@pytest.mark.slow  # two worker processes each import torch and transformers: a minute here
def test_workers_in_their_own_processes(study, model_dir, tmp_path):
    records = tmp_path / "records"
    study.main(["--quick", "--jobs", "2", "--seeds", "3", "--variants", "grpo", "appo",
                "--runs-dir", str(tmp_path / "runs"), "--records-dir", str(records), *tiny(model_dir)])
    runs = [json.loads((records / f"run-{v}-s3.json").read_text()) for v in ("grpo", "appo")]
    assert {(r["variant"], r["seed"], r["threads"], r["jobs"]) for r in runs} == {("grpo", 3, 1, 2),
                                                                                   ("appo", 3, 1, 2)}
    assert (tmp_path / "runs" / "appo-s3.log").is_file() and (records / "start-s3.json").is_file()


def test_step_cost_runs_each_arm_alone_with_its_phases_and_the_load(study, model_dir, tmp_path, monkeypatch):
    """`--step-cost`: one uninterrupted run per arm and seed, no evaluation, its working folder removed; the
    report's equal-time contrast reads these records (tested above on synthetic ones)."""
    monkeypatch.setattr(study, "IDLE_WAIT_S", 0)  # this machine is shared: do not wait for it to be idle
    records = tmp_path / "records"
    costs = study.main(["--quick", "--step-cost", "--variants", "appo", "--runs-dir", str(tmp_path / "runs"),
                        "--records-dir", str(records), *tiny(model_dir)])["costs"]
    (record,) = costs["appo"]
    assert record == json.loads((records / "step-cost-appo-s0.json").read_text())
    assert [h["step"] for h in record["history"]] == [1, 2]
    assert all(h["time/step"] > 0 and {"time/rollout", "time/update", "time/branch"} <= set(h)
               for h in record["history"])
    assert len(record["load_before"]) == 3 and record["cpu_count"] >= 1 and record["threads"] == 1
    assert sorted(p.name for p in records.iterdir()) == ["step-cost-appo-s0.json"]
    assert not any((tmp_path / "runs" / "step-cost").iterdir())


@pytest.mark.slow
def test_quick_study_on_smollm2(study, sandbox, tmp_path):
    """`python bench/study.py --quick` (one seed): SmolLM2, the committed recipe shrunk to one step, the five
    arms, one evaluation each on 4 held-out questions; real answers, so accuracies are not all 0 or 1."""
    paths = study.main(["--quick", "--runs-dir", str(tmp_path / "runs")])
    analysis = paths["analysis"]
    assert analysis["questions"] == 4 and analysis["seeds"] == [0]
    assert [e["variant"] for e in analysis["variants"]] == list(study.ARMS)
    assert all([p["step"] for p in e["curve"]] == [1] for e in analysis["variants"])
    curves = [p["accuracy"]["mean"] for e in analysis["variants"] for p in e["curve"]]
    assert 0 < np.mean([analysis["start"]["mean"], *curves]) < 1
    assert {(c["a"], c["b"]) for c in analysis["contrasts"] if c["role"] == "primary"} == {
        ("appo", "grpo-m4"), ("appo", "appo-uniform")}
