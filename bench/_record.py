"""Record benchmark results as json, with the device, date and git commit of the run.

Usage (from a benchmark or script in bench/)::

    from _record import record
    path = record("token_stats", [{"impl": "torch", "rows": 1024, "vocab": 32000, "median_s": 0.012}])

Where the json goes (``RESULTS_DIR``): the folder ``$APPO_BENCH_RESULTS`` names, or ``--results-dir`` of
``pytest bench/``; by default ``.benchmarks/appo/`` in the repository, beside pytest-benchmark's own storage
and ignored by git. A benchmark run therefore leaves the tree clean. The results the README cites live in
bench/results/ (``COMMITTED_DIR``): copy a file there on purpose, or run with
``APPO_BENCH_RESULTS=bench/results``.
"""

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMITTED_DIR = REPO / "bench" / "results"
RESULTS_DIR = Path(os.environ.get("APPO_BENCH_RESULTS") or REPO / ".benchmarks" / "appo")


def git_commit() -> str:
    """The checked-out commit (with '+dirty' when the tree has local changes), or 'unknown' outside git.
    $APPO_COMMIT, when set, is taken as it is (a copy of the tree without .git, e.g. on a lent GPU)."""
    if os.environ.get("APPO_COMMIT"):
        return os.environ["APPO_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def device_info() -> dict:
    """Name of the GPU (when torch sees CUDA) or the CPU, plus library versions."""
    info = {"host": platform.node(), "cpu": _cpu_name(), "python": platform.python_version()}
    try:
        import torch
    except ImportError:
        return info
    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = props.name
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        info["device"] = info["cpu"]
        info["cpu_threads"] = torch.get_num_threads()
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record(name: str, rows: list[dict]) -> Path:
    """Write ``rows`` (one dict per measured case, json-serialisable) to RESULTS_DIR/<name>-<utc time>.json
    (the module docstring says where that is).

    The file also holds the benchmark name, the UTC date, the git commit and the device; returns its path.
    """
    if not name or any(ch in name for ch in "/\\ "):
        raise ValueError(f"name must be a non-empty file-name stem without slashes or spaces, got {name!r}")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError("rows must be a list of dicts")
    now = datetime.now(timezone.utc)
    payload = {"name": name, "date": now.isoformat(timespec="seconds"), "commit": git_commit(),
               **device_info(), "rows": rows}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


# ------------------------------------------------------------------------------ helpers shared by the suites
CPU_THREADS = int(os.environ.get("APPO_BENCH_CPU_THREADS", 1))


@__import__("contextlib").contextmanager
def torch_threads(device: str, threads: int = CPU_THREADS):
    """Run CPU cases with ``threads`` torch threads ($APPO_BENCH_CPU_THREADS, default 1: steadier on a shared
    machine), restoring the previous count afterwards. CUDA cases are left alone."""
    import torch

    previous = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def peak_extra_bytes(run, device: str):
    """CUDA: bytes allocated at the peak of one call of ``run`` beyond what was allocated before it (the
    inputs); None elsewhere (the CPU allocator keeps no such statistics)."""
    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    return torch.cuda.max_memory_allocated() - before
