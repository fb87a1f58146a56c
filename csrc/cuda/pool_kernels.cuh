// The CUDA kernels of fastfuse::fused_pool_forward / fused_pool_backward (SPEC §2-§3).
//
// Forward: one block per (sample, head tile). The block streams the sample's N gathered tokens
// through shared memory, tile_tokens at a time: gather (through the layers' strides, averaging
// "ap" rows), LayerNorm statistics (a warp per token), scores of the tile against the block's
// heads, the online-softmax update (a warp per head, a lane per token), and the rescaled
// accumulation of the pooled vectors, which stay in shared memory. Heads are tiled over blocks
// only when H x D floats do not fit beside a tile; the blocks of one sample are adjacent in
// the grid so that the repeated token reads hit L2.
//
// Backward: about one resident wave of blocks (launch_plan.h backward_grid), each owning a
// contiguous range of samples and all heads, or, in a dw-only backward whose dw does not fit in
// shared memory, one tile of heads (the blocks of a range adjacent, like the forward's).
// Per tile it re-gathers the tokens, recomputes xh from the saved statistics, then dw (summed
// over the block's samples in shared memory, or in its slice of the global partial buffer when
// that does not fit) and, unless only dw is wanted, dxh, the LayerNorm backward and the
// scatter into the layers' gradients. dw partials are summed in block order by a second
// kernel: no atomics, so dw is the same from run to run.
#pragma once

#include "cuda/pool_tiles.cuh"

