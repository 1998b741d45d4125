import os
import sys
from pathlib import Path

import pytest
import torch

# bench/ modules import the shared recorder as `from _record import record`.
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, Triton kernels can only run on the CPU interpreter (set before any @triton.jit is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Benchmarks never reach the network: a Hugging Face hub lookup fails at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DATA_REASON = ("needs this project's GSM8K / HotpotQA files: set APPO_DATA_DIR to a folder with "
               "gsm8k/train.jsonl and hotpotqa/dev_distractor_50.jsonl")


def pytest_addoption(parser):
    parser.addoption("--results-dir", default=None,
                     help="folder for the json results of bench/_record.py (default: $APPO_BENCH_RESULTS, "
                          "else .benchmarks/appo in the repository, ignored by git)")


def pytest_configure(config):
    folder = config.getoption("--results-dir")
    if folder:
        import _record

        _record.RESULTS_DIR = Path(folder).resolve()


def _has_data() -> bool:
    folder = os.environ.get("APPO_DATA_DIR")
    return bool(folder) and all((Path(folder) / f).is_file()
                                for f in ("gsm8k/train.jsonl", "hotpotqa/dev_distractor_50.jsonl"))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_data = pytest.mark.skip(reason=DATA_REASON)
    has_data = _has_data()
    for item in items:
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if item.get_closest_marker("data") and not has_data:
            item.add_marker(skip_data)
