"""The CUDA backend's memory traffic as code (the CUDA half of ``python -m fastfuse bench --traffic``).

For a shape, the launches are those that ``attentive_pool`` would run on the cuda backend:

- which path: ``fastfuse/ops.py: _gather_first`` -- the layers straight into the kernels, or (in
  frozen-feature training, for the dtypes whose patch average PyTorch reads in one pass) a
  plain-PyTorch gather of the (B, N, D) stack first; and, inside the forward, the gather pass
  that csrc/cuda/fused_pool_cuda.cu runs before a forward whose heads are tiled over blocks;
- the tiles: the host planner of csrc/common/launch_plan.h, asked through the compiled library
  (``backends/cuda.py: launch_plan``) with the GPU's shared-memory limits; the backward's grid
  is ``backward_grid`` of the same header (restated in :func:`_backward_grid`).

From them, per launch and per buffer, ``global``: the bytes the loops of
csrc/cuda/pool_kernels.cuh load and store (the token reads are checked against the CUDA
emulation's count of the kernels' loads, tests/test_traffic_cuda.py); ``dram``: what reaches
DRAM, by the rule of fastfuse/bench/traffic.py (a first touch does; a re-read does when the
data cannot still sit in L2). Two CUDA-specific assumptions:

- the head-tile blocks of one sample are adjacent in the grid, so they run together and read the
  same token rows (the stack's, or "all" tokens') at about the same time: one DRAM read, the
  others hit L2;
- the backward's dw partials stay in L2 between the per-tile updates when all blocks' partials
  fit in L2 together, else every update goes to DRAM.

``minimum``: as for Triton (traffic.py) -- the tokens the op needs read once, the small inputs
read once, the outputs written once. A backward that works from the gathered stack needs only
that stack (its minimum counts the stack, not the layers).
"""
from __future__ import annotations

import math

from .traffic import Gpu, H100, Shape, Traffic, _rows_read

# csrc/common/launch_plan.h
HEAD_QUANTUM = 4
# pool_kernels.cuh: tokens per micro-tile of tile_dots in the forward and in the backward;
# tokens per micro-tile of tile_combine.
FORWARD_DOT_TOKENS, BACKWARD_DOT_TOKENS, COMBINE_TOKENS = 4, 2, 8


