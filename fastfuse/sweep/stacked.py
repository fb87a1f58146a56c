"""P probes with stacked parameters, trained in lockstep on the same minibatches.

:class:`StackedAttentiveFusion` holds P :class:`fastfuse.AttentiveFusion` probes: every
parameter and buffer of the paper's layout gains a leading P dimension. One forward scores the
P*H folded key vectors of all probes (SPEC §2) in ONE call of the fused op, so each minibatch of
tokens is read and normalised once; value and output projections, BatchNorm and classifier run
as batched matmuls over P. Probe p computes exactly the function of a standalone AttentiveFusion
holding ``unstack(p)``.

:class:`StackedLinearProbe` is the linear baseline: a shared non-affine BatchNorm of the input
features (the MAE linear-probe recipe; the statistics are the same for every probe since all
see the same batches) and P linear classifiers.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..composed_head import ParameterVersionCache, compose_head, composed_is_cheaper, grad_reaches_parameters
from ..module import AttentiveFusion
from ..ops import attentive_pool
from ..projections import StackedProjections, StackedScoreWeight

# AttentiveFusion / paper state_dict key -> attribute of the stacked module (shape (P, *shape)).
PARAMETERS = OrderedDict([
    ("query_token", "query_token"),
    ("attn_block.norm_q.weight", "norm_q_weight"),
    ("attn_block.norm_q.bias", "norm_q_bias"),
    ("attn_block.norm_k.weight", "norm_k_weight"),
    ("attn_block.norm_k.bias", "norm_k_bias"),
    ("attn_block.norm_v.weight", "norm_v_weight"),
    ("attn_block.norm_v.bias", "norm_v_bias"),
    ("attn_block.cross_attn.q.weight", "q_weight"),
    ("attn_block.cross_attn.k.weight", "k_weight"),
    ("attn_block.cross_attn.v.weight", "v_weight"),
    ("attn_block.cross_attn.q_bias", "q_bias"),
    ("attn_block.cross_attn.v_bias", "v_bias"),
    ("attn_block.cross_attn.proj.weight", "proj_weight"),
    ("attn_block.cross_attn.proj.bias", "proj_bias"),
    ("bn.weight", "bn_weight"),
    ("bn.bias", "bn_bias"),
    ("classifier.weight", "classifier_weight"),
    ("classifier.bias", "classifier_bias"),
])
BUFFERS = OrderedDict([
    ("bn.running_mean", "bn_running_mean"),
    ("bn.running_var", "bn_running_var"),
    ("bn.num_batches_tracked", "bn_num_batches_tracked"),
])


def build_probe(seed: int, dim: int, num_heads: int, num_classes: int, *, head_dim: Optional[int] = None,
                qkv_bias: bool = False, backend: Optional[str] = None) -> AttentiveFusion:
    """An AttentiveFusion initialised as if constructed right after ``torch.manual_seed(seed)``.

    The global RNG state is restored afterwards, so building probes never disturbs the caller.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AttentiveFusion(dim, num_heads, num_classes, head_dim=head_dim, qkv_bias=qkv_bias,
                               backend=backend)


