"""Fused LM-head token statistics (logprob of the sampled token, full-vocabulary entropy) from hidden states
and the LM-head weight: both backends (chunked torch reference, Triton) against a float64 reference that
materialises the logits, in values and in gradients of hidden / weight / bias."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import appo
from appo.kernels.linear_token_stats import linear_token_stats_triton
from appo.ops.linear_token_stats import linear_token_stats_torch

BACKENDS = {"torch": linear_token_stats_torch, "triton": linear_token_stats_triton}
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}


def materialised_stats(hidden, weight, tokens, bias, temperature):
    """Plain autograd over the full [N, V] logits, in the inputs' own dtype -> (logprobs, entropy)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return log_probs.gather(1, tokens[:, None]).squeeze(1), entropy


def make_inputs(num_rows, vocab, hidden_size, dtype, with_bias, seed=0, peaked_row=None):
    """Random LM-head inputs, rounded to ``dtype``; logits have a std of about 3."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=gen)
    if peaked_row is not None:
        hidden[peaked_row] *= 40.0
    weight = torch.randn(vocab, hidden_size, generator=gen) * (3.0 / hidden_size**0.5)
    bias = torch.randn(vocab, generator=gen) if with_bias else None
    tokens = torch.randint(0, vocab, (num_rows,), generator=gen)
    upstream = torch.randn(num_rows, generator=gen)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), tokens, upstream


def run_with_grads(fn, hidden, weight, bias, tokens, upstream, temperature, dtype_of_grad):
    """Forward + backward of ``fn`` on leaf copies
    -> (logprobs, entropy, grad_hidden, grad_weight, grad_bias)."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    logprobs, entropy = fn(leaves[0], leaves[1], tokens, leaves[2], temperature)
    logprobs.backward(upstream.to(dtype_of_grad))
    grads = [None if x is None else x.grad for x in leaves]
    return (logprobs.detach(), entropy.detach(), *grads)


def max_errors(results, reference):
    """Per output, max |result - reference| in float64 (None where the result is None)."""
    return [None if r is None else (r.double() - ref).abs().max().item()
            for r, ref in zip(results, reference)]


NAMES = ("logprobs", "entropy", "grad_hidden", "grad_weight", "grad_bias")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_bias,temperature", [(True, 0.7), (False, 1.0)], ids=["bias-t0.7", "nobias-t1"])
def test_values_and_grads_match_fp64_within_twice_torch_error(backend, dtype, with_bias, temperature):
    hidden, weight, bias, tokens, upstream = make_inputs(47, 1000, 31, dtype, with_bias, peaked_row=5)
    as64 = lambda x: None if x is None else x.double()  # noqa: E731
    reference = run_with_grads(materialised_stats, as64(hidden), as64(weight), as64(bias), tokens, upstream,
                               temperature, torch.float64)
    torch_own = run_with_grads(materialised_stats, hidden, weight, bias, tokens, upstream, temperature, dtype)
    ours = run_with_grads(BACKENDS[backend], hidden, weight, bias, tokens, upstream, temperature,
                          torch.float32)

    assert ours[0].dtype == ours[1].dtype == torch.float32
    for grad, leaf in zip(ours[2:], (hidden, weight, bias)):
        assert (grad is None) == (leaf is None) and (grad is None or grad.dtype == dtype)
    for name, err, own_err in zip(NAMES, max_errors(ours, reference), max_errors(torch_own, reference)):
        if err is not None:
            assert err <= 2 * own_err + FLOOR[dtype], f"{name}: error {err:.3g} vs torch's own {own_err:.3g}"


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_peaked_rows_give_exact_logprob_and_near_zero_entropy(backend):
    hidden, weight, _, tokens, _ = make_inputs(19, 300, 24, torch.float32, with_bias=False)
    hidden[::3] *= 500.0  # logits of hundreds: a softmax that overflows unless shifted by the running max
    tokens[::3] = (hidden[::3].double() @ weight.double().T).argmax(dim=-1)
    logprobs, entropy = BACKENDS[backend](hidden, weight, tokens)
    ref_logprobs, ref_entropy = materialised_stats(hidden.double(), weight.double(), tokens, None, 1.0)
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()
    assert torch.allclose(logprobs.double(), ref_logprobs, atol=2e-4, rtol=1e-5)
    assert torch.allclose(entropy.double(), ref_entropy, atol=2e-4, rtol=1e-5)
    assert (entropy[::3] < 1e-3).all() and (entropy[::3] >= -1e-6).all()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_entropy_is_detached_and_logprobs_carry_grad_only_to_inputs_that_want_it(backend):
    hidden, weight, bias, tokens, _ = make_inputs(9, 130, 17, torch.float32, with_bias=True)
    hidden.requires_grad_()
    logprobs, entropy = BACKENDS[backend](hidden, weight, tokens, bias, 1.3)
    assert logprobs.requires_grad and not entropy.requires_grad and entropy.grad_fn is None
    logprobs.sum().backward()
    assert hidden.grad is not None and weight.grad is None and bias.grad is None
    hidden64 = hidden.detach().double().requires_grad_()
    materialised_stats(hidden64, weight.double(), tokens, bias.double(), 1.3)[0].sum().backward()
    assert torch.allclose(hidden.grad.double(), hidden64.grad, atol=1e-5)


