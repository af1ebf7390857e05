// CUDA kernels of the GRPO loss: one thread block per completion row (formulas: reasonrl/ops/grpo.py;
// the per-token math is shared with the CPU kernel through csrc/grpo.h).
//
// A block strides its threads over the row's T tokens and reduces its sums in shared memory, so a
// row's GSPO ratio (a first pass over the row) and its per-row sums need no second launch and no
// atomics: the result is deterministic. The bytes are B*T floats, small beside the B*T*V logits that
// the log-prob kernels read to produce logp: these kernels are latency-bound, one launch each way.
// Plain CUDA with raw pointers and no torch headers, so that CI compiles it alone with nvcc.
#include <cuda_runtime.h>

#include "grpo.h"

namespace reasonrl {
namespace {

constexpr int kMaxThreads = 256;

// Sum each of v[0..N) over the block; every thread gets the totals. smem: N * 32 floats.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i)
    for (int off = 16; off > 0; off >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
  if (lane == 0)
    for (int i = 0; i < N; ++i) smem[i * 32 + warp] = v[i];
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float x = 0.f;
    for (int w = 0; w < nwarps; ++w) x += smem[i * 32 + w];
    v[i] = x;
  }
  __syncthreads();  // smem is reused by the next reduction
}

// GSPO ratio of the row: exp(sum_t m lr / max(sum_t m, 1)); writes sum_t m.
__device__ float sequence_ratio(const float* logp, const float* old, const float* mask,
                                const GRPOParams& p, float* smem, float* msum) {
  float v[2] = {0.f, 0.f};
  for (int64_t t = threadIdx.x; t < p.T; t += blockDim.x) {
    const float m = mask[t];
    if (m == 0.f) continue;
    float in;
    v[0] += old ? m * grpo_clamp(logp[t] - old[t], p.clamp, &in) : 0.f;
    v[1] += m;
  }
  block_sum<2>(v, smem);
  *msum = v[1];
  return expf(v[0] / fmaxf(v[1], 1.f));
}

__global__ void grpo_fwd_kernel(float* __restrict__ stats, const float* __restrict__ logp,
                                const float* __restrict__ old, const float* __restrict__ ref,
                                const float* __restrict__ ent, const float* __restrict__ mask,
                                const float* __restrict__ rewards, GRPOParams p) {
  __shared__ float smem[6 * 32];
  const int64_t b = blockIdx.x, base = b * p.T;
  bool zero_std;
  const float A = grpo_advantage(rewards, p.row0 + b, p, &zero_std);
  logp += base;
  mask += base;
  old = old ? old + base : nullptr;
  ref = ref ? ref + base : nullptr;
  ent = ent ? ent + base : nullptr;
  float rho_seq = 1.f, msum_seq;
  if (p.sequence) rho_seq = sequence_ratio(logp, old, mask, p, smem, &msum_seq);
  float acc[6] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // loss, mask, kl, clip low, clip high, entropy
  for (int64_t t = threadIdx.x; t < p.T; t += blockDim.x) {
    const float m = mask[t];
    if (m == 0.f) continue;
    float in, dpg, dkl;
    const float rho = p.sequence ? rho_seq : expf(old ? grpo_clamp(logp[t] - old[t], p.clamp, &in) : 0.f);
    float l = grpo_surrogate(rho, A, p, &dpg);
    if (p.beta != 0.f) {
      const float kl = grpo_kl(logp[t], ref[t], p.clamp, &dkl);
      l += p.beta * kl;
      acc[2] += m * kl;
    }
    if (ent) {  // the metric always; the bonus only where asked (a NaN entropy must not reach a loss without it)
      if (p.entropy_coef != 0.f) l -= p.entropy_coef * ent[t];
      acc[5] += m * ent[t];
    }
    acc[0] += m * l;
    acc[1] += m;
    acc[3] += (rho < p.lo && A < 0.f) ? m : 0.f;
    acc[4] += (rho > p.hi && A > 0.f) ? m : 0.f;
  }
  block_sum<6>(acc, smem);
  if (threadIdx.x == 0) {
    float* st = stats + b * GRPO_NSTATS;
    st[kLossSum] = acc[0];
    st[kMaskSum] = acc[1];
    st[kKlSum] = acc[2];
    st[kClipLow] = acc[3];
    st[kClipHigh] = acc[4];
    st[kEntSum] = acc[5];
    st[kAdv] = A;
    st[kZeroStd] = zero_std ? 1.f : 0.f;
  }
}

__global__ void grpo_bwd_kernel(float* __restrict__ grad_logp, float* __restrict__ grad_ent,
                                const float* __restrict__ scale, const float* __restrict__ logp,
                                const float* __restrict__ old, const float* __restrict__ ref,
                                const float* __restrict__ mask, const float* __restrict__ rewards,
                                GRPOParams p) {
  __shared__ float smem[2 * 32];
  const int64_t b = blockIdx.x, base = b * p.T;
  bool zero_std;
  const float A = grpo_advantage(rewards, p.row0 + b, p, &zero_std);
  const float s = scale[b];
  logp += base;
  mask += base;
  grad_logp += base;
  grad_ent = grad_ent ? grad_ent + base : nullptr;
  old = old ? old + base : nullptr;
  ref = ref ? ref + base : nullptr;
  float seq_coef = 0.f;  // d (sum_t m pg) / d s_b
  if (p.sequence) {
    float msum, dpg;
    const float rho = sequence_ratio(logp, old, mask, p, smem, &msum);
    grpo_surrogate(rho, A, p, &dpg);
    seq_coef = dpg * rho * msum / fmaxf(msum, 1.f);
  }
  for (int64_t t = threadIdx.x; t < p.T; t += blockDim.x) {
    const float m = mask[t];
    const float g = m != 0.f ? grpo_token_grad(logp[t], old ? old + t : nullptr, ref ? ref + t : nullptr, A,
                                               seq_coef, p)
                             : 0.f;
    grad_logp[t] = s * m * g;
    if (grad_ent) grad_ent[t] = -p.entropy_coef * s * m;
  }
}

int threads_for(int64_t T) {
  const int64_t warps = (T + 31) / 32;
  return (int)(warps * 32 < kMaxThreads ? (warps < 1 ? 32 : warps * 32) : kMaxThreads);
}

}  // namespace

cudaError_t grpo_fwd_cuda(float* stats, const float* logp, const float* old, const float* ref,
                          const float* entropy, const float* mask, const float* rewards,
                          const GRPOParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  grpo_fwd_kernel<<<(unsigned)p.B, threads_for(p.T), 0, stream>>>(stats, logp, old, ref, entropy, mask,
                                                                   rewards, p);
  return cudaGetLastError();
}

cudaError_t grpo_bwd_cuda(float* grad_logp, float* grad_entropy, const float* scale,
                          const float* logp, const float* old, const float* ref, const float* mask,
                          const float* rewards, const GRPOParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.T == 0) return cudaSuccess;
  grpo_bwd_kernel<<<(unsigned)p.B, threads_for(p.T), 0, stream>>>(grad_logp, grad_entropy, scale, logp,
                                                                   old, ref, mask, rewards, p);
  return cudaGetLastError();
}

}  // namespace reasonrl
