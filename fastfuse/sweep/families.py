"""Probe families for sweeps besides the paper's: ``--probe {timm-map, vjepa, aim, ep}``.

Each family is one fused pooler of :mod:`fastfuse.poolers` with a classifier (its upstream
layout: timm's MAP head + ``head`` Linear as in a timm ViT, V-JEPA's AttentiveClassifier, AIM's
AttentionPoolingClassifier, efficient probing + a Linear head). :class:`FamilyBank` trains P
of them in lockstep: their parameters are stacked along a leading P dim (what StackedAdamW
updates), each probe runs its own ``plan``/``finish`` stages on its slices through
``torch.func.functional_call``, and the fused op is called ONCE per minibatch on the P probes'
stacked score rows, so the tokens are read once for all probes. Probe p computes exactly the
function of its standalone module holding ``unstack(p)``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..moments import token_moments
from ..poolers import AttentionPoolingClassifier, AttentionPoolLatent, AttentiveClassifier, EfficientProbing
from ..poolers import fold

DEFAULT = "attentive-fusion"


class TimmMapProbe(nn.Module):
    """timm's MAP head as a timm ViT holds it: ``attn_pool`` then the ``head`` Linear."""

    def __init__(self, dim, num_heads, num_classes, backend=None):
        super().__init__()
        self.attn_pool = AttentionPoolLatent(dim, num_heads=num_heads, norm_layer=nn.LayerNorm, backend=backend)
        self.head = nn.Linear(dim, num_classes)
        self.backend = backend

    def token_norm(self):
        return self.attn_pool.token_norm()

    def plan(self, x):
        return self.attn_pool.plan(x)

    def finish(self, pooled, context=None):
        return self.head(self.attn_pool.finish(pooled, context))

    def forward(self, x, *, return_attention=False):
        return fold.run(self, x, return_attention, self.attn_pool.num_heads)


class EfficientProbingClassifier(nn.Module):
    """Efficient probing (``pool``) then a Linear ``head`` on its dim // d_out output."""

    def __init__(self, dim, num_queries, num_classes, backend=None):
        super().__init__()
        self.pool = EfficientProbing(dim, num_queries=num_queries, backend=backend)
        self.head = nn.Linear(dim, num_classes)
        self.backend = backend

    def token_norm(self):
        return self.pool.token_norm()

    def plan(self, x):
        return self.pool.plan(x)

    def finish(self, pooled, context=None):
        return self.head(self.pool.finish(pooled, context))

    def forward(self, x, *, return_attention=False):
        return fold.run(self, x, return_attention, 1)


def _ep_queries(dim: int) -> int:
    # Upstream's default is 32 queries; each needs an equal slice of the dim-wide value.
    return next(count for count in (32, 16, 8, 4, 2, 1) if dim % count == 0)


def build_family_probe(family: str, dim: int, num_heads: int, num_classes: int,
                       backend: Optional[str] = None) -> nn.Module:
    """One probe of ``family`` (with its classifier), at the current RNG state."""
    if family == "timm-map":
        return TimmMapProbe(dim, num_heads, num_classes, backend)
    if family == "vjepa":
        return AttentiveClassifier(embed_dim=dim, num_heads=num_heads, num_classes=num_classes, backend=backend)
    if family == "aim":
        return AttentionPoolingClassifier(dim, num_classes, num_heads=num_heads, backend=backend)
    if family == "ep":
        return EfficientProbingClassifier(dim, _ep_queries(dim), num_classes, backend)
    raise ValueError(f"probe must be one of {', '.join([DEFAULT, *FAMILIES])}, got {family!r}")


FAMILIES = ("timm-map", "vjepa", "aim", "ep")


class _Stages(nn.Module):
    """Lets functional_call run a probe's ``plan`` or ``finish`` on one probe's parameter slices."""

    def __init__(self, probe: nn.Module):
        super().__init__()
        self.probe = probe

    def forward(self, stage: str, *args):
        return getattr(self.probe, stage)(*args)


