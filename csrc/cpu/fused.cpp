// CPU kernels of the fused training family (csrc/fused.h): one pass over memory where PyTorch's ops make
// several, each pass allocating a full-size temporary. Why: in a tiny-model GRPO update on 2 cores
// (16 x 8 x 48 tokens, float32) the SwiGLU product's muls and silu_backward alone took 76 of 400 ms and
// the RoPE and RMSNorm ops another ~40 (profile, 2026-11-27): memory-bound passes over (T, I) tensors.
// Rounding follows the PyTorch ops the model would run (F.silu in the storage dtype, then the product;
// RMSNorm's normalized x in x's dtype before the weight), so results match them to float32 rounding.
// Built for AVX2 + FMA (x86-64-v3) and for baseline x86-64, picked once at run time; the loops are
// `omp simd` loops over elements with branch-free conversions, which GCC vectorizes.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/isa.h"
#include "cpu/rows.h"
#include "cpu/simd.h"
#include "fused.h"

namespace reasonrl {
namespace {

RR_INLINE float sigmoid(float g) { return 1.f / (1.f + simd::fast_exp(-g)); }

template <DType DX, DType DY>
RR_INLINE void rms_fwd_t(void* y_, float* rstd, const void* x_, const float* w, int64_t r0, int64_t r1, int64_t n,
                         float eps) {
  const auto* x = static_cast<const typename Elem<DX>::T*>(x_);
  auto* y = static_cast<typename Elem<DY>::T*>(y_);
  for (int64_t r = r0; r < r1; ++r) rstd[r] = rms_row<DX, DType::f32, DY>(y + r * n, x + r * n, w, n, eps);
}

template <DType DX, DType DG>
RR_INLINE void rms_bwd_t(void* dx_, float* dw, const void* g_, const void* x_, const float* w, const float* rstd,
                         int64_t r0, int64_t r1, int64_t n) {
  using EX = Elem<DX>;
  using EG = Elem<DG>;
  const auto* x = static_cast<const typename EX::T*>(x_);
  const auto* g = static_cast<const typename EG::T*>(g_);
  auto* dx = static_cast<typename EX::T*>(dx_);
  const float inv_n = 1.f / static_cast<float>(n);
  for (int64_t r = r0; r < r1; ++r) {
    const auto* xr = x + r * n;
    const auto* gr = g + r * n;
    auto* dr = dx + r * n;
    const float rs = rstd[r];
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < n; ++i) dot += EG::load(gr[i]) * w[i] * (EX::load(xr[i]) * rs);
    const float c = dot * inv_n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float gv = EG::load(gr[i]), xn = EX::load(xr[i]) * rs;
      dr[i] = EX::store(rs * (gv * w[i] - xn * c));
      dw[i] += gv * EX::load(EX::store(xn));
    }
  }
}

template <DType DT>
RR_INLINE void silu_mul_t(void* h_, const void* g_, const void* u_, int64_t e0, int64_t e1) {
  using E = Elem<DT>;
  using T = typename E::T;
  const T* g = static_cast<const T*>(g_);
  const T* u = static_cast<const T*>(u_);
  T* h = static_cast<T*>(h_);
#pragma omp simd
  for (int64_t i = e0; i < e1; ++i) {
    const float gv = E::load(g[i]);
    h[i] = E::store(E::load(E::store(gv * sigmoid(gv))) * E::load(u[i]));
  }
}

template <DType DT>
RR_INLINE void swiglu_bwd_t(void* h_, void* dg_, void* du_, const void* dh_, const void* g_, const void* u_,
                            int64_t e0, int64_t e1) {
  using E = Elem<DT>;
  using T = typename E::T;
  const T* dh = static_cast<const T*>(dh_);
  const T* g = static_cast<const T*>(g_);
  const T* u = static_cast<const T*>(u_);
  T* h = static_cast<T*>(h_);
  T* dg = static_cast<T*>(dg_);
  T* du = static_cast<T*>(du_);
#pragma omp simd
  for (int64_t i = e0; i < e1; ++i) {
    const float gv = E::load(g[i]), uv = E::load(u[i]), d = E::load(dh[i]);
    const float s = sigmoid(gv);
    const float a = E::load(E::store(gv * s));
    h[i] = E::store(a * uv);
    du[i] = E::store(d * a);
    dg[i] = E::store(d * uv * (s * (1.f + gv * (1.f - s))));
  }
}

