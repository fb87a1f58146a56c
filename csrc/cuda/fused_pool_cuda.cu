// CUDA implementations of fastfuse::fused_pool_forward / fused_pool_backward (schemas:
// fastfuse/backends/compiled_ops.py; math: SPEC §2; kernels: csrc/cuda/pool_kernels.cuh).
// This file checks the arguments (csrc/common/fused_pool_args.h, shared with the CPU kernels),
// describes the layers to the kernels, asks the planner (csrc/common/launch_plan.h, shared with
// the emulation and the Python query) for the tiles that fit this GPU's shared memory and
// launches on the current stream.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/fused_pool_args.h"
#include "common/launch_plan.h"
#include "cuda/pool_kernels.cuh"

namespace fastfuse {
namespace cuda {
namespace {


int spec_code(TokenSpec spec) {
  switch (spec) {
    case TokenSpec::kCls: return kSpecCls;
    case TokenSpec::kAp: return kSpecAp;
    case TokenSpec::kClsAp: return kSpecClsAp;
    default: return kSpecAll;
  }
}

template <typename scalar_t>
GatherArgs make_gather_args(const PoolProblem& problem, at::TensorList layers) {
  TORCH_CHECK(static_cast<int64_t>(layers.size()) <= kMaxLayers, "fastfuse: the cuda backend reads at most ",
              kMaxLayers, " layers per call, got ", layers.size(), " (use backend='triton' or 'torch')");
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(problem.num_tokens() <= kIntMax && problem.dim <= kIntMax / 64,
              "fastfuse: the cuda backend needs N < 2^31 and D < 2^25, got N = ",
              problem.num_tokens(), ", D = ", problem.dim);
  GatherArgs args{};
  args.num_layers = static_cast<int32_t>(layers.size());
  args.spec = spec_code(problem.spec);
  args.num_prefix_tokens = static_cast<int32_t>(problem.num_prefix_tokens);
  args.num_tokens = static_cast<int32_t>(problem.num_tokens());
  args.dim = static_cast<int32_t>(problem.dim);
  args.padded_dim = round_up_to(args.dim, ChunkOf<scalar_t>::kWidth);
  int64_t first_token = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    const at::Tensor& layer = layers[l];
    TORCH_CHECK(layer.size(1) <= kIntMax, "fastfuse: layers[", l, "] has more than 2^31 tokens");
    LayerArgs& view = args.layers[l];
    view.data = layer.data_ptr();
    view.stride_batch = layer.stride(0);
    view.stride_row = layer.stride(1);
    view.stride_dim = layer.stride(2);
    view.length = static_cast<int32_t>(layer.size(1));
    view.first_token = static_cast<int32_t>(first_token);
    if (problem.spec == TokenSpec::kAll) first_token += layer.size(1);
    if (can_load_vectors(sizeof(scalar_t), problem.dim, view.stride_batch, view.stride_row,
                         view.stride_dim, reinterpret_cast<uintptr_t>(view.data))) {
      args.vector_loads |= uint64_t(1) << l;
    }
  }
  return args;
}

// (ATen/cuda/CUDAContext.h would give the device properties, but it pulls in the cuBLAS and
// cuSPARSE headers, which a bare nvcc install lacks; the attributes are cheap to query.)
int device_attribute(cudaDeviceAttr attribute) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, c10::cuda::current_device()));
  return value;
}

SharedMemoryLimits current_shared_memory_limits() {
  return shared_memory_limits(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin),
                              device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor));
}

PlanInput plan_input(const PoolProblem& problem, bool layers_need_grad) {
  return {static_cast<int>(c10::elementSize(problem.layer_dtype)), problem.dim, problem.heads,
          problem.num_tokens(), reads_average(problem.spec), layers_need_grad};
}

