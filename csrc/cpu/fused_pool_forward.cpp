// CPU kernel of fastfuse::fused_pool_forward (schema: fastfuse/backends/compiled_ops.py; math:
// SPEC §2; per-element arithmetic: csrc/common/fused_pool_math.h). One streaming pass over the
// tokens per sample with an online softmax per head; writes pooled, attention and the per-token
// LayerNorm statistics that the backward recomputes xh from.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/fused_pool_args.h"
#include "common/fused_pool_math.h"
#include "cpu/blocked_kernels.h"
#include "cpu/cpu_support.h"
#include "cpu/vector_exp.h"
#include "cpu/variant.h"

namespace fastfuse {
namespace cpu {
inline namespace FASTFUSE_CPU_VARIANT {  // csrc/cpu/variant.h
namespace {

namespace fm = fastfuse::math;

template <typename in_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_typed(
    const PoolProblem& problem, at::TensorList layers, const at::Tensor& score_weight,
    double eps_value, bool layernorm) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t batch = problem.batch, dim = problem.dim, heads = problem.heads;
  const int64_t num_tokens = problem.num_tokens();
  const int64_t padded_dim = round_up(dim, lanes<acc_t>());
  const int64_t padded_heads = round_up(heads, kRowBlock);
  auto [pooled, attention, mean, rstd] = allocate_forward_outputs(problem, layers[0]);
  if (batch == 0) return {pooled, attention, mean, rstd};
  advise_huge_pages(pooled);
  advise_huge_pages(attention);

  const std::vector<LayerView<in_t>> views = layer_views<in_t>(layers);
  Scratch<acc_t> weight(padded_heads * padded_dim);
  copy_padded<acc_t>(score_weight, weight.get(), padded_dim);

  // Per-thread scratch, allocated here so that a failed allocation throws outside OpenMP.
  struct ThreadScratch {
    Scratch<acc_t> tile, scores, accumulator, running_max, running_sum, rescale;
    RowPrefetcher<in_t> prefetch;
  };
  const int workers = worker_count(batch, num_tokens * padded_dim * (padded_heads + 4));
  std::vector<ThreadScratch> scratch(workers);
  for (ThreadScratch& s : scratch) {
    s.tile = Scratch<acc_t>(kTileTokens * padded_dim);
    s.scores = Scratch<acc_t>(padded_heads * kTileTokens);
    s.accumulator = Scratch<acc_t>(padded_heads * padded_dim);
    s.running_max = Scratch<acc_t>(padded_heads);
    s.running_sum = Scratch<acc_t>(padded_heads);
    s.rescale = Scratch<acc_t>(padded_heads);
  }

  acc_t* pooled_out = pooled.data_ptr<acc_t>();
  acc_t* attention_out = attention.data_ptr<acc_t>();
  acc_t* mean_out = mean.data_ptr<acc_t>();
  acc_t* rstd_out = rstd.data_ptr<acc_t>();
  const acc_t eps = static_cast<acc_t>(eps_value);

#pragma omp parallel for num_threads(workers) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    ThreadScratch& s = scratch[omp_get_thread_num()];
    acc_t* tile = s.tile.get();
    acc_t* scores = s.scores.get();
    acc_t* accumulator = s.accumulator.get();
    acc_t* running_max = s.running_max.get();
    acc_t* running_sum = s.running_sum.get();
    acc_t* rescale = s.rescale.get();
    // The first tile overwrites the accumulator; with no token at all it stays zero.
    if (num_tokens == 0) std::fill(accumulator, accumulator + padded_heads * padded_dim, acc_t(0));
    for (int64_t h = 0; h < padded_heads; ++h) {
      running_max[h] = fm::softmax_initial_max<acc_t>();
      running_sum[h] = 0;
      rescale[h] = 1;
    }
    acc_t* attention_b = attention_out + b * heads * num_tokens;

    for (int64_t n0 = 0; n0 < num_tokens; n0 += kTileTokens) {
      const int64_t count = std::min(kTileTokens, num_tokens - n0);
      const int64_t padded_count = round_up(count, kRowBlock);
      // Gather and normalise the tile's tokens; store their statistics.
      RowScan<acc_t> scans[kTileTokens];
      gather_tile(views, problem, b, n0, count, tile, padded_dim, scans);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t n = n0 + j;
        acc_t* row = tile + j * padded_dim;
        // normalize="none": the raw tokens, saved as mean 0 and rstd 1.
        acc_t row_mean = 0, row_rstd = 1;
        if (layernorm) {
          token_statistics(row, dim, eps, scans[j], row_mean, row_rstd);
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) row[d] = fm::layernorm_normalize(row[d], row_mean, row_rstd);
        }
        mean_out[b * num_tokens + n] = row_mean;
        rstd_out[b * num_tokens + n] = row_rstd;
      }
      std::fill(tile + count * padded_dim, tile + padded_count * padded_dim, acc_t(0));

      // The next tile's rows come in while this one's products run (RowPrefetcher).
      s.prefetch.template plan_next_tile<acc_t>(views, problem, b, n0, batch, padded_heads, padded_count,
                                                padded_dim);
      auto between_blocks = [&s] { s.prefetch.step(); };
      // s_hn = w_h . xh_n for the tile (padded heads and tokens give 0).
      block_dots(weight.get(), padded_heads, tile, padded_count, padded_dim, scores, kTileTokens,
                 between_blocks);

      // Online softmax: keep raw scores for the final normalisation, turn the tile's scores
      // into weights relative to the new running maximum.
      for (int64_t h = 0; h < heads; ++h) {
        acc_t* score_row = scores + h * kTileTokens;
        acc_t* attention_row = attention_b + h * num_tokens + n0;
        acc_t block_max = fm::softmax_initial_max<acc_t>();
        for (int64_t j = 0; j < count; ++j) {
          attention_row[j] = score_row[j];
          block_max = std::max(block_max, score_row[j]);
        }
        acc_t head_max = running_max[h], head_sum = running_sum[h];
        rescale[h] = fm::online_softmax_rescale(head_max, head_sum, block_max);
        // p_hn = exp(s_hn - m_h) (fm::softmax_numerator), many at a time (vector_exp.h).
        exp_shifted(score_row, score_row, count, head_max, acc_t(1));
        for (int64_t j = 0; j < count; ++j) head_sum += score_row[j];
        running_max[h] = head_max;
        running_sum[h] = head_sum;
        for (int64_t j = count; j < padded_count; ++j) score_row[j] = 0;
      }
      // acc_h = rescale_h * acc_h + sum_n p_hn xh_n (the first tile: acc_h = sum_n p_hn xh_n)
      accumulate_rows(accumulator, padded_heads, scores, kTileTokens, 1, tile, padded_count,
                      padded_dim, rescale, /*overwrite=*/n0 == 0, between_blocks);
    }

