// Runs the forward, backward and dw-reduce kernels of csrc/cuda under the emulator
// (emulator.h) for one case described by tests/test_cuda_emulated.py:
//
//   run_kernels CONFIG INPUT OUTPUT
//
// CONFIG (text): dtype(0 float32, 1 float64, 2 float16, 3 bfloat16) B D H spec(0 cls, 1 ap,
//   2 cls+ap, 3 all) num_prefix_tokens eps tile_tokens head_tile layers_need_grad
//   weight_grad_in_shared backward_blocks has_grad_attention seed layernorm storage_length L
//   plan_optin plan_per_sm backward_head_tile, then per layer: T stride_batch stride_row
//   stride_dim offset (elements into the storage). backward_blocks: the backward's ranges of
//   samples; backward_head_tile: heads per backward block (0: all). plan_optin > 0: the tile
//   sizes come from the host planner (csrc/common/launch_plan.h) for a GPU with these
//   shared-memory limits instead of the config; the plan used is printed ("plan TILE HEAD_TILE
//   BACKWARD_TILE DW_IN_SHARED BACKWARD_HEAD_TILE").
// INPUT (float64): storage, score_weight (H, D), grad_pooled (B, H, D), grad_attention (B, H, N).
// OUTPUT (float64): pooled, attention, mean, rstd, the layers' gradients (if wanted), dw, then
//   token_moments' mean and var (D each; backward_blocks blocks, tiles of the forward's size),
//   then the gather pass's (B, N, D) stack. The forward runs over that stack when its heads are
//   tiled on a gathered spec, as fused_pool_cuda.cu does.
#define FASTFUSE_CUDA_EMULATION
#include <cstdint>
// Token bytes the kernels load (csrc/cuda/pool_tiles.cuh), printed per launch for the traffic
// model's check (tests/test_traffic_cuda.py). The emulator runs one fiber at a time.
static int64_t token_bytes_loaded = 0;
#define FASTFUSE_COUNT_TOKEN_LOAD(bytes) (token_bytes_loaded += (bytes))
#include "emulator.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "cuda/pool_kernels.cuh"

using namespace fastfuse::cuda;

struct Config {
  int dtype, batch, dim, heads, spec, prefix;
  double eps;
  int tile_tokens, head_tile, layers_need_grad, weight_grad_in_shared, backward_blocks;
  int has_grad_attention, seed, layernorm;
  int64_t storage_length;
  int num_layers;
  int64_t plan_optin, plan_per_sm;  // > 0: tiles from the host planner for these limits
  int backward_head_tile;           // 0: all heads
  std::vector<int64_t> length, stride_batch, stride_row, stride_dim, offset;
};

template <typename T>
std::vector<T> read_doubles(std::ifstream& in, int64_t count) {
  std::vector<double> raw(count);
  in.read(reinterpret_cast<char*>(raw.data()), count * sizeof(double));
  if (!in) emu::fail("input file too short");
  std::vector<T> values(count);
  for (int64_t i = 0; i < count; ++i) values[i] = static_cast<T>(raw[i]);
  return values;
}

template <typename T>
void write_doubles(std::ofstream& out, const std::vector<T>& values) {
  for (const T& value : values) {
    const double raw = static_cast<double>(value);
    out.write(reinterpret_cast<const char*>(&raw), sizeof raw);
  }
}

