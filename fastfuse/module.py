"""AttentiveFusion: the paper's probe (SPEC §1) computed in folded form (SPEC §2).

The parameters carry the paper's names and shapes, so its checkpoints load with strict=True
and this module's state_dict loads into the paper's probe. At every forward the learned query
is folded into H key vectors ``w_h`` (a few (H, D) products), the fused op pools the tokens,
and the value and output projections run on the (B, H, D) pooled result.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .composed_head import ParameterVersionCache, compose_head, composed_is_cheaper, grad_reaches_parameters
from .gather import gather_tokens, normalize_inputs
from .ops import attentive_pool
from .projections import StackedProjections, StackedScoreWeight


def _one(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A parameter as a stack of one probe (fastfuse/projections.py takes a leading P dim)."""
    return None if tensor is None else tensor.unsqueeze(0)


class _CrossAttention(nn.Module):
    """Holds the paper's projection parameters under their state_dict names."""

    def __init__(self, dim, num_heads, head_dim, qkv_bias, attn_drop, proj_drop):
        super().__init__()
        inner = num_heads * head_dim
        self.q = nn.Linear(dim, inner, bias=False)
        self.k = nn.Linear(dim, inner, bias=False)
        self.v = nn.Linear(dim, inner, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(inner))
            self.v_bias = nn.Parameter(torch.zeros(inner))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)


class _AttentiveBlock(nn.Module):
    def __init__(self, dim, num_heads, head_dim, qkv_bias, attn_drop, proj_drop):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_k = nn.LayerNorm(dim)
        self.norm_v = nn.LayerNorm(dim)
        self.cross_attn = _CrossAttention(dim, num_heads, head_dim, qkv_bias, attn_drop, proj_drop)


