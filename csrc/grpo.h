// The GRPO loss family: per-completion-row forward (loss contributions, metrics) and backward
// (d loss / d logp, d loss / d entropy). The formulas are written out in reasonrl/ops/grpo.py.
//
// Shared by the torch glue (csrc/grpo.cpp), the CPU kernel (csrc/cpu/grpo.cpp) and the CUDA kernel
// (csrc/cuda/grpo.cu): no torch headers. All tensors are float32, contiguous (B, T) or (B,).
// The per-token math lives here once, as inline host/device functions, so that the CPU and CUDA
// kernels cannot drift apart.
#pragma once
#include <cmath>
#include <cstdint>

#include "reasonrl.h"

#if defined(__CUDACC__)
#define GRPO_HD __host__ __device__ __forceinline__
#else
#define GRPO_HD inline
#endif

namespace reasonrl {

// Per-row statistics written by the forward, (B, GRPO_NSTATS) float32.
enum GRPOStat : int {
  kLossSum = 0,   // sum_t m l
  kMaskSum = 1,   // sum_t m
  kKlSum = 2,     // sum_t m kl
  kClipLow = 3,   // sum_t m [rho < 1 - eps_low and A < 0]
  kClipHigh = 4,  // sum_t m [rho > 1 + eps_high and A > 0]
  kEntSum = 5,    // sum_t m H
  kAdv = 6,       // A_b
  kZeroStd = 7,   // 1 if the row's group has equal rewards
  GRPO_NSTATS = 8
};

enum GRPOAdvantage : int { kAdvGrpo = 0, kAdvDrGrpo = 1, kAdvRloo = 2 };

struct GRPOParams {
  int64_t B, T, G;
  int64_t row0;        // rows are rows [row0, row0 + B) of the batch that `rewards` covers
  int advantage;       // GRPOAdvantage
  float std_eps;
  float lo, hi;        // 1 - eps_low, 1 + eps_high
  float dual_clip;     // <= 0: none
  float beta;          // 0: ref not read
  float entropy_coef;
  float clamp;         // log-ratio bound C
  bool sequence;       // GSPO sequence-level ratio
};

// Group advantage of (global) row b (double: G additions, exact enough to detect equal rewards).
GRPO_HD float grpo_advantage(const float* rewards, int64_t b, const GRPOParams& p, bool* zero_std) {
  const int64_t g0 = (b / p.G) * p.G;
  double sum = 0.0, mn = rewards[g0], mx = rewards[g0];
  for (int64_t i = 0; i < p.G; ++i) {
    double r = rewards[g0 + i];
    sum += r;
    mn = r < mn ? r : mn;
    mx = r > mx ? r : mx;
  }
  *zero_std = (mn == mx);
  if (*zero_std) return 0.f;
  const double rb = rewards[b], mean = sum / (double)p.G;
  if (p.advantage == kAdvDrGrpo) return (float)(rb - mean);
  if (p.advantage == kAdvRloo) return (float)(rb - (sum - rb) / (double)(p.G - 1));
  double ss = 0.0;
  for (int64_t i = 0; i < p.G; ++i) {
    double d = rewards[g0 + i] - mean;
    ss += d * d;
  }
  return (float)((rb - mean) / (sqrt(ss / (double)(p.G - 1)) + (double)p.std_eps));
}

// Clamped log-ratio x in [-C, C]; *inside = torch.clamp's gradient (1 on the closed interval).
GRPO_HD float grpo_clamp(float x, float C, float* inside) {
  *inside = (x >= -C && x <= C) ? 1.f : 0.f;
  return x < -C ? -C : (x > C ? C : x);
}

// Clipped surrogate (with optional dual clip) at ratio rho and advantage A: returns pg and writes
// d pg / d rho. The unclipped branch wins ties: there both branches have the same gradient.
GRPO_HD float grpo_surrogate(float rho, float A, const GRPOParams& p, float* dpg) {
  const float clipped = rho < p.lo ? p.lo : (rho > p.hi ? p.hi : rho);
  const float u = -A * rho, c = -A * clipped;
  float pg = u;
  *dpg = -A;
  if (c > u) {  // clipped branch strictly larger: rho is outside [lo, hi], flat there
    pg = c;
    *dpg = 0.f;
  }
  if (p.dual_clip > 0.f && A < 0.f) {
    const float cap = -p.dual_clip * A;
    if (cap < pg) {
      pg = cap;
      *dpg = 0.f;
    }
  }
  return pg;
}

// k3 KL at d = clamp(ref - logp): returns kl and writes d kl / d logp. expm1f: exp(d) - d - 1 in float
// lost the KL to rounding near d = 0 (true 5e-9 at d = 1e-4, error ~1e-7), where GRPO starts.
GRPO_HD float grpo_kl(float logp, float ref, float C, float* dkl) {
  float in;
  const float d = grpo_clamp(ref - logp, C, &in);
  const float em1 = expm1f(d);
  *dkl = -in * em1;
  return em1 - d;
}

// d loss / d logp[t] of one unmasked token, before the row's scale. seq_coef is the sequence-level
// (GSPO) coefficient of the row, used when p.sequence; old / ref may be null.
GRPO_HD float grpo_token_grad(float logp, const float* old, const float* ref, float A, float seq_coef,
                              const GRPOParams& p) {
  float in = 1.f, dpg, dkl, g;
  const float lr = old ? grpo_clamp(logp - *old, p.clamp, &in) : 0.f;
  if (p.sequence) {
    g = seq_coef * in;
  } else {
    const float rho = expf(lr);
    grpo_surrogate(rho, A, p, &dpg);
    g = dpg * rho * in;
  }
  if (p.beta != 0.f) {
    grpo_kl(logp, *ref, p.clamp, &dkl);
    g += p.beta * dkl;
  }
  return g;
}

// d loss / d logp and d loss / d entropy of token (b, t) of the token-level loss, unmasked, at row
// scale s (upstream grad * the row's weight): what grpo_bwd writes for it, known as soon as logp is.
// The single-pass logits kernels (grpo_logits) compute it between their two reads of the row.
GRPO_HD void grpo_token_coefs(float logp, const float* old, const float* ref, float A, float s,
                              const GRPOParams& p, float* g, float* gh) {
  *g = s * grpo_token_grad(logp, old, ref, A, 0.f, p);
  *gh = -p.entropy_coef * s;
}

// CPU kernels (csrc/cpu/grpo.cpp). old / ref / entropy may be null (on-policy / beta 0 / none).
void grpo_fwd_cpu(float* stats, const float* logp, const float* old, const float* ref,
                  const float* entropy, const float* mask, const float* rewards, const GRPOParams& p);
// grad_entropy may be null (entropy_coef == 0). scale (B,) = upstream grad * the row's weight.
void grpo_bwd_cpu(float* grad_logp, float* grad_entropy, const float* scale, const float* logp,
                  const float* old, const float* ref, const float* mask, const float* rewards,
                  const GRPOParams& p);

}  // namespace reasonrl

