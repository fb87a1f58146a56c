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


def _normalized_tokens(layers, tokens, num_prefix_tokens, eps, acc):
    gathered = gather_tokens(layers, tokens, num_prefix_tokens, acc)
    mean = gathered.mean(dim=-1)
    centered = gathered - mean.unsqueeze(-1)
    rstd = torch.rsqrt(centered.square().mean(dim=-1) + eps)
    return centered * rstd.unsqueeze(-1), mean, rstd


def forward(layers, score_weight, tokens, num_prefix_tokens, eps):
    acc = compute_dtype(layers[0].dtype)
    normed, mean, rstd = _normalized_tokens(layers, tokens, num_prefix_tokens, eps, acc)
    scores = torch.einsum("bnd,hd->bhn", normed, score_weight.to(acc))
    attention = torch.softmax(scores, dim=-1)
    pooled = torch.einsum("bhn,bnd->bhd", attention, normed)
    return pooled, attention, mean, rstd


def backward(grad_pooled, grad_attention, layers, score_weight, pooled, attention, mean, rstd,
             tokens, num_prefix_tokens, layers_need_grad=True):
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
    grad_tokens = rstd.unsqueeze(-1) * (
        grad_normed
        - grad_normed.mean(dim=-1, keepdim=True)
        - normed * (grad_normed * normed).mean(dim=-1, keepdim=True)
    )
    grad_layers = scatter_token_grads(grad_tokens, layers, tokens, num_prefix_tokens)
    return grad_layers, grad_weight


def _availability() -> tuple[bool, str]:
    return True, "pure PyTorch, runs on any device"


BACKEND = Backend("torch", ("cpu", "cuda", "meta", "mps", "xpu"), _availability, forward, backward)
