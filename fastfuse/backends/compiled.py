"""Callers of the compiled kernel ops, shared by the cpu and cuda backends: one op, and the
tensors' device picks the CPU or the CUDA kernel (schemas: compiled_ops.py;
contract: fastfuse/op_contract.py)."""
from __future__ import annotations

import torch


def _check_layernorm(normalize):
    if normalize != "layernorm":
        raise NotImplementedError(f"the compiled kernels do not support normalize={normalize!r} yet")


def forward(layers, score_weight, tokens, num_prefix_tokens, eps, normalize="layernorm"):
    _check_layernorm(normalize)
    return torch.ops.fastfuse.fused_pool_forward(list(layers), score_weight, tokens,
                                                 num_prefix_tokens, eps)


def backward(grad_pooled, grad_attention, layers, score_weight, pooled, attention, mean, rstd,
             tokens, num_prefix_tokens, layers_need_grad=True, normalize="layernorm"):
    _check_layernorm(normalize)
    return torch.ops.fastfuse.fused_pool_backward(
        grad_pooled, grad_attention, list(layers), score_weight, pooled, attention, mean, rstd,
        tokens, num_prefix_tokens, layers_need_grad)