template <typename scalar_t>
int run(const Config& config, std::ifstream& in, std::ofstream& out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int batch = config.batch, dim = config.dim, heads = config.heads;
  const bool cls = config.spec == kSpecCls || config.spec == kSpecClsAp;
  const bool average = config.spec == kSpecAp || config.spec == kSpecClsAp;

  std::vector<scalar_t> storage = read_doubles<scalar_t>(in, config.storage_length);
  std::vector<acc_t> weight = read_doubles<acc_t>(in, int64_t(heads) * dim);

  GatherArgs args{};
  args.num_layers = config.num_layers;
  args.spec = config.spec;
  args.num_prefix_tokens = config.spec == kSpecAll ? 0 : config.prefix;
  args.dim = dim;
  args.padded_dim = padded_dim_of({static_cast<int>(sizeof(scalar_t)), dim, heads, 1, false, false});
  int num_tokens = 0;
  for (int l = 0; l < config.num_layers; ++l) {
    LayerArgs& view = args.layers[l];
    view.data = storage.data() + config.offset[l];
    view.stride_batch = config.stride_batch[l];
    view.stride_row = config.stride_row[l];
    view.stride_dim = config.stride_dim[l];
    view.length = static_cast<int32_t>(config.length[l]);
    view.first_token = num_tokens;
    num_tokens += config.spec == kSpecAll ? view.length : (cls ? 1 : 0) + (average ? 1 : 0);
    if (can_load_vectors(sizeof(scalar_t), dim, view.stride_batch, view.stride_row, view.stride_dim,
                         reinterpret_cast<uintptr_t>(view.data))) {
      args.vector_loads |= uint64_t(1) << l;
    }
  }
  args.num_tokens = num_tokens;
  std::vector<acc_t> grad_pooled = read_doubles<acc_t>(in, int64_t(batch) * heads * dim);
  std::vector<acc_t> grad_attention;
  if (config.has_grad_attention) grad_attention = read_doubles<acc_t>(in, int64_t(batch) * heads * num_tokens);

  const int padded_dim = args.padded_dim;
  // The tiles: the caller's, or (plan_optin > 0) the host planner's for a GPU with these limits.
  const PlanInput input{static_cast<int>(sizeof(scalar_t)), dim, heads, num_tokens, average,
                        config.layers_need_grad != 0};
  int tile_tokens = config.tile_tokens, head_tile = config.head_tile;
  int backward_tile_tokens = config.tile_tokens;
  bool weight_grad_in_shared = config.weight_grad_in_shared != 0;
  int backward_head_tile = config.backward_head_tile > 0 ? config.backward_head_tile : heads;
  if (config.plan_optin > 0) {
    const SharedMemoryLimits limits = shared_memory_limits(config.plan_optin, config.plan_per_sm);
    const ForwardPlan forward = plan_forward(input, limits);
    const BackwardPlan backward = plan_backward(input, limits);
    if (forward.tile_tokens == 0 || backward.tile_tokens == 0) emu::fail("no plan fits these limits");
    tile_tokens = forward.tile_tokens, head_tile = forward.head_tile;
    backward_tile_tokens = backward.tile_tokens, weight_grad_in_shared = backward.weight_grad_in_shared;
    backward_head_tile = backward.head_tile;
  }
  std::printf("plan %d %d %d %d %d\n", tile_tokens, head_tile, backward_tile_tokens, int(weight_grad_in_shared),
              backward_head_tile);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  std::vector<acc_t> pooled(int64_t(batch) * heads * dim, nan), attention(int64_t(batch) * heads * num_tokens, nan);
  std::vector<acc_t> mean(int64_t(batch) * num_tokens, nan), rstd(int64_t(batch) * num_tokens, nan);

  // The gather pass: every sample's gathered tokens into a (B, N, D) stack in acc_t.
  const int gather_tile_tokens = config.plan_optin > 0
      ? plan_moments(input, shared_memory_limits(config.plan_optin, config.plan_per_sm))
      : tile_tokens;
  if (gather_tile_tokens == 0) emu::fail("no gather tile fits these limits");
  std::vector<acc_t> stack(int64_t(batch) * num_tokens * dim, nan);
  emu::launch(Dim3{unsigned(batch)}, Dim3{unsigned(kThreads)}, moments_bytes(input, gather_tile_tokens), [&] {
    gather_tokens_kernel<scalar_t, acc_t>(args, gather_tile_tokens, stack.data());
  });
  std::printf("token_bytes gather %lld\n", static_cast<long long>(token_bytes_loaded));
  token_bytes_loaded = 0;

  // Forward, as fused_pool_cuda.cu runs it: with heads tiled over blocks on a gathered spec,
  // over the stack ("all" tokens in acc_t, its own plan), else straight on the layers.
  const int head_tiles = ceil_div(heads, head_tile);
  if (head_tiles > 1 && config.spec != kSpecAll) {
    GatherArgs stack_args{};
    stack_args.num_layers = 1;
    stack_args.spec = kSpecAll;
    stack_args.num_tokens = num_tokens;
    stack_args.dim = dim;
    const PlanInput stack_input{static_cast<int>(sizeof(acc_t)), dim, heads, num_tokens, false, false};
    stack_args.padded_dim = padded_dim_of(stack_input);
    LayerArgs& view = stack_args.layers[0];
    view.data = stack.data();
    view.stride_batch = int64_t(num_tokens) * dim, view.stride_row = dim, view.stride_dim = 1;
    view.length = num_tokens;
    if (can_load_vectors(sizeof(acc_t), dim, view.stride_batch, view.stride_row, 1,
                         reinterpret_cast<uintptr_t>(view.data))) {
      stack_args.vector_loads = 1;
    }
    int stack_tile = tile_tokens, stack_head_tile = head_tile;
    if (config.plan_optin > 0) {
      const ForwardPlan plan = plan_forward(stack_input, shared_memory_limits(config.plan_optin, config.plan_per_sm));
      stack_tile = plan.tile_tokens, stack_head_tile = plan.head_tile;
    }
    std::printf("stack_plan %d %d\n", stack_tile, stack_head_tile);
    emu::launch(Dim3{unsigned(batch * ceil_div(heads, stack_head_tile))}, Dim3{unsigned(kThreads)},
                forward_bytes(stack_input, stack_tile, stack_head_tile), [&] {
      fused_pool_forward_kernel<acc_t, acc_t>(stack_args, weight.data(), heads, stack_head_tile, stack_tile,
                                              static_cast<acc_t>(config.eps), config.layernorm != 0,
                                              pooled.data(), attention.data(), mean.data(), rstd.data());
    });
  } else {
    emu::launch(Dim3{unsigned(batch * head_tiles)}, Dim3{unsigned(kThreads)},
                forward_bytes(input, tile_tokens, head_tile), [&] {
      fused_pool_forward_kernel<scalar_t, acc_t>(args, weight.data(), heads, head_tile,
                                                 tile_tokens, static_cast<acc_t>(config.eps), config.layernorm != 0,
                                                 pooled.data(), attention.data(), mean.data(), rstd.data());
    });
  }
  std::printf("token_bytes forward %lld\n", static_cast<long long>(token_bytes_loaded));
  token_bytes_loaded = 0;

  // Backward, on the forward's outputs.
  GradArgs grads{};
  std::vector<std::vector<scalar_t>> grad_layers;
  if (config.layers_need_grad) {
    for (int l = 0; l < config.num_layers; ++l) {
      grad_layers.emplace_back(int64_t(batch) * config.length[l] * dim, static_cast<scalar_t>(nan));
    }
    for (int l = 0; l < config.num_layers; ++l) {
      grads.data[l] = grad_layers[l].data();
      if (can_store_vectors(sizeof(scalar_t), dim, reinterpret_cast<uintptr_t>(grads.data[l]))) {
        grads.vector_stores |= uint64_t(1) << l;
      }
    }
  }
  // The grid as fused_pool_cuda.cu forms it, with config.backward_blocks x head tiles resident.
  const int backward_head_tiles = ceil_div(heads, backward_head_tile);
  const BackwardGrid grid = backward_grid(batch, int64_t(config.backward_blocks) * backward_head_tiles,
                                          backward_head_tiles);
  const int blocks = grid.ranges;  // token_moments below splits the batch as the ranges do
  const int padded_heads = round_up_to(backward_head_tile, kHeadQuantum);
  std::vector<acc_t> partials(int64_t(grid.blocks) * padded_heads * padded_dim, nan);
  std::vector<acc_t> grad_weight(int64_t(heads) * dim, nan);
  const size_t shared_backward = backward_bytes(input, backward_tile_tokens, weight_grad_in_shared,
                                                backward_head_tile);
  emu::launch(Dim3{unsigned(grid.blocks)}, Dim3{unsigned(kThreads)}, shared_backward, [&] {
    auto kernel = config.layers_need_grad ? fused_pool_backward_kernel<scalar_t, acc_t, true>
                                          : fused_pool_backward_kernel<scalar_t, acc_t, false>;
    kernel(args, grads, weight.data(), grad_pooled.data(),
           config.has_grad_attention ? grad_attention.data() : nullptr, pooled.data(), attention.data(),
           mean.data(), rstd.data(), batch, heads, backward_head_tile, backward_tile_tokens,
           weight_grad_in_shared, config.layernorm != 0, partials.data());
  });
  std::printf("token_bytes backward %lld\n", static_cast<long long>(token_bytes_loaded));
  token_bytes_loaded = 0;
  emu::launch(Dim3{unsigned(ceil_div(heads * dim, kThreads))}, Dim3{unsigned(kThreads)}, 0, [&] {
    weight_grad_reduce_kernel<acc_t>(partials.data(), grid.ranges, heads, dim, backward_head_tile, padded_heads,
                                     padded_dim, grad_weight.data());
  });

  // token_moments over the same layers.
  std::vector<acc_t> moment_partials(int64_t(blocks) * 2 * padded_dim, nan);
  std::vector<acc_t> moments_mean(dim, nan), moments_var(dim, nan);
  const int moments_tile = config.plan_optin > 0
      ? plan_moments(input, shared_memory_limits(config.plan_optin, config.plan_per_sm))
      : tile_tokens;
  if (moments_tile == 0) emu::fail("no token_moments tile fits these limits");
  emu::launch(Dim3{unsigned(blocks)}, Dim3{unsigned(kThreads)}, moments_bytes(input, moments_tile), [&] {
    token_moments_kernel<scalar_t, acc_t>(args, batch, moments_tile, moment_partials.data());
  });
  emu::launch(Dim3{unsigned(ceil_div(dim, kThreads))}, Dim3{unsigned(kThreads)}, 0, [&] {
    token_moments_reduce_kernel<acc_t>(moment_partials.data(), blocks, batch, num_tokens, dim,
                                       padded_dim, moments_mean.data(), moments_var.data());
  });

  write_doubles(out, pooled);
  write_doubles(out, attention);
  write_doubles(out, mean);
  write_doubles(out, rstd);
  for (const auto& grad : grad_layers) write_doubles(out, grad);
  write_doubles(out, grad_weight);
  write_doubles(out, moments_mean);
  write_doubles(out, moments_var);
  write_doubles(out, stack);
  return out ? 0 : 1;
}

