"""The benchmarks' pytest setup: what tests/ and bench/ share (the environment, the gpu/data markers) comes
from tests/support/shared_conftest.py; here only ``--results-dir``, where bench/_record.py writes.

pyproject's pytest ``pythonpath`` puts bench/ and tests/support/ on the import path: the benchmarks import
``_record`` and the installed ``appo``, and edit no import path themselves."""

from pathlib import Path

import _record
from shared_conftest import pytest_collection_modifyitems  # noqa: F401 (read by pytest)


def pytest_addoption(parser):
    parser.addoption("--results-dir", default=None,
                     help="folder for the json results of bench/_record.py (default: $APPO_BENCH_RESULTS, "
                          "else .benchmarks/appo in the repository, ignored by git)")


def pytest_configure(config):
    folder = config.getoption("--results-dir")
    if folder:
        _record.RESULTS_DIR = Path(folder).resolve()
