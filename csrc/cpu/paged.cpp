// CPU kernels of the paged KV-cache family.
//
// store_kv: one memcpy of Hkv * D elements per token into its slot (a scatter; nothing to compute).
//
// paged decode attention, per sequence b and query head hq (kv head h = hq / G, G = Hq / Hkv):
//   s_gj = scale * <q_g, k_j>          j < n = context_lens[b], k_j at block_tables[b, j / bs], j % bs
//   out_g = sum_j exp(s_gj - m_g) v_j / sum_j exp(s_gj - m_g),   m_g = max_j s_gj
// Three passes per sequence: scores into an Hq x n float buffer, softmax numerators (simd::fast_exp,
// 1-2 ulp), weighted values. Math in float32 whatever the cache dtype. Built for AVX2 + FMA
// (x86-64-v3) and for baseline x86-64, picked once at run time.
//
// Head dims 8, 16, 32, 64, 128 and 256 take the 8-lane path: GCC vector extensions
// (portable to every ISA GCC/Clang target), the head dim a compile-time constant so a query head's
// row lives in registers. Scores are made 8 tokens at a time: 8 lane-wise partial dot products, then
// one transpose-and-add tree turns them into 8 scores in one vector. Why: a dot product of 32 ends in
// a horizontal sum, and `omp simd reduction` emitted it as a serial chain of scalar adds per
// (token, head): 12 ns per token-head (B=64, Hq=Hkv=4, D=32, n=48, one core), of which the chain was
// most. The values pass keeps the head's output row in registers across the whole context.
// NOTE: B=64, Hq=Hkv=4, D=32, n=48, one thread (CPU time, loaded 2-core machine): 120 us -> 68 us with
// the cache in L2, 150 -> 110 us with a 3 MiB cache (then the reads from L3 bound it). Two sets of
// value accumulators (even/odd tokens) and an `omp simd` max were both slower here. As in a decode
// step (4 layers' caches, weights read in between) the blocks come from L3/DRAM: prefetching the next
// block took n=80 from 365-545 us to 270-380 us (n=48: about even). Since then: all of the next
// sequence's blocks are prefetched (into L2) while this one is computed, and pass 1 keeps each head's
// max score (a scalar max_element over the scores was 12% of the kernel in a rollout profile): isolated
// (cache in L3) n=48 110 -> 77 us, n=80 181 -> 124 us (B=64, one thread, 2026-11-26).
// Other head dims run the scalar path (one work item per sequence, rows read once for all heads).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#pragma GCC diagnostic ignored "-Wpsabi"  // v8 values only cross always-inlined internal functions
#endif
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/rows.h"
#include "cpu/simd.h"
#include "cpu/vec8.h"
#include "paged.h"
#include "reasonrl.h"

namespace reasonrl {
namespace {

template <DType DT>
RR_INLINE v8 load8(const typename Elem<DT>::T* p) {
  v8 r;
  for (int i = 0; i < 8; ++i) r[i] = Elem<DT>::load(p[i]);
  return r;
}

// Asks for the rows of positions [j, j + cnt) of the next block while this one is computed: in a decode
// step the cache comes from L3 or DRAM (the layer's weights and the other layers' caches passed
// through in between), and the blocks of a sequence sit at scattered addresses.
template <typename T>
RR_INLINE void prefetch_rows(const T* rows, int64_t cnt, int64_t row) {
  const char* p = reinterpret_cast<const char*>(rows);
  const int64_t bytes = cnt * row * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
}

RR_INLINE float hsum(const v8& a) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += a[i];
  return s;
}

// Softmax numerators in place over each head's n scores; returns nothing, writes 1 / sum to inv_l.
// mx: each head's max score where the caller has it, else nullptr.
RR_INLINE void softmax_rows(float* s, float* inv_l, int64_t Hq, int64_t n, const float* mx = nullptr) {
  for (int64_t hq = 0; hq < Hq; ++hq) {
    float* sh = s + hq * n;
    const float mh = mx ? mx[hq] : *std::max_element(sh, sh + n);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      sh[j] = simd::fast_exp(sh[j] - mh);
      sum += sh[j];
    }
    inv_l[hq] = 1.f / sum;
  }
}