    for (int64_t h = 0; h < heads; ++h) {
      const acc_t inverse_sum = fm::softmax_inverse_sum(running_sum[h]);
      acc_t* attention_row = attention_b + h * num_tokens;
      // a_hn = exp(s_hn - m_h) / l_h (fm::softmax_final), many at a time.
      exp_shifted(attention_row, attention_row, num_tokens, running_max[h], inverse_sum);
      const acc_t* accumulator_row = accumulator + h * padded_dim;
      acc_t* pooled_row = pooled_out + (b * heads + h) * dim;
      // pooled is written once here and read by the next op: streamed (blocked_kernels.h).
      scale_row_streaming(pooled_row, accumulator_row, inverse_sum, dim);
    }
    store_fence();
  }
  return {pooled, attention, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_pool_forward_cpu(
    at::TensorList layers, const at::Tensor& score_weight, c10::string_view tokens,
    int64_t num_prefix_tokens, double eps, c10::string_view normalize) {
  const bool layernorm = parse_layernorm(std::string(normalize));
  const PoolProblem problem = check_forward_args(layers, score_weight, std::string(tokens),
                                                 num_prefix_tokens, c10::DeviceType::CPU);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, problem.layer_dtype,
                                  "fused_pool_forward_cpu", [&] {
    result = forward_typed<scalar_t>(problem, layers, score_weight, eps, layernorm);
  });
  return result;
}

}  // namespace

// Registered by csrc/library/cpu_dispatch.cpp, which picks the variant this CPU runs.
c10::KernelFunction forward_kernel() {
  return c10::KernelFunction::makeFromUnboxedFunction(TORCH_FN(fused_pool_forward_cpu));
}

}  // namespace FASTFUSE_CPU_VARIANT
}  // namespace cpu
}  // namespace fastfuse
