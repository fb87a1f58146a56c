"""Backward of the fused op (SPEC §2, with the attention map's gradient gA):

    da = g . xh,  c = sum_n a (da + gA),  ds = a (da + gA - c),  dw += sum_n ds xh,
    dxh = sum_h (a g + ds w),  dx = rstd (dxh - mean_D(dxh) - xh mean_D(dxh xh))

The two LayerNorm means need no extra pass over D: mean_D(dxh) = sum_h (a sum(g) + ds sum(w)) / D
and mean_D(dxh xh) = sum_h (a da + ds s) / D, with s = w . xh computed beside da.

Grid: persistent, ``programs`` <= B; a program loops over samples and owns every head of its
sample (dxh sums over heads), and one (H, D) partial of dw in the accumulation dtype (summed
afterwards, in a fixed order: deterministic, no atomics). Per sample:

  pass 1, per block of heads, over N tiles (and D tiles inside): da, s (two dots per tile);
          c; then ds and the per-token head sums, kept in the program's scratch (H, N), (2, N).
  pass 2, over N tiles and D tiles (heads inside): dxh, dx, written to the layer gradient
          (GATHERED: to the scratch slot, then scattered: cls -> row 0, ap -> rows p.. / (T - p),
          other rows zero); dw partial += ds^T xh.

Bytes per sample (e = token element size, a = accumulation element size): DRAM: read tokens
N * D * e (GATHERED: every averaged row), g = grad_pooled H * D * a, attention and gA H * N * a
each, mean and rstd 2 * N * a; write the gradient N * D * e (GATHERED: every row of every
layer, T_l * D * e). L2: pass 2 re-reads the tokens and g; the dw partial (H * D * a) is read
and written once per N tile; the per-program scratch. Intended bound: DRAM bandwidth (the
floor: tokens + g read, gradient written once).
"""
import triton
import triton.language as tl

from .configs import AUTOTUNE_KEY, BACKWARD_SWITCHES, backward_configs, pruner
from .tokens import (GATHERED, aligned_dim, LAYER_AP_TOKEN, LAYER_CLS_TOKEN, LAYER_COLUMNS, LAYER_LENGTH,
                     gather_sample, grad_row_pointers, load_token_tile, slot_row)


