// CPU kernel of fastfuse::fused_pool_backward (schema: fastfuse/backends/compiled_ops.py; math:
// SPEC §2; per-element arithmetic: csrc/common/fused_pool_math.h). Re-gathers each tile,
// recomputes xh from the saved mean / rstd, and scatters the token gradients back to the
// layers (the adjoint of the gather).
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
#include "cpu/variant.h"

namespace fastfuse {
namespace cpu {
inline namespace FASTFUSE_CPU_VARIANT {  // csrc/cpu/variant.h
namespace {

namespace fm = fastfuse::math;

// The backward's dw partial sums are kept per fixed chunk of the batch (not per thread) and
// added in chunk order, so grad_score_weight is bitwise identical for any thread count.
constexpr int64_t kMaxWeightChunks = 64;

template <typename in_t>
std::tuple<std::vector<at::Tensor>, at::Tensor> backward_typed(
    const PoolProblem& problem, const at::Tensor& grad_pooled_in,
    const std::optional<at::Tensor>& grad_attention_in, at::TensorList layers,
    const at::Tensor& score_weight, const at::Tensor& pooled_in, const at::Tensor& attention_in,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, bool layers_need_grad, bool layernorm) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t batch = problem.batch, dim = problem.dim, heads = problem.heads;
  const int64_t num_tokens = problem.num_tokens();
  const int64_t padded_dim = round_up(dim, lanes<acc_t>());
  const int64_t padded_heads = round_up(heads, kRowBlock);
  const bool all_tokens = problem.spec == TokenSpec::kAll;
  const bool one_tile = num_tokens <= kTileTokens;

  // Frozen features (the usual probe) need only dw: no dx, no gradient tensors at all.
  auto [grad_layers, grad_weight] = allocate_backward_outputs(problem, layers, score_weight, layers_need_grad);
  if (batch == 0) return {grad_layers, grad_weight};
  for (const at::Tensor& grad : grad_layers) advise_huge_pages(grad);

  const auto [grad_pooled, grad_attention, pooled, attention, mean, rstd] = contiguous_backward_inputs(
      grad_pooled_in, grad_attention_in, pooled_in, attention_in, mean_in, rstd_in);

  const std::vector<LayerView<in_t>> views = layer_views<in_t>(layers);
  std::vector<in_t*> grad_out;
  for (at::Tensor& grad : grad_layers) grad_out.push_back(grad.data_ptr<in_t>());

  const int64_t num_chunks = std::min(batch, kMaxWeightChunks);
  Scratch<acc_t> weight_partials(num_chunks * padded_heads * padded_dim);

  // Per-thread scratch. `stacked` holds [g_b; w] (2 padded_heads rows), so that
  // dxh_n = sum_h a_hn g_h + ds_hn w_h is one accumulate_rows over 2 padded_heads rows.
  struct ThreadScratch {
    Scratch<acc_t> stacked, tile, grad_tile, dots, coefficients, baseline, token_grads;
    RowPrefetcher<in_t> prefetch;
  };
  const int workers =
      worker_count(num_chunks, (batch / num_chunks) * num_tokens * padded_dim * (padded_heads + 2));
  std::vector<ThreadScratch> scratch(workers);
  for (ThreadScratch& s : scratch) {
    s.stacked = Scratch<acc_t>(2 * padded_heads * padded_dim);
    copy_padded<acc_t>(score_weight, s.stacked.get() + padded_heads * padded_dim, padded_dim);
    s.tile = Scratch<acc_t>(kTileTokens * padded_dim);
    s.grad_tile = Scratch<acc_t>(kTileTokens * padded_dim);
    s.dots = Scratch<acc_t>(padded_heads * kTileTokens);
    s.coefficients = Scratch<acc_t>(2 * padded_heads * kTileTokens);
    s.baseline = Scratch<acc_t>(padded_heads);
    s.token_grads = Scratch<acc_t>(all_tokens ? 1 : num_tokens * padded_dim);
  }

  const acc_t* grad_pooled_data = grad_pooled.data_ptr<acc_t>();
  const acc_t* grad_attention_data = grad_attention ? grad_attention->data_ptr<acc_t>() : nullptr;
  const acc_t* pooled_data = pooled.data_ptr<acc_t>();
  const acc_t* attention_data = attention.data_ptr<acc_t>();
  const acc_t* mean_data = mean.data_ptr<acc_t>();
  const acc_t* rstd_data = rstd.data_ptr<acc_t>();
  const acc_t dim_count = static_cast<acc_t>(dim);

#pragma omp parallel for num_threads(workers) schedule(dynamic, 1)
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    ThreadScratch& s = scratch[omp_get_thread_num()];
    acc_t* stacked = s.stacked.get();
    acc_t* tile = s.tile.get();
    acc_t* grad_tile = s.grad_tile.get();
    acc_t* dots = s.dots.get();
    acc_t* coefficients = s.coefficients.get();
    acc_t* baseline = s.baseline.get();
    acc_t* token_grads = s.token_grads.get();
    acc_t* weight_partial = weight_partials.get() + chunk * padded_heads * padded_dim;
    const int64_t batch_begin = chunk * batch / num_chunks;
    const int64_t batch_end = (chunk + 1) * batch / num_chunks;

    for (int64_t b = batch_begin; b < batch_end; ++b) {
      const acc_t* attention_b = attention_data + b * heads * num_tokens;
      const acc_t* grad_attention_b =
          grad_attention_data ? grad_attention_data + b * heads * num_tokens : nullptr;
      // g_b into the top rows of `stacked`; c_h = g_h . z_h + sum_n a_hn gA_hn. When one tile
      // holds every token, g_h . z_h = sum_n a_hn (g_h . xh_n) comes from the tile's own
      // products below instead, and pooled (as large as g) is never read.
      for (int64_t h = 0; h < heads; ++h) {
        const acc_t* grad_row = grad_pooled_data + (b * heads + h) * dim;
        const acc_t* pooled_row = pooled_data + (b * heads + h) * dim;
        std::copy(grad_row, grad_row + dim, stacked + h * padded_dim);
        acc_t c = one_tile ? acc_t(0)
                           : reduce_sum<acc_t>(dim, [&](int64_t d) { return grad_row[d] * pooled_row[d]; });
        if (grad_attention_b) {
          for (int64_t n = 0; n < num_tokens; ++n) {
            c += attention_b[h * num_tokens + n] * grad_attention_b[h * num_tokens + n];
          }
        }
        baseline[h] = c;
      }

      for (int64_t n0 = 0; n0 < num_tokens; n0 += kTileTokens) {
        const int64_t count = std::min(kTileTokens, num_tokens - n0);
        const int64_t padded_count = round_up(count, kRowBlock);
        // Re-gather the tile and recompute xh from the saved statistics.
        gather_tile(views, problem, b, n0, count, tile, padded_dim);
        for (int64_t j = 0; j < count; ++j) {
          const int64_t n = n0 + j;
          acc_t* row = tile + j * padded_dim;
          const acc_t row_mean = mean_data[b * num_tokens + n];
          const acc_t row_rstd = rstd_data[b * num_tokens + n];
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) row[d] = fm::layernorm_normalize(row[d], row_mean, row_rstd);
        }
        std::fill(tile + count * padded_dim, tile + padded_count * padded_dim, acc_t(0));

        // The next tile's rows (or the next sample's first) come in while this tile's
        // products run (RowPrefetcher), as in the forward.
        s.prefetch.template plan_next_tile<acc_t>(views, problem, b, n0, batch_end, padded_heads,
                                                  padded_count, padded_dim);
        auto between_blocks = [&s] { s.prefetch.step(); };
        // g_h . xh_n, then coefficients = [a_hn; ds_hn] (zero for padded heads and tokens).
        block_dots(stacked, padded_heads, tile, padded_count, padded_dim, dots, kTileTokens,
                   between_blocks);
        acc_t* attention_coefficients = coefficients;
        acc_t* score_grads = coefficients + padded_heads * kTileTokens;
        for (int64_t h = 0; h < heads; ++h) {
          if (one_tile) {
            for (int64_t j = 0; j < count; ++j) {
              baseline[h] += attention_b[h * num_tokens + j] * dots[h * kTileTokens + j];
            }
          }
          for (int64_t j = 0; j < padded_count; ++j) {
            acc_t a = 0, ds = 0;
            if (j < count) {
              const int64_t n = n0 + j;
              a = attention_b[h * num_tokens + n];
              const acc_t grad_a = grad_attention_b ? grad_attention_b[h * num_tokens + n] : acc_t(0);
              ds = fm::score_grad(a, dots[h * kTileTokens + j], grad_a, baseline[h]);
            }
            attention_coefficients[h * kTileTokens + j] = a;
            score_grads[h * kTileTokens + j] = ds;
          }
        }
        // dw_h += sum_n ds_hn xh_n
        accumulate_rows(weight_partial, padded_heads, score_grads, kTileTokens, 1, tile,
                        padded_count, padded_dim, static_cast<const acc_t*>(nullptr),
                        /*overwrite=*/false, between_blocks);
        if (!layers_need_grad) continue;
        // dxh_n = sum_h a_hn g_h + ds_hn w_h
        accumulate_rows(grad_tile, padded_count, coefficients, 1, kTileTokens, stacked,
                        2 * padded_heads, padded_dim, static_cast<const acc_t*>(nullptr),
                        /*overwrite=*/true);

        // LayerNorm backward, then the token's gradient to its row (or to the per-sample
        // buffer that the cls / ap scatter reads).
        for (int64_t j = 0; j < count; ++j) {
          const int64_t n = n0 + j;
          const acc_t* xh = tile + j * padded_dim;
          const acc_t* dxh = grad_tile + j * padded_dim;
          // normalize="none": dx = dxh, which is the formula with rstd 1 and both means 0.
          const acc_t mean_grad =
              layernorm ? reduce_sum<acc_t>(dim, [&](int64_t d) { return dxh[d]; }) / dim_count : 0;
          const acc_t mean_grad_xh =
              layernorm ? reduce_sum<acc_t>(dim, [&](int64_t d) { return dxh[d] * xh[d]; }) / dim_count
                        : 0;
          const acc_t row_rstd = layernorm ? rstd_data[b * num_tokens + n] : acc_t(1);
          if (all_tokens) {
            const TokenSource& source = problem.sources[n];
            const int64_t length = problem.lengths[source.layer];
            in_t* out = grad_out[source.layer] + (b * length + source.row) * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) {
              out[d] = static_cast<in_t>(
                  fm::layernorm_input_grad(dxh[d], xh[d], mean_grad, mean_grad_xh, row_rstd));
            }
          } else {
            acc_t* out = token_grads + n * padded_dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) {
              out[d] = fm::layernorm_input_grad(dxh[d], xh[d], mean_grad, mean_grad_xh, row_rstd);
            }
          }
        }
      }

