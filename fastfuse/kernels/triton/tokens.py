"""Addressing the gathered tokens where they lie (SPEC §3): shared helpers of both kernels.

A token n of sample b is read in one of three ways (``ADDRESSING``, a constexpr):

    AFFINE    one layer, tokens="all": row n of layers[0] (its batch and row strides);
              the (B, N, D) tensor form, no table.
    TABLE     one row per token, any layer ("all" over several layers, "cls"): the token
              table gives its layer and row.
    GATHERED  "ap" / "cls+ap": a token is the mean of ``count`` rows of a layer. Each
              program first averages its sample's N tokens into its own scratch slot
              (N, D) in the accumulation dtype (gather_sample), then reads them from there: the second read a
              pass needs hits that slot in L2 instead of re-reading every patch row, and the
              scratch holds one sample per program (a persistent grid), never the (B, N, D) stack.

The layers (and their gradients) reach the kernels as a tuple of pointers, kernel arguments
like any tensor: nothing about where they lie is written to device memory, so a launch copies
nothing from the host and a CUDA graph may capture it. The token table (int64, on the device)
holds only the layout: row offsets and strides relative to each token's layer, which do not
change from call to call (the launcher builds it once per layout).
"""
import triton
import triton.language as tl

AFFINE = tl.constexpr(0)
TABLE = tl.constexpr(1)
GATHERED = tl.constexpr(2)

# Token table: int64 (N, TOKEN_COLUMNS). Row offsets are relative to the token's layer.
TOKEN_COLUMNS = tl.constexpr(7)
TOKEN_LAYER = tl.constexpr(0)         # which layer
TOKEN_ROW = tl.constexpr(1)           # offset of the token's first row at b = 0
TOKEN_BATCH_STRIDE = tl.constexpr(2)  # the layer's batch stride
TOKEN_ROW_STRIDE = tl.constexpr(3)    # between the rows that are averaged (GATHERED)
TOKEN_ROW_COUNT = tl.constexpr(4)     # rows averaged: 1, or T - num_prefix_tokens for "ap"
TOKEN_GRAD_ROW = tl.constexpr(5)      # offset of the token's row in its layer's gradient
TOKEN_GRAD_BATCH_STRIDE = tl.constexpr(6)

# Layer table: int64 (L, LAYER_COLUMNS), the layout of each layer (for the backward's scatter).
LAYER_COLUMNS = tl.constexpr(3)
LAYER_LENGTH = tl.constexpr(0)        # T_l
LAYER_CLS_TOKEN = tl.constexpr(1)     # index n of the layer's "cls" token, or -1
LAYER_AP_TOKEN = tl.constexpr(2)      # index n of the layer's "ap" token, or -1


@triton.jit
def slot_row(dim):
    """Row stride of the scratch slots: D rounded up to 16 elements, so that every slot row
    starts 16-byte aligned and Triton can prove it (vector loads and stores for any D, e.g.
    1000). The launcher allocates the slots with the same stride (backends/triton.py _slot_row)."""
    return (dim + 15) // 16 * 16


@triton.jit
def layer_pointers(bases, layer, rows):
    """``bases[layer] + rows`` for a tuple of layer pointers and a (tensor of) layer index:
    one select per layer, unrolled (the tuple's length is a compile-time constant)."""
    ptrs = bases[0] + rows
    for index in tl.static_range(1, len(bases)):
        ptrs = tl.where(layer == index, bases[index] + rows, ptrs)
    return ptrs


