// Torch glue of the GRPO loss family: checks with messages that name the argument, then the CPU
// kernel (csrc/cpu/grpo.cpp) or the CUDA launcher (csrc/cuda/grpo.cu).
//
//   reasonrl::grpo_fwd(logp, old?, ref?, entropy?, mask, rewards, ..., row0) -> stats (B, 8)
//   reasonrl::grpo_bwd(scale, logp, old?, ref?, mask, rewards, ..., with_entropy, row0) ->
//       (grad_logp (B, T), grad_entropy (B, T), or (0,) when with_entropy is false)
//   reasonrl::grpo_logits(logits (B, T, V), grad (B, T, V) mutated, may be logits, ids (B*T,),
//       rewards, scale (B,), old?, ref?, ..., temperature, with_entropy, stage_bytes) ->
//       (logp (B*T,), entropy (B*T,) or (0,)): the token-level loss from logits in one pass per row
//       (the gradient of the loss written before the op returns; see grpo_logits below);
//       reasonrl::grpo_logits_inplace(logits mutated, ids, ...): the same with grad = logits
//   reasonrl::grpo_scale_grad_(grad (B, T, V) mutated, scale (1,)): grad *= scale unless scale == 1
//       (the single pass's backward; on CUDA without a host sync)
// The (B, T) tensors may be rows [row0, row0 + B) of a larger batch whose rewards are all given
// (the fused LM-head path runs a chunk of whole sequences at a time).
// Every tensor but the logits and their gradient (float32, bfloat16 or float16, rows contiguous) is
// float32 and contiguous; the Python side (reasonrl/ops/grpo.py) converts.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "glue.h"
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

// ---- the token-level loss from logits, one pass per row -------------------------------------------
// A token's d loss / d logp depends only on its own logp (and its old / ref log-probs, its row's
// advantage and weight) when the ratio is per token, so each row of logits is read, its log-prob and
// coefficient computed, and its gradient written right away: the second read of the row comes from
// cache (CPU: a 32000-wide f32 row is 125 KiB of L2; CUDA: shared memory and L2, csrc/cuda/logprob.cu)
// instead of a later backward's pass over all B*T*V logits. scale (B,) is the row weight w_b of
// reasonrl/ops/grpo.py's aggregation at upstream gradient 1. Rows whose id is -100 are masked: log-prob
// and entropy 0, a zero gradient row. GSPO (sequence ratios) is not row-local: refused here.
void check_rows3(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  GRPO_CHECK(t.dim() == 3, name, " must be (B, T, V), got shape ", shape_str(t.sizes()));
  GRPO_CHECK(t.sizes() == shape, name, " must have shape ", shape_str(shape), ", got ", shape_str(t.sizes()));
  GRPO_CHECK(t.size(2) > 0 && t.size(2) <= INT32_MAX, name, " must have 1 to 2^31 - 1 columns, got ",
             num(t.size(2)));
  GRPO_CHECK(t.stride(2) == 1 || t.size(2) == 1, name, " must have a contiguous last dim, got strides ",
             shape_str(t.strides()));
}

// Whether rows of a (B, T, V) tensor with unit last stride may share memory: by increasing stride,
// each outer dim must step past everything the inner ones span (reasonrl.ops.logprobs._rows_overlap).
bool rows_overlap(const at::Tensor& t) {
  std::pair<int64_t, int64_t> d[2] = {{t.stride(0), t.size(0)}, {t.stride(1), t.size(1)}};
  if (d[1].first < d[0].first) std::swap(d[0], d[1]);
  int64_t extent = t.size(2);
  for (const auto& [stride, size] : d) {
    if (size <= 1) continue;
    if (stride < extent) return true;
    extent += (size - 1) * stride;
  }
  return false;
}