      if (layers_need_grad && !all_tokens) {
        // Adjoint of the gather: cls -> row 0; ap -> dx / (T - p) on rows p..T-1; else 0.
        const bool cls = reads_cls(problem.spec), average = reads_average(problem.spec);
        const int64_t per_layer = (cls ? 1 : 0) + (average ? 1 : 0);
        for (size_t l = 0; l < problem.lengths.size(); ++l) {
          const int64_t length = problem.lengths[l];
          const int64_t prefix = problem.num_prefix_tokens;
          const acc_t* cls_grad = cls ? token_grads + (l * per_layer) * padded_dim : nullptr;
          acc_t* average_grad =
              average ? token_grads + (l * per_layer + (cls ? 1 : 0)) * padded_dim : nullptr;
          if (average) {
            const acc_t patches = static_cast<acc_t>(length - prefix);
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) average_grad[d] /= patches;
          }
          in_t* out_layer = grad_out[l] + b * length * dim;
          for (int64_t row = 0; row < length; ++row) {
            in_t* out = out_layer + row * dim;
            const bool from_cls = cls && row == 0;
            const bool from_average = average && row >= prefix;
            if (from_cls && from_average) {
#pragma omp simd
              for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<in_t>(cls_grad[d] + average_grad[d]);
            } else if (from_cls || from_average) {
              const acc_t* source = from_cls ? cls_grad : average_grad;
#pragma omp simd
              for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<in_t>(source[d]);
            } else {
              std::fill(out, out + dim, static_cast<in_t>(0));
            }
          }
        }
      }
    }
  }

  // dw = sum of the chunk partials, in chunk order.
  acc_t* grad_weight_data = grad_weight.data_ptr<acc_t>();
