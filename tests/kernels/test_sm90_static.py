"""The static sm_90 check (bench/sm90_static.py) on the CPU: every Triton kernel and the CUDA gather compile
for sm_90, nothing spills, and the machine code has the properties the kernels' speed rests on.

Runs the tool in a subprocess without TRITON_INTERPRET (the interpreter replaces the compiler in this
process) and reads its json from a temporary folder (nothing is written into the tree; Triton's own cache is
~/.triton).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOKEN_STATS_BUDGET = 12.0  # SASS instructions per logit in the steady-state loop (issue 13)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "sm90-static.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(REPO / "bench" / "sm90_static.py"), "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), f"the static check did not finish:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    return {"returncode": run.returncode, "stderr": run.stderr,
            "kernels": {k["kernel"]: k for k in json.loads(out.read_text())["kernels"]}}


def test_every_kernel_compiles_for_sm90_without_spills(record):
    kernels = record["kernels"]
    families = {name.split("[")[0] for name in kernels}
    assert families >= {"token_stats", "linear_forward", "linear_grad_logits", "future_value_chunk_sums",
                        "future_value_scan", "gather_prefix_kv"}
    spilled = [name for name, k in kernels.items() if k.get("spills")]
    assert not spilled, f"register spills in {spilled}"
    assert record["returncode"] == 0, record["stderr"][-3000:]
    for name, k in kernels.items():
        if "skipped" not in k:
            assert 0 < k["registers"] <= 255 and k["main_loop_instructions"] > 0, name


def test_token_stats_loop_is_lean_and_pipelined(record):
    for dtype in ("bf16", "fp16", "fp32"):
        k = record["kernels"][f"token_stats[{dtype}, V=152064]"]
        assert k["main_loop"] == "loop" and k["cp_async"], k
        assert k["instructions_per_element"] <= TOKEN_STATS_BUDGET, k


def test_lm_head_matmuls_use_wgmma(record):
    for name, k in record["kernels"].items():
        if name.startswith(("linear_forward[bf16", "linear_grad_logits[bf16")):
            assert k["wgmma"] and k["hgmma_per_k_step"] > 0 and k["cp_async"], k


def test_cuda_gather_compiles_for_sm90_with_vector_copy_loops(record):
    gathers = {name: k for name, k in record["kernels"].items() if name.startswith("gather_prefix_kv")}
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        assert all("skipped" in k for k in gathers.values())
        pytest.skip("nvcc is not on this machine: the CUDA gather cannot be compiled")
    assert len(gathers) == 3, gathers
    for k in gathers.values():
        assert k["main_loop_16_byte_loads"] >= 4, k  # four 16-byte loads in flight per thread
