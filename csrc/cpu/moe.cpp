// CPU kernels of the MoE family: routing, dispatch metadata, and the row-wise pieces of the expert
// compute (gather, SwiGLU forward / backward, the weighted combine). The GEMMs themselves run in
// csrc/moe.cpp through at::mm (MKL): a hand-written GEMM would not reach it on these shapes.
//
// Router, per token: s = softmax(z) or sigmoid(z) (float32), ids = the K largest s + bias, ties to the
// lower id (an insertion into a K-long sorted list that only a strictly larger value passes).
// Dispatch: a counting sort of the assignments a = t*K + k by expert, stable because a is visited in
// increasing order; pos = its inverse, so a token finds its K rows in the expert-sorted buffers.
// SwiGLU: act = silu(g) * u, silu(g) = g * sigma(g), silu'(g) = sigma(g) * (1 + g * (1 - sigma(g))).
// Combine: out[t] = sum_k w[t,k] * y[pos[t*K+k]] in k order: deterministic, no atomics.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/simd.h"
#include "moe.h"
#include "reasonrl.h"

namespace reasonrl {

void moe_router_cpu(int64_t* ids, const float* logits, const float* bias, int64_t E, int64_t K, bool sigmoid,
                    int64_t t0, int64_t t1) {
  std::vector<float> s(E), best(K);
  std::vector<int64_t> arg(K);
  for (int64_t t = t0; t < t1; ++t) {
    const float* z = logits + t * E;
    if (sigmoid) {
      for (int64_t e = 0; e < E; ++e) s[e] = 1.f / (1.f + std::exp(-z[e]));
    } else {
      float m = -INFINITY, sum = 0.f;
      for (int64_t e = 0; e < E; ++e) m = z[e] > m ? z[e] : m;
      if (m == -INFINITY) {  // a row of only -inf: scores 0 (the reference's dead row), picked by bias
        std::fill(s.begin(), s.end(), 0.f);
      } else {
        for (int64_t e = 0; e < E; ++e) sum += (s[e] = std::exp(z[e] - m));
        for (int64_t e = 0; e < E; ++e) s[e] /= sum;
      }
    }
    int64_t filled = 0;
    for (int64_t e = 0; e < E; ++e) {
      float v = bias ? s[e] + bias[e] : s[e];
      if (v != v) v = -INFINITY;  // a NaN score ranks last (the reference and the CUDA kernel agree)
      if (filled == K && !(v > best[K - 1])) continue;
      int64_t j = filled < K ? filled++ : K - 1;
      for (; j > 0 && v > best[j - 1]; --j) {  // strict: an equal value stays behind the lower id
        best[j] = best[j - 1];
        arg[j] = arg[j - 1];
      }
      best[j] = v;
      arg[j] = e;
    }
    std::memcpy(ids + t * K, arg.data(), K * sizeof(int64_t));
  }
}

void moe_dispatch_cpu(int32_t* counts, int32_t* offsets, int32_t* sorted_idx, int32_t* pos, const int64_t* ids,
                      int64_t N, int64_t E) {
  std::memset(counts, 0, E * sizeof(int32_t));
  for (int64_t a = 0; a < N; ++a) counts[ids[a]]++;
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
  std::vector<int32_t> next(offsets, offsets + E);
  for (int64_t a = 0; a < N; ++a) {
    const int32_t p = next[ids[a]]++;
    sorted_idx[p] = static_cast<int32_t>(a);
    if (pos) pos[a] = p;
  }
}

int64_t moe_padded_offsets_cpu(int32_t* padded_offsets, const int32_t* counts, int64_t E, int64_t block_size) {
  padded_offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t c = (counts[e] + block_size - 1) / block_size * block_size;
    padded_offsets[e + 1] = static_cast<int32_t>(padded_offsets[e] + c);
  }
  return padded_offsets[E];
}

void moe_pad_cpu(int32_t* padded_idx, int32_t* block_expert, const int32_t* sorted_idx, const int32_t* offsets,
                 const int32_t* padded_offsets, int64_t E, int64_t block_size) {
  for (int64_t e = 0; e < E; ++e) {
    const int32_t n = offsets[e + 1] - offsets[e], p0 = padded_offsets[e], p1 = padded_offsets[e + 1];
    std::memcpy(padded_idx + p0, sorted_idx + offsets[e], n * sizeof(int32_t));
    for (int32_t p = p0 + n; p < p1; ++p) padded_idx[p] = -1;
    for (int32_t b = p0 / block_size; b < p1 / block_size; ++b) block_expert[b] = static_cast<int32_t>(e);
  }
}

void moe_gather_rows_cpu(float* dst, const float* src, const int32_t* sorted_idx, int64_t K, int64_t H,
                         int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) std::memcpy(dst + r * H, src + (sorted_idx[r] / K) * H, H * sizeof(float));
}

