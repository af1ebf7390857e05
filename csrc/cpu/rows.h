// Row loops shared by the decode layers (csrc/cpu/paged.cpp) and the training kernels (csrc/cpu/fused.cpp).
// Float math; branch-free conversions, so the loops vectorize. No torch headers.
//   rms_row:  r = 1 / sqrt(mean(x^2) + eps); y = DY(w * DX(x * r)), rounded where models.RMSNorm rounds
//             (the normalized x in x's dtype, then the weight's product in y's dtype); returns r
//   rope_row: one token's H heads of D: y = DT([x1 c - x2 s, x2 c + x1 s]) with s = sign * sin (x's heads
//             x_head_stride apart, y's y_head_stride; y may be x)
//             (functional._rotate; sign -1: the inverse rotation)
#pragma once
#include <cmath>
#include <cstdint>

#include "cpu/simd.h"

namespace reasonrl {

template <DType DX, DType DW, DType DY>
RR_INLINE float rms_row(typename Elem<DY>::T* y, const typename Elem<DX>::T* x, const typename Elem<DW>::T* w,
                        int64_t n, float eps) {
  using EX = Elem<DX>;
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) {
    const float v = EX::load(x[i]);
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = Elem<DY>::store(Elem<DW>::load(w[i]) * EX::load(EX::store(EX::load(x[i]) * inv)));
  return inv;
}

template <DType DT>
RR_INLINE void rope_row(typename Elem<DT>::T* y, const typename Elem<DT>::T* x, const float* c, const float* s,
                        int64_t H, int64_t D, float sign, int64_t x_head_stride, int64_t y_head_stride) {
  using E = Elem<DT>;
  const int64_t half = D / 2;
  for (int64_t h = 0; h < H; ++h) {
    const auto* xr = x + h * x_head_stride;  // y may be x (in place): element i reads i and i + half,
    auto* yr = y + h * y_head_stride;        // then writes the same two

#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = E::load(xr[i]), x2 = E::load(xr[i + half]), sv = sign * s[i];
      yr[i] = E::store(x1 * c[i] - x2 * sv);
      yr[i + half] = E::store(x2 * c[i] + x1 * sv);
    }
  }
}

}  // namespace reasonrl
