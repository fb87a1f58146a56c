"""Efficient probing's ``EfficientProbing`` (billpsomas/efficient-probing, poolings/ep.py), folded.

Same constructor arguments and state_dict keys (``v``, ``cls_token``). Keys are the raw
tokens (no norm, no key projection: W_k = I), so the score rows are the scaled queries
themselves and the op pools the raw tokens (normalize="none"). Query m reads its own slice m of
the one value projection (width dim // d_out), which therefore acts on that query's pooled
token only: M small matrix-vector products per sample instead of projecting every token.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from . import fold


class EfficientProbing(nn.Module):
    """Efficient probing, folded. forward(x (B, N, D)) -> (B, dim // d_out).

    Upstream's forward is defined for ``num_heads=1`` only (its per-query value slices are laid
    out for one head); other values are refused. ``cls=`` (per-sample queries) does not fold:
    the fused op shares its score rows across the batch.
    """

    def __init__(self, dim: int, num_heads: int = 1, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, num_queries: int = 32, d_out: int = 1, *,
                 backend: Optional[str] = None):
        super().__init__()
        fold.check_positive_int("dim", dim)
        fold.check_positive_int("num_queries", num_queries)
        fold.check_positive_int("d_out", d_out)
        _check_heads(num_heads)
        if dim % (d_out * num_queries):
            raise ValueError(f"dim ({dim}) must be divisible by d_out * num_queries ({d_out} * {num_queries}): "
                             "each query pools its own slice of the value projection")
        self.num_heads = num_heads
        self.scale = qk_scale or dim ** -0.5
        self.d_out, self.num_queries = d_out, num_queries
        self.backend = fold.check_backend(backend)
        self.v = nn.Linear(dim, dim // d_out, bias=qkv_bias)
        self.cls_token = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)

    def score_weight(self) -> torch.Tensor:
        """(num_queries, D): w_m = scale * q_m (no key projection)."""
        return self.cls_token.reshape(self.num_queries, -1) * self.scale

    def token_norm(self):
        return "none", 0.0

    def plan(self, x: torch.Tensor):
        fold.check_tokens(x, self.cls_token.shape[-1], self.cls_token)
        return x, self.score_weight(), None

    def finish(self, pooled: torch.Tensor, _context=None) -> torch.Tensor:
        """Query m's pooled token through slice m of the value projection -> (B, dim // d_out)."""
        batch, num_queries, dim = pooled.shape
        weight = self.v.weight.reshape(num_queries, -1, dim)                   # (M, c, D)
        out = torch.matmul(pooled.transpose(0, 1), weight.transpose(1, 2))    # (M, B, c)
        out = out.transpose(0, 1)
        if self.v.bias is not None:
            out = out + self.v.bias.reshape(num_queries, -1)
        return out.reshape(batch, -1)

    def forward(self, x: torch.Tensor, cls=None, *, return_attention: bool = False, **_unused):
        if cls is not None:
            raise ValueError("cls (per-sample queries) does not fold: the fused op shares its score "
                             "rows across the batch; use the upstream module for per-sample queries")
        return fold.run(self, x, return_attention, 1)

    @classmethod
    def from_upstream(cls, module: nn.Module, backend: Optional[str] = None) -> "EfficientProbing":
        _check_heads(module.num_heads)
        if not isinstance(module.v, nn.Linear):
            raise ValueError("v must be an nn.Linear to fold")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.num_heads, fused.scale = module.num_heads, module.scale
        fused.d_out, fused.num_queries = module.d_out, module.num_queries
        fused.backend = fold.check_backend(backend)
        fused.v = copy.deepcopy(module.v)
        fused.cls_token = nn.Parameter(module.cls_token.detach().clone(),
                                       requires_grad=module.cls_token.requires_grad)
        dim = fused.cls_token.shape[-1]
        if dim % (fused.d_out * fused.num_queries):
            raise ValueError(f"dim ({dim}) must be divisible by d_out * num_queries")
        fused.train(module.training)
        return fused


def _check_heads(num_heads) -> None:
    if num_heads != 1:
        raise ValueError(f"num_heads={num_heads!r}: efficient probing's forward is defined for "
                         "num_heads=1 only (its value slices are laid out per query, not per head)")
