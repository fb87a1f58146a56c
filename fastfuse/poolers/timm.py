"""timm's ``AttentionPoolLatent`` (timm/layers/attention_pool.py), folded (SPEC §5).

Same constructor arguments, submodules and state_dict keys as timm's module. The tokens go
into the fused op raw (timm normalises them before the pool, in the ViT's ``norm``); the
latent queries' projection runs once per step, the key half of ``kv`` folds into the score
rows and the value half acts on the (B, H*M, D) pooled tokens. ``pos_embed='abs'`` is added
to the tokens first (one elementwise add; the projections still fold).
"""
from __future__ import annotations

import math
from typing import Optional, Type

import torch
from torch import nn

from . import fold


def _default_mlp(dim: int, hidden: int, act_layer, **factory):
    try:
        from timm.layers import Mlp
    except ImportError:   # timm is optional: the same fc1/act/fc2 layout under timm's names
        return _Mlp(dim, hidden, act_layer, **factory)
    return Mlp(dim, hidden, out_features=dim, act_layer=act_layer, **factory)


class _Mlp(nn.Module):
    """timm's Mlp layout (fc1, act, drop1, norm, fc2, drop2) without timm installed."""

    def __init__(self, dim, hidden, act_layer, **factory):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **factory)
        self.act = act_layer()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, dim, **factory)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class AttentionPoolLatent(nn.Module):
    """Attention pooling with latent queries, as timm's, computed folded.

    Extra keyword ``backend`` picks the fused op's backend (None: $FASTFUSE_BACKEND, else auto).
    ``qk_norm=True`` normalises each key over its head: not a linear map of the tokens, so it
    does not fold and is refused.
    """

    def __init__(self, in_features: int, out_features: int = None, embed_dim: int = None,
                 num_heads: int = 8, feat_size: Optional[int] = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, q_proj: bool = True, qk_norm: bool = False,
                 latent_len: int = 1, latent_dim: int = None, pos_embed: str = "",
                 pool_type: str = "token", norm_layer: Optional[Type[nn.Module]] = None,
                 act_layer: Optional[Type[nn.Module]] = nn.GELU, drop: float = 0.0,
                 device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__()
        if qk_norm:
            raise ValueError("qk_norm=True does not fold: the key norm is a non-linear function of "
                             "each token, so keys must be projected per token (use timm's module)")
        factory = {"device": device, "dtype": dtype}
        fold.check_positive_int("in_features", in_features)
        fold.check_positive_int("num_heads", num_heads)
        fold.check_positive_int("latent_len", latent_len)
        embed_dim = embed_dim or in_features
        out_features = in_features if out_features is None else out_features
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if embed_dim != in_features:
            raise ValueError(f"embed_dim ({embed_dim}) must equal in_features ({in_features}): the "
                             "key/value projection reads embed_dim-wide tokens")
        if pool_type not in ("token", "avg", ""):
            raise ValueError(f"pool_type must be 'token', 'avg' or '' (no pooling), got {pool_type!r}")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.feat_size, self.scale, self.pool = feat_size, (embed_dim // num_heads) ** -0.5, pool_type
        self.backend = fold.check_backend(backend)
        if pos_embed == "abs":
            if feat_size is None:
                raise ValueError("pos_embed='abs' needs feat_size (the number of tokens)")
            self.pos_embed = nn.Parameter(torch.zeros(feat_size, in_features, **factory))
        elif pos_embed:
            raise ValueError(f"pos_embed must be '' or 'abs', got {pos_embed!r}")
        else:
            self.pos_embed = None
        self.latent_dim = latent_dim or embed_dim
        if not q_proj and self.latent_dim != embed_dim:
            raise ValueError(f"q_proj=False uses the latent as the query: latent_dim ({self.latent_dim}) "
                             f"must equal embed_dim ({embed_dim})")
        self.latent_len = latent_len
        self.latent = nn.Parameter(torch.zeros(1, latent_len, self.latent_dim, **factory))
        self.q = nn.Linear(self.latent_dim, embed_dim, bias=qkv_bias, **factory) if q_proj else nn.Identity()
        self.kv = nn.Linear(embed_dim, embed_dim * 2, bias=qkv_bias, **factory)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.proj_drop = nn.Dropout(drop)
        if out_features > 0:
            self.proj = nn.Linear(embed_dim, out_features, **factory)
            self.norm = norm_layer(out_features, **factory) if norm_layer is not None else nn.Identity()
            self.mlp = _default_mlp(out_features, int(out_features * mlp_ratio), act_layer, **factory)
        else:
            self.proj, self.norm, self.mlp = nn.Identity(), nn.Identity(), None
            out_features = embed_dim
        self.out_features = out_features
        with torch.no_grad():   # timm's init: truncated normal (+-2 std) for latent and pos_embed
            nn.init.trunc_normal_(self.latent, std=self.latent_dim ** -0.5,
                                  a=-2 * self.latent_dim ** -0.5, b=2 * self.latent_dim ** -0.5)
            if self.pos_embed is not None:
                std = self.pos_embed.shape[1] ** -0.5
                nn.init.trunc_normal_(self.pos_embed, std=std, a=-2 * std, b=2 * std)

    def score_weight(self) -> torch.Tensor:
        """(H * latent_len, D) folded score rows (SPEC §5; the key bias cancels)."""
        embed_dim = self.kv.weight.shape[1]
        queries = self.q(self.latent.reshape(self.latent_len, self.latent_dim))
        queries = queries.reshape(self.latent_len, self.num_heads, self.head_dim)
        return fold.score_rows(queries, self.kv.weight[:embed_dim], self.scale)

    def token_norm(self):
        return "none", 0.0

    def plan(self, x: torch.Tensor):
        """Stage 1: (tokens for the op, score rows, context for :meth:`finish`)."""
        fold.check_tokens(x, self.kv.weight.shape[1], self.latent)
        if self.pos_embed is not None:
            if x.shape[1] != self.pos_embed.shape[0]:
                raise ValueError(f"x has {x.shape[1]} tokens but pos_embed holds feat_size="
                                 f"{self.pos_embed.shape[0]}")
            x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
        return x, self.score_weight(), None

    def finish(self, pooled: torch.Tensor, _context=None) -> torch.Tensor:
        """Stage 2: the dense tail on the pooled (B, H*M, D) tokens."""
        embed_dim = self.kv.weight.shape[1]
        value_bias = None if self.kv.bias is None else self.kv.bias[embed_dim:]
        out = fold.project_values(pooled, self.kv.weight[embed_dim:], value_bias, self.num_heads)
        out = self.proj_drop(self.proj(out))
        if self.mlp is not None:
            out = out + self.mlp(self.norm(out))
        if self.pool == "token":
            out = out[:, 0]
        elif self.pool == "avg":
            out = out.mean(1)
        return out

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, *,
                return_attention: bool = False):
        if attn_mask is not None:
            raise ValueError("attn_mask is not supported by the fused pooler (the op attends over "
                             "every token); use timm's module for masked pooling")
        return fold.run(self, x, return_attention, self.num_heads)

    @classmethod
    def from_upstream(cls, module: nn.Module, backend: Optional[str] = None) -> "AttentionPoolLatent":
        """The folded twin of a timm AttentionPoolLatent (its dense tail deep-copied)."""
        import copy

        if not isinstance(module.q_norm, nn.Identity) or not isinstance(module.k_norm, nn.Identity):
            raise ValueError("qk_norm=True does not fold: the key norm is a non-linear function of "
                             "each token, so keys must be projected per token")
        if not isinstance(module.kv, nn.Linear):
            raise ValueError(f"kv must be an nn.Linear to fold, got {type(module.kv).__name__}")
        if module.pool not in ("token", "avg", ""):
            raise ValueError(f"pool_type {module.pool!r} is not one timm defines")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        embed_dim = module.kv.weight.shape[1]
        fused.num_heads, fused.head_dim = module.num_heads, module.head_dim
        fused.feat_size, fused.scale, fused.pool = module.feat_size, module.scale, module.pool
        fused.backend = fold.check_backend(backend)
        fused.latent_dim, fused.latent_len = module.latent_dim, module.latent_len
        fused.out_features = module.out_features
        if fused.num_heads * fused.head_dim != embed_dim or not math.isclose(fused.scale, fused.head_dim ** -0.5):
            raise ValueError("num_heads * head_dim must equal embed_dim, with scale head_dim**-0.5")
        for name, child in module.named_children():
            setattr(fused, name, copy.deepcopy(child))
        for name, param in module.named_parameters(recurse=False):
            setattr(fused, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
        for name in ("pos_embed", "mlp"):   # timm keeps these as plain None attributes when unused
            if getattr(module, name, None) is None:
                setattr(fused, name, None)
        fused.train(module.training)
        return fused
