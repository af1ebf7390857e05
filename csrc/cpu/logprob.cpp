// CPU kernels of the log-prob family: log p(id | x / T), entropy, and the gradient to the logits.
//
// Per row, z = x * inv_t (x: logits in f32 / bf16 / f16, math in float32):
//   forward  m = max_j x_j (a pass over raw x: inv_t > 0, so max z = m * inv_t)
//            d_j = (x_j - m) * inv_t <= 0,  s = sum_j exp(d_j),  t = sum_j exp(d_j) d_j
//            logp = d_id - log s,  entropy = log s - t / s
//            (entropy = lse - sum_j p_j z_j, taken relative to the max so no large terms cancel)
//            saved for backward: lse = (m, log s), two floats per row (lse = m * inv_t + log s)
//   backward d_j = (x_j - m) * inv_t,  p_j = exp(d_j - log s),  c = log s - entropy,
//            grad_x_j = inv_t * (g * (1[j + vocab_start == id] - p_j) + gh * p_j * (c - d_j))
//            (c - d_j = lse - entropy - z_j). The log-sum-exp is kept as two floats because one
//            float32 lse rounds by up to 5e-4 at logits near 1e4 (1.5e-5 near 1e3), and every p_j of
//            the row then carries that relative error: 2e-4 in the gradient at 1e4 against PyTorch's
//            1e-7. Relative to the max, the subtraction x_j - m is exact wherever p_j matters.
// Rows whose id == ignore_index: logp = entropy = 0 and a zero gradient row.
//
// Nothing of size V is materialized: forward reads each row twice (the second read hits L2: a
// 32000-wide f32 row is 125 KiB), backward reads it once and writes the gradient once, possibly
// over the logits themselves (each element is loaded before the same iteration stores it).
//
// NOTE: N=2048, V=32000, fp32, 2 cores (AMD EPYC, AVX-512 path, a shared and busy machine), through
// token_logprobs(backend="cpp") fwd+bwd: 354 ms (150 ms with inplace_backward) vs eager PyTorch
// 1811 ms in the same run; peak extra memory 286 MiB (36 MiB in place) vs 788 MiB. Most of the
// out-of-place time is first-touch page faults of the new 250 MiB gradient, not the kernel
// (fwd 41 ms, bwd into a warm buffer 48 ms when the machine was quiet).
//
// The loops are `#pragma omp simd` over branchless code (csrc/cpu/simd.h: polynomial exp, bf16/f16
// conversions), compiled three times: for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and plain
// x86-64 (SSE2); a dispatcher picks the best the CPU supports once. We dispatch by hand rather than
// with target_clones so that tests can force each path (logprob_set_cpu_isa) on one machine.
// Floating-point ops here never trap (we read no FP exception flags), and telling GCC so lets it
// if-convert the selects in fast_exp and the conversions: without it only the AVX-512 build (which
// has masked ops) vectorizes the exp loops. NaN and inf semantics are unchanged.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/isa.h"
#include "cpu/simd.h"
#include "reasonrl.h"

namespace reasonrl {
namespace {

using simd::fast_exp;


constexpr int64_t kBlock = 512;

template <DType D, bool Ent>
RR_INLINE void fwd_rows(float* logp, float* lse, float* entropy, const void* x, int64_t stride_x,
                        const int64_t* ids, int64_t r0, int64_t r1, int64_t V, float inv_t,
                        int64_t ignore_index) {
  using E = Elem<D>;
  using T = typename E::T;
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = static_cast<const T*>(x) + r * stride_x;  // V elements
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; ++j) {
      float v = E::load(row[j]);
      m = v > m ? v : m;  // a NaN is skipped here and poisons s below
    }
    // Sums in blocks of kBlock columns, added up in double: a single float accumulator per lane
    // (8000 terms each for SSE2 at V = 32000) made the entropy, and through c = log s - entropy the
    // gradient, several times less accurate than PyTorch's cascade sum.
    double s = 0.0, t = 0.0;
    for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
      const int64_t j1 = j0 + kBlock < V ? j0 + kBlock : V;
      float bs = 0.f, bt = 0.f;
      if (Ent) {
#pragma omp simd reduction(+ : bs, bt)
        for (int64_t j = j0; j < j1; ++j) {
          float d = (E::load(row[j]) - m) * inv_t;
          float e = fast_exp(d);
          bs += e;
          bt += e * (d < -87.3f ? 0.f : d);  // e == 0 there; keeps -inf logits from making 0 * -inf
        }
      } else {
#pragma omp simd reduction(+ : bs)
        for (int64_t j = j0; j < j1; ++j) bs += fast_exp((E::load(row[j]) - m) * inv_t);
      }
      s += bs;
      t += bt;
    }
    // Per-row scalars in double, rounded once.
    const double log_s = std::log(s);
    lse[2 * r] = m;
    lse[2 * r + 1] = static_cast<float>(log_s);
    const int64_t id = ids[r];
    const bool keep = id != ignore_index;
    const bool in_range = id >= 0 && id < V;  // the glue checks; never read outside the row
    const double d_id = (static_cast<double>(E::load(row[in_range ? id : 0])) - m) * inv_t;
    logp[r] = keep ? (in_range ? static_cast<float>(d_id - log_s) : NAN) : 0.f;
    if (Ent) entropy[r] = keep ? static_cast<float>(log_s - t / s) : 0.f;
  }
}

