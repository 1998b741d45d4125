"""Benchmark records: one json schema for every result, written here and read here (older files converted on
read), so that one script (bench/results_table.py) tables and plots any set of them.

Usage (from a benchmark or script in bench/)::

    from _record import record
    path = record("token_stats", [{"impl": "torch", "rows": 1024, "vocab": 32000, "median_s": 0.012}])

Schema 1 (what ``record`` writes; ``load_record`` returns any record in it)::

    {"schema": 1, "kind": "token_stats",           # the benchmark
     "date": "2026-11-27T13:46:46+00:00", "commit": "<git sha>[+dirty]" | null,
     "command": "pytest bench/bench_token_stats.py --benchmark-only" | null,
     "device": {"name": "<GPU or CPU>", "host", "cpu", "python", "torch", "triton", "cpu_threads", ...},
     "config": {...},                                 # settings shared by every row (may be empty)
     "results": [{"name": "median_s", "value": 0.012, "unit": "s", "case": {"impl": "torch", ...}}, ...],
     "rows": [{...}, ...]}                            # the measured rows, as the benchmark wrote them

``results`` is the uniform view: one number each, in a unit. A numeric field of a row is a measurement when
its name says its unit (``unit_of``: ``median_s``, ``gb_per_s``, ``peak_extra_bytes``, ``frac_correct``...;
nested dicts count with dotted names, e.g. ``initial.seconds``); the row's other top-level scalars (strings,
flags, sizes, counts) are its ``case``. ``rows`` keeps everything, lists and nested dicts included, so nothing
the benchmark measured is lost. Older files (the same envelope with the device fields at the top and ``rows``;
bench/sm90_static.py's ``kernels``) are converted when read; the committed ones stay as they were written.

Importing: bench/ is on the import path when a script runs as ``python bench/<x>.py`` (Python puts the
script's folder first) and under pytest (pyproject's ``pythonpath``); with ``python -P`` or PYTHONSAFEPATH,
name it: ``PYTHONPATH=bench``. Never the repository root: its kernels/ would shadow the Hugging Face
``kernels`` package.

Where the json goes (``RESULTS_DIR``): the folder ``$APPO_BENCH_RESULTS`` names, or ``--results-dir`` of
``pytest bench/``; by default ``.benchmarks/appo/`` in the repository, beside pytest-benchmark's own storage
and ignored by git. A benchmark run therefore leaves the tree clean. The results the README cites live in
bench/results/ (``COMMITTED_DIR``): copy a file there on purpose, or run with
``APPO_BENCH_RESULTS=bench/results``.
"""

import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMITTED_DIR = REPO / "bench" / "results"
RESULTS_DIR = Path(os.environ.get("APPO_BENCH_RESULTS") or REPO / ".benchmarks" / "appo")
SCHEMA = 1
# The device fields of an older record (they stood at the top level) and of schema 1's "device".
DEVICE_FIELDS = ("device", "host", "cpu", "python", "torch", "triton", "cpu_threads", "device_memory_gib")


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


