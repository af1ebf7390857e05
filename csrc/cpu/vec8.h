// 8-lane float vectors (GCC/Clang vector extensions) shared by the CPU kernels that reduce dot products
// 8 at a time (csrc/cpu/paged.cpp decode attention, csrc/cpu/gemm.cpp). No torch headers.
#pragma once
#include <cstdint>

#include "cpu/simd.h"

namespace reasonrl {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#if defined(__clang__)
#define RR_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define RR_SHUF(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

// out[t] = sum of the 8 lanes of a[t]: pairwise sums, then pairs of pairs, then halves.
RR_INLINE v8 sum8(const v8* a) {
  v8 x0 = RR_SHUF(a[0], a[1], 0, 8, 2, 10, 4, 12, 6, 14) + RR_SHUF(a[0], a[1], 1, 9, 3, 11, 5, 13, 7, 15);
  v8 x1 = RR_SHUF(a[2], a[3], 0, 8, 2, 10, 4, 12, 6, 14) + RR_SHUF(a[2], a[3], 1, 9, 3, 11, 5, 13, 7, 15);
  v8 x2 = RR_SHUF(a[4], a[5], 0, 8, 2, 10, 4, 12, 6, 14) + RR_SHUF(a[4], a[5], 1, 9, 3, 11, 5, 13, 7, 15);
  v8 x3 = RR_SHUF(a[6], a[7], 0, 8, 2, 10, 4, 12, 6, 14) + RR_SHUF(a[6], a[7], 1, 9, 3, 11, 5, 13, 7, 15);
  // x0 = [a0 01, a1 01, a0 23, a1 23, a0 45, a1 45, a0 67, a1 67] (lane pairs summed)
  v8 y0 = RR_SHUF(x0, x1, 0, 1, 8, 9, 4, 5, 12, 13) + RR_SHUF(x0, x1, 2, 3, 10, 11, 6, 7, 14, 15);
  v8 y1 = RR_SHUF(x2, x3, 0, 1, 8, 9, 4, 5, 12, 13) + RR_SHUF(x2, x3, 2, 3, 10, 11, 6, 7, 14, 15);
  // y0 = [a0..a3 lanes 0-3, a0..a3 lanes 4-7]
  return RR_SHUF(y0, y1, 0, 1, 2, 3, 8, 9, 10, 11) + RR_SHUF(y0, y1, 4, 5, 6, 7, 12, 13, 14, 15);
}

}  // namespace reasonrl
