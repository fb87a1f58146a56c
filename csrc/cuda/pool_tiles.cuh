// Block-level building blocks of the CUDA kernels (csrc/cuda/pool_kernels.cuh): reading the
// gathered tokens through the layers' strides, warp reductions, and the three small products
// of a token tile that SPEC §2 needs, each a register-blocked loop over shared memory.
//
// A block has kThreads threads and works on one tile of `count` <= tile_tokens gathered tokens
// at a time, held in shared memory as acc_t rows of padded_dim elements (D rounded up to the
// chunk width; the padding is zero). Per-element arithmetic comes from
// csrc/common/fused_pool_math.h, which the CPU kernels share; the argument layout, the chunk
// widths and the shared-memory footprints from csrc/common/launch_plan.h, which the host planner
// shares.
#pragma once

#include <cstdint>

#include "common/fused_pool_math.h"
#include "common/launch_plan.h"

namespace fastfuse {
namespace cuda {

constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

enum SpecCode : int { kSpecCls = 0, kSpecAp = 1, kSpecClsAp = 2, kSpecAll = 3 };
constexpr int kAverageRow = -1;
constexpr int kSlotVectorLoad = 1, kSlotVectorStore = 2, kSlotAverage = 4;

// Device code. FASTFUSE_CUDA_EMULATION compiles it for the host instead, where
// tests/cuda_emulation runs the kernels thread by thread on a machine without a GPU.
#if defined(__CUDACC__) || defined(FASTFUSE_CUDA_EMULATION)

#ifndef FASTFUSE_CHECK_ALIGNED
#define FASTFUSE_CHECK_ALIGNED(pointer, bytes)  // the emulation checks what the GPU assumes
#endif
#ifndef FASTFUSE_COUNT_TOKEN_LOAD
#define FASTFUSE_COUNT_TOKEN_LOAD(bytes)  // the emulation counts the token bytes loaded
#endif

namespace fm = fastfuse::math;

#ifndef FASTFUSE_CUDA_EMULATION
// The block's dynamic shared memory (sized at launch).
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char bytes[];
  return bytes;
}
#endif

template <typename T>
struct alignas(16) Quad {
  T v[4];
};

template <typename T>
__device__ __forceinline__ Quad<T> load_quad(const T* pointer) {
  FASTFUSE_CHECK_ALIGNED(pointer, 16);
  return *reinterpret_cast<const Quad<T>*>(pointer);
}
template <typename T>
__device__ __forceinline__ void store_quad(T* pointer, const Quad<T>& value) {
  FASTFUSE_CHECK_ALIGNED(pointer, 16);
  *reinterpret_cast<Quad<T>*>(pointer) = value;
}

// Four elements d0..d0+3 of a row in global memory: one (float) or two (double) read-only
// 16-byte loads when `vector` (row 16-byte aligned, D % 4 == 0), else guarded scalar loads.
__device__ __forceinline__ Quad<float> load_quad_global(const float* row, int d0, int dim,
                                                        bool vector) {
  Quad<float> q;
  if (vector) {
    const float4 raw = __ldg(reinterpret_cast<const float4*>(row + d0));
    q.v[0] = raw.x, q.v[1] = raw.y, q.v[2] = raw.z, q.v[3] = raw.w;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) q.v[i] = d0 + i < dim ? __ldg(row + d0 + i) : 0.f;
  }
  return q;
}
__device__ __forceinline__ Quad<double> load_quad_global(const double* row, int d0, int dim,
                                                         bool vector) {
  Quad<double> q;
  if (vector) {
    const double2 low = __ldg(reinterpret_cast<const double2*>(row + d0));
    const double2 high = __ldg(reinterpret_cast<const double2*>(row + d0 + 2));
    q.v[0] = low.x, q.v[1] = low.y, q.v[2] = high.x, q.v[3] = high.y;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) q.v[i] = d0 + i < dim ? __ldg(row + d0 + i) : 0.0;
  }
  return q;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}
