"""Forward of the fused op (SPEC §2): per-token LayerNorm statistics, scores, softmax over the
N tokens, pooled sum; tokens read where they lie (tokens.py).

Grid: persistent, ``programs`` <= B; a program loops over samples b = pid, pid + programs, ...
(one program per sample in the AFFINE/TABLE forms). Per sample, one sweep over N tiles; per
tile, everything every head needs from it while it is hot:

  statistics  over D tiles: max |x|, then the tile's LayerNorm mean / rstd (Chan's merge of
              per-D-tile moments, in units of a per-token power of two that keeps squares
              finite for any magnitude; none with LAYERNORM false: normalize="none")
  per block of BLOCK_H heads:
    scores    s = rstd (x . w - mean sum(w)), stored raw in ``attention``; the heads' running
              max m and sum l (online softmax) in the program's state slot (2, H)
    pooled    pooled = pooled * exp(m_old - m_new) + exp(s - m_new) @ xh, one D tile at a time,
              accumulated in the ``pooled`` output itself (read back from L2, this program's rows)
  then, per block of heads: pooled /= l, attention = exp(s - m) / l.

So a token tile comes from DRAM once (its later reads within the same tile step hit L1 / L2),
whatever the number of head blocks: a sample's tokens are read once for all heads (GATHERED:
its averaged rows once, into the program's scratch slot). The accumulation happens in
``pooled`` (H * D * a bytes per sample, read and written once per N tile, from L2).

Bytes per sample (e = token element size, a = 4, or 8 for float64 tokens; N tokens, D
features, H heads): DRAM: the N * D * e token bytes once (GATHERED: every averaged row once),
write pooled H * D * a, attention H * N * a, mean and rstd 2 * N * a. L2: the tile re-reads,
H * D * a of weights per N tile, the pooled accumulator 2 * H * D * a per N tile, the scores
once more at the end. Intended bound: DRAM bandwidth. 4 N D H FLOP per sample: tensor cores
(tf32) for float16 / bfloat16 tokens, exact FMA dots for float32 / float64.
"""
import triton
import triton.language as tl

from .configs import AUTOTUNE_KEY, FORWARD_SWITCHES, forward_configs, pruner
from .tokens import GATHERED, aligned_dim, gather_sample, load_token_tile, slot_row, token_scale


@triton.autotune(configs=forward_configs(), key=AUTOTUNE_KEY + FORWARD_SWITCHES,
                 prune_configs_by={"early_config_prune": pruner("forward")})
