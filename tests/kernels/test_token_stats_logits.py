"""Token statistics from logits (appo/ops/token_stats.py, kernels/token_stats.py): the Triton kernel and the
chunked torch reference against float64, and the checks of the op's entry, ``appo.token_stats``.

Tolerance (flash-attention style): a backend's max error vs the float64 statistics of the same input values
must be at most 2x the error of torch's own computation in the input dtype, plus a small absolute floor.
Both backends compute in fp32, so they are also held to 2x torch's fp32 error on the upcast input.
"""

import math

import pytest
import torch

import appo
from appo.kernels.token_stats import token_stats_triton
from appo.ops.token_stats import token_stats_torch

BACKENDS = {"torch": token_stats_torch, "triton": token_stats_triton}
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ABS_FLOOR = 2e-5
# The Triton interpreter turns the runtime loop bound into a Python int through a 1-element numpy array.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def make_logits(num_rows, vocab_size, kind, dtype, device, generator):
    """Random [num_rows, vocab_size] logits of one kind, rounded to dtype."""
    logits = torch.randn(num_rows, vocab_size, generator=generator, dtype=torch.float64)
    if kind == "random":
        logits = 2.0 * logits
    elif kind == "peaked":  # one dominant logit per row, sometimes at the sampled token
        peak = torch.randint(0, vocab_size, (num_rows,), generator=generator)
        logits[torch.arange(num_rows), peak] += 30.0
    elif kind == "near_uniform":
        logits = 1e-3 * logits
    elif kind == "offset":  # large common offset: catches lse - sum(p * z) cancellation
        logits = 2.0 * logits + 300.0
    return logits.to(dtype).to(device)


def stats_in(logits, tokens, temperature, compute_dtype):
    """log_softmax + entropy as people write it, computed in compute_dtype (float64: the oracle).

    Entropy over the finite support: entries with p = 0 (logit -inf) add 0, not 0 * (-inf) = NaN.
    """
    log_p = torch.log_softmax(logits.to(compute_dtype) / temperature, dim=-1)
    entropy = -torch.where(log_p == float("-inf"), 0.0, log_p.exp() * log_p).sum(dim=-1)
    return log_p.gather(1, tokens[:, None]).squeeze(1).double(), entropy.double()


def max_err(value, reference):
    return (value.double() - reference).abs().max().item()


