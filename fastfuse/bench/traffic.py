"""The kernels' memory traffic as code: ``python -m fastfuse bench --traffic`` (this module: the
Triton launches; bench/traffic_cuda.py: the CUDA ones).

For a shape, the launch decisions come from the launcher itself (fastfuse.backends.triton.plan:
addressing mode, grid, scratch) and the tile sizes from the shipped config tables
(kernels/triton/configs.py, pruned as the autotuner prunes them). From them, per launch:

- ``global``: the bytes each kernel loads and stores, buffer by buffer, counted from the loops of
  kernels/triton/pool_forward.py and pool_backward.py (masked lanes excluded). The interpreter
  can count the same thing (tests/test_traffic.py instruments its loads and stores and checks
  this count on small shapes).
- ``dram``: what of it reaches DRAM. A buffer's first touch in a launch always does; a re-read
  does when the program's traffic between the two touches exceeds its share of L2
  (L2 size / resident programs) -- the rule of thumb of a streaming kernel on an LRU-like cache.
- ``minimum``: the tokens needed read once (every layer row the token spec reads), the small
  inputs (weights, grad_pooled, attention, statistics) read once, the outputs written once.

The ratio dram / minimum is the figure of merit; the autotuner is assumed to pick, among the
configs it keeps, the one that moves the fewest DRAM bytes (the kernels are memory-bound at
these shapes).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    multiprocessors: int
    l2_bytes: int
    # Shared memory (CUDA C++ Programming Guide, compute capabilities 9.0 / 8.0): the opt-in
    # maximum of one block and the total of one SM; the CUDA planner's inputs.
    shared_per_block_optin: int
    shared_per_multiprocessor: int


H100 = Gpu("H100 / H200 (132 SMs, 50 MiB L2)", 132, 50 * 2**20, 227 * 1024, 228 * 1024)
A100 = Gpu("A100 (108 SMs, 40 MiB L2)", 108, 40 * 2**20, 163 * 1024, 164 * 1024)
GPUS = {"h100": H100, "a100": A100}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    layers: int                 # L layers of (B, T, D)
    layer_tokens: int           # T
    dim: int
    heads: int
    tokens: str                 # token spec: "cls+ap", "all", ...
    num_prefix_tokens: int = 1
    itemsize: int = 2           # bf16 / fp16 tokens

    def layer_shapes(self):
        return [(self.batch, self.layer_tokens, self.dim)] * self.layers

    def layer_strides(self):
        return [(self.layer_tokens * self.dim, self.dim, 1)] * self.layers


# The shapes: (a) a probe on CLS+AP of 12 ViT-B layers, (b) 16 probes x 12 heads in
# lockstep, (c) all 197 tokens of one layer.
SHAPES = (
    Shape("a: B=2048 cls+ap 12x(197,768) bf16 H=12", 2048, 12, 197, 768, 12, "cls+ap"),
    Shape("b: B=2048 cls+ap 12x(197,768) bf16 H=192", 2048, 12, 197, 768, 192, "cls+ap"),
    Shape("c: B=256 all (197,768) bf16 H=12", 256, 1, 197, 768, 12, "all"),
)


@dataclasses.dataclass
class Traffic:
    """Bytes of one launch: per buffer (global reads, global writes), and the DRAM estimate."""
    kernel: str
    config: tuple
    global_bytes: dict          # buffer -> [read, written]
    dram: float
    minimum: float

    @property
    def ratio(self) -> float:
        return self.dram / self.minimum

    @property
    def global_read(self) -> float:
        return sum(read for read, _ in self.global_bytes.values())

    @property
    def global_written(self) -> float:
        return sum(written for _, written in self.global_bytes.values())


def _rows_read(shape: Shape) -> int:
    """Layer rows a sample's token spec reads, each once: the minimum token traffic, in rows."""
    T, p = shape.layer_tokens, shape.num_prefix_tokens
    per_layer = {"all": T, "cls": 1, "ap": T - p, "cls+ap": T - p + (p > 0)}[shape.tokens]
    return per_layer * shape.layers