class StackedAttentiveFusion(nn.Module):
    """P AttentiveFusion probes of one shape, parameters stacked along a leading P dim.

    Build from P AttentiveFusion modules (their state is copied), or with :meth:`from_seeds`
    (probe p initialised exactly as ``AttentiveFusion`` under ``torch.manual_seed(seeds[p])``);
    :meth:`unstack` returns probe p's state_dict under the paper's keys.

    ``forward(tokens)`` takes (B, N, D) tokens and returns logits (B, P, num_classes) (and, with
    ``return_attention``, the attention (B, P, H, N)).
    """

    def __init__(self, probes: Sequence[AttentiveFusion]):
        super().__init__()
        if len(probes) == 0:
            raise ValueError("probes must hold at least one AttentiveFusion")
        first = probes[0]
        shape = (first.dim, first.num_heads, first.head_dim, first.num_classes)
        for index, probe in enumerate(probes):
            if not isinstance(probe, AttentiveFusion):
                raise TypeError(f"probes[{index}] must be an AttentiveFusion, got {type(probe).__name__}")
            if (probe.dim, probe.num_heads, probe.head_dim, probe.num_classes) != shape:
                raise ValueError(f"probes[{index}] has (dim, num_heads, head_dim, num_classes) "
                                 f"{(probe.dim, probe.num_heads, probe.head_dim, probe.num_classes)}, "
                                 f"probes[0] has {shape}: stacked probes must share their shape")
            if probe.attn_block.cross_attn.attn_drop.p or probe.attn_block.cross_attn.proj_drop.p:
                raise ValueError("stacked probes do not support attention or projection dropout")
        self.num_probes = len(probes)
        self.dim, self.num_heads, self.head_dim, self.num_classes = shape
        self.scale = first.scale
        self.backend = first.backend
        self.qkv_bias = first.attn_block.cross_attn.q_bias is not None
        self.norm_q_eps = first.attn_block.norm_q.eps
        self.norm_k_eps = first.attn_block.norm_k.eps
        self.bn_eps, self.bn_momentum = first.bn.eps, first.bn.momentum
        states = [probe.state_dict() for probe in probes]
        self._state_keys = list(states[0])  # AttentiveFusion's order, for unstack
        for key, name in PARAMETERS.items():
            if key in states[0]:
                self.register_parameter(name, nn.Parameter(torch.stack([s[key].detach() for s in states]).clone()))
            else:
                self.register_parameter(name, None)
        for key, name in BUFFERS.items():
            self.register_buffer(name, torch.stack([s[key] for s in states]).clone())
        self._composed_head = ParameterVersionCache()
        self._frozen_score_weight = ParameterVersionCache()

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], dim: int, num_heads: int, num_classes: int, *,
                   head_dim: Optional[int] = None, qkv_bias: bool = False,
                   backend: Optional[str] = None) -> "StackedAttentiveFusion":
        return cls([build_probe(seed, dim, num_heads, num_classes, head_dim=head_dim,
                                qkv_bias=qkv_bias, backend=backend) for seed in seeds])

    def probe_kwargs(self) -> dict:
        """Constructor arguments of one probe (AttentiveFusion and PaperAttentiveProbe)."""
        return {"dim": self.dim, "num_heads": self.num_heads, "num_classes": self.num_classes,
                "head_dim": self.head_dim, "qkv_bias": self.qkv_bias}

    def unstack(self, index: int) -> "OrderedDict[str, torch.Tensor]":
        """Probe ``index``'s state_dict under the paper's keys (copies, on the CPU)."""
        if not 0 <= index < self.num_probes:
            raise IndexError(f"index must be in [0, {self.num_probes}), got {index}")
        names = {**PARAMETERS, **BUFFERS}
        return OrderedDict((key, getattr(self, names[key])[index].detach().to("cpu", copy=True))
                           for key in self._state_keys)

    def to_probe(self, index: int) -> AttentiveFusion:
        """A standalone AttentiveFusion holding probe ``index``."""
        probe = AttentiveFusion(self.dim, self.num_heads, self.num_classes, head_dim=self.head_dim,
                                qkv_bias=self.qkv_bias, backend=self.backend)
        probe.load_state_dict(self.unstack(index), strict=True)
        return probe.to(self.query_token.dtype)

    def score_weight(self) -> torch.Tensor:
        """The folded key vectors of every probe, (P, H, D) (SPEC §2, per probe)."""
        num_probes, dim = self.num_probes, self.dim
        query = F.layer_norm(self.query_token.reshape(num_probes, dim), (dim,), eps=self.norm_q_eps)
        query = query * self.norm_q_weight + self.norm_q_bias
        weight = StackedScoreWeight.apply(query, self.q_weight, self.q_bias, self.k_weight, self.norm_k_weight,
                                          self.scale, self.num_heads)
        # beta_k cancels in the softmax; times zero keeps its gradient an exact zero (as AttentiveFusion).
        return weight + 0.0 * self.norm_k_bias.unsqueeze(1)

    def forward(self, tokens: torch.Tensor, *, return_attention: bool = False):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must have shape (batch, tokens, {self.dim}), got {shape}")
        batch, num_probes, heads = tokens.shape[0], self.num_probes, self.num_heads
        caches = not grad_reaches_parameters(self) and not torch.compiler.is_compiling()
        weight = self._frozen_score_weight.get(self, self.score_weight) if caches else self.score_weight()
        pooled, attention = attentive_pool(tokens, weight.reshape(num_probes * heads, self.dim),
                                           eps=self.norm_k_eps, backend=self.backend)
        if caches and self._uses_composed_head():
            head_weight, head_bias = self.composed_head()
            # (P, B, H*D) view of the pooled tokens times each probe's (H*D, C) map.
            flat = pooled.to(weight.dtype).view(batch, num_probes, heads * self.dim).transpose(0, 1)
            logits = torch.baddbmm(head_bias.unsqueeze(1), flat, head_weight.transpose(1, 2)).transpose(0, 1)
            return (logits, attention.reshape(batch, num_probes, heads, -1)) if return_attention else logits
        # Value and output projections of all probes (SPEC §2), as batched GEMMs -> (B, P*D).
        # In training the BatchNorm after it removes any per-channel constant, so the gradients
        # of beta_v, b_v and b_o are exactly zero; computed, they would be rounding noise, which
        # Adam normalises into lr-sized random steps (and which differs between runs).
        out = StackedProjections.apply(pooled.to(weight.dtype), self.v_weight, self.norm_v_weight,
                                       self.norm_v_bias, self.v_bias, self.proj_weight, self.proj_bias,
                                       self.training)
        # Per-(p, d) BatchNorm over (B, P*D) is exactly P separate BatchNorm1d(D).
        if self.training:
            self.bn_num_batches_tracked.add_(1)
        out = F.batch_norm(out, self.bn_running_mean.view(-1), self.bn_running_var.view(-1),
                           self.bn_weight.reshape(-1), self.bn_bias.reshape(-1), self.training,
                           self.bn_momentum, self.bn_eps)
        out = out.reshape(batch, num_probes, self.dim).transpose(0, 1)                 # (P, B, D)
        logits = torch.baddbmm(self.classifier_bias.unsqueeze(1), out, self.classifier_weight.transpose(1, 2))
        logits = logits.transpose(0, 1)                                                # (B, P, C)
        if return_attention:
            return logits, attention.reshape(batch, num_probes, heads, -1)
        return logits

    def _uses_composed_head(self) -> bool:
        """Eval mode, no graph into the parameters, and the composed map is cheaper (as AttentiveFusion)."""
        return (not self.training
                and composed_is_cheaper(self.num_classes, self.num_heads, self.head_dim, self.dim)
                and not grad_reaches_parameters(self))

    def composed_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every probe's eval-mode head as one map: (M (P, C, H*D), m (P, C)); see fastfuse.composed_head."""
        return self._composed_head.get(self, lambda: compose_head(
            self.num_heads, self.v_weight, self.norm_v_weight, self.norm_v_bias, self.v_bias, self.proj_weight,
            self.proj_bias, self.bn_running_mean, self.bn_running_var, self.bn_weight, self.bn_bias, self.bn_eps,
            self.classifier_weight, self.classifier_bias))

    def extra_repr(self) -> str:
        return (f"num_probes={self.num_probes}, dim={self.dim}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, num_classes={self.num_classes}, backend={self.backend!r}")