def test_torch_chunk_size_does_not_change_results():
    hidden, weight, bias, tokens, upstream = make_inputs(23, 257, 13, torch.float32, with_bias=True)
    whole = run_with_grads(linear_token_stats_torch, hidden, weight, bias, tokens, upstream, 0.9,
                           torch.float32)
    chunked = run_with_grads(lambda *a: linear_token_stats_torch(*a, chunk_size=5),
                             hidden, weight, bias, tokens, upstream, 0.9, torch.float32)
    for name, a, b in zip(NAMES, whole, chunked):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("num_rows,vocab", [(5, 70), (130, 333)],
                         ids=["fewer-rows-than-a-block", "one-split"])
def test_triton_block_edges_and_strided_hidden(num_rows, vocab):
    """Rows fewer than one block (vocabulary split across programs) and many row blocks (a single split),
    with hidden a strided view (row stride 2H) that must not be copied wrongly."""
    hidden, weight, bias, tokens, upstream = make_inputs(num_rows, vocab, 20, torch.float32, with_bias=True)
    wide = torch.randn(num_rows, 40)
    wide[:, :20] = hidden
    strided = wide[:, :20]
    ours = run_with_grads(linear_token_stats_triton, strided, weight, bias, tokens, upstream, 1.1,
                          torch.float32)
    reference = run_with_grads(materialised_stats, hidden.double(), weight.double(), bias.double(), tokens,
                               upstream, 1.1, torch.float64)
    for name, err in zip(NAMES, max_errors(ours, reference)):
        assert err < 2e-5, f"{name}: {err}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_backward_in_several_chunks_matches_fp64(dtype):
    """47 rows in backward chunks of 16 (the last one ragged): grad_weight accumulates over the chunks in
    fp32, grad_hidden is written chunk by chunk; both within twice torch's own error."""
    hidden, weight, bias, tokens, upstream = make_inputs(47, 300, 24, dtype, with_bias=True, peaked_row=2)
    as64 = lambda x: None if x is None else x.double()  # noqa: E731
    reference = run_with_grads(materialised_stats, as64(hidden), as64(weight), as64(bias), tokens, upstream,
                               0.9, torch.float64)
    torch_own = run_with_grads(materialised_stats, hidden, weight, bias, tokens, upstream, 0.9, dtype)
    chunked = run_with_grads(lambda *a: linear_token_stats_triton(*a, chunk_rows=16), hidden, weight, bias,
                             tokens, upstream, 0.9, torch.float32)
    for name, err, own_err in zip(NAMES, max_errors(chunked, reference), max_errors(torch_own, reference)):
        assert err <= 2 * own_err + FLOOR[dtype], f"{name}: error {err:.3g} vs torch's own {own_err:.3g}"


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_minus_inf_bias_masks_the_vocabulary(backend):
    """A -inf bias entry (a vocabulary mask folded into the LM head) has probability 0: finite statistics
    over the rest, zero gradient for the masked columns, no NaN anywhere."""
    hidden, weight, bias, tokens, upstream = make_inputs(23, 200, 16, torch.float32, with_bias=True)
    bias[::3] = float("-inf")
    tokens[tokens % 3 == 0] += 1
    ours = run_with_grads(BACKENDS[backend], hidden, weight, bias, tokens, upstream, 1.2, torch.float32)
    finite = bias.isfinite()
    reference = run_with_grads(materialised_stats, hidden.double(), weight[finite].double(),
                               bias[finite].double(), torch.searchsorted(finite.nonzero().squeeze(1), tokens),
                               upstream, 1.2, torch.float64)
    logprobs, entropy, grad_hidden, grad_weight, grad_bias = ours
    assert all(torch.isfinite(t).all() for t in (logprobs, entropy, grad_hidden, grad_weight))
    for got, want in ((logprobs, reference[0]), (entropy, reference[1]), (grad_hidden, reference[2]),
                      (grad_weight[finite], reference[3]), (grad_bias[finite], reference[4])):
        assert (got.double() - want).abs().max().item() < 2e-5
    assert torch.all(grad_weight[~finite] == 0) and torch.all(grad_bias[~finite] == 0)


