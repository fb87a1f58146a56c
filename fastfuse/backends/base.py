"""What a backend declares: its name, the devices and dtypes it serves, whether it can run in
this process (and why not, in words), and its forward and backward (fastfuse/op_contract.py).

Backend modules import only this module, never the package, so the dispatch table
(backends/__init__.py) can import every backend module without an import cycle.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

ALL_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]
    availability: Callable[[], tuple[bool, str]]
    forward: Callable
    backward: Callable
    dtypes: tuple[torch.dtype, ...] = ALL_FLOAT_DTYPES

    def not_supported_reasons(self, layers, score_weight) -> list[str]:
        available, reason = self.availability()
        reasons = [] if available else [reason]
        device = layers[0].device
        if device.type not in self.device_types:
            reasons.append(f"serves {'/'.join(self.device_types)} tensors, got a {device.type} tensor")
        if layers[0].dtype not in self.dtypes:
            reasons.append(f"does not support dtype {layers[0].dtype} (supports "
                           f"{', '.join(str(d).replace('torch.', '') for d in self.dtypes)})")
        return reasons
