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
#pragma GCC diagnostic ignored "-Wpsabi"  // vector values only cross always-inlined internal functions
#endif
#include <algorithm>
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
                      int64_t D, float sign, int64_t xs_t, int64_t xs_h, int64_t ys_t, int64_t ys_h) {
  using T = typename Elem<DT>::T;
  const T* x = static_cast<const T*>(x_);
  T* y = static_cast<T*>(y_);
  for (int64_t t = t0; t < t1; ++t)
    rope_row<DT>(y + t * ys_t, x + t * xs_t, cos + t * (D / 2), sin + t * (D / 2), H, D, sign, xs_h, ys_h);
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

// ---- attention over a padded batch (fused.h) ----------------------------------------------------------
// Per work item (b, kv head): K and V converted to float32 once (K and V also transposed, D x ld, ld = Lk
// rounded up to 16 and zero past the keys). Queries go in blocks of kR rows of one head: their scores are
// made 16 keys at a time, each K vector loaded once for the kR rows; the value sums keep tiles of output
// rows in registers while the keys stream. The backward recomputes the probabilities from the kept
// log-sum-exp, with the same blocking for dq, dk and dv.
// Vectors are the ISA's own width W (16 floats with AVX-512, 8 with AVX2, 4 otherwise) and accumulator
// tiles stay within the register file (kAcc vectors): GCC lowers a wider vector type to pairs of narrower
// registers and spills what does not fit (64-byte vectors on AVX2 made this kernel 2x slower than SDPA).
template <int W>
struct VecT;
template <>
struct VecT<16> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct VecT<8> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecT<4> {
  typedef float type __attribute__((vector_size(16)));
};
template <int W>
using vf = typename VecT<W>::type;
template <int W>
RR_INLINE vf<W> vld(const float* p) {
  vf<W> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <int W>
RR_INLINE void vst(float* p, vf<W> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <int W>
RR_INLINE vf<W> vbc(float x) {
  return vf<W>{} + x;
}

constexpr int64_t kR = 4;  // query rows per block
// Accumulator vectors of a register tile: 8 of the 16 ymm / xmm registers; with AVX-512 (32 zmm) the
// tiling measured on 2026-11-27 (all kR rows x D / 16 vectors; D = 128 spills some).
template <int W>
constexpr int kAcc = W == 16 ? 32 : 8;

template <DType DT>
struct AttnItem {
  using E = Elem<DT>;
  using T = typename E::T;
  std::vector<float> kt, vt, kf, vf;  // (D, ld), (D, ld), (ld, D), (ld, D)
  // Rows j < n of k and v converted (vector loads), then transposed in cache; the transposes are zero
  // past n, up to ld.
  void load(const T* k, const T* v, int64_t n, int64_t row_stride, int64_t D, int64_t ld, bool bwd) {
    kt.resize(static_cast<size_t>(D * ld));
    kf.resize(static_cast<size_t>(ld * D));
    vf.resize(static_cast<size_t>(ld * D));
    if (bwd) vt.resize(static_cast<size_t>(D * ld));
    for (int64_t j = 0; j < n; ++j) {
      const T* kr = k + j * row_stride;
      const T* vr = v + j * row_stride;
      float* kj = kf.data() + j * D;
      float* vj = vf.data() + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        kj[d] = E::load(kr[d]);
        vj[d] = E::load(vr[d]);
      }
    }
    transpose(kt.data(), kf.data(), n, D, ld);
    if (bwd) transpose(vt.data(), vf.data(), n, D, ld);
  }
  static void transpose(float* mt, const float* m, int64_t n, int64_t D, int64_t ld) {
    for (int64_t d = 0; d < D; ++d) {
      float* row = mt + d * ld;
      for (int64_t j = 0; j < n; ++j) row[j] = m[j * D + d];
      for (int64_t j = n; j < ld; ++j) row[j] = 0.f;
    }
  }
};

// S[r * ld + j] = sum_d A[r * D + d] * mt[d * ld + j] for the kR rows and j < n rounded up to 16 (8 with
// 4-wide vectors).
template <int W, int D>
RR_INLINE void scores_block(float* S, const float* A, const float* mt, int64_t ld, int64_t n) {
  constexpr int C = W == 4 ? 2 : 16 / W;  // vectors per chunk of keys
  for (int64_t j0 = 0; j0 < n; j0 += C * W) {
    vf<W> acc[kR][C] = {};
    for (int64_t d = 0; d < D; ++d) {
      vf<W> m[C];
      for (int c = 0; c < C; ++c) m[c] = vld<W>(mt + d * ld + j0 + c * W);
      for (int64_t r = 0; r < kR; ++r) {
        const vf<W> a = vbc<W>(A[r * D + d]);
        for (int c = 0; c < C; ++c) acc[r][c] += a * m[c];
      }
    }
    for (int64_t r = 0; r < kR; ++r)
      for (int c = 0; c < C; ++c) vst<W>(S + r * ld + j0 + c * W, acc[r][c]);
  }
}

// out[r * D + :] = sum_{j < n} P[r * ld + j] * M[j * D + :] for the kR rows (fwd: P V; bwd: dS K), in
// register tiles of RP rows x CC vectors while the rows of M stream.
template <int W, int D>
RR_INLINE void rows_times(float* out, const float* P, const float* M, int64_t ld, int64_t n) {
  constexpr int NV = D / W;
  constexpr int RP = NV >= kAcc<W> ? 1 : (kAcc<W> / NV < kR ? kAcc<W> / NV : kR);
  constexpr int CC = NV < kAcc<W> / RP ? NV : kAcc<W> / RP;
  for (int r0 = 0; r0 < kR; r0 += RP)
    for (int c0 = 0; c0 < NV; c0 += CC) {
      vf<W> acc[RP][CC] = {};
      for (int64_t j = 0; j < n; ++j) {
        vf<W> m[CC];
        for (int c = 0; c < CC; ++c) m[c] = vld<W>(M + j * D + (c0 + c) * W);
        for (int r = 0; r < RP; ++r) {
          const vf<W> p = vbc<W>(P[(r0 + r) * ld + j]);
          for (int c = 0; c < CC; ++c) acc[r][c] += p * m[c];
        }
      }
      for (int r = 0; r < RP; ++r)
        for (int c = 0; c < CC; ++c) vst<W>(out + (r0 + r) * D + (c0 + c) * W, acc[r][c]);
    }
}

// Mf[j * D + :] += sum_r X[r * ld + j] * Y[r * D + :] over the kR rows, for j < n (bwd: dK += dS^T q,
// dV += P^T dout), rows r in order.
template <int W, int D>
RR_INLINE void rank_update(float* Mf, const float* X, const float* Y, int64_t ld, int64_t n) {
  constexpr int NV = D / W, CC = NV < kAcc<W> ? NV : kAcc<W>;
  for (int c0 = 0; c0 < NV; c0 += CC)
    for (int64_t j = 0; j < n; ++j) {
      vf<W> acc[CC];
      for (int c = 0; c < CC; ++c) acc[c] = vld<W>(Mf + j * D + (c0 + c) * W);
      for (int64_t r = 0; r < kR; ++r) {
        const vf<W> x = vbc<W>(X[r * ld + j]);
        for (int c = 0; c < CC; ++c) acc[c] += x * vld<W>(Y + r * D + (c0 + c) * W);
      }
      for (int c = 0; c < CC; ++c) vst<W>(Mf + j * D + (c0 + c) * W, acc[c]);
    }
}

// Rows of one query block: valid rows, their visible key counts (0 for rows past Lq), the block's widest.
RR_INLINE int64_t block_rows(int64_t* n, int64_t i0, int64_t Lq, int64_t nk, int64_t off) {
  int64_t nmax = 0;
  for (int64_t r = 0; r < kR; ++r) {
    const int64_t i = i0 + r;
    n[r] = i < Lq ? std::min(nk, i + off + 1) : 0;
    nmax = std::max(nmax, n[r]);
  }
  return nmax;
}

template <DType DT, int W, int D>
RR_INLINE void attn_fwd_t(void* o_, float* lse, const void* q_, const void* k_, const void* v_, const int64_t* off,
                          const int64_t* klen, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv, float scale,
                          int64_t w0, int64_t w1) {
  using E = Elem<DT>;
  using T = typename E::T;
  const T* q = static_cast<const T*>(q_);
  const T* k = static_cast<const T*>(k_);
  const T* v = static_cast<const T*>(v_);
  T* o = static_cast<T*>(o_);
  const int64_t rep = Hq / Hkv, ld = (Lk + 15) / 16 * 16;
  AttnItem<DT> it;
  std::vector<float> S(static_cast<size_t>(kR * ld)), A(static_cast<size_t>(kR * D)), Ob(static_cast<size_t>(kR * D));
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t b = w / Hkv, hk = w % Hkv, nk = klen[b];
    it.load(k + (b * Lk * Hkv + hk) * D, v + (b * Lk * Hkv + hk) * D, nk, Hkv * D, D, ld, false);
    for (int64_t hq = hk * rep; hq < (hk + 1) * rep; ++hq) {
      for (int64_t i0 = 0; i0 < Lq; i0 += kR) {
        int64_t n[kR];
        const int64_t nmax = block_rows(n, i0, Lq, nk, off[b]);
        for (int64_t r = 0; r < kR; ++r) {
          const T* qr = q + ((b * Lq + i0 + r) * Hq + hq) * D;
          for (int64_t d = 0; d < D; ++d) A[r * D + d] = n[r] ? E::load(qr[d]) * scale : 0.f;
        }
        scores_block<W, D>(S.data(), A.data(), it.kt.data(), ld, nmax);
        float inv[kR], ls[kR];
        for (int64_t r = 0; r < kR; ++r) {
          float* s = S.data() + r * ld;
          if (!n[r]) {
            for (int64_t j = 0; j < nmax; ++j) s[j] = 0.f;
            inv[r] = ls[r] = 0.f;
            continue;
          }
          float m = s[0];
          for (int64_t j = 1; j < n[r]; ++j) m = s[j] > m ? s[j] : m;
          float l = 0.f;
#pragma omp simd reduction(+ : l)
          for (int64_t j = 0; j < n[r]; ++j) {
            s[j] = simd::fast_exp(s[j] - m);
            l += s[j];
          }
          for (int64_t j = n[r]; j < nmax; ++j) s[j] = 0.f;
          inv[r] = 1.f / l;
          ls[r] = m + std::log(l);
        }
        rows_times<W, D>(Ob.data(), S.data(), it.vf.data(), ld, nmax);
        for (int64_t r = 0; r < kR && i0 + r < Lq; ++r) {
          T* orow = o + ((b * Lq + i0 + r) * Hq + hq) * D;
          const float* ob = Ob.data() + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) orow[d] = E::store(ob[d] * inv[r]);
          lse[(b * Hq + hq) * Lq + i0 + r] = ls[r];
        }
      }
    }
  }
}

