// CPU kernels of the GRPO loss: one completion row per iteration (OpenMP over rows).
//
// A row owns everything the loss needs from it: its group's rewards (the advantage), all of its
// tokens (GSPO's sequence ratio is a mean over them, so it takes a first pass over the row), and its
// per-row sums (the "grpo" aggregation divides by its own token count). The caller turns the per-row
// sums into the loss and metrics; backward gets the row weight (upstream grad / normalizer) as
// `scale`. Sums are kept in double: B*T elements are cheap next to the B*T*V logits pass.
// NOTE: below 2^20 tokens the loop runs on one thread: at B*T = 65536 fwd + bwd took 2.9 ms on one
// thread and 40 ms with a 2-thread OpenMP team on a loaded 2-core machine (the team waits for a
// core); at B*T = 600, 9 us against 10-20 ms.
#include <cmath>
#include <cstdint>

#include "grpo.h"

namespace reasonrl {
namespace {

struct RowRatio {
  float rho = 1.f;   // exp(s_b), sequence level
  double msum = 0.;  // sum_t m
};

// GSPO: s_b = sum_t m lr / max(sum_t m, 1), with lr clamped per token.
RowRatio sequence_ratio(const float* logp, const float* old, const float* mask, const GRPOParams& p) {
  RowRatio r;
  double s = 0.;
  for (int64_t t = 0; t < p.T; ++t) {
    const float m = mask[t];
    if (m == 0.f) continue;
    float in;
    const float lr = old ? grpo_clamp(logp[t] - old[t], p.clamp, &in) : 0.f;
    s += (double)m * lr;
    r.msum += m;
  }
  r.rho = expf((float)(s / (r.msum > 1. ? r.msum : 1.)));
  return r;
}

void fwd_row(float* st, const float* logp, const float* old, const float* ref, const float* ent,
             const float* mask, float A, const GRPOParams& p) {
  RowRatio seq;
  if (p.sequence) seq = sequence_ratio(logp, old, mask, p);
  double loss = 0., msum = 0., kl_sum = 0., low = 0., high = 0., ent_sum = 0.;
  for (int64_t t = 0; t < p.T; ++t) {
    const float m = mask[t];
    if (m == 0.f) continue;
    float in, dpg, dkl;
    const float rho = p.sequence ? seq.rho : expf(old ? grpo_clamp(logp[t] - old[t], p.clamp, &in) : 0.f);
    float l = grpo_surrogate(rho, A, p, &dpg);
    if (p.beta != 0.f) {
      const float kl = grpo_kl(logp[t], ref[t], p.clamp, &dkl);
      l += p.beta * kl;
      kl_sum += (double)m * kl;
    }
    if (ent) {  // the metric always; the bonus only where asked (a NaN entropy must not reach a loss without it)
      if (p.entropy_coef != 0.f) l -= p.entropy_coef * ent[t];
      ent_sum += (double)m * ent[t];
    }
    loss += (double)m * l;
    msum += m;
    low += (rho < p.lo && A < 0.f) ? m : 0.f;
    high += (rho > p.hi && A > 0.f) ? m : 0.f;
  }
  st[kLossSum] = (float)loss;
  st[kMaskSum] = (float)msum;
  st[kKlSum] = (float)kl_sum;
  st[kClipLow] = (float)low;
  st[kClipHigh] = (float)high;
  st[kEntSum] = (float)ent_sum;
}

void bwd_row(float* gl, float* ge, float scale, const float* logp, const float* old, const float* ref,
             const float* mask, float A, const GRPOParams& p) {
  float seq_coef = 0.f;  // d (sum_t m pg) / d s_b, spread over the row's tokens through s_b
  if (p.sequence) {
    const RowRatio seq = sequence_ratio(logp, old, mask, p);
    float dpg;
    grpo_surrogate(seq.rho, A, p, &dpg);
    seq_coef = (float)(dpg * seq.rho * seq.msum / (seq.msum > 1. ? seq.msum : 1.));
  }
  for (int64_t t = 0; t < p.T; ++t) {
    const float m = mask[t];
    const float g = m != 0.f ? grpo_token_grad(logp[t], old ? old + t : nullptr, ref ? ref + t : nullptr, A,
                                               seq_coef, p)
                             : 0.f;
    gl[t] = scale * m * g;
    if (ge) ge[t] = -p.entropy_coef * scale * m;
  }
}

const float* row_of(const float* x, int64_t b, int64_t T) { return x ? x + b * T : nullptr; }

}  // namespace

void grpo_fwd_cpu(float* stats, const float* logp, const float* old, const float* ref,
                  const float* entropy, const float* mask, const float* rewards, const GRPOParams& p) {
#pragma omp parallel for schedule(static) if (p.B * p.T >= (1 << 20))
  for (int64_t b = 0; b < p.B; ++b) {
    bool zero_std;
    const float A = grpo_advantage(rewards, p.row0 + b, p, &zero_std);
    float* st = stats + b * GRPO_NSTATS;
    fwd_row(st, logp + b * p.T, row_of(old, b, p.T), row_of(ref, b, p.T), row_of(entropy, b, p.T),
            mask + b * p.T, A, p);
    st[kAdv] = A;
    st[kZeroStd] = zero_std ? 1.f : 0.f;
  }
}

void grpo_bwd_cpu(float* grad_logp, float* grad_entropy, const float* scale, const float* logp,
                  const float* old, const float* ref, const float* mask, const float* rewards,
                  const GRPOParams& p) {
#pragma omp parallel for schedule(static) if (p.B * p.T >= (1 << 20))
  for (int64_t b = 0; b < p.B; ++b) {
    bool zero_std;
    const float A = grpo_advantage(rewards, p.row0 + b, p, &zero_std);
    bwd_row(grad_logp + b * p.T, grad_entropy ? grad_entropy + b * p.T : nullptr, scale[b],
            logp + b * p.T, row_of(old, b, p.T), row_of(ref, b, p.T), mask + b * p.T, A, p);
  }
}

}  // namespace reasonrl
