"""The dispatch table: which implementation of the fused op serves which input.

Each backend declares the device types it can serve and says, in words, why it cannot serve a
given input (``not_supported_reasons``). ``"auto"`` takes the first backend of the device's
preference list that is available and has no reasons. An explicitly requested backend that is
unavailable or unsuitable raises with its reasons; an auto-selected one falls back with one
warning (Liger's rule, STYLE.md).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Callable, Optional

import torch

from . import pytorch as torch_backend
from .compiled_ops import NORMALIZATIONS

ENV_VAR = "FASTFUSE_BACKEND"
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]
    availability: Callable[[], tuple[bool, str]]
    forward: Callable
    backward: Callable
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    # The token normalisations its forward/backward take (attentive_pool's normalize=), and its
    # token_moments reduction (layers, tokens, num_prefix_tokens) -> (mean, var), if any.
    normalizations: tuple[str, ...] = NORMALIZATIONS
    moments: Optional[Callable] = None

    def not_supported_reasons(self, layers, score_weight, *, normalize: str = "layernorm",
                              op: str = "attentive_pool") -> list[str]:
        available, reason = _availability_of(self.name)
        reasons = [] if available else [reason]
        if op == "token_moments" and self.moments is None:
            reasons.append("token_moments is not supported yet by this backend")
        if op == "attentive_pool" and normalize not in self.normalizations:
            reasons.append(f"normalize={normalize!r} is not supported yet by this backend")
        device = layers[0].device
        if device.type not in self.device_types:
            reasons.append(f"serves {'/'.join(self.device_types)} tensors, got a {device.type} tensor")
        if layers[0].dtype not in self.dtypes:
            reasons.append(f"does not support dtype {layers[0].dtype} (supports "
                           f"{', '.join(str(d).replace('torch.', '') for d in self.dtypes)})")
        return reasons


_BACKENDS: dict[str, Backend] = {}


@torch.compiler.assume_constant_result
def _availability_of(name: str) -> tuple[bool, str]:
    """A registered backend's availability. Decided once per process; torch.compile takes it
    as a constant, since the checks behind it (a lock, imports, lru_cache) cannot be traced."""
    return _BACKENDS[name].availability()


# Preference per device type for "auto"; the last entry always serves.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def register(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def _always() -> tuple[bool, str]:
    return True, "pure PyTorch, runs on any device"


register(Backend("torch", ("cpu", "cuda", "meta", "mps", "xpu"), _always,
                 torch_backend.forward, torch_backend.backward, moments=torch_backend.moments))

from . import cpu as _cpu  # noqa: E402  (registers itself; needs the table above)

register(_cpu.BACKEND)
try:  # GPU backends register themselves when their modules exist
    from . import triton as _triton  # noqa: E402

    register(_triton.BACKEND)
except ImportError:  # pragma: no cover - module added by the Triton backend work
    pass
try:
    from . import cuda as _cuda  # noqa: E402

    register(_cuda.BACKEND)
except ImportError:  # pragma: no cover
    pass

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
        if candidate not in _BACKENDS:
            continue
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