template <typename T>
__device__ __forceinline__ T warp_max(T value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T other = __shfl_xor_sync(kFullMask, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

// Gathered token n -> (layer, row) under the token spec (fastfuse/gather.py).
__device__ inline void token_source(const GatherArgs& args, int n, int& layer, int& row) {
  switch (args.spec) {
    case kSpecCls: layer = n, row = 0; return;
    case kSpecAp: layer = n, row = kAverageRow; return;
    case kSpecClsAp: layer = n >> 1, row = (n & 1) ? kAverageRow : 0; return;
    default: {  // "all": the last layer whose first token is <= n (skips empty layers)
      int l = 0;
      while (l + 1 < args.num_layers && args.layers[l + 1].first_token <= n) ++l;
      layer = l, row = n - args.layers[l].first_token;
    }
  }
}

// Thread j < count resolves token n0 + j of sample b into slots[j]. Caller syncs.
template <typename scalar_t>
__device__ void fill_slots(const GatherArgs& args, const GradArgs* grads, int64_t b, int n0,
                           int count, TokenSlot* slots) {
  const int j = threadIdx.x;
  if (j >= count) return;
  int layer, row;
  token_source(args, n0 + j, layer, row);
  const LayerArgs& view = args.layers[layer];
  const bool average = row == kAverageRow;
  const int64_t first = average ? args.num_prefix_tokens : row;
  TokenSlot slot;
  slot.source = static_cast<const scalar_t*>(view.data) + b * view.stride_batch +
                first * view.stride_row;
  slot.grad = grads == nullptr ? nullptr
                               : static_cast<scalar_t*>(grads->data[layer]) +
                                     b * int64_t(view.length) * args.dim;
  slot.stride_row = view.stride_row;
  slot.stride_dim = view.stride_dim;
  slot.rows = average ? view.length - args.num_prefix_tokens : 1;
  slot.row = row;
  slot.length = view.length;
  slot.flags = (((args.vector_loads >> layer) & 1u) ? kSlotVectorLoad : 0) |
               (grads != nullptr && ((grads->vector_stores >> layer) & 1u) ? kSlotVectorStore : 0) |
               (average ? kSlotAverage : 0);
  slots[j] = slot;
}

// Chunk d0..d0+kWidth-1 of one row, converted to acc_t (zero past D).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_chunk(const scalar_t* row, int64_t stride_dim, bool vector,
                                           int d0, int dim, acc_t (&out)[ChunkOf<scalar_t>::kWidth]) {
  using Chunk = ChunkOf<scalar_t>;
  if (vector) {
    FASTFUSE_COUNT_TOKEN_LOAD(16 * Chunk::kLoads);
#pragma unroll
    for (int k = 0; k < Chunk::kLoads; ++k) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + d0 + k * Chunk::kPerLoad));
      const scalar_t* values = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
      for (int i = 0; i < Chunk::kPerLoad; ++i) {
        out[k * Chunk::kPerLoad + i] = static_cast<acc_t>(values[i]);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < Chunk::kWidth; ++i) {
      out[i] = d0 + i < dim ? static_cast<acc_t>(row[int64_t(d0 + i) * stride_dim]) : acc_t(0);
    }
    FASTFUSE_COUNT_TOKEN_LOAD(sizeof(scalar_t) * max(0, min(Chunk::kWidth, dim - d0)));
  }
}

// Chunk d0..d0+kWidth-1 of a gradient row (contiguous, in scalar_t): 16-byte stores when
// `vector` (D a multiple of the chunk, row 16-byte aligned), else guarded element stores.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_chunk(scalar_t* row, bool vector, int d0, int dim,
                                            const acc_t (&values)[ChunkOf<scalar_t>::kWidth]) {
  constexpr int W = ChunkOf<scalar_t>::kWidth;
  if (vector) {
    struct alignas(16) Pack {
      scalar_t v[W];
    } pack;
#pragma unroll
    for (int i = 0; i < W; ++i) pack.v[i] = static_cast<scalar_t>(values[i]);
    FASTFUSE_CHECK_ALIGNED(row + d0, 16);
    *reinterpret_cast<Pack*>(row + d0) = pack;
  } else {
#pragma unroll
    for (int i = 0; i < W; ++i) {
      if (d0 + i < dim) row[d0 + i] = static_cast<scalar_t>(values[i]);
    }
  }
}

