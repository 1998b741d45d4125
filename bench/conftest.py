import os
import sys

import torch

# bench/ modules import the shared recorder as `from _record import record`.
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, Triton kernels can only run on the CPU interpreter (set before any @triton.jit is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
