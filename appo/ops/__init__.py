"""The ops of appo's scoring, one file each: the public entry, the only checks of its arguments and the torch
reference (the test oracle, and the backend off CUDA). Each op's Triton backend has the same file name in
``kernels/`` (installed as ``appo.kernels``) and is imported only when chosen, so that the core install and
the CPU path never import triton. ``appo.token_stats`` and ``appo.future_value`` are the entries of
``token_stats.py`` (with ``linear_token_stats.py`` for the LM-head form) and ``future_value.py``; see
docs/kernels.md.
"""