template <typename kernel_t>
void allow_shared_memory(kernel_t kernel, int64_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

ForwardPlan checked_forward_plan(const PoolProblem& problem) {
  const PlanInput input = plan_input(problem, false);
  const SharedMemoryLimits limits = current_shared_memory_limits();
  const ForwardPlan plan = plan_forward(input, limits);
  TORCH_CHECK(plan.tile_tokens > 0, "fastfuse: D = ", problem.dim, " is too large for the cuda backend's "
              "shared-memory tiles on this GPU (a tile of 8 tokens and 4 heads needs ",
              forward_bytes(input, kTileQuantum, kHeadQuantum), " bytes, the GPU allows ", limits.maximum,
              " per block); use backend='triton'");
  return plan;
}

// The gathered tokens of every sample, (B, N, D) in acc_t (gather_tokens_kernel).
template <typename scalar_t, typename acc_t>
at::Tensor gather_stack(const PoolProblem& problem, const GatherArgs& args, const at::TensorOptions& options) {
  const int64_t num_tokens = problem.num_tokens();
  at::Tensor stack = at::empty({problem.batch, num_tokens, problem.dim}, options);
  const PlanInput input = plan_input(problem, false);
  // The pass holds what token_moments holds (a tile and the averaging scratch): its tiles.
  const int tile_tokens = plan_moments(input, current_shared_memory_limits());
  TORCH_CHECK(tile_tokens > 0, "fastfuse: D = ", problem.dim, " is too large for the cuda backend's "
              "gather tiles on this GPU; use backend='triton'");
  const int64_t bytes = moments_bytes(input, tile_tokens);
  auto kernel = gather_tokens_kernel<scalar_t, acc_t>;
  allow_shared_memory(kernel, bytes);
  kernel<<<static_cast<unsigned>(problem.batch), kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      args, tile_tokens, stack.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return stack;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_typed(
    const PoolProblem& problem, at::TensorList layers, const at::Tensor& score_weight_in, double eps,
    bool layernorm) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = problem.batch, heads = problem.heads;
  auto [pooled, attention, mean, rstd] = allocate_forward_outputs(problem, layers[0]);
  if (batch == 0) return {pooled, attention, mean, rstd};

  const GatherArgs args = make_gather_args<scalar_t>(problem, layers);
  const at::Tensor score_weight = score_weight_in.contiguous();
  const ForwardPlan plan = checked_forward_plan(problem);
  const int head_tiles = ceil_div(static_cast<int>(heads), plan.head_tile);
  if (head_tiles > 1 && problem.spec != TokenSpec::kAll) {
    // Each block of heads would gather the sample's tokens again (patch averages: every row
    // of every layer): gather once into a (B, N, D) stack in acc_t, then pool over it.
    const at::Tensor stack = gather_stack<scalar_t, acc_t>(problem, args, layers[0].options().dtype(problem.compute_dtype));
    const std::vector<at::Tensor> stacked{stack};
    return forward_typed<acc_t>(check_forward_args(stacked, score_weight_in, "all", 0, c10::DeviceType::CUDA),
                                stacked, score_weight_in, eps, layernorm);
  }
  const int64_t blocks = batch * head_tiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fastfuse: B x head tiles = ", blocks,
              " exceeds the CUDA grid limit");

  auto kernel = fused_pool_forward_kernel<scalar_t, acc_t>;
  allow_shared_memory(kernel, plan.bytes);
  kernel<<<static_cast<unsigned>(blocks), kThreads, plan.bytes, c10::cuda::getCurrentCUDAStream()>>>(
      args, score_weight.data_ptr<acc_t>(), static_cast<int>(heads), plan.head_tile,
      plan.tile_tokens, static_cast<acc_t>(eps), layernorm, pooled.data_ptr<acc_t>(),
      attention.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {pooled, attention, mean, rstd};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

BackwardPlan checked_backward_plan(const PoolProblem& problem, bool layers_need_grad) {
  const PlanInput input = plan_input(problem, layers_need_grad);
  const SharedMemoryLimits limits = current_shared_memory_limits();
  const BackwardPlan plan = plan_backward(input, limits);
  TORCH_CHECK(plan.tile_tokens > 0, "fastfuse: D = ", problem.dim, " and H = ", problem.heads,
              " are too large for the cuda backend's backward tiles on this GPU (a tile of 8 tokens "
              "needs ", backward_bytes(input, kTileQuantum, false), " bytes of shared memory, the GPU "
              "allows ", limits.maximum, " per block); use backend='triton'");
  return plan;
}

template <typename scalar_t>
std::tuple<std::vector<at::Tensor>, at::Tensor> backward_typed(
    const PoolProblem& problem, const at::Tensor& grad_pooled_in,
    const std::optional<at::Tensor>& grad_attention_in, at::TensorList layers,
    const at::Tensor& score_weight_in, const at::Tensor& pooled_in, const at::Tensor& attention_in,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, bool layers_need_grad, bool layernorm) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = problem.batch, dim = problem.dim, heads = problem.heads;

  auto [grad_layers, grad_weight] = allocate_backward_outputs(problem, layers, score_weight_in, layers_need_grad);
  if (batch == 0) return {grad_layers, grad_weight};

  const GatherArgs args = make_gather_args<scalar_t>(problem, layers);
  GradArgs grads{};
  for (size_t l = 0; l < grad_layers.size(); ++l) {
    grads.data[l] = grad_layers[l].data_ptr();
    if (can_store_vectors(sizeof(scalar_t), dim, reinterpret_cast<uintptr_t>(grads.data[l]))) {
      grads.vector_stores |= uint64_t(1) << l;
    }
  }
  const at::Tensor score_weight = score_weight_in.contiguous();
  const auto [grad_pooled, grad_attention, pooled, attention, mean, rstd] = contiguous_backward_inputs(
      grad_pooled_in, grad_attention_in, pooled_in, attention_in, mean_in, rstd_in);
  const BackwardPlan plan = checked_backward_plan(problem, layers_need_grad);
  auto kernel = layers_need_grad ? fused_pool_backward_kernel<scalar_t, acc_t, true>
                                 : fused_pool_backward_kernel<scalar_t, acc_t, false>;
  allow_shared_memory(kernel, plan.bytes);
  // About one resident wave of blocks (each loops over a contiguous range of samples and
  // keeps one dw partial per head tile), never more ranges than samples: backward_grid.
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, plan.bytes));
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const int head_tiles = ceil_div(static_cast<int>(heads), plan.head_tile);
  const BackwardGrid grid = backward_grid(batch, std::max(1, blocks_per_sm) * sms, head_tiles);
  const int padded_heads = round_up_to(plan.head_tile, kHeadQuantum);
  at::Tensor weight_partials = at::empty({grid.blocks, padded_heads, args.padded_dim}, score_weight.options());

  const auto stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<grid.blocks, kThreads, plan.bytes, stream>>>(
      args, grads, score_weight.data_ptr<acc_t>(), grad_pooled.data_ptr<acc_t>(),
      grad_attention ? grad_attention->data_ptr<acc_t>() : nullptr, pooled.data_ptr<acc_t>(),
      attention.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), batch,
      static_cast<int>(heads), plan.head_tile, plan.tile_tokens, plan.weight_grad_in_shared, layernorm,
      weight_partials.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t reduce_blocks = (heads * dim + kThreads - 1) / kThreads;
  weight_grad_reduce_kernel<acc_t><<<static_cast<unsigned>(reduce_blocks), kThreads, 0, stream>>>(
      weight_partials.data_ptr<acc_t>(), grid.ranges, static_cast<int>(heads), static_cast<int>(dim),
      plan.head_tile, padded_heads, args.padded_dim, grad_weight.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_layers, grad_weight};
}