template <typename acc_t, int kWidth>
__device__ __forceinline__ void store_chunk_shared(acc_t* destination, const acc_t (&values)[kWidth]) {
#pragma unroll
  for (int q = 0; q < kWidth / 4; ++q) {
    store_quad(destination + 4 * q,
               Quad<acc_t>{{values[4 * q], values[4 * q + 1], values[4 * q + 2], values[4 * q + 3]}});
  }
}

// sum += rows row0, row0 + step, ... < rows (chunk d0 of each), four rows in flight. On the
// vector path the four rows stay as raw 16-byte words until they have all been loaded, which
// keeps a float16 chunk at 4 registers a row instead of 8.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void sum_rows(const scalar_t* first, int64_t stride_row, int64_t stride_dim,
                                         bool vector, int d0, int dim, int row0, int rows, int step,
                                         acc_t (&sum)[ChunkOf<scalar_t>::kWidth]) {
  using Chunk = ChunkOf<scalar_t>;
  constexpr int W = Chunk::kWidth;
  int row = row0;
  if (vector) {
    for (; row + 3 * step < rows; row += 4 * step) {
      FASTFUSE_COUNT_TOKEN_LOAD(4 * 16 * Chunk::kLoads);
      uint4 raw[4][Chunk::kLoads];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int k = 0; k < Chunk::kLoads; ++k) {
          raw[r][k] = __ldg(reinterpret_cast<const uint4*>(
              first + int64_t(row + r * step) * stride_row + d0 + k * Chunk::kPerLoad));
        }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int k = 0; k < Chunk::kLoads; ++k) {
          const scalar_t* values = reinterpret_cast<const scalar_t*>(&raw[r][k]);
#pragma unroll
          for (int i = 0; i < Chunk::kPerLoad; ++i) sum[k * Chunk::kPerLoad + i] += static_cast<acc_t>(values[i]);
        }
    }
  }
  for (; row < rows; row += step) {
    acc_t values[W];
    load_chunk<scalar_t, acc_t>(first + int64_t(row) * stride_row, stride_dim, vector, d0, dim, values);
#pragma unroll
    for (int i = 0; i < W; ++i) sum[i] += values[i];
  }
}

// The raw (un-normalised) tokens of the tile into tile[j * padded_dim + d], in acc_t. Single
// rows: one chunk per thread. An averaged token ("ap"): the whole block, row groups x chunks,
// each thread summing its rows in registers (sum_rows), then the groups' partial
// sums added in a fixed order, so the result does not depend on timing. Ends synchronised.
template <typename scalar_t, typename acc_t>
__device__ void gather_tile(const TokenSlot* slots, int count, int dim, int padded_dim,
                            acc_t* tile, acc_t* partial) {
  using Chunk = ChunkOf<scalar_t>;
  constexpr int W = Chunk::kWidth;
  const int chunks = padded_dim / W;
  bool any_average = false;
  for (int item = threadIdx.x; item < count * chunks; item += kThreads) {
    const int j = item / chunks, c = item - j * chunks;
    const TokenSlot& slot = slots[j];
    if (slot.flags & kSlotAverage) continue;
    acc_t values[W];
    load_chunk<scalar_t, acc_t>(static_cast<const scalar_t*>(slot.source), slot.stride_dim,
                                slot.flags & kSlotVectorLoad, c * W, dim, values);
    store_chunk_shared<acc_t, W>(tile + j * padded_dim + c * W, values);
  }
  for (int j = 0; j < count; ++j) any_average |= (slots[j].flags & kSlotAverage) != 0;
  if (any_average) {
    const int groups = average_groups(padded_dim, W);
    for (int j = 0; j < count; ++j) {
      const TokenSlot& slot = slots[j];
      if (!(slot.flags & kSlotAverage)) continue;  // uniform: every thread reads the same slot
      const scalar_t* first = static_cast<const scalar_t*>(slot.source);
      const bool vector = slot.flags & kSlotVectorLoad;
      for (int item = threadIdx.x; item < groups * chunks; item += kThreads) {
        const int group = item / chunks, c = item - group * chunks;
        acc_t sum[W];
#pragma unroll
        for (int i = 0; i < W; ++i) sum[i] = 0;
        sum_rows<scalar_t, acc_t>(first, slot.stride_row, slot.stride_dim, vector, c * W, dim,
                                  group, slot.rows, groups, sum);
        store_chunk_shared<acc_t, W>(partial + group * padded_dim + c * W, sum);
      }
      __syncthreads();
      const acc_t rows = static_cast<acc_t>(slot.rows);
      for (int d = threadIdx.x; d < padded_dim; d += kThreads) {
        acc_t total = 0;
        for (int group = 0; group < groups; ++group) total += partial[group * padded_dim + d];
        acc_t average = total / rows;
        if (!isfinite(average) && d < dim) {
          // The sum overflowed (or a row is not finite): average the rows divided first, so
          // huge but finite patches keep a finite average (issue 12 item 7). Rare: no tuning.
          // (A reciprocal, not a division per row: each IEEE division is a call, and the
          // unrolled calls cost the kernels a register spill.)
          const acc_t inverse_rows = acc_t(1) / rows;
          average = 0;
#pragma unroll 1
          for (int row = 0; row < slot.rows; ++row) {
            average += static_cast<acc_t>(first[int64_t(row) * slot.stride_row + d * slot.stride_dim]) * inverse_rows;
          }
        }
        tile[j * padded_dim + d] = average;
      }
      __syncthreads();  // `partial` is reused by the next averaged token
    }
  }
  __syncthreads();
}

