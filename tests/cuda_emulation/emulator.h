// Runs CUDA kernels on the host, one block at a time, each CUDA thread a fiber (ucontext) with
// the semantics the kernels rely on: __syncthreads and __syncwarp are real barriers (a thread
// that skips one deadlocks, and the emulator says so), __shfl_xor_sync exchanges values across
// the 32 lanes of a warp, and between barriers the threads run in a random order, so a missing
// barrier shows up as a wrong or unstable result. Shared memory is filled with NaN before each
// block (an uninitialised read poisons the output) and guarded by a canary (an overflow aborts);
// 16-byte accesses check their alignment, as the GPU would fault.
//
// For tests/test_cuda_emulated.py only: it makes the kernels of csrc/cuda testable on a machine
// without a GPU. It is not a CUDA implementation: no memory model, no warp-synchronous timing.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__
#define __align__(n) alignas(n)

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct Dim3 { unsigned x = 1, y = 1, z = 1; };

using std::max;
using std::min;

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kCanaryBytes = 256;

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  Dim3 thread_idx;
  bool done = false;
  int waiting = 0;  // 0: runnable, 1: block barrier, 2: warp barrier
  uint64_t waiting_for = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  uint64_t block_generation = 0;
  int block_arrived = 0;
  std::vector<uint64_t> warp_generation;
  std::vector<int> warp_arrived;
  std::vector<double> exchange;  // [warp][parity][lane]
  std::vector<int> exchange_parity;  // per fiber: which buffer its next shuffle uses
  std::function<void()> body;
};

inline Block*& block() {
  static Block* current = nullptr;
  return current;
}
inline Dim3& block_idx() { static Dim3 value; return value; }
inline Dim3& block_dim() { static Dim3 value; return value; }
inline Dim3& grid_dim() { static Dim3 value; return value; }
inline std::mt19937& rng() { static std::mt19937 engine(12345); return engine; }
inline std::vector<unsigned char>& shared_memory() {
  static std::vector<unsigned char> memory;
  return memory;
}

inline Fiber& self() { return block()->fibers[block()->current]; }
inline int warp_of_self() { return block()->current / kWarpSize; }

inline void yield_to_scheduler() {
  Block* b = block();
  swapcontext(&b->fibers[b->current].context, &b->scheduler);
}

inline void syncthreads() {
  Block* b = block();
  Fiber& fiber = self();
  if (++b->block_arrived == static_cast<int>(b->fibers.size())) {
    b->block_arrived = 0;
    ++b->block_generation;
    return;
  }
  fiber.waiting = 1;
  fiber.waiting_for = b->block_generation;
  yield_to_scheduler();
}

inline void syncwarp() {
  Block* b = block();
  Fiber& fiber = self();
  const int warp = warp_of_self();
  if (++b->warp_arrived[warp] == kWarpSize) {
    b->warp_arrived[warp] = 0;
    ++b->warp_generation[warp];
    return;
  }
  fiber.waiting = 2;
  fiber.waiting_for = b->warp_generation[warp];
  yield_to_scheduler();
}

// Two exchange buffers used alternately: a lane writes buffer p for shuffle k only after it has
// read buffer p for shuffle k - 2, and every lane has passed shuffle k - 1's barrier by then.
template <typename T>
inline T shfl_xor(unsigned mask, T value, int offset) {
  if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask");
  Block* b = block();
  const int lane = b->current % kWarpSize, warp = warp_of_self();
  int& parity = b->exchange_parity[b->current];
  double* slots = b->exchange.data() + (warp * 2 + parity) * kWarpSize;
  slots[lane] = static_cast<double>(value);
  syncwarp();
  const T result = static_cast<T>(slots[lane ^ offset]);
  parity ^= 1;
  return result;
}

inline void fiber_entry() {
  Block* b = block();
  b->body();
  b->fibers[b->current].done = true;
  swapcontext(&b->fibers[b->current].context, &b->scheduler);
}

