"""The "torch" backend: SPEC §2 in plain PyTorch ops, folded but not fused.

It materialises the (B, N, D) gathered and normalised tokens, so it is the slow, obvious
statement of the kernel contract (fastfuse/op_contract.py) that runs on any device.
Forward and backward are written out (not left to autograd) so that every backend implements
the same two functions behind the one custom op.
"""
from __future__ import annotations

import torch

from ..gather import gather_tokens, scatter_token_grads
from ..op_contract import compute_dtype
from .base import Backend


def token_scale(peak):
    """The power of two 2^floor(log2 peak) by which a token whose largest magnitude is ``peak``
    is divided before its LayerNorm statistics (1 unless peak > 1 and finite), so that squares
    cannot overflow (issue 12 item 7). Dividing by a power of two is exact: wherever the
    unscaled statistics are finite, the scaled ones are the same bits (csrc/common/
    fused_pool_math.h states the same rule for the compiled kernels)."""
    _, exponent = torch.frexp(peak)
    scale = torch.ldexp(torch.ones_like(peak), exponent - 1)
    return torch.where((peak > 1) & torch.isfinite(peak), scale, torch.ones_like(peak))


def layernorm_statistics(gathered, eps):
    """(mean, rstd) per token (SPEC §2), robust to the tokens' magnitude (see token_scale)."""
    scale = token_scale(gathered.abs().amax(dim=-1))
    scaled = gathered / scale.unsqueeze(-1)
    mean = scaled.mean(dim=-1)
    variance = (scaled - mean.unsqueeze(-1)).square().mean(dim=-1)
    # eps scales with the squares; once it underflows, a constant huge token would get
    # rsqrt(0): the smallest normal number keeps its rstd finite (and its xh 0).
    denominator = variance + eps / scale / scale
    tiny = torch.finfo(gathered.dtype).tiny
    denominator = torch.where(scale > 1, denominator.clamp_min(tiny), denominator)
    return mean * scale, torch.rsqrt(denominator) / scale


def _normalized_tokens(layers, tokens, num_prefix_tokens, eps, acc, normalize):
    gathered = gather_tokens(layers, tokens, num_prefix_tokens, acc)
    if normalize == "none":  # raw tokens: mean 0 and rstd 1 stand for the identity
        ones = gathered.new_ones(gathered.shape[:-1])
        return gathered, torch.zeros_like(ones), ones
    mean, rstd = layernorm_statistics(gathered, eps)
    return (gathered - mean.unsqueeze(-1)) * rstd.unsqueeze(-1), mean, rstd


def forward(layers, score_weight, tokens, num_prefix_tokens, eps, normalize="layernorm"):
    acc = compute_dtype(layers[0].dtype)
    normed, mean, rstd = _normalized_tokens(layers, tokens, num_prefix_tokens, eps, acc, normalize)
    scores = torch.einsum("bnd,hd->bhn", normed, score_weight.to(acc))
    attention = torch.softmax(scores, dim=-1)
    pooled = torch.einsum("bhn,bnd->bhd", attention, normed)
    return pooled, attention, mean, rstd


def backward(grad_pooled, grad_attention, layers, score_weight, pooled, attention, mean, rstd,
             tokens, num_prefix_tokens, layers_need_grad=True, normalize="layernorm"):
    acc = compute_dtype(layers[0].dtype)
    weight = score_weight.to(acc)
    gathered = gather_tokens(layers, tokens, num_prefix_tokens, acc)
    normed = (gathered - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    grad_pooled = grad_pooled.to(acc)
    # SPEC §2 backward; grad_attention (if any) enters the softmax backward beside g . xh.
    grad_attn_total = torch.einsum("bhd,bnd->bhn", grad_pooled, normed)
    centre = (grad_pooled * pooled).sum(dim=-1, keepdim=True)
    if grad_attention is not None:
        grad_attention = grad_attention.to(acc)
        grad_attn_total = grad_attn_total + grad_attention
        centre = centre + (attention * grad_attention).sum(dim=-1, keepdim=True)
    grad_scores = attention * (grad_attn_total - centre)
    grad_weight = torch.einsum("bhn,bnd->hd", grad_scores, normed).to(score_weight.dtype)
    if not layers_need_grad:
        return [], grad_weight
    grad_normed = (torch.einsum("bhn,bhd->bnd", attention, grad_pooled)
                   + torch.einsum("bhn,hd->bnd", grad_scores, weight))
    if normalize == "none":
        grad_tokens = grad_normed
    else:
        grad_tokens = rstd.unsqueeze(-1) * (
            grad_normed
            - grad_normed.mean(dim=-1, keepdim=True)
            - normed * (grad_normed * normed).mean(dim=-1, keepdim=True)
        )
    grad_layers = scatter_token_grads(grad_tokens, layers, tokens, num_prefix_tokens)
    return grad_layers, grad_weight


def moments(layers, tokens, num_prefix_tokens):
    """token_moments: per-channel mean and biased variance over all B*N gathered tokens
    (two passes over the materialised tokens, in the compute dtype)."""
    gathered = gather_tokens(layers, tokens, num_prefix_tokens, compute_dtype(layers[0].dtype))
    flat = gathered.reshape(-1, gathered.shape[-1])
    mean = flat.mean(dim=0)
    return mean, (flat - mean).square().mean(dim=0)


def _availability() -> tuple[bool, str]:
    return True, "pure PyTorch, runs on any device"


BACKEND = Backend("torch", ("cpu", "cuda", "meta", "mps", "xpu"), _availability, forward, backward,
                  moments=moments)
