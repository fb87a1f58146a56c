"""V-JEPA's ``AttentivePooler`` / ``AttentiveClassifier`` (facebookresearch/jepa,
src/models/attentive_pooler.py and src/models/utils/modules.py), folded (SPEC §5).

Same constructor arguments and state_dict keys. With ``complete_block`` the tokens pass
``norm1`` (a LayerNorm shared by keys and values): the op normalises them without affine and
gamma/beta fold into the score rows and the value side; without it the tokens go in raw.
The query projection runs once per step; ``norm2`` + MLP and the ``depth - 1`` extra blocks
act on the M queries only, so they stay as they are.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from . import fold


class MLP(nn.Module):
    """fc1 -> act -> dropout -> fc2 -> dropout (V-JEPA's MLP layout)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features or in_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features or in_features, out_features or in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Self-attention among the queries (the extra blocks); unfolded, it sees only M tokens."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        weights = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(batch, length, dim)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Pre-norm transformer block over the queries (norm1, attn, norm2, mlp)."""

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
    """Holds the cross-attention parameters (q, kv, proj) under V-JEPA's names."""

    def __init__(self, dim, num_heads=12, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)


class CrossAttentionBlock(nn.Module):
    """norm1 (on the tokens) -> cross-attention -> residual -> norm2 + MLP residual."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.xattn = CrossAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act_layer=act_layer)


def _layernorm_affine(norm: nn.Module):
    """(gain, shift, eps) of a LayerNorm over the last dim, or ValueError."""
    if type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1:
        raise ValueError(f"norm_layer must be torch.nn.LayerNorm over the feature dim to fold, got "
                         f"{type(norm).__name__}: another token norm is not a per-channel affine "
                         "map of LayerNorm-ed tokens")
    return norm.weight, norm.bias, norm.eps


class AttentivePooler(nn.Module):
    """V-JEPA's attentive pooler, folded. forward(x (B, N, D)) -> queries (B, num_queries, D)."""

    def __init__(self, num_queries=1, embed_dim=768, num_heads=12, mlp_ratio=4.0, depth=1,
                 norm_layer=nn.LayerNorm, init_std=0.02, qkv_bias=True, complete_block=True, *,
                 backend: Optional[str] = None):
        super().__init__()
        fold.check_positive_int("num_queries", num_queries)
        fold.check_positive_int("embed_dim", embed_dim)
        fold.check_positive_int("num_heads", num_heads)
        fold.check_positive_int("depth", depth)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.backend = fold.check_backend(backend)
        self.init_std = init_std
        self.complete_block = complete_block
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, embed_dim))
        if complete_block:
            self.cross_attention_block = CrossAttentionBlock(embed_dim, num_heads, mlp_ratio, qkv_bias,
                                                             norm_layer=norm_layer)
            _layernorm_affine(self.cross_attention_block.norm1)
        else:
            self.cross_attention_block = CrossAttention(embed_dim, num_heads, qkv_bias)
        self.blocks = None
        if depth > 1:
            self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale=False,
                                               norm_layer=norm_layer) for _ in range(depth - 1)])
        self._init_weights(init_std)

    def _init_weights(self, std):
        # V-JEPA's init: truncated normal (+-2, absolute) for queries and linear weights, zero
        # biases, unit LayerNorms, then output projections divided by sqrt(2 * layer).
        with torch.no_grad():
            nn.init.trunc_normal_(self.query_tokens, std=std)
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=std)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.LayerNorm):
                    if module.weight is not None:
                        module.weight.fill_(1.0)
                    if module.bias is not None:
                        module.bias.zero_()
            if self.complete_block:
                self.cross_attention_block.xattn.proj.weight.div_(2.0 ** 0.5)
                self.cross_attention_block.mlp.fc2.weight.div_(2.0 ** 0.5)
            else:
                self.cross_attention_block.proj.weight.div_(2.0 ** 0.5)
            for layer_id, block in enumerate(self.blocks or [], start=1):
                block.attn.proj.weight.div_((2.0 * (layer_id + 1)) ** 0.5)
                block.mlp.fc2.weight.div_((2.0 * (layer_id + 1)) ** 0.5)

    @property
    def _xattn(self) -> CrossAttention:
        return self.cross_attention_block.xattn if self.complete_block else self.cross_attention_block

    def _token_affine(self):
        if not self.complete_block:
            return None, None, 0.0, "none"
        gain, shift, eps = _layernorm_affine(self.cross_attention_block.norm1)
        return gain, shift, eps, "layernorm"

    def score_weight(self) -> torch.Tensor:
        """(H * num_queries, D) folded score rows (SPEC §5: gamma of norm1 folds in, beta cancels)."""
        xattn = self._xattn
        num_queries, dim = self.query_tokens.shape[1:]
        gain, _shift, _eps, _normalize = self._token_affine()
        queries = xattn.q(self.query_tokens.reshape(num_queries, dim))
        queries = queries.reshape(num_queries, xattn.num_heads, dim // xattn.num_heads)
        return fold.score_rows(queries, xattn.kv.weight[:dim], xattn.scale, gain)

    def token_norm(self):
        _gain, _shift, eps, normalize = self._token_affine()
        return normalize, eps

    def plan(self, x: torch.Tensor):
        """Stage 1: (tokens for the op, score rows, context for :meth:`finish`)."""
        fold.check_tokens(x, self.query_tokens.shape[-1], self.query_tokens)
        return x, self.score_weight(), None

    def finish(self, pooled: torch.Tensor, _context=None) -> torch.Tensor:
        """Stage 2: values, projection, residual + MLP and the extra blocks, on (B, H*M, D)."""
        xattn, dim = self._xattn, self.query_tokens.shape[-1]
        gain, shift, _eps, _normalize = self._token_affine()
        value_bias = None if xattn.kv.bias is None else xattn.kv.bias[dim:]
        values = fold.project_values(pooled, xattn.kv.weight[dim:], value_bias, xattn.num_heads, gain, shift)
        out = xattn.proj(values)                                   # (B, M, D)
        if self.complete_block:
            block = self.cross_attention_block
            out = self.query_tokens + out
            out = out + block.mlp(block.norm2(out))
        for block in self.blocks or []:
            out = block(out)
        return out

    def forward(self, x: torch.Tensor, *, return_attention: bool = False):
        return fold.run(self, x, return_attention, self._xattn.num_heads)

    @classmethod
    def from_upstream(cls, module: nn.Module, backend: Optional[str] = None) -> "AttentivePooler":
        """The folded twin of a V-JEPA AttentivePooler (submodules deep-copied)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.backend = fold.check_backend(backend)
        fused.complete_block = bool(module.complete_block)
        fused.init_std = getattr(module, "init_std", 0.02)
        fused.query_tokens = nn.Parameter(module.query_tokens.detach().clone(),
                                          requires_grad=module.query_tokens.requires_grad)
        upstream_block = module.cross_attention_block
        if fused.complete_block:
            _layernorm_affine(upstream_block.norm1)
            block = CrossAttentionBlock.__new__(CrossAttentionBlock)
            nn.Module.__init__(block)
            block.norm1 = copy.deepcopy(upstream_block.norm1)
            block.xattn = _cross_attention_from(upstream_block.xattn)
            block.norm2 = copy.deepcopy(upstream_block.norm2)
            block.mlp = copy.deepcopy(upstream_block.mlp)
        else:
            block = _cross_attention_from(upstream_block)
        fused.cross_attention_block = block
        fused.blocks = copy.deepcopy(module.blocks)
        fused.train(module.training)
        return fused


def _cross_attention_from(upstream: nn.Module) -> CrossAttention:
    dim = upstream.q.weight.shape[1]
    if not isinstance(upstream.q, nn.Linear) or not isinstance(upstream.kv, nn.Linear):
        raise ValueError("the cross-attention's q and kv must be nn.Linear to fold")
    if dim % upstream.num_heads:
        raise ValueError(f"dim {dim} is not divisible by num_heads {upstream.num_heads}")
    attn = CrossAttention.__new__(CrossAttention)
    nn.Module.__init__(attn)
    attn.num_heads = upstream.num_heads
    attn.scale = (dim // upstream.num_heads) ** -0.5   # V-JEPA's SDPA uses the default scale
    attn.q, attn.kv, attn.proj = (copy.deepcopy(upstream.q), copy.deepcopy(upstream.kv),
                                  copy.deepcopy(upstream.proj))
    return attn


class AttentiveClassifier(nn.Module):
    """V-JEPA's attentive classifier (one query, then a linear layer), folded."""

    def __init__(self, embed_dim=768, num_heads=12, mlp_ratio=4.0, depth=1, norm_layer=nn.LayerNorm,
                 init_std=0.02, qkv_bias=True, num_classes=1000, complete_block=True, *,
                 backend: Optional[str] = None):
        super().__init__()
        self.pooler = AttentivePooler(1, embed_dim, num_heads, mlp_ratio, depth, norm_layer, init_std,
                                      qkv_bias, complete_block, backend=backend)
        self.linear = nn.Linear(embed_dim, num_classes, bias=True)

    def token_norm(self):
        return self.pooler.token_norm()

    def plan(self, x: torch.Tensor):
        return self.pooler.plan(x)

    def finish(self, pooled: torch.Tensor, context=None) -> torch.Tensor:
        return self.linear(self.pooler.finish(pooled, context).squeeze(1))

    def forward(self, x: torch.Tensor, *, return_attention: bool = False):
        return fold.run(self, x, return_attention, self.pooler._xattn.num_heads)

    @property
    def backend(self):
        return self.pooler.backend

    @classmethod
    def from_upstream(cls, module: nn.Module, backend: Optional[str] = None) -> "AttentiveClassifier":
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.pooler = AttentivePooler.from_upstream(module.pooler, backend)
        fused.linear = copy.deepcopy(module.linear)
        fused.train(module.training)
        return fused