template <DType DT, int W, int D>
RR_INLINE void attn_bwd_t(void* dq_, void* dk_, void* dv_, const void* do_, const void* q_, const void* k_,
                          const void* v_, const void* o_, const float* lse, const int64_t* off, const int64_t* klen,
                          int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv, float scale, int64_t w0, int64_t w1) {
  using E = Elem<DT>;
  using T = typename E::T;
  constexpr int NV = D / W;
  const T* q = static_cast<const T*>(q_);
  const T* k = static_cast<const T*>(k_);
  const T* v = static_cast<const T*>(v_);
  const T* o = static_cast<const T*>(o_);
  const T* dout = static_cast<const T*>(do_);
  T* dq = static_cast<T*>(dq_);
  T* dk = static_cast<T*>(dk_);
  T* dv = static_cast<T*>(dv_);
  const int64_t rep = Hq / Hkv, ld = (Lk + 15) / 16 * 16;
  AttnItem<DT> it;
  std::vector<float> P(static_cast<size_t>(kR * ld)), dS(static_cast<size_t>(kR * ld)), A(static_cast<size_t>(kR * D)),
      G(static_cast<size_t>(kR * D)), Qb(static_cast<size_t>(kR * D)), dkf, dvf;
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t b = w / Hkv, hk = w % Hkv, nk = klen[b];
    it.load(k + (b * Lk * Hkv + hk) * D, v + (b * Lk * Hkv + hk) * D, nk, Hkv * D, D, ld, true);
    dkf.assign(static_cast<size_t>(ld * D), 0.f);
    dvf.assign(static_cast<size_t>(ld * D), 0.f);
    for (int64_t hq = hk * rep; hq < (hk + 1) * rep; ++hq) {
      for (int64_t i0 = 0; i0 < Lq; i0 += kR) {
        int64_t n[kR];
        const int64_t nmax = block_rows(n, i0, Lq, nk, off[b]);
        float delta[kR], ls[kR];
        for (int64_t r = 0; r < kR; ++r) {
          const int64_t row = ((b * Lq + i0 + r) * Hq + hq) * D;
          float dl = 0.f;
          for (int64_t d = 0; d < D; ++d) {
            A[r * D + d] = n[r] ? E::load(q[row + d]) * scale : 0.f;
            G[r * D + d] = n[r] ? E::load(dout[row + d]) : 0.f;
            dl += n[r] ? G[r * D + d] * E::load(o[row + d]) : 0.f;
          }
          delta[r] = dl;
          ls[r] = n[r] ? lse[(b * Hq + hq) * Lq + i0 + r] : 0.f;
        }
        scores_block<W, D>(P.data(), A.data(), it.kt.data(), ld, nmax);
        scores_block<W, D>(dS.data(), G.data(), it.vt.data(), ld, nmax);
        for (int64_t r = 0; r < kR; ++r) {
          float* p = P.data() + r * ld;
          float* ds = dS.data() + r * ld;
#pragma omp simd
          for (int64_t j = 0; j < n[r]; ++j) {
            p[j] = simd::fast_exp(p[j] - ls[r]);
            ds[j] = p[j] * (ds[j] - delta[r]);
          }
          for (int64_t j = n[r]; j < nmax; ++j) p[j] = ds[j] = 0.f;
        }
        if constexpr (W == 16) {
          // AVX-512: dq, dk and dv in one pass over the keys, the block's q, dout and dq in registers
          vf<W> accq[kR][NV] = {};
          vf<W> qv[kR][NV], gv[kR][NV];
          for (int64_t r = 0; r < kR; ++r)
            for (int c = 0; c < NV; ++c) {
              qv[r][c] = vld<W>(A.data() + r * D + W * c);
              gv[r][c] = vld<W>(G.data() + r * D + W * c);
            }
          for (int64_t j = 0; j < nmax; ++j) {
            vf<W> kk[NV], dkj[NV], dvj[NV];
            for (int c = 0; c < NV; ++c) {
              kk[c] = vld<W>(it.kf.data() + j * D + W * c);
              dkj[c] = vld<W>(dkf.data() + j * D + W * c);
              dvj[c] = vld<W>(dvf.data() + j * D + W * c);
            }
            for (int64_t r = 0; r < kR; ++r) {
              const vf<W> s = vbc<W>(dS[r * ld + j]), pj = vbc<W>(P[r * ld + j]);
              for (int c = 0; c < NV; ++c) {
                accq[r][c] += s * kk[c];
                dkj[c] += s * qv[r][c];
                dvj[c] += pj * gv[r][c];
              }
            }
            for (int c = 0; c < NV; ++c) {
              vst<W>(dkf.data() + j * D + W * c, dkj[c]);
              vst<W>(dvf.data() + j * D + W * c, dvj[c]);
            }
          }
          for (int64_t r = 0; r < kR; ++r)
            for (int c = 0; c < NV; ++c) vst<W>(Qb.data() + r * D + W * c, accq[r][c]);
        } else {  // fewer registers: one pass over the keys each for dq, dk, dv
          rows_times<W, D>(Qb.data(), dS.data(), it.kf.data(), ld, nmax);
          rank_update<W, D>(dkf.data(), dS.data(), A.data(), ld, nmax);
          rank_update<W, D>(dvf.data(), P.data(), G.data(), ld, nmax);
        }
        for (int64_t r = 0; r < kR && i0 + r < Lq; ++r) {
          T* dqr = dq + ((b * Lq + i0 + r) * Hq + hq) * D;
          const float* qb = Qb.data() + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dqr[d] = E::store(qb[d] * scale);
        }
      }
    }
    for (int64_t j = 0; j < Lk; ++j) {
      const int64_t krow = ((b * Lk + j) * Hkv + hk) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        dk[krow + d] = E::store(dkf[j * D + d]);
        dv[krow + d] = E::store(dvf[j * D + d]);
      }
    }
  }
}

