"""The paper's probe, unfused, exactly as SPEC §1 states it (CAE-style cross-attention).

This is the readable definition of the function fastfuse computes, the oracle of the tests and
the "paper" row of the benchmarks. It shares no code with the folded paths it checks: every
token is projected to keys and values, as in the paper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PaperCrossAttention(nn.Module):
    def __init__(self, dim, num_heads, head_dim, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = head_dim ** -0.5
        inner = num_heads * head_dim
        self.q = nn.Linear(dim, inner, bias=False)
        self.k = nn.Linear(dim, inner, bias=False)
        self.v = nn.Linear(dim, inner, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(inner))
            self.v_bias = nn.Parameter(torch.zeros(inner))
        else:
            self.q_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, query, keys, values):
        batch, num_tokens = keys.shape[0], keys.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        q = F.linear(query, self.q.weight, self.q_bias).reshape(batch, 1, heads, head_dim).transpose(1, 2)
        k = F.linear(keys, self.k.weight).reshape(batch, num_tokens, heads, head_dim).transpose(1, 2)
        v = F.linear(values, self.v.weight, self.v_bias).reshape(batch, num_tokens, heads, head_dim).transpose(1, 2)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)   # (B, H, 1, N)
        out = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(batch, 1, heads * head_dim)
        return self.proj_drop(self.proj(out)), attn


class PaperAttentiveBlock(nn.Module):
    def __init__(self, dim, num_heads, head_dim, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_k = nn.LayerNorm(dim)
        self.norm_v = nn.LayerNorm(dim)
        self.cross_attn = PaperCrossAttention(dim, num_heads, head_dim, qkv_bias, attn_drop, proj_drop)

    def forward(self, query, tokens):
        return self.cross_attn(self.norm_q(query), self.norm_k(tokens), self.norm_v(tokens))


class PaperAttentiveProbe(nn.Module):
    """query_token -> attentive block over the (B, N, D) tokens -> BatchNorm -> classifier."""

    def __init__(self, dim, num_heads, num_classes, *, head_dim=None, qkv_bias=False,
                 attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        head_dim = 2 * (dim // num_heads) if head_dim is None else head_dim
        self.query_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn_block = PaperAttentiveBlock(dim, num_heads, head_dim, qkv_bias, attn_drop, proj_drop)
        self.bn = nn.BatchNorm1d(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, tokens, return_attention=False):
        query = self.query_token.expand(tokens.shape[0], -1, -1)
        pooled, attn = self.attn_block(query, tokens)
        logits = self.classifier(self.bn(pooled.squeeze(1)))
        return (logits, attn.squeeze(2)) if return_attention else logits
