"""The fused op's options in every backend: normalize="none" (SPEC §5), fastfuse.token_moments,
and LayerNorm statistics robust to the tokens' magnitude (issue 12 item 7), all against the
float64 definitions of tests/reference.py."""
import pytest
import torch

import fastfuse
from fastfuse.backends import get as get_backend

from reference import moments_reference, pool_reference, stack_tokens

TOKEN_MODES = [None, "cls", "ap", "cls+ap", "all"]


def _inputs(tokens, dtype=torch.float64, batch=3, dim=12, lengths=(5, 7), seed=0, scale=1.0):
    """(x as the op takes it, its float64 (B, N, D) stack) for a token mode."""
    generator = torch.Generator().manual_seed(seed)
    if tokens is None:
        x = (torch.randn(batch, 9, dim, dtype=torch.float64, generator=generator) * scale).to(dtype)
        return x, x.double()
    x = [(torch.randn(batch, t, dim, dtype=torch.float64, generator=generator) * scale).to(dtype)
         for t in lengths]
    return x, stack_tokens([layer.double() for layer in x], tokens, 2)


def _to(x, device, requires_grad=False):
    if isinstance(x, torch.Tensor):
        return x.to(device).requires_grad_(requires_grad)
    return [layer.to(device).requires_grad_(requires_grad) for layer in x]


def _skip_unsupported(backend, dtype):
    if dtype not in get_backend(backend).dtypes:
        pytest.skip(f"backend {backend} does not take {dtype}")


