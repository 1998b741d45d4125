"""bench/gpu_suite.sh --dry-run: every step of the one-call GPU pass runs at tiny sizes on the CPU (Triton
under the interpreter), so the script that the first lent GPU gets cannot rot. All output goes to temporary
folders (the run folder and $OUT); nothing is written into the tree."""

import json
import os
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = ["tools", "install", "checks_triton", "build", "checks_gather", "bench_all", "gpu_tests", "sanitizer"]
BENCH_MODULES = ("token_stats", "linear_token_stats", "future_value", "prefix_cache")


def test_dry_run_passes_every_step_and_writes_its_summary(tmp_path):
    out, run_dir = tmp_path / "out", tmp_path / "run"
    env = {**os.environ, "OUT": str(out), "APPO_SUITE_DIR": str(run_dir), "OMP_NUM_THREADS": "1"}
    env.pop("APPO_BENCH_RESULTS", None)
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--dry-run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]

    # $OUT, what comes back from the GPU machine (at most 8 files): summary, merged record, the raw run
    assert sorted(p.name for p in out.iterdir()) == ["gpu-suite.json", "raw.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text().splitlines()
    assert 5 < len(summary) <= 40
    assert run.stdout.rstrip().splitlines()[-len(summary):] == summary  # printed last
    assert "DRY RUN" in summary[0]
    checks = [line for line in summary if line.startswith("check ")]
    assert {line.split()[1].rstrip(":") for line in checks} == {"token_stats", "linear_token_stats",
                                                                 "future_value", "gather_prefix_kv"}
    assert all(": PASS" in line for line in checks), checks
    for figure in ("ceilings:", "token stats", "fused forward", "fused fwd+bwd", "future value", "gather"):
        assert any(line.startswith(figure) for line in summary), figure

    record = json.loads((out / "gpu-suite.json").read_text())
    assert [s["name"] for s in record["steps"]["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in record["steps"]["steps"]), record["steps"]
    assert record["summary"] == summary and record["tools"]["dry_run"]
    assert {row.get("bench") for row in record["benchmarks"]} == {"token_stats", "linear_token_stats",
                                                                  "future_value", "gather"}
    # the run folder, packed: every json the steps wrote, bench/_record.py's files among them
    with tarfile.open(out / "raw.tar.gz") as packed:
        names = {Path(name).name for name in packed.getnames()}
    for name in ("tools", "checks-triton", "checks-gather", "steps", "benchmarks-all"):
        assert f"{name}.json" in names, name
    for module in BENCH_MODULES:
        assert any(name.startswith(f"{module}-") for name in names), module