// One sequence, head dim D = 8 * NC.
template <DType DT, int NC>
RR_INLINE void decode_seq_v8(typename Elem<DT>::T* out, const typename Elem<DT>::T* q,
                             const typename Elem<DT>::T* kc, const typename Elem<DT>::T* vc,
                             const int32_t* table, int64_t n, int64_t Hq, int64_t Hkv, int64_t bs,
                             float scale, float* s, float* inv_l, float* mx) {
  using E = Elem<DT>;
  using T = typename E::T;
  constexpr int64_t D = 8 * NC;
  const int64_t G = Hq / Hkv, row = Hkv * D;  // a token's row: all kv heads, contiguous
  for (int64_t hq = 0; hq < Hq; ++hq) {  // pass 1: scores, 8 tokens at a time
    const int64_t h = hq / G;
    v8 qv[NC];
    for (int c = 0; c < NC; ++c) qv[c] = load8<DT>(q + hq * D + 8 * c) * scale;
    float* sh = s + hq * n;
    v8 mv = v8{} - __builtin_inff();  // the head's max score, kept alongside (a scalar pass cost 12%)
    float mt = -__builtin_inff();
    for (int64_t j0 = 0, blk = 0; j0 < n; j0 += bs, ++blk) {
      const T* kb = kc + table[blk] * bs * row + h * D;
      const int64_t cnt = std::min(bs, n - j0);
      int64_t o = 0;
      for (; o + 8 <= cnt; o += 8) {
        v8 a[8];
        for (int t = 0; t < 8; ++t) {
          const T* kr = kb + (o + t) * row;
          v8 acc = qv[0] * load8<DT>(kr);
          for (int c = 1; c < NC; ++c) acc += qv[c] * load8<DT>(kr + 8 * c);
          a[t] = acc;
        }
        v8 r = sum8(a);
        mv = mv > r ? mv : r;
        std::memcpy(sh + j0 + o, &r, sizeof(r));
      }
      for (; o < cnt; ++o) {
        const T* kr = kb + o * row;
        v8 acc = qv[0] * load8<DT>(kr);
        for (int c = 1; c < NC; ++c) acc += qv[c] * load8<DT>(kr + 8 * c);
        sh[j0 + o] = hsum(acc);
        mt = std::max(mt, sh[j0 + o]);
      }
    }
    for (int i = 0; i < 8; ++i) mt = std::max(mt, mv[i]);
    mx[hq] = mt;
  }
  softmax_rows(s, inv_l, Hq, n, mx);  // pass 2
  for (int64_t hq = 0; hq < Hq; ++hq) {  // pass 3: the head's output row stays in registers
    const int64_t h = hq / G;
    const float* ph = s + hq * n;
    v8 acc[NC] = {};
    for (int64_t j0 = 0, blk = 0; j0 < n; j0 += bs, ++blk) {
      const T* vb = vc + table[blk] * bs * row + h * D;
      const int64_t cnt = std::min(bs, n - j0);
      for (int64_t o = 0; o < cnt; ++o) {
        const T* vr = vb + o * row;
        const float p = ph[j0 + o];
        for (int c = 0; c < NC; ++c) acc[c] += p * load8<DT>(vr + 8 * c);
      }
    }
    for (int c = 0; c < NC; ++c) {
      const v8 r = acc[c] * inv_l[hq];
      for (int i = 0; i < 8; ++i) out[hq * D + 8 * c + i] = E::store(r[i]);
    }
  }
}

// One sequence, any head dim: each token's row (all kv heads) is read once for all query heads.
template <DType DT>
RR_INLINE void decode_seq_any(typename Elem<DT>::T* out, const typename Elem<DT>::T* q,
                              const typename Elem<DT>::T* kc, const typename Elem<DT>::T* vc,
                              const int32_t* table, int64_t n, int64_t Hq, int64_t Hkv, int64_t D,
                              int64_t bs, float scale, float* s, float* inv_l, float* qf, float* acc) {
  using E = Elem<DT>;
  using T = typename E::T;
  const int64_t G = Hq / Hkv, row = Hkv * D;
  for (int64_t i = 0; i < Hq * D; ++i) qf[i] = E::load(q[i]) * scale;
  for (int64_t j0 = 0, blk = 0; j0 < n; j0 += bs, ++blk) {
    const T* kb = kc + table[blk] * bs * row;
    const int64_t cnt = std::min(bs, n - j0);
    for (int64_t o = 0; o < cnt; ++o) {
      for (int64_t hq = 0; hq < Hq; ++hq) {
        const T* kj = kb + o * row + (hq / G) * D;
        const float* qh = qf + hq * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qh[d] * E::load(kj[d]);
        s[hq * n + j0 + o] = dot;
      }
    }
  }
  softmax_rows(s, inv_l, Hq, n);
  std::fill(acc, acc + Hq * D, 0.f);
  for (int64_t j0 = 0, blk = 0; j0 < n; j0 += bs, ++blk) {
    const T* vb = vc + table[blk] * bs * row;
    const int64_t cnt = std::min(bs, n - j0);
    for (int64_t o = 0; o < cnt; ++o) {
      for (int64_t hq = 0; hq < Hq; ++hq) {
        const T* vj = vb + o * row + (hq / G) * D;
        const float p = s[hq * n + j0 + o];
        float* ah = acc + hq * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ah[d] += p * E::load(vj[d]);
      }
    }
  }
  for (int64_t hq = 0; hq < Hq; ++hq)
    for (int64_t d = 0; d < D; ++d) out[hq * D + d] = E::store(acc[hq * D + d] * inv_l[hq]);
}

