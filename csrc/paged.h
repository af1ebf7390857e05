// Declarations of the paged KV-cache family (csrc/paged.cpp glue, csrc/cpu/paged.cpp kernels).
// Layout: cache (num_blocks, block_size, Hkv, D) contiguous; slot = block * block_size + offset.
#pragma once
#include <cstdint>

#include "reasonrl.h"

namespace reasonrl {

// Copies rows t of k, v (T, Hkv * D contiguous, the cache's dtype) to cache slot slots[t]; -1 skips.
// Slots are checked by the caller.
void store_kv_fwd_cpu(void* k_cache, void* v_cache, const void* k, const void* v, int64_t elem_bytes,
                      const int64_t* slots, int64_t T, int64_t row_elems);

// Decode attention for sequences b in [b_begin, b_end). Query head hq reads kv head hq / G
// (G = Hq / Hkv). out, q: (B, Hq, D).
// block_tables (B, max_blocks), context_lens (B,) checked by the caller.
void paged_attention_decode_fwd_cpu(void* out, const void* q, const void* k_cache, const void* v_cache,
                                    DType dtype, const int32_t* block_tables,
                                    const int32_t* context_lens, int64_t Hq, int64_t Hkv, int64_t D,
                                    int64_t block_size, int64_t max_blocks, float scale,
                                    int64_t b_begin, int64_t b_end);

// Rows of n elements (dtype): out = dtype(w * dtype(x * rsqrt(mean(x^2) + eps))), as RMSNorm.forward.
void rms_norm_rows_cpu(void* out, const void* x, const void* w, DType dtype, int64_t rows, int64_t n, float eps);

// x, out (B, H, D) in dtype; cos, sin (B, D/2) float32: the rotation of functional._rotate.
void rope_rows_cpu(void* out, const void* x, const float* cos, const float* sin, DType dtype, int64_t B, int64_t H,
                   int64_t D);

// The decode steps' small-M float32 GEMM (csrc/cpu/gemm.cpp): y (M, N) = x (M, K) W^T + bias (nullptr: none)
// for output columns [n_begin, n_end), all contiguous; only where small_gemm_available(M, N, K) (AVX-512 and
// K % 16 == 0; or AVX2, K % 8 == 0 and M <= 16 or a weight of >= 8 MiB).
bool small_gemm_available(int64_t M, int64_t N, int64_t K);
void small_gemm_f32(const float* x, const float* W, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                    int64_t n_begin, int64_t n_end);

}  // namespace reasonrl
