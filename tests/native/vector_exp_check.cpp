// Checks csrc/cpu/vector_exp.h against the C library's expf on every `stride`-th float of
// [-110, 89] (both signs), through the vector path (exp_shifted on whole blocks) and the scalar
// path (exp_via_double). Prints one JSON line; tests/test_vector_exp.py judges it.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/vector_exp.h"

namespace {
int64_t ulps_apart(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b) ? 0 : INT64_MAX;
  int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  return std::llabs(static_cast<int64_t>(ia) - ib);  // same sign here: exp > 0
}
}  // namespace

int main(int argc, char** argv) {
  const uint32_t stride = argc > 1 ? static_cast<uint32_t>(std::atoi(argv[1])) : 1;
  constexpr int64_t kBlock = 4096;
  std::vector<float> in(kBlock), out(kBlock);
  int64_t checked = 0, differ = 0, worst = 0, scalar_vs_vector = 0;
  auto sweep = [&](uint32_t first, uint32_t last) {  // bit patterns, inclusive
    int64_t filled = 0;
    auto flush = [&] {
      fastfuse::cpu::exp_shifted(out.data(), in.data(), filled, 0.0f, 1.0f);
      for (int64_t i = 0; i < filled; ++i) {
        const int64_t apart = ulps_apart(out[i], std::exp(in[i]));
        differ += apart != 0;
        worst = apart > worst ? apart : worst;
        const float scalar = fastfuse::cpu::exp_via_double(in[i]);
        scalar_vs_vector += std::memcmp(&scalar, &out[i], 4) != 0;
      }
      checked += filled;
      filled = 0;
    };
    for (uint64_t bits = first; bits <= last; bits += stride) {
      const uint32_t pattern = static_cast<uint32_t>(bits);
      std::memcpy(&in[filled++], &pattern, 4);
      if (filled == kBlock) flush();
    }
    flush();
  };
  sweep(0x80000000u, 0xC2DC0000u);  // -0 down to -110
  sweep(0x00000000u, 0x42B20000u);  // 0 up to 89
  // Specials: -inf -> 0, inf -> inf, NaN -> NaN, underflow to 0, overflow to inf.
  // Twice over, so that 16-lane vectors see them too.
  const float specials[16] = {-INFINITY, INFINITY, NAN, -1e30f, 1e30f, -104.0f, 89.0f, -0.0f,
                              -INFINITY, INFINITY, NAN, -1e30f, 1e30f, -104.0f, 89.0f, -0.0f};
  float special_out[16];
  fastfuse::cpu::exp_shifted(special_out, specials, 16, 0.0f, 1.0f);
  int special_wrong = 0;
  for (int i = 0; i < 16; ++i) special_wrong += ulps_apart(special_out[i], std::exp(specials[i])) != 0;
  std::printf("{\"checked\": %lld, \"differ\": %lld, \"worst_ulps\": %lld, \"scalar_vs_vector\": %lld, "
              "\"special_wrong\": %d}\n",
              static_cast<long long>(checked), static_cast<long long>(differ), static_cast<long long>(worst),
              static_cast<long long>(scalar_vs_vector), special_wrong);
  return 0;
}