inline bool runnable(const Block& b, const Fiber& fiber, int index) {
  if (fiber.done) return false;
  if (fiber.waiting == 1) return b.block_generation != fiber.waiting_for;
  if (fiber.waiting == 2) return b.warp_generation[index / kWarpSize] != fiber.waiting_for;
  return true;
}

// Runs `kernel` (a callable taking no arguments) for every block of the grid, block after block.
template <typename Kernel>
void launch(Dim3 grid, Dim3 threads, size_t shared_bytes, Kernel kernel) {
  const int count = static_cast<int>(threads.x);
  if (count % kWarpSize != 0) fail("block size must be a multiple of 32");
  grid_dim() = grid;
  block_dim() = threads;
  for (unsigned block_index = 0; block_index < grid.x; ++block_index) {
    block_idx() = Dim3{block_index, 0, 0};
    std::vector<unsigned char>& memory = shared_memory();
    memory.assign(shared_bytes + kCanaryBytes, 0xff);  // 0xff..: NaN as float and as double
    for (size_t i = 0; i < kCanaryBytes; ++i) memory[shared_bytes + i] = static_cast<unsigned char>(0xa5 ^ i);

    Block b;
    b.fibers.resize(count);
    b.warp_generation.assign(count / kWarpSize, 0);
    b.warp_arrived.assign(count / kWarpSize, 0);
    b.exchange.assign(count / kWarpSize * 2 * kWarpSize, 0.0);
    b.exchange_parity.assign(count, 0);
    b.body = kernel;
    block() = &b;
    for (int t = 0; t < count; ++t) {
      Fiber& fiber = b.fibers[t];
      fiber.stack.resize(kStackBytes);
      fiber.thread_idx = Dim3{static_cast<unsigned>(t), 0, 0};
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack.data();
      fiber.context.uc_stack.ss_size = fiber.stack.size();
      fiber.context.uc_link = nullptr;
      makecontext(&fiber.context, fiber_entry, 0);
    }
    std::vector<int> order(count);
    for (int t = 0; t < count; ++t) order[t] = t;
    for (;;) {
      std::shuffle(order.begin(), order.end(), rng());
      bool progressed = false, all_done = true;
      for (int t : order) {
        Fiber& fiber = b.fibers[t];
        if (fiber.done) continue;
        all_done = false;
        if (!runnable(b, fiber, t)) continue;
        fiber.waiting = 0;
        b.current = t;
        swapcontext(&b.scheduler, &fiber.context);
        progressed = true;
      }
      if (all_done) break;
      if (!progressed) fail("deadlock: threads wait at a barrier that others never reach");
    }
    for (size_t i = 0; i < kCanaryBytes; ++i) {
      if (memory[shared_bytes + i] != static_cast<unsigned char>(0xa5 ^ i)) fail("shared memory overflow");
    }
    block() = nullptr;
  }
}

}  // namespace emu

#define threadIdx (::emu::self().thread_idx)
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define __syncthreads() ::emu::syncthreads()
#define __syncwarp(...) ::emu::syncwarp()
#define __shfl_xor_sync(mask, value, offset) ::emu::shfl_xor(mask, value, offset)
#define FASTFUSE_CHECK_ALIGNED(pointer, bytes)                                         \
  do {                                                                                 \
    if (reinterpret_cast<uintptr_t>(pointer) % (bytes) != 0) ::emu::fail("misaligned " #bytes "-byte access"); \
  } while (0)

template <typename T>
inline T __ldg(const T* pointer) {
  if constexpr (sizeof(T) == 16) FASTFUSE_CHECK_ALIGNED(pointer, 16);
  return *pointer;
}

namespace fastfuse {
namespace cuda {
// The block's dynamic shared memory (csrc/cuda/pool_tiles.cuh declares it on the GPU).
inline unsigned char* dynamic_shared_memory() { return ::emu::shared_memory().data(); }
}  // namespace cuda
}  // namespace fastfuse
