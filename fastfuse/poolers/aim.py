"""AIM's ``AttentionPoolingClassifier`` (apple/ml-aim, aim-v1/aim/v1/torch/layers.py), folded.

Same constructor arguments and state_dict keys (``k``, ``v``, ``cls_token``, ``linear``,
``bn``). The BatchNorm1d over the tokens' channels is the per-channel affine of SPEC §5 with
gain 1/sigma and shift -mu/sigma: the op pools the raw tokens (normalize="none"), the gain
folds into the score rows and the value weight, the shift into the value bias. In training
the statistics over all B*N tokens come from ``fastfuse.token_moments`` (one streaming pass,
differentiable) and the running buffers update exactly as BatchNorm1d updates them.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from . import fold
from ..moments import token_moments


def batchnorm_affine(bn: nn.Module, tokens: torch.Tensor, moments=None, backend: Optional[str] = None):
    """(gain, shift) (D,) of ``bn`` applied to every token, updating its running buffers in
    training as BatchNorm1d does; (None, None) for an identity. ``moments`` (mean, biased
    variance over all tokens) may be given when the caller has them already."""
    if isinstance(bn, nn.Identity):
        return None, None
    if type(bn) is not nn.BatchNorm1d:
        raise ValueError(f"bn must be torch.nn.BatchNorm1d or nn.Identity to fold, got {type(bn).__name__}")
    use_batch = bn.training or bn.running_mean is None
    if use_batch:
        count = tokens.shape[0] * tokens.shape[1]
        if bn.training and count <= 1:
            raise ValueError(f"BatchNorm in training needs more than 1 token in the batch, got x of "
                             f"shape {tuple(tokens.shape)}")
        mean, var = token_moments(tokens, backend=backend) if moments is None else moments
        if bn.training and bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                factor = (1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum)
                unbiased = var.detach() * (count / (count - 1))
                bn.running_mean.mul_(1 - factor).add_(mean.detach().to(bn.running_mean.dtype), alpha=factor)
                bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
    else:
        mean, var = bn.running_mean, bn.running_var
    dtype = tokens.dtype if tokens.dtype == torch.float64 else torch.float32
    gain = torch.rsqrt(var.to(dtype) + bn.eps)
    shift = -mean.to(dtype) * gain
    if bn.affine:
        shift = shift * bn.weight + bn.bias
        gain = gain * bn.weight
    return gain, shift


class AttentionPoolingClassifier(nn.Module):
    """AIM's attention-pooling classifier, folded. forward(x (B, N, D)) -> logits."""

    def __init__(self, dim: int, out_features: int, num_heads: int = 12, num_queries: int = 1,
                 use_batch_norm: bool = True, qkv_bias: bool = False, linear_bias: bool = False,
                 average_pool: bool = True, *, backend: Optional[str] = None):
        super().__init__()
        fold.check_positive_int("dim", dim)
        fold.check_positive_int("num_heads", num_heads)
        fold.check_positive_int("num_queries", num_queries)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.num_queries, self.average_pool = num_heads, num_queries, average_pool
        self.backend = fold.check_backend(backend)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.cls_token = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.linear = nn.Linear(dim, out_features, bias=linear_bias)
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if use_batch_norm else nn.Identity()

    def score_weight(self, gain: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(H * num_queries, D) folded score rows; the queries are the raw ``cls_token``."""
        num_queries, dim = self.cls_token.shape[1:]
        head_dim = dim // self.num_heads
        queries = self.cls_token.reshape(num_queries, self.num_heads, head_dim)
        return fold.score_rows(queries, self.k.weight, head_dim ** -0.5, gain, self.k.bias)

    def token_norm(self):
        return "none", 0.0

    def plan(self, x: torch.Tensor, moments=None):
        """Stage 1: (tokens, score rows, BatchNorm's (gain, shift)); updates the running
        buffers in training. ``moments`` (mean, biased var over the tokens) may be shared."""
        fold.check_tokens(x, self.cls_token.shape[-1], self.cls_token)
        gain, shift = batchnorm_affine(self.bn, x, moments, backend=self.backend)
        return x, self.score_weight(gain), (gain, shift)

    def finish(self, pooled: torch.Tensor, context) -> torch.Tensor:
        """Stage 2 on pooled (B, H*M, D): values, query average, linear."""
        gain, shift = context
        out = fold.project_values(pooled, self.v.weight, self.v.bias, self.num_heads, gain, shift)
        return self.linear(out.mean(dim=1) if self.average_pool else out)

    def forward(self, x: torch.Tensor, *, return_attention: bool = False):
        return fold.run(self, x, return_attention, self.num_heads)

    @classmethod
    def from_upstream(cls, module: nn.Module, backend: Optional[str] = None) -> "AttentionPoolingClassifier":
        if not isinstance(module.k, nn.Linear) or not isinstance(module.v, nn.Linear):
            raise ValueError("k and v must be nn.Linear to fold (a non-linear key path does not fold)")
        if not isinstance(module.bn, (nn.Identity, nn.BatchNorm1d)) or (
                isinstance(module.bn, nn.BatchNorm1d) and type(module.bn) is not nn.BatchNorm1d):
            raise ValueError(f"bn must be BatchNorm1d or Identity to fold, got {type(module.bn).__name__}")
        dim = module.cls_token.shape[-1]
        if dim % module.num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({module.num_heads})")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.num_heads, fused.num_queries = module.num_heads, module.num_queries
        fused.average_pool, fused.backend = module.average_pool, fold.check_backend(backend)
        fused.k, fused.v = copy.deepcopy(module.k), copy.deepcopy(module.v)
        fused.cls_token = nn.Parameter(module.cls_token.detach().clone(),
                                       requires_grad=module.cls_token.requires_grad)
        fused.linear, fused.bn = copy.deepcopy(module.linear), copy.deepcopy(module.bn)
        fused.train(module.training)
        return fused
