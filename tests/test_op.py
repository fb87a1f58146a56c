"""The custom op itself: gradcheck in float64, opcheck (schema, fake kernel, autograd), the
functional API's outputs against the oracle (tests/reference.py), and double backward."""
import pytest
import torch

import fastfuse

from fastfuse.paper import PaperAttentiveProbe

from reference import pool, randomize_


@pytest.mark.parametrize("tokens", [None, "cls", "ap", "cls+ap", "all"])
def test_functional_matches_definition(backend_device, tokens):
    backend, device = backend_device
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 24, dtype=torch.float64, generator=generator)
    if tokens is None:
        x = torch.randn(3, 11, 24, dtype=torch.float64, generator=generator)
        expected_pooled, expected_attention, _, _ = pool([x], weight)
    else:
        x = [torch.randn(3, t, 24, dtype=torch.float64, generator=generator) for t in (6, 9)]
        expected_pooled, expected_attention, _, _ = pool(x, weight, tokens, 2)
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

    assert torch.autograd.gradcheck(fn, (weight, *inputs), eps=1e-6, atol=1e-7)


def test_opcheck(backend_device):
    backend, device = backend_device
    generator = torch.Generator().manual_seed(2)
    layers = [torch.randn(2, t, 8, dtype=torch.float64, generator=generator).to(device).requires_grad_()
              for t in (5, 4)]
    weight = torch.randn(2, 8, dtype=torch.float64, generator=generator).to(device).requires_grad_()
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
        seen.append(args[-1])  # layers_need_grad, the last positional argument
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


def test_double_backward_raises_in_fastfuse_words(backend_device):
    """Gradients of gradients: the first backward works with create_graph=True, the second
    raises NotImplementedError naming the op and the alternative (README, "The fused op")."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=generator).to(device).requires_grad_()
    weight = torch.randn(3, 8, dtype=torch.float64, generator=generator).to(device).requires_grad_()
    pooled, attention = fastfuse.attentive_pool(x, weight, backend=backend)
    grad_x, grad_weight = torch.autograd.grad(pooled.square().sum(), (x, weight), create_graph=True)
    ref_x, ref_weight = (t.detach().cpu().requires_grad_() for t in (x, weight))
    expected = torch.autograd.grad(pool([ref_x], ref_weight)[0].square().sum(), (ref_x, ref_weight))
    for got, want in zip((grad_x, grad_weight), expected):
        torch.testing.assert_close(got.detach().cpu(), want, rtol=1e-9, atol=1e-12)
    with pytest.raises(NotImplementedError, match=r"fastfuse::attentive_pool.*double backward.*PaperAttentiveProbe"):
        (grad_x.square().sum() + grad_weight.square().sum()).backward()


def test_paper_probe_supports_double_backward():
    """The alternative the double-backward message names: a gradient penalty through it."""
    probe = randomize_(PaperAttentiveProbe(8, 2, 3).double()).eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    (grad_x,) = torch.autograd.grad(probe(x).square().sum(), x, create_graph=True)
    grad_x.square().sum().backward()
    assert probe.query_token.grad is not None and torch.isfinite(probe.query_token.grad).all()
    assert probe.query_token.grad.abs().max() > 0
