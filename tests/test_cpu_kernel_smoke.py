"""Quick check of the compiled CPU kernels (csrc/cpu) called directly through torch.ops,
against the float64 oracle of tests/reference.py (SPEC §2 from the definition, gradients by
autograd)."""
import pytest
import torch

from fastfuse import _extension
from fastfuse.gather import scatter_token_grads

from reference import EPS, TOLERANCE, make_layer, pool_with_grads, rel_err, stack_tokens

LOADED, REASON = _extension.load()
if not LOADED:
    print(f"skipping the CPU kernel smoke test: {REASON}")
    pytest.skip(f"compiled extension not loaded: {REASON}", allow_module_level=True)

reference = pool_with_grads


def make_layers(batch, lengths, dim, dtype, layout, generator):
    return [make_layer(batch, length, dim, layout, generator, dtype) for length in lengths]


def assert_close(actual, expected, dtype, what):
    # Floor 1: mean and rstd can be near zero; the tolerance is then absolute.
    error = rel_err(actual, expected, floor=1.0)
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3g} ({dtype})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("num_prefix_tokens", [1, 5])
@pytest.mark.parametrize("tokens", ["cls", "ap", "cls+ap", "all"])
@pytest.mark.parametrize("with_grad_attention", [False, True])
def test_matches_reference(tokens, num_prefix_tokens, layout, heads, dtype, with_grad_attention):
    generator = torch.Generator().manual_seed(hash((tokens, num_prefix_tokens, layout, heads)) % 2**31)
    batch, dim = 3, 37
    layers = make_layers(batch, (9, 14), dim, dtype, layout, generator)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (torch.randn(heads, dim, dtype=torch.float64, generator=generator) * 0.3).to(compute)
    originals = [layer.clone() for layer in layers]

    pooled, attention, mean, rstd = torch.ops.fastfuse.fused_pool_forward(
        layers, weight, tokens, num_prefix_tokens, EPS)
    num_tokens = attention.shape[-1]
    grad_pooled = torch.randn(pooled.shape, dtype=torch.float64, generator=generator).to(compute)
    grad_attention = (torch.randn(attention.shape, dtype=torch.float64, generator=generator).to(compute)
                      if with_grad_attention else None)
    expected = reference(layers, weight, tokens, num_prefix_tokens, grad_pooled, grad_attention)

    for name, value in zip(("pooled", "attention", "mean", "rstd"), (pooled, attention, mean, rstd)):
        assert value.dtype == compute and value.is_contiguous(), name
    assert pooled.shape == (batch, heads, dim) and mean.shape == (batch, num_tokens)
    for name, actual, wanted in zip(("pooled", "attention", "mean", "rstd"),
                                    (pooled, attention, mean, rstd), expected[:4]):
        assert_close(actual, wanted, dtype, name)

    grad_layers, grad_weight = torch.ops.fastfuse.fused_pool_backward(
        grad_pooled, grad_attention, layers, weight, pooled, attention, mean, rstd, tokens,
        num_prefix_tokens, True)
    assert grad_weight.dtype == compute and grad_weight.shape == (heads, dim)
    assert_close(grad_weight, expected[5], dtype, "grad_score_weight")
    for index, (actual, wanted, layer) in enumerate(zip(grad_layers, expected[4], layers)):
        assert actual.dtype == dtype and actual.shape == layer.shape and actual.is_contiguous()
        assert_close(actual, wanted, dtype, f"grad_layers[{index}]")
    for layer, original in zip(layers, originals):
        assert torch.equal(layer, original), "an input layer was modified"


