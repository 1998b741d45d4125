"""Tool latency: what one tool call costs the rollout loop (CPU only; tools never touch the GPU).

Run: ``pytest bench/bench_tools.py --benchmark-only -s``. Cases: one sandboxed Python call (process start,
namespaces, rlimits, privilege drop, run, teardown), a batch of 8 calls through ``run_batch``, one calculator
call, one BM25 search over the HotpotQA corpus (~470 passages). Each prints the median latency and calls per
second (the figure of merit here; no bytes or FLOPs to speak of). Rows go to bench/results/tools-<time>.json.
"""

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record  # noqa: E402

from appo.tasks import HotpotQA  # noqa: E402
from appo.tools import make_tools  # noqa: E402

RESULTS: list[dict] = []


@pytest.fixture(scope="module")
def tools():
    return make_tools(["python", "calculator", "search"])


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if RESULTS:
        print(f"\ntool results written to {record('tools', RESULTS)}")


def report(benchmark, case: str, calls_per_round: int) -> None:
    median = statistics.median(benchmark.stats.stats.data)
    RESULTS.append({"case": case, "median_s": median, "calls_per_s": calls_per_round / median})
    print(f"\n{case}: median {median * 1e3:.2f} ms per round, {calls_per_round / median:.1f} calls/s")


def test_python_call(benchmark, tools):
    result = benchmark.pedantic(tools["python"].run, args=("sum(i * i for i in range(1000))",), rounds=10)
    assert result == "332833500"
    report(benchmark, "python_sandbox_call", 1)


def test_python_batch_of_8(benchmark, tools):
    codes = [f"print({i} ** 3)" for i in range(8)]
    results = benchmark.pedantic(tools["python"].run_batch, args=(codes,), rounds=5)
    assert results == [str(i ** 3) for i in range(8)]
    report(benchmark, "python_sandbox_batch8", 8)


def test_calculator_call(benchmark, tools):
    assert benchmark(tools["calculator"].run, "(17 * 23 - 45) / 2 + sqrt(144)") == "185"
    report(benchmark, "calculator_call", 1)


def test_search_call(benchmark, tools):
    question = HotpotQA().examples("dev")[3].question
    assert benchmark(tools["search"].run, question).count("\n\n") == 2
    report(benchmark, "search_call_hotpotqa", 1)
