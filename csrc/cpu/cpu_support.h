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
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "common/fused_pool_args.h"
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

// Token `source` of sample b, in the compute dtype (an "ap" token averages its rows there).
template <typename in_t, typename acc_t>
inline void gather_token(const LayerView<in_t>& layer, const TokenSource& source, int64_t b,
                  int64_t dim, int64_t num_prefix_tokens, acc_t* __restrict out) {
  const in_t* sample = layer.data + b * layer.stride_batch;
  if (source.row != TokenSource::kAverageRow) {
    load_row<in_t, acc_t, false>(sample + source.row * layer.stride_row, layer.stride_dim, dim, out);
    return;
  }
  load_row<in_t, acc_t, false>(sample + num_prefix_tokens * layer.stride_row, layer.stride_dim,
                               dim, out);
  for (int64_t row = num_prefix_tokens + 1; row < layer.length; ++row) {
    load_row<in_t, acc_t, true>(sample + row * layer.stride_row, layer.stride_dim, dim, out);
  }
  const acc_t count = acc_t(layer.length - num_prefix_tokens);
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) out[d] /= count;
}

// Tokens n0..n0+count-1 of sample b into the rows of `tile`, back to back: one burst of reads
// that the hardware prefetcher follows (gathering and normalising token by token instead
// interrupts the stream and made the gather twice as slow).
template <typename in_t, typename acc_t>
inline void gather_tile(const std::vector<LayerView<in_t>>& views, const PoolProblem& problem, int64_t b,
                 int64_t n0, int64_t count, acc_t* tile, int64_t padded_dim) {
  for (int64_t j = 0; j < count; ++j) {
    const TokenSource& source = problem.sources[n0 + j];
    gather_token(views[source.layer], source, b, problem.dim, problem.num_prefix_tokens,
                 tile + j * padded_dim);
  }
}

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
