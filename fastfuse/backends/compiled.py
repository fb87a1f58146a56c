"""Callers of the compiled kernel ops, shared by the cpu and cuda backends: one op, and the
tensors' device picks the CPU or the CUDA kernel (schemas: compiled_ops.py;
contract: fastfuse/op_contract.py)."""
from __future__ import annotations

import torch


def forward(layers, score_weight, tokens, num_prefix_tokens, eps, normalize="layernorm"):
    return torch.ops.fastfuse.fused_pool_forward(list(layers), score_weight, tokens,
                                                 num_prefix_tokens, eps, normalize)


def backward(grad_pooled, grad_attention, layers, score_weight, pooled, attention, mean, rstd,
             tokens, num_prefix_tokens, layers_need_grad=True, normalize="layernorm"):
    return torch.ops.fastfuse.fused_pool_backward(
        grad_pooled, grad_attention, list(layers), score_weight, pooled, attention, mean, rstd,
        tokens, num_prefix_tokens, layers_need_grad, normalize)


def moments(layers, tokens, num_prefix_tokens):
    return torch.ops.fastfuse.fused_token_moments(list(layers), tokens, num_prefix_tokens)


def gather(layers, tokens, num_prefix_tokens):
    """The (B, N, D) stack of gathered tokens (a CPU kernel only: csrc/cpu/gather_tokens.cpp)."""
    return torch.ops.fastfuse.fused_gather_tokens(list(layers), tokens, num_prefix_tokens)
