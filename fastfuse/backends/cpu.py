"""The "cpu" backend: the compiled C++ kernels of csrc/cpu behind the fused op's schema."""
from __future__ import annotations

import torch

from .. import _extension
from . import compiled
from .base import Backend


def _availability() -> tuple[bool, str]:
    loaded, reason = _extension.load()
    if not loaded:
        return False, reason
    return True, "compiled C++ kernels (csrc/cpu), OpenMP over the batch"


BACKEND = Backend("cpu", ("cpu",), _availability, compiled.forward,
                  compiled.backward,
                  dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
                  moments=compiled.moments, gather=compiled.gather)