template <DType DT>
RR_INLINE void rope_t(void* y_, const void* x_, const float* cos, const float* sin, int64_t t0, int64_t t1, int64_t H,
                      int64_t D, float sign) {
  using T = typename Elem<DT>::T;
  const T* x = static_cast<const T*>(x_);
  T* y = static_cast<T*>(y_);
  for (int64_t t = t0; t < t1; ++t) rope_row<DT>(y + t * H * D, x + t * H * D, cos + t * (D / 2), sin + t * (D / 2), H, D, sign);
}

template <DType DT>
RR_INLINE void scatter_rows_t(void* dx_, const void* g_, const int64_t* offsets, const int64_t* order, int64_t r0,
                              int64_t r1, int64_t n) {
  using E = Elem<DT>;
  using T = typename E::T;
  const T* g = static_cast<const T*>(g_);
  T* dx = static_cast<T*>(dx_);
  std::vector<float> acc(static_cast<size_t>(n));
  float* a = acc.data();
  for (int64_t r = r0; r < r1; ++r) {
    T* dr = dx + r * n;
    const int64_t p0 = offsets[r], p1 = offsets[r + 1];
    if (p1 - p0 == 1) {  // the common case: one source row, a conversion-free copy
      std::memcpy(dr, g + order[p0] * n, static_cast<size_t>(n) * sizeof(T));
      continue;
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) a[i] = 0.f;
    for (int64_t p = p0; p < p1; ++p) {
      const T* gr = g + order[p] * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) a[i] += E::load(gr[i]);
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dr[i] = E::store(a[i]);
  }
}

#define RR_DT_DISPATCH(dt, fn, ...)                          \
  switch (dt) {                                              \
    case DType::f32: fn<DType::f32>(__VA_ARGS__); break;     \
    case DType::bf16: fn<DType::bf16>(__VA_ARGS__); break;   \
    case DType::f16: fn<DType::f16>(__VA_ARGS__); break;     \
  }
// Two storage dtypes: the second is the first, or float32 (checked by the glue).
#define RR_DT2_DISPATCH(a, b, fn, ...)                                                       \
  if (a == b) {                                                                              \
    switch (a) {                                                                             \
      case DType::f32: fn<DType::f32, DType::f32>(__VA_ARGS__); break;                       \
      case DType::bf16: fn<DType::bf16, DType::bf16>(__VA_ARGS__); break;                    \
      case DType::f16: fn<DType::f16, DType::f16>(__VA_ARGS__); break;                       \
    }                                                                                        \
  } else {                                                                                   \
    switch (a) {                                                                             \
      case DType::f32: fn<DType::f32, DType::f32>(__VA_ARGS__); break;                       \
      case DType::bf16: fn<DType::bf16, DType::f32>(__VA_ARGS__); break;                     \
      case DType::f16: fn<DType::f16, DType::f32>(__VA_ARGS__); break;                       \
    }                                                                                        \
  }

