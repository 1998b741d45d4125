import os

import torch

# Without a GPU, the Triton kernels run on the CPU interpreter. It must be chosen before any @triton.jit
# function is defined (importing torch defines none). On a CUDA machine the kernels compile for the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def seeded():
    """A seeded CPU generator (torch's global RNG seeded too) for reproducible random inputs."""
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)
