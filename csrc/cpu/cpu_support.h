// What the CPU forward and backward kernels share: the tile size, scratch memory, reading
// tokens out of the layers (through their strides), and small helpers.
//
// Layout of the work (both directions): OpenMP threads over the batch. Per sample the N
// gathered tokens stream through once, in tiles of kTileTokens tokens: gather (averaging rows
// for "ap"), LayerNorm into a small padded tile, then the blocked products of
// blocked_kernels.h. No (B, N, D) intermediate exists.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "common/fused_pool_args.h"
#include "common/fused_pool_math.h"
#include "cpu/blocked_kernels.h"
#include "cpu/variant.h"

namespace fastfuse {
namespace cpu {
inline namespace FASTFUSE_CPU_VARIANT {  // csrc/cpu/variant.h

// Tokens per tile: each chunk of the (H, D) weights and accumulator loaded into registers is
// reused for this many tokens; a 32 x 768 float tile (96 KiB) stays in L2.
constexpr int64_t kTileTokens = 32;

// Zero-initialised, 64-byte aligned scratch memory.
template <typename T>
class Scratch {
 public:
  Scratch() = default;
  explicit Scratch(int64_t count) {
    const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(count, 1) * sizeof(T), 64));
    void* memory = std::aligned_alloc(64, bytes);
    if (memory == nullptr) throw std::bad_alloc();
    std::memset(memory, 0, bytes);
    data_.reset(static_cast<T*>(memory));
  }
  T* get() const { return data_.get(); }

 private:
  struct Free {
    void operator()(T* pointer) const { std::free(pointer); }
  };
  std::unique_ptr<T, Free> data_;
};

// New outputs of many MiB come from fresh mmap-ed memory whose first touch (by these kernels)
// page-faults every 4 KiB; a 155 MB gradient spent ~30 ms there on the development machine.
// Asking for transparent huge pages (a hint, ignored where unsupported) makes it ~5 ms.
inline void advise_huge_pages(const at::Tensor& tensor) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(tensor.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + tensor.nbytes()) & ~(kHugePage - 1);
  if (tensor.nbytes() >= (size_t(8) << 20) && last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
}

// One layer read through its strides (never made contiguous).
template <typename in_t>
struct LayerView {
  const in_t* data;
  int64_t stride_batch, stride_row, stride_dim, length;
};

template <typename in_t>
inline std::vector<LayerView<in_t>> layer_views(at::TensorList layers) {
  std::vector<LayerView<in_t>> views;
  for (const at::Tensor& layer : layers) {
    views.push_back({layer.data_ptr<in_t>(), layer.stride(0), layer.stride(1), layer.stride(2),
                     layer.size(1)});
  }
  return views;
}

template <typename in_t, typename acc_t, bool kAdd>
inline void load_row(const in_t* __restrict row, int64_t stride_dim, int64_t dim,
                     acc_t* __restrict out) {
  if (stride_dim == 1) {
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) out[d] = kAdd ? out[d] + acc_t(row[d]) : acc_t(row[d]);
  } else {
    for (int64_t d = 0; d < dim; ++d) {
      out[d] = kAdd ? out[d] + acc_t(row[d * stride_dim]) : acc_t(row[d * stride_dim]);
    }
  }
}

// max |x| and sum x of one token row: what its LayerNorm statistics need before the
// centred pass (token_statistics).
template <typename acc_t>
struct RowScan {
  acc_t peak, sum;
};

// out[d] = row[d] in the compute dtype, scanned on the way (max |x|, sum x) while the copy waits
// on memory. The sum's order is reduce_sum's (four vector accumulators, then the tail).
template <typename in_t, typename acc_t>
inline RowScan<acc_t> load_row_scanned(const in_t* __restrict row, int64_t stride_dim, int64_t dim,
                                       acc_t* __restrict out) {
  constexpr int64_t kWidth = 4 * lanes<acc_t>();
  acc_t partial_sum[kWidth] = {};
  acc_t partial_peak[kWidth] = {};
  int64_t d = 0;
  if (stride_dim == 1) {
    for (; d + kWidth <= dim; d += kWidth) {
#pragma omp simd
      for (int64_t v = 0; v < kWidth; ++v) {
        const acc_t value = acc_t(row[d + v]);
        out[d + v] = value;
        partial_sum[v] += value;
        const acc_t magnitude = value < acc_t(0) ? -value : value;
        partial_peak[v] = partial_peak[v] > magnitude ? partial_peak[v] : magnitude;
      }
    }
  } else {
    for (; d + kWidth <= dim; d += kWidth) {
      for (int64_t v = 0; v < kWidth; ++v) {
        const acc_t value = acc_t(row[(d + v) * stride_dim]);
        out[d + v] = value;
        partial_sum[v] += value;
        const acc_t magnitude = value < acc_t(0) ? -value : value;
        partial_peak[v] = partial_peak[v] > magnitude ? partial_peak[v] : magnitude;
      }
    }
  }
  acc_t tail = 0, peak = max_lanes(partial_peak);
  for (; d < dim; ++d) {
    const acc_t value = acc_t(row[d * stride_dim]);
    out[d] = value;
    tail += value;
    const acc_t magnitude = value < acc_t(0) ? -value : value;
    peak = peak > magnitude ? peak : magnitude;
  }
  return {peak, sum_lanes(partial_sum) + tail};
}

