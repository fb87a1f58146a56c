// exp for the CPU forward's softmax, many values at a time. glibc's expf is one call per value
// (3-5 ns each on the 2-core development machine); the forward takes two exps per head and
// token, which made the softmax loops about a tenth of its time at N = 197.
//
// Float values are computed in double: x = k ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor
// polynomial to degree 11 (relative error < 1e-13), times 2^k, then rounded once to float.
// That is the correctly rounded float except where exp(x) lies within ~1e-13 of a rounding
// midpoint: against glibc's expf, 1 value in ~13,000 differs, by 1 ulp (every float in
// [-110, 89] checked). Overflow gives inf, underflow 0 (through float subnormals), NaN stays
// NaN. The AVX-512 and AVX2 variants run 8 / 4 doubles per vector with the same operations as
// the scalar form, which serves the tails and the baseline variant. Double values use std::exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "cpu/variant.h"

namespace fastfuse {
namespace cpu {
inline namespace FASTFUSE_CPU_VARIANT {  // csrc/cpu/variant.h

namespace exp_constants {
constexpr double kLowest = -200.0;  // exp(-200) rounds to 0 in float
constexpr double kHighest = 200.0;  // exp(200) rounds to inf in float
constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52: x + kShifter rounds x to an integer
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2High = 0.6931471805599453;     // ln 2 = kLn2High + kLn2Low
constexpr double kLn2Low = 2.3190468138462996e-17;
// 1/j! for j = 11 down to 0 (Horner order).
constexpr double kTaylor[12] = {1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
                                1.0 / 5040.0,     1.0 / 720.0,     1.0 / 120.0,    1.0 / 24.0,
                                1.0 / 6.0,        0.5,             1.0,            1.0};
}  // namespace exp_constants

// The operations exp_lanes needs, on one double (below: on a vector of them). Written as plain
// expressions, a * b + c becomes one fused multiply-add where the ISA has one, as the vector
// forms' fmadd, so that scalar tails and vector lanes give the same bits.
struct ScalarDoubles {
  using V = double;
  static V set(double value) { return value; }
  static V fmadd(V a, V b, V c) { return a * b + c; }
  static V fnmadd(V a, V b, V c) { return c - a * b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V clamp(V x, V low, V high) { return x < low ? low : (x > high ? high : x); }  // NaN stays
  static V power_of_two(V shifted) {  // 2^k, k held in the low bits of shifted (see exp_lanes)
    int64_t bits;
    std::memcpy(&bits, &shifted, sizeof bits);
    bits = (bits + 1023) << 52;
    double scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return scale;
  }
};

// exp(x) for doubles holding float values: x = k ln2 + r, then exp(r) * 2^k.
template <typename Ops>
inline typename Ops::V exp_lanes(typename Ops::V x) {
  namespace c = exp_constants;
  x = Ops::clamp(x, Ops::set(c::kLowest), Ops::set(c::kHighest));
  const typename Ops::V shifted = Ops::fmadd(x, Ops::set(c::kLog2e), Ops::set(c::kShifter));
  const typename Ops::V k = Ops::sub(shifted, Ops::set(c::kShifter));  // round(x / ln2)
  typename Ops::V r = Ops::fnmadd(k, Ops::set(c::kLn2High), x);
  r = Ops::fnmadd(k, Ops::set(c::kLn2Low), r);
  typename Ops::V p = Ops::set(c::kTaylor[0]);
  for (int j = 1; j < 12; ++j) p = Ops::fmadd(p, r, Ops::set(c::kTaylor[j]));
  return Ops::mul(p, Ops::power_of_two(shifted));
}

// exp(value), as described above, one value.
inline float exp_via_double(float value) {
  return static_cast<float>(exp_lanes<ScalarDoubles>(static_cast<double>(value)));
}

// The same operations on 8 (AVX-512) or 4 (AVX2) doubles. max/min return their second operand
// when one is NaN, so clamp keeps NaN as the scalar form does.
#if defined(__AVX512F__) && defined(__AVX512DQ__)
struct VectorDoubles {
  using V = __m512d;
  static V set(double value) { return _mm512_set1_pd(value); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_pd(a, b, c); }
  static V sub(V a, V b) { return _mm512_sub_pd(a, b); }
  static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  static V clamp(V x, V low, V high) { return _mm512_min_pd(high, _mm512_max_pd(low, x)); }
  static V power_of_two(V shifted) {
    const __m512i bits = _mm512_add_epi64(_mm512_castpd_si512(shifted), _mm512_set1_epi64(1023));
    return _mm512_castsi512_pd(_mm512_slli_epi64(bits, 52));
  }
};
constexpr int64_t kExpLanes = 16;
// out[0..16) = exp(in[0..16) - shift) * factor
inline void exp_vector(float* out, const float* in, float shift, float factor) {
  const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(in), _mm512_set1_ps(shift));
  const __m256 low = _mm512_cvtpd_ps(exp_lanes<VectorDoubles>(_mm512_cvtps_pd(_mm512_castps512_ps256(x))));
  const __m256 high = _mm512_cvtpd_ps(exp_lanes<VectorDoubles>(_mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1))));
  const __m512 both = _mm512_insertf32x8(_mm512_castps256_ps512(low), high, 1);
  _mm512_storeu_ps(out, _mm512_mul_ps(both, _mm512_set1_ps(factor)));
}
#elif defined(__AVX2__) && defined(__FMA__)
struct VectorDoubles {
  using V = __m256d;
  static V set(double value) { return _mm256_set1_pd(value); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_pd(a, b, c); }
  static V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V clamp(V x, V low, V high) { return _mm256_min_pd(high, _mm256_max_pd(low, x)); }
  static V power_of_two(V shifted) {
    const __m256i bits = _mm256_add_epi64(_mm256_castpd_si256(shifted), _mm256_set1_epi64x(1023));
    return _mm256_castsi256_pd(_mm256_slli_epi64(bits, 52));
  }
};
constexpr int64_t kExpLanes = 8;
// out[0..8) = exp(in[0..8) - shift) * factor
inline void exp_vector(float* out, const float* in, float shift, float factor) {
  const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(in), _mm256_set1_ps(shift));
  const __m128 low = _mm256_cvtpd_ps(exp_lanes<VectorDoubles>(_mm256_cvtps_pd(_mm256_castps256_ps128(x))));
  const __m128 high = _mm256_cvtpd_ps(exp_lanes<VectorDoubles>(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1))));
  const __m256 both = _mm256_insertf128_ps(_mm256_castps128_ps256(low), high, 1);
  _mm256_storeu_ps(out, _mm256_mul_ps(both, _mm256_set1_ps(factor)));
}
#endif  // else no vector form: exp_via_double value by value

// out[j] = exp(in[j] - shift) * factor for j < count (out may be in). The product by factor
// rounds once, as `exp(...) * factor` does.
inline void exp_shifted(float* out, const float* in, int64_t count, float shift, float factor) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; j + kExpLanes <= count; j += kExpLanes) exp_vector(out + j, in + j, shift, factor);
#endif
  for (; j < count; ++j) out[j] = exp_via_double(in[j] - shift) * factor;
}

inline void exp_shifted(double* out, const double* in, int64_t count, double shift, double factor) {
  for (int64_t j = 0; j < count; ++j) out[j] = std::exp(in[j] - shift) * factor;
}

}  // namespace FASTFUSE_CPU_VARIANT
}  // namespace cpu
}  // namespace fastfuse