#define RR_ATTN_D_DISPATCH(fn, D, ...)                             \
  switch (D) {                                                     \
    case 16: fn<DT, W, 16>(__VA_ARGS__); break;                    \
    case 32: fn<DT, W, 32>(__VA_ARGS__); break;                    \
    case 64: fn<DT, W, 64>(__VA_ARGS__); break;                    \
    default: fn<DT, W, 128>(__VA_ARGS__); break;                   \
  }
template <DType DT, int W>
RR_INLINE void attn_fwd_d(void* o, float* lse, const void* q, const void* k, const void* v, const int64_t* off,
                          const int64_t* klen, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                          int64_t w0, int64_t w1) {
  RR_ATTN_D_DISPATCH(attn_fwd_t, D, o, lse, q, k, v, off, klen, Lq, Lk, Hq, Hkv, scale, w0, w1)
}
template <DType DT, int W>
RR_INLINE void attn_bwd_d(void* dq, void* dk, void* dv, const void* dout, const void* q, const void* k, const void* v,
                          const void* o, const float* lse, const int64_t* off, const int64_t* klen, int64_t Lq,
                          int64_t Lk, int64_t Hq, int64_t Hkv, int64_t D, float scale, int64_t w0, int64_t w1) {
  RR_ATTN_D_DISPATCH(attn_bwd_t, D, dq, dk, dv, dout, q, k, v, o, lse, off, klen, Lq, Lk, Hq, Hkv, scale, w0, w1)
}