// out[r * out_stride + j] = rows_r . tile_j for r < row_count, j < count, with rows_r a row of
// a (row_count, dim) matrix in global memory (the score weights, or dL/dz of one sample).
// Each thread owns 4 rows x kTokens tokens and a slice of the quads of D; the slices of a
// micro-tile sit in adjacent lanes and are summed with butterfly shuffles. (The backward, with
// more live state, takes kTokens = 2 to stay within 128 registers.)
template <int kTokens, typename acc_t>
__device__ void tile_dots(acc_t* out, int out_stride, const acc_t* rows, int row_count,
                          bool rows_vector, const acc_t* tile, int padded_dim, int dim, int count) {
  const int row_groups = ceil_div(row_count, 4), token_groups = ceil_div(count, kTokens);
  const int micro_tiles = row_groups * token_groups;
  int slices = 32;
  while (slices > 1 && micro_tiles * slices > kThreads) slices >>= 1;
  const int quads = ceil_div(dim, 4);
  const int total = micro_tiles * slices;
  // `total` is the same for the whole block and `base` steps by whole warps, so every lane of
  // a warp runs the shuffles below (idle lanes with zeros).
  for (int base = 0; base < total; base += kThreads) {
    const int item = base + threadIdx.x;
    const bool active = item < total;
    const int micro = active ? item / slices : 0;
    const int slice = item & (slices - 1);
    const int row_group = micro / token_groups, token_group = micro - row_group * token_groups;
    acc_t sum[4][kTokens];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int k = 0; k < kTokens; ++k) sum[i][k] = 0;
    if (active) {
      // First row / token of the micro-tile; rows and tokens past the end repeat the last one.
      const int row0 = row_group * 4, token0 = token_group * kTokens;
      for (int q = slice; q < quads; q += slices) {
        Quad<acc_t> x[kTokens];
#pragma unroll
        for (int k = 0; k < kTokens; ++k) {
          x[k] = load_quad(tile + min(token0 + k, count - 1) * padded_dim + 4 * q);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const Quad<acc_t> r =
              load_quad_global(rows + min(row0 + i, row_count - 1) * dim, 4 * q, dim, rows_vector);
#pragma unroll
          for (int k = 0; k < kTokens; ++k)
#pragma unroll
            for (int e = 0; e < 4; ++e) sum[i][k] += r.v[e] * x[k].v[e];
        }
      }
    }
    for (int offset = slices >> 1; offset > 0; offset >>= 1) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int k = 0; k < kTokens; ++k) sum[i][k] += __shfl_xor_sync(kFullMask, sum[i][k], offset);
    }
    if (active && slice == 0) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int k = 0; k < kTokens; ++k) {
          const int r = row_group * 4 + i, j = token_group * kTokens + k;
          if (r < row_count && j < count) out[r * out_stride + j] = sum[i][k];
        }
    }
  }
}

