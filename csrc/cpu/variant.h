// The CPU kernels are compiled once per instruction-set level (CMakeLists.txt: baseline
// x86-64-v2, avx2 = x86-64-v3, avx512 = x86-64-v4; one variant elsewhere or when
// FASTFUSE_CPU_ARCH is set). Everything the kernel sources define, and every inline helper of
// csrc/cpu they instantiate, lives in the namespace fastfuse::cpu::FASTFUSE_CPU_VARIANT, so the
// variants' copies never merge at link time; csrc/library/cpu_dispatch.cpp registers the op and
// calls the variant that this CPU runs.
#pragma once

#include <ATen/core/boxing/KernelFunction.h>

#ifndef FASTFUSE_CPU_VARIANT
#define FASTFUSE_CPU_VARIANT native
#endif

namespace fastfuse {
namespace cpu {
inline namespace FASTFUSE_CPU_VARIANT {

// The variant's kernels of fastfuse::fused_pool_forward / fused_pool_backward, for boxed calls
// (which keeps the dispatcher independent of the ops' signatures).
c10::KernelFunction forward_kernel();
c10::KernelFunction backward_kernel();

}  // namespace FASTFUSE_CPU_VARIANT
}  // namespace cpu
}  // namespace fastfuse
