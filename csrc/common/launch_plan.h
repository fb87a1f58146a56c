// What the host decides before launching the CUDA kernels, stated once: the kernels' argument
// layout, the shared-memory footprint of a tile, the tile sizes that fit a GPU's shared memory,
// and when 16-byte loads and stores are allowed. Plain C++ (no ATen, no CUDA runtime), so that
// the CUDA host code (csrc/cuda/fused_pool_cuda.cu), the kernels (csrc/cuda/*.cuh), the CPU
// emulation of the kernels (tests/cuda_emulation) and the query that Python asks
// (fastfuse::cuda_launch_plan, csrc/library/queries.cpp) all use the same rules; the GPU only
// supplies its two shared-memory limits.
#pragma once

#include <algorithm>
#include <cstdint>

#ifndef FASTFUSE_HOST_DEVICE
#ifdef __CUDACC__
#define FASTFUSE_HOST_DEVICE __host__ __device__
#else
#define FASTFUSE_HOST_DEVICE
#endif
#endif

namespace fastfuse {
namespace cuda {

constexpr int kThreads = 256;
// Layer descriptors travel as kernel arguments (no host-to-device copy per call); 64 layers
// keep the backward's arguments under the classic 4 KiB limit (checked below).
constexpr int kMaxLayers = 64;
// Tiles hold a multiple of 8 tokens (the dxh product works on 8 tokens per thread) and at
// most 32 (the softmax update gives each token of a tile one lane of a warp).
constexpr int kTileQuantum = 8;
constexpr int kMaxTileTokens = 32;
// Head tiles of the forward and the dw rows are padded to whole 4-head micro-tiles.
constexpr int kHeadQuantum = 4;

FASTFUSE_HOST_DEVICE constexpr int ceil_div(int value, int divisor) {
  return (value + divisor - 1) / divisor;
}
FASTFUSE_HOST_DEVICE constexpr int round_up_to(int value, int multiple) {
  return ceil_div(value, multiple) * multiple;
}
constexpr int64_t round_up_to(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// ---- argument layout ------------------------------------------------------------------------

struct LayerArgs {
  const void* data;
  int64_t stride_batch, stride_row, stride_dim;
  int32_t length;       // T_l
  int32_t first_token;  // "all": the gathered index of the layer's row 0
};

// Everything the kernels need to find gathered token n of sample b.
struct GatherArgs {
  LayerArgs layers[kMaxLayers];
  uint64_t vector_loads;  // bit l: layer l is read with 16-byte loads
  int32_t num_layers;
  int32_t spec;           // SpecCode
  int32_t num_prefix_tokens;
  int32_t num_tokens;     // N
  int32_t dim;            // D
  int32_t padded_dim;     // D rounded up to ChunkOf<scalar_t>::kWidth
};

// The backward's outputs: one contiguous (B, T_l, D) gradient per layer.
struct GradArgs {
  void* data[kMaxLayers];
  uint64_t vector_stores;  // bit l: 16-byte stores into layer l's gradient
};

// Where the tokens of the current tile come from, resolved once per tile (so the hot loops
// never index the kernel-argument arrays). tile_tokens of them open the shared memory.
struct TokenSlot {
  const void* source;  // sample b's row, or the first averaged row (num_prefix_tokens)
  void* grad;          // backward: row 0 of sample b in the layer's gradient
  int64_t stride_row, stride_dim;
  int32_t rows;        // rows to average (1 for a single row)
  int32_t row;         // the row, or kAverageRow
  int32_t length;      // T_l
  int32_t flags;       // kSlotVectorLoad | kSlotVectorStore | kSlotAverage
};

// The layouts the footprint formulas and the 4 KiB kernel-parameter limit assume (64-bit
// pointers): a changed struct must change these on purpose.
static_assert(sizeof(LayerArgs) == 40, "LayerArgs layout changed");
static_assert(sizeof(TokenSlot) == 48, "TokenSlot layout changed: shared-memory footprint changes");
static_assert(sizeof(TokenSlot) % 16 == 0, "slots must keep the tile after them 16-byte aligned");
// The backward kernel's parameters: GatherArgs, GradArgs, 8 pointers, an int64 and 6 ints.
static_assert(sizeof(GatherArgs) + sizeof(GradArgs) + 8 * sizeof(void*) + 8 + 6 * 4 <= 4096,
              "kernel arguments exceed the classic 4 KiB parameter limit");

FASTFUSE_HOST_DEVICE constexpr int slot_bytes(int tile_tokens) {
  return round_up_to(tile_tokens * static_cast<int>(sizeof(TokenSlot)), 32);
}

// A row is read in chunks of kWidth elements: one or two 16-byte loads when the layer allows
// it, element by element through stride_dim otherwise. kWidth >= 4 so that a chunk lands in
// shared memory as whole 4-element quads.
constexpr int elements_per_load(int element_bytes) { return 16 / element_bytes; }
constexpr int chunk_width(int element_bytes) {
  return elements_per_load(element_bytes) >= 4 ? elements_per_load(element_bytes) : 4;
}
template <typename scalar_t>
struct ChunkOf {
  static constexpr int kPerLoad = elements_per_load(static_cast<int>(sizeof(scalar_t)));
  static constexpr int kWidth = chunk_width(static_cast<int>(sizeof(scalar_t)));
  static constexpr int kLoads = kWidth / kPerLoad;
};
// float64 layers accumulate in float64, every other dtype in float32.
constexpr int accumulator_bytes(int element_bytes) { return element_bytes == 8 ? 8 : 4; }

// ---- alignment ------------------------------------------------------------------------------

// 16-byte loads need every chunk start of every row aligned: unit stride along D, D a
// multiple of the chunk, the other strides multiples of one load and the data 16-byte aligned.
constexpr bool can_load_vectors(int element_bytes, int64_t dim, int64_t stride_batch,
                                int64_t stride_row, int64_t stride_dim, uintptr_t address) {
  const int per_load = elements_per_load(element_bytes);
  return stride_dim == 1 && dim % chunk_width(element_bytes) == 0 && stride_row % per_load == 0 &&
         stride_batch % per_load == 0 && address % 16 == 0;
}
// Gradients are contiguous (B, T_l, D): rows start at multiples of D.
constexpr bool can_store_vectors(int element_bytes, int64_t dim, uintptr_t address) {
  return dim % chunk_width(element_bytes) == 0 && address % 16 == 0;
}

// ---- shared memory --------------------------------------------------------------------------

// Scratch for averaging one token with the whole block: `groups` row groups x padded_dim.
FASTFUSE_HOST_DEVICE constexpr int average_groups(int padded_dim, int chunk) {
  return padded_dim / chunk >= kThreads ? 1 : kThreads / (padded_dim / chunk);
}

// Footprints in acc_t elements after the token slots, in the order the kernels carve them.
FASTFUSE_HOST_DEVICE constexpr int64_t forward_shared_elements(int tile_tokens, int padded_heads,
                                                               int padded_dim, int partial) {
  return int64_t(tile_tokens) * padded_dim          // tile
         + int64_t(padded_heads) * padded_dim       // pooled accumulators
         + 2 * int64_t(padded_heads) * tile_tokens  // scores, weights (transposed)
         + 4 * int64_t(padded_heads)                // running max, running sum, rescale, spare
         + partial;
}

FASTFUSE_HOST_DEVICE constexpr int64_t backward_shared_elements(int tile_tokens, int padded_heads,
                                                                int padded_dim, int partial,
                                                                bool layers_need_grad,
                                                                bool weight_grad_in_shared) {
  return int64_t(tile_tokens) * padded_dim                             // xh tile
         + (layers_need_grad ? int64_t(tile_tokens) * padded_dim : 0)  // dxh tile
         + (weight_grad_in_shared ? int64_t(padded_heads) * padded_dim : 0)
         + 3 * int64_t(padded_heads) * tile_tokens  // [a; ds] per head, ds transposed
         + 4 * int64_t(padded_heads)                // baseline c_h, spare
         + partial;
}

// token_moments: the tile and the averaging scratch only.
FASTFUSE_HOST_DEVICE constexpr int64_t moments_shared_elements(int tile_tokens, int padded_dim,
                                                               int partial) {
  return int64_t(tile_tokens) * padded_dim + partial;
}

// What a GPU allows one block: `maximum` (the opt-in limit), `preferred` (half an SM less the
// 1 KiB that every resident block reserves on sm_80 / sm_90: two blocks per SM).
struct SharedMemoryLimits {
  int64_t preferred;
  int64_t maximum;
};
constexpr SharedMemoryLimits shared_memory_limits(int64_t per_block_optin, int64_t per_multiprocessor) {
  return {std::min(per_multiprocessor / 2 - 1024, per_block_optin), per_block_optin};
}

// ---- the plan -------------------------------------------------------------------------------

// A call, as far as the plan cares.
struct PlanInput {
  int element_bytes;       // of the layers' dtype: 2, 4 or 8
  int64_t dim, heads, num_tokens;
  bool average;            // the token spec reads "ap" tokens (needs the averaging scratch)
  bool layers_need_grad;   // the backward computes the layers' gradients
};

constexpr int padded_dim_of(const PlanInput& in) {
  return static_cast<int>(round_up_to(in.dim, int64_t(chunk_width(in.element_bytes))));
}
constexpr int average_scratch_elements(const PlanInput& in) {
  return in.average ? average_groups(padded_dim_of(in), chunk_width(in.element_bytes)) * padded_dim_of(in)
                    : 0;
}
constexpr int64_t forward_bytes(const PlanInput& in, int tile_tokens, int64_t head_tile) {
  return slot_bytes(tile_tokens) +
         accumulator_bytes(in.element_bytes) *
             forward_shared_elements(tile_tokens, static_cast<int>(round_up_to(head_tile, int64_t(kHeadQuantum))),
                                     padded_dim_of(in), average_scratch_elements(in));
}
// head_tile: the heads of one block (0: all H).
constexpr int64_t backward_bytes(const PlanInput& in, int tile_tokens, bool weight_grad_in_shared,
                                 int64_t head_tile = 0) {
  return slot_bytes(tile_tokens) +
         accumulator_bytes(in.element_bytes) *
             backward_shared_elements(tile_tokens,
                                      static_cast<int>(round_up_to(head_tile > 0 ? head_tile : in.heads,
                                                                   int64_t(kHeadQuantum))),
                                      padded_dim_of(in), average_scratch_elements(in),
                                      in.layers_need_grad, weight_grad_in_shared);
}

constexpr int64_t moments_bytes(const PlanInput& in, int tile_tokens) {
  return slot_bytes(tile_tokens) +
         accumulator_bytes(in.element_bytes) *
             moments_shared_elements(tile_tokens, padded_dim_of(in), average_scratch_elements(in));
}

// The smallest footprint the kernels can run with for D, H and the dtype, whatever the token
// spec and the gradients wanted: a backward tile of 8 tokens with the dxh buffer, the averaging
// scratch and dw in global memory (the forward's 8 tokens x 4 heads needs less).
constexpr int64_t min_shared_memory_bytes(int element_bytes, int64_t dim, int64_t heads) {
  const PlanInput worst{element_bytes, dim, heads, 1, true, true};
  return std::max(backward_bytes(worst, kTileQuantum, false),
                  forward_bytes(worst, kTileQuantum, std::min<int64_t>(heads, kHeadQuantum)));
}

// Tile sizes to try, largest first: the whole of a short N in one tile (rounded up to 8),
// else 32, then 16 and 8.
struct TileChoices {
  int sizes[3];
  int count;
};
constexpr TileChoices tile_choices(int64_t num_tokens) {
  const int cap = round_up_to(static_cast<int>(std::clamp<int64_t>(num_tokens, 1, kMaxTileTokens)), kTileQuantum);
  TileChoices choices{{cap, 0, 0}, 1};
  for (int tile_tokens : {16, 8}) {
    if (tile_tokens < cap) choices.sizes[choices.count++] = tile_tokens;
  }
  return choices;
}

// tile_tokens == 0: nothing fits this GPU.
struct ForwardPlan {
  int tile_tokens = 0;
  int head_tile = 0;  // heads per block; the grid has ceil(H / head_tile) blocks per sample
  int64_t bytes = 0;
};

// All heads in one block (the tokens are read once), the largest tile that fits, two blocks per
// SM if possible; else heads tiled over blocks: the most heads (a multiple of 4) beside a tile
// of 16 or 8 tokens.
constexpr ForwardPlan plan_forward(const PlanInput& in, const SharedMemoryLimits& limits) {
  const TileChoices choices = tile_choices(in.num_tokens);
  for (int64_t budget : {limits.preferred, limits.maximum}) {
    for (int i = 0; i < choices.count; ++i) {
      const int64_t bytes = forward_bytes(in, choices.sizes[i], in.heads);
      if (bytes <= budget) return {choices.sizes[i], static_cast<int>(in.heads), bytes};
    }
  }
  for (int64_t budget : {limits.preferred, limits.maximum}) {
    for (int tile_tokens : {std::min(16, choices.sizes[0]), kTileQuantum}) {
      int64_t head_tile = 0;
      while (head_tile + kHeadQuantum < in.heads && forward_bytes(in, tile_tokens, head_tile + kHeadQuantum) <= budget) {
        head_tile += kHeadQuantum;
      }
      if (head_tile >= kHeadQuantum) {
        return {tile_tokens, static_cast<int>(head_tile), forward_bytes(in, tile_tokens, head_tile)};
      }
    }
  }
  return {};
}

struct BackwardPlan {
  int tile_tokens = 0;
  bool weight_grad_in_shared = false;
  int64_t bytes = 0;
  int head_tile = 0;  // heads per block: H, or (dw only) a multiple of 4 whose dw fits in shared
};

// 1. dw in shared memory beside a tile of all heads: two blocks per SM first, then the largest
//    tile.
// 2. A dw-only backward (frozen tokens) whose (H, D) dw does not fit: heads tiled over blocks,
//    like the forward, each block keeping its heads' dw in shared memory. The largest tile
//    first, at one block per SM if need be (all of a short N in one tile spares the kernel
//    reading z, which at this many heads outweighs the tokens), then the most heads.
// 3. Else dw in the block's slice of the global partials, which every tile reads and writes
//    whole: the largest tile that fits (fewest passes), two blocks per SM if it allows.
constexpr BackwardPlan plan_backward(const PlanInput& in, const SharedMemoryLimits& limits) {
  const TileChoices choices = tile_choices(in.num_tokens);
  const int heads = static_cast<int>(in.heads);
  for (int64_t budget : {limits.preferred, limits.maximum}) {
    for (int i = 0; i < choices.count; ++i) {
      const int64_t bytes = backward_bytes(in, choices.sizes[i], true);
      if (bytes <= budget) return {choices.sizes[i], true, bytes, heads};
    }
  }
  if (!in.layers_need_grad) {
    for (int i = 0; i < choices.count; ++i) {
      for (int64_t budget : {limits.preferred, limits.maximum}) {
        const int tile_tokens = choices.sizes[i];
        int64_t head_tile = 0;
        while (head_tile + kHeadQuantum < in.heads &&
               backward_bytes(in, tile_tokens, true, head_tile + kHeadQuantum) <= budget) {
          head_tile += kHeadQuantum;
        }
        if (head_tile >= kHeadQuantum) {
          return {tile_tokens, true, backward_bytes(in, tile_tokens, true, head_tile), static_cast<int>(head_tile)};
        }
      }
    }
  }
  for (int i = 0; i < choices.count; ++i) {
    for (int64_t budget : {limits.preferred, limits.maximum}) {
      const int64_t bytes = backward_bytes(in, choices.sizes[i], false);
      if (bytes <= budget) return {choices.sizes[i], false, bytes, heads};
    }
  }
  return {};
}

// The backward's grid: `ranges` contiguous ranges of samples, each run by head_tiles adjacent
// blocks (so that the blocks of a range read the same tokens at about the same time, from L2):
// about as many blocks as are resident at once, never more ranges than samples.
struct BackwardGrid {
  int ranges;
  int blocks;
};
constexpr BackwardGrid backward_grid(int64_t batch, int64_t resident_blocks, int head_tiles) {
  const int64_t ranges = std::min<int64_t>(batch, std::max<int64_t>(1, resident_blocks / head_tiles));
  return {static_cast<int>(ranges), static_cast<int>(ranges * head_tiles)};
}

// token_moments: the largest tile that fits (0: none).
constexpr int plan_moments(const PlanInput& in, const SharedMemoryLimits& limits) {
  const TileChoices choices = tile_choices(in.num_tokens);
  for (int i = 0; i < choices.count; ++i) {
    if (moments_bytes(in, choices.sizes[i]) <= limits.maximum) return choices.sizes[i];
  }
  return 0;
}

// The plan of a ViT-B call on an A100 (sm_80: 163 KiB per block, 164 KiB per SM), as a
// compile-time check that the rules above stay usable.
static_assert(plan_forward({4, 768, 12, 197, false, false}, shared_memory_limits(166912, 167936)).tile_tokens > 0);
static_assert(plan_backward({4, 768, 12, 197, false, true}, shared_memory_limits(166912, 167936)).tile_tokens > 0);

}  // namespace cuda
}  // namespace fastfuse
