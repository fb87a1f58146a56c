// fastfuse::cuda_launch_plan: the CUDA host planner (csrc/common/launch_plan.h) asked from
// Python, with or without a GPU: fastfuse/backends/cuda.py states its limits with it and
// tests/test_cuda_launch_plan.py checks the plans for the shapes users run.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

#include "common/launch_plan.h"

namespace fastfuse {
namespace cuda {
namespace {

// Ints, in this order (fastfuse/backends/cuda.py names them): forward tile_tokens, head_tile,
// bytes; backward tile_tokens, weight_grad_in_shared, bytes (tile_tokens 0: nothing fits); the
// minimum bytes for D, H and the dtype; padded_dim, chunk width; kMaxLayers, kThreads; the
// backward's head_tile.
std::vector<int64_t> cuda_launch_plan(int64_t element_bytes, int64_t dim, int64_t heads, int64_t num_tokens,
                                      bool average, bool layers_need_grad, int64_t shared_per_block_optin,
                                      int64_t shared_per_multiprocessor) {
  TORCH_CHECK(element_bytes == 2 || element_bytes == 4 || element_bytes == 8,
              "fastfuse: element_bytes must be 2, 4 or 8, got ", element_bytes);
  TORCH_CHECK(dim >= 1 && dim <= (int64_t(1) << 25) && heads >= 1 && heads <= (int64_t(1) << 20) &&
                  num_tokens >= 0 && num_tokens < (int64_t(1) << 31),
              "fastfuse: cuda_launch_plan needs 1 <= D <= 2^25, 1 <= H <= 2^20, 0 <= N < 2^31, got D = ",
              dim, ", H = ", heads, ", N = ", num_tokens);
  TORCH_CHECK(shared_per_block_optin > 0 && shared_per_multiprocessor > 0,
              "fastfuse: the shared-memory limits must be positive");
  const int bytes = static_cast<int>(element_bytes);
  const PlanInput input{bytes, dim, heads, num_tokens, average, layers_need_grad};
  const SharedMemoryLimits limits = shared_memory_limits(shared_per_block_optin, shared_per_multiprocessor);
  const ForwardPlan forward = plan_forward(input, limits);
  const BackwardPlan backward = plan_backward(input, limits);
  return {forward.tile_tokens, forward.head_tile, forward.bytes,
          backward.tile_tokens, backward.weight_grad_in_shared, backward.bytes,
          min_shared_memory_bytes(bytes, dim, heads), padded_dim_of(input), chunk_width(bytes),
          kMaxLayers, kThreads, backward.head_tile};
}

}  // namespace

// A query, not a tensor op: declared here because it describes this library's kernels and
// exists exactly when the library is loaded.
TORCH_LIBRARY_FRAGMENT(fastfuse, m) {
  m.def("cuda_launch_plan(int element_bytes, int dim, int heads, int num_tokens, bool average, "
        "bool layers_need_grad, int shared_per_block_optin, int shared_per_multiprocessor) -> int[]",
        &cuda_launch_plan);
}

}  // namespace cuda
}  // namespace fastfuse
