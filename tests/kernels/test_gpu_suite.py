"""bench/gpu_suite.sh --dry-run: every step of the one-call GPU pass runs at tiny sizes on the CPU (Triton
under the interpreter), so the script that the first lent GPU gets cannot rot. All output goes to a temporary
$OUT; nothing is written into the tree."""

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = ["tools", "checks_triton", "build", "checks_gather", "bench_all", "gpu_tests", "sanitizer"]
BENCH_MODULES = ("token_stats", "linear_token_stats", "future_value", "prefix_cache")


def test_dry_run_passes_every_step_and_writes_its_summary(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("APPO_BENCH_RESULTS", None)
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--dry-run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]

    steps = json.loads((tmp_path / "steps.json").read_text())["steps"]
    assert [s["name"] for s in steps] == STEPS
    assert all(s["status"] == "ok" for s in steps), steps
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert 5 < len(summary) <= 40
    assert run.stdout.rstrip().splitlines()[-len(summary):] == summary  # printed last
    assert "DRY RUN" in summary[0]
    checks = [line for line in summary if line.startswith("check ")]
    assert {line.split()[1].rstrip(":") for line in checks} == {"token_stats", "linear_token_stats",
                                                                 "future_value", "gather_prefix_kv"}
    assert all(": PASS" in line for line in checks), checks
    for figure in ("ceilings:", "token stats", "fused forward", "fused fwd+bwd", "future value", "gather"):
        assert any(line.startswith(figure) for line in summary), figure

    # every json the suite promises, in $OUT
    for name in ("tools", "checks-triton", "checks-gather", "steps"):
        assert json.loads((tmp_path / f"{name}.json").read_text()), name
    for module in BENCH_MODULES:
        assert list(tmp_path.glob(f"{module}-*.json")), module  # bench/_record.py's file
    timings = json.loads((tmp_path / "benchmarks-all.json").read_text())["benchmarks"]  # pytest-benchmark's
    assert {b["extra_info"].get("bench") for b in timings} == {"token_stats", "linear_token_stats",
                                                               "future_value", "gather"}
