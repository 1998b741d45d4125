"""bench/compare_algos.py: per-run rows, aggregation over seeds, the markdown table and the plot, on fake
metrics (no training)."""

import argparse
import importlib.util
import random
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_algos", BENCH / "compare_algos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(compare, algo: str, seed: int, rng: random.Random, steps: int = 5) -> dict:
    """A (summary, history) pair shaped like appo.trainer.train's output, with random values."""
    history = []
    for step in range(1, steps + 1):
        phases = {p: rng.uniform(0.5, 9.0) for p in ("rollout", "branch", "update")}
        history.append({"step": step, "reward": rng.uniform(-0.4, 1.0), "tool_calls": rng.uniform(0, 2),
                        "time/step": sum(phases.values()) + rng.uniform(0, 0.1),
                        **{f"time/{p}": v for p, v in phases.items()}})
    summary = {"eval": {"pass@1": rng.random(), "pass@k": rng.random(), "k": 3, "items": 7,
                        "tool_calls": rng.uniform(0, 2)}}
    return compare.run_row(algo, seed, summary, history), history, summary


def test_run_row_reads_eval_and_means_over_steps(compare):
    rng = random.Random(3)
    row, history, summary = fake_run(compare, "appo", 11, rng, steps=7)
    assert row["pass@1"] == summary["eval"]["pass@1"] and row["pass@k"] == summary["eval"]["pass@k"]
    assert row["k"] == 3 and row["steps"] == 7
    assert row["final_reward"] == history[-1]["reward"]
    assert row["rewards"] == [r["reward"] for r in history]
    assert row["mean_reward"] == pytest.approx(statistics.fmean(r["reward"] for r in history), abs=1e-12)
    assert row["time_branch"] == pytest.approx(statistics.fmean(r["time/branch"] for r in history), abs=1e-12)
    assert row["train_tool_calls"] == pytest.approx(statistics.fmean(r["tool_calls"] for r in history))


def test_run_row_rejects_missing_eval_and_empty_history(compare):
    rng = random.Random(4)
    _, history, _ = fake_run(compare, "grpo", 0, rng)
    with pytest.raises(ValueError, match="summary"):
        compare.run_row("grpo", 0, {}, history)
    with pytest.raises(ValueError, match="history"):
        compare.run_row("grpo", 0, {"eval": {"pass@1": 0.5}}, [])