def _token_counts(shape: Shape):
    """Rows averaged by each gathered token (1 for a plain token), in the kernels' order."""
    from ..backends.triton import _plan

    layout = (tuple([shape.layer_tokens] * shape.layers), tuple(map(tuple, shape.layer_strides())),
              shape.tokens, shape.num_prefix_tokens, shape.dim)
    return [row[4] for row in _plan(*layout)[0]]


def _launch(shape: Shape):
    from ..backends import triton as launcher

    return launcher.plan(shape.layer_shapes(), shape.layer_strides(), shape.itemsize, shape.tokens,
                         shape.num_prefix_tokens)


def _programs(shape: Shape, gpu: Gpu, per_sm: int | None, sample_bytes: int) -> int:
    """The launcher's grid (backends/triton.py persistent_programs) on ``gpu``."""
    from ..backends.triton import persistent_programs

    if per_sm is None:
        return shape.batch
    return persistent_programs(shape.batch, gpu.multiprocessors, gpu.l2_bytes, per_sm, sample_bytes)


def _candidates(kernel: str, shape: Shape, num_tokens: int):
    """The config rows the autotuner keeps for this shape (configs.prune on the shipped table)."""
    from ..kernels.triton.configs import config_tables, prune_rows

    return prune_rows(config_tables()[kernel], num_tokens, shape.dim, shape.heads,
                      "float16" if shape.itemsize == 2 else "float32" if shape.itemsize == 4 else "float64")


class _Sizes(NamedTuple):
    """What both launch models start from (the names of the kernels' docstrings)."""
    B: int                  # samples
    N: int                  # gathered tokens per sample
    D: int
    H: int
    e: int                  # token element size
    a: int                  # accumulator element size (8 for float64 tokens, else 4)
    gathered: bool          # GATHERED addressing: averaged rows go through a scratch slot
    tiles_n: int
    tiles_d: int
    head_blocks: int
    source: int             # bytes of one read of a sample's tokens
    rows: int               # layer rows read per sample


def _sizes(shape: Shape, launch, config: tuple) -> _Sizes:
    from ..backends.triton import GATHERED

    block_n, block_d, block_h = config[:3]
    N, D, H = launch.num_tokens, shape.dim, shape.heads
    e, a = shape.itemsize, (8 if shape.itemsize == 8 else 4)
    gathered = launch.addressing == GATHERED
    return _Sizes(shape.batch, N, D, H, e, a, gathered, math.ceil(N / block_n), math.ceil(D / block_d),
                  math.ceil(H / block_h), N * D * (a if gathered else e),
                  sum(_token_counts(shape)) if gathered else N)


