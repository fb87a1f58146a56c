"""Schemas of the compiled kernels (csrc/cpu, csrc/cuda), declared once, here.

The C++ and CUDA libraries only add ``TORCH_LIBRARY_IMPL(fastfuse, CPU|CUDA, m)``, so these
ops exist (with fake kernels, for torch.compile and opcheck) even when the compiled library is
missing. Semantics: SPEC §2-§3; the pure-PyTorch statement of the same contract is
``fastfuse/backends/torch.py``.

``fused_pool_forward(layers, score_weight, tokens, num_prefix_tokens, eps)``
    layers: L >= 1 tensors (B, T_l, D), one dtype, any strides; score_weight: (H, D),
    contiguous, in the compute dtype (float64 for float64 layers, else float32).
    Returns pooled (B, H, D), attention (B, H, N), mean (B, N), rstd (B, N), all contiguous
    in the compute dtype.
``fused_pool_backward(grad_pooled, grad_attention, layers, score_weight, pooled, attention,
mean, rstd, tokens, num_prefix_tokens, layers_need_grad)``
    Returns the gradient of every layer (contiguous, (B, T_l, D), the layer's dtype) and of
    score_weight ((H, D), compute dtype). grad_attention may be None. With
    layers_need_grad false (frozen features) the list is empty and no dx is computed.
"""
from __future__ import annotations

import torch

from ..gather import num_gathered_tokens

_lib = torch.library.Library("fastfuse", "DEF")
_lib.define(
    "fused_pool_forward(Tensor[] layers, Tensor score_weight, str tokens, "
    "int num_prefix_tokens, float eps) -> (Tensor, Tensor, Tensor, Tensor)"
)
_lib.define(
    "fused_pool_backward(Tensor grad_pooled, Tensor? grad_attention, Tensor[] layers, "
    "Tensor score_weight, Tensor pooled, Tensor attention, Tensor mean, Tensor rstd, "
    "str tokens, int num_prefix_tokens, bool layers_need_grad) -> (Tensor[], Tensor)"
)


# attentive_pool's normalize=: the per-token normalisation N(x_n) of SPEC §5.
NORMALIZATIONS = ("layernorm", "none")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 layers accumulate in float64; every other floating dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fake_forward(layers, score_weight, tokens, num_prefix_tokens, eps, normalize="layernorm"):
    batch, dim = layers[0].shape[0], layers[0].shape[2]
    heads = score_weight.shape[0]
    num_tokens = num_gathered_tokens([layer.shape[1] for layer in layers], tokens)
    acc = compute_dtype(layers[0].dtype)
    new = layers[0].new_empty
    return (
        new((batch, heads, dim), dtype=acc),
        new((batch, heads, num_tokens), dtype=acc),
        new((batch, num_tokens), dtype=acc),
        new((batch, num_tokens), dtype=acc),
    )


def fake_backward(grad_pooled, grad_attention, layers, score_weight, pooled, attention,
                  mean, rstd, tokens, num_prefix_tokens, layers_need_grad, normalize="layernorm"):
    grad_layers = [torch.empty_like(layer, memory_format=torch.contiguous_format)
                   for layer in layers] if layers_need_grad else []
    return grad_layers, torch.empty_like(score_weight)


def fake_moments(layers, tokens, num_prefix_tokens):
    """token_moments: per-channel mean and biased variance (D,), in the compute dtype."""
    dim = layers[0].shape[2]
    acc = compute_dtype(layers[0].dtype)
    return layers[0].new_empty((dim,), dtype=acc), layers[0].new_empty((dim,), dtype=acc)


torch.library.register_fake("fastfuse::fused_pool_forward", fake_forward)
torch.library.register_fake("fastfuse::fused_pool_backward", fake_backward)