class ProbeBank(nn.Module):
    """P probes as consecutive chunks of stacked probes, one fused-op call per chunk.

    One chunk (the default) scores all P*H keys in a single pass over the tokens; several
    chunks trade that for a smaller working set per call (see ``TrainSettings.probes_per_call``).
    Same interface as :class:`StackedAttentiveFusion`: logits (B, P, C), attention (B, P, H, N).
    """

    def __init__(self, chunks: Sequence[StackedAttentiveFusion]):
        super().__init__()
        if len(chunks) == 0:
            raise ValueError("chunks is empty")
        self.chunks = nn.ModuleList(chunks)
        self.num_probes = sum(chunk.num_probes for chunk in chunks)

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], dim: int, num_heads: int, num_classes: int, *,
                   probes_per_call: Optional[int] = None, **kwargs) -> "ProbeBank":
        size = len(seeds) if probes_per_call is None else int(probes_per_call)
        if size < 1:
            raise ValueError(f"probes_per_call must be >= 1, got {probes_per_call}")
        return cls([StackedAttentiveFusion.from_seeds(seeds[start:start + size], dim, num_heads, num_classes,
                                                      **kwargs) for start in range(0, len(seeds), size)])

    def _locate(self, index: int) -> tuple[StackedAttentiveFusion, int]:
        if not 0 <= index < self.num_probes:
            raise IndexError(f"index must be in [0, {self.num_probes}), got {index}")
        for chunk in self.chunks:
            if index < chunk.num_probes:
                return chunk, index
            index -= chunk.num_probes
        raise AssertionError("unreachable")

    def unstack(self, index: int) -> "OrderedDict[str, torch.Tensor]":
        chunk, local = self._locate(index)
        return chunk.unstack(local)

    def to_probe(self, index: int) -> AttentiveFusion:
        chunk, local = self._locate(index)
        return chunk.to_probe(local)

    def probe_kwargs(self) -> dict:
        return self.chunks[0].probe_kwargs()

    def forward(self, tokens: torch.Tensor, *, return_attention: bool = False):
        outputs = [chunk(tokens, return_attention=return_attention) for chunk in self.chunks]
        if not return_attention:
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        if len(outputs) == 1:
            return outputs[0]
        return torch.cat([logits for logits, _ in outputs], dim=1), torch.cat([att for _, att in outputs], dim=1)