def _dtype(itemsize: int):
    import torch

    return {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[itemsize]


def _plan(shape: Shape, gpu: Gpu, *, dim_tokens: int, itemsize: int, tokens: str,
          layers_need_grad: bool) -> dict:
    from ..backends import cuda

    return cuda.launch_plan(shape.dim, shape.heads, dim_tokens, _dtype(itemsize), tokens=tokens,
                            layers_need_grad=layers_need_grad, shared_per_block_optin=gpu.shared_per_block_optin,
                            shared_per_multiprocessor=gpu.shared_per_multiprocessor)


def _num_tokens(shape: Shape) -> int:
    from ..gather import num_gathered_tokens

    return num_gathered_tokens([shape.layer_tokens] * shape.layers, shape.tokens)


def _accumulator(shape: Shape) -> int:
    return 8 if shape.itemsize == 8 else 4


def gathers_first(shape: Shape, training: bool) -> bool:
    """ops._gather_first for frozen layers (none needs its gradient): a training step on a
    gathered spec whose patch averages PyTorch reads in one pass on a CUDA device
    (gather.reads_rows_once) gathers the stack first."""
    import torch

    from ..gather import reads_rows_once

    accumulator = torch.float64 if shape.itemsize == 8 else torch.float32
    return (training and shape.tokens != "all"
            and reads_rows_once(_dtype(shape.itemsize), accumulator, torch.device("cuda")))


def forward_head_tiles(shape: Shape, gpu: Gpu = H100) -> int:
    """Blocks of heads per sample of the CUDA forward on the layers (the planner's head tile)."""
    plan = _plan(shape, gpu, dim_tokens=_num_tokens(shape), itemsize=shape.itemsize, tokens=shape.tokens,
                 layers_need_grad=False)
    return math.ceil(shape.heads / plan["forward_head_tile"])


def _resident_blocks(gpu: Gpu, shared_bytes: int, accumulator: int) -> int:
    """Blocks resident at once: __launch_bounds__ asks for 2 per SM (1 with float64
    accumulators), shared memory permitting (1 KiB reserved per block)."""
    per_sm = min(1 if accumulator == 8 else 2, gpu.shared_per_multiprocessor // (shared_bytes + 1024))
    return max(1, per_sm) * gpu.multiprocessors


def _backward_grid(batch: int, resident: int, head_tiles: int) -> tuple[int, int]:
    """launch_plan.h backward_grid: (ranges of samples, blocks)."""
    ranges = min(batch, max(1, resident // head_tiles))
    return ranges, ranges * head_tiles


def _tiles(num_tokens: int, tile: int):
    return [min(tile, num_tokens - n0) for n0 in range(0, num_tokens, tile)]


def _padded(count: int, quantum: int) -> int:
    return math.ceil(count / quantum) * quantum


def gather_launch(shape: Shape) -> Traffic:
    """gather_tokens_kernel (pool_kernels.cuh): every needed row read once, the (B, N, D) stack
    written once in the compute dtype. fused_pool_cuda.cu runs it before a forward whose heads
    are tiled over blocks, so that the layers are not read once per head tile."""
    B, D, e, a = shape.batch, shape.dim, shape.itemsize, _accumulator(shape)
    N = _num_tokens(shape)
    per_sample = {"layers": [_rows_read(shape) * D * e, 0], "stack": [0, N * D * a]}
    dram = B * (_rows_read(shape) * D * e + N * D * a)
    return Traffic("gather", (), {k: [B * r, B * w] for k, (r, w) in per_sample.items()}, dram,
                   _forward_minimum(shape))


def _forward_minimum(shape: Shape) -> float:
    B, D, H, e, a = shape.batch, shape.dim, shape.heads, shape.itemsize, _accumulator(shape)
    N = _num_tokens(shape)
    return B * (_rows_read(shape) * D * e + H * D * a + H * N * a + 2 * N * a) + H * D * a


def _launch_inputs(shape: Shape, gpu: Gpu, on_stack: bool, layers_need_grad: bool):
    """What a kernel reads per sample and how it is planned: (N, token element size, rows read,
    the planner's answer) on the layers, or on the gathered (B, N, D) stack in the compute
    dtype ("all" tokens)."""
    N = _num_tokens(shape)
    e = _accumulator(shape) if on_stack else shape.itemsize
    plan = _plan(shape, gpu, dim_tokens=N, itemsize=e, tokens="all" if on_stack else shape.tokens,
                 layers_need_grad=layers_need_grad)
    return N, e, N if on_stack else _rows_read(shape), plan


def _head_tiles(heads: int, head_tile: int) -> list[int]:
    """Heads of each block of heads (the last one ragged)."""
    return [min(head_tile, heads - start) for start in range(0, heads, head_tile)]


def forward_launch(shape: Shape, gpu: Gpu = H100, *, on_stack: bool = False) -> Traffic:
    """The CUDA forward kernel: on the layers, or (``on_stack``) on the gathered (B, N, D) stack
    in the compute dtype."""
    B, D, H, a = shape.batch, shape.dim, shape.heads, _accumulator(shape)
    N, e, rows, plan = _launch_inputs(shape, gpu, on_stack, layers_need_grad=False)
    tile, head_tile = plan["forward_tile_tokens"], plan["forward_head_tile"]
    block_heads = _head_tiles(H, head_tile)
    head_tiles = len(block_heads)
    # tile_dots: each micro-tile of 4 tokens reads 4 weight rows per quad; rows past the end
    # repeat the last one (loaded all the same).
    weight = sum(math.ceil(count / FORWARD_DOT_TOKENS) * _padded(heads, HEAD_QUANTUM) * D * a
                 for count in _tiles(N, tile) for heads in block_heads)
    per_sample = {
        "tokens" if on_stack else "layers": [head_tiles * rows * D * e, 0],
        "weight": [weight, 0],
        "pooled": [0, H * D * a],
        "attention": [H * N * a, 2 * H * N * a],   # raw scores, then normalised in place
        "mean, rstd": [0, 2 * N * a],
    }
    # One DRAM read of the rows (the sample's head-tile blocks run together), outputs once.
    dram = B * (rows * D * e + H * D * a + H * N * a + 2 * N * a) + H * D * a
    name = "forward" + (" (on the stack)" if on_stack else "")
    return Traffic(name, (tile, D, head_tile), {k: [B * r, B * w] for k, (r, w) in per_sample.items()},
                   dram, _forward_minimum(shape))


def forward_launches(shape: Shape, gpu: Gpu = H100) -> list[Traffic]:
    """The kernels of a CUDA forward on frozen layers (inference): the forward on the layers,
    or, with heads tiled over blocks on a gathered spec, the gather pass and the forward over
    its stack (fused_pool_cuda.cu forward_typed)."""
    if shape.tokens != "all" and forward_head_tiles(shape, gpu) > 1:
        return [gather_launch(shape), forward_launch(shape, gpu, on_stack=True)]
    return [forward_launch(shape, gpu)]


def forward_traffic(shape: Shape, gpu: Gpu = H100) -> Traffic:
    """An inference forward on the cuda backend, its launches' bytes added up."""
    launches = forward_launches(shape, gpu)
    if len(launches) == 1:
        return launches[0]
    global_bytes = {}
    for launch in launches:
        global_bytes.update({f"{launch.kernel}: {key}": value for key, value in launch.global_bytes.items()})
    return Traffic(" + ".join(launch.kernel for launch in launches), launches[-1].config, global_bytes,
                   sum(launch.dram for launch in launches), launches[-1].minimum)


def backward_traffic(shape: Shape, gpu: Gpu = H100, *, layers_need_grad: bool = False,
                     grad_attention: bool = False) -> Traffic:
    """The CUDA backward (+ the dw reduce) as a training step runs it: frozen features work from
    the stack gathered in the forward where attentive_pool gathers first, else on the layers."""
    on_stack = not layers_need_grad and gathers_first(shape, training=True)
    return backward_launch(shape, gpu, on_stack=on_stack, layers_need_grad=layers_need_grad,
                           grad_attention=grad_attention)


def backward_launch(shape: Shape, gpu: Gpu = H100, *, on_stack: bool = False, layers_need_grad: bool = False,
                    grad_attention: bool = False) -> Traffic:
    """The CUDA backward kernel (+ the dw reduce) on the layers, or on the gathered stack."""
    B, D, H, a = shape.batch, shape.dim, shape.heads, _accumulator(shape)
    N, e, rows, plan = _launch_inputs(shape, gpu, on_stack, layers_need_grad)
    tile, in_shared, head_tile = plan["backward_tile_tokens"], plan["backward_weight_grad_in_shared"], \
        plan["backward_head_tile"]
    padded_dim = plan["padded_dim"]
    block_heads = _head_tiles(H, head_tile)
    head_tiles = len(block_heads)
    padded_heads = _padded(head_tile, HEAD_QUANTUM)
    ranges, blocks = _backward_grid(B, _resident_blocks(gpu, plan["backward_bytes"], a), head_tiles)
    counts = _tiles(N, tile)
    one_tile = len(counts) == 1
    gA = 1 if grad_attention else 0
    g_dots = sum(math.ceil(count / BACKWARD_DOT_TOKENS) * _padded(heads, HEAD_QUANTUM) * D * a
                 for count in counts for heads in block_heads)
    combine = sum(math.ceil(count / COMBINE_TOKENS) * H * D * a for count in counts) if layers_need_grad else 0
    written_rows = (N if on_stack or shape.tokens == "all" else shape.layers * shape.layer_tokens)
    dw_updates = 0 if in_shared else len(counts) * padded_heads * D * a   # per block-sample
    per_sample = {
        "tokens" if on_stack else "layers": [head_tiles * rows * D * e, 0],
        "grad_pooled": [(0 if one_tile else H * D * a) + g_dots + combine, 0],
        "pooled": [0 if one_tile else H * D * a, 0],
        "weight": [combine, 0],
        "attention, grad attention": [H * N * a * (1 + (1 if one_tile else 0)) * (1 + gA), 0],
        "mean, rstd": [2 * N * a + (N * a if layers_need_grad else 0), 0],
        "dw partial": [head_tiles * dw_updates, head_tiles * dw_updates],
        "layer gradients": [0, written_rows * D * e if layers_need_grad else 0],
    }
    partial_bytes = blocks * padded_heads * padded_dim * a
    small_inputs = H * D * a + (0 if one_tile else H * D * a) + (1 + gA) * H * N * a + 2 * N * a
    dram_sample = rows * D * e + small_inputs + (written_rows * D * e if layers_need_grad else 0)
    if not in_shared and partial_bytes > gpu.l2_bytes:
        dram_sample += 2 * head_tiles * dw_updates
    # + w once, the partials written (zeroed first when they live in global memory) and read
    # back by the reduce, dw written.
    dram = B * dram_sample + H * D * a + (2 + (0 if in_shared else 1)) * partial_bytes + H * D * a
    minimum = B * (rows * D * e + H * D * a + (1 + gA) * H * N * a + 2 * N * a
                   + (written_rows * D * e if layers_need_grad else 0)) + 2 * H * D * a
    name = "backward" + (" (on the stack)" if on_stack else "")
    return Traffic(name, (tile, D, head_tile), {k: [B * r, B * w] for k, (r, w) in per_sample.items()},
                   dram, minimum)