std::tuple<at::Tensor, at::Tensor> grpo_logits(const at::Tensor& x, at::Tensor& grad, const at::Tensor& ids,
                                               const at::Tensor& rewards, const at::Tensor& scale,
                                               const OptT& old, const OptT& ref, int64_t group_size,
                                               int64_t advantage, double std_eps, double eps_low,
                                               double eps_high, double dual_clip, double beta,
                                               double entropy_coef, double clamp, bool sequence,
                                               double temperature, bool with_entropy, int64_t stage_bytes) {
  check_rows3(x, "logits", x.sizes());
  const int64_t B = x.size(0), T = x.size(1), V = x.size(2), N = B * T;
  const auto dev = x.device();
  GRPO_CHECK(!sequence, "grpo_logits takes the token-level ratio only (a GSPO sequence ratio is not "
             "known until the whole row of tokens is)");
  // make_params reads B and T from a (B, T) tensor: a view of the ids
  GRPO_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.size(0) == N && ids.is_contiguous(),
             "ids must be a contiguous int64 vector of B * T = ", num(N), " elements, got ",
             std::string(c10::toString(ids.scalar_type())), " of shape ", shape_str(ids.sizes()));
  GRPO_CHECK(ids.device() == dev, "ids must be on ", dev_str(dev), " like logits");
  GRPOParams p = make_params(ids.view({B, T}), rewards, group_size, advantage, std_eps, eps_low, eps_high,
                             dual_clip, beta, entropy_coef, clamp, false, 0);
  GRPO_CHECK(rewards.size(0) == B, "rewards must have shape (B,) = (", num(B), ",), got ",
             shape_str(rewards.sizes()));
  const DType dt = glue::dtype_code(x, "reasonrl::grpo_logits", "logits");
  check_rows3(grad, "grad", x.sizes());
  GRPO_CHECK(grad.scalar_type() == x.scalar_type(), "grad must have the dtype of logits");
  GRPO_CHECK(grad.device() == dev, "grad must be on ", dev_str(dev), " like logits");
  GRPO_CHECK(!rows_overlap(grad), "grad has rows that share memory (strides ", shape_str(grad.strides()),
             "); pass a tensor with its own storage");
  const bool same = grad.data_ptr() == x.data_ptr() && grad.strides() == x.strides();
  GRPO_CHECK(same || !grad.storage().is_alias_of(x.storage()),
             "grad shares memory with logits without being logits itself; pass logits (in place) or a "
             "separate buffer");
  check_f32(scale, "scale", {B}, dev);
  const float* old_p = opt_ptr(old, "old_logprobs", {B, T}, dev);
  const float* ref_p = opt_ptr(ref, "ref_logprobs", {B, T}, dev);
  GRPO_CHECK(p.beta == 0.f || ref_p, "beta != 0 needs ref_logprobs");
  GRPO_CHECK(std::isfinite(temperature) && temperature >= glue::kMinTemperature,
             "temperature must be a finite number >= 1e-05, got ", glue::real(temperature));
  const float inv_t = (float)(1.0 / temperature);
  const bool ent_f = with_entropy || p.entropy_coef != 0.f;  // the entropy bonus needs the entropy
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, opts), ent = at::empty({ent_f ? N : 0}, opts);
  if (N == 0) return {logp, ent};
  float* lp = logp.data_ptr<float>();
  float* en = ent_f ? ent.data_ptr<float>() : nullptr;
  const int64_t* idp = ids.data_ptr<int64_t>();
  const float *rw = rewards.data_ptr<float>(), *sc = scale.data_ptr<float>();
  const int64_t sxb = x.stride(0), sxt = x.stride(1), sgb = grad.stride(0), sgt = grad.stride(1);
  if (dev.is_cuda()) {
#ifdef REASONRL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(dev);
    try {
      grpo_logits_cuda(grad.data_ptr(), sgb, sgt, x.data_ptr(), sxb, sxt, dt, V, idp, lp, en, rw, sc, old_p,
                       ref_p, p, inv_t, stage_bytes, at::cuda::getCurrentCUDAStream());
    } catch (const std::exception& e) {
      GRPO_CHECK(false, "grpo_logits (cuda): ", e.what());
    }
#else
    GRPO_CHECK(false, "reasonrl._C was built without CUDA; got a tensor on ", dev_str(dev));
#endif
    return {logp, ent};
  }
  GRPO_CHECK(dev.is_cpu(), "logits must be a CPU or CUDA tensor, got one on ", dev_str(dev));
  for (int64_t r = 0; r < N; ++r)  // N reads beside N x V: free here (on CUDA: Python's deferred check)
    GRPO_CHECK(idp[r] == -100 || (idp[r] >= 0 && idp[r] < V), "ids[", num(r), "] = ", num(idp[r]),
               " is out of range [0, ", num(V), ") and is not -100 (masked)");
  const size_t es = x.element_size();
  const char* xb = static_cast<const char*>(x.data_ptr());
  char* gb = static_cast<char*>(grad.data_ptr());
  const float ent_coef = p.entropy_coef;
  at::parallel_for(0, N, std::max<int64_t>(1, (int64_t{1} << 16) / V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T;
      const void* xr = xb + (b * sxb + t * sxt) * (int64_t)es;
      void* gr = gb + (b * sgb + t * sgt) * (int64_t)es;
      float lse[2] = {0.f, 0.f}, h = 0.f, g = 0.f, gh = 0.f;  // lse: (m, log s), csrc/reasonrl.h
      if (idp[r] != -100) {
        logprob_fwd_cpu(lp + r, lse, ent_f ? &h : nullptr, xr, dt, V, idp + r, 0, 1, V, inv_t, -100);
        bool zero_std;
        const float A = grpo_advantage(rw, b, p, &zero_std);
        grpo_token_coefs(lp[r], old_p ? old_p + r : nullptr, ref_p ? ref_p + r : nullptr, A, sc[b], p, &g, &gh);
      } else {
        lp[r] = 0.f;
      }
      if (en) en[r] = h;
      // (the row was just read: the gradient pass reads it from cache) rows with id -100 get zeros
      logprob_bwd_cpu(gr, V, xr, dt, V, idp + r, lse, ent_coef != 0.f ? &h : nullptr, &g,
                      ent_coef != 0.f ? &gh : nullptr, 0, 1, V, 0, inv_t, -100);
    }
  });
  return {logp, ent};
}

