// Torch glue of the GRPO loss family: checks with messages that name the argument, then the CPU
// kernel (csrc/cpu/grpo.cpp) or the CUDA launcher (csrc/cuda/grpo.cu).
//
//   reasonrl::grpo_fwd(logp, old?, ref?, entropy?, mask, rewards, ..., row0) -> stats (B, 8)
//   reasonrl::grpo_bwd(scale, logp, old?, ref?, mask, rewards, ..., with_entropy, row0) ->
//       (grad_logp (B, T), grad_entropy (B, T), or (0,) when with_entropy is false)
// The (B, T) tensors may be rows [row0, row0 + B) of a larger batch whose rewards are all given
// (the fused LM-head path runs a chunk of whole sequences at a time).
// Every tensor is float32 and contiguous; the Python side (reasonrl/ops/grpo.py) converts.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "grpo.h"

#ifdef REASONRL_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace reasonrl {
namespace {

using OptT = std::optional<at::Tensor>;

#define GRPO_CHECK(cond, ...) TORCH_CHECK(cond, "reasonrl::grpo: ", __VA_ARGS__)

// Messages are built from plain strings: on the GPU machine (torch 2.11+cu130) streaming sizes()
// into TORCH_CHECK segfaulted in the other families' glue, so nothing but strings is streamed here.
std::string shape_str(at::IntArrayRef a) {
  std::string s = "(";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + (a.size() == 1 ? ",)" : ")");
}

std::string dev_str(const at::Device& d) {
  if (d.is_cuda()) return "cuda:" + std::to_string((int)d.index());
  return d.is_cpu() ? "cpu" : "a device other than cpu and cuda";
}

std::string num(int64_t v) { return std::to_string(v); }

void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Device& dev) {
  GRPO_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ",
             std::string(c10::toString(t.scalar_type())));
  GRPO_CHECK(t.sizes() == shape, name, " must have shape ", shape_str(shape), ", got ", shape_str(t.sizes()));
  GRPO_CHECK(t.is_contiguous(), name, " must be contiguous");
  GRPO_CHECK(t.device() == dev, name, " must be on ", dev_str(dev), " like logp, got ", dev_str(t.device()));
}

const float* opt_ptr(const OptT& t, const char* name, at::IntArrayRef shape, const at::Device& dev) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_f32(*t, name, shape, dev);
  return t->data_ptr<float>();
}

GRPOParams make_params(const at::Tensor& logp, const at::Tensor& rewards, int64_t G, int64_t advantage,
                       double std_eps, double eps_low, double eps_high, double dual_clip, double beta,
                       double entropy_coef, double clamp, bool sequence, int64_t row0) {
  GRPO_CHECK(logp.dim() == 2, "logp must be (B, T), got shape ", shape_str(logp.sizes()));
  const int64_t B = logp.size(0), T = logp.size(1);
  GRPO_CHECK(rewards.scalar_type() == at::kFloat && rewards.dim() == 1 && rewards.is_contiguous(),
             "rewards must be a contiguous float32 vector, got ", std::string(c10::toString(rewards.scalar_type())),
             " of shape ", shape_str(rewards.sizes()));
  GRPO_CHECK(rewards.device() == logp.device(), "rewards must be on ", dev_str(logp.device()), " like logp");
  const int64_t total = rewards.size(0);
  GRPO_CHECK(row0 >= 0 && row0 + B <= total, "rows [", num(row0), ", ", num(row0 + B),
             ") must lie within rewards of shape (", num(total), ",)");
  GRPO_CHECK(G >= 1 && total % G == 0, "group_size ", num(G), " must be >= 1 and divide B = ", num(total));
  GRPO_CHECK(advantage >= 0 && advantage <= 2, "advantage code must be 0, 1 or 2, got ", num(advantage));
  GRPO_CHECK(G >= 2 || advantage == kAdvDrGrpo, "group_size 1 needs advantage dr_grpo");
  GRPO_CHECK(clamp > 0, "clamp must be > 0, got ", std::to_string(clamp));
  GRPOParams p;
  p.B = B;
  p.T = T;
  p.G = G;
  p.row0 = row0;
  p.advantage = (int)advantage;
  p.std_eps = (float)std_eps;
  p.lo = (float)(1.0 - eps_low);
  p.hi = (float)(1.0 + eps_high);
  p.dual_clip = (float)dual_clip;
  p.beta = (float)beta;
  p.entropy_coef = (float)entropy_coef;
  p.clamp = (float)clamp;
  p.sequence = sequence;
  return p;
}

