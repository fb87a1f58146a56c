"""V-JEPA's attentive probe, restated unfused as the test oracle.

Written from reading facebookresearch/jepa, src/models/attentive_pooler.py (AttentivePooler,
AttentiveClassifier) and src/models/utils/modules.py (MLP, Attention, Block, CrossAttention,
CrossAttentionBlock); not copied. Every token is projected to keys and values and attended with
torch's scaled_dot_product_attention, as upstream. The weight init is left to torch's defaults
(tests randomise every parameter anyway); upstream's rescaling loop over the extra blocks calls
``enumerate(1, blocks)`` and would fail for depth > 1, so it is not restated.
"""
import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        hidden = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, out_features or in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        hidden = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(hidden))


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop_prob = proj_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        batch, length, channels = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).view(batch, length, 3, heads, channels // heads)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.proj_drop_prob)
        out = out.transpose(1, 2).reshape(batch, length, channels)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0,
                 attn_drop=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.norm2 = norm_layer(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttention(nn.Module):
    def __init__(self, dim, num_heads=12, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries, x, return_attention=False):
        batch, num_queries, channels = queries.shape
        heads, head_dim = self.num_heads, channels // self.num_heads
        q = self.q(queries).view(batch, num_queries, heads, head_dim).transpose(1, 2)
        kv = self.kv(x).view(batch, x.shape[1], 2, heads, head_dim)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(batch, num_queries, channels))
        if return_attention:
            weights = ((q @ k.transpose(-1, -2)) * head_dim ** -0.5).softmax(-1)
            return out, weights
        return out


class CrossAttentionBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.xattn = CrossAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, queries, x, return_attention=False):
        attended, weights = self.xattn(queries, self.norm1(x), return_attention=True)
        queries = queries + attended
        queries = queries + self.mlp(self.norm2(queries))
        return (queries, weights) if return_attention else queries


class AttentivePooler(nn.Module):
    def __init__(self, num_queries=1, embed_dim=768, num_heads=12, mlp_ratio=4.0, depth=1,
                 norm_layer=nn.LayerNorm, init_std=0.02, qkv_bias=True, complete_block=True):
        super().__init__()
        self.init_std = init_std
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, embed_dim))
        self.complete_block = complete_block
        if complete_block:
            self.cross_attention_block = CrossAttentionBlock(embed_dim, num_heads, mlp_ratio, qkv_bias,
                                                             norm_layer=norm_layer)
        else:
            self.cross_attention_block = CrossAttention(embed_dim, num_heads, qkv_bias)
        self.blocks = None
        if depth > 1:
            self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale=False,
                                              norm_layer=norm_layer) for _ in range(depth - 1))

    def forward(self, x, return_attention=False):
        queries = self.query_tokens.repeat(len(x), 1, 1)
        queries, weights = self.cross_attention_block(queries, x, return_attention=True)
        for block in self.blocks or []:
            queries = block(queries)
        return (queries, weights) if return_attention else queries


class AttentiveClassifier(nn.Module):
    def __init__(self, embed_dim=768, num_heads=12, mlp_ratio=4.0, depth=1, norm_layer=nn.LayerNorm,
                 init_std=0.02, qkv_bias=True, num_classes=1000, complete_block=True):
        super().__init__()
        self.pooler = AttentivePooler(1, embed_dim, num_heads, mlp_ratio, depth, norm_layer, init_std,
                                      qkv_bias, complete_block)
        self.linear = nn.Linear(embed_dim, num_classes, bias=True)

    def forward(self, x, return_attention=False):
        pooled, weights = self.pooler(x, return_attention=True)
        logits = self.linear(pooled.squeeze(1))
        return (logits, weights) if return_attention else logits
