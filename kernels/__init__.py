"""Triton kernels of appo, installed as ``appo.kernels`` (never as a top-level ``kernels`` module).

Each file holds one op: the ``@triton.jit`` kernel(s), a launcher that takes torch tensors, and (where the op
has a backward) its ``torch.autograd.Function``. The torch reference of each op lives in ``appo/ops/`` under
the same file name and is the test oracle.
"""