namespace fastfuse {
namespace cuda {

// Shared-memory footprints (forward_shared_elements, backward_shared_elements): csrc/common/
// launch_plan.h, shared with the host planner; the kernels carve the buffer in that order.

// Two resident blocks per SM (<= 128 registers a thread) hide the latency of the token
// reads; float64 accumulators need twice the registers, so float64 asks for one.
template <typename acc_t>
constexpr int kMinBlocksPerSM = sizeof(acc_t) == 8 ? 1 : 2;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<acc_t>)
fused_pool_forward_kernel(const __grid_constant__ GatherArgs args, const acc_t* __restrict__ score_weight,
                          int heads, int head_tile, int tile_tokens, acc_t eps, bool layernorm,
                          acc_t* __restrict__ pooled, acc_t* __restrict__ attention,
                          acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out) {
  unsigned char* shared_bytes = dynamic_shared_memory();
  const int dim = args.dim, padded_dim = args.padded_dim, num_tokens = args.num_tokens;
  const int head_tiles = ceil_div(heads, head_tile);
  const int64_t b = blockIdx.x / head_tiles;
  const int head0 = (blockIdx.x % head_tiles) * head_tile;
  const int block_heads = min(head_tile, heads - head0);
  const int padded_heads = round_up_to(head_tile, 4);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  TokenSlot* slots = reinterpret_cast<TokenSlot*>(shared_bytes);
  acc_t* tile = reinterpret_cast<acc_t*>(shared_bytes + slot_bytes(tile_tokens));
  acc_t* accum = tile + tile_tokens * padded_dim;
  acc_t* scores = accum + padded_heads * padded_dim;     // [head][token]
  acc_t* weights_t = scores + padded_heads * tile_tokens;  // [token][head]
  acc_t* running_max = weights_t + tile_tokens * padded_heads;
  acc_t* running_sum = running_max + padded_heads;
  acc_t* rescale = running_sum + padded_heads;
  acc_t* partial = rescale + 2 * padded_heads;

  for (int i = threadIdx.x; i < padded_heads * padded_dim; i += kThreads) accum[i] = 0;
  for (int i = threadIdx.x; i < tile_tokens * padded_heads; i += kThreads) weights_t[i] = 0;
  for (int h = threadIdx.x; h < padded_heads; h += kThreads) {
    running_max[h] = fm::softmax_initial_max<acc_t>();
    running_sum[h] = 0;
    rescale[h] = 1;
  }
  const acc_t* weight_rows = score_weight + int64_t(head0) * dim;
  const bool weight_vector = dim % 4 == 0 && reinterpret_cast<uintptr_t>(score_weight) % 16 == 0;
  const acc_t dim_count = static_cast<acc_t>(dim);

  for (int n0 = 0; n0 < num_tokens; n0 += tile_tokens) {
    const int count = min(tile_tokens, num_tokens - n0);
    fill_slots<scalar_t>(args, nullptr, b, n0, count, slots);
    __syncthreads();
    gather_tile<scalar_t, acc_t>(slots, count, dim, padded_dim, tile, partial);

    // LayerNorm statistics (two-pass variance, robust to the token's magnitude:
    // fused_pool_math.h token_scale) and xh, a warp per token. normalize="none": the raw
    // tokens, saved as mean 0 and rstd 1.
    for (int j = warp; j < count; j += kWarps) {
      acc_t* row = tile + j * padded_dim;
      acc_t row_mean = 0, row_rstd = 1;
      if (layernorm) {
        acc_t sum = 0, peak = 0;
        for (int d = lane; d < dim; d += 32) {
          sum += row[d];
          peak = fmax(peak, fabs(row[d]));
        }
        const acc_t scale = fm::token_scale(warp_max(peak));
        const acc_t inverse = acc_t(1) / scale;  // a power of two: exact
        // sum(x) / scale == sum(x / scale) unless sum(x) overflowed: then sum the scaled
        // values (the branch is uniform per warp).
        acc_t sum_scaled = warp_sum(sum) * inverse;
        if (!isfinite(sum_scaled)) {
          sum_scaled = 0;
          for (int d = lane; d < dim; d += 32) sum_scaled += row[d] * inverse;
          sum_scaled = warp_sum(sum_scaled);
        }
        const acc_t mean_scaled = sum_scaled / dim_count;
        acc_t squares = 0;
        for (int d = lane; d < dim; d += 32) {
          const acc_t deviation = row[d] * inverse - mean_scaled;
          squares += deviation * deviation;
        }
        row_mean = mean_scaled * scale;
        row_rstd = fm::scaled_layernorm_rstd(warp_sum(squares), dim_count, eps, scale) * inverse;
        for (int d = lane; d < dim; d += 32) row[d] = fm::layernorm_normalize(row[d], row_mean, row_rstd);
      }
      if (head0 == 0 && lane == 0) {
        mean_out[b * num_tokens + n0 + j] = row_mean;
        rstd_out[b * num_tokens + n0 + j] = row_rstd;
      }
    }
    __syncthreads();

    // s_hn = w_h . xh_n
    tile_dots<4>(scores, tile_tokens, weight_rows, block_heads, weight_vector, tile, padded_dim, dim, count);
    __syncthreads();

    // Online softmax, a warp per head and a lane per token. The raw scores go to `attention`
    // now and are normalised once the final statistics are known.
    for (int h = warp; h < block_heads; h += kWarps) {
      const acc_t score = lane < count ? scores[h * tile_tokens + lane] : fm::softmax_initial_max<acc_t>();
      acc_t head_max = running_max[h], head_sum = running_sum[h];
      const acc_t factor = fm::online_softmax_rescale(head_max, head_sum, warp_max(score));
      const acc_t weight = lane < count ? fm::softmax_numerator(score, head_max) : acc_t(0);
      head_sum += warp_sum(weight);
      if (lane < tile_tokens) weights_t[lane * padded_heads + h] = weight;
      if (lane < count) attention[(b * heads + head0 + h) * num_tokens + n0 + lane] = score;
      __syncwarp();
      if (lane == 0) {
        running_max[h] = head_max;
        running_sum[h] = head_sum;
        rescale[h] = factor;
      }
    }
    __syncthreads();

    // acc_h = rescale_h * acc_h + sum_n p_hn xh_n
    tile_accumulate(accum, padded_heads, padded_dim, weights_t, padded_heads, tile, dim, count, rescale);
    __syncthreads();
  }

  acc_t* inverse_sum = rescale;
  for (int h = threadIdx.x; h < block_heads; h += kThreads) inverse_sum[h] = fm::softmax_inverse_sum(running_sum[h]);
  __syncthreads();
  for (int i = threadIdx.x; i < block_heads * dim; i += kThreads) {
    const int h = i / dim, d = i - h * dim;
    pooled[(b * heads + head0 + h) * dim + d] = accum[h * padded_dim + d] * inverse_sum[h];
  }
  for (int64_t i = threadIdx.x; i < int64_t(block_heads) * num_tokens; i += kThreads) {
    const int h = static_cast<int>(i / num_tokens);
    const int64_t index = (b * heads + head0 + h) * num_tokens + (i - int64_t(h) * num_tokens);
    attention[index] = fm::softmax_final(attention[index], running_max[h], inverse_sum[h]);
  }
}

// kLayerGrads: the layers' gradients too (else dw only, the frozen-feature case, which may
// tile the heads over blocks); two instantiations, so that the dw-only kernel carries none of
// the dxh / scatter registers and the full one none of the head-tile bookkeeping.
template <typename scalar_t, typename acc_t, bool kLayerGrads>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<acc_t>)
fused_pool_backward_kernel(const __grid_constant__ GatherArgs args,
                           const __grid_constant__ GradArgs grads,
                           const acc_t* __restrict__ score_weight,
                           const acc_t* __restrict__ grad_pooled,
                           const acc_t* __restrict__ grad_attention,  // may be null
                           const acc_t* __restrict__ pooled, const acc_t* __restrict__ attention,
                           const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                           int64_t batch, int heads, int head_tile, int tile_tokens,
                           bool weight_grad_in_shared, bool layernorm,
                           acc_t* __restrict__ weight_partials) {
  constexpr bool layers_need_grad = kLayerGrads;
  unsigned char* shared_bytes = dynamic_shared_memory();
  using Chunk = ChunkOf<scalar_t>;
  constexpr int W = Chunk::kWidth;
  const int dim = args.dim, padded_dim = args.padded_dim, num_tokens = args.num_tokens;
  // Block = (range of samples, tile of heads); head tiles only without layer gradients (dxh
  // sums over every head): with them, head_tile == heads.
  const int head_tiles = kLayerGrads ? 1 : ceil_div(heads, head_tile);
  const int block_heads =
      kLayerGrads ? heads : min(head_tile, heads - static_cast<int>(blockIdx.x % head_tiles) * head_tile);
  const int padded_heads = round_up_to(kLayerGrads ? heads : head_tile, 4);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  TokenSlot* slots = reinterpret_cast<TokenSlot*>(shared_bytes);
  acc_t* tile = reinterpret_cast<acc_t*>(shared_bytes + slot_bytes(tile_tokens));
  acc_t* grad_tile = tile + tile_tokens * padded_dim;
  acc_t* next = grad_tile + (layers_need_grad ? tile_tokens * padded_dim : 0);
  acc_t* shared_weight_grad = next;  // used when weight_grad_in_shared
  next += weight_grad_in_shared ? padded_heads * padded_dim : 0;
  acc_t* coeff = next;                                       // [a; ds][head][token]
  acc_t* score_grad_t = coeff + 2 * padded_heads * tile_tokens;  // [token][head]
  acc_t* baseline = score_grad_t + tile_tokens * padded_heads;
  acc_t* partial = baseline + 4 * padded_heads;
  // dw of this block's samples and heads: in shared memory, or in its slice of the global
  // partials (block k's slice: (padded_heads, padded_dim) at k; the reduce kernel knows the
  // layout). (A generic pointer costs two registers for the whole kernel, so it is formed
  // where used.)
  auto weight_grad = [&]() {
    return weight_grad_in_shared ? shared_weight_grad
                                 : weight_partials + int64_t(blockIdx.x) * padded_heads * padded_dim;
  };

  for (int i = threadIdx.x; i < padded_heads * padded_dim; i += kThreads) weight_grad()[i] = 0;
  const bool weight_vector = dim % 4 == 0 && reinterpret_cast<uintptr_t>(score_weight) % 16 == 0;
  const bool grad_vector = dim % 4 == 0 && reinterpret_cast<uintptr_t>(grad_pooled) % 16 == 0;
  const acc_t dim_count = static_cast<acc_t>(dim);
  const bool one_tile = num_tokens <= tile_tokens;
  const int64_t range = blockIdx.x / head_tiles, ranges = gridDim.x / head_tiles;
  const int batch_begin = static_cast<int>(range * batch / ranges);
  const int batch_end = static_cast<int>((range + 1) * batch / ranges);
  if constexpr (!kLayerGrads) {
    // From here on, rows 0.. of g, z, attention and gA of a sample are the block's heads
    // (head0 = tile x head_tile); the per-sample strides stay those of all H heads.
    const int head0 = static_cast<int>(blockIdx.x % head_tiles) * head_tile;
    grad_pooled += int64_t(head0) * dim;
    pooled += int64_t(head0) * dim;
    attention += int64_t(head0) * num_tokens;
    if (grad_attention) grad_attention += int64_t(head0) * num_tokens;
  }

  for (int b = batch_begin; b < batch_end; ++b) {
    const acc_t* grad_rows = grad_pooled + int64_t(b) * heads * dim;
    const acc_t* attention_b = attention + int64_t(b) * heads * num_tokens;
    const acc_t* grad_attention_b = grad_attention ? grad_attention + int64_t(b) * heads * num_tokens : nullptr;
    // c_h = g_h . z_h + sum_n a_hn gA_hn, a warp per head. With all N tokens in one tile it
    // comes from the tile's own products instead (below: c_h = sum_n a_hn (g_h . xh_n + gA_hn),
    // the same sum since z_h = sum_n a_hn xh_n), and z is never read: at a short N and many
    // heads (a lockstep sweep on CLS+AP tokens) z is as large as g and many times the tokens.
    for (int h = warp; h < padded_heads && !one_tile; h += kWarps) {
      acc_t sum = 0;
      if (h < block_heads) {
        const acc_t* pooled_row = pooled + (int64_t(b) * heads + h) * dim;
        for (int d = lane; d < dim; d += 32) sum += grad_rows[int64_t(h) * dim + d] * pooled_row[d];
        if (grad_attention_b) {
          for (int n = lane; n < num_tokens; n += 32) {
            sum += attention_b[int64_t(h) * num_tokens + n] * grad_attention_b[int64_t(h) * num_tokens + n];
          }
        }
      }
      sum = warp_sum(sum);
      if (lane == 0) baseline[h] = sum;
    }

    for (int n0 = 0; n0 < num_tokens; n0 += tile_tokens) {
      const int count = min(tile_tokens, num_tokens - n0);
      fill_slots<scalar_t>(args, layers_need_grad ? &grads : nullptr, b, n0, count, slots);
      __syncthreads();
      gather_tile<scalar_t, acc_t>(slots, count, dim, padded_dim, tile, partial);
      for (int j = warp; j < count; j += kWarps) {
        acc_t* row = tile + j * padded_dim;
        const int64_t index = int64_t(b) * num_tokens + n0 + j;
        const acc_t row_mean = mean[index], row_rstd = rstd[index];
        for (int d = lane; d < dim; d += 32) row[d] = fm::layernorm_normalize(row[d], row_mean, row_rstd);
      }
      __syncthreads();

      // g_h . xh_n into the ds rows of coeff, then coeff = [a; ds] and ds transposed.
      tile_dots<2>(coeff + padded_heads * tile_tokens, tile_tokens, grad_rows, block_heads, grad_vector,
                tile, padded_dim, dim, count);
      __syncthreads();
      if (one_tile) {  // c_h, a warp per head, a lane per token (count <= 32)
        for (int h = warp; h < padded_heads; h += kWarps) {
          acc_t sum = 0;
          if (h < block_heads && lane < count) {
            const int64_t index = int64_t(h) * num_tokens + lane;
            const acc_t grad_a = grad_attention_b ? grad_attention_b[index] : acc_t(0);
            sum = attention_b[index] * (coeff[(padded_heads + h) * tile_tokens + lane] + grad_a);
          }
          sum = warp_sum(sum);
          if (lane == 0) baseline[h] = sum;
        }
        __syncthreads();
      }
      for (int i = threadIdx.x; i < padded_heads * tile_tokens; i += kThreads) {
        const int h = i / tile_tokens, j = i - h * tile_tokens;
        acc_t a = 0, ds = 0;
        if (h < block_heads && j < count) {
          const int64_t index = int64_t(h) * num_tokens + n0 + j;
          a = attention_b[index];
          const acc_t grad_a = grad_attention_b ? grad_attention_b[index] : acc_t(0);
          ds = fm::score_grad(a, coeff[(padded_heads + h) * tile_tokens + j], grad_a, baseline[h]);
        }
        coeff[h * tile_tokens + j] = a;
        coeff[(padded_heads + h) * tile_tokens + j] = ds;
        score_grad_t[j * padded_heads + h] = ds;
      }
      __syncthreads();

      // dw_h += sum_n ds_hn xh_n (each thread owns the same dw elements on every call).
      tile_accumulate(weight_grad(), padded_heads, padded_dim, score_grad_t, padded_heads, tile,
                      dim, count, static_cast<const acc_t*>(nullptr));
      if constexpr (kLayerGrads) {
        // dxh_n = sum_h a_hn g_h + ds_hn w_h
        tile_combine(grad_tile, padded_dim, coeff, tile_tokens, padded_heads, grad_rows,
                     grad_vector, score_weight, weight_vector, heads, dim, count);
        __syncthreads();
        // LayerNorm backward, a warp per token; an averaged token's gradient is shared by
        // its rows, so it is divided by their number here, once.
        for (int j = warp; j < count; j += kWarps) {
          const acc_t* xh = tile + j * padded_dim;
          acc_t* dxh = grad_tile + j * padded_dim;
          acc_t sum = 0, dot = 0;
          for (int d = lane; d < dim; d += 32) {
            sum += dxh[d];
            dot += dxh[d] * xh[d];
          }
          // normalize="none": dx = dxh, the formula with rstd 1 and both means 0.
          const acc_t mean_grad = layernorm ? warp_sum(sum) / dim_count : acc_t(0);
          const acc_t mean_grad_xh = layernorm ? warp_sum(dot) / dim_count : acc_t(0);
          const acc_t row_rstd = layernorm ? rstd[int64_t(b) * num_tokens + n0 + j] : acc_t(1);
          const bool average = slots[j].flags & kSlotAverage;
          const acc_t rows = static_cast<acc_t>(slots[j].rows);
          for (int d = lane; d < dim; d += 32) {
            acc_t value = fm::layernorm_input_grad(dxh[d], xh[d], mean_grad, mean_grad_xh, row_rstd);
            dxh[d] = average ? value / rows : value;
          }
        }
        __syncthreads();

        // Scatter (the adjoint of the gather).
        const int chunks = padded_dim / W;
        if (args.spec == kSpecAll) {
          for (int item = threadIdx.x; item < count * chunks; item += kThreads) {
            const int j = item / chunks, c = item - j * chunks;
            const TokenSlot& slot = slots[j];
            acc_t values[W];
#pragma unroll
            for (int i = 0; i < W; ++i) values[i] = grad_tile[j * padded_dim + c * W + i];
            store_chunk<scalar_t, acc_t>(static_cast<scalar_t*>(slot.grad) + int64_t(slot.row) * dim,
                                         slot.flags & kSlotVectorStore, c * W, dim, values);
          }
        } else {
          // cls -> row 0; ap -> rows num_prefix_tokens..T-1; other rows 0. The spec's tokens
          // of one layer are adjacent and a tile holds a multiple of 8, so a layer's tokens
          // never straddle two tiles.
          const bool cls = args.spec != kSpecAp, average = args.spec != kSpecCls;
          const int per_layer = (cls ? 1 : 0) + (average ? 1 : 0);
          for (int first = 0; first < count; first += per_layer) {
            const TokenSlot& slot = slots[first];
            const int length = slot.length;
            const acc_t* cls_grad = cls ? grad_tile + first * padded_dim : nullptr;
            const acc_t* average_grad = average ? grad_tile + (first + per_layer - 1) * padded_dim : nullptr;
            const int prefix = args.num_prefix_tokens;
            const bool vector = slot.flags & kSlotVectorStore;
            for (int64_t item = threadIdx.x; item < int64_t(length) * chunks; item += kThreads) {
              const int row = static_cast<int>(item / chunks), c = static_cast<int>(item - int64_t(row) * chunks);
              const bool from_cls = cls && row == 0, from_average = average && row >= prefix;
              acc_t values[W];
#pragma unroll
              for (int i = 0; i < W; ++i) {
                const int d = c * W + i;
                acc_t value = 0;
                if (from_cls && from_average) value = cls_grad[d] + average_grad[d];
                else if (from_cls) value = cls_grad[d];
                else if (from_average) value = average_grad[d];
                values[i] = value;
              }
              store_chunk<scalar_t, acc_t>(static_cast<scalar_t*>(slot.grad) + int64_t(row) * dim,
                                           vector, c * W, dim, values);
            }
          }
        }
      }
      __syncthreads();  // the next tile overwrites the slots, tiles and coefficients
    }
  }

  if (weight_grad_in_shared) {
    acc_t* out = weight_partials + int64_t(blockIdx.x) * padded_heads * padded_dim;
    for (int i = threadIdx.x; i < padded_heads * padded_dim; i += kThreads) out[i] = shared_weight_grad[i];
  }
}

