"""Launch configurations: a small autotuned set on a GPU, one fixed config under the interpreter.

BLOCK_N tokens x BLOCK_D features per tile, BLOCK_H heads per dot; every dot dim is >= 16 (the
tensor-core minimum on Ampere / Hopper). Sized for sm_80 / sm_90 without a GPU at hand, from
ptxas' register reports (built for both archs with Triton's bundled ptxas): the forward fits
128 registers per thread with (almost) no spills, so ``maxnreg=128`` buys 16 resident warps per
SM (4-warp programs x 4, or 8-warp x 2) to keep enough loads in flight for a memory-bound
kernel; the backward holds more live tiles (dxh, ds, g, w, the dw partial) and runs
uncapped (about 2 programs per SM). The wider-head configs serve several probes at once.

Autotuning picks among them on the device, keyed on everything that changes the best one
(AUTOTUNE_KEY + the kernel's switches): N, D, H, the batch rounded up to a power of two (the
launcher's ``batch_bucket``: a last partial batch reuses the full batches' choice and, with
``batch`` not specialised, their compiled kernel), the token dtype, the addressing mode, the
row alignment and the backward's constexpr switches.

FASTFUSE_TRITON_CONFIG=i forces config i of each table (the last one if i is past its end)
and skips autotuning: how scripts/gpu_check.sh runs the tests once per config.

The interpreter runs one small config, so that its tests cover several tiles over N, D and
heads at small shapes.
"""
import os

import triton
from triton import knobs

AUTOTUNE_KEY = ["num_tokens", "dim", "heads", "batch_bucket", "TOKEN_DTYPE", "ADDRESSING", "ROW_ALIGN"]
FORWARD_SWITCHES = []
BACKWARD_SWITCHES = ["HAS_GRAD_ATTENTION", "GRAD_ALIGN", "NEED_DX"]

_INTERPRETER = dict(BLOCK_N=32, BLOCK_D=32, BLOCK_H=16)

# (BLOCK_N, BLOCK_D, BLOCK_H, num_warps, num_stages, maxnreg)
_FORWARD = [
    (32, 128, 16, 8, 2, 128),
    (32, 64, 16, 4, 2, 128),
    (16, 128, 16, 4, 3, 128),
    (64, 64, 16, 8, 2, 128),
    (32, 256, 16, 8, 2, None),
    (32, 128, 32, 8, 2, None),
]
_BACKWARD = [
    (32, 64, 16, 4, 2, None),
    (16, 64, 16, 4, 3, None),
    (16, 128, 16, 4, 2, None),
    (32, 128, 16, 8, 2, None),
    (32, 64, 32, 8, 2, None),
]


def forced_config_index() -> int | None:
    """The config index FASTFUSE_TRITON_CONFIG asks for, or None (autotune)."""
    value = os.environ.get("FASTFUSE_TRITON_CONFIG", "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"FASTFUSE_TRITON_CONFIG must be a config index (0, 1, ...), got {value!r}")
    return int(value)


def config_tables() -> dict:
    """The shipped (BLOCK_N, BLOCK_D, BLOCK_H, num_warps, num_stages, maxnreg) rows per kernel."""
    return {"forward": list(_FORWARD), "backward": list(_BACKWARD)}


def _configs(table):
    if knobs.runtime.interpret:
        return [triton.Config(dict(_INTERPRETER), num_warps=4, num_stages=1)]
    forced = forced_config_index()
    if forced is not None:
        table = [table[min(forced, len(table) - 1)]]
    return [triton.Config(dict(BLOCK_N=n, BLOCK_D=d, BLOCK_H=h), num_warps=w, num_stages=s, maxnreg=r)
            for n, d, h, w, s, r in table]


def forward_configs():
    return _configs(_FORWARD)


def backward_configs():
    return _configs(_BACKWARD)


def prune(configs, named_args, **kwargs):
    """Drop blocks far larger than the problem (a 64-token tile for N = 24, 32 heads for 12)."""
    args = {**named_args, **kwargs}
    limits = {"BLOCK_N": args["num_tokens"], "BLOCK_D": args["dim"], "BLOCK_H": args["heads"]}
    limits = {name: triton.next_power_of_2(max(int(value), 16)) for name, value in limits.items()}
    kept = [c for c in configs if all(c.kwargs[name] <= limit for name, limit in limits.items())]
    smallest = min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_D"] * c.kwargs["BLOCK_H"])
    return kept or [smallest]