// One non-template function per kernel and ISA; the template bodies are inlined into each.
#define RR_FUSED_KERNELS(SUFFIX, ATTR)                                                                            \
  ATTR void rms_fwd_##SUFFIX(void* y, float* rstd, const void* x, const float* w, DType dx, DType dy, int64_t r0,  \
                             int64_t r1, int64_t n, float eps) {                                                  \
    RR_DT2_DISPATCH(dx, dy, rms_fwd_t, y, rstd, x, w, r0, r1, n, eps)                                            \
  }                                                                                                               \
  ATTR void rms_bwd_##SUFFIX(void* d, float* dw, const void* g, const void* x, const float* w, const float* rstd, \
                             DType dx, DType dg, int64_t r0, int64_t r1, int64_t n) {                             \
    RR_DT2_DISPATCH(dx, dg, rms_bwd_t, d, dw, g, x, w, rstd, r0, r1, n)                                          \
  }                                                                                                               \
  ATTR void silu_mul_##SUFFIX(void* h, const void* g, const void* u, DType dt, int64_t e0, int64_t e1) {          \
    RR_DT_DISPATCH(dt, silu_mul_t, h, g, u, e0, e1)                                                               \
  }                                                                                                               \
  ATTR void swiglu_bwd_##SUFFIX(void* h, void* dg, void* du, const void* dh, const void* g, const void* u,        \
                                DType dt, int64_t e0, int64_t e1) {                                               \
    RR_DT_DISPATCH(dt, swiglu_bwd_t, h, dg, du, dh, g, u, e0, e1)                                                 \
  }                                                                                                               \
  ATTR void rope_##SUFFIX(void* y, const void* x, const float* c, const float* s, DType dt, int64_t t0,           \
                          int64_t t1, int64_t H, int64_t D, float sign) {                                         \
    RR_DT_DISPATCH(dt, rope_t, y, x, c, s, t0, t1, H, D, sign)                                                    \
  }                                                                                                               \
  ATTR void scatter_rows_##SUFFIX(void* dx, const void* g, const int64_t* off, const int64_t* order, DType dt,    \
                                  int64_t r0, int64_t r1, int64_t n) {                                            \
    RR_DT_DISPATCH(dt, scatter_rows_t, dx, g, off, order, r0, r1, n)                                              \
  }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
RR_FUSED_KERNELS(v4, __attribute__((target("arch=x86-64-v4,prefer-vector-width=512"))))
RR_FUSED_KERNELS(v3, __attribute__((target("arch=x86-64-v3"))))
#endif
RR_FUSED_KERNELS(base, )

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RR_PICK(name, ...)                                           \
  static const int isa = cpu_x86_64_v4() ? 4 : cpu_x86_64_v3() ? 3 : 0; \
  if (isa == 4) return name##_v4(__VA_ARGS__);                       \
  if (isa == 3) return name##_v3(__VA_ARGS__);                       \
  return name##_base(__VA_ARGS__);
#else
#define RR_PICK(name, ...) return name##_base(__VA_ARGS__);
#endif

}  // namespace

void rms_fwd_cpu(void* y, float* rstd, const void* x, const float* w, DType dx, DType dy, int64_t r0, int64_t r1,
                 int64_t n, float eps) {
  RR_PICK(rms_fwd, y, rstd, x, w, dx, dy, r0, r1, n, eps)
}

void rms_bwd_cpu(void* dx_out, float* dw_acc, const void* g, const void* x, const float* w, const float* rstd,
                 DType dx, DType dg, int64_t r0, int64_t r1, int64_t n) {
  RR_PICK(rms_bwd, dx_out, dw_acc, g, x, w, rstd, dx, dg, r0, r1, n)
}

void silu_mul_cpu(void* h, const void* g, const void* u, DType dt, int64_t e0, int64_t e1) {
  RR_PICK(silu_mul, h, g, u, dt, e0, e1)
}

void swiglu_bwd_cpu(void* h, void* dg, void* du, const void* dh, const void* g, const void* u, DType dt, int64_t e0,
                    int64_t e1) {
  RR_PICK(swiglu_bwd, h, dg, du, dh, g, u, dt, e0, e1)
}

void rope_cpu(void* y, const void* x, const float* cos, const float* sin, DType dt, int64_t t0, int64_t t1, int64_t H,
              int64_t D, float sign) {
  RR_PICK(rope, y, x, cos, sin, dt, t0, t1, H, D, sign)
}

void scatter_rows_cpu(void* dx, const void* g, const int64_t* offsets, const int64_t* order, DType dt, int64_t r0,
                      int64_t r1, int64_t row_elems) {
  RR_PICK(scatter_rows, dx, g, offsets, order, dt, r0, r1, row_elems)
}

}  // namespace reasonrl
