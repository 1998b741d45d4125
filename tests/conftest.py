import os
from pathlib import Path

import torch

# Without a GPU, the Triton kernels run on the CPU interpreter. It must be chosen before any @triton.jit
# function is defined (importing torch defines none). On a CUDA machine the kernels compile for the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never reach the network: a Hugging Face hub lookup fails at once instead of retrying for 30 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

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
    files = (path / "gsm8k" / "train.jsonl", path / "hotpotqa" / "dev_distractor_50.jsonl")
    return path if all(f.is_file() for f in files) else None


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


@pytest.fixture
def seeded():
    """A seeded CPU generator (torch's global RNG seeded too) for reproducible random inputs."""
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)
