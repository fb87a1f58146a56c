"""Upstream poolers (the oracles) and the helpers the pooler tests share.

The oracles: timm's real AttentionPoolLatent, and the restatements of V-JEPA, AIM and
efficient probing in tests/upstream_*.py. Nothing here uses fastfuse.
"""
import copy

import pytest
import torch
from torch import nn

import upstream_aim
import upstream_efficient_probing
import upstream_vjepa

timm_layers = pytest.importorskip("timm.layers")

DIM, HEADS = 16, 4


def _timm(**kwargs):
    def build():
        return timm_layers.AttentionPoolLatent(DIM, num_heads=HEADS, norm_layer=nn.LayerNorm, **kwargs)
    return build


# name -> builder of the upstream module (float64 after .double()); several configurations each.
UPSTREAM = {
    "timm-default": _timm(),
    "timm-latent3-avg": _timm(latent_len=3, pool_type="avg", qkv_bias=False),
    "timm-noq-proj-pos": _timm(q_proj=False, pos_embed="abs", feat_size=7, latent_len=2),
    "timm-prelogits": _timm(out_features=0, latent_dim=8),
    "vjepa-classifier": lambda: upstream_vjepa.AttentiveClassifier(embed_dim=DIM, num_heads=HEADS, num_classes=5),
    "vjepa-pooler-depth2-q3": lambda: upstream_vjepa.AttentivePooler(num_queries=3, embed_dim=DIM,
                                                                      num_heads=HEADS, depth=2),
    "vjepa-plain-nobias": lambda: upstream_vjepa.AttentivePooler(num_queries=2, embed_dim=DIM, num_heads=HEADS,
                                                                  qkv_bias=False, complete_block=False),
    "aim-default": lambda: upstream_aim.AttentionPoolingClassifier(DIM, 5, num_heads=HEADS),
    "aim-q3-bias-noavg": lambda: upstream_aim.AttentionPoolingClassifier(DIM, 5, num_heads=HEADS, num_queries=3,
                                                                          qkv_bias=True, linear_bias=True,
                                                                          average_pool=False),
    "aim-no-bn": lambda: upstream_aim.AttentionPoolingClassifier(DIM, 5, num_heads=2, use_batch_norm=False),
    "ep-default": lambda: upstream_efficient_probing.EfficientProbing(DIM, num_queries=4),
    "ep-dout2-bias": lambda: upstream_efficient_probing.EfficientProbing(DIM, qkv_bias=True, num_queries=2,
                                                                          d_out=2, qk_scale=0.3),
}


def num_tokens(name):
    return 7 if "pos" in name else 6


def randomize(module, seed=0, std=0.4):
    """Non-trivial parameters and running statistics (default inits hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float64) * std
            if key.endswith("running_var"):
                noise = 0.5 + noise.abs()
            elif any(part in key for part in ("norm", "norm1", "norm2")) and key.endswith("weight"):
                noise = 1.0 + noise
            value.copy_(noise.to(value.dtype))
    return module


def tokens(batch, count, dim=DIM, seed=1, dtype=torch.float64, offset=0.5):
    generator = torch.Generator().manual_seed(seed)
    # A common offset and uneven channel scales: BatchNorm and the raw-token paths must cope.
    scales = 0.5 + torch.rand(dim, generator=generator, dtype=torch.float64) * 2
    return (torch.randn(batch, count, dim, generator=generator, dtype=torch.float64) * scales + offset).to(dtype)


def rel_err(actual, expected):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-300)


def run_step(module, x, grad_seed=3):
    """Forward in the module's mode and backward of a fixed random projection of the output."""
    out = module(x)
    generator = torch.Generator().manual_seed(grad_seed)
    weight = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.dtype)
    (out * weight).sum().backward()
    return out


def grads(module):
    return {name: param.grad for name, param in module.named_parameters()}


def assert_same_step(upstream, fused, x, tol, tokens_grad):
    """Same output, same gradient for every parameter (and the tokens), same buffers after."""
    x_up = x.clone().requires_grad_(tokens_grad)
    x_fu = x.clone().requires_grad_(tokens_grad)
    out_up, out_fu = run_step(upstream, x_up), run_step(fused, x_fu)
    assert out_fu.shape == out_up.shape
    assert rel_err(out_fu, out_up) < tol
    up_grads, fu_grads = grads(upstream), grads(fused)
    assert set(up_grads) == set(fu_grads)
    # Gradients that are exactly zero in exact arithmetic (the key bias: softmax drops it) are
    # rounding noise upstream; compare every gradient on the scale of the largest one.
    scale = max(g.abs().max().item() for g in up_grads.values() if g is not None)
    for name, expected in up_grads.items():
        actual = fu_grads[name]
        if expected is None:
            assert actual is None or actual.abs().max().item() == 0, name
            continue
        assert actual is not None, name
        assert (actual.double() - expected.double()).abs().max().item() <= tol * scale, name
    if tokens_grad:
        assert rel_err(x_fu.grad, x_up.grad) < tol
    for (name, up_buffer), (_, fu_buffer) in zip(sorted(upstream.state_dict().items()),
                                                 sorted(fused.state_dict().items())):
        if "running" in name or "num_batches" in name:
            assert torch.allclose(fu_buffer.double(), up_buffer.double(), rtol=tol, atol=0), name


def twin(module):
    return copy.deepcopy(module)
