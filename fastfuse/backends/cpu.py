"""The "cpu" backend: the compiled C++ kernels of csrc/cpu behind the fused op's schema."""
from __future__ import annotations

import torch

from .. import _extension
from . import Backend


def _availability() -> tuple[bool, str]:
    loaded, reason = _extension.load()
    if not loaded:
        return False, reason
    return True, "compiled C++ kernels (csrc/cpu), OpenMP over the batch"


def _forward(layers, score_weight, tokens, num_prefix_tokens, eps):
    return torch.ops.fastfuse.fused_pool_forward(list(layers), score_weight, tokens,
                                                 num_prefix_tokens, eps)


def _backward(grad_pooled, grad_attention, layers, score_weight, pooled, attention, mean, rstd,
              tokens, num_prefix_tokens, layers_need_grad=True):
    return torch.ops.fastfuse.fused_pool_backward(
        grad_pooled, grad_attention, list(layers), score_weight, pooled, attention, mean, rstd,
        tokens, num_prefix_tokens, layers_need_grad)


BACKEND = Backend("cpu", ("cpu",), _availability, _forward, _backward,
                  dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
