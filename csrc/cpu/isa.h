// Run-time x86 ISA checks for kernels compiled with target("arch=x86-64-v3" / "x86-64-v4") clones.
// GCC on x86-64 only (elsewhere both are false). libgcc's checks also cover the OS saving the AVX /
// AVX-512 register state. No torch headers.
#pragma once

namespace reasonrl {

// x86-64-v4's AVX-512 subsets.
inline bool cpu_x86_64_v4() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// x86-64-v3 (AVX2, FMA and the rest of the level).
inline bool cpu_x86_64_v3() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("movbe");
#else
  return false;
#endif
}

}  // namespace reasonrl
