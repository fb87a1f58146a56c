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
FORWARD_SWITCHES = ["LAYERNORM"]
BACKWARD_SWITCHES = ["HAS_GRAD_ATTENTION", "GRAD_ALIGN", "NEED_DX", "LAYERNORM"]

_INTERPRETER = dict(BLOCK_N=32, BLOCK_D=32, BLOCK_H=16)

# (BLOCK_N, BLOCK_D, BLOCK_H, num_warps, num_stages, maxnreg, token dtypes it serves).
# The dtypes are those for which ptxas reports no spill on sm_80 / sm_90 (tests/triton_aot.py
# builds each row for each of its dtypes and checks): float64 accumulates in float64 and the
# float32 backward runs exact (non-tensor-core) dots, both with twice the live registers of a
# half tile, so they get smaller tiles.
HALF, FLOAT32, FLOAT64 = "half", "float32", "float64"
_FORWARD = [
    (32, 128, 16, 8, 1, 128, (HALF, FLOAT32)),
    (32, 64, 16, 4, 2, 128, (HALF,)),
    (64, 64, 16, 8, 2, 128, (HALF,)),
    (32, 256, 16, 8, 1, None, (HALF, FLOAT32)),
    (16, 32, 16, 4, 2, None, (FLOAT64,)),
]
_BACKWARD = [
    (16, 64, 16, 4, 3, None, (HALF,)),
    (16, 64, 16, 4, 1, None, (FLOAT32,)),  # one stage: the exact float32 dots spilled with more
    (32, 128, 16, 8, 2, None, (HALF,)),
    (16, 32, 16, 4, 2, None, (FLOAT64,)),
]


def dtype_class(token_dtype: str) -> str:
    """The config class of a token dtype name ("bfloat16", "float16" -> half)."""
    return HALF if token_dtype in ("float16", "bfloat16") else token_dtype


def forced_config_index() -> int | None:
    """The config index FASTFUSE_TRITON_CONFIG asks for, or None (autotune)."""
    value = os.environ.get("FASTFUSE_TRITON_CONFIG", "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"FASTFUSE_TRITON_CONFIG must be a config index (0, 1, ...), got {value!r}")
    return int(value)


def config_tables() -> dict:
    """The shipped (BLOCK_N, BLOCK_D, BLOCK_H, num_warps, num_stages, maxnreg, dtypes) rows."""
    return {"forward": list(_FORWARD), "backward": list(_BACKWARD)}


def _row(config) -> tuple:
    return (config.kwargs["BLOCK_N"], config.kwargs["BLOCK_D"], config.kwargs["BLOCK_H"],
            config.num_warps, config.num_stages, config.maxnreg)


def _configs(table):
    if knobs.runtime.interpret:
        return [triton.Config(dict(_INTERPRETER), num_warps=4, num_stages=1)]
    forced = forced_config_index()
    if forced is not None:
        table = [table[min(forced, len(table) - 1)]]
    return [triton.Config(dict(BLOCK_N=n, BLOCK_D=d, BLOCK_H=h), num_warps=w, num_stages=s, maxnreg=r)
            for n, d, h, w, s, r, _ in table]


def forward_configs():
    return _configs(_FORWARD)


def backward_configs():
    return _configs(_BACKWARD)


def prune_rows(rows, num_tokens: int, dim: int, heads: int, token_dtype: str) -> list:
    """The rows kept for a problem: those serving its dtype, without blocks far larger than the
    problem (a 64-token tile for N = 24, 32 heads for 12); the smallest one if none is left."""
    limits = [triton.next_power_of_2(max(int(value), 16)) for value in (num_tokens, dim, heads)]
    serving = [row for row in rows if dtype_class(token_dtype) in row[6]] or list(rows)
    kept = [row for row in serving if all(block <= limit for block, limit in zip(row[:3], limits))]
    return kept or [min(serving, key=lambda row: row[0] * row[1] * row[2])]


def pruner(kernel: str):
    """The autotuner's early prune for ``kernel``: prune_rows on the configs' rows (a config
    forced by FASTFUSE_TRITON_CONFIG stays, whatever the dtype)."""
    table = config_tables()[kernel]

    def prune(configs, named_args, **kwargs):
        if len(configs) == 1:
            return configs
        args = {**named_args, **kwargs}
        by_row = {_row(config): config for config in configs}
        rows = [row for row in table if row[:6] in by_row]
        kept = prune_rows(rows, args["num_tokens"], args["dim"], args["heads"], args["TOKEN_DTYPE"])
        return [by_row[row[:6]] for row in kept]

    return prune
