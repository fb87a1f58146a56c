"""The dispatch table: which implementation of the fused op serves which input.

Each backend declares the device types it can serve and says, in words, why it cannot serve a
given input (``not_supported_reasons``). ``"auto"`` takes the first backend of the device's
preference list that is available and has no reasons. An explicitly requested backend that is
unavailable or unsuitable raises with its reasons; an auto-selected one falls back with one
warning (Liger's rule, STYLE.md).
"""
from __future__ import annotations

import os
import warnings

import torch

from . import cpu, cuda, pytorch, triton
from .base import Backend

ENV_VAR = "FASTFUSE_BACKEND"

# Every backend module is imported above, unconditionally: one that lacks its optional
# dependency (triton, the compiled library, a GPU) says so through its availability reason.
# Availability is decided when an op runs, never while torch.compile traces (fastfuse/ops.py).
_BACKENDS: dict[str, Backend] = {backend.name: backend for backend in
                                 (pytorch.BACKEND, cpu.BACKEND, triton.BACKEND, cuda.BACKEND)}

# Preference per device type for "auto"; the last entry always serves.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

VALID_NAMES = ("auto",) + tuple(_BACKENDS)


def get(name: str) -> Backend:
    return _BACKENDS[name]


def backends() -> dict[str, dict]:
    """Every backend with whether it can run here and why (or why not)."""
    report = {}
    for name, backend in _BACKENDS.items():
        available, reason = backend.availability()
        report[name] = {"available": available, "reason": reason,
                        "devices": list(backend.device_types)}
    return report


def requested_name(backend: str | None) -> str:
    """The ``backend=`` argument, else $FASTFUSE_BACKEND, else "auto"; validated."""
    source = "backend"
    if backend is None:
        backend, source = os.environ.get(ENV_VAR) or "auto", ENV_VAR
    if not isinstance(backend, str) or backend not in VALID_NAMES:
        raise ValueError(f"{source} must be one of {VALID_NAMES}, got {backend!r}")
    return backend


_warned: set[str] = set()


def resolve(backend: str | None, layers, score_weight, **options) -> str:
    """The concrete backend that will run this input (``options``: normalize=, and
    op="token_moments" for the moments reduction, where score_weight is None)."""
    name = requested_name(backend)
    if name != "auto":
        chosen = _BACKENDS[name]
        reasons = chosen.not_supported_reasons(layers, score_weight, **options)
        if reasons:
            message = f"fastfuse backend {name!r} cannot run this input: " + "; ".join(reasons)
            # A dtype the backend does not take is a wrong argument type, not a failure to run.
            only_dtype = len(reasons) == 1 and layers[0].dtype not in chosen.dtypes
            raise (TypeError if only_dtype else RuntimeError)(message)
        return name
    device_type = layers[0].device.type
    skipped = []
    for candidate in AUTO_ORDER.get(device_type, ("torch",)):
        reasons = _BACKENDS[candidate].not_supported_reasons(layers, score_weight, **options)
        if not reasons:
            if skipped and candidate == "torch":
                key = ";".join(skipped)
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn("fastfuse: falling back to the pure-PyTorch backend ("
                                  + "; ".join(skipped) + ")", RuntimeWarning, stacklevel=4)
            return candidate
        skipped.append(f"{candidate}: {'; '.join(reasons)}")
    raise RuntimeError("no fastfuse backend can run this input: " + " | ".join(skipped))