def current_command(argv: list[str] | None = None) -> str:
    """The command line that is running (``sys.argv``), as one would type it from the repository root:
    ``pytest bench/x.py ...``, ``python -m pytest ...`` or ``python bench/x.py ...``."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0]:
        return ""
    first = Path(argv[0])
    if first.name == "__main__.py":  # python -m <package>
        words = ["python", "-m", first.parent.name]
    elif first.suffix == ".py":
        try:
            shown = first.resolve().relative_to(REPO)
        except ValueError:
            shown = first
        words = ["python", str(shown)]
    else:
        words = [first.name]
    return shlex.join(words + argv[1:])


# ------------------------------------------------------------------------------------------- the schema
def unit_of(name: str) -> str | None:
    """The unit a field's name says it is measured in, or None when the name names no unit (then the field
    describes the case). Examples: median_s, seconds, time_per_step -> "s"; gb_per_s -> "GB/s"; calls_per_s ->
    "calls/s"; tflops -> "TFLOP/s"; peak_extra_bytes -> "bytes"; peak_rss_mib -> "MiB"; frac_correct,
    cache_hit_fraction -> "fraction"; speedup_over_dense, time_vs_grpo, ratio -> "x"; pass@1, accuracy,
    final_reward -> "score"; rows -> None. A dotted name (a nested dict's field) takes the unit of its
    innermost part that names one: initial.seconds -> "s", branch_cache_hit_fraction.after_sync -> "fraction".
    """
    for part in reversed(name.split(".")):
        unit = _unit_of_key(part)
        if unit:
            return unit
    return None


def _unit_of_key(key: str) -> str | None:
    for suffix in ("_mean", "_std", "_median", "_min", "_max"):  # an aggregate keeps its quantity's unit
        if key.endswith(suffix) and key != suffix[1:]:
            key = key[: -len(suffix)]
            break
    if key == "gb_per_s" or key.endswith("_gb_per_s"):
        return "GB/s"
    if key.startswith("tflops"):
        return "TFLOP/s"
    if key.endswith("_per_s"):
        return key[: -len("_per_s")].rsplit("_", 1)[-1] + "/s"
    if key.startswith("speedup") or "_over_" in key or "_vs_" in key or key.split("_")[-1] == "ratio":
        return "x"
    if key.endswith(("_s", "seconds")) or key.startswith("time_"):
        return "s"
    if key.endswith("_bytes") or key.startswith("bytes_"):
        return "bytes"
    if key.endswith("_mib"):
        return "MiB"
    if key.startswith("frac_") or key.endswith(("_fraction", "_agreement")):
        return "fraction"
    if key.startswith(("pass@", "pass_at_")) or key == "accuracy" or key.endswith("reward"):
        return "score"
    if key == "registers":
        return "registers"
    if key.endswith("_instructions") or key.startswith("instructions_"):
        return "instructions"
    return None


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _measurements(row: dict, prefix: str = ""):
    """(dotted name, value) of every field of ``row`` (nested dicts included) whose name has a unit and whose
    value is a number or None (a quantity not measured on this device)."""
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _measurements(value, name + ".")
        elif unit_of(name) and (value is None or _is_number(value)):
            yield name, value


def results_of(rows: list[dict]) -> list[dict]:
    """Schema 1's ``results`` for ``rows``: one {name, value, unit, case} per measurement (module docstring),
    in row order; ``case`` holds the row's top-level scalar fields that are not measurements."""
    results = []
    for row in rows:
        measured = dict(_measurements(row))
        case = {k: v for k, v in row.items() if _is_scalar(v) and k not in measured}
        results += [{"name": name, "value": value, "unit": unit_of(name), "case": case}
                    for name, value in measured.items()]
    return results


def make_record(kind: str, rows: list[dict], *, date: str, commit: str | None, command: str | None,
                device: dict, config: dict | None = None) -> dict:
    """A schema-1 record (module docstring) of ``rows`` measured on ``device`` ({"name": ..., ...})."""
    if not kind or any(ch in kind for ch in "/\\ "):
        raise ValueError(f"kind must be a non-empty file-name stem without slashes or spaces, got {kind!r}")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError("rows must be a list of dicts")
    if not isinstance(device, dict) or "name" not in device:
        raise ValueError(f"device must be a dict with a 'name', got {device!r}")
    return {"schema": SCHEMA, "kind": kind, "date": date, "commit": commit, "command": command,
            "device": device, "config": dict(config or {}), "results": results_of(rows), "rows": rows}


def record(name: str, rows: list[dict], config: dict | None = None) -> Path:
    """Write ``rows`` (one dict per measured case, json-serialisable) as a schema-1 record of kind ``name``
    to RESULTS_DIR/<name>-<utc time>.json (the module docstring says where that is); returns its path.

    The record also holds the UTC date, the git commit, the command line, the device and ``config``
    (settings shared by every row)."""
    now = datetime.now(timezone.utc)
    info = device_info()
    device = {"name": info.pop("device", info.get("cpu")), **info}
    payload = make_record(name, rows, date=now.isoformat(timespec="seconds"), commit=git_commit(),
                          command=current_command(), device=device, config=config)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def convert(data: dict, source: str = "record") -> dict:
    """Any benchmark record as schema 1: a schema-1 record as it is; an older ``_record`` file ({name, date,
    commit, device fields at the top, rows}) or bench/sm90_static.py's ({name, date, target, triton, sizes,
    kernels}) converted, every field kept (unknown top-level fields go to ``config``). Anything else (e.g.
    an analysis written by bench/study_report.py) is a ValueError naming ``source``."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: not a benchmark record (a json object with 'schema' or 'rows')")
    if "schema" in data:
        if data["schema"] != SCHEMA:
            raise ValueError(f"{source}: schema {data['schema']!r}, this reader knows schema {SCHEMA}")
        return data
    if isinstance(data.get("rows"), list) and "name" in data:
        known = {"name", "date", "commit", "rows", *DEVICE_FIELDS}
        device = {"name": data.get("device", data.get("cpu", "unknown"))}
        device.update({k: data[k] for k in DEVICE_FIELDS[1:] if k in data})
        config = {k: v for k, v in data.items() if k not in known}
        return make_record(data["name"], data["rows"], date=data.get("date"), commit=data.get("commit"),
                           command=None, device=device, config=config)
    if isinstance(data.get("kernels"), list) and "target" in data:
        device = {"name": data["target"], **({"triton": data["triton"]} if "triton" in data else {})}
        config = {k: v for k, v in data.items() if k not in {"name", "date", "target", "triton", "kernels"}}
        return make_record(data.get("name", "sm90-static"), data["kernels"], date=data.get("date"),
                           commit=data.get("commit"), command=None, device=device, config=config)
    raise ValueError(f"{source}: not a benchmark record (no 'schema', 'rows' or 'kernels'; e.g. an analysis "
                     "written by bench/study_report.py)")


def load_record(path: str | Path) -> dict:
    """The record in the json file ``path``, as schema 1 (``convert``); the file is not changed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not json ({err})") from None
    return convert(data, source=str(path))


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
