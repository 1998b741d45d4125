"""Op-level tests of appo.prefix_cache and the extension appo._C (CPU; CUDA ones skip without a GPU)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from appo import prefix_cache as pc

REPO = Path(__file__).resolve().parents[1]
needs_extension = pytest.mark.skipif(not pc.EXTENSION_LOADED, reason=pc.EXTENSION_STATUS)

# Rollout lengths differ; the branch points cover every position class: pos 0 (with the token), pos 1, the
# last token of each row, several branches from one rollout, and the same branch twice.
LENGTHS = [11, 6, 9]
SRC = [0, 0, 1, 2, 1, 0, 2, 2, 2]
POS = [0, 1, 5, 8, 1, 10, 3, 3, 1]


def random_cache(layers=3, rollouts=3, heads=3, time=11, head_dim=7, dtype=torch.float32,
                 layout="contiguous"):
    """Per-layer (key, value) pairs [R, H, T, D] of random values (never zero), optionally non-contiguous."""
    def one():
        if layout == "time_major":  # [R, T, H, D] memory viewed as [R, H, T, D], as projections produce
            return torch.randn(rollouts, time, heads, head_dim, dtype=torch.float64).transpose(1, 2).to(dtype)
        return torch.randn(rollouts, heads, time, head_dim, dtype=torch.float64).to(dtype)
    return [(one(), one()) for _ in range(layers)]


def expected_branch_cache(cache, src, prefix_len, out_len):
    """Independent statement of the contract: zeros, then the first L - 1 positions of rollout src."""
    rows = []
    for row, length in zip(src, prefix_len):
        kept = cache[row, :, :length - 1]
        pad = cache.new_zeros(cache.shape[1], out_len - (length - 1), cache.shape[3])
        rows.append(torch.cat([pad, kept], dim=1))
    return torch.stack(rows)


def layer_tensors(dynamic_cache):
    return [t for layer in dynamic_cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("include_token", [False, True])
def test_reference_matches_the_contract(include_token):
    torch.manual_seed(1)
    cache = random_cache()
    src, pos = (SRC, POS) if include_token else (SRC[1:], POS[1:])
    out = pc.gather_prefix_kv(cache, src, pos, include_token=include_token, lengths=torch.tensor(LENGTHS),
                              impl="torch")
    prefix_len = [p + int(include_token) for p in pos]
    out_len = max(prefix_len) - 1
    for (key, value), layer in zip(cache, out.layers):
        assert torch.equal(layer.keys, expected_branch_cache(key, src, prefix_len, out_len))
        assert torch.equal(layer.values, expected_branch_cache(value, src, prefix_len, out_len))


@needs_extension
@pytest.mark.parametrize("include_token", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "time_major"])
def test_cpp_is_bitwise_equal_to_reference(include_token, dtype, layout):
    torch.manual_seed(2)
    cache = random_cache(dtype=dtype, layout=layout)
    src, pos = (SRC, POS) if include_token else (SRC[1:], POS[1:])
    lengths = torch.tensor(LENGTHS)
    got = pc.gather_prefix_kv(cache, src, pos, include_token=include_token, lengths=lengths, impl="cpp")
    want = pc.gather_prefix_kv(cache, src, pos, include_token=include_token, lengths=lengths, impl="torch")
    assert len(got.layers) == len(cache)
    for g, w in zip(layer_tensors(got), layer_tensors(want)):
        assert g.dtype == dtype and g.is_contiguous()
        assert g.shape == w.shape
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8))  # bitwise, NaN-safe


@needs_extension
def test_cpp_handles_layers_of_different_heads_and_a_single_token_prefix():
    torch.manual_seed(3)
    keys = [torch.randn(2, heads, 8, 5) for heads in (1, 4)]
    values = [torch.randn(2, heads, 8, 3) for heads in (1, 4)]
    src, length = torch.tensor([1, 0, 1]), torch.tensor([0, 7, 2])
    got = pc.gather_kv(keys, values, src, length, 7, impl="cpp")
    want = pc.gather_kv_reference(keys, values, src, length, 7)
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.equal(g, w)
    # Every prefix of one token: the gathered cache is empty and decoding feeds that token.
    empty = pc.gather_prefix_kv(list(zip(keys, values)), [0, 1], [0, 0], include_token=True, impl="cpp")
    assert [tuple(t.shape) for t in layer_tensors(empty)] == [(2, 1, 0, 5), (2, 1, 0, 3), (2, 4, 0, 5),
                                                              (2, 4, 0, 3)]


@needs_extension
def test_cpp_reuses_its_output_block_and_still_writes_every_byte():
    torch.manual_seed(9)
    keys = [torch.randn(3, 2, 40, 16) for _ in range(3)]
    values = [torch.randn(3, 2, 40, 16) for _ in range(3)]
    src, length = torch.tensor([2, 0, 1, 2]), torch.tensor([39, 5, 0, 17])
    want = pc.gather_kv_reference(keys, values, src, length, 39)
    pc.release_cached_memory()
    first = pc.gather_kv(keys, values, src, length, 39, impl="cpp")
    for out in first[0] + first[1]:
        out.fill_(float("nan"))  # the block goes back dirty
    del first, out
    second = pc.gather_kv(keys, values, src, length, 39, impl="cpp")  # reuses the dirty block
    for g, w in zip(second[0] + second[1], want[0] + want[1]):
        assert torch.equal(g, w)
    second[0][0].add_(1.0)  # outputs never share memory: writing one leaves the others intact
    assert torch.equal(second[0][0], want[0][0] + 1.0) and torch.equal(second[0][1], want[0][1])
    del second, g
    assert pc.release_cached_memory() >= 6 * 4 * 2 * 39 * 16 * 4
    assert pc.release_cached_memory() == 0


@pytest.mark.parametrize("impl", ["torch", pytest.param("cpp", marks=needs_extension)])
def test_caches_from_a_forward_with_grad_come_back_detached(impl, recwarn):
    torch.manual_seed(10)
    cache = [(k.requires_grad_(), v.requires_grad_()) for k, v in random_cache(layers=2)]
    out = pc.gather_prefix_kv([(k * 2, v * 2) for k, v in cache], SRC[1:], POS[1:], impl=impl)
    for got, (key, value) in zip(out.layers, cache):
        assert not got.keys.requires_grad and not got.values.requires_grad
        assert torch.equal(got.keys, expected_branch_cache(2 * key.detach(), SRC[1:], POS[1:], max(POS) - 1))
        want = expected_branch_cache(2 * value.detach(), SRC[1:], POS[1:], max(POS) - 1)
        assert torch.equal(got.values, want)
    assert not [w for w in recwarn if "autograd" in str(w.message)]


def test_build_branch_batch_by_hand():
    tokens = torch.tensor([[5, 6, 7, 8, 0],
                           [9, 10, 11, 0, 0]])
    lengths = torch.tensor([4, 3])
    batch = pc.build_branch_batch(tokens, lengths, [0, 1, 0], [3, 1, 1], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 9], [0, 0, 5]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 0]]
    assert batch.prefix_lengths.tolist() == [3, 1, 1]
    with_token = pc.build_branch_batch(tokens, lengths, [1, 0], [0, 3], pad_id=-1, include_token=True)
    assert with_token.input_ids.tolist() == [[-1, -1, -1, 9], [5, 6, 7, 8]]
    assert with_token.attention_mask.tolist() == [[0, 0, 0, 1], [1, 1, 1, 1]]
    assert with_token.position_ids.tolist() == [[0, 0, 0, 0], [0, 1, 2, 3]]
    assert with_token.prefix_lengths.tolist() == [1, 4]
    for name in ("input_ids", "attention_mask", "position_ids", "prefix_lengths"):
        assert getattr(batch, name).dtype == torch.int64


def test_branch_batch_and_cache_line_up():
    """The cache holds the batch's prefix minus its last token, right-aligned like the batch."""
    torch.manual_seed(4)
    tokens = torch.randint(1, 50, (3, 11))
    cache = random_cache()
    batch = pc.build_branch_batch(tokens, torch.tensor(LENGTHS), SRC[1:], POS[1:], pad_id=0)
    gathered = pc.gather_prefix_kv(cache, SRC[1:], POS[1:], lengths=torch.tensor(LENGTHS))
    keys = gathered.layers[0].keys
    assert keys.shape[2] == batch.input_ids.shape[1] - 1
    for k, (row, length) in enumerate(zip(SRC[1:], batch.prefix_lengths.tolist())):
        cached_positions = batch.position_ids[k, -length:-1]
        assert torch.equal(keys[k, :, keys.shape[2] - (length - 1):], cache[0][0][row][:, cached_positions])
        assert bool((keys[k, :, :keys.shape[2] - (length - 1)] == 0).all())


