"""The value and output projections of P stacked probes, with a hand-written backward.

Used by the sweep's stacked probes and, with P = 1, by AttentiveFusion itself.

SPEC §2 after the fused op, for every probe p and head h, on the pooled tokens z (B, P*H, D):

    u_h = gamma_v * z_h + beta_v
    o   = W_o concat_h(W_v,h u_h + b_v,h) + b_o                     -> (B, P*D)

Written out (not left to autograd) for three reasons:

- Memory traffic. gamma_v folds into W_v, beta_v and b_v into a per-probe value bias, so no
  elementwise pass touches the (B, P*H, D) pooled tokens (the largest tensor of a step); d pooled
  is written by strided GEMMs straight into the fused op's layout; every parameter gradient is
  written in place, contiguous (autograd would transpose and copy weight-sized gradients, and
  add the two paths into W_v and W_o).
- Cache. The products run probe by probe (P loop iterations of a few GEMMs each): one probe's
  operands stay in cache between its products, where batching all P probes into each product
  streams every intermediate through memory (the batched form took ~1.3x as long at ViT-B
  sizes, P = 16, on a 2-core CPU).
- Lockstep equals sequential. Probe p's arithmetic is the same sequence of products whatever P
  is, so on CPU it trains bit for bit alike in lockstep and alone. And BatchNorm (training mode)
  follows, so beta_v, b_v and b_o have exactly zero gradient: autograd would hand them rounding
  noise, which Adam normalises into lr-sized random steps that differ with any change of
  summation order (P, backend, threads) and show up at evaluation through the running
  statistics. With ``exact_zero_bias_grads`` they get their exact gradient, zero.
"""
from __future__ import annotations

from typing import Optional

import torch


class StackedProjections(torch.autograd.Function):
    """(pooled, v_weight, gamma_v, beta_v, v_bias, proj_weight, proj_bias, exact_zero_bias_grads)
    -> out (B, P*D).

    Shapes: pooled (B, P*H, D); v_weight (P, H*hd, D); gamma_v, beta_v (P, D); v_bias
    (P, H*hd) or None; proj_weight (P, D, H*hd); proj_bias (P, D). ``exact_zero_bias_grads``:
    the output feeds a training-mode BatchNorm, so the biases' gradients are zero.
    """

    @staticmethod
    def forward(ctx, pooled, v_weight, gamma_v, beta_v, v_bias: Optional[torch.Tensor], proj_weight, proj_bias,
                exact_zero_bias_grads: bool = False):
        batch = pooled.shape[0]
        num_probes, inner, dim = v_weight.shape
        heads = pooled.shape[1] // num_probes
        head_dim = inner // heads
        folded = v_weight * gamma_v.unsqueeze(1)                                      # (P, H*hd, D)
        values = pooled.new_empty(num_probes, batch, inner)
        out = pooled.new_empty(batch, num_probes, dim)
        for p in range(num_probes):
            value_bias = torch.mm(beta_v[p:p + 1], v_weight[p].t())                  # (1, H*hd)
            if v_bias is not None:
                value_bias = value_bias + v_bias[p:p + 1]
            tokens = pooled[:, p * heads:(p + 1) * heads].transpose(0, 1)            # (H, B, D) view
            per_head = torch.bmm(tokens, folded[p].view(heads, head_dim, dim).transpose(1, 2))  # (H, B, hd)
            torch.add(per_head.transpose(0, 1).reshape(batch, inner), value_bias, out=values[p])
            torch.addmm(proj_bias[p], values[p], proj_weight[p].t(), out=out[:, p])
        ctx.save_for_backward(pooled, v_weight, gamma_v, beta_v, folded, values, proj_weight)
        ctx.has_v_bias, ctx.exact_zero_bias_grads = v_bias is not None, exact_zero_bias_grads
        return out.view(batch, num_probes * dim)

    @staticmethod
    def backward(ctx, grad_out):
        pooled, v_weight, gamma_v, beta_v, folded, values, proj_weight = ctx.saved_tensors
        batch = pooled.shape[0]
        num_probes, inner, dim = v_weight.shape
        heads = pooled.shape[1] // num_probes
        head_dim = inner // heads
        grad_out = grad_out.reshape(batch, num_probes, dim)
        zero_biases = ctx.exact_zero_bias_grads
        grad_pooled = torch.empty_like(pooled) if ctx.needs_input_grad[0] else None
        grad_v_weight = torch.empty_like(v_weight)
        grad_gamma_v = torch.empty_like(gamma_v)
        grad_beta_v = torch.zeros_like(beta_v)
        grad_v_bias = v_weight.new_zeros(num_probes, inner) if ctx.has_v_bias else None
        grad_proj_weight = torch.empty_like(proj_weight)
        grad_proj_bias = torch.zeros_like(gamma_v)
        ones_batch = grad_out.new_ones(1, batch)
        ones_inner = grad_out.new_ones(1, inner)
        for p in range(num_probes):
            grad = grad_out[:, p]                                                       # (B, D) view
            torch.mm(grad.t(), values[p], out=grad_proj_weight[p])
            grad_values = torch.mm(grad, proj_weight[p])                                # (B, H*hd)
            heads_grad = grad_values.view(batch, heads, head_dim).transpose(0, 1)       # (H, B, hd) view
            grad_folded = grad_v_weight[p]                                              # filled in place
            torch.bmm(heads_grad.transpose(1, 2), pooled[:, p * heads:(p + 1) * heads].transpose(0, 1),
                      out=grad_folded.view(heads, head_dim, dim))
            if grad_pooled is not None:
                torch.bmm(heads_grad, folded[p].view(heads, head_dim, dim),
                          out=grad_pooled[:, p * heads:(p + 1) * heads].transpose(0, 1))
            # d gamma_v = sum over H*hd of d folded * W_v, as a product (fixed summation order).
            torch.mm(ones_inner, grad_folded * v_weight[p], out=grad_gamma_v[p:p + 1])
            grad_folded.mul_(gamma_v[p])                                                # -> d W_v
            if not zero_biases:
                torch.mm(ones_batch, grad, out=grad_proj_bias[p:p + 1])
                grad_value_bias = torch.mm(ones_batch, grad_values)                     # (1, H*hd)
                torch.mm(grad_value_bias, v_weight[p], out=grad_beta_v[p:p + 1])
                grad_folded.addmm_(grad_value_bias.t(), beta_v[p:p + 1])
                if grad_v_bias is not None:
                    grad_v_bias[p] = grad_value_bias[0]
        return (grad_pooled, grad_v_weight, grad_gamma_v, grad_beta_v, grad_v_bias, grad_proj_weight,
                grad_proj_bias, None)