// ---------------------------------------------------------------------------------------------
// Op entry points
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_pool_forward_cuda(
    at::TensorList layers, const at::Tensor& score_weight, c10::string_view tokens,
    int64_t num_prefix_tokens, double eps, c10::string_view normalize) {
  const bool layernorm = parse_layernorm(std::string(normalize));
  const PoolProblem problem = check_forward_args(layers, score_weight, std::string(tokens),
                                                 num_prefix_tokens, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(layers[0].device());
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, problem.layer_dtype,
                                  "fused_pool_forward_cuda", [&] {
    result = forward_typed<scalar_t>(problem, layers, score_weight, eps, layernorm);
  });
  return result;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> fused_pool_backward_cuda(
    const at::Tensor& grad_pooled, const std::optional<at::Tensor>& grad_attention,
    at::TensorList layers, const at::Tensor& score_weight, const at::Tensor& pooled,
    const at::Tensor& attention, const at::Tensor& mean, const at::Tensor& rstd,
    c10::string_view tokens, int64_t num_prefix_tokens, bool layers_need_grad,
    c10::string_view normalize) {
  const bool layernorm = parse_layernorm(std::string(normalize));
  const PoolProblem problem =
      check_backward_args(grad_pooled, grad_attention, layers, score_weight, pooled, attention,
                          mean, rstd, std::string(tokens), num_prefix_tokens, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(layers[0].device());
  std::tuple<std::vector<at::Tensor>, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, problem.layer_dtype,
                                  "fused_pool_backward_cuda", [&] {
    result = backward_typed<scalar_t>(problem, grad_pooled, grad_attention, layers, score_weight,
                                      pooled, attention, mean, rstd, layers_need_grad, layernorm);
  });
  return result;
}

// ---------------------------------------------------------------------------------------------
// token_moments
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> moments_typed(const PoolProblem& problem, at::TensorList layers) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = problem.batch, dim = problem.dim, num_tokens = problem.num_tokens();
  const auto options = layers[0].options().dtype(problem.compute_dtype);
  at::Tensor mean = at::empty({dim}, options), var = at::empty({dim}, options);
  if (batch * num_tokens == 0) {  // no token: undefined moments
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  const GatherArgs args = make_gather_args<scalar_t>(problem, layers);
  const PlanInput input = plan_input(problem, false);
  const int tile_tokens = plan_moments(input, current_shared_memory_limits());
  TORCH_CHECK(tile_tokens > 0, "fastfuse: D = ", dim, " is too large for the cuda backend's "
              "token_moments tiles on this GPU (", moments_bytes(input, kTileQuantum), " bytes of "
              "shared memory per block); use backend='triton'");
  auto bytes = [&](int tile) { return moments_bytes(input, tile); };
  auto kernel = token_moments_kernel<scalar_t, acc_t>;
  allow_shared_memory(kernel, bytes(tile_tokens));
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, bytes(tile_tokens)));
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const int blocks = static_cast<int>(std::min<int64_t>(batch, std::max(1, blocks_per_sm) * sms));
  at::Tensor partials = at::empty({blocks, 2, args.padded_dim}, options);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<blocks, kThreads, bytes(tile_tokens), stream>>>(args, batch, tile_tokens,
                                                           partials.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const unsigned reduce_blocks = static_cast<unsigned>((dim + kThreads - 1) / kThreads);
  token_moments_reduce_kernel<acc_t><<<reduce_blocks, kThreads, 0, stream>>>(
      partials.data_ptr<acc_t>(), blocks, batch, static_cast<int>(num_tokens), static_cast<int>(dim),
      args.padded_dim, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> fused_token_moments_cuda(at::TensorList layers,
                                                            c10::string_view tokens,
                                                            int64_t num_prefix_tokens) {
  const PoolProblem problem =
      check_layer_args(layers, std::string(tokens), num_prefix_tokens, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(layers[0].device());
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, problem.layer_dtype,
                                  "fused_token_moments_cuda", [&] {
    result = moments_typed<scalar_t>(problem, layers);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfuse, CUDA, m) {
  m.impl("fused_pool_forward", &fused_pool_forward_cuda);
  m.impl("fused_pool_backward", &fused_pool_backward_cuda);
  m.impl("fused_token_moments", &fused_token_moments_cuda);
}

}  // namespace cuda
}  // namespace fastfuse