template <DType D, bool Ent>
RR_INLINE void bwd_rows(void* grad_x, int64_t stride_g, const void* x, int64_t stride_x,
                        const int64_t* ids, const float* lse, const float* entropy,
                        const float* grad_logp, const float* grad_entropy, int64_t r0, int64_t r1,
                        int64_t V, int64_t vocab_start, float inv_t, int64_t ignore_index) {
  using E = Elem<D>;
  using T = typename E::T;
  for (int64_t r = r0; r < r1; ++r) {
    // No __restrict: gx may be xr itself (in-place backward).
    const T* xr = static_cast<const T*>(x) + r * stride_x;  // Vc elements
    T* gx = static_cast<T*>(grad_x) + r * stride_g;
    const int64_t id = ids[r];
    if (id == ignore_index) {
      const T zero = E::store(0.f);
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) gx[j] = zero;
      continue;
    }
    const float m = lse[2 * r], ls = lse[2 * r + 1];
    const float g = grad_logp[r] * inv_t;  // fold 1/T into the per-row constants
    // The one-hot column, as an index into this chunk; -1 when the id lies in another chunk. A
    // 32-bit compare in the loop keeps the vector lanes as wide as the float ones.
    const int64_t local = id - vocab_start;
    const int32_t target = (local >= 0 && local < V) ? static_cast<int32_t>(local) : -1;
    if (Ent) {
      const float gh = grad_entropy[r] * inv_t;
      const float c = ls - entropy[r];
#pragma omp simd
      for (int32_t j = 0; j < static_cast<int32_t>(V); ++j) {
        float d = (E::load(xr[j]) - m) * inv_t;
        float p = fast_exp(d - ls);
        float pz = p * (c - d);
        pz = p == 0.f ? 0.f : pz;  // a -inf logit: p = 0 and c - d = inf; NaN still propagates
        float dz = (j == target ? g : 0.f) - g * p + gh * pz;
        gx[j] = E::store(dz);
      }
    } else {
#pragma omp simd
      for (int32_t j = 0; j < static_cast<int32_t>(V); ++j) {
        float p = fast_exp((E::load(xr[j]) - m) * inv_t - ls);
        gx[j] = E::store((j == target ? g : 0.f) - g * p);
      }
    }
  }
}

// ---- one non-template entry per ISA; the template bodies are always_inline into each ------------
#define RR_FWD_ARGS                                                                            \
  float *logp, float *lse, float *entropy, const void *x, DType dtype, int64_t stride_x,       \
      const int64_t *ids, int64_t r0, int64_t r1, int64_t V, float inv_t, int64_t ignore_index
#define RR_BWD_ARGS                                                                             \
  void *grad_x, int64_t stride_g, const void *x, DType dtype, int64_t stride_x,                 \
      const int64_t *ids, const float *lse, const float *entropy, const float *grad_logp,       \
      const float *grad_entropy, int64_t r0, int64_t r1, int64_t V, int64_t vocab_start,        \
      float inv_t, int64_t ignore_index

#define RR_FWD_BODY                                                                           \
  {                                                                                           \
    const bool ent = entropy != nullptr;                                                      \
    switch (dtype) {                                                                          \
      case DType::f32:                                                                        \
        return ent ? fwd_rows<DType::f32, true>(logp, lse, entropy, x, stride_x, ids, r0, r1, \
                                                V, inv_t, ignore_index)                       \
                   : fwd_rows<DType::f32, false>(logp, lse, entropy, x, stride_x, ids, r0,    \
                                                 r1, V, inv_t, ignore_index);                 \
      case DType::bf16:                                                                       \
        return ent ? fwd_rows<DType::bf16, true>(logp, lse, entropy, x, stride_x, ids, r0,    \
                                                 r1, V, inv_t, ignore_index)                  \
                   : fwd_rows<DType::bf16, false>(logp, lse, entropy, x, stride_x, ids, r0,   \
                                                  r1, V, inv_t, ignore_index);                \
      case DType::f16:                                                                        \
        return ent ? fwd_rows<DType::f16, true>(logp, lse, entropy, x, stride_x, ids, r0, r1, \
                                                V, inv_t, ignore_index)                       \
                   : fwd_rows<DType::f16, false>(logp, lse, entropy, x, stride_x, ids, r0,    \
                                                 r1, V, inv_t, ignore_index);                 \
    }                                                                                         \
  }

#define RR_BWD_CALL(D, E)                                                                     \
  bwd_rows<D, E>(grad_x, stride_g, x, stride_x, ids, lse, entropy, grad_logp, grad_entropy, r0, \
                 r1, V, vocab_start, inv_t, ignore_index)
