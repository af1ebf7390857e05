// CPU kernels of the paged KV-cache family.
//
// store_kv: one memcpy of Hkv * D elements per token into its slot (a scatter; nothing to compute).
//
// paged decode attention, per sequence b and query head hq (kv head h = hq / G, G = Hq / Hkv):
//   s_gj = scale * <q_g, k_j>          j < n = context_lens[b], k_j at block_tables[b, j / bs], j % bs
//   out_g = sum_j exp(s_gj - m_g) v_j / sum_j exp(s_gj - m_g),   m_g = max_j s_gj
// exp is simd::fast_exp (1-2 ulp); the loops are `omp simd`, built for AVX2 + FMA (x86-64-v3) and
// for baseline x86-64, picked once at run time.
// One pass over the keys (scores kept in an Hq x n float buffer), one softmax pass, one pass over the
// values. A work item is a whole sequence: each token's row of all kv heads (contiguous in the cache)
// is read once for all query heads, so the grouped-query heads share it and blocks stream in order.
// Math in float32 whatever the cache dtype.
// NOTE: with one work item per (sequence, kv head) and an integer division per token, the tiny
// model's decode shape (B=64, H=4, n=80, D=32) took 780 us (CPU time, loaded 2-core machine): every
// token row was fetched once per head, from scattered addresses. Per sequence, block by block: see below.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/simd.h"
#include "paged.h"

namespace reasonrl {
namespace {


template <DType DT>
RR_INLINE void decode_range(void* out_, const void* q_, const void* kc_, const void* vc_, const int32_t* tables,
                            const int32_t* lens, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs,
                            int64_t max_blocks, float scale, int64_t b0, int64_t b1) {
  using E = Elem<DT>;
  using T = typename E::T;
  T* out = static_cast<T*>(out_);
  const T* q = static_cast<const T*>(q_);
  const T* kc = static_cast<const T*>(kc_);
  const T* vc = static_cast<const T*>(vc_);
  const int64_t G = Hq / Hkv, row = Hkv * D;  // a token's row: all kv heads, contiguous
  std::vector<float> qf(Hq * D), acc(Hq * D), s, m(Hq), l(Hq);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n = lens[b];
    const int32_t* table = tables + b * max_blocks;
    for (int64_t i = 0; i < Hq * D; ++i) qf[i] = E::load(q[b * Hq * D + i]) * scale;
    s.resize(Hq * n);
    // pass 1: scores, walking the context block by block (no division per token); each token's row
    // (all kv heads) is read once, for all Hq query heads
    for (int64_t j0 = 0, blk = 0; j0 < n; j0 += bs, ++blk) {
      const T* kb = kc + table[blk] * bs * row;
      const int64_t cnt = std::min(bs, n - j0);
      for (int64_t o = 0; o < cnt; ++o) {
        for (int64_t hq = 0; hq < Hq; ++hq) {
          const T* kj = kb + o * row + (hq / G) * D;
          const float* qh = qf.data() + hq * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qh[d] * E::load(kj[d]);
          s[hq * n + j0 + o] = dot;
        }
      }
    }
    // pass 2: softmax numerators and their sums
    for (int64_t hq = 0; hq < Hq; ++hq) {
      float* sh = s.data() + hq * n;
      const float mh = *std::max_element(sh, sh + n);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        sh[j] = simd::fast_exp(sh[j] - mh);
        sum += sh[j];
      }
      m[hq] = mh;
      l[hq] = 1.f / sum;
    }
    // pass 3: weighted values
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t j0 = 0, blk = 0; j0 < n; j0 += bs, ++blk) {
      const T* vb = vc + table[blk] * bs * row;
      const int64_t cnt = std::min(bs, n - j0);
      for (int64_t o = 0; o < cnt; ++o) {
        for (int64_t hq = 0; hq < Hq; ++hq) {
          const T* vj = vb + o * row + (hq / G) * D;
          const float p = s[hq * n + j0 + o];
          float* ah = acc.data() + hq * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ah[d] += p * E::load(vj[d]);
        }
      }
    }
    T* ob = out + b * Hq * D;
    for (int64_t hq = 0; hq < Hq; ++hq)
      for (int64_t d = 0; d < D; ++d) ob[hq * D + d] = E::store(acc[hq * D + d] * l[hq]);
  }
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

bool has_v3() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return v3;
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

}  // namespace reasonrl
