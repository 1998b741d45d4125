"""Tool latency: what one tool call costs the rollout loop (CPU only; tools never touch the GPU).

Run: ``pytest bench/bench_tools.py --benchmark-only -s``. Needs no data (the search corpus is generated).
Cases: one sandboxed Python call (bubblewrap start, namespaces, seccomp, cgroup, privilege drop, interpreter
start, run, teardown), a batch of 8 calls through ``run_batch``, one calculator call (worker round trip), one
BM25 search over a 500-passage corpus. Each prints the median latency per round and calls per second (the
figure of merit here; no bytes or FLOPs to speak of) and, for the Python tool, the ratio to its budget: 1.5x
the 166 ms per call measured before the sandbox was rebuilt on bubblewrap (issue 12). Rows are recorded
through bench/_record.py.
"""

import random
import statistics

import pytest
from _record import record

from appo.tools import make_tools
from appo.tools.sandbox.cgroups import layout

PYTHON_BUDGET_S = 1.5 * 0.166
RESULTS: list[dict] = []


def synthetic_corpus(passages: int = 500, seed: int = 0) -> list[dict]:
    """``passages`` {title, text} of 40-80 words drawn from a 2,000-word vocabulary (deterministic)."""
    rng = random.Random(seed)
    vocabulary = [f"w{i}{'abcdefghij'[i % 10]}" for i in range(2000)]
    return [{"title": f"Passage {i}", "text": " ".join(rng.choices(vocabulary, k=rng.randint(40, 80)))}
            for i in range(passages)]


@pytest.fixture(scope="module")
def tools():
    return make_tools(["python", "calculator", "search"], search={"corpus": synthetic_corpus()})


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if RESULTS:
        print(f"\ntool results written to {record('tools', RESULTS)}")


def report(benchmark, case: str, calls_per_round: int, **extra) -> None:
    median = statistics.median(benchmark.stats.stats.data)
    row = {"case": case, "median_s": median, "calls_per_s": calls_per_round / median, **extra}
    RESULTS.append(row)
    notes = "".join(f", {key} {value}" for key, value in extra.items())
    print(f"\n{case}: median {median * 1e3:.2f} ms per round, {calls_per_round / median:.1f} calls/s{notes}")


def sandbox_notes(tool) -> dict:
    found = layout()
    return {"confinement": tool.confinement.mode if tool.confinement else "unconfined",
            "budget": f"cgroup {found[0]}: {', '.join(sorted(found[1]))}" if found else "per-process bounds",
            "load_1min": float(open("/proc/loadavg").read().split()[0])}


def test_python_call(benchmark, tools):
    tool = tools["python"]
    benchmark.pedantic(tool.run, args=("sum(i * i for i in range(1000))",), rounds=10, warmup_rounds=1)
    median = statistics.median(benchmark.stats.stats.data)
    report(benchmark, "python_sandbox_call", 1, budget_ratio=round(median / PYTHON_BUDGET_S, 3),
           **sandbox_notes(tool))


def test_python_batch_of_8(benchmark, tools):
    tool = tools["python"]
    codes = [f"print({i} ** 3)" for i in range(8)]
    benchmark.pedantic(tool.run_batch, args=(codes,), rounds=5, warmup_rounds=1)
    median = statistics.median(benchmark.stats.stats.data)
    report(benchmark, "python_sandbox_batch8", 8, budget_ratio=round(median / 8 / PYTHON_BUDGET_S, 3),
           **sandbox_notes(tool))


def test_calculator_call(benchmark, tools):
    tools["calculator"].run("1")  # the worker is up
    benchmark(tools["calculator"].run, "(17 * 23 - 45) / 2 + sqrt(144)")
    report(benchmark, "calculator_call", 1)


def test_search_call(benchmark, tools):
    query = " ".join(synthetic_corpus()[3]["text"].split()[:12])
    benchmark(tools["search"].run, query)
    report(benchmark, "search_call_synthetic_500", 1)