def test_aggregate_mean_std_over_seeds_and_time_vs_grpo(compare):
    rng = random.Random(5)
    rows = [fake_run(compare, algo, seed, rng)[0] for seed in (0, 1, 2) for algo in ("appo", "grpo", "arpo")]
    entries = {e["algo"]: e for e in compare.aggregate(rows)}
    assert list(entries) == ["appo", "grpo", "arpo"]
    for algo, entry in entries.items():
        runs = [r for r in rows if r["algo"] == algo]
        assert entry["seeds"] == [0, 1, 2]
        for key in compare.RUN_KEYS:
            values = [r[key] for r in runs]
            assert entry[f"{key}_mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
            assert entry[f"{key}_std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
        step3 = [r["rewards"][2] for r in runs]
        assert entry["reward_curve_mean"][2] == pytest.approx(statistics.fmean(step3))
        assert (entry["reward_curve_min"][2], entry["reward_curve_max"][2]) == (min(step3), max(step3))
        grpo = {r["seed"]: r["time_per_step"] for r in rows if r["algo"] == "grpo"}
        ratios = [r["time_per_step"] / grpo[r["seed"]] for r in runs]
        assert entry["time_vs_grpo"] == pytest.approx(statistics.fmean(ratios), rel=1e-12)
        assert entry["time_vs_grpo_std"] == pytest.approx(statistics.stdev(ratios), rel=1e-12)
    assert entries["grpo"]["time_vs_grpo"] == pytest.approx(1.0)
    assert entries["grpo"]["time_vs_grpo_std"] == pytest.approx(0.0, abs=1e-15)


def test_aggregate_single_seed_and_no_grpo(compare):
    rng = random.Random(6)
    row = fake_run(compare, "appo", 2, rng)[0]
    (entry,) = compare.aggregate([row])
    assert entry["pass@1_mean"] == row["pass@1"] and entry["pass@1_std"] == 0.0
    assert entry["time_vs_grpo"] is None
    with pytest.raises(ValueError, match="rows"):
        compare.aggregate([])


def test_markdown_table_has_one_line_per_algo_with_values(compare):
    rng = random.Random(7)
    rows = [fake_run(compare, algo, seed, rng)[0] for seed in (0, 1) for algo in ("appo", "grpo")]
    entries = compare.aggregate(rows)
    table = compare.markdown_table(entries).strip().splitlines()
    assert len(table) == 2 + 2 and "pass@3" in table[0]
    appo = next(e for e in entries if e["algo"] == "appo")
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[0] == "appo" and cells[1] == "2"
    assert cells[2] == f"{appo['pass@1_mean']:.3f} ± {appo['pass@1_std']:.3f}"
    assert cells[-1] == f"{appo['time_vs_grpo']:.2f}x ± {appo['time_vs_grpo_std']:.2f}"
    assert len(cells) == table[0].count("|") - 1


def test_plot_and_results_files_are_written(compare, tmp_path, monkeypatch):
    rng = random.Random(8)
    rows = [fake_run(compare, algo, seed, rng)[0] for seed in (0, 1, 2) for algo in ("appo", "grpo", "arpo")]
    png = compare.plot_comparison(compare.aggregate(rows), tmp_path / "cmp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sys.path.insert(0, str(BENCH))
    import _record

    monkeypatch.setattr(_record, "RESULTS_DIR", tmp_path / "results")
    paths = compare.write_results(rows, argparse.Namespace(steps=5), wall_s=12.5)
    assert paths["json"].parent == tmp_path / "results"
    assert paths["md"].read_text() == paths["table"] and paths["png"].is_file()
    import json

    payload = json.loads(paths["json"].read_text())
    kinds = [r["kind"] for r in payload["rows"]]
    assert kinds.count("run") == 9 and kinds.count("aggregate") == 3 and kinds[-1] == "settings"


def test_run_overrides_differ_only_in_algo_keys(compare):
    args = compare.build_parser().parse_args(["--steps", "3", "--seeds", "1"])
    from appo.config import load_config

    configs = {algo: load_config(None, compare.run_overrides(algo, 1, args)) for algo in compare.ALGO_OVERRIDES}
    assert {c.algo.M for c in configs.values()} == {4}
    assert configs["appo"].algo.N == 2 and configs["appo"].algo.B == 1 and configs["arpo"].algo.N == 2
    for config in configs.values():
        assert (config.seed, config.steps, config.data.task, config.eval_samples) == (1, 3, "arithmetic", 2)
        assert config.prompts_per_step == configs["grpo"].prompts_per_step
    assert len({c.output_dir for c in configs.values()}) == 3
    with pytest.raises(ValueError, match="algo"):
        compare.run_overrides("ppo", 0, args)


def test_aggregate_only_reads_finished_runs_and_skips_missing(compare, tmp_path, monkeypatch):
    import json

    import _record

    monkeypatch.setattr(_record, "RESULTS_DIR", tmp_path / "results")
    rng = random.Random(9)
    finished = [("appo", 0), ("grpo", 0), ("arpo", 0), ("grpo", 1)]
    for algo, seed in finished:
        _, history, summary = fake_run(compare, algo, seed, rng, steps=2)
        run = tmp_path / "runs" / f"{algo}-s{seed}"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        (run / "summary.json").write_text(json.dumps({**summary, "wall_s": 10.0 + seed}))
    start = tmp_path / "runs" / "start-s1"
    start.mkdir()
    (start / "eval.json").write_text(json.dumps({"seed": 1, "pass@1": 0.25, "pass@k": 0.5, "k": 3}))
    paths = compare.main(["--aggregate-only", "--seeds", "0", "1", "--runs-dir", str(tmp_path / "runs")])
    assert "| start (no training) | 1 | 0.250 ± 0.000 | 0.500 ± 0.000 |" in paths["table"]
    payload = json.loads(paths["json"].read_text())
    runs = [(r["algo"], r["seed"]) for r in payload["rows"] if r["kind"] == "run"]
    assert runs == [("appo", 0), ("grpo", 0), ("arpo", 0), ("grpo", 1)]
    assert [r["seed"] for r in payload["rows"] if r["kind"] == "start_eval"] == [1]
    grpo = next(r for r in payload["rows"] if r["kind"] == "aggregate" and r["algo"] == "grpo")
    assert grpo["seeds"] == [0, 1]
    assert payload["rows"][-1]["sweep_wall_s"] == pytest.approx(41.0)
