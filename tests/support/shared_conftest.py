"""The pytest setup that tests/ and bench/ share: tests/conftest.py and bench/conftest.py import it (so that
pytest finds its hook and fixture in each of them), which runs it once per session before any test module.

- The environment, set before anything defines a Triton kernel or reaches the Hugging Face hub.
- The markers: ``gpu`` tests skip without CUDA, ``data`` tests without this project's data files.
- ``appo_data_dir``: the data folder, the only way a test reaches the project's data ($APPO_DATA_DIR).
"""

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton kernels run on the CPU interpreter. It must be chosen before any @triton.jit
# function is defined (importing torch defines none). On a CUDA machine the kernels compile for the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests and benchmarks never reach the network: a hub lookup fails at once instead of retrying for 30 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DATA_FILES = ("gsm8k/train.jsonl", "hotpotqa/dev_distractor_50.jsonl")
DATA_REASON = ("needs this project's GSM8K / HotpotQA files: set APPO_DATA_DIR to a folder with "
               "gsm8k/train.jsonl and hotpotqa/dev_distractor_50.jsonl (.ci/run sets it when ../shared/data "
               "exists)")


def project_data_dir() -> Path | None:
    """The folder $APPO_DATA_DIR names, when it holds both data files; else None. The only way tests reach
    the project's data (a bare clone has none, and its tests skip the ones marked ``data``)."""
    configured = os.environ.get("APPO_DATA_DIR")
    if not configured:
        return None
    path = Path(configured)
    return path if all((path / name).is_file() for name in DATA_FILES) else None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_data = pytest.mark.skip(reason=DATA_REASON)
    has_data = project_data_dir() is not None
    for item in items:
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if item.get_closest_marker("data") and not has_data:
            item.add_marker(skip_data)


@pytest.fixture
def appo_data_dir() -> Path:
    """This project's data folder ($APPO_DATA_DIR); the test skips when it is not set (see DATA_REASON)."""
    path = project_data_dir()
    if path is None:
        pytest.skip(DATA_REASON)
    return path
