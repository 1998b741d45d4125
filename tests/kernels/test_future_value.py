"""The future-value scan (docs/method.md, Eq. 4; appo/ops/future_value.py, kernels/future_value.py): torch
reference, Triton kernel and the dense baseline, all checked against an fp64 direct loop
s_i = d_i + gamma * s_{i+1} on random data (odd shapes, sparse masks, low-precision inputs, non-contiguous
rows), and the checks of the op's entry, ``appo.future_value``. The Triton kernel runs under
TRITON_INTERPRET=1 here and on CUDA in the gpu tests.
"""

import pytest
import torch

import appo
from appo.kernels.future_value import discounted_log_ratio_sum_triton
from appo.ops.future_value import dense_future_value_torch, discounted_log_ratio_sum_torch

# The Triton interpreter converts 1-element arrays to Python ints inside loops; numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

GAMMAS = [2 ** (-1 / 32), 0.5, 1.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RELATIVE_TOLERANCE = 1e-5  # of the discounted sum of |d|: the scale any float summation error lives on
# fp32 keeps relative precision only above 1.2e-38 (below: denormals, flushed to zero on GPUs)
ABSOLUTE_TOLERANCE = 1e-35


def fp64_loop(logprobs, old_logprobs, mask, gamma):
    """The definition, one position at a time from the end, in fp64: s_i = d_i + gamma * s_{i+1}.

    Returns s and the same recursion over |d| (the error scale), both fp64 [B, T] on the CPU.
    """
    log_ratio = torch.where(mask.cpu() != 0, logprobs.cpu().double() - old_logprobs.cpu().double(), 0.0)
    log_ratio = torch.cat([log_ratio, log_ratio.abs()])  # one loop serves both
    future = torch.zeros_like(log_ratio)
    running = torch.zeros(log_ratio.shape[0], dtype=torch.float64)
    for position in range(log_ratio.shape[1] - 1, -1, -1):
        running = log_ratio[:, position] + gamma * running
        future[:, position] = running
    return future.chunk(2)


def assert_close_to_fp64(actual, logprobs, old_logprobs, mask, gamma, rtol=RELATIVE_TOLERANCE):
    """|actual - s| <= rtol * (discounted sum of |d|) + 1e-35, elementwise, against the fp64 loop."""
    assert actual.dtype == torch.float32 and actual.shape == logprobs.shape
    expected, scale = fp64_loop(logprobs, old_logprobs, mask, gamma)
    error = (actual.cpu().double() - expected).abs()
    worst = (error / (scale + ABSOLUTE_TOLERANCE)).max().item() if error.numel() else 0.0
    assert torch.all(error <= rtol * scale + ABSOLUTE_TOLERANCE), f"worst relative error {worst:.3g}"


def make_inputs(rows, length, dtype=torch.float32, mask_dtype=torch.bool, device="cpu", seed=0):
    """Random negative log-probs, a nearby old policy, masks mixing typical, sparse and one-token rows."""
    generator = torch.Generator().manual_seed(seed)
    logprobs = -4.0 * torch.rand(rows, length, generator=generator)
    old_logprobs = logprobs + 0.5 * torch.randn(rows, length, generator=generator)
    keep_probability = torch.full((rows, 1), 0.7)
    keep_probability[0] = 0.05  # mostly masked (prompt and tool-result heavy)
    mask = torch.rand(rows, length, generator=generator) < keep_probability
    if rows > 1:  # a single generated token somewhere in the row
        mask[1] = False
        mask[1, int(torch.randint(length, (1,), generator=generator))] = True
    return (logprobs.to(dtype).to(device), old_logprobs.to(dtype).to(device), mask.to(mask_dtype).to(device))


def non_contiguous(tensor):
    """The same values in a [B, T] view whose rows are strided (every other element of a wider buffer)."""
    wide = torch.full((tensor.shape[0], 2 * tensor.shape[1]), 7, dtype=tensor.dtype, device=tensor.device)
    wide[:, ::2] = tensor
    view = wide[:, ::2]
    assert not view.is_contiguous()
    return view


# ------------------------------------------------------------------------------------------- torch reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("rows,length", [(3, 1), (5, 47), (2, 1000), (4, 8193)])
def test_torch_scan_matches_fp64_loop(rows, length, gamma, dtype):
    inputs = make_inputs(rows, length, dtype)
    assert_close_to_fp64(discounted_log_ratio_sum_torch(*inputs, gamma), *inputs, gamma)


@pytest.mark.parametrize("gamma", [0.0, 1e-60, 0.01, 0.999])
def test_torch_scan_extreme_gammas(gamma):
    # gamma**-k would overflow a single block of 256 for small gamma: the block size must adapt
    inputs = make_inputs(3, 700, seed=1)
    assert_close_to_fp64(discounted_log_ratio_sum_torch(*inputs, gamma), *inputs, gamma)


def test_distance_counts_masked_positions():
    gamma = 0.5
    logprobs = torch.tensor([[1.0, 5.0, 5.0, 2.0]])
    mask = torch.tensor([[True, False, False, True]])
    expected = torch.tensor([[1.0 + gamma**3 * 2.0, gamma**2 * 2.0, gamma * 2.0, 2.0]])
    for scan in (discounted_log_ratio_sum_torch, discounted_log_ratio_sum_triton, dense_future_value_torch):
        assert torch.allclose(scan(logprobs, torch.zeros_like(logprobs), mask, gamma), expected, rtol=1e-6)


@pytest.mark.parametrize("scan", [discounted_log_ratio_sum_torch, discounted_log_ratio_sum_triton])
def test_masked_positions_contribute_zero_even_if_not_finite(scan):
    logprobs, old_logprobs, mask = make_inputs(3, 33, seed=2)
    expected = scan(logprobs, old_logprobs, mask, 0.9)
    garbage = logprobs.clone()
    garbage[~mask] = float("-inf")
    garbage[~mask & (torch.arange(33) % 2 == 0)] = float("nan")
    assert torch.equal(scan(garbage, old_logprobs, mask, 0.9), expected)


@pytest.mark.parametrize("scan", [discounted_log_ratio_sum_torch, discounted_log_ratio_sum_triton])
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32, torch.uint8])
def test_numeric_masks_mean_nonzero(scan, mask_dtype):
    logprobs, old_logprobs, mask = make_inputs(4, 65, seed=3)
    floating = mask_dtype == torch.float32
    weights = 0.01 + torch.rand(mask.shape) if floating else torch.randint(1, 200, mask.shape)
    numeric = (mask * weights).to(mask_dtype)  # any nonzero value marks a generated token
    result = scan(logprobs, old_logprobs, numeric, 0.7)
    assert_close_to_fp64(result, logprobs, old_logprobs, mask, 0.7)
    assert torch.equal(result, scan(logprobs, old_logprobs, mask, 0.7))