@triton.jit
def aligned_dim(dim, DIM_ALIGN: tl.constexpr):
    """D itself, stated as a multiple of DIM_ALIGN (> 1 only when one 16-byte vector divides D
    and 16 does not: backends/triton.py plan): the masks ``d < dim`` are then constant over a
    vector, so loads and stores stay 16-byte vectors at D = 1000 too (Triton's own
    specialisation states multiples of 16 only; without this D = 1000 ran element by element
    and spilled). Left alone otherwise: a computed D costs a register everywhere it is used."""
    if DIM_ALIGN > 1:
        dim = (dim // DIM_ALIGN) * DIM_ALIGN
    return dim


@triton.jit
def token_row_pointers(layers, token_table_ptr, b64, n_offs, n_mask, stride_b, stride_t,
                       ADDRESSING: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """Pointers to the first row of tokens ``n_offs`` of sample b."""
    if ADDRESSING == AFFINE:
        rows = b64 * stride_b + n_offs.to(tl.int64) * stride_t
        if ROW_ALIGN > 1:  # every offset is a multiple of 16 bytes: allow vector loads
            rows = tl.multiple_of(rows, ROW_ALIGN)
        return layers[0] + rows
    else:
        entry = token_table_ptr + n_offs * TOKEN_COLUMNS
        layer = tl.load(entry + TOKEN_LAYER, mask=n_mask, other=0)
        rows = (tl.load(entry + TOKEN_ROW, mask=n_mask, other=0)
                + b64 * tl.load(entry + TOKEN_BATCH_STRIDE, mask=n_mask, other=0))
        if ROW_ALIGN > 1:
            rows = tl.multiple_of(rows, ROW_ALIGN)
        return layer_pointers(layers, layer, rows)


@triton.jit
def grad_row_pointers(grads, token_table_ptr, b64, n_offs, n_mask, num_tokens, dim,
                      ADDRESSING: tl.constexpr, GRAD_ALIGN: tl.constexpr):
    """Pointers to the gradient rows of tokens ``n_offs`` (one row each; gradients are
    contiguous, so every row offset is a multiple of D)."""
    if ADDRESSING == AFFINE:
        rows = (b64 * num_tokens + n_offs.to(tl.int64)) * dim
        if GRAD_ALIGN > 1:
            rows = tl.multiple_of(rows, GRAD_ALIGN)
        return grads[0] + rows
    else:
        entry = token_table_ptr + n_offs * TOKEN_COLUMNS
        layer = tl.load(entry + TOKEN_LAYER, mask=n_mask, other=0)
        rows = (tl.load(entry + TOKEN_GRAD_ROW, mask=n_mask, other=0)
                + b64 * tl.load(entry + TOKEN_GRAD_BATCH_STRIDE, mask=n_mask, other=0))
        if GRAD_ALIGN > 1:
            rows = tl.multiple_of(rows, GRAD_ALIGN)
        return layer_pointers(grads, layer, rows)


@triton.jit
def load_token_tile(layers, token_table_ptr, slot_ptr, b64, n_offs, d_offs,
                    num_tokens, dim, stride_b, stride_t, stride_d,
                    ADDRESSING: tl.constexpr, ROW_ALIGN: tl.constexpr, ACC: tl.constexpr):
    """(BLOCK_N, BLOCK_D) tile of sample b's gathered tokens in ACC, zero outside (N, D)."""
    n_mask = n_offs < num_tokens
    mask = n_mask[:, None] & (d_offs < dim)[None, :]
    if ADDRESSING == GATHERED:
        ptrs = slot_ptr + n_offs[:, None] * slot_row(dim) + d_offs[None, :]
    else:
        rows = token_row_pointers(layers, token_table_ptr, b64, n_offs, n_mask, stride_b,
                                  stride_t, ADDRESSING, ROW_ALIGN)
        ptrs = rows[:, None] + d_offs[None, :] * stride_d
    return tl.load(ptrs, mask=mask, other=0.0).to(ACC)


@triton.jit
def gather_sample(layers, token_table_ptr, slot_ptr, b64, num_tokens, dim,
                  stride_d, ROW_ALIGN: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Average each token's rows into the program's scratch slot (N, D), in ACC.

    Reads every averaged row once, BLOCK_R rows x BLOCK_D features per load (dense and
    coalesced along D); writes N * D * 4 bytes that stay in L2 for the passes that follow.
    """
    r_base = tl.arange(0, BLOCK_R)
    d_base = tl.arange(0, BLOCK_D)
    for n in range(0, num_tokens):
        entry = token_table_ptr + n * TOKEN_COLUMNS
        layer = tl.load(entry + TOKEN_LAYER)
        base = layer_pointers(layers, layer, 0)
        first = tl.load(entry + TOKEN_ROW) + b64 * tl.load(entry + TOKEN_BATCH_STRIDE)
        row_stride = tl.load(entry + TOKEN_ROW_STRIDE)
        count = tl.load(entry + TOKEN_ROW_COUNT)
        for d0 in range(0, dim, BLOCK_D):
            d_offs = d0 + d_base
            d_mask = d_offs < dim
            total = tl.zeros((BLOCK_D,), ACC)
            for r0 in range(0, count, BLOCK_R):
                r_offs = r0 + r_base
                rows = first + r_offs * row_stride
                if ROW_ALIGN > 1:
                    rows = tl.multiple_of(rows, ROW_ALIGN)
                tile = tl.load(base + rows[:, None] + d_offs[None, :] * stride_d,
                               mask=(r_offs < count)[:, None] & d_mask[None, :], other=0.0)
                total += tl.sum(tile.to(ACC), axis=0)
            average = total / count.to(ACC)
            if tl.sum(tl.where(tl.abs(average) < float("inf"), 0, 1)) > 0:
                # The sum overflowed (or a row is not finite): average the rows divided first,
                # so huge but finite patches keep a finite average (issue 12 item 7).
                average = tl.zeros((BLOCK_D,), ACC)
                for r0 in range(0, count, BLOCK_R):
                    r_offs = r0 + r_base
                    rows = first + r_offs * row_stride
                    tile = tl.load(base + rows[:, None] + d_offs[None, :] * stride_d,
                                   mask=(r_offs < count)[:, None] & d_mask[None, :], other=0.0)
                    average += tl.sum(tile.to(ACC) / count.to(ACC), axis=0)
            tl.store(slot_ptr + n * slot_row(dim) + d_offs, average, mask=d_mask)


@triton.jit
def token_scale(peak, ACC: tl.constexpr):
    """2^floor(log2 peak) where peak > 1 and finite, else 1 (csrc/common/fused_pool_math.h:
    token_scale): the exponent bits of peak, read through its bit pattern."""
    if ACC == tl.float64:
        power = (peak.to(tl.int64, bitcast=True) & 0x7FF0000000000000).to(tl.float64, bitcast=True)
    else:
        power = (peak.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    finite = peak < float("inf")
    return tl.where((peak > 1.0) & finite, power, 1.0)