@triton.jit(do_not_specialize=["batch"])
def pool_forward_kernel(
    layers, token_table_ptr, weight_ptr, scratch_ptr, state_ptr,
    pooled_ptr, attention_ptr, mean_ptr, rstd_ptr,
    batch, num_tokens, dim, heads, stride_b, stride_t, stride_d, eps, batch_bucket,
    TOKEN_DTYPE: tl.constexpr, ADDRESSING: tl.constexpr, ROW_ALIGN: tl.constexpr, DIM_ALIGN: tl.constexpr,
    LAYERNORM: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, SMALLEST_NORMAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    dim = aligned_dim(dim, DIM_ALIGN)
    pid = tl.program_id(0)
    n_base = tl.arange(0, BLOCK_N)
    d_base = tl.arange(0, BLOCK_D)
    h_base = tl.arange(0, BLOCK_H)
    slot_ptr = scratch_ptr + pid.to(tl.int64) * num_tokens * slot_row(dim)
    state_ptr = state_ptr + pid.to(tl.int64) * 2 * heads  # running max (H), then sum (H)
    for b in range(pid, batch, tl.num_programs(0)):
        b64 = tl.cast(b, tl.int64)
        if ADDRESSING == GATHERED:
            gather_sample(layers, token_table_ptr, slot_ptr, b64, num_tokens,
                          dim, stride_d, ROW_ALIGN, ACC, BLOCK_N, BLOCK_D)
            tl.debug_barrier()
        pooled_rows = pooled_ptr + b64 * heads * dim
        for n0 in range(0, num_tokens, BLOCK_N):
            n_offs = n0 + n_base
            n_mask = n_offs < num_tokens
            # Statistics of this tile's tokens, in units of a per-token power of two (issue 12
            # item 7: squares of huge tokens stay finite), found by a first sweep for max |x|
            # (tile re-reads hit L1 / L2; one sweep with a growing scale spilled registers).
            mean = tl.zeros((BLOCK_N,), ACC)
            m2 = tl.zeros((BLOCK_N,), ACC)
            if LAYERNORM:
                peak = tl.zeros((BLOCK_N,), ACC)
                for d0 in range(0, dim, BLOCK_D):
                    x = load_token_tile(layers, token_table_ptr, slot_ptr, b64,
                                        n_offs, d0 + d_base, num_tokens, dim, stride_b, stride_t,
                                        stride_d, ADDRESSING, ROW_ALIGN, ACC)
                    peak = tl.maximum(peak, tl.max(tl.abs(x), axis=1))
                scale = token_scale(peak, ACC)
                inverse = 1.0 / scale  # a power of two: multiplying by it is exact
                for d0 in range(0, dim, BLOCK_D):
                    d_offs = d0 + d_base
                    d_mask = d_offs < dim
                    x = load_token_tile(layers, token_table_ptr, slot_ptr, b64,
                                        n_offs, d_offs, num_tokens, dim, stride_b, stride_t,
                                        stride_d, ADDRESSING, ROW_ALIGN, ACC) * inverse[:, None]
                    # Chan et al.: merge this tile's mean / M2 into the running ones (stable for
                    # large |mean| / std, unlike E[x^2] - E[x]^2). Earlier tiles are full.
                    width = tl.cast(tl.minimum(dim - d0, BLOCK_D), ACC)
                    seen = tl.cast(d0, ACC)
                    tile_mean = tl.sum(x, axis=1) / width
                    centred = tl.where(d_mask[None, :], x - tile_mean[:, None], 0.0)
                    delta = tile_mean - mean
                    mean += delta * (width / (seen + width))
                    m2 += tl.sum(centred * centred, axis=1) + delta * delta * (seen * width / (seen + width))
                # eps in the scaled units; once it underflows, the smallest normal number keeps
                # a constant huge token's rstd finite (csrc/common/fused_pool_math.h).
                variance = m2 / dim + eps / scale / scale
                variance = tl.where((scale > 1.0) & (variance < SMALLEST_NORMAL), SMALLEST_NORMAL, variance)
                # Back to the token's units (exact), so the head loops below are unchanged:
                # the squares overflowed first (x . w stays finite while |x| |w| D does).
                rstd = tl.rsqrt(variance) * inverse
                mean = mean * scale
            else:  # normalize="none": xh = x, saved as mean 0 and rstd 1
                rstd = tl.full((BLOCK_N,), 1.0, ACC)
            tl.store(mean_ptr + b64 * num_tokens + n_offs, mean, mask=n_mask)
            tl.store(rstd_ptr + b64 * num_tokens + n_offs, rstd, mask=n_mask)
            for h0 in range(0, heads, BLOCK_H):
                h_offs = h0 + h_base
                h_mask = h_offs < heads
                dots = tl.zeros((BLOCK_N, BLOCK_H), ACC)
                weight_sum = tl.zeros((BLOCK_H,), ACC)
                for d0 in range(0, dim, BLOCK_D):
                    d_offs = d0 + d_base
                    d_mask = d_offs < dim
                    x = load_token_tile(layers, token_table_ptr, slot_ptr, b64,
                                        n_offs, d_offs, num_tokens, dim, stride_b, stride_t,
                                        stride_d, ADDRESSING, ROW_ALIGN, ACC)
                    w = tl.load(weight_ptr + h_offs[None, :] * dim + d_offs[:, None],
                                mask=h_mask[None, :] & d_mask[:, None], other=0.0)
                    dots = tl.dot(x, w, dots, input_precision=DOT_PRECISION)
                    weight_sum += tl.sum(w, axis=0)
                # w . xh = rstd (w . x - mean sum(w)): the centring folds into one correction.
                scores = rstd[:, None] * (dots - mean[:, None] * weight_sum[None, :])
                tl.store(attention_ptr + (b64 * heads + h_offs[None, :]) * num_tokens + n_offs[:, None],
                         scores, mask=n_mask[:, None] & h_mask[None, :])
                scores = tl.where(n_mask[:, None], scores, float("-inf"))
                later_tile = n0 > 0
                old_max = tl.load(state_ptr + h_offs, mask=h_mask & later_tile, other=float("-inf"))
                old_sum = tl.load(state_ptr + heads + h_offs, mask=h_mask & later_tile, other=0.0)
                new_max = tl.maximum(old_max, tl.max(scores, axis=0))
                rescale = tl.exp(old_max - new_max)  # 0 on the first tile (old_max = -inf)
                weights = tl.exp(scores - new_max[None, :])  # (BLOCK_N, BLOCK_H), 0 off the tile
                tl.store(state_ptr + h_offs, new_max, mask=h_mask)
                tl.store(state_ptr + heads + h_offs, old_sum * rescale + tl.sum(weights, axis=0), mask=h_mask)
                weights_t = tl.trans(weights)
                for d0 in range(0, dim, BLOCK_D):
                    d_offs = d0 + d_base
                    hd_mask = h_mask[:, None] & (d_offs < dim)[None, :]
                    x = load_token_tile(layers, token_table_ptr, slot_ptr, b64,
                                        n_offs, d_offs, num_tokens, dim, stride_b, stride_t,
                                        stride_d, ADDRESSING, ROW_ALIGN, ACC)
                    normed = (x - mean[:, None]) * rstd[:, None]
                    pooled_ptrs = pooled_rows + h_offs[:, None] * dim + d_offs[None, :]
                    pooled = tl.load(pooled_ptrs, mask=hd_mask & later_tile, other=0.0)
                    pooled = tl.dot(weights_t, normed, pooled * rescale[:, None], input_precision=DOT_PRECISION)
                    tl.store(pooled_ptrs, pooled, mask=hd_mask)
            tl.debug_barrier()  # the next tile reads back pooled and the running max / sum
        # Normalise: pooled /= sum, attention = exp(s - max) / sum.
        for h0 in range(0, heads, BLOCK_H):
            h_offs = h0 + h_base
            h_mask = h_offs < heads
            row_max = tl.load(state_ptr + h_offs, mask=h_mask, other=0.0)
            inv_sum = 1.0 / tl.load(state_ptr + heads + h_offs, mask=h_mask, other=1.0)
            for d0 in range(0, dim, BLOCK_D):
                d_offs = d0 + d_base
                hd_mask = h_mask[:, None] & (d_offs < dim)[None, :]
                pooled_ptrs = pooled_rows + h_offs[:, None] * dim + d_offs[None, :]
                tl.store(pooled_ptrs, tl.load(pooled_ptrs, mask=hd_mask, other=0.0) * inv_sum[:, None], mask=hd_mask)
            for n0 in range(0, num_tokens, BLOCK_N):
                n_offs = n0 + n_base
                valid = h_mask[:, None] & (n_offs < num_tokens)[None, :]
                att_ptrs = attention_ptr + (b64 * heads + h_offs[:, None]) * num_tokens + n_offs[None, :]
                scores = tl.load(att_ptrs, mask=valid, other=0.0)
                tl.store(att_ptrs, tl.exp(scores - row_max[:, None]) * inv_sum[:, None], mask=valid)
        tl.debug_barrier()  # the next sample rewrites this program's scratch and state
