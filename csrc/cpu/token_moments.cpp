// CPU kernel of fastfuse::fused_token_moments (schema: fastfuse/backends/compiled_ops.py):
// per-channel mean and biased variance over all B*N gathered tokens, one streaming pass.
// Tokens are gathered tile by tile (as the pool kernels do, averaging "ap" rows on the fly);
// each tile's mean and centred sum of squares are formed in cache, then merged into the
// running moments with Chan's formula (fused_pool_math.h: merge_moments). Partials are kept
// per fixed chunk of the batch and merged in chunk order: bitwise the same for any thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "common/fused_pool_args.h"
#include "common/fused_pool_math.h"
#include "cpu/blocked_kernels.h"
#include "cpu/cpu_support.h"
#include "cpu/variant.h"

namespace fastfuse {
namespace cpu {
inline namespace FASTFUSE_CPU_VARIANT {  // csrc/cpu/variant.h
namespace {

namespace fm = fastfuse::math;

constexpr int64_t kMaxChunks = 64;

template <typename in_t>
std::tuple<at::Tensor, at::Tensor> moments_typed(const PoolProblem& problem, at::TensorList layers) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t batch = problem.batch, dim = problem.dim, num_tokens = problem.num_tokens();
  const int64_t padded_dim = round_up(dim, lanes<acc_t>());
  const auto options = layers[0].options().dtype(problem.compute_dtype);
  at::Tensor mean = at::empty({dim}, options);
  at::Tensor var = at::empty({dim}, options);
  if (batch * num_tokens == 0) {  // no token: undefined moments
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  const std::vector<LayerView<in_t>> views = layer_views<in_t>(layers);
  const int64_t num_chunks = std::min(batch, kMaxChunks);
  // Per chunk: running mean and M2 (padded rows); counts are exact in acc_t up to 2^24 tokens
  // per merge step for float (a tile adds at most kTileTokens at a time; totals are ratios).
  Scratch<acc_t> chunk_mean(num_chunks * padded_dim), chunk_m2(num_chunks * padded_dim);
  std::vector<int64_t> chunk_count(num_chunks, 0);

  struct ThreadScratch {
    Scratch<acc_t> tile, block_mean, block_m2;
  };
  const int workers = worker_count(num_chunks, (batch / num_chunks) * num_tokens * dim * 4);
  std::vector<ThreadScratch> scratch(workers);
  for (ThreadScratch& s : scratch) {
    s.tile = Scratch<acc_t>(kTileTokens * padded_dim);
    s.block_mean = Scratch<acc_t>(padded_dim);
    s.block_m2 = Scratch<acc_t>(padded_dim);
  }

#pragma omp parallel for num_threads(workers) schedule(dynamic, 1)
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    ThreadScratch& s = scratch[omp_get_thread_num()];
    acc_t* tile = s.tile.get();
    acc_t* block_mean = s.block_mean.get();
    acc_t* block_m2 = s.block_m2.get();
    acc_t* running_mean = chunk_mean.get() + chunk * padded_dim;
    acc_t* running_m2 = chunk_m2.get() + chunk * padded_dim;
    int64_t running_count = 0;
    for (int64_t b = chunk * batch / num_chunks; b < (chunk + 1) * batch / num_chunks; ++b) {
      for (int64_t n0 = 0; n0 < num_tokens; n0 += kTileTokens) {
        const int64_t count = std::min(kTileTokens, num_tokens - n0);
        gather_tile(views, problem, b, n0, count, tile, padded_dim);
        // Two passes over the tile in cache: its mean, then its centred sum of squares.
        std::fill(block_mean, block_mean + dim, acc_t(0));
        std::fill(block_m2, block_m2 + dim, acc_t(0));
        for (int64_t j = 0; j < count; ++j) {
          const acc_t* row = tile + j * padded_dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) block_mean[d] += row[d];
        }
        const acc_t block_count = static_cast<acc_t>(count);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) block_mean[d] /= block_count;
        for (int64_t j = 0; j < count; ++j) {
          const acc_t* row = tile + j * padded_dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) {
            const acc_t deviation = row[d] - block_mean[d];
            block_m2[d] += deviation * deviation;
          }
        }
        const acc_t before = static_cast<acc_t>(running_count);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) {
          fm::merge_moments(running_mean[d], running_m2[d], before, block_mean[d], block_m2[d],
                            block_count);
        }
        running_count += count;
      }
    }
    chunk_count[chunk] = running_count;
  }

  // Chunk partials merged in chunk order.
  acc_t* mean_out = mean.data_ptr<acc_t>();
  acc_t* var_out = var.data_ptr<acc_t>();
  std::fill(mean_out, mean_out + dim, acc_t(0));
  std::fill(var_out, var_out + dim, acc_t(0));  // M2 until the final division
  int64_t total = 0;
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    const acc_t* partial_mean = chunk_mean.get() + chunk * padded_dim;
    const acc_t* partial_m2 = chunk_m2.get() + chunk * padded_dim;
    const acc_t before = static_cast<acc_t>(total);
    const acc_t count = static_cast<acc_t>(chunk_count[chunk]);
    for (int64_t d = 0; d < dim; ++d) {
      fm::merge_moments(mean_out[d], var_out[d], before, partial_mean[d], partial_m2[d], count);
    }
    total += chunk_count[chunk];
  }
  const acc_t total_count = static_cast<acc_t>(total);
  for (int64_t d = 0; d < dim; ++d) var_out[d] /= total_count;
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> fused_token_moments_cpu(at::TensorList layers,
                                                           c10::string_view tokens,
                                                           int64_t num_prefix_tokens) {
  const PoolProblem problem =
      check_layer_args(layers, std::string(tokens), num_prefix_tokens, c10::DeviceType::CPU);
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, problem.layer_dtype,
                                  "fused_token_moments_cpu", [&] {
    result = moments_typed<scalar_t>(problem, layers);
  });
  return result;
}

}  // namespace

// Registered by csrc/library/cpu_dispatch.cpp, which picks the variant this CPU runs.
c10::KernelFunction moments_kernel() {
  return c10::KernelFunction::makeFromUnboxedFunction(TORCH_FN(fused_token_moments_cpu));
}

}  // namespace FASTFUSE_CPU_VARIANT
}  // namespace cpu
}  // namespace fastfuse