def check_against_fp64(backend, logits, tokens, temperature):
    logprobs, entropy = BACKENDS[backend](logits, tokens, temperature)
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert logprobs.shape == entropy.shape == tokens.shape
    ref = stats_in(logits, tokens, temperature, torch.float64)
    in_dtype = stats_in(logits, tokens, temperature, logits.dtype)
    in_fp32 = stats_in(logits, tokens, temperature, torch.float32)
    outputs = (logprobs, entropy)
    for name, got, want, own, fp32 in zip(("logprobs", "entropy"), outputs, ref, in_dtype, in_fp32):
        err = max_err(got, want)
        assert err <= 2 * max_err(own, want) + ABS_FLOOR, f"{name}: error {err} vs torch {logits.dtype}"
        assert err <= 2 * max_err(fp32, want) + ABS_FLOOR, f"{name}: error {err} vs torch fp32"
    log_v = math.log(logits.shape[1])
    assert entropy.min().item() >= -1e-5 and entropy.max().item() <= log_v + 1e-5
    assert logprobs.max().item() <= 1e-5
    return logprobs, entropy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("kind", ["random", "peaked", "near_uniform", "offset"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_fp64(backend, dtype, temperature, kind, device, seeded):
    logits = make_logits(47, 1000, kind, dtype, device, seeded)
    tokens = torch.randint(0, 1000, (47,), generator=seeded).to(device)
    check_against_fp64(backend, logits, tokens, temperature)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("kind", ["random", "peaked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 131_077), (2, 262_147)], ids=str)
def test_large_vocabulary(backend, shape, dtype, kind, device, seeded):
    logits = make_logits(*shape, kind, dtype, device, seeded)
    tokens = torch.randint(0, shape[1], (shape[0],), generator=seeded).to(device)
    check_against_fp64(backend, logits, tokens, 1.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("shape", [(5, 1), (130, 33), (1, 8193)], ids=str)
def test_small_and_ragged_shapes(backend, shape, device, seeded):
    logits = make_logits(*shape, "random", torch.float32, device, seeded)
    tokens = torch.randint(0, shape[1], (shape[0],), generator=seeded).to(device)
    logprobs, entropy = check_against_fp64(backend, logits, tokens, 0.7)
    if shape[1] == 1:  # a single-token vocabulary is certain
        assert torch.all(logprobs == 0) and torch.all(entropy == 0)


def strided_views(generator, dtype, device):
    """Row-strided 2-D views with a contiguous vocabulary, as the dispatcher hands them over."""
    vocab = 517

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).to(device)

    batch = rand(4, 9, vocab)  # [B, T, V]
    return {
        "padded_rows": rand(29, vocab + 37)[:, 20:20 + vocab],
        "every_third_row": rand(3 * 29, vocab)[::3],
        "one_position_all_rollouts": batch[:, 2],  # row stride T * V
        "one_rollout_but_last": batch[1, :-1],  # logits[b, :-1]: the positions that predict tokens 1..T-1
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_strided_inputs(backend, dtype, device, seeded):
    for layout, logits in strided_views(seeded, dtype, device).items():
        every_other = torch.randint(0, logits.shape[1], (2 * logits.shape[0],), generator=seeded).to(device)
        tokens = every_other[::2]  # a strided token view too
        logprobs, entropy = check_against_fp64(backend, logits, tokens, 1.0)
        contiguous = BACKENDS[backend](logits.contiguous(), tokens.contiguous(), 1.0)
        torch.testing.assert_close((logprobs, entropy), contiguous, rtol=0, atol=1e-6, msg=layout)


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 46, 47, 100])
def test_torch_chunking_does_not_change_results(chunk_size, seeded):
    logits = make_logits(47, 1000, "random", torch.float32, "cpu", seeded)
    tokens = torch.randint(0, 1000, (47,), generator=seeded)
    got = token_stats_torch(logits, tokens, 0.7, chunk_size=chunk_size)
    whole = token_stats_torch(logits, tokens, 0.7, chunk_size=47)
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 27])
def test_torch_realistic_shape(chunk_size, seeded):
    """Qwen2.5-sized vocabulary, 64 tokens, fp32 (default chunk: one chunk; 27: three, last one ragged)."""
    logits = make_logits(64, 152_064, "random", torch.float32, "cpu", seeded)
    tokens = torch.randint(0, 152_064, (64,), generator=seeded)
    logprobs, entropy = token_stats_torch(logits, tokens, 1.0, chunk_size=chunk_size)
    ref_logprobs, ref_entropy = stats_in(logits, tokens, 1.0, torch.float64)
    assert max_err(logprobs, ref_logprobs) <= 2e-5 and max_err(entropy, ref_entropy) <= 2e-5


def mask_vocabulary(logits, generator, keep=0.3):
    """-inf on a random ~(1 - keep) of every row's entries (a vocabulary mask), at least one kept per row."""
    masked = torch.rand(logits.shape, generator=generator) > keep
    masked[torch.arange(logits.shape[0]), torch.randint(0, logits.shape[1], (logits.shape[0],),
                                                          generator=generator)] = False
    return logits.masked_fill(masked.to(logits.device), float("-inf")), masked


def kept_tokens(masked, generator):
    """One token per row, drawn among the row's finite (kept) entries."""
    weights = (~masked).double()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("kind", ["random", "peaked", "offset"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vocabulary_masked_logits_match_fp64(backend, dtype, kind, device, seeded):
    """-inf logits (a logit processor's mask) have probability 0: entropy over the finite support."""
    logits, masked = mask_vocabulary(make_logits(23, 1000, kind, dtype, device, seeded), seeded)
    tokens = kept_tokens(masked, seeded).to(device)
    logprobs, entropy = check_against_fp64(backend, logits, tokens, 0.8)
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_first_tiles_entirely_minus_inf(backend, dtype, device, seeded):
    """Every logit of the first 8,192+ columns (more than one kernel tile) is -inf in some rows, and the
    only finite logits of row 0 sit in the ragged tail."""
    vocab = 20_011
    logits, masked = mask_vocabulary(make_logits(4, vocab, "random", dtype, "cpu", seeded), seeded, keep=0.5)
    logits[:3, :12_000] = float("-inf")
    masked[:3, :12_000] = True
    logits[0, :vocab - 5] = float("-inf")
    masked[0, :vocab - 5] = True
    masked[0, vocab - 5:] = False
    logits[0, vocab - 5:] = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0]).to(dtype)
    tokens = kept_tokens(masked, seeded)
    logprobs, entropy = check_against_fp64(backend, logits.to(device), tokens.to(device), 1.1)
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_non_finite_logits_give_non_finite_stats(backend, device, seeded):
    """The dispatcher turns non-finite outputs into errors, so each case must surface in its own row only:
    NaN and +inf logits give NaN; a row of -inf only gives a NaN entropy; a sampled token at -inf gives
    logprob -inf with a finite entropy; a -inf logit elsewhere changes nothing."""
    logits = make_logits(7, 300, "random", torch.float32, device, seeded)
    logits[1, 7] = float("nan")
    logits[2, 100] = float("inf")
    logits[3, 299] = float("-inf")  # not the sampled token: a masked entry, finite statistics
    logits[5] = float("-inf")
    logits[6, 6] = float("-inf")  # the sampled token
    tokens = torch.tensor([0, 1, 2, 3, 4, 5, 6], device=device)
    logprobs, entropy = BACKENDS[backend](logits, tokens, 1.0)
    assert torch.isfinite(entropy).tolist() == [True, False, False, True, True, False, True]
    assert torch.isfinite(logprobs).tolist() == [True, False, False, True, True, False, False]
    assert logprobs[6].item() == float("-inf") and 0 < entropy[6].item() <= math.log(299)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_grad_inputs_give_detached_outputs(backend, seeded):
    logits = make_logits(6, 50, "random", torch.float32, "cpu", seeded).requires_grad_()
    tokens = torch.randint(0, 50, (6,), generator=seeded)
    with_grad = BACKENDS[backend](logits, tokens, 1.0)
    with torch.no_grad():
        without_grad = BACKENDS[backend](logits, tokens, 1.0)
    assert not any(out.requires_grad for out in with_grad + without_grad)
    torch.testing.assert_close(with_grad, without_grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_empty_rows(backend):
    logprobs, entropy = BACKENDS[backend](torch.empty(0, 10), torch.empty(0, dtype=torch.int64), 1.0)
    assert logprobs.shape == entropy.shape == (0,) and logprobs.dtype == torch.float32


@pytest.mark.parametrize("impl", sorted(BACKENDS))
def test_bad_input_raises_value_error_naming_argument(impl):
    """The op's one entry, ``appo.token_stats``, checks every argument before either backend runs (the
    backends check nothing)."""
    logits, tokens = torch.randn(4, 10), torch.zeros(4, dtype=torch.int64)
    for temperature in (0.0, -1.0, float("nan"), float("inf"), "hot"):
        with pytest.raises(ValueError, match="temperature"):
            appo.token_stats(logits, tokens, temperature=temperature, impl=impl)
    for bad_logits in (torch.randn(40), logits.double(), torch.randn(4, 0)):
        with pytest.raises(ValueError, match="logits"):
            appo.token_stats(bad_logits, tokens, impl=impl)
    for bad_tokens in (tokens.float(), tokens[:3], tokens + 10, tokens - 1, None):
        with pytest.raises(ValueError, match="tokens"):
            appo.token_stats(logits, bad_tokens, impl=impl)
    with pytest.raises(ValueError, match="logits"):
        appo.token_stats(logits, tokens, weight=torch.randn(10, 3), impl=impl)
    with pytest.raises(ValueError, match="impl"):
        appo.token_stats(logits, tokens, impl="cuda")
