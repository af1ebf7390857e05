// Declarations shared by the torch glue (csrc/*.cpp), the CPU kernels (csrc/cpu/*.cpp) and the CUDA
// kernels (csrc/cuda/*.cu). Kernel files include no torch headers: raw pointers, outputs first,
// a dtype code for the element type, and (CUDA) the stream passed in.
#pragma once
#include <cstdint>
#include <string>

namespace reasonrl {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

// ---- log-prob family (csrc/cpu/logprob.cpp, csrc/cuda/logprob.cu) --------------------------------
// x: rows [row_begin, row_end) of an N x V matrix with row stride `stride_x` (last dim contiguous).
// z = x * inv_t. Per row: logp = z[id] - logsumexp(z); entropy = logsumexp(z) - sum softmax(z) * z;
// lse[2 r], lse[2 r + 1] = m, log s: the row's largest x and log sum_j exp((x_j - m) * inv_t), so
// logsumexp(z) = m * inv_t + log s (two floats: one float32 rounds it by 5e-4 near 1e4).
// Rows whose id == ignore_index get logp = 0 and entropy = 0. entropy may be null (not computed).
void logprob_fwd_cpu(float* logp, float* lse, float* entropy, const void* x, DType dtype,
                     int64_t stride_x, const int64_t* ids, int64_t row_begin, int64_t row_end,
                     int64_t V, float inv_t, int64_t ignore_index);

// grad_x[r, j] = inv_t * (g[r] * (1[j + vocab_start == id] - p) + gh[r] * p * (c - d)),
// d = (x - m) * inv_t, p = exp(d - log s), c = log s - entropy (lse as the forward wrote it: (N, 2)).
// Columns j cover vocab ids [vocab_start, vocab_start + V).
// grad_entropy / entropy may be null (no entropy term). grad_x may alias x (in-place backward).
// Rows with id == ignore_index get zeros.
void logprob_bwd_cpu(void* grad_x, int64_t stride_g, const void* x, DType dtype, int64_t stride_x,
                     const int64_t* ids, const float* lse, const float* entropy,
                     const float* grad_logp, const float* grad_entropy, int64_t row_begin,
                     int64_t row_end, int64_t V, int64_t vocab_start, float inv_t,
                     int64_t ignore_index);

// The instruction set the CPU log-prob kernels and the fused training kernels (csrc/cpu/fused.cpp) run
// with: "x86-64-v4" (AVX-512), "x86-64-v3" (AVX2) or "x86-64" ("generic" off x86). `force` = "" only
// reports; "best" or one of the names switches (tests use it to reach every compiled path); an unknown
// name or one the CPU lacks throws std::invalid_argument.
std::string logprob_cpu_isa(const std::string& force);
// The same setting as a level: 4 (x86-64-v4), 3 (x86-64-v3) or 0 (baseline).
int cpu_isa_level();

#ifdef REASONRL_WITH_CUDA
}  // namespace reasonrl
#include <cuda_runtime.h>
namespace reasonrl {
void logprob_fwd_cuda(float* logp, float* lse, float* entropy, const void* x, DType dtype,
                      int64_t stride_x, const int64_t* ids, int64_t N, int64_t V, float inv_t,
                      int64_t ignore_index, cudaStream_t stream);
void logprob_bwd_cuda(void* grad_x, int64_t stride_g, const void* x, DType dtype, int64_t stride_x,
                      const int64_t* ids, const float* lse, const float* entropy,
                      const float* grad_logp, const float* grad_entropy, int64_t N, int64_t V,
                      int64_t vocab_start, float inv_t, int64_t ignore_index, cudaStream_t stream);
#endif

}  // namespace reasonrl