template <typename acc_t>
inline RowScan<acc_t> scan_row(const acc_t* __restrict row, int64_t dim) {
  return {reduce_max_abs<acc_t>(dim, row), reduce_sum<acc_t>(dim, [&](int64_t d) { return row[d]; })};
}

// Token `source` of sample b, in the compute dtype (an "ap" token averages its rows there),
// with its RowScan.
template <typename in_t, typename acc_t>
inline RowScan<acc_t> gather_token(const LayerView<in_t>& layer, const TokenSource& source, int64_t b,
                                   int64_t dim, int64_t num_prefix_tokens, acc_t* __restrict out) {
  const in_t* sample = layer.data + b * layer.stride_batch;
  if (source.row != TokenSource::kAverageRow) {
    return load_row_scanned<in_t, acc_t>(sample + source.row * layer.stride_row, layer.stride_dim,
                                         dim, out);
  }
  load_row<in_t, acc_t, false>(sample + num_prefix_tokens * layer.stride_row, layer.stride_dim,
                               dim, out);
  for (int64_t row = num_prefix_tokens + 1; row < layer.length; ++row) {
    load_row<in_t, acc_t, true>(sample + row * layer.stride_row, layer.stride_dim, dim, out);
  }
  const acc_t count = acc_t(layer.length - num_prefix_tokens);
  bool finite = true;
#pragma omp simd reduction(&& : finite)
  for (int64_t d = 0; d < dim; ++d) {
    out[d] /= count;
    finite = finite && std::isfinite(out[d]);
  }
  if (finite) return scan_row(out, dim);  // (the row is in L1 by now)
  // The sum overflowed (or a row is not finite): average rows divided first, so that huge
  // but finite patches keep a finite average (issue 12 item 7).
  std::fill(out, out + dim, acc_t(0));
  for (int64_t row = num_prefix_tokens; row < layer.length; ++row) {
    const in_t* values = sample + row * layer.stride_row;
    for (int64_t d = 0; d < dim; ++d) out[d] += acc_t(values[d * layer.stride_dim]) / count;
  }
  return scan_row(out, dim);
}

// LayerNorm statistics of one token row (SPEC §2), robust to its magnitude
// (fused_pool_math.h: token_scale), from its RowScan. Summation order is that of reduce_sum,
// so tokens with max |x| <= 1 get the statistics of the plain two-pass formula bit for bit.
template <typename acc_t>
inline void token_statistics(const acc_t* __restrict row, int64_t dim, acc_t eps, RowScan<acc_t> scan,
                             acc_t& mean_out, acc_t& rstd_out) {
  namespace fm = fastfuse::math;
  const acc_t dim_count = static_cast<acc_t>(dim);
  const acc_t scale = fm::token_scale(scan.peak);
  const acc_t inverse = acc_t(1) / scale;  // a power of two: multiplying by it is exact
  // sum(x) / scale == sum(x / scale) unless sum(x) overflowed: then sum the scaled values.
  const acc_t sum = std::isfinite(scan.sum)
                        ? scan.sum * inverse
                        : reduce_sum<acc_t>(dim, [&](int64_t d) { return row[d] * inverse; });
  const acc_t mean_scaled = sum / dim_count;
  const acc_t centered = reduce_sum<acc_t>(dim, [&](int64_t d) {
    const acc_t deviation = row[d] * inverse - mean_scaled;
    return deviation * deviation;
  });
  mean_out = mean_scaled * scale;
  rstd_out = fm::scaled_layernorm_rstd(centered, dim_count, eps, scale) * inverse;
}

template <typename acc_t>
inline void token_statistics(const acc_t* __restrict row, int64_t dim, acc_t eps, acc_t& mean_out,
                             acc_t& rstd_out) {
  token_statistics(row, dim, eps, scan_row(row, dim), mean_out, rstd_out);
}

