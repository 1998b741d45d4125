"""bench/study.py and bench/study_report.py: the report on synthetic runs with known answers, then the whole
pipeline (train in segments -> evaluate -> report; reuse; resume; workers) on a tiny model, and `--quick` on
SmolLM2 (slow, run by CI's `pytest -m slow`)."""

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
Q = 40
IDS = [f"arithmetic-dev-{i}" for i in range(Q)]


@pytest.fixture(scope="module")
def study():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("study")


@pytest.fixture(scope="module")
def report():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("study_report")


def first(n: int) -> list[float]:
    """Per-question correctness: the first ``n`` of the Q questions right."""
    return [1.0] * n + [0.0] * (Q - n)


def run(variant: str, seed: int, corrects: list[list[float]], times: list[float], algo: str | None = None,
        steps: int = 4, prompts: int = 2, m: int = 4) -> dict:
    """A finished run shaped like study.run_one's result, evaluated at steps 2 and 4."""
    evals = [{"step": step, "ids": IDS, "correct": c, "train_s": t, "trajectories": step * prompts * m}
             for step, c, t in zip((2, 4), corrects, times)]
    per_step = times[-1] / steps   # a quarter in each phase; GRPO has no branch phase (its metric is absent)
    history = [{"step": k + 1, "time/step": per_step, "time/rollout": per_step / 4, "time/old_logprobs": per_step / 4,
                "time/update": per_step / 4 if variant == "grpo" else per_step / 2,
                **({} if variant == "grpo" else {"time/branch": per_step / 4})} for k in range(steps)]
    return {"kind": "run", "variant": variant, "algo": algo or variant, "seed": seed, "steps": steps,
            "prompts_per_step": prompts, "M": m, "train_s": times[-1], "evals": evals, "history": history}


def starts(seeds=(0, 1)) -> list[dict]:
    return [{"kind": "start", "seed": s, "ids": IDS, "correct": first(2)} for s in seeds]


def synthetic() -> list[dict]:
    """Seeds 0 and 1 alike. Start: 2 of 40 right. GRPO: 10 then 20 right at 100 s / 200 s. APPO: 12 then 28 at
    50 s / 100 s (the shortest run: T* = 100 s). ARPO: 8 then 16 at 80 s / 160 s."""
    rows = []
    for seed in (0, 1):
        rows += [run("appo", seed, [first(12), first(28)], [50.0, 100.0]),
                 run("grpo", seed, [first(10), first(20)], [100.0, 200.0]),
                 run("arpo", seed, [first(8), first(16)], [80.0, 160.0])]
    return rows


