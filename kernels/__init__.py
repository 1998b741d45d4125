"""Triton kernels of appo, installed as ``appo.kernels`` (never as a top-level ``kernels`` module).

Each file is the Triton backend of one op: the ``@triton.jit`` kernel(s), a launcher that takes torch tensors
and (where the op has a backward) its ``torch.autograd.Function``. The launchers check nothing: each op's
home, under the same file name in ``appo/ops/``, holds its public entry, the checks of its arguments and the
torch reference the kernel is tested against. ``_online_softmax.py`` holds the ``@triton.jit`` helpers that
several kernels share. Layout, the sm_90 record and the speed predictions: docs/kernels.md.
"""