@pytest.mark.parametrize("scan", [discounted_log_ratio_sum_torch, discounted_log_ratio_sum_triton])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_rows(scan, dtype):
    inputs = make_inputs(5, 2100, dtype, seed=4)  # three Triton chunks
    strided = [non_contiguous(tensor) for tensor in inputs]
    transposed = [tensor.T.contiguous().T for tensor in inputs]  # column-major: row stride 1
    result = scan(*strided, 2 ** (-1 / 32))
    assert_close_to_fp64(result, *inputs, 2 ** (-1 / 32))
    assert torch.equal(scan(*transposed, 2 ** (-1 / 32)), result)


@pytest.mark.parametrize("scan", [discounted_log_ratio_sum_torch, discounted_log_ratio_sum_triton])
def test_empty_rows_give_empty_output(scan):
    for shape in [(3, 0), (0, 5)]:
        empty = torch.zeros(shape)
        result = scan(empty, empty, empty.bool(), 0.5)
        assert result.shape == shape and result.dtype == torch.float32


# ------------------------------------------------------------------------------------------- dense baseline
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("rows,length", [(3, 1), (5, 47), (2, 1000)])
def test_dense_form_agrees_with_scan(rows, length, gamma):
    inputs = make_inputs(rows, length, seed=5)
    dense = dense_future_value_torch(*inputs, gamma)
    assert_close_to_fp64(dense, *inputs, gamma)
    scan = discounted_log_ratio_sum_torch(*inputs, gamma)
    assert torch.allclose(dense, scan, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ Triton (interpreter on CPU)
# gamma = 0.5 at T = 8,193 takes the pair-scan path, whose generic scan the interpreter runs one element at a
# time (about 8 s a call): fp32 only here; the gpu tests cover every combination.
TRITON_CPU_CASES = [(rows, length, gamma, dtype) for rows, length in [(3, 1), (5, 47), (2, 1000), (4, 8193)]
                    for gamma in GAMMAS for dtype in DTYPES
                    if not (length > 1000 and gamma == 0.5 and dtype != torch.float32)]


@pytest.mark.parametrize("rows,length,gamma,dtype", TRITON_CPU_CASES)
def test_triton_scan_matches_fp64_loop(rows, length, gamma, dtype):
    inputs = make_inputs(rows, length, dtype, seed=6)
    assert_close_to_fp64(discounted_log_ratio_sum_triton(*inputs, gamma), *inputs, gamma)


@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.9])
def test_triton_scan_other_gammas(gamma):
    # 0 and 0.01 take the pair-scan path; 0.9 the scaled cumsum, on 256-wide chunks at T = 2,100
    for length in (64, 2100):
        inputs = make_inputs(3, length, seed=7)
        assert_close_to_fp64(discounted_log_ratio_sum_triton(*inputs, gamma), *inputs, gamma)


