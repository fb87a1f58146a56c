"""The "cuda" backend: the CUDA kernels of csrc/cuda behind the fused op's schema.

The kernels live in the same compiled library as the CPU ones (fastfuse/_C*.so), registered
for the CUDA dispatch key of ``fastfuse::fused_pool_forward`` / ``fused_pool_backward``. They
are compiled for sm_80 and sm_90 (plus PTX) whenever torch is a CUDA build and nvcc is found,
so a machine without a GPU builds them too; this backend then reports itself unavailable.
Design, build switches and the resource report: docs/cuda.md.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import _extension
from ..gather import num_gathered_tokens
from . import compiled
from .base import Backend

# Mirrors csrc/cuda: layer descriptors travel as kernel arguments (kMaxLayers), tiles hold at
# least 8 tokens (kTileQuantum), blocks have 256 threads (kThreads).
MAX_LAYERS = 64
_TILE_TOKENS = 8
_THREADS = 256
_SLOT_BYTES = 48
ARCHS = ("sm_80", "sm_90")


def _availability() -> tuple[bool, str]:
    loaded, reason = _extension.load()
    if not loaded:
        return False, reason
    if not _extension.built_with_cuda():
        return False, ("the compiled extension was built without CUDA kernels (torch "
                       f"{torch.__version__}, CUDA {torch.version.cuda}); rebuild with a CUDA build "
                       "of torch and CUDA_HOME set (FASTFUSE_CUDA=1 makes a missing nvcc an error)")
    if not torch.cuda.is_available():
        return False, f"built for {'/'.join(ARCHS)} but no CUDA GPU is visible"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, (f"built for {'/'.join(ARCHS)} (and newer, through PTX); "
                       f"{torch.cuda.get_device_name()} is sm_{major}{minor}")
    return True, f"CUDA kernels (csrc/cuda) on {torch.cuda.get_device_name()} (sm_{major}{minor})"


def _shared_memory_per_block(device: torch.device) -> int:
    """The opt-in shared memory of one block on `device` (asked when the op runs, never traced)."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def min_shared_memory_bytes(dim: int, heads: int, dtype: torch.dtype) -> int:
    """Shared memory of the smallest backward tile (8 tokens, dw partials in global memory,
    scratch for averaged tokens): the larger of the two kernels' minimums, for any token spec
    (csrc/cuda/pool_kernels.cuh)."""
    acc_bytes = 8 if dtype == torch.float64 else 4
    chunk = max(16 // dtype.itemsize, 4)
    padded_dim = _round_up(dim, chunk)
    padded_heads = _round_up(heads, 4)
    chunks = padded_dim // chunk
    partial = (1 if chunks >= _THREADS else _THREADS // chunks) * padded_dim
    elements = (2 * _TILE_TOKENS * padded_dim + 3 * padded_heads * _TILE_TOKENS
                + 4 * padded_heads + partial)
    return _TILE_TOKENS * _SLOT_BYTES + acc_bytes * elements


@dataclasses.dataclass(frozen=True)
class CudaBackend(Backend):
    """Adds the kernels' own limits to the generic reasons (layer count, shared memory)."""

    def not_supported_reasons(self, layers, score_weight, **options) -> list[str]:
        reasons = super().not_supported_reasons(layers, score_weight, **options)
        if reasons:
            return reasons
        if len(layers) > MAX_LAYERS:
            reasons.append(f"reads at most {MAX_LAYERS} layers per call, got {len(layers)}")
        if score_weight is None:  # token_moments: no heads, no pool tiles
            return reasons
        dim, heads = layers[0].shape[-1], score_weight.shape[0]
        needed = min_shared_memory_bytes(dim, heads, layers[0].dtype)
        allowed = _shared_memory_per_block(layers[0].device)
        if needed > allowed:
            reasons.append(f"D={dim}, H={heads} need {needed} bytes of shared memory per block, "
                           f"the GPU allows {allowed}")
        if num_gathered_tokens([layer.shape[1] for layer in layers], "all") >= 2**31:
            reasons.append("reads fewer than 2^31 tokens per sample")
        return reasons


BACKEND = CudaBackend("cuda", ("cuda",), _availability, compiled.forward,
                      compiled.backward,
                      dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
                      normalizations=("layernorm",))