#define RR_DT_DISPATCH(dt, fn, ...)                          \
  switch (dt) {                                              \
    case DType::f32: fn<DType::f32>(__VA_ARGS__); break;     \
    case DType::bf16: fn<DType::bf16>(__VA_ARGS__); break;   \
    case DType::f16: fn<DType::f16>(__VA_ARGS__); break;     \
  }
#define RR_DT_W_DISPATCH(dt, W, fn, ...)                        \
  switch (dt) {                                                 \
    case DType::f32: fn<DType::f32, W>(__VA_ARGS__); break;     \
    case DType::bf16: fn<DType::bf16, W>(__VA_ARGS__); break;   \
    case DType::f16: fn<DType::f16, W>(__VA_ARGS__); break;     \
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
#define RR_FUSED_KERNELS(SUFFIX, W, ATTR)                                                                            \
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
                          int64_t t1, int64_t H, int64_t D, float sign, int64_t xs_t, int64_t xs_h, int64_t ys_t, \
                          int64_t ys_h) {                                                                         \
    RR_DT_DISPATCH(dt, rope_t, y, x, c, s, t0, t1, H, D, sign, xs_t, xs_h, ys_t, ys_h)                            \
  }                                                                                                               \
  ATTR void scatter_rows_##SUFFIX(void* dx, const void* g, const int64_t* off, const int64_t* order, DType dt,    \
                                  int64_t r0, int64_t r1, int64_t n) {                                            \
    RR_DT_DISPATCH(dt, scatter_rows_t, dx, g, off, order, r0, r1, n)                                              \
  }                                                                                                               \
  ATTR void attn_fwd_##SUFFIX(void* o, float* lse, const void* q, const void* k, const void* v, const int64_t* off, \
                              const int64_t* klen, DType dt, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv,      \
                              int64_t D, float scale, int64_t w0, int64_t w1) {                                  \
    RR_DT_W_DISPATCH(dt, W, attn_fwd_d, o, lse, q, k, v, off, klen, Lq, Lk, Hq, Hkv, D, scale, w0, w1)                 \
  }                                                                                                               \
  ATTR void attn_bwd_##SUFFIX(void* dq, void* dk, void* dv, const void* dout, const void* q, const void* k,        \
                              const void* v, const void* o, const float* lse, const int64_t* off,                  \
                              const int64_t* klen, DType dt, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv,      \
                              int64_t D, float scale, int64_t w0, int64_t w1) {                                  \
    RR_DT_W_DISPATCH(dt, W, attn_bwd_d, dq, dk, dv, dout, q, k, v, o, lse, off, klen, Lq, Lk, Hq, Hkv, D, scale, w0, w1) \
  }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