template <DType DT>
RR_INLINE void decode_range(void* out_, const void* q_, const void* kc_, const void* vc_, const int32_t* tables,
                            const int32_t* lens, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs,
                            int64_t max_blocks, float scale, int64_t b0, int64_t b1) {
  using T = typename Elem<DT>::T;
  T* out = static_cast<T*>(out_);
  const T* q = static_cast<const T*>(q_);
  const T* kc = static_cast<const T*>(kc_);
  const T* vc = static_cast<const T*>(vc_);
  std::vector<float> s, inv_l(Hq), mx(Hq), qf(Hq * D), acc(Hq * D);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n = lens[b];
    const int32_t* table = tables + b * max_blocks;
    s.resize(Hq * n);
    T* ob = out + b * Hq * D;
    const T* qb = q + b * Hq * D;
    if (b + 1 < b1) {  // the next sequence's K and V, all of its blocks
      const int64_t row = Hkv * D, n1 = lens[b + 1];
      const int32_t* t1 = tables + (b + 1) * max_blocks;
      for (int64_t j0 = 0, blk = 0; j0 < n1; j0 += bs, ++blk) {
        prefetch_rows(kc + t1[blk] * bs * row, std::min(bs, n1 - j0), row);
        prefetch_rows(vc + t1[blk] * bs * row, std::min(bs, n1 - j0), row);
      }
    }
    switch (D) {
      case 8: decode_seq_v8<DT, 1>(ob, qb, kc, vc, table, n, Hq, Hkv, bs, scale, s.data(), inv_l.data(), mx.data()); break;
      case 16: decode_seq_v8<DT, 2>(ob, qb, kc, vc, table, n, Hq, Hkv, bs, scale, s.data(), inv_l.data(), mx.data()); break;
      case 32: decode_seq_v8<DT, 4>(ob, qb, kc, vc, table, n, Hq, Hkv, bs, scale, s.data(), inv_l.data(), mx.data()); break;
      case 64: decode_seq_v8<DT, 8>(ob, qb, kc, vc, table, n, Hq, Hkv, bs, scale, s.data(), inv_l.data(), mx.data()); break;
      case 128: decode_seq_v8<DT, 16>(ob, qb, kc, vc, table, n, Hq, Hkv, bs, scale, s.data(), inv_l.data(), mx.data()); break;
      case 256: decode_seq_v8<DT, 32>(ob, qb, kc, vc, table, n, Hq, Hkv, bs, scale, s.data(), inv_l.data(), mx.data()); break;
      default:
        decode_seq_any<DT>(ob, qb, kc, vc, table, n, Hq, Hkv, D, bs, scale, s.data(), inv_l.data(), qf.data(),
                           acc.data());
    }
  }
}
// ---- RMSNorm and RoPE of a decode step's rows (csrc/paged.cpp decode_layer_fwd) ---------------------
// Rounded to the storage dtype where the model's ops round: x * rsqrt(mean(x^2) + eps) -> dtype, times
// w -> dtype; each rotated element -> dtype. Elem's conversions are branch-free, so the loops vectorize.
template <DType DT>
RR_INLINE void rms_rows_t(void* out_, const void* x_, const void* w_, int64_t rows, int64_t n, float eps) {
  using T = typename Elem<DT>::T;
  T* out = static_cast<T*>(out_);
  const T* x = static_cast<const T*>(x_);
  const T* w = static_cast<const T*>(w_);
  for (int64_t r = 0; r < rows; ++r) rms_row<DT, DT, DT>(out + r * n, x + r * n, w, n, eps);
}

template <DType DT>
RR_INLINE void rope_rows_t(void* out_, const void* x_, const float* cos, const float* sin, int64_t B, int64_t H,
                           int64_t D) {
  using T = typename Elem<DT>::T;
  T* out = static_cast<T*>(out_);
  const T* x = static_cast<const T*>(x_);
  for (int64_t b = 0; b < B; ++b) rope_row<DT>(out + b * H * D, x + b * H * D, cos + b * (D / 2), sin + b * (D / 2), H, D, 1.f, D, D);
}

