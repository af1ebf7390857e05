// A float32 GEMM for decode steps' few rows: y (M, N) = x (M, K) W^T (+ bias), W (N, K) in nn.Linear's
// layout, read where it lies (no packing). AVX-512 (x86-64-v4) or AVX2 (x86-64-v3, tile8); small_gemm_available()
// says when.
//
// Why: with M <= 64 rows a decode step's matmuls are short, and MKL's sgemm copies (packs) every weight
// matrix before using it: in a SmolLM2-135M rollout (M = 32, fp32, 2 threads) the packing was 30% of
// the samples and the kernel 44%; the weights stream from DRAM every step, so the copy is a second
// pass over them. Here each output tile is 4 rows of x by 4 rows of W: 16 accumulators of 16 lanes,
// one k step = 4 x loads + 4 W loads + 16 FMAs, then one transpose-and-add tree turns the 16
// accumulators into the 16 dot products. The n loop is outside the m loop, so a tile's 4 W rows stay
// in L1 while every x row passes; x (M x K floats) stays in L2.
// NOTE: 30 layers of SmolLM2's matmuls at M = 32 (405 MiB of weights): MKL 106-110 ms (1 thread),
// 69-80 ms (2 threads); this kernel 94-97 ms and 48-49 ms. Tiny model's matmuls, M = 64: 1.3 -> 1.2 ms
// (1 thread), 0.8-0.9 -> 0.6 ms (2 threads). (2026-11-26, AMD EPYC, 2 cores.) Whole rollouts: see
// dlinear in csrc/paged.cpp (the tiny model's in-cache weights gained nothing there and keep MKL).
// Summation order: 16 lanes of partial sums over k, then a fixed tree; not MKL's order (equal up to
// float32 rounding, tests/test_paged_ops.py).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vector values only cross always-inlined internal functions
#endif
#include <cstdint>
#include <cstring>

#include "cpu/isa.h"
#include "cpu/simd.h"
#include "cpu/vec8.h"
#include "paged.h"

namespace reasonrl {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RR_GEMM_V4 1
namespace {

typedef float v16 __attribute__((vector_size(64)));

RR_INLINE v16 load16(const float* p) {
  v16 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}

RR_INLINE v8 fold(const v16& a) {  // lanes i and i + 8 added
  v8 lo, hi;
  std::memcpy(&lo, &a, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&a) + sizeof(lo), sizeof(hi));
  return lo + hi;
}

// One MR x NR output tile at rows m, columns n (MR, NR in {1, 4}); K % 16 == 0.
template <int MR, int NR>
__attribute__((target("arch=x86-64-v4"))) void tile(const float* x, const float* W, const float* bias, float* y,
                                                    int64_t N, int64_t K, int64_t m, int64_t n) {
  v16 acc[NR][MR] = {};
  const float* xr = x + m * K;
  const float* wr = W + n * K;
  for (int64_t k = 0; k < K; k += 16) {
    v16 c[MR];
    for (int i = 0; i < MR; ++i) c[i] = load16(xr + i * K + k);
    for (int j = 0; j < NR; ++j) {
      const v16 b = load16(wr + j * K + k);
      for (int i = 0; i < MR; ++i) acc[j][i] += c[i] * b;
    }
  }
  float out[NR][MR];
  if constexpr (MR == 4 && NR == 4) {
    v8 h[16];
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 4; ++i) h[4 * j + i] = fold(acc[j][i]);
    const v8 r0 = sum8(h), r1 = sum8(h + 8);  // r0: columns n, n + 1 (4 rows each); r1: n + 2, n + 3
    for (int i = 0; i < 4; ++i) {
      out[0][i] = r0[i];
      out[1][i] = r0[4 + i];
      out[2][i] = r1[i];
      out[3][i] = r1[4 + i];
    }
  } else {
    for (int j = 0; j < NR; ++j)
      for (int i = 0; i < MR; ++i) {
        const v8 f = fold(acc[j][i]);
        float s = 0.f;
        for (int l = 0; l < 8; ++l) s += f[l];
        out[j][i] = s;
      }
  }
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < MR; ++i) y[(m + i) * N + n + j] = out[j][i] + (bias ? bias[n + j] : 0.f);
}

