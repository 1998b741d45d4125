"""bench/gpu_suite.sh, the one call a lent GPU gets, rehearsed on the CPU: its plan fits the 8-minute budget,
what it leaves in $OUT comes back whole (at most 8 files), each test and benchmark is recorded as it ends, a
call cut short keeps what the steps before measured, targets read against the card's own ceilings, and the
training step's CPU stand-in (`appo train`, two steps, a tiny random Llama) passes its checks. The full dry
run (every step) is slow-marked; bench/prepare_gpu_carry.sh (it reaches PyPI) too. Everything is written
into temporary folders."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_suite.sh"
COMMIT = "test-commit-0123"
_spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench" / "gpu_suite.py")
gpu_suite = sys.modules.setdefault("gpu_suite", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(gpu_suite)


def suite_env(tmp_path, steps=None):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "APPO_SUITE_WORK": str(tmp_path / "work"),
           "OMP_NUM_THREADS": "1", "APPO_COMMIT": COMMIT, "APPO_WHEELS": str(tmp_path / "no-wheels")}
    for name in ("APPO_BENCH_RESULTS", "APPO_SUITE_DIR", "APPO_SUITE_STEPS", "PYTHONPATH"):
        env.pop(name, None)
    if steps:
        env["APPO_SUITE_STEPS"] = ",".join(steps)
    return env


def packed_json(out: Path) -> dict:
    """{name: record} of every .json in raw.tar.gz."""
    with tarfile.open(out / "raw.tar.gz") as packed:
        return {Path(m.name).stem: json.load(packed.extractfile(m)) for m in packed.getmembers()
                if m.name.endswith(".json")}


# ------------------------------------------------------------------------------------------ the plan
def test_the_plan_fits_the_budget_and_names_every_step_the_script_runs():
    assert gpu_suite.check_plan() == []
    assert gpu_suite.plan_wall_s() <= gpu_suite.BUDGET_S == 480
    text = SCRIPT.read_text()
    # every `step NAME ...` / `bench NAME ...` call of the script has its limit in the plan, and vice versa
    called = set()
    for line in text.splitlines():
        for part in line.split("#")[0].split(";"):
            words = part.replace("(", " ").split()
            named = len(words) > 1 and re.fullmatch(r"[a-z][a-z0-9_]*", words[1])
            if named and words[0] in ("step", "bench"):
                called.add(words[1])
    assert called == {step.name for step in gpu_suite.PLAN} - {"summary"}


def test_plan_time_counts_a_background_step_only_beyond_the_steps_it_overlaps():
    step = gpu_suite.PlanStep
    overlapped = (step("a", 10, ""), step("build", 100, "", joins_before="d"), step("b", 60, ""),
                  step("c", 50, ""), step("d", 10, ""))
    assert gpu_suite.plan_wall_s(overlapped) == 10 + 110 + 10  # the build is hidden behind b and c
    waiting = overlapped[:3] + overlapped[4:]
    assert gpu_suite.plan_wall_s(waiting) == 10 + 100 + 10  # d waits 40 s for it
    assert gpu_suite.check_plan(overlapped, budget_s=129) == [
        "the limits add up to 130 s, over the 129 s budget"]
    never_joined = (step("build", 5, "", joins_before="later"), step("a", 1, ""))
    assert any("does not come after it" in p for p in gpu_suite.check_plan(never_joined))


def test_check_out_names_what_would_not_come_back(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("summary.txt", "gpu-suite.json", "raw.tar.gz"):
        (out / name).write_text("x")
    assert gpu_suite.check_out(out) == []
    (out / "a" / "b" / "c").mkdir(parents=True)
    (out / "a" / "b" / "c" / "deep.txt").write_text("x")
    (out / "a" / "bad name.txt").write_text("x")
    with open(out / "big.bin", "wb") as handle:
        handle.truncate(16 * 2**20 + 1)  # sparse: no 16 MiB written
    for index in range(3):
        (out / f"extra{index}.txt").write_text("x")
    problems = " | ".join(gpu_suite.check_out(out))
    for expected in ("a/b/c/deep.txt: more than 2 folders down", "bad name.txt: a name of other characters",
                     "big.bin: 16777217 bytes, over 16 MiB", "9 files, over 8"):
        assert expected in problems, problems


def test_pack_keeps_the_end_of_a_long_log(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "long.log").write_text("".join(f"line {i}\n" for i in range(1000)))
    (run / "tools.json").write_text('{"a": 1}')
    gpu_suite.pack(run, tmp_path / "raw.tar.gz", per_file=200)
    with tarfile.open(tmp_path / "raw.tar.gz") as packed:
        log = packed.extractfile("long.log").read().decode()
        assert json.load(packed.extractfile("tools.json")) == {"a": 1}
    assert log.startswith("[the first ") and log.endswith("line 998\nline 999\n")
    assert len(log.splitlines()[-1]) and len(log) < 300


# ------------------------------------------------------------------------------ targets against ceilings
def fake_run(tmp_path, copy_tb_per_s, matmul_tflops) -> Path:
    """A run folder as the GPU steps leave it: ceilings, and benchmark rows that the plugin recorded."""
    run = tmp_path / f"run-{copy_tb_per_s}"
    run.mkdir()
    (run / "tools.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "dry_run": False}))
    (run / "checks-triton.json").write_text(json.dumps({"ceilings": {
        "copy_tb_per_s": copy_tb_per_s, "matmul_tflops": matmul_tflops, "matmul_square_tflops": matmul_tflops,
        "matmul_lm_head_tflops": matmul_tflops - 50, "matmul_dtype": "torch.bfloat16"}}))
    rows = [{"bench": "token_stats", "impl": "appo_triton", "median_s": 0.0074, "gb_per_s": 2_700.0},
            {"bench": "token_stats", "impl": "eager_torch", "median_s": 0.05, "gb_per_s": 400.0},
            {"bench": "linear_token_stats", "impl": "appo_triton", "mode": "forward", "median_s": 0.056,
             "tflops": 640.0},
            {"bench": "gather", "case": "cuda-qwen2.5-7b", "impl": "cuda", "median_s": 0.001,
             "gb_per_s": 2_000.0}]
    (run / "bench_token_stats.jsonl").write_text("".join(json.dumps({"kind": "benchmark", **r}) + "\n"
                                                         for r in rows))
    return run


def test_targets_are_fractions_of_the_ceilings_the_card_measured(tmp_path):
    """The same figures meet the copy-bandwidth targets on a card that copies at 3.0 TB/s (an H100) and miss
    them on one that copies at 4.3 TB/s (an H200): the summary judges against what it measured."""
    h100 = "\n".join(gpu_suite.summary_lines(fake_run(tmp_path, 3.0, 800.0)))
    assert "2.70 TB/s = 0.90 of copy [MET >= 0.85]" in h100
    assert "6.8x eager [MET >= 3]" in h100
    assert "640 TFLOP/s = 0.80 of matmul [MET >= 0.75]" in h100
    assert "2.00 TB/s = 0.67 of copy [MISSED >= 0.80]" in h100
    h200 = "\n".join(gpu_suite.summary_lines(fake_run(tmp_path, 4.3, 790.0)))
    assert "2.70 TB/s = 0.63 of copy [MISSED >= 0.85]" in h200
    assert "ceilings (checks): copy 4.30 TB/s" in h200


# ---------------------------------------------------------------------------------- the pytest plugin
def test_plugin_records_each_test_and_benchmark_as_it_ends(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_demo.py").write_text(
        "def test_ok():\n    pass\n\n"
        "def test_broken():\n    assert 1 == 2, 'broken on purpose'\n\n"
        "def test_timed(benchmark):\n"
        "    benchmark.extra_info.update({'bench': 'demo', 'impl': 'sum'})\n"
        "    benchmark.pedantic(lambda: sum(range(100)), rounds=3)\n")
    record = tmp_path / "step.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO / "bench"), "APPO_SUITE_RECORD": str(record),
           "APPO_COMMIT": COMMIT}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "gpu_suite", "-p", "no:cacheprovider",
                          "test_demo.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]  # test_broken fails
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    tests = {line["nodeid"].split("::")[1]: line for line in lines if line["kind"] == "test"}
    assert {name: t["outcome"] for name, t in tests.items()} == {"test_ok": "passed", "test_broken": "failed",
                                                                 "test_timed": "passed"}
    assert "broken on purpose" in tests["test_broken"]["error"]
    (bench,) = [line for line in lines if line["kind"] == "benchmark"]
    assert bench["bench"] == "demo" and bench["impl"] == "sum" and bench["median_s"] > 0
    assert all(line["commit"] == COMMIT for line in lines)


# ------------------------------------------------------------------------------------------- dry runs
def test_dry_run_trains_on_the_cpu_and_returns_within_the_limits(tmp_path):
    """The plan's checks and the training step's CPU stand-in: `appo train` for two steps from a tiny random
    Llama, step 1 at lr = 0 without any policy shift; $OUT holds 3 files within the return limits."""
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, capture_output=True, text=True,
                         env=suite_env(tmp_path, ["setup", "tools", "train"]), timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu-suite.json", "raw.tar.gz", "summary.txt"]
    assert gpu_suite.check_out(out) == []
    summary = (out / "summary.txt").read_text().splitlines()
    assert run.stdout.rstrip().splitlines()[-len(summary):] == summary  # printed last
    assert "DRY RUN" in summary[0] and f"commit {COMMIT[:12]}" in summary[0]
    assert summary[2].startswith("plan: limits add up to at most 480 s of the 480 s budget")
    assert any(line.startswith("train (cpu, random Llama") and line.endswith("PASS") for line in summary)
    assert summary[-1].startswith("return: 3 files")

    record = json.loads((out / "gpu-suite.json").read_text())
    assert record["plan"]["wall_s"] <= record["plan"]["budget_s"] and record["plan"]["problems"] == []
    assert [(s["name"], s["status"]) for s in record["steps"]] == [("setup", "ok"), ("tools", "ok"),
                                                                    ("train", "ok")]
    site = (tmp_path / "work" / "site" / "appo").resolve()
    assert Path(record["tools"]["appo_from"]).resolve() == site  # the private copy, not the tree
    packed = packed_json(out)
    assert {"plan", "setup", "tools", "train"} <= set(packed)
    assert all(r["commit"] == COMMIT for r in [record, *packed.values()])  # no .git needed

    train = record["train"]
    assert train["passed"] and all(train["checks"].values()) and train["checks"]["lr0_entropy_only"]
    first, second = train["steps"]
    assert first["bs_entropy_only"] == 1.0 and first["omega_min"] == first["omega_max"] == 1.0
    assert first["loss/ratio_max"] == 1.0 and second["step"] == 2
    for step in (first, second):
        phases = ("step", "rollout", "old_logprobs", "branch", "update")
        assert all(step[f"time/{phase}"] > 0 for phase in phases)
        assert step["branches"] > 0
    assert all(call["rc"] == 0 and call["peak_rss_bytes"] > 0 for call in train["calls"])
    assert train["calls"][1]["argv"][-1] == "--allow-config-change"  # step 2 resumed from step 1's checkpoint
    backends = train["backends"]
    assert backends["lm_head_torch[float32]"] > 0 and backends.get("gather_cpp", 0) + backends.get(
        "gather_torch", 0) > 0


def test_a_call_cut_short_keeps_what_the_steps_before_it_measured(tmp_path):
    """The device tool kills the whole command at its timeout: $OUT, republished after every step, still
    holds the summary and the records of the steps that finished."""
    with subprocess.Popen(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, text=True, start_new_session=True,
                          env=suite_env(tmp_path, ["setup", "tools", "train"]), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as suite:
        try:
            for line in suite.stdout:
                if line.startswith("== train"):
                    break
        finally:
            os.killpg(suite.pid, signal.SIGKILL)  # its process group: the script and its step
    out = tmp_path / "out"
    assert gpu_suite.check_out(out) == []
    summary = (out / "summary.txt").read_text()
    assert "steps: setup ok " in summary and ", tools ok " in summary and ", train -" in summary
    packed = packed_json(out)
    assert packed["tools"]["dry_run"] and packed["tools"]["commit"] == COMMIT and "train" not in packed


@pytest.mark.slow
def test_full_dry_run_passes_every_step_and_writes_its_summary(tmp_path):
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, env=suite_env(tmp_path),
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu-suite.json", "raw.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text().splitlines()
    assert 8 < len(summary) <= 40 and "DRY RUN" in summary[0]
    checks = [line for line in summary if line.startswith("check ")]
    assert {line.split()[1].rstrip(":") for line in checks} == {"token_stats", "linear_token_stats",
                                                                 "future_value", "gather_prefix_kv"}
    assert all(": PASS" in line for line in checks), checks
    for figure in ("ceilings", "token stats", "fused forward", "fused fwd+bwd", "future value", "gather",
                   "train (cpu", "compute-sanitizer", "return: 3 files"):
        assert any(line.startswith(figure) for line in summary), figure

    record = json.loads((out / "gpu-suite.json").read_text())
    names = [s["name"] for s in record["steps"]]
    assert sorted(names) == sorted(s.name for s in gpu_suite.PLAN if s.name != "summary")
    assert all(s["status"] == "ok" for s in record["steps"]), record["steps"]
    assert {row["bench"] for row in record["benchmarks"]} == {"token_stats", "linear_token_stats",
                                                              "future_value", "gather"}
    assert all(row["commit"] == COMMIT for row in record["benchmarks"])
    with tarfile.open(out / "raw.tar.gz") as packed:
        names = {Path(name).name for name in packed.getnames()}
    for module in ("token_stats", "linear_token_stats", "future_value", "prefix_cache"):
        assert any(name.startswith(f"{module}-") for name in names), module  # bench/_record.py's files


@pytest.mark.slow
def test_prepare_gpu_carry_downloads_the_wheels_and_prints_the_call(tmp_path):
    """Reaches PyPI: Liger-Kernel's wheel for Python 3.12, well under 16 MiB, and the device tool's call."""
    run = subprocess.run(["bash", str(REPO / "bench" / "prepare_gpu_carry.sh")], cwd=REPO, text=True,
                         env={**os.environ, "APPO_WHEELS": str(tmp_path / "wheels")}, capture_output=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    wheels = list((tmp_path / "wheels").glob("*.whl"))
    assert [w.name.split("-")[0] for w in wheels] == ["liger_kernel"]
    assert 0 < sum(w.stat().st_size for w in wheels) < 16 * 2**20
    call = json.loads(run.stdout[run.stdout.index("{"):run.stdout.rindex("}") + 1])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    assert call["command"].startswith(f"APPO_COMMIT={head}")
    assert call["command"].endswith(" bash bench/gpu_suite.sh")
    assert call["timeout_s"] == gpu_suite.BUDGET_S + 60 and len(call["carry"]) == 1
