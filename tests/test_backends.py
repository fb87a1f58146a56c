"""Every backend against the unfused paper probe (SPEC §1), forward and backward.

One parametrised suite: the ``backend_device`` fixture (conftest.py) runs it for each backend
that can run here. The oracle is fastfuse.paper.PaperAttentiveProbe in float64, fed with a
token stack built independently (tests/reference.py).
"""
import pytest
import torch

import fastfuse
from fastfuse.paper import PaperAttentiveProbe

from reference import TOLERANCE, make_layer, randomize_, rel_err, same_layout, stack_tokens
# The Triton interpreter is slow: its cases keep N*D modest.
SHAPES = [  # (B, N, D, H, qkv_bias, head_dim)
    pytest.param(3, 1, 16, 1, False, None, id="N1-H1"),
    pytest.param(4, 24, 36, 4, True, None, id="N24-D36-bias"),
    pytest.param(5, 197, 33, 3, False, 5, id="N197-D33-hd5"),
    pytest.param(4, 2364, 20, 2, True, None, id="N2364"),
]


def make_pair(dim, heads, classes, dtype, device, backend, seed=0, **kwargs):
    reference = randomize_(PaperAttentiveProbe(dim, heads, classes, **kwargs).double(), seed=seed)
    fused = fastfuse.AttentiveFusion(dim, heads, classes, backend=backend, **kwargs).double()
    fused.load_state_dict(reference.state_dict(), strict=True)
    return reference, fused.to(device=device, dtype=dtype)