// AVX2 + FMA (x86-64-v3), 16 ymm registers: 8-lane accumulators in MR x NR tiles with MR * NR <= 8
// (4 rows x 2 columns: 8 accumulators + 4 x loads + 1 W load live), K % 8 == 0; a full tile's 8
// accumulators become its 8 dot products in one sum8 tree.
RR_INLINE v8 load8f(const float* p) {
  v8 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}

template <int MR, int NR>
__attribute__((target("arch=x86-64-v3"))) void tile8(const float* x, const float* W, const float* bias, float* y,
                                                     int64_t N, int64_t K, int64_t m, int64_t n) {
  v8 acc[NR * MR] = {};  // acc[j * MR + i]: row m + i, column n + j
  const float* xr = x + m * K;
  const float* wr = W + n * K;
  for (int64_t k = 0; k < K; k += 8) {
    v8 c[MR];
    for (int i = 0; i < MR; ++i) c[i] = load8f(xr + i * K + k);
    for (int j = 0; j < NR; ++j) {
      const v8 b = load8f(wr + j * K + k);
      for (int i = 0; i < MR; ++i) acc[j * MR + i] += c[i] * b;
    }
  }
  float out[NR * MR];
  if constexpr (MR * NR == 8) {
    const v8 r = sum8(acc);
    for (int t = 0; t < 8; ++t) out[t] = r[t];
  } else {
    for (int t = 0; t < NR * MR; ++t) {
      float s = 0.f;
      for (int l = 0; l < 8; ++l) s += acc[t][l];
      out[t] = s;
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < MR; ++i) y[(m + i) * N + n + j] = out[j * MR + i] + (bias ? bias[n + j] : 0.f);
}

// One tile of VW-lane accumulators: the AVX-512 tile (VW = 16) or the AVX2 one (VW = 8).
template <int VW, int MR, int NR>
RR_INLINE void run_tile(const float* x, const float* W, const float* bias, float* y, int64_t N, int64_t K, int64_t m,
                        int64_t n) {
  if constexpr (VW == 16)
    tile<MR, NR>(x, W, bias, y, N, K, m, n);
  else
    tile8<MR, NR>(x, W, bias, y, N, K, m, n);
}

// Columns [n, n_end) NR at a time, then one at a time; for each, rows 4 at a time, then one.
template <int VW, int NR>
void tile_loops(const float* x, const float* W, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                int64_t n, int64_t n_end) {
  for (; n + NR <= n_end; n += NR) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) run_tile<VW, 4, NR>(x, W, bias, y, N, K, m, n);
    for (; m < M; ++m) run_tile<VW, 1, NR>(x, W, bias, y, N, K, m, n);
  }
  for (; n < n_end; ++n) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) run_tile<VW, 4, 1>(x, W, bias, y, N, K, m, n);
    for (; m < M; ++m) run_tile<VW, 1, 1>(x, W, bias, y, N, K, m, n);
  }
}

}  // namespace
#endif

bool small_gemm_available(int64_t M, int64_t N, int64_t K) {
#ifdef RR_GEMM_V4
  // cpu_isa_level(): the best ISA, or the one tests force through logprob_cpu_isa.
  // AVX2 (2 threads, AMD EPYC without AVX-512, 2026-11-27; SmolLM2's shapes against MKL): 1.45-1.5x at
  // M = 16, 0.9-1.05x at M = 24-48, 0.77x at M = 64 for its 0.4-3.4 MiB layer weights; the 108 MiB LM
  // head 1.9-2.2x at every M (MKL's packing copies it each call). So: few rows, or a large weight.
  const int isa = cpu_isa_level();
  if (K <= 0) return false;
  if (isa == 4) return K % 16 == 0;
  return isa == 3 && K % 8 == 0 && (M <= 16 || N * K * 4 >= (int64_t{8} << 20));
#else
  (void)M, (void)N, (void)K;
  return false;
#endif
}

void small_gemm_f32(const float* x, const float* W, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                    int64_t n_begin, int64_t n_end) {
#ifdef RR_GEMM_V4
  if (cpu_isa_level() == 3 || K % 16 != 0)  // AVX2 tiles (small_gemm_available: K % 8 == 0 then)
    tile_loops<8, 2>(x, W, bias, y, M, N, K, n_begin, n_end);
  else
    tile_loops<16, 4>(x, W, bias, y, M, N, K, n_begin, n_end);
#else
  (void)x, (void)W, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)n_begin, (void)n_end;
#endif
}

}  // namespace reasonrl