#pragma omp parallel for num_threads(worker_count(heads, num_chunks * dim)) schedule(static)
  for (int64_t h = 0; h < heads; ++h) {
    acc_t* out = grad_weight_data + h * dim;
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      const acc_t* partial = weight_partials.get() + (chunk * padded_heads + h) * padded_dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) out[d] += partial[d];
    }
  }
  return {grad_layers, grad_weight};
}

std::tuple<std::vector<at::Tensor>, at::Tensor> fused_pool_backward_cpu(
    const at::Tensor& grad_pooled, const std::optional<at::Tensor>& grad_attention,
    at::TensorList layers, const at::Tensor& score_weight, const at::Tensor& pooled,
    const at::Tensor& attention, const at::Tensor& mean, const at::Tensor& rstd,
    c10::string_view tokens, int64_t num_prefix_tokens, bool layers_need_grad,
    c10::string_view normalize) {
  const bool layernorm = parse_layernorm(std::string(normalize));
  const PoolProblem problem =
      check_backward_args(grad_pooled, grad_attention, layers, score_weight, pooled, attention,
                          mean, rstd, std::string(tokens), num_prefix_tokens, c10::DeviceType::CPU);
  std::tuple<std::vector<at::Tensor>, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, problem.layer_dtype,
                                  "fused_pool_backward_cpu", [&] {
    result = backward_typed<scalar_t>(problem, grad_pooled, grad_attention, layers, score_weight,
                                      pooled, attention, mean, rstd, layers_need_grad, layernorm);
  });
  return result;
}

}  // namespace

// Registered by csrc/library/cpu_dispatch.cpp, which picks the variant this CPU runs.
c10::KernelFunction backward_kernel() {
  return c10::KernelFunction::makeFromUnboxedFunction(TORCH_FN(fused_pool_backward_cpu));
}

}  // namespace FASTFUSE_CPU_VARIANT
}  // namespace cpu
}  // namespace fastfuse
