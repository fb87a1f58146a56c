"""AIM's attention-pooling classifier, restated unfused as the test oracle.

Written from reading apple/ml-aim, aim-v1/aim/v1/torch/layers.py (AttentionPoolingClassifier);
not copied. The tokens pass a real torch BatchNorm1d (affine=False, eps=1e-6) over their
channels (batch statistics and running-buffer updates in training, running statistics in
eval), then every token is projected to keys and values and attended with SDPA.
"""
import torch
import torch.nn.functional as F
from torch import nn


class AttentionPoolingClassifier(nn.Module):
    def __init__(self, dim, out_features, num_heads=12, num_queries=1, use_batch_norm=True,
                 qkv_bias=False, linear_bias=False, average_pool=True):
        super().__init__()
        self.num_heads, self.num_queries, self.average_pool = num_heads, num_queries, average_pool
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, num_queries, dim))
        self.linear = nn.Linear(dim, out_features, bias=linear_bias)
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if use_batch_norm else nn.Identity()

    def forward(self, x, return_attention=False):
        batch, num_tokens, channels = x.shape
        heads, head_dim = self.num_heads, channels // self.num_heads
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)

        def split(t, length):
            return t.view(batch, length, heads, head_dim).transpose(1, 2)

        q = split(self.cls_token.expand(batch, -1, -1), self.num_queries)
        k, v = split(self.k(x), num_tokens), split(self.v(x), num_tokens)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, self.num_queries, channels)
        if self.average_pool:
            pooled = pooled.mean(1)
        logits = self.linear(pooled)
        if return_attention:
            return logits, ((q @ k.transpose(-1, -2)) * head_dim ** -0.5).softmax(-1)
        return logits
