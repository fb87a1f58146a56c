"""Forward of the fused op (SPEC §2): per-token LayerNorm statistics, scores, softmax over the
N tokens, pooled sum; tokens read where they lie (tokens.py).

Grid: persistent, ``programs`` <= B; a program loops over samples b = pid, pid + programs, ...
(one program per sample in the AFFINE/TABLE forms, where nothing is scratch). Per sample and
per block of BLOCK_H heads, two passes over the tokens:

  pass 1, over N tiles (and D tiles inside): LayerNorm statistics (Chan's merge of per-tile
          moments) and raw dots x . w_h; scores s = rstd (x . w - mean sum(w)); a running max
          and sum per head (streaming softmax, any N). Raw scores go to ``attention``.
  pass 2, over D tiles (and N tiles inside): a = exp(s - max) / sum, pooled (BLOCK_H, BLOCK_D)
          += a @ xh; the last D tile rewrites ``attention`` normalised.

Bytes per sample (e = token element size, a = 4, or 8 for float64 tokens; N tokens, D
features, H heads):
  DRAM: read the N * D * e token bytes once (pass 1) -- GATHERED: every averaged row once --
        write pooled H * D * a, attention H * N * a, mean and rstd 2 * N * a.
  L2:   pass 2 re-reads the sample's tokens (N * D * e, just read by this program; GATHERED:
        the N * D * a slot), H * D * a of weights per pass, the H * N scores per D tile.
Intended bound: DRAM bandwidth. Note that the pooled output is not small: at N = 24, H = 12,
float16 it is as many bytes as the tokens (H * 4 = N * 2 per feature), so the floor is one read
plus one write of that size. 4 N D H FLOP per sample: tensor cores (tf32) for float16 /
bfloat16 tokens, exact FMA dots for float32 / float64 (compute-heavier: ~N D H / (N D e) FLOP
per byte, about 2x the float16 intensity, near the FMA roofline at H = 12).
"""
import triton
import triton.language as tl

from .configs import AUTOTUNE_KEY, FORWARD_SWITCHES, forward_configs, prune
from .tokens import GATHERED, gather_sample, load_token_tile


@triton.autotune(configs=forward_configs(), key=AUTOTUNE_KEY + FORWARD_SWITCHES,
                 prune_configs_by={"early_config_prune": prune})
@triton.jit(do_not_specialize=["batch"])
def pool_forward_kernel(
    layers, token_table_ptr, weight_ptr, scratch_ptr,
    pooled_ptr, attention_ptr, mean_ptr, rstd_ptr,
    batch, num_tokens, dim, heads, stride_b, stride_t, stride_d, eps, batch_bucket,
    TOKEN_DTYPE: tl.constexpr, ADDRESSING: tl.constexpr, ROW_ALIGN: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    n_base = tl.arange(0, BLOCK_N)
    d_base = tl.arange(0, BLOCK_D)
    h_base = tl.arange(0, BLOCK_H)
    slot_ptr = scratch_ptr + pid.to(tl.int64) * num_tokens * dim
    for b in range(pid, batch, tl.num_programs(0)):
        b64 = tl.cast(b, tl.int64)
        if ADDRESSING == GATHERED:
            gather_sample(layers, token_table_ptr, slot_ptr, b64, num_tokens,
                          dim, stride_d, ROW_ALIGN, ACC, BLOCK_N, BLOCK_D)
            tl.debug_barrier()
        for h0 in range(0, heads, BLOCK_H):
            h_offs = h0 + h_base
            h_mask = h_offs < heads
            row_max = tl.full((BLOCK_H,), float("-inf"), ACC)
            row_sum = tl.zeros((BLOCK_H,), ACC)
            # Pass 1: statistics, scores, running max / sum.
            for n0 in range(0, num_tokens, BLOCK_N):
                n_offs = n0 + n_base
                n_mask = n_offs < num_tokens
                dots = tl.zeros((BLOCK_N, BLOCK_H), ACC)
                weight_sum = tl.zeros((BLOCK_H,), ACC)
                mean = tl.zeros((BLOCK_N,), ACC)
                m2 = tl.zeros((BLOCK_N,), ACC)
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
                    # Chan et al.: merge this tile's mean / M2 into the running ones (stable
                    # for large |mean| / std, unlike E[x^2] - E[x]^2). Earlier tiles are full.
                    width = tl.cast(tl.minimum(dim - d0, BLOCK_D), ACC)
                    seen = tl.cast(d0, ACC)
                    tile_mean = tl.sum(x, axis=1) / width
                    centred = tl.where(d_mask[None, :], x - tile_mean[:, None], 0.0)
                    delta = tile_mean - mean
                    mean += delta * (width / (seen + width))
                    m2 += tl.sum(centred * centred, axis=1) + delta * delta * (seen * width / (seen + width))
                rstd = tl.rsqrt(m2 / dim + eps)
                # w . xh = rstd (w . x - mean sum(w)): the centring folds into one correction.
                scores = rstd[:, None] * (dots - mean[:, None] * weight_sum[None, :])
                valid = n_mask[:, None] & h_mask[None, :]
                tl.store(attention_ptr + (b64 * heads + h_offs[None, :]) * num_tokens + n_offs[:, None],
                         scores, mask=valid)
                first_block = h0 == 0
                tl.store(mean_ptr + b64 * num_tokens + n_offs, mean, mask=n_mask & first_block)
                tl.store(rstd_ptr + b64 * num_tokens + n_offs, rstd, mask=n_mask & first_block)
                scores = tl.where(n_mask[:, None], scores, float("-inf"))
                new_max = tl.maximum(row_max, tl.max(scores, axis=0))
                row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(scores - new_max[None, :]), axis=0)
                row_max = new_max
            tl.debug_barrier()  # pass 2 reads back the scores, mean and rstd stored above
            inv_sum = 1.0 / row_sum
            # Pass 2: attention weights and the pooled sum, one D tile at a time.
            for d0 in range(0, dim, BLOCK_D):
                d_offs = d0 + d_base
                pooled = tl.zeros((BLOCK_H, BLOCK_D), ACC)
                for n0 in range(0, num_tokens, BLOCK_N):
                    n_offs = n0 + n_base
                    n_mask = n_offs < num_tokens
                    att_ptrs = attention_ptr + (b64 * heads + h_offs[:, None]) * num_tokens + n_offs[None, :]
                    valid = h_mask[:, None] & n_mask[None, :]
                    scores = tl.load(att_ptrs, mask=valid, other=float("-inf"))
                    weights = tl.exp(scores - row_max[:, None]) * inv_sum[:, None]
                    # The last D tile is the last reader of these scores: normalise in place.
                    tl.store(att_ptrs, weights, mask=valid & (d0 + BLOCK_D >= dim))
                    mean = tl.load(mean_ptr + b64 * num_tokens + n_offs, mask=n_mask, other=0.0)
                    rstd = tl.load(rstd_ptr + b64 * num_tokens + n_offs, mask=n_mask, other=0.0)
                    x = load_token_tile(layers, token_table_ptr, slot_ptr, b64,
                                        n_offs, d_offs, num_tokens, dim, stride_b, stride_t,
                                        stride_d, ADDRESSING, ROW_ALIGN, ACC)
                    normed = (x - mean[:, None]) * rstd[:, None]
                    pooled = tl.dot(weights, normed, pooled, input_precision=DOT_PRECISION)
                tl.store(pooled_ptr + (b64 * heads + h_offs[:, None]) * dim + d_offs[None, :], pooled,
                         mask=h_mask[:, None] & (d_offs < dim)[None, :])
            tl.debug_barrier()  # the next head block / sample rewrites what was read here
