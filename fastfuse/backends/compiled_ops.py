"""Schemas of the compiled kernels (csrc/cpu, csrc/cuda), declared once, here.

The C++ and CUDA libraries only add ``TORCH_LIBRARY_IMPL(fastfuse, CPU|CUDA, m)``, so these
ops exist (with fake kernels, for torch.compile and opcheck) even when the compiled library is
missing. Arguments, outputs and their dtypes: the kernel contract of fastfuse/op_contract.py
(semantics: SPEC §2-§3). This file holds nothing else: the compiled library records its hash
and is refused when it changes (fastfuse/_extension.py).
"""
from __future__ import annotations

import torch

from ..op_contract import fake_backward, fake_forward, fake_gather, fake_moments

_lib = torch.library.Library("fastfuse", "DEF")
_lib.define(
    "fused_pool_forward(Tensor[] layers, Tensor score_weight, str tokens, "
    "int num_prefix_tokens, float eps, str normalize=\"layernorm\") -> (Tensor, Tensor, Tensor, Tensor)"
)
_lib.define(
    "fused_pool_backward(Tensor grad_pooled, Tensor? grad_attention, Tensor[] layers, "
    "Tensor score_weight, Tensor pooled, Tensor attention, Tensor mean, Tensor rstd, "
    "str tokens, int num_prefix_tokens, bool layers_need_grad, str normalize=\"layernorm\""
    ") -> (Tensor[], Tensor)"
)
_lib.define("fused_token_moments(Tensor[] layers, str tokens, int num_prefix_tokens) -> (Tensor, Tensor)")
_lib.define("fused_gather_tokens(Tensor[] layers, str tokens, int num_prefix_tokens) -> Tensor")
torch.library.register_fake("fastfuse::fused_pool_forward", fake_forward)
torch.library.register_fake("fastfuse::fused_pool_backward", fake_backward)
torch.library.register_fake("fastfuse::fused_token_moments", fake_moments)
torch.library.register_fake("fastfuse::fused_gather_tokens", fake_gather)