int main(int argc, char** argv) {
  if (argc != 4) emu::fail("usage: run_kernels CONFIG INPUT OUTPUT");
  std::ifstream text(argv[1]);
  Config c;
  text >> c.dtype >> c.batch >> c.dim >> c.heads >> c.spec >> c.prefix >> c.eps >> c.tile_tokens >>
      c.head_tile >> c.layers_need_grad >> c.weight_grad_in_shared >> c.backward_blocks >>
      c.has_grad_attention >> c.seed >> c.layernorm >> c.storage_length >> c.num_layers >>
      c.plan_optin >> c.plan_per_sm >> c.backward_head_tile;
  if (!text || c.num_layers < 1 || c.num_layers > kMaxLayers) emu::fail("bad config");
  for (int l = 0; l < c.num_layers; ++l) {
    int64_t length, sb, sr, sd, offset;
    text >> length >> sb >> sr >> sd >> offset;
    c.length.push_back(length), c.stride_batch.push_back(sb), c.stride_row.push_back(sr);
    c.stride_dim.push_back(sd), c.offset.push_back(offset);
  }
  if (!text) emu::fail("bad layer config");
  emu::rng().seed(c.seed);
  std::ifstream in(argv[2], std::ios::binary);
  std::ofstream out(argv[3], std::ios::binary);
  switch (c.dtype) {
    case 0: return run<float>(c, in, out);
    case 1: return run<double>(c, in, out);
    case 2: return run<c10::Half>(c, in, out);
    case 3: return run<c10::BFloat16>(c, in, out);
  }
  emu::fail("bad dtype");
}
