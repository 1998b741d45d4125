"""Argument checks shared by the ops' public entries (each argument is checked once, at the entry; the
backends behind it, torch references and Triton kernels, check nothing)."""

from __future__ import annotations

import os

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IMPLS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA with triton installed, else "torch". An explicit backend that cannot run
    here is refused (RuntimeError naming impl): "triton" needs CUDA, or the CPU under TRITON_INTERPRET=1."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton': the triton package is not installed (pip install triton)")
        interpreted = os.environ.get("TRITON_INTERPRET") == "1" and device.type == "cpu"
        if device.type != "cuda" and not interpreted:
            raise RuntimeError(
                f"impl='triton' needs CUDA tensors (got device {device}); use impl='torch' or 'auto', "
                "or set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU interpreter")
    return impl


def check_float(name: str, tensor: Tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected dtype float32, bfloat16 or float16, got {tensor.dtype}")


def check_tokens(tokens: Tensor | None, shape: torch.Size, vocab: int, shape_of: str) -> Tensor:
    """Integer ids of ``shape`` in [0, vocab) (min/max: one device sync) -> int64 tokens."""
    if tokens is None:
        raise ValueError("tokens: required (the sampled token at each position)")
    if not isinstance(tokens, Tensor):
        raise ValueError(f"tokens: expected a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens: expected an integer dtype, got {tokens.dtype}")
    if tokens.shape != shape:
        raise ValueError(f"tokens: shape {tuple(tokens.shape)} does not match {shape_of} {tuple(shape)} "
                         f"(one token per row of {shape_of})")
    if tokens.numel() > 0:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"tokens: ids must lie in [0, {vocab}) (the vocabulary size), "
                             f"got range [{low}, {high}]")
    return tokens.long()


def check_temperature(temperature) -> float:
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature: must be a positive finite number, got {temperature!r}") from None
    if not 0.0 < value < float("inf"):
        raise ValueError(f"temperature: must be a positive finite number, got {temperature!r}")
    return value


def check_same_device(**tensors: Tensor | None) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name}: on device {device}, but {first_name} is on {first}")
    return first


def check_finite_stats(logprobs: Tensor, entropy: Tensor, source: str) -> None:
    """Turn non-finite statistics into errors (no extra pass over the logits: the backends propagate them).

    -inf logits are allowed (masked vocabulary entries have probability 0). The entropy is NaN when a row
    holds NaN or +inf, or no finite logit at all; the log-prob is -inf when the sampled token's logit is -inf.
    """
    bad_rows = ~torch.isfinite(entropy)
    if bad_rows.any():
        where = tuple(int(i) for i in bad_rows.nonzero()[0])
        raise ValueError(f"{source}: contains NaN or +inf, or a row whose logits are all -inf (first at "
                         f"position {where}): the token statistics came out non-finite")
    bad_tokens = ~torch.isfinite(logprobs)
    if bad_tokens.any():
        where = tuple(int(i) for i in bad_tokens.nonzero()[0])
        raise ValueError(f"tokens: the sampled token at position {where} has logit -inf (probability 0 under "
                         f"the given {source}), so its log-probability is -inf")