@triton.jit
def scatter_sample(grads, layer_table_ptr, dx_slot, b64, num_prefix_tokens, dim,
                   GRAD_ALIGN: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """Adjoint of gather_sample: write every row of every layer gradient of sample b once."""
    r_base = tl.arange(0, BLOCK_R)
    d_base = tl.arange(0, BLOCK_D)
    for layer in tl.static_range(len(grads)):
        entry = layer_table_ptr + layer * LAYER_COLUMNS
        length = tl.load(entry + LAYER_LENGTH)
        cls_token = tl.load(entry + LAYER_CLS_TOKEN)
        ap_token = tl.load(entry + LAYER_AP_TOKEN)
        first = b64 * length * dim
        ap_scale = 1.0 / tl.maximum(length - num_prefix_tokens, 1).to(ACC)
        for d0 in range(0, dim, BLOCK_D):
            d_offs = d0 + d_base
            d_mask = d_offs < dim
            cls_grad = tl.load(dx_slot + tl.maximum(cls_token, 0) * slot_row(dim) + d_offs,
                               mask=d_mask & (cls_token >= 0), other=0.0)
            ap_grad = tl.load(dx_slot + tl.maximum(ap_token, 0) * slot_row(dim) + d_offs,
                              mask=d_mask & (ap_token >= 0), other=0.0) * ap_scale
            for r0 in range(0, length, BLOCK_R):
                r_offs = r0 + r_base
                value = (tl.where(r_offs[:, None] == 0, cls_grad[None, :], 0.0)
                         + tl.where(r_offs[:, None] >= num_prefix_tokens, ap_grad[None, :], 0.0))
                rows = first + r_offs * dim
                if GRAD_ALIGN > 1:  # D a multiple of 16 bytes: vector stores (bf16: 8 per store)
                    rows = tl.multiple_of(rows, GRAD_ALIGN)
                tl.store(grads[layer] + rows[:, None] + d_offs[None, :],
                         value.to(grads[layer].dtype.element_ty),
                         mask=(r_offs < length)[:, None] & d_mask[None, :])


@triton.autotune(configs=backward_configs(), key=AUTOTUNE_KEY + BACKWARD_SWITCHES,
                 prune_configs_by={"early_config_prune": pruner("backward")}, reset_to_zero=["grad_weight_ptr"])
@triton.jit(do_not_specialize=["batch"])
def pool_backward_kernel(
    layers, token_table_ptr, layer_table_ptr, weight_ptr,
    grad_pooled_ptr, grad_attention_ptr, attention_ptr, mean_ptr, rstd_ptr,
    grads, grad_weight_ptr, token_scratch_ptr, head_scratch_ptr, row_scratch_ptr,
    batch, num_tokens, dim, heads, num_prefix_tokens, stride_b, stride_t, stride_d, batch_bucket,
    TOKEN_DTYPE: tl.constexpr, ADDRESSING: tl.constexpr, HAS_GRAD_ATTENTION: tl.constexpr, ROW_ALIGN: tl.constexpr,
    GRAD_ALIGN: tl.constexpr, DIM_ALIGN: tl.constexpr, NEED_DX: tl.constexpr, LAYERNORM: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    dim = aligned_dim(dim, DIM_ALIGN)
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    n_base = tl.arange(0, BLOCK_N)
    d_base = tl.arange(0, BLOCK_D)
    h_base = tl.arange(0, BLOCK_H)
    # This program's scratch: gathered tokens and their gradient (N, D) each, da-then-ds and s
    # (H, N) each, the two per-token head sums (N) each, its dw partial (H, D).
    x_slot = token_scratch_ptr + pid64 * 2 * num_tokens * slot_row(dim)
    dx_slot = x_slot + num_tokens * slot_row(dim)
    ds_slot = head_scratch_ptr + pid64 * 2 * heads * num_tokens
    score_slot = ds_slot + heads * num_tokens
    sum_slot = row_scratch_ptr + pid64 * 2 * num_tokens
    dw_slot = grad_weight_ptr + pid64 * heads * dim
    for b in range(pid, batch, tl.num_programs(0)):
        b64 = tl.cast(b, tl.int64)
        if ADDRESSING == GATHERED:
            gather_sample(layers, token_table_ptr, x_slot, b64, num_tokens,
                          dim, stride_d, ROW_ALIGN, ACC, BLOCK_N, BLOCK_D)
            tl.debug_barrier()
        grad_pooled = grad_pooled_ptr + b64 * heads * dim
        # Pass 1, one block of heads at a time.
        for h0 in range(0, heads, BLOCK_H):
            h_offs = h0 + h_base
            h_mask = h_offs < heads
            grad_sum = tl.zeros((BLOCK_H,), ACC)
            weight_sum = tl.zeros((BLOCK_H,), ACC)
            for d0 in range(0, dim, BLOCK_D):
                d_offs = d0 + d_base
                hd_mask = h_mask[:, None] & (d_offs < dim)[None, :]
                grad_sum += tl.sum(tl.load(grad_pooled + h_offs[:, None] * dim + d_offs[None, :],
                                           mask=hd_mask, other=0.0), axis=1)
                weight_sum += tl.sum(tl.load(weight_ptr + h_offs[:, None] * dim + d_offs[None, :],
                                             mask=hd_mask, other=0.0), axis=1)
            centre = tl.zeros((BLOCK_H,), ACC)
            for n0 in range(0, num_tokens, BLOCK_N):
                n_offs = n0 + n_base
                n_mask = n_offs < num_tokens
                mean = tl.load(mean_ptr + b64 * num_tokens + n_offs, mask=n_mask, other=0.0)
                rstd = tl.load(rstd_ptr + b64 * num_tokens + n_offs, mask=n_mask, other=0.0)
                grad_dots = tl.zeros((BLOCK_N, BLOCK_H), ACC)
                scores = tl.zeros((BLOCK_N, BLOCK_H), ACC)
                for d0 in range(0, dim, BLOCK_D):
                    d_offs = d0 + d_base
                    dh_mask = (d_offs < dim)[:, None] & h_mask[None, :]
                    x = load_token_tile(layers, token_table_ptr, x_slot, b64,
                                        n_offs, d_offs, num_tokens, dim, stride_b, stride_t,
                                        stride_d, ADDRESSING, ROW_ALIGN, ACC)
                    normed = (x - mean[:, None]) * rstd[:, None]
                    g = tl.load(grad_pooled + h_offs[None, :] * dim + d_offs[:, None], mask=dh_mask, other=0.0)
                    w = tl.load(weight_ptr + h_offs[None, :] * dim + d_offs[:, None], mask=dh_mask, other=0.0)
                    grad_dots = tl.dot(normed, g, grad_dots, input_precision=DOT_PRECISION)
                    scores = tl.dot(normed, w, scores, input_precision=DOT_PRECISION)
                valid = n_mask[:, None] & h_mask[None, :]
                nh_offs = h_offs[None, :] * num_tokens + n_offs[:, None]
                attention = tl.load(attention_ptr + b64 * heads * num_tokens + nh_offs, mask=valid, other=0.0)
                total = grad_dots
                if HAS_GRAD_ATTENTION:
                    total += tl.load(grad_attention_ptr + b64 * heads * num_tokens + nh_offs, mask=valid, other=0.0)
                centre += tl.sum(attention * total, axis=0)
                tl.store(ds_slot + nh_offs, grad_dots, mask=valid)
                tl.store(score_slot + nh_offs, scores, mask=valid)
            tl.debug_barrier()  # da and s are read back below, by other threads
            for n0 in range(0, num_tokens, BLOCK_N):
                n_offs = n0 + n_base
                n_mask = n_offs < num_tokens
                valid = n_mask[:, None] & h_mask[None, :]
                nh_offs = h_offs[None, :] * num_tokens + n_offs[:, None]
                attention = tl.load(attention_ptr + b64 * heads * num_tokens + nh_offs, mask=valid, other=0.0)
                ds_ptrs = ds_slot + nh_offs  # read da, then write ds in its place (same threads)
                grad_dots = tl.load(ds_ptrs, mask=valid, other=0.0)
                scores = tl.load(score_slot + nh_offs, mask=valid, other=0.0)
                total = grad_dots
                if HAS_GRAD_ATTENTION:
                    total += tl.load(grad_attention_ptr + b64 * heads * num_tokens + nh_offs, mask=valid, other=0.0)
                grad_scores = attention * (total - centre[None, :])
                tl.store(ds_ptrs, grad_scores, mask=valid)
                # This block's share of D mean_D(dxh) and D mean_D(dxh xh), per token.
                sum_grad = tl.sum(attention * grad_sum[None, :] + grad_scores * weight_sum[None, :], axis=1)
                sum_dot = tl.sum(attention * grad_dots + grad_scores * scores, axis=1)
                later_block = n_mask & (h0 > 0)
                sum_grad += tl.load(sum_slot + n_offs, mask=later_block, other=0.0)
                sum_dot += tl.load(sum_slot + num_tokens + n_offs, mask=later_block, other=0.0)
                tl.store(sum_slot + n_offs, sum_grad, mask=n_mask)
                tl.store(sum_slot + num_tokens + n_offs, sum_dot, mask=n_mask)
            tl.debug_barrier()
        # Pass 2: d tokens, one (N, D) tile at a time over all heads; dw partial.
        for n0 in range(0, num_tokens, BLOCK_N):
            n_offs = n0 + n_base
            n_mask = n_offs < num_tokens
            mean = tl.load(mean_ptr + b64 * num_tokens + n_offs, mask=n_mask, other=0.0)
            rstd = tl.load(rstd_ptr + b64 * num_tokens + n_offs, mask=n_mask, other=0.0)
            mean_grad = tl.load(sum_slot + n_offs, mask=n_mask, other=0.0) / dim
            mean_dot = tl.load(sum_slot + num_tokens + n_offs, mask=n_mask, other=0.0) / dim
            if ADDRESSING != GATHERED:
                grad_rows = grad_row_pointers(grads, token_table_ptr, b64, n_offs, n_mask,
                                              num_tokens, dim, ADDRESSING, GRAD_ALIGN)
            for d0 in range(0, dim, BLOCK_D):
                d_offs = d0 + d_base
                d_mask = d_offs < dim
                x = load_token_tile(layers, token_table_ptr, x_slot, b64,
                                    n_offs, d_offs, num_tokens, dim, stride_b, stride_t, stride_d,
                                    ADDRESSING, ROW_ALIGN, ACC)
                normed = (x - mean[:, None]) * rstd[:, None]
                grad_normed = tl.zeros((BLOCK_N, BLOCK_D), ACC)
                for h0 in range(0, heads, BLOCK_H):
                    h_offs = h0 + h_base
                    h_mask = h_offs < heads
                    valid = n_mask[:, None] & h_mask[None, :]
                    nh_offs = h_offs[None, :] * num_tokens + n_offs[:, None]
                    attention = tl.load(attention_ptr + b64 * heads * num_tokens + nh_offs, mask=valid, other=0.0)
                    grad_scores = tl.load(ds_slot + nh_offs, mask=valid, other=0.0)
                    hd_offs = h_offs[:, None] * dim + d_offs[None, :]
                    hd_mask = h_mask[:, None] & d_mask[None, :]
                    g = tl.load(grad_pooled + hd_offs, mask=hd_mask, other=0.0)
                    w = tl.load(weight_ptr + hd_offs, mask=hd_mask, other=0.0)
                    if NEED_DX:  # frozen features: dw only
                        grad_normed = tl.dot(attention, g, grad_normed, input_precision=DOT_PRECISION)
                        grad_normed = tl.dot(grad_scores, w, grad_normed, input_precision=DOT_PRECISION)
                    dw_ptrs = dw_slot + hd_offs  # read-modify-write by the same threads
                    partial = tl.load(dw_ptrs, mask=hd_mask, other=0.0)
                    partial = tl.dot(tl.trans(grad_scores), normed, partial, input_precision=DOT_PRECISION)
                    tl.store(dw_ptrs, partial, mask=hd_mask)
                if NEED_DX:
                    if LAYERNORM:
                        grad_x = rstd[:, None] * (grad_normed - mean_grad[:, None] - normed * mean_dot[:, None])
                    else:  # normalize="none": dx = dxh
                        grad_x = grad_normed
                    nd_mask = n_mask[:, None] & d_mask[None, :]
                    if ADDRESSING == GATHERED:
                        tl.store(dx_slot + n_offs[:, None] * slot_row(dim) + d_offs[None, :], grad_x, mask=nd_mask)
                    else:
                        tl.store(grad_rows[:, None] + d_offs[None, :],
                                 grad_x.to(grads[0].dtype.element_ty), mask=nd_mask)
        if ADDRESSING == GATHERED and NEED_DX:
            tl.debug_barrier()
            scatter_sample(grads, layer_table_ptr, dx_slot, b64, num_prefix_tokens, dim,
                           GRAD_ALIGN, ACC, BLOCK_N, BLOCK_D)
        tl.debug_barrier()  # the next sample rewrites this program's scratch
