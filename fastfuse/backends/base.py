"""What a backend declares: its name, the devices and dtypes it serves, whether it can run in
this process (and why not, in words), and its forward and backward (fastfuse/op_contract.py).

Backend modules import only this module, never the package, so the dispatch table
(backends/__init__.py) can import every backend module without an import cycle.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ..op_contract import NORMALIZATIONS

ALL_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]
    availability: Callable[[], tuple[bool, str]]
    forward: Callable
    backward: Callable
    dtypes: tuple[torch.dtype, ...] = ALL_FLOAT_DTYPES
    # The token normalisations its forward/backward take (attentive_pool's normalize=), and its
    # token_moments reduction (layers, tokens, num_prefix_tokens) -> (mean, var), if any.
    normalizations: tuple[str, ...] = NORMALIZATIONS
    moments: Optional[Callable] = None
    # Its own gather (layers, tokens, num_prefix_tokens) -> the (B, N, D) stack in the compute
    # dtype, reading each row once, for the gather-first path of frozen training (ops.py), if any.
    gather: Optional[Callable] = None

    def not_supported_reasons(self, layers, score_weight, *, normalize: str = "layernorm",
                              op: str = "attentive_pool") -> list[str]:
        available, reason = self.availability()
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