# ---- normalize="none" ------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", TOKEN_MODES)
def test_normalize_none_forward(backend_device, tokens):
    backend, device = backend_device
    x, stacked = _inputs(tokens)
    weight = torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.3
    expected_pooled, expected_attention = pool_reference(stacked, weight, normalize="none")
    pooled, attention = fastfuse.attentive_pool(_to(x, device), weight.to(device), tokens=tokens,
                                                num_prefix_tokens=2, normalize="none",
                                                backend=backend)
    torch.testing.assert_close(pooled.cpu(), expected_pooled, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attention.cpu(), expected_attention, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tokens", [None, "cls+ap", "all"])
def test_normalize_none_backward(backend_device, tokens):
    backend, device = backend_device
    x, _ = _inputs(tokens, batch=2, dim=6, lengths=(4, 3))
    weight = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weight = weight.to(device).requires_grad_()
    inputs = _to(x, device, requires_grad=True)
    layers = [inputs] if tokens is None else inputs

    def fn(weight, *layers):
        x = layers[0] if tokens is None else list(layers)
        return fastfuse.attentive_pool(x, weight, tokens=tokens, num_prefix_tokens=1,
                                       normalize="none", backend=backend)

    assert torch.autograd.gradcheck(fn, (weight, *layers), eps=1e-6, atol=1e-7)
    # and against the definition's autograd (the reference's own backward)
    ref_layers = [layer.detach().cpu().double().requires_grad_() for layer in layers]
    stacked = stack_tokens(ref_layers, "all" if tokens is None else tokens, 1)
    ref_weight = weight.detach().cpu().requires_grad_()
    ref_pooled, ref_attention = pool_reference(stacked, ref_weight, normalize="none")
    (ref_pooled.square().sum() + ref_attention.sum(dim=1).square().sum()).backward()
    pooled, attention = fn(weight, *layers)
    (pooled.square().sum() + attention.sum(dim=1).square().sum()).backward()
    torch.testing.assert_close(weight.grad.cpu(), ref_weight.grad, rtol=1e-9, atol=1e-10)
    for layer, ref in zip(layers, ref_layers):
        torch.testing.assert_close(layer.grad.cpu(), ref.grad, rtol=1e-9, atol=1e-10)


# ---- token_moments ---------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", TOKEN_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_token_moments_forward(backend_device, tokens, dtype):
    backend, device = backend_device
    _skip_unsupported(backend, dtype)
    # an offset far from 0: a one-pass sum-of-squares variance would lose every digit here
    x, stacked = _inputs(tokens, dtype=dtype, scale=1.0)
    x = x + 300.0 if tokens is None else [layer + 300.0 for layer in x]
    stacked = (x.double() if tokens is None else
               stack_tokens([layer.double() for layer in x], tokens, 2))
    mean, var = fastfuse.token_moments(_to(x, device), tokens=tokens, num_prefix_tokens=2,
                                       backend=backend)
    expected_mean, expected_var = moments_reference(stacked)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == var.dtype == acc and mean.shape == var.shape == (12,)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(mean.cpu().double(), expected_mean, rtol=tol, atol=0)
    torch.testing.assert_close(var.cpu().double(), expected_var, rtol=tol * 10, atol=0)


@pytest.mark.parametrize("tokens", [None, "cls", "ap", "cls+ap", "all"])
def test_token_moments_backward(backend_device, tokens):
    backend, device = backend_device
    x, _ = _inputs(tokens, batch=2, dim=5, lengths=(4, 3))
    inputs = _to(x, device, requires_grad=True)
    layers = [inputs] if tokens is None else inputs

    def fn(*layers):
        x = layers[0] if tokens is None else list(layers)
        return fastfuse.token_moments(x, tokens=tokens, num_prefix_tokens=1, backend=backend)

    assert torch.autograd.gradcheck(fn, tuple(layers), eps=1e-6, atol=1e-8)
    ref_layers = [layer.detach().cpu().requires_grad_() for layer in layers]
    ref_mean, ref_var = moments_reference(stack_tokens(ref_layers, "all" if tokens is None else tokens, 1))
    (ref_mean.sin().sum() + ref_var.cos().sum()).backward()
    mean, var = fn(*layers)
    (mean.sin().sum() + var.cos().sum()).backward()
    for layer, ref in zip(layers, ref_layers):
        torch.testing.assert_close(layer.grad.cpu(), ref.grad, rtol=1e-10, atol=1e-12)


def test_token_moments_empty_batch(backend_device):
    backend, device = backend_device
    mean, var = fastfuse.token_moments(torch.zeros(0, 4, 3, device=device), backend=backend)
    assert mean.shape == (3,) and torch.isnan(mean).all() and torch.isnan(var).all()


def test_token_moments_rejects_bad_input():
    with pytest.raises(ValueError, match="tokens must be one of"):
        fastfuse.token_moments([torch.randn(2, 3, 4)], tokens="mean")
    with pytest.raises(ValueError, match="tokens must be None"):
        fastfuse.token_moments(torch.randn(2, 3, 4), tokens="cls")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastfuse.token_moments(torch.randn(2, 3, 4), backend="numpy")


def test_normalize_rejects_bad_value():
    with pytest.raises(ValueError, match="normalize must be one of"):
        fastfuse.attentive_pool(torch.randn(2, 3, 4), torch.randn(1, 4), normalize="batchnorm")


# ---- opcheck and torch.compile ---------------------------------------------------------------

def test_opcheck_new_options(backend_device):
    backend, device = backend_device
    dtype = torch.float64 if torch.float64 in get_backend(backend).dtypes else torch.float32
    generator = torch.Generator().manual_seed(2)
    layers = [torch.randn(2, t, 8, dtype=dtype, generator=generator).to(device).requires_grad_()
              for t in (5, 4)]
    weight = torch.randn(2, 8, dtype=dtype, generator=generator).to(device).requires_grad_()
    for tokens in ("cls+ap", "all"):
        torch.library.opcheck(torch.ops.fastfuse.attentive_pool.default,
                              (layers, weight, tokens, 1, 1e-5, backend, "none"))
        torch.library.opcheck(torch.ops.fastfuse.token_moments.default, (layers, tokens, 1, backend))


def test_torch_compile_fullgraph_new_options():
    weight = torch.randn(3, 16, requires_grad=True)

    def step(x):
        mean, var = fastfuse.token_moments(x, backend="torch")
        normed = (x - mean) * torch.rsqrt(var + 1e-5)  # AIM's BatchNorm in training mode
        pooled, attention = fastfuse.attentive_pool(normed, weight, normalize="none", backend="torch")
        return pooled.square().sum() + attention.square().sum()

    x = torch.randn(4, 7, 16, requires_grad=True)
    eager = step(x)
    (grad_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (grad_compiled,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad_compiled, grad_eager)


# ---- magnitude-robust LayerNorm statistics (issue 12 item 7) ---------------------------------

@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e30), (torch.float32, 2.0**100),
                                         (torch.bfloat16, 1e19), (torch.bfloat16, 1e25),
                                         (torch.bfloat16, 1e30)])
