"""Branch prefix caches: turn branch points inside rollouts into ready-to-decode batches, with no prefill.

A branch k re-samples rollout ``src[k]`` from position ``pos[k]``: its prefix is ``tokens[src[k], :pos[k]]``
(``:pos[k] + 1`` with ``include_token=True``, the authors' code). The policy's forward pass over the
right-padded rollouts already holds every prefix's keys and values, so continuation decoding starts from

    batch = build_branch_batch(tokens, lengths, src, pos, pad_id=pad_id)          # [K, P] left-padded
    cache = gather_prefix_kv(out.past_key_values, src, pos)                      # [K, H, P - 1, D] per layer
    logits = model(input_ids=batch.input_ids[:, -1:], attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids[:, -1:], past_key_values=cache).logits

The cache holds every prefix token except the last one, which the first decode step feeds: one token per
branch, zero tokens of prefill. Further steps append a column of ones to the attention mask and continue
the position ids by one.

The gather runs in the C++/CUDA extension ``appo._C`` (op ``torch.ops.appo.gather_prefix_kv``, all layers in
one call) when it is loaded; :func:`gather_kv_reference` is the pure-torch oracle. ``EXTENSION_STATUS`` says
what loaded and which ops fall back.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

IMPLS = ("auto", "cpp", "cuda", "torch")


def _load_extension() -> tuple[bool, bool, str]:
    """Load ``appo._C``: the module built at install time when there is one, else the copy
    ``appo._extension`` compiles on first use into a cache. Returns (loaded, has_cuda_kernel, status line).
    Loading the library registers torch.ops.appo.*."""
    try:
        from appo import _C  # noqa: F401
        origin = "prebuilt"
    except ImportError as err:
        from appo._extension import load_or_build

        loaded, origin = load_or_build()
        if not loaded:
            return False, False, (f"appo._C not loaded (no prebuilt module: {err}; {origin}); "
                                  "gather_prefix_kv falls back to the torch reference on every device")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("appo::gather_prefix_kv", "CUDA")
    cuda_part = ("CUDA kernel built" if has_cuda else
                 "CUDA kernel not built, so CUDA tensors fall back to the torch reference")
    return True, has_cuda, f"appo._C loaded ({origin}): gather_prefix_kv has a C++ CPU kernel; {cuda_part}"


@functools.cache
def extension_state() -> tuple[bool, bool, str]:
    """``(loaded, has_cuda_kernel, status)`` of ``appo._C``, loading (or building) it on the first call, not
    at import: importing appo.prefix_cache, or anything that imports it, compiles nothing. The module
    attributes ``EXTENSION_LOADED``, ``EXTENSION_HAS_CUDA`` and ``EXTENSION_STATUS`` read it."""
    loaded, has_cuda, status = _load_extension()
    if loaded:
        @torch.library.register_fake("appo::gather_prefix_kv")
        def _gather_prefix_kv_fake(keys, values, src, length, out_len):
            branches = src.shape[0]
            key_out = [x.new_empty(branches, x.shape[1], out_len, x.shape[3]) for x in keys]
            value_out = [x.new_empty(branches, x.shape[1], out_len, x.shape[3]) for x in values]
            return key_out, value_out
    return loaded, has_cuda, status


_STATE_NAMES = ("EXTENSION_LOADED", "EXTENSION_HAS_CUDA", "EXTENSION_STATUS")


def __getattr__(name: str):
    if name in _STATE_NAMES:
        return extension_state()[_STATE_NAMES.index(name)]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class BranchBatch:
    """K branch prefixes as a left-padded batch (all int64, on the rollouts' device).

    input_ids       [K, P]  prefix tokens, left-padded with ``pad_id``
    attention_mask  [K, P]  1 on prefix tokens, 0 on padding
    position_ids    [K, P]  0, 1, ... on prefix tokens (sequence positions in the rollout), 0 on padding
    prefix_lengths  [K]     tokens in each prefix (P = max)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prefix_lengths: torch.Tensor


def _as_index(name: str, value, device: torch.device) -> torch.Tensor:
    """A 1-D int64 tensor from a sequence or an integer tensor on ``device`` (ValueError naming ``name``)."""
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value, dtype=torch.int64, device=device)
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name}: on {value.device}, but the rollouts/caches are on {device}")
    return value.long()