class AttentiveFusion(nn.Module):
    """Attentive probe over tokens or over the CLS/AP tokens of many layers.

    Args:
        dim: feature size D of the tokens.
        num_heads: attention heads H.
        num_classes: classifier outputs.
        head_dim: per-head size; default ``2 * (dim // num_heads)`` as in the paper.
        qkv_bias: learn q and v biases (the paper's ``q_bias`` / ``v_bias``; k has none).
        attn_drop, proj_drop: dropout on the attention weights and on the projected output.
        backend: fused-op backend, see :func:`fastfuse.attentive_pool`; None reads
            $FASTFUSE_BACKEND, else "auto".
    """

    def __init__(self, dim: int, num_heads: int, num_classes: int, *, head_dim: Optional[int] = None,
                 qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 backend: Optional[str] = None):
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        head_dim = 2 * (dim // num_heads) if head_dim is None else head_dim
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int (default 2 * (dim // num_heads)), got {head_dim!r}")
        from .backends import requested_name
        if backend is not None:
            requested_name(backend)  # fail at construction on an unknown name
        self.dim, self.num_heads, self.head_dim, self.num_classes = dim, num_heads, head_dim, num_classes
        self.scale = head_dim ** -0.5
        self.backend = backend
        self.query_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn_block = _AttentiveBlock(dim, num_heads, head_dim, qkv_bias, attn_drop, proj_drop)
        self.bn = nn.BatchNorm1d(dim)
        self.classifier = nn.Linear(dim, num_classes)
        self._composed_head = ParameterVersionCache()
        self._frozen_score_weight = ParameterVersionCache()

    def score_weight(self) -> torch.Tensor:
        """The H folded key vectors ``w_h = scale * gamma_k * (W_k,h^T q_h)`` (SPEC §2), (H, D)."""
        block, attn = self.attn_block, self.attn_block.cross_attn
        query = F.layer_norm(self.query_token.reshape(1, self.dim), (self.dim,),
                             block.norm_q.weight, block.norm_q.bias, block.norm_q.eps)
        # The stacked probes' product with P = 1: its backward writes W_q's and W_k's gradients
        # as contiguous outer products (autograd's einsum backward copies transposed views).
        weight = StackedScoreWeight.apply(query, attn.q.weight.unsqueeze(0), _one(attn.q_bias),
                                          attn.k.weight.unsqueeze(0), block.norm_k.weight.unsqueeze(0),
                                          self.scale, self.num_heads)[0]
        # beta_k shifts every score of a head equally, so softmax drops it (SPEC §2). Adding it
        # times zero keeps its gradient an exact zero instead of None, so optimizers (weight
        # decay, moment updates) treat the parameter exactly as they do in the paper's probe.
        return weight + 0.0 * block.norm_k.bias

    def forward(self, x, *, tokens: Optional[str] = None, num_prefix_tokens: int = 1,
                return_attention: bool = False):
        layers, tokens, num_prefix_tokens = normalize_inputs(x, tokens, num_prefix_tokens)
        if layers[0].shape[-1] != self.dim:
            raise ValueError(f"x has feature size {layers[0].shape[-1]} but the probe was built "
                             f"with dim={self.dim}")
        if layers[0].device != self.query_token.device:
            raise ValueError(f"x is on {layers[0].device} but the probe's parameters are on "
                             f"{self.query_token.device}: move one of them with .to(device)")
        block, attn = self.attn_block, self.attn_block.cross_attn
        # Without a graph into the parameters (inference), the folded keys are cached too.
        weight = (self._frozen_score_weight.get(self, self.score_weight) if self._caches_parameters()
                  else self.score_weight())
        pooled, attention = attentive_pool(list(layers), weight, tokens=tokens,
                                           num_prefix_tokens=num_prefix_tokens,
                                           eps=block.norm_k.eps, backend=self.backend)
        param_dtype = weight.dtype
        if self.training and attn.attn_drop.p > 0:
            # Dropped weights no longer sum to 1: pool the normalised tokens with them
            # explicitly and carry their per-head sums into the value bias terms.
            dropped = attn.attn_drop(attention)
            normed = F.layer_norm(gather_tokens(layers, tokens, num_prefix_tokens, attention.dtype),
                                  (self.dim,), eps=block.norm_v.eps)
            pooled = torch.einsum("bhn,bnd->bhd", dropped, normed)
            weight_sums = dropped.sum(dim=-1, keepdim=True).to(param_dtype)
        else:
            weight_sums = None
        pooled = pooled.to(param_dtype)
        if weight_sums is None and self._uses_composed_head():
            head_weight, head_bias = self.composed_head()
            logits = torch.addmm(head_bias, pooled.flatten(1), head_weight.t())
            return (logits, attention) if return_attention else logits
        if weight_sums is None and not torch.compiler.is_compiling():
            # SPEC §2 after the pooling through the stacked probes' hand-written products (P = 1):
            # gamma_v and beta_v fold into the value weight and bias, no elementwise pass over the
            # (B, H, D) pooled tensor. A training-mode BatchNorm right after the output projection
            # removes per-channel constants, so then beta_v, b_v and b_o get their exact gradient, 0.
            bias_grads_vanish = self.bn.training and not (attn.proj_drop.training and attn.proj_drop.p > 0)
            out = StackedProjections.apply(pooled, attn.v.weight.unsqueeze(0), block.norm_v.weight.unsqueeze(0),
                                           block.norm_v.bias.unsqueeze(0), _one(attn.v_bias),
                                           attn.proj.weight.unsqueeze(0), attn.proj.bias.unsqueeze(0),
                                           bias_grads_vanish)
        else:
            # Dropped attention, or a graph that torch.compile traces (dynamo cannot trace the
            # hand-written backward's strided out= products): autograd over
            # W_v,h u_h + b_v,h with u_h = gamma_v * z_h + beta_v * sum_n a_hn (sum 1 undropped).
            heads, head_dim = self.num_heads, self.head_dim
            value_weight = (attn.v.weight * block.norm_v.weight).reshape(heads, head_dim, self.dim)
            value_bias = (attn.v.weight @ block.norm_v.bias).reshape(heads, head_dim)
            if attn.v_bias is not None:
                value_bias = value_bias + attn.v_bias.reshape(heads, head_dim)
            values = torch.matmul(pooled.transpose(0, 1), value_weight.transpose(1, 2)).transpose(0, 1)
            values = values + (value_bias if weight_sums is None else value_bias * weight_sums)
            out = attn.proj(values.flatten(1))
        out = attn.proj_drop(out)
        logits = self.classifier(self.bn(out))
        return (logits, attention) if return_attention else logits

    def _uses_composed_head(self) -> bool:
        """Eval-mode head, no graph into the parameters, and the composed map is cheaper."""
        bn, proj_drop = self.bn, self.attn_block.cross_attn.proj_drop
        return (not self.training and not bn.training and bn.running_mean is not None
                and not (proj_drop.training and proj_drop.p > 0)
                and composed_is_cheaper(self.num_classes, self.num_heads, self.head_dim, self.dim)
                and self._caches_parameters())

    def _caches_parameters(self) -> bool:
        """Values derived from the parameters may be cached: no graph reaches the parameters,
        and no torch.compile trace (the cache's version checks are Python-side state)."""
        return not grad_reaches_parameters(self) and not torch.compiler.is_compiling()

    def composed_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode head after the pooling as one map: (M (C, H*D), m (C,)), logits = M z + m.

        Exact (up to rounding) with BatchNorm on its running statistics and no dropout; cached
        until any parameter or buffer changes (see :mod:`fastfuse.composed_head`).
        """
        def build():
            block, attn, bn = self.attn_block, self.attn_block.cross_attn, self.bn
            one = _one
            weight, bias = compose_head(
                self.num_heads, one(attn.v.weight), one(block.norm_v.weight), one(block.norm_v.bias),
                one(attn.v_bias), one(attn.proj.weight), one(attn.proj.bias), one(bn.running_mean),
                one(bn.running_var), one(bn.weight), one(bn.bias), bn.eps, one(self.classifier.weight),
                one(self.classifier.bias))
            return weight[0], bias[0]
        return self._composed_head.get(self, build)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"num_classes={self.num_classes}, backend={self.backend!r}")