@pytest.mark.parametrize("tokens", [None, "cls+ap", "all"])
def test_layernorm_robust_to_magnitude(backend_device, dtype, scale, tokens):
    """LayerNorm is scale-invariant: huge tokens give the outputs of the same tokens unscaled."""
    backend, device = backend_device
    _skip_unsupported(backend, dtype)
    x, _ = _inputs(tokens, dtype=dtype, scale=scale, batch=2, dim=16)
    # the reference: the very same (rounded) token values, divided back in float64
    unscaled = [x] if tokens is None else x
    stacked = stack_tokens([layer.double() / scale for layer in unscaled],
                           "all" if tokens is None else tokens, 2)
    weight = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))
    # eps acts on the huge tokens: on the unscaled ones it is eps / scale^2
    eps = 1e-5 / scale**2
    expected_pooled, expected_attention = pool_reference(stacked, weight, eps=eps)
    moved = _to(x, device)
    moved_weight = weight.to(device).requires_grad_()
    pooled, attention = fastfuse.attentive_pool(moved, moved_weight, tokens=tokens,
                                                num_prefix_tokens=2, backend=backend)
    assert torch.isfinite(pooled).all() and torch.isfinite(attention).all()
    torch.testing.assert_close(pooled.cpu().double(), expected_pooled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(attention.cpu().double(), expected_attention, rtol=1e-4, atol=1e-5)
    # dw is scale-invariant too
    ref_weight = weight.detach().double().requires_grad_()
    ref_pooled, _ = pool_reference(stacked, ref_weight, eps=eps)
    ref_pooled.square().sum().backward()
    pooled.square().sum().backward()
    torch.testing.assert_close(moved_weight.grad.cpu().double(), ref_weight.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("tokens", ["ap", "cls+ap"])
def test_patch_average_does_not_overflow(backend_device, tokens):
    """float32 patches near 1e37, all positive: their sum overflows, their average does not."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(4)
    layers = [((torch.randn(2, 60, 16, generator=generator, dtype=torch.float64) * 0.1 + 3.0))
              for _ in range(2)]
    huge = [(layer * 1e37).float() for layer in layers]
    stacked = stack_tokens([layer.double() / 1e37 for layer in huge], tokens, 1)
    weight = torch.randn(3, 16, generator=generator)
    expected_pooled, expected_attention = pool_reference(stacked, weight, eps=1e-5 / 1e74)
    pooled, attention = fastfuse.attentive_pool(_to(huge, device), weight.to(device), tokens=tokens,
                                                num_prefix_tokens=1, backend=backend)
    torch.testing.assert_close(pooled.cpu().double(), expected_pooled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(attention.cpu().double(), expected_attention, rtol=1e-4, atol=1e-5)


def test_non_finite_token_stays_in_its_sample(backend_device):
    """NaN only where a token holds a non-finite value: that sample, not the others."""
    backend, device = backend_device
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(5)) * 1e30
    x[1, 2, 3] = float("inf")
    weight = torch.randn(2, 8)
    pooled, attention = fastfuse.attentive_pool(x.to(device), weight.to(device), backend=backend)
    expected_pooled, _ = pool_reference(x[[0, 2]].double() / 1e30, weight, eps=1e-65)
    assert torch.isnan(pooled[1]).all()
    torch.testing.assert_close(pooled[[0, 2]].cpu().double(), expected_pooled, rtol=1e-4, atol=1e-4)


def test_constant_huge_token_is_finite(backend_device):
    """A constant token near the dtype's largest value: eps underflows once the token is
    scaled, yet its statistics and every output stay finite."""
    backend, device = backend_device
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(6))
    x[0, 1] = 3e38
    weight = torch.randn(2, 8)
    pooled, attention = fastfuse.attentive_pool(x.to(device), weight.to(device), backend=backend)
    assert torch.isfinite(pooled).all() and torch.isfinite(attention).all()
    torch.testing.assert_close(attention.sum(-1).cpu(), torch.ones(2, 2))
