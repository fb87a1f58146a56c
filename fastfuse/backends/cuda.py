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

ARCHS = ("sm_80", "sm_90")
# The order of fastfuse::cuda_launch_plan's answer (csrc/library/launch_plan_query.cpp).
_PLAN_FIELDS = ("forward_tile_tokens", "forward_head_tile", "forward_bytes", "backward_tile_tokens",
                "backward_weight_grad_in_shared", "backward_bytes", "min_bytes", "padded_dim",
                "chunk_width", "max_layers", "threads", "backward_head_tile")


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


def launch_plan(dim: int, heads: int, num_tokens: int, dtype: torch.dtype, *, tokens: str = "all",
                layers_need_grad: bool = True, shared_per_block_optin: int,
                shared_per_multiprocessor: int) -> dict[str, int]:
    """The tiles and shared memory the CUDA kernels would use for a call on a GPU with these
    shared-memory limits: the host planner of csrc/common/launch_plan.h, asked through the
    compiled library (no GPU needed). A tile size of 0 means that nothing fits."""
    loaded, reason = _extension.load()
    if not loaded:
        raise RuntimeError(f"fastfuse: the CUDA launch planner lives in the compiled library: {reason}")
    values = torch.ops.fastfuse.cuda_launch_plan(
        dtype.itemsize, dim, heads, num_tokens, tokens in ("ap", "cls+ap"), layers_need_grad,
        shared_per_block_optin, shared_per_multiprocessor)
    return dict(zip(_PLAN_FIELDS, values))


def kernel_limits(dim: int, heads: int, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes, layers): the shared memory of the smallest tiles the kernels run with for D, H
    and the dtype, for any token spec, and the most layers one call reads (from
    csrc/common/launch_plan.h, through the compiled library; asked when the op runs, never
    while torch.compile traces: fastfuse/ops.py)."""
    plan = launch_plan(dim, heads, 1, dtype, shared_per_block_optin=1, shared_per_multiprocessor=1)
    return plan["min_bytes"], plan["max_layers"]


@dataclasses.dataclass(frozen=True)
class CudaBackend(Backend):
    """Adds the kernels' own limits to the generic reasons (layer count, shared memory)."""

    def not_supported_reasons(self, layers, score_weight, **options) -> list[str]:
        reasons = super().not_supported_reasons(layers, score_weight, **options)
        if reasons:
            return reasons
        # token_moments passes no score_weight: no heads, no pool tiles, only the layer limit.
        dim, heads = layers[0].shape[-1], 1 if score_weight is None else score_weight.shape[0]
        if dim >= 2**25 or heads > 2**20:
            return [f"reads D < 2^25 and H <= 2^20, got D={dim}, H={heads}"]
        needed, max_layers = kernel_limits(dim, heads, layers[0].dtype)
        if len(layers) > max_layers:
            reasons.append(f"reads at most {max_layers} layers per call, got {len(layers)}")
        if score_weight is None:
            return reasons
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
                      moments=compiled.moments)