// Tokens n0..n0+count-1 of sample b into the rows of `tile`, back to back: one burst of reads
// that the hardware prefetcher follows (gathering and normalising token by token instead
// interrupts the stream and made the gather twice as slow). scans[j] (if given): token j's
// RowScan, taken during the copy.
template <typename in_t, typename acc_t>
inline void gather_tile(const std::vector<LayerView<in_t>>& views, const PoolProblem& problem, int64_t b,
                        int64_t n0, int64_t count, acc_t* tile, int64_t padded_dim,
                        RowScan<acc_t>* scans = nullptr) {
  for (int64_t j = 0; j < count; ++j) {
    const TokenSource& source = problem.sources[n0 + j];
    const RowScan<acc_t> scan = gather_token(views[source.layer], source, b, problem.dim,
                                             problem.num_prefix_tokens, tile + j * padded_dim);
    if (scans != nullptr) scans[j] = scan;
  }
}

// Software prefetch of the next tile's token rows, issued a few cache lines at a time between
// the blocks of the current tile's products, so that their DRAM reads overlap arithmetic
// instead of forming a read phase of their own (gather_tile then finds them in L2). Rows read
// through a feature stride and averaged tokens ("ap": many rows, little arithmetic per byte)
// are left to the hardware.
template <typename in_t>
class RowPrefetcher {
 public:
  static constexpr int64_t kLine = 64;

  void plan(const std::vector<LayerView<in_t>>& views, const PoolProblem& problem, int64_t b,
            int64_t n0, int64_t count, int64_t steps) {
    rows_ = 0;
    row_ = 0;
    offset_ = 0;
    const int64_t bytes = problem.dim * static_cast<int64_t>(sizeof(in_t));
    for (int64_t j = 0; j < count && rows_ < kTileTokens; ++j) {
      const TokenSource& source = problem.sources[n0 + j];
      const LayerView<in_t>& layer = views[source.layer];
      if (source.row == TokenSource::kAverageRow || layer.stride_dim != 1) continue;
      starts_[rows_++] = reinterpret_cast<const char*>(layer.data + b * layer.stride_batch +
                                                       source.row * layer.stride_row);
    }
    row_bytes_ = bytes;
    const int64_t lines = rows_ * ((bytes + kLine - 1) / kLine);
    per_step_ = steps > 0 ? (lines + steps - 1) / steps : lines;
  }

  // The tile after tokens n0.. of sample b (the next sample's first tile once b's tokens
  // end; nothing from sample `end`), spread over the blocks of one tile's products:
  // block_dots over rows x cols and accumulate_rows over rows x padded_dim (blocked_kernels.h).
  template <typename acc_t>
  void plan_next_tile(const std::vector<LayerView<in_t>>& views, const PoolProblem& problem,
                      int64_t b, int64_t n0, int64_t end, int64_t rows, int64_t cols, int64_t padded_dim) {
    const int64_t num_tokens = problem.num_tokens(), next = n0 + kTileTokens;
    const bool same_sample = next < num_tokens;
    const int64_t count = same_sample ? std::min(kTileTokens, num_tokens - next)
                                      : (b + 1 < end ? std::min(kTileTokens, num_tokens) : 0);
    const int64_t steps = (rows / kRowBlock) * (cols / kDotColumns + padded_dim / (kWideChunks * lanes<acc_t>()));
    plan(views, problem, same_sample ? b : b + 1, same_sample ? next : 0, count, steps);
  }

  void step() {
    for (int64_t issued = 0; issued < per_step_ && row_ < rows_; ++issued) {
      __builtin_prefetch(starts_[row_] + offset_, 0, 2);
      offset_ += kLine;
      if (offset_ >= row_bytes_) {
        offset_ = 0;
        ++row_;
      }
    }
  }

  void operator()() { step(); }

 private:
  const char* starts_[kTileTokens];
  int64_t rows_ = 0, row_ = 0, offset_ = 0, row_bytes_ = 0, per_step_ = 0;
};

// Threads for `items` independent work items costing about `cost_per_item` multiply-adds each:
// at most torch's thread count (torch.set_num_threads), and one per ~256K multiply-adds, so
// that small calls do not pay for waking (and, on a busy machine, waiting for) a team.
inline int worker_count(int64_t items, int64_t cost_per_item) {
  constexpr int64_t kMinCostPerThread = int64_t(1) << 18;
  const int64_t by_cost = std::max<int64_t>(1, items * cost_per_item / kMinCostPerThread);
  return static_cast<int>(std::min<int64_t>({int64_t(at::get_num_threads()), items, by_cost}));
}

// Copies a (rows, dim) matrix read through strides into padded rows (zero past dim).
template <typename acc_t>
inline void copy_padded(const at::Tensor& matrix, acc_t* __restrict out, int64_t padded_dim) {
  const acc_t* data = matrix.data_ptr<acc_t>();
  for (int64_t r = 0; r < matrix.size(0); ++r) {
    for (int64_t d = 0; d < matrix.size(1); ++d) {
      out[r * padded_dim + d] = data[r * matrix.stride(0) + d * matrix.stride(1)];
    }
  }
}

}  // namespace FASTFUSE_CPU_VARIANT
}  // namespace cpu
}  // namespace fastfuse
