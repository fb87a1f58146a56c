"""The CUDA host planner (csrc/common/launch_plan.h), run on the CPU through the compiled
library's query for the shapes users run, against the constraints stated here independently:
the plans fit the shared memory of an sm_80 / sm_90 GPU, tiles and head tiles are what the kernels
can take, the bytes are the kernels' footprint (restated below from docs/cuda.md), the largest tile
that keeps two blocks per SM wins, and 16-byte chunks stay aligned. The kernels' own use of the
planned bytes is checked by the emulation (tests/test_cuda_emulated.py, the canary after shared
memory)."""
import itertools

import pytest
import torch

from fastfuse import _extension
from fastfuse.backends import cuda

pytestmark = pytest.mark.skipif(not _extension.load()[0], reason=f"no compiled library: {_extension.load()[1]}")

# Shared memory per block (opt-in maximum) and per SM, from the CUDA C++ Programming Guide's
# table of compute capabilities: 8.0 (A100) 163 KiB / 164 KiB, 9.0 (H100, H200) 227 KiB / 228 KiB.
GPUS = {"sm_80": (163 * 1024, 164 * 1024), "sm_90": (227 * 1024, 228 * 1024)}
# ViT-S/B/L/H widths; N from cls+ap over 12-24 layers to all tokens of 12 ViT-B/16 layers
# (12 x 197 = 2364); H from one probe's 12 heads to 16 probes at once.
DIMS = (384, 768, 1024, 1280)
TOKENS = (24, 48, 197, 577, 2364)
HEADS = (12, 48, 192)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def footprint(dtype, dim, heads, tile, average, need_grad=None, dw_in_shared=None, head_tile=None,
              backward_head_tile=None):
    """Bytes of shared memory of one block, as docs/cuda.md describes the kernels' layout: 48-byte
    token slots (rounded to 32 bytes), then accumulator-dtype buffers of D padded to whole 16-byte
    loads (at least 4 elements); forward: tile x D + H x D + 2 H x tile + 4 H; backward:
    tile x D (+ tile x D for dxh) (+ H x D for dw) + 3 H x tile + 4 H, H being the block's
    heads (backward_head_tile, else all); H padded to 4; "ap" adds max(1, 256 / chunks) rows
    of D."""
    acc = 8 if dtype == torch.float64 else 4
    chunk = max(16 // dtype.itemsize, 4)
    padded_dim = -(-dim // chunk) * chunk
    scratch = max(1, 256 // (padded_dim // chunk)) * padded_dim if average else 0
    slots = -(-tile * 48 // 32) * 32
    if head_tile is not None:  # forward
        padded = -(-head_tile // 4) * 4
        elements = tile * padded_dim + padded * padded_dim + 2 * padded * tile + 4 * padded
    else:
        padded = -(-(backward_head_tile or heads) // 4) * 4
        elements = (tile * padded_dim * (2 if need_grad else 1) + (padded * padded_dim if dw_in_shared else 0)
                    + 3 * padded * tile + 4 * padded)
    return slots + acc * (elements + scratch)


def tile_choices(num_tokens):
    cap = -(-min(max(num_tokens, 1), 32) // 8) * 8
    return [cap] + [size for size in (16, 8) if size < cap]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", GPUS)
def test_plans_fit_the_gpu_for_the_shapes_users_run(arch, dtype):
    optin, per_sm = GPUS[arch]
    preferred = min(per_sm // 2 - 1024, optin)
    for dim, num_tokens, heads, average, need_grad in itertools.product(
            DIMS, TOKENS, HEADS, (False, True), (False, True)):
        where = f"{arch} {dtype} D={dim} N={num_tokens} H={heads} ap={average} dx={need_grad}"
        plan = cuda.launch_plan(dim, heads, num_tokens, dtype, tokens="cls+ap" if average else "all",
                                layers_need_grad=need_grad, shared_per_block_optin=optin,
                                shared_per_multiprocessor=per_sm)
        chunk = plan["chunk_width"]
        assert chunk * dtype.itemsize % 16 == 0 and plan["padded_dim"] % chunk == 0 and plan["padded_dim"] >= dim
        # Forward: a tile the kernels take, all heads or a multiple of 4, the bytes it needs.
        tile, head_tile = plan["forward_tile_tokens"], plan["forward_head_tile"]
        assert tile in tile_choices(num_tokens), where
        assert head_tile == heads or (head_tile % 4 == 0 and 4 <= head_tile < heads), where
        assert plan["forward_bytes"] == footprint(dtype, dim, heads, tile, average, head_tile=head_tile), where
        assert plan["forward_bytes"] <= optin, where
        if head_tile < heads:  # heads are tiled only when no tile with all heads fits at all
            assert footprint(dtype, dim, heads, 8, average, head_tile=heads) > optin, where
        elif plan["forward_bytes"] > preferred:  # one block per SM only when 8 tokens do not fit two
            assert footprint(dtype, dim, heads, 8, average, head_tile=heads) > preferred, where
        else:  # the largest tile that keeps two blocks per SM
            larger = [size for size in tile_choices(num_tokens) if size > tile]
            assert all(footprint(dtype, dim, heads, size, average, head_tile=heads) > preferred
                       for size in larger), where
        # Backward: float32 / float16 / bfloat16 always fit these GPUs; float64 may not (the
        # backend then says so and "auto" moves on), exactly when the minimum does not.
        minimum = footprint(dtype, dim, heads, 8, True, need_grad=True, dw_in_shared=False)
        assert plan["min_bytes"] >= minimum, where
        tile = plan["backward_tile_tokens"]
        if dtype != torch.float64:
            assert tile > 0, where
        if tile == 0:
            assert footprint(dtype, dim, heads, 8, average, need_grad=need_grad, dw_in_shared=False) > optin, where
            assert plan["min_bytes"] > optin, where
            continue
        assert tile in tile_choices(num_tokens), where
        in_shared = bool(plan["backward_weight_grad_in_shared"])
        backward_head_tile = plan["backward_head_tile"]
        assert plan["backward_bytes"] == footprint(dtype, dim, heads, tile, average, need_grad, in_shared,
                                                   backward_head_tile=backward_head_tile), where
        assert plan["backward_bytes"] <= optin, where
        budget = preferred if plan["backward_bytes"] <= preferred else optin
        larger = [size for size in tile_choices(num_tokens) if size > tile]
        if in_shared and backward_head_tile == heads:
            # dw of all heads in shared memory: two blocks per SM first, then the largest tile.
            if budget == optin:
                assert footprint(dtype, dim, heads, 8, average, need_grad, True) > preferred, where
            assert all(footprint(dtype, dim, heads, size, average, need_grad, True) > budget
                       for size in larger), where
        else:
            # Only when no tile holds the dw of all heads at all.
            assert footprint(dtype, dim, heads, 8, average, need_grad, True) > optin, where
        if backward_head_tile < heads:
            # dw-only: heads tiled (a multiple of 4), dw in shared; the largest tile that takes
            # 4 heads at all, two blocks per SM if it allows, then the most heads beside it.
            assert not need_grad and in_shared, where
            assert backward_head_tile % 4 == 0 and 4 <= backward_head_tile, where
            assert all(footprint(dtype, dim, heads, size, average, False, True, backward_head_tile=4) > optin
                       for size in larger), where
            if budget == optin:
                assert footprint(dtype, dim, heads, tile, average, False, True, backward_head_tile=4) > preferred, where
            bigger = backward_head_tile + 4
            assert bigger >= heads or footprint(dtype, dim, heads, tile, average, False, True,
                                                backward_head_tile=bigger) > budget, where
        elif not in_shared:
            # dw in global memory (with layer gradients, or not even 4 heads fit): the largest
            # tile that fits, two blocks per SM if that tile allows.
            assert need_grad or footprint(dtype, dim, heads, 8, average, False, True, backward_head_tile=4) > optin, where
            assert all(footprint(dtype, dim, heads, size, average, need_grad, False) > optin for size in larger), where
            if budget == optin:
                assert plan["backward_bytes"] > preferred, where


def test_min_bytes_is_the_smallest_backward_tile():
    """kernel_limits (what the backend compares with the GPU's limit) for a ViT-B probe."""
    needed, max_layers = cuda.kernel_limits(768, 12, torch.float32)
    assert needed == footprint(torch.float32, 768, 12, 8, True, need_grad=True, dw_in_shared=False)
    assert max_layers == 64


def test_query_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="element_bytes must be 2, 4 or 8"):
        torch.ops.fastfuse.cuda_launch_plan(3, 768, 12, 197, False, True, 1, 1)
    with pytest.raises(RuntimeError, match="D <= 2\\^25"):
        torch.ops.fastfuse.cuda_launch_plan(4, 0, 12, 197, False, True, 1, 1)