class StackedLinearProbe(nn.Module):
    """P linear classifiers on the same features, after one shared non-affine BatchNorm.

    Classifier p is initialised as ``nn.Linear(in_features, num_classes)`` constructed right after
    ``torch.manual_seed(seeds[p])``. ``forward(features (B, F))`` -> logits (B, P, C).
    """

    def __init__(self, seeds: Sequence[int], in_features: int, num_classes: int):
        super().__init__()
        if len(seeds) == 0:
            raise ValueError("seeds must name at least one probe")
        weights, biases = [], []
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                linear = nn.Linear(in_features, num_classes)
            weights.append(linear.weight.detach())
            biases.append(linear.bias.detach())
        self.num_probes, self.in_features, self.num_classes = len(seeds), in_features, num_classes
        self.weight = nn.Parameter(torch.stack(weights))    # (P, C, F)
        self.bias = nn.Parameter(torch.stack(biases))       # (P, C)
        self.norm = nn.BatchNorm1d(in_features, affine=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        normed = self.norm(features)
        # One GEMM per probe (C is small, so P calls cost little): the same kernel and shapes as
        # a single probe's, hence the same rounding in lockstep and sequential runs.
        return torch.stack([F.linear(normed, weight, bias)
                            for weight, bias in zip(self.weight.unbind(0), self.bias.unbind(0))], dim=1)

    def unstack(self, index: int) -> "OrderedDict[str, torch.Tensor]":
        """Probe ``index`` as the state_dict of ``nn.Sequential(BatchNorm1d(F, affine=False), Linear(F, C))``."""
        state = OrderedDict((f"0.{key}", value.detach().to("cpu", copy=True))
                            for key, value in self.norm.state_dict().items())
        state["1.weight"] = self.weight[index].detach().to("cpu", copy=True)
        state["1.bias"] = self.bias[index].detach().to("cpu", copy=True)
        return state
