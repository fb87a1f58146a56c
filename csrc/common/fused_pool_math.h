// Per-element arithmetic of the fused attentive pool (SPEC §2), shared by the CPU kernels
// (csrc/cpu) and the CUDA kernels (csrc/cuda). Scalar, header-only, no ATen: every function
// here compiles for host and device, so both backends round the same way.
#pragma once

#include <float.h>
#include <math.h>

#ifdef __CUDACC__
#define FASTFUSE_HOST_DEVICE __host__ __device__
#else
#define FASTFUSE_HOST_DEVICE
#endif

namespace fastfuse {
namespace math {

FASTFUSE_HOST_DEVICE inline float exp_of(float value) { return ::expf(value); }
FASTFUSE_HOST_DEVICE inline double exp_of(double value) { return ::exp(value); }
FASTFUSE_HOST_DEVICE inline float sqrt_of(float value) { return ::sqrtf(value); }
FASTFUSE_HOST_DEVICE inline double sqrt_of(double value) { return ::sqrt(value); }
FASTFUSE_HOST_DEVICE inline float frexp_of(float value, int* exponent) { return ::frexpf(value, exponent); }
FASTFUSE_HOST_DEVICE inline double frexp_of(double value, int* exponent) { return ::frexp(value, exponent); }
FASTFUSE_HOST_DEVICE inline float ldexp_of(float value, int exponent) { return ::ldexpf(value, exponent); }
FASTFUSE_HOST_DEVICE inline double ldexp_of(double value, int exponent) { return ::ldexp(value, exponent); }
FASTFUSE_HOST_DEVICE inline float largest_finite(float) { return FLT_MAX; }
FASTFUSE_HOST_DEVICE inline double largest_finite(double) { return DBL_MAX; }
FASTFUSE_HOST_DEVICE inline float smallest_normal(float) { return FLT_MIN; }
FASTFUSE_HOST_DEVICE inline double smallest_normal(double) { return DBL_MIN; }

// ---- LayerNorm without affine: xh = (x - mean) * rstd -----------------------------------

// rstd from the sum of squared deviations from the mean (two-pass variance, biased).
template <typename T>
FASTFUSE_HOST_DEVICE inline T layernorm_rstd(T centered_sum_of_squares, T count, T eps) {
  return T(1) / sqrt_of(centered_sum_of_squares / count + eps);
}

// ---- Statistics robust to the token's magnitude (issue 12 item 7) -------------------------
// A token whose largest magnitude `peak` exceeds 1 is divided by the power of two
// 2^floor(log2 peak) before its sum and squares are formed, so they cannot overflow (a float32
// token of magnitude 1e20 has squares of 1e40). Dividing by a power of two is exact, so
// wherever the unscaled statistics are finite the scaled ones are the same bits; tokens with
// peak <= 1 (and non-finite peaks, whose statistics are NaN anyway) keep scale 1. Callers form
// sum(x * inverse) and sum((x * inverse - mean_s)^2), then mean = mean_s * scale and
// rstd = scaled_layernorm_rstd(...) / scale (the pure-PyTorch statement: backends/pytorch.py).

template <typename T>
FASTFUSE_HOST_DEVICE inline T token_scale(T peak) {
  if (!(peak > T(1)) || !(peak <= largest_finite(T(0)))) return T(1);
  int exponent = 0;
  frexp_of(peak, &exponent);  // peak = m * 2^exponent, m in [0.5, 1)
  return ldexp_of(T(1), exponent - 1);
}

// rstd of the scaled token from its centred sum of squares. eps scales with the squares
// (eps / scale^2); once that underflows, a constant huge token would get 1/sqrt(0): the
// smallest normal number keeps it finite. With scale 1 this is layernorm_rstd, bit for bit.
template <typename T>
FASTFUSE_HOST_DEVICE inline T scaled_layernorm_rstd(T centered_sum_of_squares, T count, T eps,
                                                    T scale) {
  T denominator = centered_sum_of_squares / count + eps / scale / scale;
  if (scale > T(1) && denominator < smallest_normal(T(0))) denominator = smallest_normal(T(0));
  return T(1) / sqrt_of(denominator);
}

template <typename T>
FASTFUSE_HOST_DEVICE inline T layernorm_normalize(T value, T mean, T rstd) {
  return (value - mean) * rstd;
}

// ---- Online (streaming) softmax over the tokens ----------------------------------------
// Per head the kernel keeps a running maximum m and a running sum l of exp(s - m); the
// weighted accumulator is kept relative to the same m.

template <typename T>
FASTFUSE_HOST_DEVICE inline T softmax_initial_max() {
  return -T(INFINITY);
}

// Folds a block of scores whose maximum is block_max into (running_max, running_sum).
// Returns the factor by which the running sum (already applied) and the caller's
// accumulator must be scaled: 1 when the maximum did not grow, 0 for the first block.
template <typename T>
FASTFUSE_HOST_DEVICE inline T online_softmax_rescale(T& running_max, T& running_sum, T block_max) {
  if (!(block_max > running_max)) return T(1);
  const T scale = exp_of(running_max - block_max);  // exp(-inf) = 0 on the first block
  running_max = block_max;
  running_sum *= scale;
  return scale;
}

// Weight of one score relative to the running maximum; the caller adds it to the running sum.
template <typename T>
FASTFUSE_HOST_DEVICE inline T softmax_numerator(T score, T running_max) {
  return exp_of(score - running_max);
}

// 1 / l, or 0 for an empty token set (no token: the pooled vector is 0, not NaN).
template <typename T>
FASTFUSE_HOST_DEVICE inline T softmax_inverse_sum(T running_sum) {
  return running_sum > T(0) ? T(1) / running_sum : T(0);
}

// Final attention weight a = exp(s - m) / l from a raw score and the final statistics.
template <typename T>
FASTFUSE_HOST_DEVICE inline T softmax_final(T score, T final_max, T inverse_sum) {
  return exp_of(score - final_max) * inverse_sum;
}

// ---- Backward (SPEC §2) ------------------------------------------------------------------

// ds_hn = a_hn * (g_h . xh_n + gA_hn - c_h), with c_h = g_h . z_h + sum_n a_hn gA_hn.
template <typename T>
FASTFUSE_HOST_DEVICE inline T score_grad(T attention, T grad_dot_token, T grad_attention,
                                         T baseline) {
  return attention * (grad_dot_token + grad_attention - baseline);
}

// dx = rstd * (dxh - mean_d(dxh) - xh * mean_d(dxh * xh)) (normalize="none": dx = dxh).
template <typename T>
FASTFUSE_HOST_DEVICE inline T layernorm_input_grad(T grad_normalized, T normalized,
                                                   T mean_grad, T mean_grad_dot_normalized,
                                                   T rstd) {
  return rstd * (grad_normalized - mean_grad - normalized * mean_grad_dot_normalized);
}

// ---- token_moments: Chan's merge of two partial (count, mean, M2) per channel -------------
// M2 is the sum of squared deviations from the partial's own mean; merging never squares a
// raw value, so the variance keeps its digits when |mean| >> std.
template <typename T>
FASTFUSE_HOST_DEVICE inline void merge_moments(T& mean, T& m2, T count, T other_mean, T other_m2,
                                               T other_count) {
  const T total = count + other_count;
  if (!(other_count > T(0))) return;
  const T delta = other_mean - mean;
  const T weight = other_count / total;
  mean += delta * weight;
  m2 += other_m2 + delta * delta * count * weight;
}

}  // namespace math
}  // namespace fastfuse
