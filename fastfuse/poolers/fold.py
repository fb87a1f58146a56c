"""The fold rules every pooler shares (SPEC §5), written once.

A pooler here normalises each token (LayerNorm without affine, or nothing), applies a
per-channel affine ``t_n = gain * N(x_n) + shift``, projects keys and values linearly and
softmax-pools over the tokens with learned queries shared by the batch. Then:

    score rows   w_{h,m} = scale * gain * (W_k,h^T q_{h,m})        (key bias and shift cancel)
    pooled       z_{h,m} = sum_n a_{h,m,n} N(x_n)                  (the fused op)
    values       W_v,h (gain * z_{h,m} + shift) + b_v,h            (the weights sum to 1)

Rows are ordered head-major (h, m), so the op's attention reshapes to (B, H, M, N): the
layout of the upstream attention maps.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops import attentive_pool


def score_rows(queries: Tensor, key_weight: Tensor, scale: float,
               gain: Optional[Tensor] = None, key_bias: Optional[Tensor] = None) -> Tensor:
    """(H*M, D) score vectors from queries (M, H, hd) and the key weight (H*hd, D).

    A separate key bias cancels in the softmax; adding it times zero keeps its gradient an
    exact zero instead of None, so optimizers treat it as they do upstream.
    """
    num_queries, heads, head_dim = queries.shape
    keys = key_weight.reshape(heads, head_dim, key_weight.shape[-1])
    rows = torch.einsum("mhe,hed->hmd", queries, keys) * scale
    if gain is not None:
        rows = rows * gain
    if key_bias is not None:
        rows = rows + 0.0 * key_bias.sum()
    return rows.reshape(heads * num_queries, -1)


def pool(tokens: Tensor, rows: Tensor, *, normalize: str, eps: float,
         backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """The fused op on (B, N, D) tokens; pooled (B, H*M, D) in the rows' dtype, attention as is."""
    pooled, attention = attentive_pool(tokens, rows, normalize=normalize, eps=eps, backend=backend)
    return pooled.to(rows.dtype), attention


def project_values(pooled: Tensor, value_weight: Tensor, value_bias: Optional[Tensor], heads: int,
                   gain: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """Per head and query ``W_v,h (gain * z + shift) + b_v,h``: (B, H*M, D) -> (B, M, H*hd).

    The gain folds into the (small) value weight and the shift into a per-head bias, so the
    pooled tensor meets one batched matmul.
    """
    batch, rows, dim = pooled.shape
    num_queries = rows // heads
    head_dim = value_weight.shape[0] // heads
    weight = value_weight if gain is None else value_weight * gain
    bias = None
    if shift is not None:
        bias = value_weight @ shift
    if value_bias is not None:
        bias = value_bias if bias is None else bias + value_bias
    weight = weight.reshape(heads, head_dim, dim)
    by_head = pooled.reshape(batch, heads, num_queries, dim).transpose(0, 1)   # (H, B, M, D)
    values = torch.matmul(by_head.reshape(heads, batch * num_queries, dim), weight.transpose(1, 2))
    values = values.reshape(heads, batch, num_queries, head_dim).permute(1, 2, 0, 3)  # (B, M, H, hd)
    if bias is not None:
        values = values + bias.reshape(heads, head_dim)
    return values.reshape(batch, num_queries, heads * head_dim)


def run(pooler, x: Tensor, return_attention: bool, heads: int):
    """A pooler's forward: ``plan`` (score rows), the fused op, ``finish`` (the dense tail).

    Every fused pooler exposes these stages, so P probes of one family can share one op call
    on their stacked score rows (fastfuse.sweep.families).
    """
    tokens, rows, context = pooler.plan(x)
    normalize, eps = pooler.token_norm()
    pooled, attention = pool(tokens, rows, normalize=normalize, eps=eps, backend=pooler.backend)
    out = pooler.finish(pooled, context)
    return (out, attention_map(attention, heads)) if return_attention else out


def attention_map(attention: Tensor, heads: int) -> Tensor:
    """(B, H*M, N) -> (B, H, M, N), the upstream layout of attention maps."""
    batch, rows, num_tokens = attention.shape
    return attention.reshape(batch, heads, rows // heads, num_tokens)


def check_tokens(x, dim: int, reference: Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a (batch, tokens, {dim}) tensor, got {shape}")
    if x.shape[-1] != dim:
        raise ValueError(f"x has feature size {x.shape[-1]} but the pooler was built for {dim}")
    if x.device != reference.device:
        raise ValueError(f"x is on {x.device} but the pooler's parameters are on {reference.device}")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_backend(backend: Optional[str]) -> Optional[str]:
    if backend is not None:
        from ..backends import requested_name
        requested_name(backend)   # fail at construction on an unknown name
    return backend