def forward_traffic(shape: Shape, gpu: Gpu = H100, config: tuple | None = None) -> Traffic:
    """One forward launch at ``shape`` with ``config`` (BLOCK_N, BLOCK_D, BLOCK_H, ...), or the
    autotuner's kept config that moves the fewest DRAM bytes."""
    from ..backends.triton import FORWARD_PROGRAMS_PER_SM, forward_sample_bytes

    launch = _launch(shape)
    if config is None:
        return min((forward_traffic(shape, gpu, row) for row in _candidates("forward", shape, launch.num_tokens)),
                   key=lambda traffic: traffic.dram)
    block_n, block_d, block_h = config[:3]
    B, N, D, H, e, a, gathered, tiles_n, tiles_d, head_blocks, source, rows = _sizes(shape, launch, config)
    # Reads of a token tile: max |x| and the moments (LayerNorm statistics), then two per head
    # block (scores, pooled sum); kernels/triton/pool_forward.py.
    passes = 2 + 2 * head_blocks
    per_sample = {
        "layers": [rows * D * e if gathered else passes * source, 0],
        "token table": [8 * (5 * N if gathered else 3 * N * tiles_d * passes)
                        if launch.layout is not None else 0, 0],
        "scratch": [passes * source if gathered else 0, source if gathered else 0],
        "weight": [tiles_n * H * D * a, 0],
        "pooled": [(tiles_n - 1) * H * D * a + H * D * a, tiles_n * H * D * a + H * D * a],
        "attention": [H * N * a, 2 * H * N * a],
        "mean, rstd": [0, 2 * N * a],
        "softmax state": [2 * H * a * (tiles_n - 1) + 2 * H * a, 2 * H * a * tiles_n],
    }
    programs = _programs(shape, gpu, FORWARD_PROGRAMS_PER_SM if gathered else None,
                         forward_sample_bytes(launch.addressing, N, D, H, a))
    resident = min(programs, FORWARD_PROGRAMS_PER_SM * gpu.multiprocessors)
    share = gpu.l2_bytes / resident
    # Between two reads of a token tile (one per head block): the tile, a head block's weights
    # and pooled rows. Between two updates of the pooled rows (one per N tile): a tile step.
    tile = block_n * D * (a if gathered else e)
    tokens_hit = tile + 2 * block_h * D * a <= share
    pooled_hit = tile + 2 * H * D * a <= share
    outputs = H * D * a + H * N * a + 2 * N * a
    dram_sample = rows * D * e + outputs
    if gathered:  # the slot is written, then read back after the sample's rows streamed by
        dram_sample += 2 * source
    if not tokens_hit:
        dram_sample += (passes - 1) * source
    if not pooled_hit:
        dram_sample += 2 * (tiles_n - 1) * H * D * a
    minimum = B * (_rows_read(shape) * D * e + outputs) + H * D * a
    return Traffic("forward", tuple(config), {k: [B * r, B * w] for k, (r, w) in per_sample.items()},
                   B * dram_sample + H * D * a, minimum)


def backward_traffic(shape: Shape, gpu: Gpu = H100, config: tuple | None = None,
                     layers_need_grad: bool = False, grad_attention: bool = False) -> Traffic:
    """One backward launch (frozen features by default: the sweep's case)."""
    from ..backends.triton import BACKWARD_PROGRAMS_PER_SM, backward_sample_bytes

    launch = _launch(shape)
    if config is None:
        return min((backward_traffic(shape, gpu, row, layers_need_grad, grad_attention)
                    for row in _candidates("backward", shape, launch.num_tokens)),
                   key=lambda traffic: traffic.dram)
    block_n, block_d, block_h = config[:3]
    B, N, D, H, e, a, gathered, tiles_n, tiles_d, head_blocks, source, rows = _sizes(shape, launch, config)
    token_reads = head_blocks + 1                      # pass 1 per head block, pass 2 once
    gA = 1 if grad_attention else 0
    written_rows = shape.layers * shape.layer_tokens if gathered else N
    per_sample = {
        "layers": [rows * D * e if gathered else token_reads * source, 0],
        "scratch": [token_reads * source if gathered else 0, source if gathered else 0],
        "grad_pooled": [H * D * a + tiles_n * H * D * a + tiles_n * H * D * a, 0],
        "weight": [H * D * a + 2 * tiles_n * H * D * a, 0],
        "attention, grad attention": [(2 + tiles_d) * H * N * a * (1 + gA), 0],
        "mean, rstd": [4 * N * a, 0],
        "ds, scores": [(2 + tiles_d) * H * N * a, 2 * H * N * a + H * N * a],
        "dw partial": [tiles_n * H * D * a, tiles_n * H * D * a],
        "layer gradients": [0, written_rows * D * e if layers_need_grad else 0],
    }
    programs = _programs(shape, gpu, BACKWARD_PROGRAMS_PER_SM,
                         backward_sample_bytes(launch.addressing, N, D, H, a, e))
    share = gpu.l2_bytes / min(programs, BACKWARD_PROGRAMS_PER_SM * gpu.multiprocessors)
    # Pass 1 -> pass 2 of a sample: its tokens and g (all heads) in between. Two N tiles of
    # pass 2 (g, w and the dw partial re-read): a tile and the (H, D) rows of g, w, dw.
    tile = block_n * D * (a if gathered else e)
    sample_hit = source + 2 * H * D * a <= share
    tile_hit = tile + 3 * H * D * a <= share
    small_inputs = H * D * a + (2 + gA) * H * N * a + 2 * N * a   # g, attention (+gA), mean, rstd
    dram_sample = rows * D * e + small_inputs
    if layers_need_grad:
        dram_sample += written_rows * D * e
    if gathered:
        dram_sample += 2 * source
    if not sample_hit:  # pass 2 reads the tokens and g again from DRAM
        dram_sample += source + H * D * a
    if not tile_hit:    # ... and g and the dw partial once per N tile
        dram_sample += 3 * (tiles_n - 1) * H * D * a
    minimum = B * (_rows_read(shape) * D * e + small_inputs
                   + (written_rows * D * e if layers_need_grad else 0)) + 2 * H * D * a
    dram = B * dram_sample + H * D * a + 2 * programs * H * D * a  # + w once, dw partials out and in
    return Traffic("backward", tuple(config), {k: [B * r, B * w] for k, (r, w) in per_sample.items()},
                   dram, minimum)


