"""Benchmark records in one schema (bench/_record.py) and the script that tables and plots them
(bench/results_table.py), on the results committed in bench/results/ (read, never rewritten)."""

import json

import _record
import pytest
import results_table
from _record import COMMITTED_DIR, load_record, unit_of

COMMITTED = sorted(COMMITTED_DIR.glob("*.json"))


def raw_rows(data: dict) -> list:
    return data["rows"] if "rows" in data else data["kernels"]


def test_every_committed_result_is_a_record_or_a_study_analysis():
    """Each json in bench/results/ reads as schema 1 (or is an analysis bench/study_report.py wrote, which the
    table script skips), keeps every row it was written with, and is left unchanged on disk."""
    assert len(COMMITTED) >= 20
    records = 0
    for path in COMMITTED:
        before = path.read_bytes()
        data = json.loads(before)
        try:
            rec = load_record(path)
        except ValueError as err:
            assert "contrasts" in data and path.name in str(err), path.name
            continue
        records += 1
        assert rec["schema"] == 1 and rec["kind"] and isinstance(rec["device"]["name"], str), path.name
        assert rec["rows"] == raw_rows(data), path.name
        assert rec["results"], path.name
        for result in rec["results"]:
            assert isinstance(result["name"], str) and isinstance(result["unit"], str)
            assert result["value"] is None or isinstance(result["value"], (int, float))
            assert all(v is None or isinstance(v, (str, int, float, bool)) for v in result["case"].values())
        assert path.read_bytes() == before
    assert records >= 20


def _value(rec: dict, name: str, **case) -> float:
    (value,) = [r["value"] for r in rec["results"]
                if r["name"] == name and all(r["case"].get(k) == v for k, v in case.items())]
    return value


def test_converted_results_carry_the_figures_the_readme_cites():
    scan = load_record(COMMITTED_DIR / "future_value-20261127T134646Z.json")
    assert _value(scan, "median_s", impl="appo_torch") == pytest.approx(7.0e-3, abs=0.05e-3)
    assert _value(scan, "median_s", impl="dense_torch") == pytest.approx(0.631, abs=0.001)
    gather = load_record(COMMITTED_DIR / "prefix_cache-20261127T142150Z.json")
    assert _value(gather, "gb_per_s", impl="cpp") == pytest.approx(38.6, abs=0.05)
    assert _value(gather, "median_s", impl="cpp") == pytest.approx(11.9e-3, abs=0.05e-3)
    tools = load_record(COMMITTED_DIR / "tools-20261130T202324Z.json")
    assert _value(tools, "median_s", case="python_sandbox_call") == pytest.approx(0.045, abs=0.001)
    assert {r["unit"] for r in gather["results"] if r["name"] == "gb_per_s"} == {"GB/s"}


def test_record_writes_schema_1_that_reads_back_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(_record, "RESULTS_DIR", tmp_path)
    rows = [{"impl": "cpp", "rows": 4, "median_s": 0.25, "peak_extra_bytes": None, "ids": [3, 1],
             "initial": {"seconds": 1.5, "finish_reasons": {"eos": 2}}},
            {"impl": "torch", "rows": 4, "median_s": 0.5, "peak_extra_bytes": 64, "ids": [2],
             "initial": {"seconds": 2.5, "finish_reasons": {"eos": 1}}}]
    path = _record.record("demo", rows, config={"vocab": 32})
    data = json.loads(path.read_text())
    assert path.parent == tmp_path and path.name.startswith("demo-")
    assert data["schema"] == 1 and data["kind"] == "demo" and data["config"] == {"vocab": 32}
    assert data["rows"] == rows and "pytest" in data["command"] and data["device"]["name"]
    assert [(r["name"], r["value"], r["unit"], r["case"]) for r in data["results"]] == [
        ("median_s", 0.25, "s", {"impl": "cpp", "rows": 4}),
        ("peak_extra_bytes", None, "bytes", {"impl": "cpp", "rows": 4}),
        ("initial.seconds", 1.5, "s", {"impl": "cpp", "rows": 4}),
        ("median_s", 0.5, "s", {"impl": "torch", "rows": 4}),
        ("peak_extra_bytes", 64, "bytes", {"impl": "torch", "rows": 4}),
        ("initial.seconds", 2.5, "s", {"impl": "torch", "rows": 4})]
    assert load_record(path) == data


@pytest.mark.parametrize("name, unit", [
    ("median_s", "s"), ("seconds", "s"), ("time_per_step_mean", "s"), ("gb_per_s", "GB/s"),
    ("calls_per_s", "calls/s"), ("generated_tokens_per_s", "tokens/s"), ("tflops_executed", "TFLOP/s"),
    ("peak_extra_bytes", "bytes"), ("peak_rss_mib", "MiB"), ("frac_correct", "fraction"),
    ("branch_cache_hit_fraction.after_sync", "fraction"), ("speedup_over_dense", "x"), ("time_vs_grpo", "x"),
    ("budget_ratio", "x"), ("pass@1", "score"), ("final_reward_std", "score"), ("registers", "registers"),
    ("rows", None), ("vocab", None), ("generated_tokens", None), ("initial.finish_reasons.eos", None)])
def test_a_field_is_a_measurement_when_its_name_says_its_unit(name, unit):
    assert unit_of(name) == unit


def test_what_is_not_a_record_fails_naming_the_file(tmp_path):
    cases = {"list.json": "[1, 2]", "analysis.json": '{"contrasts": []}', "future.json": '{"schema": 2}',
             "broken.json": "{"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=name):
            load_record(tmp_path / name)
    with pytest.raises(ValueError, match="kind"):
        _record.record("a/b", [{"median_s": 1.0}])
    with pytest.raises(ValueError, match="rows"):
        _record.record("demo", [1.0])


def test_the_script_tables_every_committed_record(tmp_path, capsys):
    out = tmp_path / "all.md"
    assert results_table.main([str(COMMITTED_DIR), "--out", str(out)]) == 0
    text = out.read_text()
    kinds = {load_record(p)["kind"] for p in COMMITTED if "contrasts" not in json.loads(p.read_text())}
    assert {line[4:] for line in text.splitlines() if line.startswith("### ")} == kinds
    assert "| appo_torch | 0.007012 |" in text  # future_value: the O(T) scan's median seconds
    assert "skipped" in capsys.readouterr().err  # the study analysis is not a record


def test_the_script_plots_the_selected_measurements(tmp_path, capsys):
    png = tmp_path / "plot.png"
    results_table.main([str(COMMITTED_DIR), "--kind", "future_value", "--kind", "tools",
                        "--metric", "median_s", "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"plotted to {png}" in capsys.readouterr().out


def test_the_script_selects_by_kind_metric_and_case(capsys):
    results_table.main([str(COMMITTED_DIR / "tools-20261130T202324Z.json"),
                        str(COMMITTED_DIR / "tools-20261127T134606Z.json"),
                        "--metric", "median_s", "--where", "confinement=root"])
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| case | median_s [s] |"
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| python_sandbox_call", "| python_sandbox_batch8"]
    with pytest.raises(SystemExit) as stop:
        results_table.main([str(COMMITTED_DIR), "--kind", "no_such_benchmark"])
    assert stop.value.code == 2 and "no result matches" in capsys.readouterr().err
