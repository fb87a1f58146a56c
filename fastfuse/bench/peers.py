"""The peers fastfuse is measured against (besides the paper's probe itself).

    timm.AttentionPoolLatent, vjepa, aim, ep
                               the field's attentive poolers as upstream computes them (K/V
                               projections of every token), each with "<name>+fuse": the same
                               module through fastfuse.fuse (see docs/poolers.md)
    torch.compile              any of the above (the paper's probe here) through inductor
"""
from __future__ import annotations

import shutil

import torch
from torch import nn


def _with_head(pooler: nn.Module, features: int, num_classes: int) -> nn.Module:
    # A pooler that returns features gets a Linear head, as in a timm ViT or an EP probe.
    return nn.Sequential(pooler, nn.Linear(features, num_classes))


# pooler name -> (build the upstream module for (dim, heads, classes), where it comes from).
# fastfuse.fuse(module) is its folded twin; see docs/poolers.md.
def _timm_map(dim, heads, classes):
    from timm.layers import AttentionPoolLatent

    return _with_head(AttentionPoolLatent(dim, num_heads=heads, norm_layer=nn.LayerNorm), dim, classes)


def _vjepa(dim, heads, classes):
    from ..poolers.reference import AttentiveClassifier

    return AttentiveClassifier(embed_dim=dim, num_heads=heads, num_classes=classes)


def _aim(dim, heads, classes):
    from ..poolers.reference import AttentionPoolingClassifier

    return AttentionPoolingClassifier(dim, classes, num_heads=heads)


def _ep(dim, heads, classes):
    from ..poolers.reference import EfficientProbing

    # Upstream's defaults: one head, 32 queries (fewer when 32 does not divide dim), d_out=1.
    queries = next(count for count in (32, 16, 8, 4, 2, 1) if dim % count == 0)
    return _with_head(EfficientProbing(dim, num_queries=queries), dim, classes)


POOLERS = {
    "timm.AttentionPoolLatent": (_timm_map, "timm, timm/layers/attention_pool.py (+ Linear head)"),
    "vjepa": (_vjepa, "V-JEPA AttentiveClassifier (fastfuse.poolers.reference)"),
    "aim": (_aim, "AIM AttentionPoolingClassifier (fastfuse.poolers.reference)"),
    "ep": (_ep, "efficient probing EfficientProbing (fastfuse.poolers.reference) + Linear head"),
}


def fused(module: nn.Module, backend=None) -> nn.Module:
    from ..poolers import fuse

    return fuse(module, backend=backend)


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

