"""token_moments (fastfuse.token_moments): per-channel mean and M2 over gathered tokens.

Grid: persistent, ``programs`` <= B; a program loops over samples b = pid, pid + programs, ...
and over (BLOCK_N, BLOCK_D) tiles of each sample's tokens, read where they lie (tokens.py;
GATHERED: averaged into the program's scratch slot first). Each tile's mean and centred sum of
squares per channel are merged (Chan et al.) into the program's running (mean, M2) row of
``partials`` (programs, 2, D), read and written by the same threads; the launcher merges the
programs' rows. No (B, N, D) intermediate; nothing squares a raw value, so the variance keeps
its digits when |mean| >> std.
"""
import triton
import triton.language as tl

from .tokens import GATHERED, aligned_dim, gather_sample, load_token_tile, slot_row


@triton.jit
def token_moments_kernel(
    layers, token_table_ptr, scratch_ptr, partials_ptr,
    batch, num_tokens, dim, stride_b, stride_t, stride_d,
    ADDRESSING: tl.constexpr, ROW_ALIGN: tl.constexpr, DIM_ALIGN: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    dim = aligned_dim(dim, DIM_ALIGN)
    pid = tl.program_id(0)
    n_base = tl.arange(0, BLOCK_N)
    d_base = tl.arange(0, BLOCK_D)
    slot_ptr = scratch_ptr + pid.to(tl.int64) * num_tokens * slot_row(dim)
    mean_row = partials_ptr + pid.to(tl.int64) * 2 * dim
    m2_row = mean_row + dim
    seen = tl.zeros((), ACC)  # tokens merged so far by this program
    for b in range(pid, batch, tl.num_programs(0)):
        b64 = tl.cast(b, tl.int64)
        if ADDRESSING == GATHERED:
            gather_sample(layers, token_table_ptr, slot_ptr, b64, num_tokens,
                          dim, stride_d, ROW_ALIGN, ACC, BLOCK_N, BLOCK_D)
            tl.debug_barrier()
        for n0 in range(0, num_tokens, BLOCK_N):
            n_offs = n0 + n_base
            n_mask = n_offs < num_tokens
            width = tl.cast(tl.minimum(num_tokens - n0, BLOCK_N), ACC)
            for d0 in range(0, dim, BLOCK_D):
                d_offs = d0 + d_base
                d_mask = d_offs < dim
                x = load_token_tile(layers, token_table_ptr, slot_ptr, b64,
                                    n_offs, d_offs, num_tokens, dim, stride_b, stride_t,
                                    stride_d, ADDRESSING, ROW_ALIGN, ACC)
                tile_mean = tl.sum(x, axis=0) / width
                centred = tl.where(n_mask[:, None], x - tile_mean[None, :], 0.0)
                tile_m2 = tl.sum(centred * centred, axis=0)
                mean = tl.load(mean_row + d_offs, mask=d_mask, other=0.0)
                m2 = tl.load(m2_row + d_offs, mask=d_mask, other=0.0)
                delta = tile_mean - mean
                weight = width / (seen + width)
                tl.store(mean_row + d_offs, mean + delta * weight, mask=d_mask)
                tl.store(m2_row + d_offs, m2 + tile_m2 + delta * delta * (seen * weight), mask=d_mask)
            seen += width
        tl.debug_barrier()  # the next sample rewrites this program's scratch
