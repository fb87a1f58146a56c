"""``fastfuse.token_moments``: per-channel mean and biased variance over all gathered tokens.

What BatchNorm1d in training mode needs when it normalises the tokens' channels in front of
an attentive pooler (AIM, SPEC §5): statistics over all B*N tokens, computed by one streaming
reduction in each backend (the compiled and Triton kernels never write the (B, N, D) tokens).
A custom op like ``fastfuse::attentive_pool``: the backend is resolved before the op in eager
mode and by the op itself when it runs (never while torch.compile traces), with a fake kernel
and an autograd formula (the backward, SPEC §5, is small dense algebra in PyTorch
and is itself differentiable).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .backends import get as _get_backend, requested_name, resolve as _resolve_backend
from .op_contract import fake_moments
from .gather import gather_tokens, normalize_inputs, scatter_token_grads


@torch.library.custom_op("fastfuse::token_moments", mutates_args=())
def _token_moments_op(layers: Sequence[Tensor], tokens: str, num_prefix_tokens: int,
                      backend: str) -> tuple[Tensor, Tensor]:
    name = _resolve_backend(backend, layers, None, op="token_moments")
    mean, var = _get_backend(name).moments(layers, tokens, num_prefix_tokens)
    return mean, var


@_token_moments_op.register_fake
def _(layers, tokens, num_prefix_tokens, backend):
    return fake_moments(layers, tokens, num_prefix_tokens)


def _setup_context(ctx, inputs, output):
    layers, tokens, num_prefix_tokens, _backend = inputs
    ctx.save_for_backward(*layers, output[0])
    ctx.options = (tokens, num_prefix_tokens)


def moments_backward(layers, tokens, num_prefix_tokens, mean, grad_mean, grad_var):
    """d layers from d mean, d var: each gathered token x_n (M = B*N of them) gets
    dmean / M + dvar * 2 (x_n - mean) / M (the deviations sum to 0, so var's dependence on
    mean drops out), scattered back through the gathering."""
    acc = mean.dtype
    gathered = gather_tokens(layers, tokens, num_prefix_tokens, acc)
    count = gathered.shape[0] * gathered.shape[1]
    grad_tokens = torch.zeros_like(gathered)
    if grad_mean is not None:
        grad_tokens = grad_tokens + grad_mean.to(acc) / count
    if grad_var is not None:
        grad_tokens = grad_tokens + (gathered - mean) * (2 * grad_var.to(acc) / count)
    return scatter_token_grads(grad_tokens, layers, tokens, num_prefix_tokens)


def _backward(ctx, grad_mean, grad_var):
    *layers, mean = ctx.saved_tensors
    tokens, num_prefix_tokens = ctx.options
    grads = moments_backward(layers, tokens, num_prefix_tokens, mean, grad_mean, grad_var)
    return grads, None, None, None


torch.library.register_autograd("fastfuse::token_moments", _backward, setup_context=_setup_context)


def token_moments(x, *, tokens: Optional[str] = None, num_prefix_tokens: int = 1,
                  backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over all B*N gathered tokens, fused.

    Args:
        x, tokens, num_prefix_tokens, backend: as for :func:`fastfuse.attentive_pool` (a
            (B, N, D) tensor, or layer activations and a token spec).

    Returns:
        mean (D,) and var (D,) (biased: divided by B*N), float64 for float64 tokens, else
        float32; differentiable w.r.t. ``x``. With no token at all both are NaN.
    """
    layers, tokens, num_prefix_tokens = normalize_inputs(x, tokens, num_prefix_tokens)
    name = requested_name(backend)
    if not torch.compiler.is_compiling():
        name = _resolve_backend(name, layers, None, op="token_moments")
    mean, var = _token_moments_op(list(layers), tokens, num_prefix_tokens, name)
    return mean, var


__all__ = ["token_moments", "moments_backward"]