def test_scatter_matches_gather_adjoint():
    """The kernel's scatter of token gradients (row 0 both CLS and averaged, p = 0) equals the
    oracle's, and so does fastfuse.gather.scatter_token_grads (the torch backend's) of an
    arbitrary token gradient: both against autograd through the oracle's token stack."""
    generator = torch.Generator().manual_seed(3)
    layers = make_layers(2, (4, 6), 16, torch.float64, "contiguous", generator)
    weight = torch.randn(2, 16, dtype=torch.float64, generator=generator)
    outputs = torch.ops.fastfuse.fused_pool_forward(layers, weight, "cls+ap", 0, EPS)
    grad_pooled = torch.randn(outputs[0].shape, dtype=torch.float64, generator=generator)
    grads, _ = torch.ops.fastfuse.fused_pool_backward(grad_pooled, None, layers, weight, *outputs,
                                                      "cls+ap", 0, True)
    expected = reference(layers, weight, "cls+ap", 0, grad_pooled, None)[4]
    for actual, wanted in zip(grads, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-12)
    for tokens, prefix in (("cls+ap", 0), ("cls", 1), ("ap", 2), ("all", 0)):
        leaves = [layer.clone().requires_grad_() for layer in layers]
        stacked = stack_tokens(leaves, tokens, prefix)
        token_grads = torch.randn(stacked.shape, dtype=torch.float64, generator=generator)
        wanted = torch.autograd.grad(stacked, leaves, token_grads)
        scattered = scatter_token_grads(token_grads, layers, tokens, prefix)
        for actual, target in zip(scattered, wanted):
            torch.testing.assert_close(actual, target, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tokens", ["cls+ap", "all"])
def test_empty_batch(tokens):
    layers = [torch.randn(0, 7, 37), torch.randn(0, 5, 37)]
    weight = torch.randn(3, 37)
    pooled, attention, mean, rstd = torch.ops.fastfuse.fused_pool_forward(layers, weight, tokens, 1, EPS)
    num_tokens = 4 if tokens == "cls+ap" else 12
    assert pooled.shape == (0, 3, 37) and attention.shape == (0, 3, num_tokens)
    assert mean.shape == rstd.shape == (0, num_tokens)
    grads, grad_weight = torch.ops.fastfuse.fused_pool_backward(
        torch.zeros(0, 3, 37), None, layers, weight, pooled, attention, mean, rstd, tokens, 1, True)
    assert [g.shape for g in grads] == [layer.shape for layer in layers]
    assert torch.equal(grad_weight, torch.zeros(3, 37))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    generator = torch.Generator().manual_seed(4)
    layers = make_layers(2, (9, 12), 40, dtype, "transposed", generator)
    weight = torch.randn(3, 40, generator=generator) * 0.3
    outputs = torch.ops.fastfuse.fused_pool_forward(layers, weight, "cls+ap", 1, EPS)
    assert all(value.dtype == torch.float32 for value in outputs)
    grad_pooled = torch.randn(outputs[0].shape, generator=generator)
    grads, grad_weight = torch.ops.fastfuse.fused_pool_backward(grad_pooled, None, layers, weight,
                                                                *outputs, "cls+ap", 1, True)
    expected = reference(layers, weight, "cls+ap", 1, grad_pooled, None)
    assert_close(outputs[0], expected[0], torch.float32, "pooled")
    assert_close(grad_weight, expected[5], dtype, "grad_score_weight")
    for actual, wanted in zip(grads, expected[4]):
        assert actual.dtype == dtype
        assert_close(actual, wanted, dtype, "grad_layers")


def test_many_heads_many_tokens_and_thread_count_reproducibility():
    generator = torch.Generator().manual_seed(5)
    layers = make_layers(64, (40,), 70, torch.float32, "contiguous", generator)  # big enough for 2 threads
    weight = torch.randn(19, 70, generator=generator) * 0.2
    threads = torch.get_num_threads()
    results = []
    try:
        for count in sorted({1, max(threads, 2)}):
            torch.set_num_threads(count)
            outputs = torch.ops.fastfuse.fused_pool_forward(layers, weight, "all", 0, EPS)
            grads = torch.ops.fastfuse.fused_pool_backward(
                torch.ones_like(outputs[0]), None, layers, weight, *outputs, "all", 0, True)
            results.append((outputs, grads))
    finally:
        torch.set_num_threads(threads)
    (outputs, (grads, grad_weight)), (outputs_2, (grads_2, grad_weight_2)) = results
    assert all(torch.equal(a, b) for a, b in zip(outputs, outputs_2))
    assert torch.equal(grad_weight, grad_weight_2) and torch.equal(grads[0], grads_2[0])
    expected = reference(layers, weight, "all", 0, torch.ones_like(outputs[0]), None)
    assert_close(outputs[0], expected[0], torch.float32, "pooled")
    assert_close(grad_weight, expected[5], torch.float32, "grad_score_weight")
    assert_close(grads[0], expected[4][0], torch.float32, "grad_layers")


@pytest.mark.parametrize("call", [
    lambda w: torch.ops.fastfuse.fused_pool_forward([], w, "all", 0, EPS),
    lambda w: torch.ops.fastfuse.fused_pool_forward([torch.randn(2, 3)], w, "all", 0, EPS),
    lambda w: torch.ops.fastfuse.fused_pool_forward([torch.randn(2, 3, 8)], w, "all", 0, EPS),
    lambda w: torch.ops.fastfuse.fused_pool_forward([torch.randn(2, 3, 6)], w, "mean", 0, EPS),
    lambda w: torch.ops.fastfuse.fused_pool_forward([torch.randn(2, 3, 6)], w, "ap", 3, EPS),
    lambda w: torch.ops.fastfuse.fused_pool_forward([torch.randn(2, 3, 6)], w.double(), "cls", 0, EPS),
    lambda w: torch.ops.fastfuse.fused_pool_forward(
        [torch.randn(2, 3, 6), torch.randn(3, 3, 6)], w, "cls", 0, EPS),
    lambda w: torch.ops.fastfuse.fused_pool_backward(
        torch.randn(2, 4, 5), None, [torch.randn(2, 3, 6)], w, torch.randn(2, 4, 6),
        torch.randn(2, 4, 2), torch.randn(2, 2), torch.randn(2, 2), "cls+ap", 1, True),
    lambda w: torch.ops.fastfuse.fused_pool_backward(
        torch.randn(2, 4, 6), None, [torch.randn(2, 3, 6)], w, torch.randn(2, 4, 6),
        torch.randn(2, 4, 3), torch.randn(2, 2), torch.randn(2, 2), "cls+ap", 1, True),
])
def test_bad_arguments_raise(call):
    with pytest.raises(RuntimeError, match="fastfuse"):
        call(torch.randn(4, 6))


def test_frozen_layers_skip_token_gradients():
    """layers_need_grad=False: no layer gradients, the same dw."""
    generator = torch.Generator().manual_seed(7)
    layers = [torch.randn(3, 9, 37, generator=generator) for _ in range(2)]
    weight = torch.randn(3, 37, generator=generator)
    outputs = torch.ops.fastfuse.fused_pool_forward(layers, weight, "cls+ap", 1, 1e-5)
    grad_pooled = torch.randn(outputs[0].shape, generator=generator)
    full = torch.ops.fastfuse.fused_pool_backward(grad_pooled, None, layers, weight, *outputs,
                                                  "cls+ap", 1, True)
    frozen = torch.ops.fastfuse.fused_pool_backward(grad_pooled, None, layers, weight, *outputs,
                                                    "cls+ap", 1, False)
    assert len(frozen[0]) == 0 and len(full[0]) == 2
    assert torch.equal(frozen[1], full[1])
