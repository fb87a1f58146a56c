"""What every implementation of the fused op returns: dtypes, shapes, and the fake kernels.

One statement of the kernel contract (SPEC §3), shared by the public op (fastfuse/ops.py), the
compiled kernels' schemas (fastfuse/backends/compiled_ops.py) and every backend, so that a new
option of the op changes one place. The fake kernels keep sizes symbolic (no ``int()`` of a
size), so ``torch.compile(dynamic=True)`` traces one graph for every batch and token count.

forward(layers, score_weight, tokens, num_prefix_tokens, eps)
    layers: L >= 1 tensors (B, T_l, D), one dtype, any strides; score_weight: (H, D) in the
    compute dtype. Returns pooled (B, H, D), attention (B, H, N), mean (B, N), rstd (B, N),
    contiguous, in the compute dtype (N: :func:`fastfuse.gather.num_gathered_tokens`).
backward(grad_pooled, grad_attention, layers, score_weight, pooled, attention, mean, rstd,
tokens, num_prefix_tokens, layers_need_grad)
    Returns the gradient of every layer (contiguous (B, T_l, D), the layer's dtype) and of
    score_weight ((H, D), its dtype). grad_attention may be None. With layers_need_grad false
    (frozen features) the list is empty and no token gradient is computed.
normalize ("layernorm" or "none", SPEC §5) changes no shape or dtype. token_moments(layers,
tokens, num_prefix_tokens) returns mean (D,) and var (D,) in the compute dtype;
gather_tokens(layers, tokens, num_prefix_tokens) the gathered (B, N, D) stack, contiguous, in
the compute dtype (fastfuse.gather.gather_tokens's values).
"""
from __future__ import annotations

import torch

from .gather import num_gathered_tokens

# attentive_pool's normalize=: the per-token normalisation N(x_n) of SPEC §5.
NORMALIZATIONS = ("layernorm", "none")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 layers accumulate in float64; every other floating dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward_shapes(layers, score_weight, tokens: str):
    """Shapes of (pooled, attention, mean, rstd); symbolic sizes stay symbolic."""
    batch, dim = layers[0].shape[0], layers[0].shape[2]
    heads = score_weight.shape[0]
    num_tokens = num_gathered_tokens([layer.shape[1] for layer in layers], tokens)
    return (batch, heads, dim), (batch, heads, num_tokens), (batch, num_tokens), (batch, num_tokens)


def fake_forward(layers, score_weight, tokens, num_prefix_tokens, eps, normalize="layernorm"):
    acc = compute_dtype(layers[0].dtype)
    return tuple(layers[0].new_empty(shape, dtype=acc)
                 for shape in forward_shapes(layers, score_weight, tokens))


def fake_backward(grad_pooled, grad_attention, layers, score_weight, pooled, attention,
                  mean, rstd, tokens, num_prefix_tokens, layers_need_grad, normalize="layernorm"):
    grad_layers = [torch.empty_like(layer, memory_format=torch.contiguous_format)
                   for layer in layers] if layers_need_grad else []
    return grad_layers, torch.empty_like(score_weight)


def fake_gather(layers, tokens, num_prefix_tokens):
    """gather_tokens: the (B, N, D) stack of the gathered tokens, in the compute dtype."""
    batch, dim = layers[0].shape[0], layers[0].shape[2]
    num_tokens = num_gathered_tokens([layer.shape[1] for layer in layers], tokens)
    return layers[0].new_empty((batch, num_tokens, dim), dtype=compute_dtype(layers[0].dtype))


def fake_moments(layers, tokens, num_prefix_tokens):
    """token_moments: per-channel mean and biased variance (D,), in the compute dtype."""
    dim = layers[0].shape[2]
    acc = compute_dtype(layers[0].dtype)
    return layers[0].new_empty((dim,), dtype=acc), layers[0].new_empty((dim,), dtype=acc)
