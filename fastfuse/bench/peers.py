"""The peers fastfuse is measured against (besides the paper's probe itself).

    timm.AttentionPoolLatent   timm's latent-query attention pooling (K/V projections of every
                               token, SDPA), one latent query, then the paper's BN + classifier
    ep                         efficient-probing style pooling: learned queries score the
                               LayerNorm'd tokens directly, no K/V projections, linear head
    torch.compile              any of the above (the paper's probe here) through inductor
"""
from __future__ import annotations

import shutil

import torch
from torch import nn


class EfficientProbe(nn.Module):
    """Multi-query pooling without key/value projections, then a linear head.

    ``num_queries`` learned queries q_m attend over the normalised tokens xh = LN(x):
    a_mn = softmax_n(q_m . xh_n / sqrt(D)), z_m = sum_n a_mn xh_n; the query outputs are averaged
    and classified: logits = W (mean_m z_m) + b.
    """

    def __init__(self, dim: int, num_queries: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.classifier = nn.Linear(dim, num_classes)
        self.scale = dim ** -0.5

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        normed = self.norm(tokens)                                             # (B, N, D)
        scores = torch.einsum("md,bnd->bmn", self.queries * self.scale, normed)
        pooled = torch.einsum("bmn,bnd->bmd", scores.softmax(dim=-1), normed)  # (B, M, D)
        return self.classifier(pooled.mean(dim=1))


class LatentPoolProbe(nn.Module):
    """timm's AttentionPoolLatent (width D, H heads, one latent query; timm's defaults otherwise:
    qkv_bias, head size D/H, output projection and MLP), then BatchNorm + classifier."""

    def __init__(self, dim: int, num_heads: int, num_classes: int):
        super().__init__()
        from timm.layers import AttentionPoolLatent

        self.pool = AttentionPoolLatent(dim, num_heads=num_heads, latent_len=1)
        self.bn = nn.BatchNorm1d(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bn(self.pool(tokens)))


def timm_unavailable_reason() -> str | None:
    try:
        import timm.layers  # noqa: F401
    except ImportError as error:
        return f"timm is not installed ({error}); pip install timm"
    if not hasattr(timm.layers, "AttentionPoolLatent"):
        return f"timm {timm.__version__} has no timm.layers.AttentionPoolLatent"
    return None


def compile_unavailable_reason(device: str) -> str | None:
    """Why inductor cannot compile for this device here (None: it should)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if device.startswith("cuda"):
        return None  # inductor emits Triton for CUDA; failures surface at the warm-up call
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
    except Exception as error:  # noqa: BLE001 - any failure here means: no usable compiler
        return f"inductor found no C++ compiler: {error}"
    if shutil.which(compiler) is None:
        return f"inductor's C++ compiler {compiler!r} is not on PATH"
    return None


def compiled(module: nn.Module) -> nn.Module:
    """The module under torch.compile (default inductor backend); compiles at its first call."""
    return torch.compile(module)


def reset_compiled() -> None:
    """Forget compiled graphs so the next case compiles for its own static shapes."""
    torch._dynamo.reset()

