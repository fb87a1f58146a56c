"""The eval-mode head of the probe composed into one affine map (SPEC §2, after the pooling).

With BatchNorm on its running statistics and no dropout, everything after the fused op is
affine in the pooled tokens z (H, D):

    logits = W_c (s * (W_o concat_h(W_v,h (gamma_v * z_h + beta_v) + b_v,h) + b_o) + t) + b_c
           = M concat_h(z_h) + m          with s = gamma_bn / sqrt(var + eps), t = beta_bn - mean * s

    M_h = (W_c diag(s) W_o,h) (W_v,h diag(gamma_v))                    (C, D) per head
    m   = W_c diag(s) (W_o b_v' + b_o) + W_c t + b_c,     b_v' = W_v beta_v + b_v

Per sample that is C*H*D multiply-adds instead of 2*H*hd*D + C*D, so it pays while
C*(H-1) < 2*H*hd (at ViT-B, H=12, hd=128: C < 279). The map is built once per parameter
version: :class:`ParameterVersionCache` keys it on the identity, storage and version counter of
every parameter and buffer, so in-place optimizer steps, ``load_state_dict`` and ``.to()``
all rebuild it.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch


def composed_is_cheaper(num_classes: int, num_heads: int, head_dim: int, dim: int) -> bool:
    """Whether C*H*D (composed map) < 2*H*hd*D + C*D (value + output projections + classifier)."""
    return num_classes * num_heads * dim < 2 * num_heads * head_dim * dim + num_classes * dim


def compose_head(num_heads: int, v_weight, gamma_v, beta_v, v_bias: Optional[torch.Tensor],
                 proj_weight, proj_bias, bn_mean, bn_var, bn_weight: Optional[torch.Tensor],
                 bn_bias: Optional[torch.Tensor], bn_eps: float, cls_weight, cls_bias):
    """(M (P, C, H*D), m (P, C)) for P probes; every argument carries a leading P dim.

    Shapes: v_weight (P, H*hd, D), gamma_v/beta_v (P, D), v_bias (P, H*hd) or None,
    proj_weight (P, D, H*hd), proj_bias (P, D), bn_* (P, D) (weight/bias None: not affine),
    cls_weight (P, C, D), cls_bias (P, C).
    """
    num_probes, inner, dim = v_weight.shape
    head_dim = inner // num_heads
    num_classes = cls_weight.shape[1]
    bn_scale = torch.rsqrt(bn_var + bn_eps)
    if bn_weight is not None:
        bn_scale = bn_scale * bn_weight
    bn_shift = -bn_mean * bn_scale
    if bn_bias is not None:
        bn_shift = bn_shift + bn_bias
    head = cls_weight * bn_scale.unsqueeze(1)                                         # W_c diag(s)
    head_proj = torch.bmm(head, proj_weight)                                          # (P, C, H*hd)
    value_weight = (v_weight * gamma_v.unsqueeze(1)).view(num_probes, num_heads, head_dim, dim)
    weight = torch.einsum("pche,phed->pchd", head_proj.view(num_probes, num_classes, num_heads, head_dim),
                          value_weight).reshape(num_probes, num_classes, num_heads * dim)
    value_bias = torch.bmm(v_weight, beta_v.unsqueeze(-1)).squeeze(-1)               # (P, H*hd)
    if v_bias is not None:
        value_bias = value_bias + v_bias
    bias = (torch.bmm(head_proj, value_bias.unsqueeze(-1)) + torch.bmm(head, proj_bias.unsqueeze(-1))
            + torch.bmm(cls_weight, bn_shift.unsqueeze(-1))).squeeze(-1) + cls_bias
    return weight, bias


def grad_reaches_parameters(module: torch.nn.Module) -> bool:
    """Whether a forward now would record a graph into some parameter (then no cached map)."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


class ParameterVersionCache:
    """Holds a value computed from a module's parameters (the composed map, the folded score
    weights), rebuilt whenever a parameter or buffer changed.

    The key is, for every parameter and buffer: a weak reference (identity), its data pointer
    (``.to()`` and ``param.data = ...`` swap the storage), its version counter (bumped by every
    in-place write: optimizer steps, ``load_state_dict``'s ``copy_``), dtype, device and shape.
    Tensors created under inference mode have no version counter: then nothing is cached.
    """

    def __init__(self):
        self._key: Optional[tuple] = None
        self._value = None

    @staticmethod
    def _key_of(module: torch.nn.Module) -> Optional[tuple]:
        entries = []
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_inference():
                return None
            entries.append((weakref.ref(tensor), tensor.data_ptr(), tensor._version, tensor.dtype,
                            tensor.device, tuple(tensor.shape)))
        return tuple(entries)

    @staticmethod
    def _same(key: Optional[tuple], other: Optional[tuple]) -> bool:
        if key is None or other is None or len(key) != len(other):
            return False
        return all(a[0]() is not None and a[0]() is b[0]() and a[1:] == b[1:] for a, b in zip(key, other))

    def get(self, module: torch.nn.Module, build: Callable[[], tuple]):
        key = self._key_of(module)
        if not self._same(key, self._key):
            # Built without a graph and outside inference mode, so the cached tensors can serve
            # a later call in any mode (an input that requires grad may still be differentiated).
            with torch.no_grad(), torch.inference_mode(False):
                value = build()
            if key is None:
                return value
            self._key, self._value = key, value
        return self._value

    def clear(self) -> None:
        self._key = self._value = None

    # Copies and pickles (deepcopy, torch.save of a whole module) start empty: the weak
    # references cannot be pickled, and a copy's tensors are new ones anyway.
    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()