class FamilyBank(nn.Module):
    """P probes of one family, parameters and buffers stacked along a leading P dim.

    Same interface as the sweep's ProbeBank: ``chunks``, ``num_probes``, ``unstack(p)`` (probe
    p's state_dict under the upstream keys), ``probe_kwargs()``, forward(tokens) -> logits
    (B, P, C) and, with ``return_attention``, the attention (B, P, H*M, N).
    """

    def __init__(self, family: str, probes: Sequence[nn.Module], probe_kwargs: dict):
        super().__init__()
        if not probes:
            raise ValueError("probes is empty")
        self.family, self.num_probes, self._kwargs = family, len(probes), dict(probe_kwargs)
        self.template = _Stages(probes[0])
        states = [probe.state_dict() for probe in probes]
        self._keys = list(states[0])
        params = dict(probes[0].named_parameters())
        self.stacked = nn.ParameterDict()
        self._buffers_by_key = {}
        for index, key in enumerate(self._keys):
            value = torch.stack([state[key].detach() for state in states]).clone()
            if key in params:
                self.stacked[str(index)] = nn.Parameter(value)
            else:
                self.register_buffer(f"buffer_{index}", value)
                self._buffers_by_key[key] = f"buffer_{index}"
        # The template's own tensors are never used (every call passes probe p's slices).
        for param in self.template.parameters():
            param.requires_grad_(False)

    @property
    def chunks(self):
        return [self]

    @classmethod
    def from_seeds(cls, family: str, seeds: Sequence[int], dim: int, num_heads: int, num_classes: int,
                   backend: Optional[str] = None) -> "FamilyBank":
        probes = []
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                probes.append(build_family_probe(family, dim, num_heads, num_classes, backend))
        return cls(family, probes, {"family": family, "dim": dim, "num_heads": num_heads,
                                    "num_classes": num_classes})

    def probe_kwargs(self) -> dict:
        return dict(self._kwargs)

    def _slices(self, index: int) -> dict:
        out = {}
        for position, key in enumerate(self._keys):
            name = self._buffers_by_key.get(key)
            tensor = getattr(self, name) if name is not None else self.stacked[str(position)]
            out["probe." + key] = tensor[index]
        return out

    def unstack(self, index: int) -> "OrderedDict[str, torch.Tensor]":
        if not 0 <= index < self.num_probes:
            raise IndexError(f"index must be in [0, {self.num_probes}), got {index}")
        return OrderedDict((key[len("probe."):], value.detach().to("cpu", copy=True))
                           for key, value in self._slices(index).items())

    def to_probe(self, index: int) -> nn.Module:
        kwargs = self.probe_kwargs()
        probe = build_family_probe(kwargs.pop("family"), **kwargs)
        probe.load_state_dict(self.unstack(index), strict=True)
        return probe

    def forward(self, tokens: torch.Tensor, *, return_attention: bool = False):
        self.template.train(self.training)
        probe = self.template.probe
        extra = ()
        if self.family == "aim" and self.training and not isinstance(probe.bn, nn.Identity):
            # One pass of batch statistics for all P BatchNorms (same tokens).
            extra = (token_moments(tokens, backend=probe.backend),)
        plans = [functional_call(self.template, self._slices(p), ("plan", tokens) + extra)
                 for p in range(self.num_probes)]
        normalize, eps = probe.token_norm()
        rows = [plan[1] for plan in plans]
        pooled, attention = fold.pool(plans[0][0], torch.cat(rows), normalize=normalize, eps=eps,
                                      backend=probe.backend)
        sizes = [row.shape[0] for row in rows]
        logits = [functional_call(self.template, self._slices(p), ("finish", part, plans[p][2]))
                  for p, part in enumerate(pooled.split(sizes, dim=1))]
        logits = torch.stack(logits, dim=1)
        if return_attention:
            return logits, attention.reshape(attention.shape[0], self.num_probes, sizes[0], -1)
        return logits