def test_analysis_has_the_known_means_differences_and_equal_time_points(report):
    analysis = report.analyse(starts(), synthetic(), draws=2000)
    entries = {e["variant"]: e for e in analysis["variants"]}
    assert analysis["t_star"] == 100.0 and analysis["questions"] == Q and analysis["seeds"] == [0, 1]
    assert analysis["start"]["mean"] == pytest.approx(2 / Q)
    appo, grpo, arpo = entries["appo"], entries["grpo"], entries["arpo"]
    # equal trajectories: the last evaluation of each run
    assert (appo["final"]["mean"], grpo["final"]["mean"], arpo["final"]["mean"]) == pytest.approx((0.7, 0.5, 0.4))
    assert appo["final_vs_grpo"]["mean"] == pytest.approx(0.2) and appo["final_vs_grpo"]["lo"] > 0
    assert arpo["final_vs_grpo"]["mean"] == pytest.approx(-0.1) and arpo["final_vs_grpo"]["hi"] < 0
    assert grpo["final_vs_grpo"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    gain = appo["final_gain"]  # 26 of 40 questions gained, alike in both seeds: a binomial-sized interval
    assert gain["mean"] == pytest.approx(0.65)
    assert (gain["hi"] - gain["lo"]) / 2 == pytest.approx(1.96 * np.sqrt(0.65 * 0.35 / Q), rel=0.15)
    # equal wall time, T* = 100 s: APPO at its end, GRPO at its first evaluation, ARPO a quarter of the way
    # from its first (80 s) to its second (160 s) evaluation
    assert appo["at_time"]["mean"] == pytest.approx(0.7) and appo["steps_by_t_star"] == pytest.approx(4.0)
    assert grpo["at_time"]["mean"] == pytest.approx(10 / Q) and grpo["steps_by_t_star"] == pytest.approx(2.0)
    assert arpo["at_time"]["mean"] == pytest.approx((0.75 * 8 + 0.25 * 16) / Q)
    assert arpo["steps_by_t_star"] == pytest.approx(2.5)
    assert appo["at_time_vs_grpo"]["mean"] == pytest.approx(0.7 - 0.25)
    # the curves: one point per evaluation, trajectories and mean training seconds
    assert [(p["step"], p["trajectories"], p["train_s"]) for p in appo["curve"]] == [(2, 16, 50.0), (4, 32, 100.0)]
    assert appo["curve"][0]["accuracy"]["mean"] == pytest.approx(12 / Q)
    assert appo["train_s_per_step"] == pytest.approx(25.0) and appo["trajectories"] == 32


def test_intervals_widen_when_seeds_disagree(report):
    agree = report.analyse(starts(), synthetic(), draws=2000)
    rows = synthetic()
    rows[0]["evals"][-1]["correct"] = first(36)   # APPO seed 0: 36 right, seed 1: 28 (mean 0.8)
    rows[3]["evals"][-1]["correct"] = first(28)
    rows[3]["evals"][-1]["correct"] = first(20)   # seed 1 now 20: mean (36 + 20) / 80 = 0.7 again
    disagree = report.analyse(starts(), rows, draws=2000)
    a = next(e for e in agree["variants"] if e["variant"] == "appo")["final"]
    d = next(e for e in disagree["variants"] if e["variant"] == "appo")["final"]
    assert a["mean"] == pytest.approx(d["mean"]) and d["hi"] - d["lo"] > 1.5 * (a["hi"] - a["lo"])


@pytest.mark.parametrize("change, words", [
    (lambda rows, st: rows.pop(1), "missing runs \\['grpo-s0'\\]"),
    (lambda rows, st: st.pop(), "seeds without a start evaluation \\[1\\]"),
    (lambda rows, st: rows[2]["evals"][0].update(ids=IDS[::-1]), "same held-out questions"),
    (lambda rows, st: rows[2].update(M=8), "unequal budgets"),
    (lambda rows, st: [rows.pop(i) for i in (4, 1)], "compares with grpo"),
])
def test_an_incomplete_or_unequal_study_is_refused(report, change, words):
    rows, st = synthetic(), starts()
    change(rows, st)
    with pytest.raises(ValueError, match=words):
        report.analyse(st, rows, draws=100)


def test_table_plot_and_json_are_written(report, tmp_path, monkeypatch):
    import _record

    monkeypatch.setattr(_record, "RESULTS_DIR", tmp_path / "results")
    paths = report.write_report(starts(), synthetic(), {"argv": ["--x"]}, name="study-test")
    table = paths["md"].read_text()
    assert table == paths["table"] and "T* = 100 s" in table
    assert "| appo | 0.700 [" in table and "| +0.200 [" in table and "(baseline)" in table
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the step-cost table: GRPO 200 s / 4 steps = 50 s per step with no branch phase; APPO 25 s, 0.50x GRPO
    assert "| grpo | 50.0 | 12.5 | 12.5 | 0.0 | 12.5 | 1.00x |" in table
    assert "| appo | 25.0 | 6.2 | 6.2 | 6.2 | 12.5 | 0.50x |" in table
    payload = json.loads(paths["json"].read_text())
    kinds = [r["kind"] for r in payload["rows"]]
    assert kinds == ["start"] * 2 + ["run"] * 6 + ["analysis", "settings"]
    assert payload["rows"][-2]["t_star"] == 100.0 and paths["json"].name.startswith("study-test-")


def test_eval_steps_and_configs_differ_only_in_algorithm_keys(study):
    assert study.eval_steps(12, 4) == [3, 6, 9, 12] and study.eval_steps(2, 2) == [1, 2]
    assert study.eval_steps(3, 5) == [1, 2, 3]
    with pytest.raises(ValueError, match="steps, evals"):
        study.eval_steps(0, 2)
    args = study.parse_args(["--ablations"])
    assert args.seeds == [0, 1, 2] and args.evals == 2 and args.runs_dir.endswith("runs/study")
    configs = {v: study.run_config(v, 1, args) for v, _ in study.plan(args) if _ == 1}
    assert list(configs) == ["appo", "grpo", "arpo", "appo-no-afut", "appo-one-group", "appo-entropy-bs"]
    flat = {v: study.comparable(c) for v, c in configs.items()}
    for variant, keys in flat.items():
        differing = {k for k in keys if keys[k] != flat["appo"][k]}
        assert differing <= {"algo.algo", "algo.b", "algo.one_group", "algo.entropy_only"}, variant
        assert configs[variant].algo.M == configs["appo"].algo.M and configs[variant].seed == 1
    assert configs["appo-no-afut"].algo.b == 0 and configs["appo-entropy-bs"].algo.entropy_only
    assert configs["appo"].data.eval_size >= 256 and configs["appo"].checkpoint_every == configs["appo"].steps
    quick = study.parse_args(["--quick"])
    assert quick.seeds == [0, 1] and quick.evals == 2 and quick.runs_dir.endswith("runs/study-quick")
    assert study.run_config("grpo", 0, quick).steps == 2


@pytest.mark.parametrize("argv, words", [
    (["--evals", "0"], "--evals"), (["--jobs", "0"], "--jobs"), (["--seeds", "1", "1"], "--seeds"),
    (["--variants", "appo"], "--variants"), (["--config", "nope.yaml"], "--config"),
])
def test_bad_arguments_are_refused_naming_the_option(study, argv, words, capsys):
    with pytest.raises(SystemExit):
        study.parse_args(argv)
    assert words in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random llama with a tokenizer trained on the task's prompts (tests/test_quickstart.py's)."""
    spec = importlib.util.spec_from_file_location("quickstart_helpers", REPO / "tests" / "test_quickstart.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    return helpers.tiny_model_dir.__wrapped__(tmp_path_factory)


def tiny(model_dir) -> list[str]:
    return ["--override", f"model.name_or_path={model_dir}", "device=cpu", "threads=1",
            "rollout.max_prompt_tokens=1500", "rollout.max_total_tokens=1540", "rollout.max_new_tokens_per_turn=8"]


def test_quick_pipeline_reports_then_reuses_finished_runs(study, tiny_model_dir, tmp_path, monkeypatch):
    import _record

    import appo.trainer

    monkeypatch.setattr(_record, "RESULTS_DIR", tmp_path / "results")
    argv = ["--quick", "--runs-dir", str(tmp_path / "runs"), *tiny(tiny_model_dir)]
    paths = study.main(argv)
    payload = json.loads(paths["json"].read_text())
    runs = [r for r in payload["rows"] if r["kind"] == "run"]
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(
        (v, s) for v in ("appo", "grpo", "arpo") for s in (0, 1))
    for r in runs:
        assert [e["step"] for e in r["evals"]] == [1, 2] and len(r["evals"][0]["correct"]) == 4
        assert [e["trajectories"] for e in r["evals"]] == [2 * r["M"], 4 * r["M"]]  # exactly M per prompt
        assert 0 < r["evals"][0]["train_s"] < r["evals"][1]["train_s"] == r["train_s"]
        assert not (tmp_path / "runs" / f"{r['variant']}-s{r['seed']}" / "checkpoints").exists()
    assert [s["seed"] for s in payload["rows"] if s["kind"] == "start"] == [0, 1]
    analysis = paths["analysis"]

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(appo.trainer, "train", refuse)
    monkeypatch.setattr(appo.trainer, "evaluate", refuse)
    again = study.main([*argv[:3], "--report-only", *argv[3:]])
    assert again["analysis"] == analysis
    with pytest.raises(ValueError, match="--runs-dir: the finished run .* other values of \\['optim.lr'\\]"):
        study.main([*argv, "optim.lr=1e-3"])


def test_an_interrupted_run_resumes_to_the_same_result(study, tiny_model_dir, tmp_path, monkeypatch):
    base = ["--quick", *tiny(tiny_model_dir)]
    straight = study.run_one("appo", 0, study.parse_args([*base[:1], "--runs-dir", str(tmp_path / "a"),
                                                          *base[1:]]))
    args = study.parse_args([*base[:1], "--runs-dir", str(tmp_path / "b"), *base[1:]])
    real = study.evaluate_into
    calls = []

    def fail_at_step_2(config, path, model_path=None):
        calls.append(path.name)
        if path.name.startswith("step-000002") and calls.count(path.name) == 1:
            raise KeyboardInterrupt  # the machine went down after step 2 was trained
        return real(config, path, model_path)

    monkeypatch.setattr(study, "evaluate_into", fail_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        study.run_one("appo", 0, args)
    assert not (tmp_path / "b" / "appo-s0" / "result.json").exists()
    resumed = study.run_one("appo", 0, args)
    assert calls == ["step-000001.jsonl", "step-000002.jsonl", "step-000002.jsonl"]  # step 1 not redone

    def numbers(result):
        return ([e["correct"] for e in result["evals"]],
                [{k: v for k, v in r.items() if not k.startswith("time/")} for r in result["history"]])

    assert numbers(resumed) == numbers(straight)


@pytest.mark.slow  # two worker processes each import torch and transformers: a minute here
def test_workers_in_their_own_processes(study, tiny_model_dir, tmp_path, monkeypatch):
    import _record

    monkeypatch.setattr(_record, "RESULTS_DIR", tmp_path / "results")
    paths = study.main(["--quick", "--jobs", "2", "--seeds", "3", "--variants", "grpo", "appo",
                        "--runs-dir", str(tmp_path / "runs"), *tiny(tiny_model_dir)])
    runs = [r for r in json.loads(paths["json"].read_text())["rows"] if r["kind"] == "run"]
    assert {(r["variant"], r["seed"], r["threads"], r["jobs"]) for r in runs} == {("grpo", 3, 1, 2),
                                                                                   ("appo", 3, 1, 2)}
    assert (tmp_path / "runs" / "appo-s3.log").is_file()


@pytest.mark.slow
def test_quick_study_on_smollm2(study, tmp_path, monkeypatch):
    """`python bench/study.py --quick --seeds 0` (one seed keeps CI short: about 5 CPU minutes; the tiny-model
    test above covers two): SmolLM2, the committed recipe shrunk, APPO / GRPO / ARPO, 2 evaluations each on 4
    questions; real answers, so accuracies are not all 0 or 1."""
    import _record

    monkeypatch.setattr(_record, "RESULTS_DIR", tmp_path / "results")
    paths = study.main(["--quick", "--seeds", "0", "--runs-dir", str(tmp_path / "runs")])
    analysis = paths["analysis"]
    assert analysis["questions"] == 4 and analysis["seeds"] == [0]
    assert {e["variant"] for e in analysis["variants"]} == {"appo", "grpo", "arpo"}
    curves = [p["accuracy"]["mean"] for e in analysis["variants"] for p in e["curve"]]
    assert 0 < np.mean([analysis["start"]["mean"], *curves]) < 1
    assert np.isfinite([e["at_time"]["mean"] for e in analysis["variants"]]).all()
