// The CPU kernels' two blocked products alone (csrc/cpu/blocked_kernels.h), on one core, at the
// tile shape of the forward and backward: H = 12 heads x a tile of 32 tokens x D = 768, operands
// resident in cache. Prints GFLOP/s of block_dots (scores) and accumulate_rows (weighted sums),
// to set beside one-thread sgemm (python -c "import torch; torch.set_num_threads(1); ...").
//
//   g++ -O3 -fopenmp -march=x86-64-v4 -std=gnu++20 -DFASTFUSE_CPU_VARIANT=avx512 -Icsrc \
//       -I"$(python -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "include"))')" \
//       benchmarks/cpu_products.cpp -o /tmp/cpu_products && /tmp/cpu_products
//
// (-march=x86-64-v3 -DFASTFUSE_CPU_VARIANT=avx2 for the AVX2 variant; -fopenmp as in the build:
// without it the `omp simd` loops are not vectorised as the kernels are.)
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "cpu/blocked_kernels.h"

using fastfuse::cpu::accumulate_rows;
using fastfuse::cpu::block_dots;

int main(int argc, char** argv) {
  constexpr int64_t kHeads = 12, kTokens = 32, kDim = 768;
  const int iterations = argc > 1 ? std::atoi(argv[1]) : 20000;
  auto buffer = [](int64_t count, float value) {
    float* data = static_cast<float*>(std::aligned_alloc(64, count * sizeof(float)));
    for (int64_t i = 0; i < count; ++i) data[i] = value * static_cast<float>(i % 97);
    return data;
  };
  float* weight = buffer(kHeads * kDim, 1e-3f);
  float* tile = buffer(kTokens * kDim, 1e-3f);
  float* scores = buffer(kHeads * kTokens, 1e-3f);
  float* accumulator = buffer(kHeads * kDim, 0.0f);
  float* rescale = buffer(kHeads, 0.0f);
  for (int64_t h = 0; h < kHeads; ++h) rescale[h] = 0.999f;
  const double flops = 2.0 * kHeads * kTokens * kDim * iterations;
  using clock = std::chrono::steady_clock;
  for (int round = 0; round < 3; ++round) {
    const auto start = clock::now();
    for (int i = 0; i < iterations; ++i) block_dots(weight, kHeads, tile, kTokens, kDim, scores, kTokens);
    const auto middle = clock::now();
    for (int i = 0; i < iterations; ++i) {
      accumulate_rows(accumulator, kHeads, scores, kTokens, 1, tile, kTokens, kDim, rescale, false);
    }
    const auto end = clock::now();
    std::printf("block_dots %.1f GFLOP/s   accumulate_rows %.1f GFLOP/s   (checksum %g)\n",
                flops / std::chrono::duration<double>(middle - start).count() / 1e9,
                flops / std::chrono::duration<double>(end - middle).count() / 1e9,
                static_cast<double>(accumulator[5] + scores[3]));
  }
  return 0;
}