def test_triton_carry_over_many_chunks(monkeypatch):
    """The carry into a chunk folds the sums of every chunk to its right, CARRY_BLOCK of them per step:
    with 2 per step, 9 chunks of 1,024 positions need up to four steps."""
    from appo.kernels import future_value

    monkeypatch.setattr(future_value, "_CARRY_BLOCK", 2)
    for gamma in (2 ** (-1 / 32), 1.0, 0.999):
        inputs = make_inputs(2, 8193, seed=12)
        assert_close_to_fp64(discounted_log_ratio_sum_triton(*inputs, gamma), *inputs, gamma)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="impl"):
        appo.future_value(*make_inputs(2, 8), gamma=0.5, impl="triton")


# -------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_input_names_the_argument(impl):
    """The op's one entry, ``appo.future_value``, checks every argument before either scan runs."""
    logprobs, old_logprobs, mask = make_inputs(2, 9)
    not_finite = logprobs.clone()
    not_finite[mask] = float("nan")
    cases = [
        ((logprobs[0], old_logprobs[0], mask[0]), {}, "logprobs"),
        ((logprobs, old_logprobs[:, :8], mask), {}, "old_logprobs"),
        ((logprobs, old_logprobs, mask[:1]), {}, "mask"),
        ((logprobs.double(), old_logprobs, mask), {}, "logprobs"),
        ((logprobs, old_logprobs.long(), mask), {}, "old_logprobs"),
        ((logprobs, old_logprobs, mask.to(torch.complex64)), {}, "mask"),
        ((logprobs, old_logprobs, mask.to("meta")), {}, "mask"),
        ((not_finite, old_logprobs, mask), {}, "logprobs"),
        ((logprobs, not_finite, mask), {}, "old_logprobs"),
        ((logprobs, old_logprobs, mask), {"gamma": 1.5}, "gamma"),
        ((logprobs, old_logprobs, mask), {"gamma": 0.0}, "gamma"),
        ((logprobs, old_logprobs, mask), {"gamma": float("nan")}, "gamma"),
        ((logprobs, old_logprobs, mask), {"gamma": "0.5x"}, "gamma"),
        ((logprobs, old_logprobs, mask), {"clip": (1.2, 1.0)}, "clip"),
        ((logprobs, old_logprobs, mask), {"clip": 1.0}, "clip"),
    ]
    for arguments, keywords, name in cases:
        with pytest.raises(ValueError, match=name):
            appo.future_value(*arguments, **keywords, impl=impl)


# ------------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("rows,length", [(3, 1), (5, 47), (2, 1000), (4, 8193), (64, 32768)])
def test_triton_scan_on_cuda(rows, length, gamma, dtype):
    inputs = make_inputs(rows, length, dtype, device="cuda", seed=9)
    result = discounted_log_ratio_sum_triton(*inputs, gamma)
    assert result.is_cuda
    reference = discounted_log_ratio_sum_torch(*inputs, gamma)  # fp64 inside; much faster than the loop
    scale = discounted_log_ratio_sum_torch((inputs[0].float() - inputs[1].float()).abs(), torch.zeros_like(
        inputs[0], dtype=torch.float32), inputs[2], gamma)
    assert torch.all((result - reference).abs() <= RELATIVE_TOLERANCE * scale + ABSOLUTE_TOLERANCE)
    if length <= 8193:
        assert_close_to_fp64(result, *[t.cpu() for t in inputs], gamma)


@pytest.mark.gpu
def test_triton_scan_on_cuda_non_contiguous():
    inputs = make_inputs(5, 3001, torch.bfloat16, device="cuda", seed=10)
    result = discounted_log_ratio_sum_triton(*[non_contiguous(t) for t in inputs], 2 ** (-1 / 32))
    assert_close_to_fp64(result, *[t.cpu() for t in inputs], 2 ** (-1 / 32))


@pytest.mark.gpu
def test_torch_scan_and_dense_on_cuda():
    inputs = make_inputs(3, 2000, device="cuda", seed=11)
    scan = discounted_log_ratio_sum_torch(*inputs, 2 ** (-1 / 32))
    assert scan.is_cuda
    assert_close_to_fp64(scan, *[t.cpu() for t in inputs], 2 ** (-1 / 32))
    assert_close_to_fp64(dense_future_value_torch(*inputs, 2 ** (-1 / 32)), *[t.cpu() for t in inputs],
                         2 ** (-1 / 32))