def _row(shape: Shape, backend: str, traffic: Traffic, kernel: str) -> dict:
    return dict(shape=shape.name, backend=backend, kernel=kernel, config=list(traffic.config[:3]),
                global_read=traffic.global_read, global_written=traffic.global_written, dram=traffic.dram,
                minimum=traffic.minimum, ratio=traffic.ratio)


def report(gpu: Gpu = H100, shapes=SHAPES) -> list[dict]:
    """Rows per shape: the Triton launches, then (when the compiled library can answer the CUDA
    planner) the CUDA ones as attentive_pool runs them (bench/traffic_cuda.py)."""
    from .. import _extension
    from . import traffic_cuda

    rows = []
    for shape in shapes:
        for traffic in (forward_traffic(shape, gpu), backward_traffic(shape, gpu),
                        backward_traffic(shape, gpu, layers_need_grad=True)):
            grads = traffic.global_bytes.get("layer gradients", [0, 0])[1]
            rows.append(_row(shape, "triton", traffic, traffic.kernel + (" (layer grads)" if grads else "")))
        if _extension.load()[0]:
            rows.append(_row(shape, "cuda", forward := traffic_cuda.forward_traffic(shape, gpu), forward.kernel))
            for layers_need_grad in (False, True):
                traffic = traffic_cuda.backward_traffic(shape, gpu, layers_need_grad=layers_need_grad)
                rows.append(_row(shape, "cuda", traffic,
                                 traffic.kernel + (" (layer grads)" if layers_need_grad else " (frozen)")))
    return rows


def print_report(gpu: Gpu = H100) -> None:
    from .. import _extension

    cuda_note = ("" if _extension.load()[0]
                 else f"; CUDA launches: not shown ({_extension.load()[1]})")
    print(f"# Launch traffic on {gpu.name} (model: fastfuse/bench/traffic.py, traffic_cuda.py){cuda_note}")
    print(f"{'shape':44s} {'backend':7s} {'kernel':38s} {'tile N,D,H':12s} {'global R MB':>11s} "
          f"{'global W MB':>11s} {'DRAM MB':>9s} {'min MB':>9s} {'ratio':>6s}")
    for row in report(gpu):
        print(f"{row['shape']:44s} {row['backend']:7s} {row['kernel']:38s} {','.join(map(str, row['config'])):12s} "
              f"{row['global_read'] / 1e6:11.1f} {row['global_written'] / 1e6:11.1f} "
              f"{row['dram'] / 1e6:9.1f} {row['minimum'] / 1e6:9.1f} {row['ratio']:6.2f}")