// dw[h][d] = sum over the backward's ranges of samples, in range order, of their partials.
// Range r's partials: head_tiles = ceil(H / head_tile) adjacent slices of (padded_heads,
// padded_dim), head h in slice h / head_tile at row h % head_tile.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
weight_grad_reduce_kernel(const acc_t* __restrict__ partials, int ranges, int heads, int dim,
                          int head_tile, int padded_heads, int padded_dim, acc_t* __restrict__ grad_weight) {
  const int64_t index = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (index >= int64_t(heads) * dim) return;
  const int h = static_cast<int>(index / dim), d = static_cast<int>(index - int64_t(h) * dim);
  const int64_t range_rows = int64_t(ceil_div(heads, head_tile)) * padded_heads;
  const int64_t row = int64_t(h / head_tile) * padded_heads + h % head_tile;
  acc_t sum = 0;
  for (int range = 0; range < ranges; ++range) {
    sum += partials[(range * range_rows + row) * padded_dim + d];
  }
  grad_weight[index] = sum;
}

// ---- the forward's gather pass --------------------------------------------------------------
// stack[b][n][d] = gathered token n of sample b (patch averages included), in acc_t: a forward
// whose heads are tiled over blocks runs on this (B, N, D) stack, so that the layers are read
// once, not once per head tile (fused_pool_cuda.cu). One block per sample, tiles as the pool
// kernels gather them. (Footprint: moments_shared_elements, the tile and the averaging scratch.)
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
gather_tokens_kernel(const __grid_constant__ GatherArgs args, int tile_tokens, acc_t* __restrict__ stack) {
  unsigned char* shared_bytes = dynamic_shared_memory();
  const int dim = args.dim, padded_dim = args.padded_dim, num_tokens = args.num_tokens;
  TokenSlot* slots = reinterpret_cast<TokenSlot*>(shared_bytes);
  acc_t* tile = reinterpret_cast<acc_t*>(shared_bytes + slot_bytes(tile_tokens));
  acc_t* partial = tile + tile_tokens * padded_dim;
  const int64_t b = blockIdx.x;
  for (int n0 = 0; n0 < num_tokens; n0 += tile_tokens) {
    const int count = min(tile_tokens, num_tokens - n0);
    fill_slots<scalar_t>(args, nullptr, b, n0, count, slots);
    __syncthreads();
    gather_tile<scalar_t, acc_t>(slots, count, dim, padded_dim, tile, partial);
    acc_t* rows = stack + (b * num_tokens + n0) * dim;
    for (int i = threadIdx.x; i < count * dim; i += kThreads) {
      const int j = i / dim;
      rows[i] = tile[j * padded_dim + (i - j * dim)];
    }
    __syncthreads();  // the next tile overwrites `tile` and `slots`
  }
}