def prefix_lengths(src, pos, *, rollouts: int, limits: torch.Tensor, include_token: bool = False,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate branch points and return ``(src, pos, prefix_lengths)`` as int64 [K] tensors on ``device``.

    ``limits`` int64 [R]: valid tokens per rollout; ``pos[k]`` must lie in [0, limits[src[k]]) and
    ``src[k]`` in [0, rollouts). The prefix length is ``pos + include_token``; an empty prefix (pos = 0
    without the token) has nothing to continue from and is a ValueError naming ``pos``.
    """
    device = torch.device(device)
    src, pos = _as_index("src", src, device), _as_index("pos", pos, device)
    if src.numel() == 0:
        raise ValueError("src: no branch points (K = 0)")
    if pos.shape != src.shape:
        raise ValueError(f"pos: shape {tuple(pos.shape)} differs from src's {tuple(src.shape)}")
    if bool(((src < 0) | (src >= rollouts)).any()):
        raise ValueError(f"src: values must lie in [0, {rollouts}), got {src.tolist()}")
    bound = limits.to(device)[src]
    bad = (pos < 0) | (pos >= bound)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise ValueError(f"pos: pos[{k}] = {int(pos[k])} is outside [0, {int(bound[k])}) for rollout "
                         f"{int(src[k])}")
    if not include_token and bool((pos == 0).any()):
        raise ValueError("pos: pos = 0 with include_token=False gives an empty prefix "
                         "(nothing to continue from)")
    return src, pos, pos + int(include_token)


def build_branch_batch(tokens: torch.Tensor, lengths: torch.Tensor, src, pos, *, pad_id: int,
                       include_token: bool = False) -> BranchBatch:
    """The K branch prefixes ``tokens[src[k], :pos[k] (+1)]`` as a left-padded batch.

    tokens int64 [R, T] right-padded rollouts; lengths int64 [R] valid tokens per row; src, pos int [K]
    (tensors on the tokens' device, or sequences). Returns a :class:`BranchBatch` of int64 [K, P] tensors,
    P = the longest prefix, whose position ids continue each rollout's positions exactly.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError("tokens: expected an int64 tensor [R, T]")
    if tokens.dtype != torch.int64:
        raise ValueError(f"tokens: expected int64, got {tokens.dtype}")
    if not isinstance(lengths, torch.Tensor) or lengths.shape != tokens.shape[:1]:
        raise ValueError(f"lengths: expected a tensor [R] = [{tokens.shape[0]}]")
    if lengths.device != tokens.device:
        raise ValueError(f"lengths: on {lengths.device}, but tokens are on {tokens.device}")
    if bool(((lengths < 0) | (lengths > tokens.shape[1])).any()):
        raise ValueError(f"lengths: values must lie in [0, {tokens.shape[1]}]")
    src, pos, length = prefix_lengths(src, pos, rollouts=tokens.shape[0], limits=lengths.long(),
                                      include_token=include_token, device=tokens.device)
    longest = int(length.max())
    # Column j of row k holds rollout position j - (P - L_k); negative positions are padding.
    positions = torch.arange(longest, device=tokens.device)[None, :] - (longest - length)[:, None]
    real = positions >= 0
    position_ids = positions.clamp(min=0) * real
    input_ids = torch.where(real, tokens[src[:, None], position_ids], torch.full_like(position_ids, pad_id))
    return BranchBatch(input_ids=input_ids, attention_mask=real.long(), position_ids=position_ids,
                       prefix_lengths=length)


def gather_kv_reference(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], src: torch.Tensor,
                        length: torch.Tensor, out_len: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pure-torch oracle of ``torch.ops.appo.gather_prefix_kv`` (a per-layer, per-branch slice loop).

    For every cache X [R, H, T, D] returns Y [K, H, out_len, D] (X's dtype/device, zero padding) with
    ``Y[k, :, out_len - length[k]:] = X[src[k], :, :length[k]]``. Moves, per layer, K * H * out_len * D
    zero writes plus 2 * sum(length) * H * D element reads/writes.
    """
    sources, counts = src.tolist(), length.tolist()

    def gather_one(cache: torch.Tensor) -> torch.Tensor:
        out = cache.new_zeros(len(sources), cache.shape[1], out_len, cache.shape[3])
        for k, (row, count) in enumerate(zip(sources, counts)):
            if count > 0:
                out[k, :, out_len - count:] = cache[row, :, :count]
        return out

    return [gather_one(x) for x in keys], [gather_one(x) for x in values]


def _choose_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    loaded, has_cuda, status = extension_state()
    if impl == "auto":
        if loaded and (device.type == "cpu" or (device.type == "cuda" and has_cuda)):
            return "cpp" if device.type == "cpu" else "cuda"
        return "torch"
    if impl == "cpp" and not (loaded and device.type == "cpu"):
        raise RuntimeError(f"impl='cpp' cannot run on {device} tensors: {status}")
    if impl == "cuda" and not (has_cuda and device.type == "cuda"):
        raise RuntimeError(f"impl='cuda' cannot run on {device} tensors: {status}")
    return impl


def gather_kv(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], src: torch.Tensor,
              length: torch.Tensor, out_len: int, *, impl: str = "auto"
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Left-padded gather of all layers in one call; same contract as :func:`gather_kv_reference`.

    keys/values: per layer [R, H, T, D] (one dtype and device); src, length int64 [K] on that device, already
    validated (see :func:`gather_prefix_kv` for the checked entry point; the C++ op checks them again, the
    CUDA op on the device, where a bad index is a device-side assert, never an out-of-bounds access).
    impl: "auto" (the extension when loaded for the device, else torch), "cpp", "cuda" or "torch". The CUDA
    op copies no host data per call (its descriptors are a kernel parameter), so it can be captured in a
    CUDA graph (``torch.compile(mode="reduce-overhead")``) and replayed with new src/length values.
    """
    chosen = _choose_impl(impl, keys[0].device)
    if chosen == "torch":
        return gather_kv_reference(keys, values, src, length, out_len)
    key_out, value_out = torch.ops.appo.gather_prefix_kv(list(keys), list(values), src, length, out_len)
    return list(key_out), list(value_out)


def release_cached_memory() -> int:
    """Free the output blocks the C++ CPU op keeps for its next calls; returns the bytes released.

    When a gathered output is freed, the CPU op keeps its memory (up to 1 GiB in all) so that the next gather
    reuses memory that is already paged in. Returns 0 when the extension is not loaded or holds nothing.
    """
    return int(torch.ops.appo.release_cached_memory()) if extension_state()[0] else 0


def _cache_layers(past_key_values) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer keys and values of a DynamicCache or a sequence of (key, value) pairs, checked."""
    if hasattr(past_key_values, "layers"):
        pairs = [(layer.keys, layer.values) for layer in past_key_values.layers]
    elif isinstance(past_key_values, (list, tuple)):
        pairs = [tuple(pair)[:2] for pair in past_key_values]
    else:
        raise ValueError("past_key_values: expected a DynamicCache or a list of (key, value) per layer, got "
                         f"{type(past_key_values).__name__}")
    if not pairs or any(not isinstance(x, torch.Tensor) for pair in pairs for x in pair):
        raise ValueError("past_key_values: every layer needs key and value tensors")
    # Branches are sampled, never differentiated: detach, so that a cache from the training forward (with
    # grad) neither keeps its graph alive nor meets the extension's missing autograd kernel.
    keys, values = [k.detach() for k, _ in pairs], [v.detach() for _, v in pairs]
    first = keys[0]
    for x in keys + values:
        if x.dim() != 4:
            raise ValueError(f"past_key_values: layers must be [R, H, T, D], got shape {tuple(x.shape)}")
        if x.dtype != first.dtype or x.device != first.device:
            raise ValueError(f"past_key_values: layers mix {x.dtype}/{x.device} with "
                             f"{first.dtype}/{first.device}")
        if x.shape[0] != first.shape[0] or x.shape[2] != first.shape[2]:
            raise ValueError(f"past_key_values: layers disagree on [R, T]: {tuple(x.shape)} vs "
                             f"{tuple(first.shape)}")
    return keys, values


def _make_dynamic_cache(keys: list[torch.Tensor], values: list[torch.Tensor], room: int = 0):
    """A transformers DynamicCache over the tensors: wrapping them as they are (room = 0, no copy) or copied
    once into storage with ``room`` free positions per layer that decoding appends into in place."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache()
    for key, value in zip(keys, values):
        if room > 0:
            cache.layers.append(_reserved_layer_class()(key, value, room))
            continue
        layer = DynamicLayer()
        layer.lazy_initialization(key, value)
        layer.keys, layer.values = key, value
        cache.layers.append(layer)
    return cache


def reserve_cache(past_key_values, room: int):
    """A DynamicCache holding the same keys/values with ``room`` free positions per layer.

    transformers' DynamicLayer concatenates the whole cache with each new token (at K = 12 branches of a
    512-token SmolLM2 prefix that copy is about half of a CPU decode step); the returned layers append into
    preallocated storage instead (doubling it when full) and expose views [B, H, length, D] of it. Costs one
    copy of the cache. past_key_values: a DynamicCache or a list of (key, value) [B, H, T, D] per layer.
    """
    if not isinstance(room, int) or room < 0:
        raise ValueError(f"room: expected an int >= 0, got {room!r}")
    keys, values = _cache_layers(past_key_values)
    return _make_dynamic_cache(keys, values, room)


_RESERVED_LAYER = None


def _reserved_layer_class():
    """ReservedLayer, defined on first use: importing appo.prefix_cache does not import transformers."""
    global _RESERVED_LAYER
    if _RESERVED_LAYER is not None:
        return _RESERVED_LAYER
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A DynamicLayer whose keys/values are views of storage with free room at the end (reserve_cache).

        Methods that replace ``keys``/``values`` (crop, reorder, ...) are inherited; the next update notices
        and re-seeds the storage from the replaced tensors.
        """

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
            super().__init__()
            self.lazy_initialization(keys, values)
            self._seed(keys, values, room)

        def _seed(self, keys, values, room):
            self._key_store = keys.new_empty(*keys.shape[:2], keys.shape[2] + room, keys.shape[3])
            self._value_store = values.new_empty(*values.shape[:2], values.shape[2] + room, values.shape[3])
            self._length = keys.shape[2]
            self._key_store[:, :, :self._length] = keys
            self._value_store[:, :, :self._length] = values
            self._expose()

        def _expose(self):
            self.keys = self._key_store[:, :, :self._length]
            self.values = self._value_store[:, :, :self._length]

        def update(self, key_states, value_states, *args, **kwargs):
            if self.keys.data_ptr() != self._key_store.data_ptr() or self.keys.shape[2] != self._length:
                self._seed(self.keys, self.values, key_states.shape[2])  # keys were replaced from outside
            end = self._length + key_states.shape[2]
            if end > self._key_store.shape[2]:  # out of room: double the storage
                self._seed(self.keys, self.values, max(end, 2 * self._key_store.shape[2]) - self._length)
            self._key_store[:, :, self._length:end] = key_states
            self._value_store[:, :, self._length:end] = value_states
            self._length = end
            self._expose()
            return self.keys, self.values

    _RESERVED_LAYER = ReservedLayer
    return ReservedLayer


def gather_prefix_kv(past_key_values, src, pos, *, include_token: bool = False,
                     lengths: torch.Tensor | None = None, room: int = 0, impl: str = "auto"):
    """The K branches' caches, left-padded to match :func:`build_branch_batch`, as a ``DynamicCache``.

    past_key_values: the DynamicCache (or list of (key, value)) of a forward over the R right-padded
    rollouts, per layer [R, H, T, D], any float dtype. src, pos int [K] on the cache's device (or sequences).
    lengths: optional int64 [R] rollout lengths; when given, ``pos[k] < lengths[src[k]]`` is checked (else
    ``pos[k] < T``). Returns per layer keys/values [K, H, P - 1, D] (contiguous, the cache's dtype): each
    prefix's keys/values for all its tokens except the last, right-aligned, zeros on the left, detached from
    autograd. room > 0 returns them in layers that append the next ``room`` decoded tokens in place (see
    reserve_cache).
    """
    if not isinstance(room, int) or room < 0:
        raise ValueError(f"room: expected an int >= 0, got {room!r}")
    keys, values = _cache_layers(past_key_values)
    rollouts, cached = keys[0].shape[0], keys[0].shape[2]
    device = keys[0].device
    if lengths is None:
        limits = torch.full((rollouts,), cached, dtype=torch.int64, device=device)
    else:
        if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1:
            raise ValueError("lengths: expected a 1-D int64 tensor [R]")
        if lengths.shape[0] != rollouts:
            raise ValueError(f"past_key_values: holds {rollouts} rollouts but lengths has {lengths.shape[0]}")
        if lengths.device != device:
            raise ValueError(f"lengths: on {lengths.device}, but the caches are on {device}")
        if bool((lengths > cached).any()):
            raise ValueError(f"past_key_values: holds {cached} positions but lengths reaches "
                             f"{int(lengths.max())}")
        limits = lengths.long()
    src, pos, length = prefix_lengths(src, pos, rollouts=rollouts, limits=limits, include_token=include_token,
                                      device=device)
    out_len = int(length.max()) - 1
    key_out, value_out = gather_kv(keys, values, src, length - 1, out_len, impl=impl)
    return _make_dynamic_cache(key_out, value_out, room)