RR_FUSED_KERNELS(v4, 16, __attribute__((target("arch=x86-64-v4,prefer-vector-width=512"))))
RR_FUSED_KERNELS(v3, 8, __attribute__((target("arch=x86-64-v3"))))
#endif
RR_FUSED_KERNELS(base, 4, )

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RR_PICK(name, ...)                                           \
  const int isa = cpu_isa_level(); /* logprob_cpu_isa: the best, or forced by tests */ \
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
              int64_t D, float sign, int64_t xs_t, int64_t xs_h, int64_t ys_t, int64_t ys_h) {
  RR_PICK(rope, y, x, cos, sin, dt, t0, t1, H, D, sign, xs_t, xs_h, ys_t, ys_h)
}

void scatter_rows_cpu(void* dx, const void* g, const int64_t* offsets, const int64_t* order, DType dt, int64_t r0,
                      int64_t r1, int64_t row_elems) {
  RR_PICK(scatter_rows, dx, g, offsets, order, dt, r0, r1, row_elems)
}

bool attn_head_dim_ok(int64_t D) { return D == 16 || D == 32 || D == 64 || D == 128; }

void attn_fwd_cpu(void* o, float* lse, const void* q, const void* k, const void* v, const int64_t* off,
                  const int64_t* klen, DType dt, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                  int64_t w0, int64_t w1) {
  RR_PICK(attn_fwd, o, lse, q, k, v, off, klen, dt, Lq, Lk, Hq, Hkv, D, scale, w0, w1)
}

void attn_bwd_cpu(void* dq, void* dk, void* dv, const void* dout, const void* q, const void* k, const void* v,
                  const void* o, const float* lse, const int64_t* off, const int64_t* klen, DType dt, int64_t Lq,
                  int64_t Lk, int64_t Hq, int64_t Hkv, int64_t D, float scale, int64_t w0, int64_t w1) {
  RR_PICK(attn_bwd, dq, dk, dv, dout, q, k, v, o, lse, off, klen, dt, Lq, Lk, Hq, Hkv, D, scale, w0, w1)
}

}  // namespace reasonrl
