// CPU kernel of fastfuse::fused_gather_tokens (schema: fastfuse/backends/compiled_ops.py): the
// (B, N, D) stack of the gathered tokens (SPEC §2's gather: CLS rows, patch averages) in the
// compute dtype, every needed layer row read once and averaged on the fly, exactly as the pool
// kernels gather a tile (cpu_support.h: gather_tile, with gather_token's overflow fallback).
// The cpu backend's frozen-training path gathers with it before the fused op (fastfuse/ops.py),
// so the op's backward reads the small stack instead of the layers again.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <omp.h>

#include <numeric>
#include <string>
#include <vector>

#include "common/fused_pool_args.h"
#include "cpu/cpu_support.h"
#include "cpu/variant.h"

namespace fastfuse {
namespace cpu {
inline namespace FASTFUSE_CPU_VARIANT {  // csrc/cpu/variant.h
namespace {

template <typename in_t>
at::Tensor gather_typed(const PoolProblem& problem, at::TensorList layers) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t batch = problem.batch, dim = problem.dim, num_tokens = problem.num_tokens();
  at::Tensor stack = at::empty({batch, num_tokens, dim}, layers[0].options().dtype(problem.compute_dtype));
  if (stack.numel() == 0) return stack;
  advise_huge_pages(stack);
  const std::vector<LayerView<in_t>> views = layer_views<in_t>(layers);
  acc_t* out = stack.data_ptr<acc_t>();
  // Each sample reads at most every row of every layer once.
  const int64_t rows = std::accumulate(problem.lengths.begin(), problem.lengths.end(), int64_t(0));
  const int workers = worker_count(batch, rows * dim);

  // Each sample's tokens as one tile of N rows, D apart: its (N, D) slice of the stack.
#pragma omp parallel for num_threads(workers) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    gather_tile(views, problem, b, 0, num_tokens, out + b * num_tokens * dim, dim);
  }
  return stack;
}

at::Tensor fused_gather_tokens_cpu(at::TensorList layers, c10::string_view tokens, int64_t num_prefix_tokens) {
  const PoolProblem problem =
      check_layer_args(layers, std::string(tokens), num_prefix_tokens, c10::DeviceType::CPU);
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, problem.layer_dtype,
                                  "fused_gather_tokens_cpu", [&] {
    result = gather_typed<scalar_t>(problem, layers);
  });
  return result;
}

}  // namespace

// Registered by csrc/library/cpu_dispatch.cpp, which picks the variant this CPU runs.
c10::KernelFunction gather_kernel() {
  return c10::KernelFunction::makeFromUnboxedFunction(TORCH_FN(fused_gather_tokens_cpu));
}

}  // namespace FASTFUSE_CPU_VARIANT
}  // namespace cpu
}  // namespace fastfuse
