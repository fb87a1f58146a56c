"""The custom op itself: gradcheck in float64, opcheck (schema, fake kernel, autograd), and
the functional API's outputs against SPEC §1 written out directly."""
import pytest
import torch

import fastfuse

from reference import stack_tokens


def direct_pool(tokens, score_weight, eps=1e-5):
    """SPEC §2 pooled/attention written from the definition, in float64."""
    tokens = tokens.double()
    normed = torch.nn.functional.layer_norm(tokens, tokens.shape[-1:], eps=eps)
    attention = torch.softmax(torch.einsum("bnd,hd->bhn", normed, score_weight.double()), dim=-1)
    return torch.einsum("bhn,bnd->bhd", attention, normed), attention


@pytest.mark.parametrize("tokens", [None, "cls", "ap", "cls+ap", "all"])
def test_functional_matches_definition(backend_device, tokens):
    backend, device = backend_device
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 24, dtype=torch.float64, generator=generator)
    if tokens is None:
        x = torch.randn(3, 11, 24, dtype=torch.float64, generator=generator)
        stacked = x
    else:
        x = [torch.randn(3, t, 24, dtype=torch.float64, generator=generator) for t in (6, 9)]
        stacked = stack_tokens(x, tokens, 2)
    expected_pooled, expected_attention = direct_pool(stacked, weight)
    moved = x.to(device) if tokens is None else [layer.to(device) for layer in x]
    pooled, attention = fastfuse.attentive_pool(moved, weight.to(device), tokens=tokens,
                                                num_prefix_tokens=2, backend=backend)
    assert pooled.dtype == torch.float64 and pooled.shape == (3, 5, 24)
    torch.testing.assert_close(pooled.cpu(), expected_pooled, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attention.cpu(), expected_attention, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tokens", [None, "cls+ap", "all"])
def test_gradcheck(backend_device, tokens):
    backend, device = backend_device
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(3, 6, dtype=torch.float64, generator=generator).to(device).requires_grad_()
    if tokens is None:
        inputs = [torch.randn(2, 5, 6, dtype=torch.float64, generator=generator).to(device).requires_grad_()]
    else:
        inputs = [torch.randn(2, t, 6, dtype=torch.float64, generator=generator).to(device).requires_grad_()
                  for t in (4, 3)]

    def fn(weight, *layers):
        x = layers[0] if tokens is None else list(layers)
        pooled, attention = fastfuse.attentive_pool(x, weight, tokens=tokens, num_prefix_tokens=1,
                                                    backend=backend)
        return pooled, attention  # both outputs: the attention gradient path is checked too

    if backend == "triton" and device == "cpu" and not _supports_f64(backend):
        pytest.skip("triton backend does not support float64")
    assert torch.autograd.gradcheck(fn, (weight, *inputs), eps=1e-6, atol=1e-7)


def _supports_f64(backend):
    from fastfuse.backends import get
    return torch.float64 in get(backend).dtypes


def test_opcheck(backend_device):
    backend, device = backend_device
    dtype = torch.float64 if _supports_f64(backend) else torch.float32
    generator = torch.Generator().manual_seed(2)
    layers = [torch.randn(2, t, 8, dtype=dtype, generator=generator).to(device).requires_grad_()
              for t in (5, 4)]
    weight = torch.randn(2, 8, dtype=dtype, generator=generator).to(device).requires_grad_()
    for tokens in ("cls+ap", "all"):
        torch.library.opcheck(torch.ops.fastfuse.attentive_pool.default,
                              (layers, weight, tokens, 1, 1e-5, backend))


def test_compiled_kernel_ops_opcheck():
    """The compiled kernels' schemas (declared in Python) and fake kernels agree with them."""
    if not fastfuse.backends()["cpu"]["available"]:
        pytest.skip("cpu backend unavailable: " + fastfuse.backends()["cpu"]["reason"])
    generator = torch.Generator().manual_seed(3)
    layers = [torch.randn(2, t, 8, dtype=torch.float64, generator=generator) for t in (5, 4)]
    weight = torch.randn(2, 8, dtype=torch.float64, generator=generator)
    torch.library.opcheck(torch.ops.fastfuse.fused_pool_forward.default, (layers, weight, "cls+ap", 1, 1e-5),
                          test_utils=("test_schema", "test_faketensor"))
    pooled, attention, mean, rstd = torch.ops.fastfuse.fused_pool_forward(layers, weight, "cls+ap", 1, 1e-5)
    torch.library.opcheck(torch.ops.fastfuse.fused_pool_backward.default,
                          (torch.randn_like(pooled), None, layers, weight, pooled, attention, mean, rstd,
                           "cls+ap", 1, True), test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_matches_eager(backend_device):
    backend, device = backend_device
    probe = fastfuse.AttentiveFusion(16, 2, 3, backend=backend).to(device).eval()
    x = torch.randn(4, 7, 16, device=device, requires_grad=True)
    eager = probe(x)
    (grad_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(probe, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (grad_compiled,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad_compiled, grad_eager)


def test_frozen_features_skip_token_gradients(monkeypatch):
    """Layers that do not require grad (a frozen backbone's features): the backends are asked
    for dw only; a layer that does require grad gets its gradient."""
    import dataclasses

    import fastfuse.ops
    from fastfuse.backends import get

    seen = []

    def spy(*args, **options):
        seen.append(args[-1])
        return get("torch").backward(*args, **options)

    monkeypatch.setattr(fastfuse.ops, "_get_backend",
                        lambda name: dataclasses.replace(get(name), backward=spy))
    weight = torch.randn(2, 8, requires_grad=True)
    frozen = [torch.randn(2, 5, 8), torch.randn(2, 5, 8)]
    pooled, _ = fastfuse.attentive_pool(frozen, weight, tokens="cls+ap", backend="torch")
    pooled.sum().backward()
    live = [torch.randn(2, 5, 8), torch.randn(2, 5, 8, requires_grad=True)]
    pooled, _ = fastfuse.attentive_pool(live, weight, tokens="cls+ap", backend="torch")
    pooled.sum().backward()
    assert seen == [False, True]
    assert live[0].grad is None and live[1].grad.shape == (2, 5, 8)