@pytest.mark.parametrize("src, pos, include_token, match", [
    ([0], [11], False, "pos"),          # beyond the rollout
    ([1], [6], True, "pos"),            # rollout 1 has 6 tokens
    ([0], [-1], True, "pos"),
    ([2, 0], [0, 3], False, "pos"),     # empty prefix
    ([3], [1], False, "src"),
    ([-1], [1], False, "src"),
    ([0, 1], [1], False, "pos"),        # shape mismatch
    ([], [], False, "src"),             # no branch
    (torch.tensor([0.0]), [1], False, "src"),  # float indices
])
def test_bad_branch_points_raise(src, pos, include_token, match):
    tokens = torch.zeros(3, 11, dtype=torch.int64)
    lengths = torch.tensor(LENGTHS)
    src = src if isinstance(src, torch.Tensor) else torch.tensor(src, dtype=torch.int64)
    pos = torch.tensor(pos, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        pc.build_branch_batch(tokens, lengths, src, pos, pad_id=0, include_token=include_token)
    with pytest.raises(ValueError, match=match):
        pc.gather_prefix_kv(random_cache(), src, pos, include_token=include_token, lengths=lengths)


def test_bad_caches_and_tensors_raise():
    cache = random_cache()
    lengths = torch.tensor(LENGTHS)
    with pytest.raises(ValueError, match="past_key_values"):   # a layer of another dtype
        pc.gather_prefix_kv(cache[:1] + [(cache[1][0].double(), cache[1][1].double())], [0], [1])
    with pytest.raises(ValueError, match="past_key_values"):   # batch disagrees with the rollouts
        pc.gather_prefix_kv(cache, [0], [1], lengths=torch.tensor([11, 6]))
    with pytest.raises(ValueError, match="past_key_values"):   # cache shorter than the rollouts
        pc.gather_prefix_kv([(k[:, :, :8], v[:, :, :8]) for k, v in cache], [0], [1], lengths=lengths)
    with pytest.raises(ValueError, match="past_key_values"):   # layers of different lengths
        pc.gather_prefix_kv(cache[:1] + [(cache[1][0][:, :, :5], cache[1][1][:, :, :5])], [0], [1])
    with pytest.raises(ValueError, match="past_key_values"):
        pc.gather_prefix_kv("not a cache", [0], [1])
    with pytest.raises(ValueError, match="src"):               # src on another device than the caches
        pc.gather_prefix_kv(cache, torch.tensor([0], device="meta"), torch.tensor([1]))
    with pytest.raises(ValueError, match="lengths"):
        pc.build_branch_batch(torch.zeros(3, 11, dtype=torch.int64), torch.tensor([11, 6]), [0], [1],
                              pad_id=0)
    with pytest.raises(ValueError, match="tokens"):
        pc.build_branch_batch(torch.zeros(3, 11), lengths, [0], [1], pad_id=0)
    with pytest.raises(ValueError, match="impl"):
        pc.gather_prefix_kv(cache, [0], [1], impl="triton")
    with pytest.raises(RuntimeError, match="impl='cuda'"):     # CPU tensors cannot run the CUDA kernel
        pc.gather_prefix_kv(cache, [0], [1], impl="cuda")


@needs_extension
def test_op_schema_and_fake_kernel_pass_opcheck():
    torch.manual_seed(5)
    keys = [torch.randn(3, 2, 9, 4) for _ in range(2)]
    values = [torch.randn(3, 2, 9, 4) for _ in range(2)]
    torch.library.opcheck(torch.ops.appo.gather_prefix_kv.default,
                          (keys, values, torch.tensor([2, 0, 2]), torch.tensor([3, 8, 0]), 8),
                          test_utils=("test_schema", "test_faketensor"))


@needs_extension
def test_torch_compile_traces_a_caller_in_one_graph():
    torch.manual_seed(6)
    keys = [torch.randn(3, 2, 9, 4) for _ in range(2)]
    values = [torch.randn(3, 2, 9, 4) for _ in range(2)]
    src, length = torch.tensor([2, 0, 2]), torch.tensor([3, 8, 0])

    def caller(keys, values, src, length):
        key_out, value_out = torch.ops.appo.gather_prefix_kv(keys, values, src, length, 8)
        return [k * 2 for k in key_out] + [v + 1 for v in value_out]

    compiled = torch.compile(caller, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(keys, values, src, length), caller(keys, values, src, length)):
        assert torch.equal(got, want)


def test_import_without_the_extension_falls_back(tmp_path):
    """With appo._C unimportable (and its on-first-use build off), appo.prefix_cache still imports, says so,
    and "auto" uses torch."""
    script = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'appo._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import warnings; warnings.simplefilter('error')\n"
        "import torch, appo\n"
        "from appo import prefix_cache as pc\n"
        "print(pc.EXTENSION_STATUS)\n"
        "cache = [(torch.randn(2, 1, 5, 3), torch.randn(2, 1, 5, 3))]\n"
        "out = pc.gather_prefix_kv(cache, [1], [4])\n"
        "assert torch.equal(out.layers[0].keys[0], cache[0][0][1, :, :3])\n"
        "try:\n"
        "    pc.gather_prefix_kv(cache, [1], [4], impl='cpp')\n"
        "except RuntimeError as err:\n"
        "    assert \"impl='cpp'\" in str(err)\n"
        "else:\n"
        "    raise AssertionError('impl=cpp ran without the extension')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "APPO_BUILD_EXTENSION": "0"})
    assert result.returncode == 0, result.stderr
    assert "not loaded" in result.stdout and "falls back to the torch reference" in result.stdout
    assert result.stderr == ""


def test_importing_loads_and_builds_nothing_until_the_gather_is_used(tmp_path):
    """Importing appo.prefix_cache (and the integrations that import it) compiles and loads nothing; the first
    gather tries. The install's prebuilt module is hidden so the first-use build path is the one taken; the
    build itself is switched off here (test_install's slow tests compile it in fresh venvs)."""
    script = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'appo._C': raise ImportError('hidden for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from appo import prefix_cache as pc\n"
        "import appo._extension as ext\n"
        "assert pc.extension_state.cache_info().currsize == 0, 'loaded at import'\n"
        "assert not ext.cache_root().exists(), 'built at import'\n"
        "print('imported', flush=True)\n"
        "cache = [(torch.randn(2, 1, 5, 3), torch.randn(2, 1, 5, 3))]\n"
        "out = pc.gather_prefix_kv(cache, [1], [4])\n"
        "assert pc.extension_state.cache_info().currsize == 1\n"
        "print(pc.EXTENSION_STATUS)\n"
    )
    env = {**os.environ, "APPO_CACHE": str(tmp_path / "cache"), "APPO_BUILD_EXTENSION": "0"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported\n") and "build is off" in result.stdout


def test_extension_status_names_what_loaded():
    assert "gather_prefix_kv" in pc.EXTENSION_STATUS
    if pc.EXTENSION_LOADED:
        assert "C++ CPU kernel" in pc.EXTENSION_STATUS


def _nvcc_include_flags():
    from torch.utils.cpp_extension import CUDA_HOME, include_paths

    cuda_home = CUDA_HOME or str(Path(os.path.realpath(shutil.which("nvcc"))).parents[1])
    flags = [f"-I{p}" for p in include_paths()] + [f"-I{Path(cuda_home) / 'include'}", f"-I{REPO / 'csrc'}"]
    # The CPU torch wheel ships the c10/cuda headers but not their one cmake-generated file
    # (c10/cuda/impl/cuda_cmake_macros.h, which on Linux only sets a Windows DLL-export switch). CUDAMacros.h
    # has a documented switch to skip it; everything else is compiled exactly as the CUDA build would.
    generated = Path(include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not generated.exists():
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def _real_nvcc():
    """The path of a working nvcc (a wrapper script on PATH counts when it runs), or None."""
    nvcc = shutil.which("nvcc")
    return nvcc if nvcc and subprocess.run([nvcc, "--version"], capture_output=True).returncode == 0 else None


@pytest.mark.slow
@pytest.mark.skipif(_real_nvcc() is None, reason="nvcc is not on this machine")
@pytest.mark.parametrize("source", sorted(p.name for p in (REPO / "csrc").glob("*.cu")))
def test_cuda_sources_compile_with_nvcc(source, tmp_path):
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    command = [_real_nvcc(), "-c", str(REPO / "csrc" / source), "-o", str(tmp_path / "out.o"), "-std=c++17",
               "-arch=sm_90", "-O2", "-DAPPO_WITH_CUDA=1", abi, "-diag-suppress=3306",
               "-Xcompiler=-Wno-c++20-extensions"] + _nvcc_include_flags()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out.o").stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "time_major"])
def test_cuda_is_bitwise_equal_to_reference(dtype, layout):
    if not pc.EXTENSION_HAS_CUDA:
        pytest.fail(f"the CUDA kernel is not built: {pc.EXTENSION_STATUS}")
    torch.manual_seed(7)
    cache = [(k.cuda(), v.cuda()) for k, v in random_cache(dtype=dtype, layout=layout, head_dim=9)]
    lengths = torch.tensor(LENGTHS, device="cuda")
    got = pc.gather_prefix_kv(cache, torch.tensor(SRC, device="cuda"), torch.tensor(POS, device="cuda"),
                              include_token=True, lengths=lengths, impl="cuda")
    want = pc.gather_prefix_kv(cache, torch.tensor(SRC, device="cuda"), torch.tensor(POS, device="cuda"),
                               include_token=True, lengths=lengths, impl="torch")
    for g, w in zip(layer_tensors(got), layer_tensors(want)):
        assert torch.equal(g, w)


@pytest.mark.gpu
def test_cuda_runs_on_the_current_stream_and_matches_a_large_bf16_case():
    if not pc.EXTENSION_HAS_CUDA:
        pytest.fail(f"the CUDA kernel is not built: {pc.EXTENSION_STATUS}")
    torch.manual_seed(8)
    cache = [(torch.randn(4, 4, 1031, 128, device="cuda", dtype=torch.bfloat16),
              torch.randn(4, 4, 1031, 128, device="cuda", dtype=torch.bfloat16)) for _ in range(3)]
    src = torch.randint(0, 4, (12,), device="cuda")
    pos = torch.randint(1, 1031, (12,), device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = pc.gather_prefix_kv(cache, src, pos, impl="cuda")
    stream.synchronize()
    want = pc.gather_prefix_kv(cache, src, pos, impl="torch")
    for g, w in zip(layer_tensors(got), layer_tensors(want)):
        assert torch.equal(g, w)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,dtype", [(128, torch.bfloat16), (64, torch.float32), (9, torch.float16)])
def test_cuda_strided_time_layout_matches_reference(head_dim, dtype):
    """Time-major caches take the row-by-row path (16-byte vectors when rows align, bytes when not)."""
    if not pc.EXTENSION_HAS_CUDA:
        pytest.fail(f"the CUDA kernel is not built: {pc.EXTENSION_STATUS}")
    torch.manual_seed(9)
    layers = random_cache(layers=2, rollouts=4, heads=4, time=700, head_dim=head_dim, dtype=dtype,
                          layout="time_major")
    cache = [(k.cuda(), v.cuda()) for k, v in layers]
    src = torch.tensor([0, 3, 1, 3, 2], device="cuda")
    pos = torch.tensor([699, 5, 1, 350, 0], device="cuda")
    got = pc.gather_prefix_kv(cache, src, pos, include_token=True, impl="cuda")
    want = pc.gather_prefix_kv(cache, src, pos, include_token=True, impl="torch")
    for g, w in zip(layer_tensors(got), layer_tensors(want)):
        assert torch.equal(g, w)


@pytest.mark.gpu
def test_cuda_more_caches_than_one_launch_takes():
    """80 layers x (keys, values) = 160 caches: three launches of at most 64 descriptors."""
    if not pc.EXTENSION_HAS_CUDA:
        pytest.fail(f"the CUDA kernel is not built: {pc.EXTENSION_STATUS}")
    torch.manual_seed(10)
    cache = [(torch.randn(3, 2, 40, 16, device="cuda"), torch.randn(3, 2, 40, 16, device="cuda"))
             for _ in range(80)]
    src, pos = torch.tensor([2, 0, 1], device="cuda"), torch.tensor([39, 7, 20], device="cuda")
    got = pc.gather_prefix_kv(cache, src, pos, impl="cuda")
    want = pc.gather_prefix_kv(cache, src, pos, impl="torch")
    for g, w in zip(layer_tensors(got), layer_tensors(want)):
        assert torch.equal(g, w)


@pytest.mark.gpu
def test_cuda_gather_replays_in_a_cuda_graph():
    """No host-to-device copy per call: the op can be captured and replayed with new src/length values."""
    if not pc.EXTENSION_HAS_CUDA:
        pytest.fail(f"the CUDA kernel is not built: {pc.EXTENSION_STATUS}")
    torch.manual_seed(11)
    keys = [torch.randn(4, 2, 64, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    values = [torch.randn_like(k) for k in keys]
    src = torch.tensor([3, 0, 1], device="cuda")
    length = torch.tensor([10, 63, 0], device="cuda")
    pc.gather_kv(keys, values, src, length, 63, impl="cuda")  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        key_out, value_out = pc.gather_kv(keys, values, src, length, 63, impl="cuda")
    src.copy_(torch.tensor([1, 2, 3], device="cuda"))
    length.copy_(torch.tensor([63, 1, 40], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    want_keys, want_values = pc.gather_kv(keys, values, src, length, 63, impl="torch")
    for g, w in zip(key_out + value_out, want_keys + want_values):
        assert torch.equal(g, w)


@pytest.mark.gpu
@pytest.mark.parametrize("bad", ["src", "length"])
def test_cuda_checks_src_and_length_on_the_device(bad):
    """An index out of range stops the kernel with a device-side assert (in a subprocess: the assert leaves
    the CUDA context unusable) instead of reading or writing out of bounds."""
    if not pc.EXTENSION_HAS_CUDA:
        pytest.fail(f"the CUDA kernel is not built: {pc.EXTENSION_STATUS}")
    src, length = ("[0, 4]", "[3, 3]") if bad == "src" else ("[0, 1]", "[3, 9]")
    script = (
        "import torch\n"
        "from appo import prefix_cache as pc\n"
        "keys = [torch.randn(4, 2, 8, 16, device='cuda')]\n"
        f"out = pc.gather_kv(keys, keys, torch.tensor({src}, device='cuda'), "
        f"torch.tensor({length}, device='cuda'), 8, impl='cuda')\n"
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "device-side assert" in result.stderr or "Assertion" in result.stderr, result.stderr[-2000:]