def check_grads(reference, fused, ref_inputs, fused_inputs, ref_out, fused_out, tol):
    """All parameter gradients and input gradients, normwise; mathematically-zero gradients
    (a bias before BatchNorm in train mode) are compared against the scale of the others."""
    ref_logits, ref_attn = ref_out
    logits, attn = fused_out
    # A loss that also reads the attention map exercises its gradient path.
    weights = torch.randn(ref_logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    attn_weights = torch.randn(ref_attn.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref_loss = (ref_logits * weights).sum() + (ref_attn * attn_weights).sum()
    loss = (logits * weights.to(logits)).sum() + (attn * attn_weights.to(attn)).sum()
    ref_params = dict(reference.named_parameters())
    params = dict(fused.named_parameters())
    assert ref_params.keys() == params.keys()
    names = list(ref_params)
    ref_grads = torch.autograd.grad(ref_loss, list(ref_inputs) + [ref_params[n] for n in names])
    grads = torch.autograd.grad(loss, list(fused_inputs) + [params[n] for n in names])
    scale = max(g.abs().max().item() for g in ref_grads if g.numel())
    labels = [f"input{i}" for i in range(len(ref_inputs))] + names
    for label, ref_grad, grad in zip(labels, ref_grads, grads):
        assert grad is not None, label
        assert grad.shape == ref_grad.shape, label
        own = ref_grad.abs().max().item() if ref_grad.numel() else 0.0
        # A mathematically-zero gradient (N=1 query, pre-BN biases) is judged by the common scale.
        err = rel_err(grad, ref_grad, scale=own + 0.1 * scale)
        assert err < tol * 10, f"{label}: relative error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("batch,num_tokens,dim,heads,qkv_bias,head_dim", SHAPES)
def test_tokens_match_paper(backend_device, dtype, train, batch, num_tokens, dim, heads, qkv_bias, head_dim):
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and (num_tokens > 200 or dtype == torch.float64):
        if dtype == torch.float64 or not train:
            pytest.skip("interpreter: the long-N and float64 cases run once (f32, train) to stay quick")
    reference, fused = make_pair(dim, heads, 7, dtype, device, backend, qkv_bias=qkv_bias, head_dim=head_dim)
    reference.train(train)
    fused.train(train)
    tokens = torch.randn(batch, num_tokens, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    ref_x = tokens.clone().requires_grad_(True)
    x = tokens.to(device=device, dtype=dtype).requires_grad_(True)
    ref_out = reference(ref_x, return_attention=True)
    out = fused(x, return_attention=True)
    assert out[0].shape == (batch, 7) and out[1].shape == (batch, heads, num_tokens)
    tol = TOLERANCE[dtype]
    assert rel_err(out[0], ref_out[0]) < tol
    assert rel_err(out[1], ref_out[1]) < tol
    check_grads(reference, fused, [ref_x], [x], ref_out, out, tol)


LAYER_MODES = ["cls", "ap", "cls+ap", "all"]


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided-d"])
@pytest.mark.parametrize("num_prefix_tokens", [1, 5])
@pytest.mark.parametrize("tokens", LAYER_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_layers_match_paper(backend_device, dtype, tokens, num_prefix_tokens, layout):
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and dtype == torch.float64 and layout != "contiguous":
        pytest.skip("interpreter: float64 layer cases run once per mode (contiguous) to stay quick")
    batch, dim, heads, lengths = 3, 20, 2, [9, 7, 12]
    reference, fused = make_pair(dim, heads, 5, dtype, device, backend)
    reference.train()
    fused.train()
    generator = torch.Generator().manual_seed(4)
    base_layers = [make_layer(batch, length, dim, layout, generator) for length in lengths]
    ref_layers = [layer.detach().clone().requires_grad_(True) for layer in base_layers]
    layers = [same_layout(layer, dtype, device) for layer in base_layers]  # views as hooks give them
    ref_out = reference(stack_tokens(ref_layers, tokens, num_prefix_tokens), return_attention=True)
    out = fused(layers, tokens=tokens, num_prefix_tokens=num_prefix_tokens, return_attention=True)
    tol = TOLERANCE[dtype]
    assert out[1].shape == ref_out[1].shape
    assert rel_err(out[0], ref_out[0]) < tol
    assert rel_err(out[1], ref_out[1]) < tol
    check_grads(reference, fused, ref_layers, layers, ref_out, out, tol)


def test_dropout_matches_paper(backend_device):
    backend, device = backend_device
    reference, fused = make_pair(24, 3, 4, torch.float64, device, backend, attn_drop=0.3, proj_drop=0.2)
    reference.train()
    fused.train()
    tokens = torch.randn(6, 10, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref_x = tokens.clone().requires_grad_(True)
    x = tokens.to(device).requires_grad_(True)
    torch.manual_seed(11)
    ref_out = reference(ref_x, return_attention=True)
    torch.manual_seed(11)
    out = fused(x, return_attention=True)
    assert rel_err(out[0], ref_out[0]) < 1e-10
    assert rel_err(out[1], ref_out[1]) < 1e-10
    torch.manual_seed(11)
    fused.eval()
    reference.eval()
    assert rel_err(fused(x), reference(ref_x)) < 1e-10


def test_empty_batch_eval(backend_device):
    backend, device = backend_device
    fused = fastfuse.AttentiveFusion(16, 2, 3, backend=backend).to(device).eval()
    assert fused(torch.randn(0, 5, 16, device=device)).shape == (0, 3)
    layers = [torch.randn(0, 4, 16, device=device)] * 2
    logits, attention = fused(layers, tokens="cls+ap", return_attention=True)
    assert logits.shape == (0, 3) and attention.shape == (0, 2, 4)


def test_inputs_not_modified(backend_device):
    backend, device = backend_device
    fused = fastfuse.AttentiveFusion(16, 2, 3, backend=backend).to(device).train()
    layers = [torch.randn(4, 6, 16, device=device, requires_grad=True) for _ in range(2)]
    before = [layer.detach().clone() for layer in layers]
    versions = [layer._version for layer in layers]
    fused(layers, tokens="cls+ap", num_prefix_tokens=2).sum().backward()
    for layer, copy, version in zip(layers, before, versions):
        assert torch.equal(layer.detach(), copy) and layer._version == version