#ifdef REASONRL_WITH_CUDA
#include <cuda_runtime.h>
namespace reasonrl {
// Launchers return the launch's error (cudaGetLastError) for the glue to report.
cudaError_t grpo_fwd_cuda(float* stats, const float* logp, const float* old, const float* ref,
                          const float* entropy, const float* mask, const float* rewards,
                          const GRPOParams& p, cudaStream_t stream);
cudaError_t grpo_bwd_cuda(float* grad_logp, float* grad_entropy, const float* scale,
                          const float* logp, const float* old, const float* ref, const float* mask,
                          const float* rewards, const GRPOParams& p, cudaStream_t stream);
// GRPO from logits in one kernel (csrc/cuda/logprob.cu): see grpo_logits_cpu. stage_bytes: how much of
// each row the block keeps in shared memory between its two reads (< 0: the whole row where it fits
// one block, else what lets two blocks share an SM).
void grpo_logits_cuda(void* grad_x, int64_t stride_gb, int64_t stride_gt, const void* x,
                      int64_t stride_xb, int64_t stride_xt, DType dtype, int64_t V, const int64_t* ids,
                      float* logp, float* entropy, const float* rewards, const float* scale,
                      const float* old, const float* ref, const GRPOParams& p, float inv_t,
                      int64_t stage_bytes, cudaStream_t stream);
// grad (B*T rows of V, row r at b * stride_gb + t * stride_gt elements) *= *scale unless *scale == 1;
// the kernel reads the scale (device memory), the host never does.
void grpo_scale_grad_cuda(void* grad, int64_t stride_gb, int64_t stride_gt, DType dtype, int64_t B, int64_t T,
                          int64_t V, const float* scale, cudaStream_t stream);
}  // namespace reasonrl
#endif