// accum[r][d] = scale_r * accum[r][d] + sum_{j < count} coeff_t[j][r] * tile[j][d] for the
// padded_rows (a multiple of 4) rows of accum (shared or global memory, row stride
// padded_dim); scale == nullptr means 1. Each thread owns 4 rows x 4 columns, always the same
// ones for the same arguments, so repeated calls need no synchronisation between them.
template <typename acc_t>
__device__ void tile_accumulate(acc_t* accum, int padded_rows, int padded_dim, const acc_t* coeff_t,
                                int coeff_stride, const acc_t* tile, int dim, int count,
                                const acc_t* scale) {
  const int quads = ceil_div(dim, 4);
  const int micro_tiles = (padded_rows / 4) * quads;
  for (int micro = threadIdx.x; micro < micro_tiles; micro += kThreads) {
    const int row_group = micro / quads, q = micro - row_group * quads;
    acc_t* corner = accum + row_group * 4 * padded_dim + 4 * q;
    Quad<acc_t> a[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      a[i] = load_quad(corner + i * padded_dim);
      if (scale != nullptr) {
        const acc_t s = scale[row_group * 4 + i];
#pragma unroll
        for (int k = 0; k < 4; ++k) a[i].v[k] *= s;
      }
    }
    for (int j = 0; j < count; ++j) {
      const Quad<acc_t> x = load_quad(tile + j * padded_dim + 4 * q);
      const Quad<acc_t> c = load_quad(coeff_t + j * coeff_stride + row_group * 4);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int k = 0; k < 4; ++k) a[i].v[k] += c.v[i] * x.v[k];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) store_quad(corner + i * padded_dim, a[i]);
  }
}

// sum[i][k] += sum_h coeff[h][i] * matrix[h][4q + k] for 8 tokens i (tile_combine's inner loop).
template <typename acc_t>
__device__ __forceinline__ void combine_rows(acc_t (&sum)[8][4], const acc_t* coeff, int coeff_stride,
                                             const acc_t* matrix, bool vector, int heads, int dim,
                                             int q) {
  for (int h = 0; h < heads; ++h) {
    const Quad<acc_t> m = load_quad_global(matrix + int64_t(h) * dim, 4 * q, dim, vector);
    const Quad<acc_t> low = load_quad(coeff + h * coeff_stride);
    const Quad<acc_t> high = load_quad(coeff + h * coeff_stride + 4);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        sum[i][k] += low.v[i] * m.v[k];
        sum[i + 4][k] += high.v[i] * m.v[k];
      }
  }
}

// out[j][d] = sum_{h < heads} coeff[h][j] * first[h][d] + coeff[padded_heads + h][j] * second[h][d]
// for the tile's tokens (SPEC §2: dxh_n = sum_h a_hn g_h + ds_hn w_h), first / second being
// (heads, dim) matrices in global memory. Each thread owns 8 tokens x 4 columns; coeff has
// row stride coeff_stride (the tile size, a multiple of 8) and zeros for tokens >= count.
template <typename acc_t>
__device__ void tile_combine(acc_t* out, int padded_dim, const acc_t* coeff, int coeff_stride,
                             int padded_heads, const acc_t* first, bool first_vector,
                             const acc_t* second, bool second_vector, int heads, int dim,
                             int count) {
  const int quads = ceil_div(dim, 4);
  const int micro_tiles = ceil_div(count, 8) * quads;
  for (int micro = threadIdx.x; micro < micro_tiles; micro += kThreads) {
    const int token_group = micro / quads, q = micro - token_group * quads;
    acc_t sum[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int k = 0; k < 4; ++k) sum[i][k] = 0;
    // The two sums one after the other: fewer values live at once than interleaved.
    combine_rows(sum, coeff + token_group * 8, coeff_stride, first, first_vector, heads, dim, q);
    combine_rows(sum, coeff + padded_heads * coeff_stride + token_group * 8, coeff_stride, second,
                 second_vector, heads, dim, q);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      store_quad(out + (token_group * 8 + i) * padded_dim + 4 * q,
                 Quad<acc_t>{{sum[i][0], sum[i][1], sum[i][2], sum[i][3]}});
    }
  }
}

#endif  // __CUDACC__ || FASTFUSE_CUDA_EMULATION

}  // namespace cuda
}  // namespace fastfuse