// The in-place form: the gradient over the logits themselves (a schema of its own, so that the
// mutated tensor is not also passed as an input that is read only).
std::tuple<at::Tensor, at::Tensor> grpo_logits_inplace(at::Tensor& x, const at::Tensor& ids, const at::Tensor& rewards,
                                                       const at::Tensor& scale, const OptT& old, const OptT& ref,
                                                       int64_t group_size, int64_t advantage, double std_eps,
                                                       double eps_low, double eps_high, double dual_clip, double beta,
                                                       double entropy_coef, double clamp, bool sequence,
                                                       double temperature, bool with_entropy, int64_t stage_bytes) {
  return grpo_logits(x, x, ids, rewards, scale, old, ref, group_size, advantage, std_eps, eps_low, eps_high,
                     dual_clip, beta, entropy_coef, clamp, sequence, temperature, with_entropy, stage_bytes);
}

// The single pass's backward: grad (B, T, V) (rows contiguous) *= scale[0] unless scale[0] == 1, the
// common case that leaves it as the forward wrote it. On CUDA the kernel reads the scale itself, so the
// host never waits to learn it (a sync there left the GPU idle for the rest of the backward's host
// work); on the CPU the value is read here.
void grpo_scale_grad_(at::Tensor& grad, const at::Tensor& scale) {
  GRPO_CHECK(grad.dim() == 3, "grad must be (B, T, V), got shape ", shape_str(grad.sizes()));
  GRPO_CHECK(grad.size(2) <= 1 || grad.stride(2) == 1, "grad's rows (its last dim) must be contiguous");
  const at::Device dev = grad.device();
  GRPO_CHECK(scale.scalar_type() == at::kFloat, "scale must be float32, got ",
             std::string(c10::toString(scale.scalar_type())));
  GRPO_CHECK(scale.sizes() == at::IntArrayRef({1}), "scale must have shape (1,), got ", shape_str(scale.sizes()));
  GRPO_CHECK(scale.device() == dev, "scale must be on ", dev_str(dev), " like grad, got ", dev_str(scale.device()));
  const DType dt = glue::dtype_code(grad, "reasonrl::grpo_scale_grad_", "grad");
  const int64_t B = grad.size(0), T = grad.size(1), V = grad.size(2);
  if (B * T == 0 || V == 0) return;
  GRPO_CHECK(!rows_overlap(grad), "grad has rows that share memory (strides ", shape_str(grad.strides()),
             "): each would be scaled more than once");
  if (dev.is_cuda()) {
#ifdef REASONRL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(dev);
    try {
      grpo_scale_grad_cuda(grad.data_ptr(), grad.stride(0), grad.stride(1), dt, B, T, V, scale.data_ptr<float>(),
                           at::cuda::getCurrentCUDAStream());
    } catch (const std::exception& e) {
      GRPO_CHECK(false, "grpo_scale_grad_ (cuda): ", e.what());
    }
#else
    GRPO_CHECK(false, "reasonrl._C was built without CUDA; got a tensor on ", dev_str(dev));
#endif
    return;
  }
  GRPO_CHECK(dev.is_cpu(), "grad must be a CPU or CUDA tensor, got one on ", dev_str(dev));
  const float v = scale.item<float>();
  if (v != 1.f) {
    // below autograd and the version counter, as the CUDA kernel is: the caller bumps the version
    at::AutoDispatchBelowADInplaceOrView guard;
    grad.mul_(v);
  }
}

}  // namespace
}  // namespace reasonrl

TORCH_LIBRARY_FRAGMENT(reasonrl, m) {
  m.def("grpo_scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");
  m.def(
      "grpo_logits_inplace(Tensor(a!) logits, Tensor ids, Tensor rewards, Tensor scale, Tensor? old, "
      "Tensor? ref, int group_size, int advantage, float std_eps, float eps_low, float eps_high, "
      "float dual_clip, float beta, float entropy_coef, float clamp, bool sequence, float temperature, "
      "bool with_entropy, int stage_bytes=-1) -> (Tensor, Tensor)");
  m.def(
      "grpo_logits(Tensor logits, Tensor(a!) grad, Tensor ids, Tensor rewards, Tensor scale, Tensor? old, "
      "Tensor? ref, int group_size, int advantage, float std_eps, float eps_low, float eps_high, "
      "float dual_clip, float beta, float entropy_coef, float clamp, bool sequence, float temperature, "
      "bool with_entropy, int stage_bytes=-1) -> (Tensor, Tensor)");
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
  m.impl("grpo_logits", &reasonrl::grpo_logits);
  m.impl("grpo_logits_inplace", &reasonrl::grpo_logits_inplace);
  m.impl("grpo_scale_grad_", &reasonrl::grpo_scale_grad_);
}


#ifdef REASONRL_WITH_CUDA
TORCH_LIBRARY_IMPL(reasonrl, CUDA, m) {
  m.impl("grpo_fwd", &reasonrl::grpo_fwd);
  m.impl("grpo_bwd", &reasonrl::grpo_bwd);
  m.impl("grpo_logits", &reasonrl::grpo_logits);
  m.impl("grpo_logits_inplace", &reasonrl::grpo_logits_inplace);
  m.impl("grpo_scale_grad_", &reasonrl::grpo_scale_grad_);
}
#endif
