"""Efficient probing, restated unfused as the test oracle.

Written from reading billpsomas/efficient-probing, poolings/ep.py (EfficientProbing); not
copied. The raw tokens are the keys (no norm, no key projection); query m attends over them and
reads its own slice m of the one value projection (dim // d_out wide), for num_heads=1.
"""
import torch
from torch import nn


class EfficientProbing(nn.Module):
    def __init__(self, dim, num_heads=1, qkv_bias=False, qk_scale=None, num_queries=32, d_out=1):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.d_out, self.num_queries = d_out, num_queries
        self.v = nn.Linear(dim, dim // d_out, bias=qkv_bias)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, num_queries, dim))

    def forward(self, x, cls=None, return_attention=False):
        batch, num_tokens, channels = x.shape
        queries = self.cls_token.expand(batch, -1, -1) if cls is None else cls
        scores = torch.einsum("bmc,bnc->bmn", queries * self.scale, x)
        weights = scores.softmax(-1)                                           # (B, M, N)
        values = self.v(x).view(batch, num_tokens, self.num_queries, -1)       # (B, N, M, c)
        out = torch.einsum("bmn,bnmc->bmc", weights, values).reshape(batch, -1)
        return (out, weights.unsqueeze(1)) if return_attention else out