#define RR_BWD_BODY                                                                     \
  {                                                                                     \
    const bool ent = grad_entropy != nullptr;                                           \
    switch (dtype) {                                                                    \
      case DType::f32:                                                                  \
        return ent ? RR_BWD_CALL(DType::f32, true) : RR_BWD_CALL(DType::f32, false);    \
      case DType::bf16:                                                                 \
        return ent ? RR_BWD_CALL(DType::bf16, true) : RR_BWD_CALL(DType::bf16, false);  \
      case DType::f16:                                                                  \
        return ent ? RR_BWD_CALL(DType::f16, true) : RR_BWD_CALL(DType::f16, false);    \
    }                                                                                   \
  }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RR_X86_CLONES 1
__attribute__((target("arch=x86-64-v4"))) void fwd_v4(RR_FWD_ARGS) RR_FWD_BODY
__attribute__((target("arch=x86-64-v3"))) void fwd_v3(RR_FWD_ARGS) RR_FWD_BODY
__attribute__((target("arch=x86-64-v4"))) void bwd_v4(RR_BWD_ARGS) RR_BWD_BODY
__attribute__((target("arch=x86-64-v3"))) void bwd_v3(RR_BWD_ARGS) RR_BWD_BODY
#endif
void fwd_base(RR_FWD_ARGS) RR_FWD_BODY
void bwd_base(RR_BWD_ARGS) RR_BWD_BODY

// ---- dispatch ------------------------------------------------------------------------------------
enum Isa : int { kBase = 0, kV3 = 1, kV4 = 2 };

int best_isa() {
#ifdef RR_X86_CLONES
  if (cpu_x86_64_v4()) return kV4;
  if (cpu_x86_64_v3()) return kV3;
#endif
  return kBase;
}

std::atomic<int>& isa_in_use() {
  static std::atomic<int> isa{best_isa()};
  return isa;
}

#if defined(__x86_64__)
constexpr const char* kBaseName = "x86-64";
#else
constexpr const char* kBaseName = "generic";  // other CPUs: one build, the compiler's default target
#endif

const char* isa_name(int isa) { return isa == kV4 ? "x86-64-v4" : isa == kV3 ? "x86-64-v3" : kBaseName; }

}  // namespace

void logprob_fwd_cpu(float* logp, float* lse, float* entropy, const void* x, DType dtype,
                     int64_t stride_x, const int64_t* ids, int64_t row_begin, int64_t row_end,
                     int64_t V, float inv_t, int64_t ignore_index) {
  switch (isa_in_use().load(std::memory_order_relaxed)) {
#ifdef RR_X86_CLONES
    case kV4:
      return fwd_v4(logp, lse, entropy, x, dtype, stride_x, ids, row_begin, row_end, V, inv_t,
                    ignore_index);
    case kV3:
      return fwd_v3(logp, lse, entropy, x, dtype, stride_x, ids, row_begin, row_end, V, inv_t,
                    ignore_index);
#endif
    default:
      return fwd_base(logp, lse, entropy, x, dtype, stride_x, ids, row_begin, row_end, V, inv_t,
                      ignore_index);
  }
}

void logprob_bwd_cpu(void* grad_x, int64_t stride_g, const void* x, DType dtype, int64_t stride_x,
                     const int64_t* ids, const float* lse, const float* entropy,
                     const float* grad_logp, const float* grad_entropy, int64_t row_begin,
                     int64_t row_end, int64_t V, int64_t vocab_start, float inv_t,
                     int64_t ignore_index) {
  switch (isa_in_use().load(std::memory_order_relaxed)) {
#ifdef RR_X86_CLONES
    case kV4:
      return bwd_v4(grad_x, stride_g, x, dtype, stride_x, ids, lse, entropy, grad_logp,
                    grad_entropy, row_begin, row_end, V, vocab_start, inv_t, ignore_index);
    case kV3:
      return bwd_v3(grad_x, stride_g, x, dtype, stride_x, ids, lse, entropy, grad_logp,
                    grad_entropy, row_begin, row_end, V, vocab_start, inv_t, ignore_index);
#endif
    default:
      return bwd_base(grad_x, stride_g, x, dtype, stride_x, ids, lse, entropy, grad_logp,
                      grad_entropy, row_begin, row_end, V, vocab_start, inv_t, ignore_index);
  }
}

int cpu_isa_level() {
  const int isa = isa_in_use().load(std::memory_order_relaxed);
  return isa == kV4 ? 4 : isa == kV3 ? 3 : 0;
}

std::string logprob_cpu_isa(const std::string& force) {
  if (!force.empty()) {
    int want = force == "best"        ? best_isa()
               : force == "x86-64-v4" ? kV4
               : force == "x86-64-v3" ? kV3
               : force == kBaseName   ? kBase
                                      : -1;
    if (want < 0)
      throw std::invalid_argument(std::string("logprob_cpu_isa: isa must be '', 'best', '") + kBaseName +
                                  "', 'x86-64-v3' or 'x86-64-v4', got '" + force + "'");
    if (want > best_isa())
      throw std::invalid_argument(std::string("logprob_cpu_isa: this CPU does not support ") +
                                  force + " (best: " + isa_name(best_isa()) + ")");
    isa_in_use().store(want);
  }
  return isa_name(isa_in_use().load());
}

}  // namespace reasonrl