def test_split_plan_fills_whole_waves():
    """At the target sizes (256 row blocks of 128, 594 vocabulary tiles of 256, 132 SMs) the plan gives
    33 splits: 8,448 programs, exactly 64 waves; a small batch (8 row blocks) still fills whole waves."""
    from appo.kernels.linear_token_stats import plan_splits

    assert plan_splits(256, 594, 132) == 33
    for row_blocks in (1, 8, 32, 256):
        splits = plan_splits(row_blocks, 594, 132)
        waves = -(-splits * row_blocks // 132)
        ideal = row_blocks * 594 / 132
        assert waves * -(-594 // splits) <= 1.1 * ideal + 1  # within 10% of perfect balance (+1 tile)


class LargestTensorSeen(TorchDispatchMode):
    """Records the largest number of elements of any float tensor a torch op returns while active (the Triton
    interpreter's own byte copies of argument storages are uint8 and do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_never_materialises_rows_times_vocab(backend):
    """Forward + backward allocate at most O(chunk x V) with 16-row chunks (the torch reference's logits,
    the Triton backward's dz buffer) besides the [V, H] and [N, H] gradients: nothing of N x V = 25,600
    elements when V x H = 2,400 and chunk x V = 6,400."""
    hidden, weight, bias, tokens, upstream = make_inputs(64, 400, 6, torch.float32, with_bias=True)
    if backend == "torch":
        fn = lambda *a: linear_token_stats_torch(*a, chunk_size=16)  # noqa: E731
    else:
        fn = lambda *a: linear_token_stats_triton(*a, chunk_rows=16)  # noqa: E731
    with LargestTensorSeen() as seen:
        run_with_grads(fn, hidden, weight, bias, tokens, upstream, 1.0, torch.float32)
    assert 0 < seen.largest <= 16 * 400


@pytest.mark.parametrize("impl", sorted(BACKENDS))
def test_bad_input_raises_value_error_naming_the_argument(impl):
    """The LM-head form's checks run at the op's one entry, ``appo.token_stats``, before either backend."""
    hidden, weight, bias, tokens, _ = make_inputs(4, 50, 8, torch.float32, with_bias=True)

    def stats(hidden=hidden, weight=weight, tokens=tokens, bias=None, temperature=1.0):
        return appo.token_stats(hidden=hidden, weight=weight, tokens=tokens, bias=bias,
                                temperature=temperature, impl=impl)

    for bad_tokens in (torch.tensor([0, 1, 50, 2]), tokens.float(), tokens[:3]):
        with pytest.raises(ValueError, match="tokens"):
            stats(tokens=bad_tokens)
    for bad_weight in (weight[:, :7], weight.half(), weight[:0], weight[0]):
        with pytest.raises(ValueError, match="weight"):
            stats(weight=bad_weight)
    for bad_bias in (bias[:-1], bias.half()):
        with pytest.raises(ValueError, match="bias"):
            stats(bias=bad_bias)
    with pytest.raises(ValueError, match="hidden"):
        stats(hidden=hidden[0])
    with pytest.raises(ValueError, match="temperature"):
        stats(temperature=0.0)


@pytest.mark.slow
def test_torch_reference_at_smollm2_lm_head_shape():
    """N = 256 rows through SmolLM2's LM head (V = 49,152, H = 576) in fp32, in 64-row chunks."""
    hidden, weight, _, tokens, upstream = make_inputs(256, 49_152, 576, torch.float32, with_bias=False)
    ours = run_with_grads(lambda *a: linear_token_stats_torch(*a, chunk_size=64),
                          hidden, weight, None, tokens, upstream, 1.0, torch.float32)
    reference = run_with_grads(materialised_stats, hidden.double(), weight.double(), None, tokens, upstream,
                               1.0, torch.float64)
    tolerances = (2e-4, 2e-4, 1e-4, 1e-4)
    for name, err, tol in zip(NAMES, max_errors(ours, reference), tolerances):
        assert err < tol, f"{name}: {err}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("num_rows,hidden_size,chunk_rows", [(37, 257, None), (1029, 257, None),
                                                             (1029, 256, 256)])
def test_triton_on_cuda_matches_fp64_within_twice_torch_error(dtype, num_rows, hidden_size, chunk_rows):
    """Ragged and 64-divisible H (masked and unmasked K loops), one and five backward chunks."""
    hidden, weight, bias, tokens, upstream = make_inputs(num_rows, 5003, hidden_size, dtype, with_bias=True,
                                                         peaked_row=3)
    cuda = lambda x: None if x is None else x.cuda()  # noqa: E731
    hidden, weight, bias, tokens, upstream = map(cuda, (hidden, weight, bias, tokens, upstream))
    reference = run_with_grads(materialised_stats, hidden.double(), weight.double(), bias.double(), tokens,
                               upstream, 0.8, torch.float64)
    torch_own = run_with_grads(materialised_stats, hidden, weight, bias, tokens, upstream, 0.8, dtype)
    triton_backend = lambda *a: linear_token_stats_triton(*a, chunk_rows=chunk_rows)  # noqa: E731
    for name, backend in (("triton", triton_backend), ("torch", linear_token_stats_torch)):
        ours = run_with_grads(backend, hidden, weight, bias, tokens, upstream, 0.8, torch.float32)
        for output, err, own_err in zip(NAMES, max_errors(ours, reference), max_errors(torch_own, reference)):
            assert err <= 2 * own_err + FLOOR[dtype], f"{name} {output}: {err:.3g} vs {own_err:.3g}"