class StackedScoreWeight(torch.autograd.Function):
    """The folded keys of P probes, ``w_h = scale * gamma_k * (W_k,h^T q_h)`` (SPEC §2) -> (P, H, D).

    Inputs: query (P, D) (the learned query after norm_q), q_weight and k_weight (P, H*hd, D),
    q_bias (P, H*hd) or None, gamma_k (P, D). The backward gives W_q and W_k their gradients as
    contiguous outer products, not as transposed views that autograd would copy (two
    weight-sized copies per step), and reduces over heads with per-probe GEMMs (as above).
    """

    @staticmethod
    def forward(ctx, query, q_weight, q_bias: Optional[torch.Tensor], k_weight, gamma_k, scale: float, heads: int):
        num_probes, inner, dim = q_weight.shape
        head_dim = inner // heads
        queries = torch.bmm(query.unsqueeze(1), q_weight.transpose(1, 2))             # (P, 1, H*hd)
        if q_bias is not None:
            queries = queries + q_bias.unsqueeze(1)
        raw = torch.bmm(queries.view(num_probes * heads, 1, head_dim),
                        k_weight.view(num_probes * heads, head_dim, dim)).view(num_probes, heads, dim)
        ctx.save_for_backward(query, q_weight, k_weight, gamma_k, queries, raw)
        ctx.scale, ctx.heads, ctx.has_q_bias = scale, heads, q_bias is not None
        return raw * (scale * gamma_k).unsqueeze(1)

    @staticmethod
    def backward(ctx, grad_weight):
        query, q_weight, k_weight, gamma_k, queries, raw = ctx.saved_tensors
        num_probes, inner, dim = q_weight.shape
        heads, head_dim = ctx.heads, inner // ctx.heads
        grad_weight = grad_weight.contiguous()
        grad_gamma_k = torch.bmm(grad_weight.new_ones(num_probes, 1, heads), grad_weight * raw).squeeze(1) * ctx.scale
        grad_raw = (grad_weight * (ctx.scale * gamma_k).unsqueeze(1)).view(num_probes * heads, 1, dim)
        grad_k_weight = torch.bmm(queries.view(num_probes * heads, head_dim, 1), grad_raw)
        grad_k_weight = grad_k_weight.view(num_probes, inner, dim)
        grad_queries = torch.bmm(grad_raw, k_weight.view(num_probes * heads, head_dim, dim).transpose(1, 2))
        grad_queries = grad_queries.view(num_probes, 1, inner)
        grad_q_weight = torch.bmm(grad_queries.transpose(1, 2), query.unsqueeze(1))   # (P, H*hd, D)
        grad_query = torch.bmm(grad_queries, q_weight).squeeze(1)
        grad_q_bias = grad_queries.squeeze(1) if ctx.has_q_bias else None
        return grad_query, grad_q_weight, grad_q_bias, grad_k_weight, grad_gamma_k, None, None
