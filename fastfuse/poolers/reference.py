"""Unfused restatements of the non-package upstream poolers: the benchmarks' "upstream" rows.

Written from reading each project's public source (not copied), with the upstream class
names, constructor arguments and state_dict keys, so ``fastfuse.fuse`` folds them:

    AttentiveClassifier         facebookresearch/jepa, src/models/attentive_pooler.py
                                (+ src/models/utils/modules.py: CrossAttentionBlock, MLP)
    AttentionPoolingClassifier  apple/ml-aim, aim-v1/aim/v1/torch/layers.py
    EfficientProbing            billpsomas/efficient-probing, poolings/ep.py

Every token is projected to keys and values, as upstream. They share no code with the folded
classes (the tests hold both against their own independent restatements in tests/).
timm's pooler needs none: the benchmarks use timm's own module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*hd) -> (B, H, L, hd)."""
    batch, length, width = t.shape
    return t.reshape(batch, length, heads, width // heads).permute(0, 2, 1, 3)


def _merge(t: torch.Tensor) -> torch.Tensor:
    """(B, H, L, hd) -> (B, L, H*hd)."""
    batch, heads, length, head_dim = t.shape
    return t.permute(0, 2, 1, 3).reshape(batch, length, heads * head_dim)


class _VJepaMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class _VJepaCrossAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries, x):
        keys, values = self.kv(x).chunk(2, dim=-1)
        attended = F.scaled_dot_product_attention(_heads(self.q(queries), self.num_heads),
                                                  _heads(keys, self.num_heads), _heads(values, self.num_heads))
        return self.proj(_merge(attended))


class _VJepaCrossAttentionBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.xattn = _VJepaCrossAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _VJepaMLP(dim, int(dim * mlp_ratio))

    def forward(self, queries, x):
        queries = queries + self.xattn(queries, self.norm1(x))
        return queries + self.mlp(self.norm2(queries))


class AttentivePooler(nn.Module):
    """V-JEPA's pooler with ``complete_block=True`` and ``depth=1`` (its probe's defaults)."""

    def __init__(self, num_queries=1, embed_dim=768, num_heads=12, mlp_ratio=4.0, qkv_bias=True):
        super().__init__()
        self.complete_block, self.blocks = True, None
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, embed_dim) * 0.02)
        self.cross_attention_block = _VJepaCrossAttentionBlock(embed_dim, num_heads, mlp_ratio, qkv_bias)

    def forward(self, x):
        return self.cross_attention_block(self.query_tokens.expand(x.shape[0], -1, -1), x)


class AttentiveClassifier(nn.Module):
    def __init__(self, embed_dim=768, num_heads=12, mlp_ratio=4.0, qkv_bias=True, num_classes=1000):
        super().__init__()
        self.pooler = AttentivePooler(1, embed_dim, num_heads, mlp_ratio, qkv_bias)
        self.linear = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        return self.linear(self.pooler(x)[:, 0])


class AttentionPoolingClassifier(nn.Module):
    """AIM's head: BatchNorm1d(affine=False) over the tokens' channels, K/V of every token."""

    def __init__(self, dim, out_features, num_heads=12, num_queries=1, use_batch_norm=True,
                 qkv_bias=False, linear_bias=False, average_pool=True):
        super().__init__()
        self.num_heads, self.num_queries, self.average_pool = num_heads, num_queries, average_pool
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.cls_token = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.linear = nn.Linear(dim, out_features, bias=linear_bias)
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if use_batch_norm else nn.Identity()

    def forward(self, x):
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        queries = self.cls_token.expand(x.shape[0], -1, -1)
        pooled = _merge(F.scaled_dot_product_attention(_heads(queries, self.num_heads),
                                                       _heads(self.k(x), self.num_heads),
                                                       _heads(self.v(x), self.num_heads)))
        return self.linear(pooled.mean(1) if self.average_pool else pooled)


class EfficientProbing(nn.Module):
    """Raw tokens as keys; query m reads slice m of one value projection (num_heads=1)."""

    def __init__(self, dim, num_heads=1, qkv_bias=False, qk_scale=None, num_queries=32, d_out=1):
        super().__init__()
        self.num_heads, self.d_out, self.num_queries = num_heads, d_out, num_queries
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.v = nn.Linear(dim, dim // d_out, bias=qkv_bias)
        self.cls_token = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)

    def forward(self, x):
        batch, num_tokens, _ = x.shape
        weights = torch.softmax(self.scale * self.cls_token @ x.transpose(1, 2), dim=-1)   # (B, M, N)
        values = self.v(x).reshape(batch, num_tokens, self.num_queries, -1).transpose(1, 2)   # (B, M, N, c)
        return (weights.unsqueeze(2) @ values).reshape(batch, -1)