namespace {

// The row loops below are `omp simd`; each exported function runs a copy built for AVX2 + FMA
// (x86-64-v3) where the CPU has it (the build's baseline is SSE2), as csrc/cpu/paged.cpp does.
RR_INLINE float silu_of(float g, float* sig) {
  *sig = 1.f / (1.f + simd::fast_exp(-g));
  return g * *sig;
}

RR_INLINE void swiglu_fwd_body(float* act, const float* h, int64_t n, int64_t I) {
  for (int64_t r = 0; r < n; ++r) {
    const float* g = h + r * 2 * I;
    const float* u = g + I;
    float* o = act + r * I;
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.f + simd::fast_exp(-g[i])) * u[i];
  }
}

RR_INLINE void swiglu_bwd_body(float* h, float* act, float* grad_w, const float* ga, const float* w, int64_t n,
                               int64_t I) {
  for (int64_t r = 0; r < n; ++r) {
    float* g = h + r * 2 * I;
    float* u = g + I;
    float* a = act + r * I;
    const float* gr = ga + r * I;
    const float wr = w[r];
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < I; ++i) {
      dot += gr[i] * a[i];
      float sig;
      const float s = silu_of(g[i], &sig);
      const float gact = wr * gr[i];
      const float gg = gact * u[i] * sig * (1.f + g[i] * (1.f - sig));
      u[i] = gact * s;
      g[i] = gg;
      a[i] *= wr;
    }
    grad_w[r] = dot;
  }
}

RR_INLINE void combine_body(float* out, const float* rows, const int32_t* pos, const float* scale, int64_t K,
                            int64_t H, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    float* o = out + t * H;
    std::memset(o, 0, H * sizeof(float));
    for (int64_t k = 0; k < K; ++k) {
      const float* y = rows + static_cast<int64_t>(pos[t * K + k]) * H;
      const float s = scale ? scale[t * K + k] : 1.f;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) o[i] += s * y[i];
    }
  }
}

RR_INLINE float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
  return s;
}

// A few rows of one expert without a GEMM call: each weight row is read once for all n rows.
RR_INLINE void expert_rows_body(float* y, float* h, const float* xs, const float* wgu, const float* wd, int64_t n,
                                int64_t H, int64_t I) {
  for (int64_t j = 0; j < 2 * I; ++j) {
    for (int64_t r = 0; r < n; ++r) h[r * 2 * I + j] = dot(wgu + j * H, xs + r * H, H);
  }
  for (int64_t r = 0; r < n; ++r) {  // activation over the gate half, in place
    float* g = h + r * 2 * I;
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) g[i] = g[i] / (1.f + simd::fast_exp(-g[i])) * g[I + i];
  }
  for (int64_t i = 0; i < H; ++i) {
    for (int64_t r = 0; r < n; ++r) y[r * H + i] = dot(wd + i * I, h + r * 2 * I, I);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define RR_V3 __attribute__((target("arch=x86-64-v3")))
// The AVX2 build where the CPU has it, unless tests force the baseline (logprob_cpu_isa: cpu_isa_level() is the
// best level or the forced one), so one machine runs both builds.
bool has_v3() { return cpu_isa_level() >= 3; }
#else
#define RR_V3
bool has_v3() { return false; }
#endif

#define RR_TWO_ISAS(name, args, call) \
  RR_V3 void name##_v3 args { name##_body call; } \
  void name##_base args { name##_body call; }
RR_TWO_ISAS(swiglu_fwd, (float* act, const float* h, int64_t n, int64_t I), (act, h, n, I))
RR_TWO_ISAS(swiglu_bwd, (float* h, float* act, float* gw, const float* ga, const float* w, int64_t n, int64_t I),
            (h, act, gw, ga, w, n, I))
RR_TWO_ISAS(combine, (float* out, const float* rows, const int32_t* pos, const float* scale, int64_t K, int64_t H,
                      int64_t t0, int64_t t1), (out, rows, pos, scale, K, H, t0, t1))
RR_TWO_ISAS(expert_rows, (float* y, float* h, const float* xs, const float* wgu, const float* wd, int64_t n,
                          int64_t H, int64_t I), (y, h, xs, wgu, wd, n, H, I))

}  // namespace

void moe_swiglu_fwd_cpu(float* act, const float* h, int64_t n, int64_t I) {
  has_v3() ? swiglu_fwd_v3(act, h, n, I) : swiglu_fwd_base(act, h, n, I);
}

void moe_swiglu_bwd_cpu(float* h, float* act, float* grad_w, const float* ga, const float* w, int64_t n,
                        int64_t I) {
  has_v3() ? swiglu_bwd_v3(h, act, grad_w, ga, w, n, I) : swiglu_bwd_base(h, act, grad_w, ga, w, n, I);
}

void moe_combine_cpu(float* out, const float* rows, const int32_t* pos, const float* scale, int64_t K, int64_t H,
                     int64_t t0, int64_t t1) {
  has_v3() ? combine_v3(out, rows, pos, scale, K, H, t0, t1) : combine_base(out, rows, pos, scale, K, H, t0, t1);
}

void moe_expert_rows_fwd_cpu(float* y, float* h, const float* xs, const float* wgu, const float* wd, int64_t n,
                             int64_t H, int64_t I) {
  has_v3() ? expert_rows_v3(y, h, xs, wgu, wd, n, H, I) : expert_rows_base(y, h, xs, wgu, wd, n, H, I);
}

}  // namespace reasonrl