at::Tensor grpo_fwd(const at::Tensor& logp, const OptT& old, const OptT& ref, const OptT& entropy,
                    const at::Tensor& mask, const at::Tensor& rewards, int64_t group_size,
                    int64_t advantage, double std_eps, double eps_low, double eps_high,
                    double dual_clip, double beta, double entropy_coef, double clamp, bool sequence,
                    int64_t row0) {
  const GRPOParams p = make_params(logp, rewards, group_size, advantage, std_eps, eps_low, eps_high,
                                   dual_clip, beta, entropy_coef, clamp, sequence, row0);
  const auto dev = logp.device();
  check_f32(logp, "logp", {p.B, p.T}, dev);
  check_f32(mask, "mask", {p.B, p.T}, dev);
  const float* old_p = opt_ptr(old, "old_logprobs", {p.B, p.T}, dev);
  const float* ref_p = opt_ptr(ref, "ref_logprobs", {p.B, p.T}, dev);
  GRPO_CHECK(p.beta == 0.f || ref_p, "beta != 0 needs ref_logprobs");
  const float* ent_p = opt_ptr(entropy, "entropy", {p.B, p.T}, dev);
  auto stats = at::empty({p.B, GRPO_NSTATS}, logp.options());
  if (p.B == 0) return stats;
  if (dev.is_cpu()) {
    grpo_fwd_cpu(stats.data_ptr<float>(), logp.data_ptr<float>(), old_p, ref_p, ent_p,
                 mask.data_ptr<float>(), rewards.data_ptr<float>(), p);
  } else {
#ifdef REASONRL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(dev);
    const cudaError_t err = grpo_fwd_cuda(stats.data_ptr<float>(), logp.data_ptr<float>(), old_p,
                                          ref_p, ent_p, mask.data_ptr<float>(),
                                          rewards.data_ptr<float>(), p, at::cuda::getCurrentCUDAStream());
    GRPO_CHECK(err == cudaSuccess, "grpo_fwd_cuda launch failed: ", std::string(cudaGetErrorString(err)));
#else
    GRPO_CHECK(false, "reasonrl._C was built without CUDA; got a tensor on ", dev_str(dev));
#endif
  }
  return stats;
}

std::tuple<at::Tensor, at::Tensor> grpo_bwd(const at::Tensor& scale, const at::Tensor& logp,
                                            const OptT& old, const OptT& ref, const at::Tensor& mask,
                                            const at::Tensor& rewards, int64_t group_size,
                                            int64_t advantage, double std_eps, double eps_low,
                                            double eps_high, double dual_clip, double beta,
                                            double entropy_coef, double clamp, bool sequence,
                                            bool with_entropy, int64_t row0) {
  const GRPOParams p = make_params(logp, rewards, group_size, advantage, std_eps, eps_low, eps_high,
                                   dual_clip, beta, entropy_coef, clamp, sequence, row0);
  const auto dev = logp.device();
  check_f32(logp, "logp", {p.B, p.T}, dev);
  check_f32(mask, "mask", {p.B, p.T}, dev);
  check_f32(scale, "scale", {p.B}, dev);
  const float* old_p = opt_ptr(old, "old_logprobs", {p.B, p.T}, dev);
  const float* ref_p = opt_ptr(ref, "ref_logprobs", {p.B, p.T}, dev);
  GRPO_CHECK(p.beta == 0.f || ref_p, "beta != 0 needs ref_logprobs");
  auto grad_logp = at::empty({p.B, p.T}, logp.options());
  auto grad_ent = with_entropy ? at::empty({p.B, p.T}, logp.options()) : at::empty({0}, logp.options());
  float* ge = with_entropy ? grad_ent.data_ptr<float>() : nullptr;
  if (p.B == 0 || p.T == 0) return {grad_logp, grad_ent};
  if (dev.is_cpu()) {
    grpo_bwd_cpu(grad_logp.data_ptr<float>(), ge, scale.data_ptr<float>(), logp.data_ptr<float>(),
                 old_p, ref_p, mask.data_ptr<float>(), rewards.data_ptr<float>(), p);
  } else {
#ifdef REASONRL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(dev);
    const cudaError_t err = grpo_bwd_cuda(grad_logp.data_ptr<float>(), ge, scale.data_ptr<float>(),
                                          logp.data_ptr<float>(), old_p, ref_p, mask.data_ptr<float>(),
                                          rewards.data_ptr<float>(), p, at::cuda::getCurrentCUDAStream());
    GRPO_CHECK(err == cudaSuccess, "grpo_bwd_cuda launch failed: ", std::string(cudaGetErrorString(err)));
#else
    GRPO_CHECK(false, "reasonrl._C was built without CUDA; got a tensor on ", dev_str(dev));
#endif
  }
  return {grad_logp, grad_ent};
}

}  // namespace
}  // namespace reasonrl

TORCH_LIBRARY_FRAGMENT(reasonrl, m) {
  m.def(
      "grpo_fwd(Tensor logp, Tensor? old, Tensor? ref, Tensor? entropy, Tensor mask, Tensor rewards, "
      "int group_size, int advantage, float std_eps, float eps_low, float eps_high, float dual_clip, "
      "float beta, float entropy_coef, float clamp, bool sequence, int row0=0) -> Tensor");
  m.def(
      "grpo_bwd(Tensor scale, Tensor logp, Tensor? old, Tensor? ref, Tensor mask, Tensor rewards, "
      "int group_size, int advantage, float std_eps, float eps_low, float eps_high, float dual_clip, "
      "float beta, float entropy_coef, float clamp, bool sequence, bool with_entropy, int row0=0) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(reasonrl, CPU, m) {
  m.impl("grpo_fwd", &reasonrl::grpo_fwd);
  m.impl("grpo_bwd", &reasonrl::grpo_bwd);
}

#ifdef REASONRL_WITH_CUDA
TORCH_LIBRARY_IMPL(reasonrl, CUDA, m) {
  m.impl("grpo_fwd", &reasonrl::grpo_fwd);
  m.impl("grpo_bwd", &reasonrl::grpo_bwd);
}
#endif