// ---- token_moments -------------------------------------------------------------------------
// Per-channel mean and M2 over the gathered tokens of a contiguous range of samples per block
// (as the backward splits the batch): tiles gathered into shared memory as the pool kernels do,
// each tile's mean and centred sum of squares per channel merged (Chan) into the block's row
// of `partials` (2, padded_dim), a thread per channel. No atomics: the reduce kernel below
// merges the blocks' rows in block order.
// (Footprint: moments_shared_elements, csrc/common/launch_plan.h.)
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
token_moments_kernel(const __grid_constant__ GatherArgs args, int64_t batch, int tile_tokens,
                     acc_t* __restrict__ partials) {
  unsigned char* shared_bytes = dynamic_shared_memory();
  const int dim = args.dim, padded_dim = args.padded_dim, num_tokens = args.num_tokens;
  TokenSlot* slots = reinterpret_cast<TokenSlot*>(shared_bytes);
  acc_t* tile = reinterpret_cast<acc_t*>(shared_bytes + slot_bytes(tile_tokens));
  acc_t* partial = tile + tile_tokens * padded_dim;
  acc_t* mean_row = partials + int64_t(blockIdx.x) * 2 * padded_dim;
  acc_t* m2_row = mean_row + padded_dim;
  for (int d = threadIdx.x; d < padded_dim; d += kThreads) mean_row[d] = m2_row[d] = 0;
  acc_t seen = 0;
  const int64_t batch_end = (int64_t(blockIdx.x) + 1) * batch / gridDim.x;
  for (int64_t b = int64_t(blockIdx.x) * batch / gridDim.x; b < batch_end; ++b) {
    for (int n0 = 0; n0 < num_tokens; n0 += tile_tokens) {
      const int count = min(tile_tokens, num_tokens - n0);
      fill_slots<scalar_t>(args, nullptr, b, n0, count, slots);
      __syncthreads();
      gather_tile<scalar_t, acc_t>(slots, count, dim, padded_dim, tile, partial);
      // fm::merge_moments with its divisions hoisted out of the D loop (an IEEE division is a
      // call into its slow path; one per tile, not one per channel).
      const acc_t width = static_cast<acc_t>(count);
      const acc_t inverse_width = acc_t(1) / width;
      const acc_t weight = width / (seen + width);
      const acc_t cross = seen * weight;
      for (int d = threadIdx.x; d < dim; d += kThreads) {
        acc_t tile_mean = 0;
        for (int j = 0; j < count; ++j) tile_mean += tile[j * padded_dim + d];
        tile_mean *= inverse_width;
        acc_t tile_m2 = 0;
        for (int j = 0; j < count; ++j) {
          const acc_t deviation = tile[j * padded_dim + d] - tile_mean;
          tile_m2 += deviation * deviation;
        }
        const acc_t delta = tile_mean - mean_row[d];
        mean_row[d] += delta * weight;
        m2_row[d] += tile_m2 + delta * delta * cross;
      }
      seen += width;
      __syncthreads();  // the next tile overwrites `tile` and `slots`
    }
  }
}

// mean, var (D,) from the blocks' rows, merged in block order; block k held samples
// [k B / blocks, (k + 1) B / blocks).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
token_moments_reduce_kernel(const acc_t* __restrict__ partials, int blocks, int64_t batch,
                            int num_tokens, int dim, int padded_dim, acc_t* __restrict__ mean,
                            acc_t* __restrict__ var) {
  const int d = blockIdx.x * kThreads + threadIdx.x;
  if (d >= dim) return;
  acc_t total_mean = 0, total_m2 = 0, total = 0;
  for (int block = 0; block < blocks; ++block) {
    const int64_t samples = (int64_t(block) + 1) * batch / blocks - int64_t(block) * batch / blocks;
    const acc_t count = static_cast<acc_t>(samples * num_tokens);
    const acc_t* row = partials + int64_t(block) * 2 * padded_dim;
    fm::merge_moments(total_mean, total_m2, total, row[d], row[padded_dim + d], count);
    total += count;
  }
  mean[d] = total_mean;
  var[d] = total_m2 / total;
}

}  // namespace cuda
}  // namespace fastfuse
