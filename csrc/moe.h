// Declarations of the MoE family (csrc/moe.cpp glue, csrc/cpu/moe.cpp, csrc/cuda/moe.cu).
// Raw pointers, outputs first, no torch headers. Assignment a = t * K + k (token t, its k-th expert).
#pragma once
#include <cstdint>

#include "reasonrl.h"

namespace reasonrl {

// ---- routing (CPU) --------------------------------------------------------------------------------
// Tokens [t0, t1) of logits (T, E) float32: s = softmax or sigmoid, ids (T, K) = the K largest
// s + bias (bias may be null), larger first, ties to the lower expert id.
void moe_router_cpu(int64_t* ids, const float* logits, const float* bias, int64_t E, int64_t K, bool sigmoid,
                    int64_t t0, int64_t t1);

// Counting sort of the N = T*K assignments by expert (ids checked in [0, E) by the caller), stable:
// counts (E), offsets (E+1), sorted_idx (N); pos (N, may be null) = the inverse permutation.
void moe_dispatch_cpu(int32_t* counts, int32_t* offsets, int32_t* sorted_idx, int32_t* pos, const int64_t* ids,
                      int64_t N, int64_t E);

// padded_offsets (E+1) from counts rounded up to block_size; returns P = padded_offsets[E].
int64_t moe_padded_offsets_cpu(int32_t* padded_offsets, const int32_t* counts, int64_t E, int64_t block_size);

// padded_idx (P) = sorted_idx with each expert's segment padded by -1; block_expert (P / block_size).
void moe_pad_cpu(int32_t* padded_idx, int32_t* block_expert, const int32_t* sorted_idx, const int32_t* offsets,
                 const int32_t* padded_offsets, int64_t E, int64_t block_size);

// ---- expert compute helpers (CPU, float32, rows of length H / I contiguous) -------------------------
// dst[r] = src[sorted_idx[r] / K] for sorted rows r in [r0, r1): the token gather of a grouped GEMM.
void moe_gather_rows_cpu(float* dst, const float* src, const int32_t* sorted_idx, int64_t K, int64_t H,
                         int64_t r0, int64_t r1);

// act[r, i] = silu(h[r, i]) * h[r, I + i] for n rows; h is (n, 2I) = [gate | up].
void moe_swiglu_fwd_cpu(float* act, const float* h, int64_t n, int64_t I);

// Backward of act = silu(g) * u scaled by the row's routing weight w[r]:
//   given ga (n, I) = grad_out[t] @ W_down (the gradient of the unweighted expert output),
//   grad_w[r] = <ga[r], act[r]>, and with gact = w[r] * ga[r]:
//   h[r] <- [gact * u * silu'(g) | gact * silu(g)]   (h is overwritten by its gradient)
//   act[r] <- w[r] * act[r]                          (the operand of grad W_down)
void moe_swiglu_bwd_cpu(float* h, float* act, float* grad_w, const float* ga, const float* w, int64_t n,
                        int64_t I);

// out[t] = sum_k scale[t*K + k] * rows[pos[t*K + k]] for tokens [t0, t1), k in order (deterministic);
// scale may be null (1).
void moe_combine_cpu(float* out, const float* rows, const int32_t* pos, const float* scale, int64_t K, int64_t H,
                     int64_t t0, int64_t t1);

// The forward of n rows of one expert (xs (n, H); its weights wgu (2I, H), wd (H, I)) without a GEMM
// call, for experts with a few rows (decode): y (n, H); h (n, 2I) is scratch.
void moe_expert_rows_fwd_cpu(float* y, float* h, const float* xs, const float* wgu, const float* wd, int64_t n,
                             int64_t H, int64_t I);

#ifdef REASONRL_WITH_CUDA
}  // namespace reasonrl
#include <cuda_runtime.h>
namespace reasonrl {
// ---- routing (CUDA, csrc/cuda/moe.cu) --------------------------------------------------------------
// logits (T, E) contiguous in `dtype`, bias (E,) float32 or null -> ids (T, K) int64: moe_router_cpu's
// selection up to near-ties (scores in double here, float there, summed in another order; NaN scores
// rank last and a softmax row of only -inf scores 0 in both). E is at most 2048 (shared memory).
cudaError_t moe_router_cuda(int64_t* ids, const void* logits, DType dtype, const float* bias, int64_t T,
                            int64_t E, int64_t K, bool sigmoid, cudaStream_t stream);

// Stable counting sort of N assignments by expert on the device. `ids` int64 or int32 (ids_int64).
// ws: workspace of moe_dispatch_cuda_workspace(N, E) bytes. info (device, 2 x int32): info[0] = 1
// when an id lies outside [0, E); info[1] = P (the padded total; the unpadded total when block_size 0).
// counts (E), offsets (E+1), sorted_idx (N); padded_offsets (E+1) written when block_size > 0.
size_t moe_dispatch_cuda_workspace(int64_t N, int64_t E);
cudaError_t moe_dispatch_cuda(int32_t* counts, int32_t* offsets, int32_t* sorted_idx, int32_t* padded_offsets,
                              int32_t* info, const void* ids, bool ids_int64, int64_t N, int64_t E,
                              int64_t block_size, void* ws, cudaStream_t stream);
// After P is known: padded_idx (P) and block_expert (P / block_size).
cudaError_t moe_pad_cuda(int32_t* padded_idx, int32_t* block_expert, const int32_t* sorted_idx,
                         const int32_t* offsets, const int32_t* padded_offsets, int64_t N, int64_t E,
                         int64_t P, int64_t block_size, cudaStream_t stream);
#endif

}  // namespace reasonrl