#define RR_ROWS_DISPATCH(fn, ...)                                  \
  switch (dtype) {                                                 \
    case DType::f32: fn<DType::f32>(__VA_ARGS__); break;           \
    case DType::bf16: fn<DType::bf16>(__VA_ARGS__); break;         \
    case DType::f16: fn<DType::f16>(__VA_ARGS__); break;           \
  }
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("arch=x86-64-v3"))) void rms_v3(void* o, const void* x, const void* w, DType dtype,
                                                      int64_t rows, int64_t n, float eps) {
  RR_ROWS_DISPATCH(rms_rows_t, o, x, w, rows, n, eps)
}
__attribute__((target("arch=x86-64-v3"))) void rope_v3(void* o, const void* x, const float* c, const float* s,
                                                       DType dtype, int64_t B, int64_t H, int64_t D) {
  RR_ROWS_DISPATCH(rope_rows_t, o, x, c, s, B, H, D)
}
#endif
void rms_base(void* o, const void* x, const void* w, DType dtype, int64_t rows, int64_t n, float eps) {
  RR_ROWS_DISPATCH(rms_rows_t, o, x, w, rows, n, eps)
}
void rope_base(void* o, const void* x, const float* c, const float* s, DType dtype, int64_t B, int64_t H,
               int64_t D) {
  RR_ROWS_DISPATCH(rope_rows_t, o, x, c, s, B, H, D)
}

// ---- one non-template entry per ISA (AVX2 + FMA, and baseline x86-64); bodies inlined into each ------
#define RR_DECODE_ARGS                                                                                \
  void *out, const void *q, const void *kc, const void *vc, DType dtype, const int32_t *tables,      \
      const int32_t *lens, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs, int64_t M, float scale, \
      int64_t b0, int64_t b1
#define RR_DECODE_BODY                                                                                  \
  {                                                                                                     \
    switch (dtype) {                                                                                    \
      case DType::f32: decode_range<DType::f32>(out, q, kc, vc, tables, lens, Hq, Hkv, D, bs, M, scale, b0, b1); break;   \
      case DType::bf16: decode_range<DType::bf16>(out, q, kc, vc, tables, lens, Hq, Hkv, D, bs, M, scale, b0, b1); break; \
      case DType::f16: decode_range<DType::f16>(out, q, kc, vc, tables, lens, Hq, Hkv, D, bs, M, scale, b0, b1); break;   \
    }                                                                                                   \
  }
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("arch=x86-64-v3"))) void decode_v3(RR_DECODE_ARGS) RR_DECODE_BODY
#endif
void decode_base(RR_DECODE_ARGS) RR_DECODE_BODY

// The AVX2 build where the CPU has it, unless tests force the baseline (logprob_cpu_isa, as for the other
// kernels: cpu_isa_level() is the best level or the forced one), so one machine runs both builds.
bool has_v3() {
#if defined(__x86_64__) && defined(__GNUC__)
  return cpu_isa_level() >= 3;
#else
  return false;
#endif
}

}  // namespace

void store_kv_fwd_cpu(void* k_cache, void* v_cache, const void* k, const void* v, int64_t elem_bytes,
                      const int64_t* slots, int64_t T, int64_t row_elems) {
  const int64_t row = row_elems * elem_bytes;
  for (int64_t t = 0; t < T; ++t) {
    if (slots[t] < 0) continue;
    std::memcpy(static_cast<char*>(k_cache) + slots[t] * row, static_cast<const char*>(k) + t * row, row);
    std::memcpy(static_cast<char*>(v_cache) + slots[t] * row, static_cast<const char*>(v) + t * row, row);
  }
}

void paged_attention_decode_fwd_cpu(void* out, const void* q, const void* k_cache, const void* v_cache,
                                    DType dtype, const int32_t* block_tables,
                                    const int32_t* context_lens, int64_t Hq, int64_t Hkv, int64_t D,
                                    int64_t block_size, int64_t max_blocks, float scale,
                                    int64_t b_begin, int64_t b_end) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_v3()) {
    decode_v3(out, q, k_cache, v_cache, dtype, block_tables, context_lens, Hq, Hkv, D, block_size, max_blocks,
              scale, b_begin, b_end);
    return;
  }
#endif
  decode_base(out, q, k_cache, v_cache, dtype, block_tables, context_lens, Hq, Hkv, D, block_size, max_blocks,
              scale, b_begin, b_end);
}

void rms_norm_rows_cpu(void* out, const void* x, const void* w, DType dtype, int64_t rows, int64_t n, float eps) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_v3()) return rms_v3(out, x, w, dtype, rows, n, eps);
#endif
  rms_base(out, x, w, dtype, rows, n, eps);
}

void rope_rows_cpu(void* out, const void* x, const float* cos, const float* sin, DType dtype, int64_t B, int64_t H,
                   int64_t D) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_v3()) return rope_v3(out, x, cos, sin, dtype, B, H, D);
#endif
  rope_base(out, x, cos, sin, dtype, B, H, D);
}

}  // namespace reasonrl
