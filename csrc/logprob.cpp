// Torch glue of the log-prob family: argument checks with messages that name the argument, then the
// CPU kernels (rows split over threads) or the CUDA launchers (csrc/cuda/logprob.cu). Registers
//   reasonrl::logprob_fwd(logits (N, V), ids (N,), temperature, ignore_index, with_entropy)
//       -> (logp (N,), lse (N, 2), entropy (N,) or (0,))                    all float32
//       lse: per row (m, log s), the log-sum-exp m / T + log s as two floats (csrc/reasonrl.h)
//   reasonrl::logprob_bwd(logits (N, Vc), ids, lse (N, 2), entropy?, grad_logp, grad_entropy?,
//       temperature, ignore_index, vocab_start, grad_logits (N, Vc) mutated; may be logits itself)
//   reasonrl::logprob_cpu_isa(force="") -> the CPU kernels' instruction set (tests force each one)
// Math and layout: csrc/cpu/logprob.cpp, csrc/reasonrl.h.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include "glue.h"
#include "reasonrl.h"

#ifdef REASONRL_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace reasonrl {
namespace {

// Messages are built from plain strings: on the GPU machine (torch 2.11+cu130, g++ 13.3) streaming
// t.sizes() into TORCH_CHECK segfaulted (for this op and for store_kv_fwd alike), so shapes,
// strides, devices and numbers are formatted here.
std::string shape_str(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}

std::string dev_str(const at::Tensor& t) {
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device());
  return t.is_cpu() ? "cpu" : t.is_meta() ? "meta" : "a non-CPU, non-CUDA device";
}

std::string num(int64_t v) { return std::to_string(v); }


void check_logits(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D (N, V), got shape ", shape_str(x.sizes()));
  TORCH_CHECK(x.size(1) > 0, op, ": ", name, " must have at least one column, got shape ", shape_str(x.sizes()));
  TORCH_CHECK(x.size(1) <= INT32_MAX, op, ": ", name, " has ", num(x.size(1)),
              " columns; at most 2^31 - 1 are supported");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) == 1, op, ": ", name,
              " must have a contiguous last dim (stride(1) == 1), got strides ", shape_str(x.strides()));
}

// A per-row vector: shape (N,), dtype, and the device of the logits.
void check_row_vec(const at::Tensor& t, const char* op, const char* name, int64_t N,
                   at::ScalarType dtype, const at::Tensor& logits) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == N, op, ": ", name, " must have shape (N,) = (", num(N),
              ",) to match logits of shape ", shape_str(logits.sizes()), ", got ", shape_str(t.sizes()));
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " is on ", dev_str(t),
              " but logits is on ", dev_str(logits), "; all tensors must be on one device");
}

float inv_temperature(double temperature, const char* op) {
  TORCH_CHECK(std::isfinite(temperature) && temperature >= glue::kMinTemperature, op,
              ": temperature must be a finite number >= 1e-05, got ", glue::real(temperature));
  return static_cast<float>(1.0 / temperature);
}

// In-place backward is fine only over the very same elements (each is read before it is written);
// any other sharing of memory between the two (N, V) row ranges is refused.
bool partially_overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto span = [](const at::Tensor& t) {
    const char* p = static_cast<const char*>(t.data_ptr());
    const int64_t n = (t.size(0) - 1) * t.stride(0) + t.size(1);
    return std::make_pair(p, p + n * static_cast<int64_t>(t.element_size()));
  };
  auto [a0, a1] = span(a);
  auto [b0, b1] = span(b);
  const bool same = a0 == b0 && a.stride(0) == b.stride(0);
  return !same && a0 < b1 && b0 < a1;
}

// NOTE: ~64k elements per task keeps the parallel_for overhead (~us) far below a task's work.
int64_t row_grain(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 16) / V); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_fwd(const at::Tensor& logits,
                                                           const at::Tensor& ids, double temperature,
                                                           int64_t ignore_index, bool with_entropy) {
  const char* op = "logprob_fwd";
  check_logits(logits, op, "logits");
  const DType dt = glue::dtype_code(logits, op, "logits");
  const int64_t N = logits.size(0), V = logits.size(1);
  check_row_vec(ids, op, "ids", N, at::kLong, logits);
  const float inv_t = inv_temperature(temperature, op);

  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, opts), lse = at::empty({N, 2}, opts);
  at::Tensor ent = at::empty({with_entropy ? N : 0}, opts);
  if (N == 0) return {logp, lse, ent};
  const at::Tensor idc = ids.contiguous();
  float* ent_ptr = with_entropy ? ent.data_ptr<float>() : nullptr;

  if (logits.is_cuda()) {
#ifdef REASONRL_WITH_CUDA
    const c10::cuda::OptionalCUDAGuard guard(logits.device());
    try {
      logprob_fwd_cuda(logp.data_ptr<float>(), lse.data_ptr<float>(), ent_ptr, logits.data_ptr(), dt,
                       logits.stride(0), idc.data_ptr<int64_t>(), N, V, inv_t, ignore_index,
                       c10::cuda::getCurrentCUDAStream());
    } catch (const std::exception& e) {
      TORCH_CHECK(false, op, " (cuda): ", e.what());
    }
#else
    TORCH_CHECK(false, op, ": reasonrl._C was built without CUDA");
#endif
    return {logp, lse, ent};
  }
  TORCH_CHECK(logits.is_cpu(), op, ": logits must be a CPU or CUDA tensor, got one on ", dev_str(logits));
  const int64_t* idp = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {  // N reads next to N x V: free on the CPU (on CUDA: Python's job)
    const int64_t id = idp[i];
    TORCH_CHECK(id == ignore_index || (id >= 0 && id < V), op, ": ids[", num(i), "] = ", num(id),
                " is out of range [0, ", num(V), ") and is not ignore_index (", num(ignore_index), ")");
  }
  const void* x = logits.data_ptr();
  const int64_t stride_x = logits.stride(0);
  float *lp = logp.data_ptr<float>(), *ls = lse.data_ptr<float>();
  at::parallel_for(0, N, row_grain(V), [&](int64_t r0, int64_t r1) {
    logprob_fwd_cpu(lp, ls, ent_ptr, x, dt, stride_x, idp, r0, r1, V, inv_t, ignore_index);
  });
  return {logp, lse, ent};
}

void logprob_bwd(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& lse,
                 const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                 const std::optional<at::Tensor>& grad_entropy, double temperature,
                 int64_t ignore_index, int64_t vocab_start, at::Tensor& grad_logits) {
  const char* op = "logprob_bwd";
  check_logits(logits, op, "logits");
  const DType dt = glue::dtype_code(logits, op, "logits");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(grad_logits.sizes() == logits.sizes(), op, ": grad_logits must have the shape of logits ",
              shape_str(logits.sizes()), ", got ", shape_str(grad_logits.sizes()));
  TORCH_CHECK(grad_logits.scalar_type() == logits.scalar_type(), op,
              ": grad_logits must have the dtype of logits (", logits.scalar_type(), "), got ",
              grad_logits.scalar_type());
  TORCH_CHECK(grad_logits.device() == logits.device(), op, ": grad_logits is on ", dev_str(grad_logits),
              " but logits is on ", dev_str(logits), "; all tensors must be on one device");
  check_logits(grad_logits, op, "grad_logits");
  TORCH_CHECK(at::has_internal_overlap(grad_logits) != at::MemOverlap::Yes && (N <= 1 || grad_logits.stride(0) >= V),
              op, ": grad_logits has elements that share memory (an expanded tensor, or rows closer than V = ",
              V, " apart?); pass a tensor with its own storage");
  TORCH_CHECK(!partially_overlaps(grad_logits, logits), op,
              ": grad_logits overlaps logits without being logits itself; pass logits (in place) or a "
              "separate buffer");
  check_row_vec(ids, op, "ids", N, at::kLong, logits);
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == N && lse.size(1) == 2, op, ": lse must have shape (N, 2) = (",
              num(N), ", 2) (the forward's: per row the max logit and log s) to match logits of shape ",
              shape_str(logits.sizes()), ", got ", shape_str(lse.sizes()));
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be Float, got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == logits.device(), op, ": lse is on ", dev_str(lse), " but logits is on ",
              dev_str(logits), "; all tensors must be on one device");
  check_row_vec(grad_logp, op, "grad_logp", N, at::kFloat, logits);
  const bool with_ent = grad_entropy.has_value() && grad_entropy->defined();
  if (with_ent) {
    TORCH_CHECK(entropy.has_value() && entropy->defined(), op,
                ": grad_entropy was given but entropy is None; the entropy term needs both");
    check_row_vec(*entropy, op, "entropy", N, at::kFloat, logits);
    check_row_vec(*grad_entropy, op, "grad_entropy", N, at::kFloat, logits);
  }
  TORCH_CHECK(vocab_start >= 0, op, ": vocab_start must be >= 0, got ", num(vocab_start));
  const float inv_t = inv_temperature(temperature, op);
  if (N == 0) return;

  // (N,) vectors: autograd may hand in expanded (stride-0) gradients; copies are N floats.
  const at::Tensor idc = ids.contiguous(), lsec = lse.contiguous(), gc = grad_logp.contiguous();
  at::Tensor entc, ghc;
  if (with_ent) {
    entc = entropy->contiguous();
    ghc = grad_entropy->contiguous();
  }
  const float* ent_ptr = with_ent ? entc.data_ptr<float>() : nullptr;
  const float* gh_ptr = with_ent ? ghc.data_ptr<float>() : nullptr;
  void* gx = grad_logits.data_ptr();
  const void* x = logits.data_ptr();
  const int64_t stride_g = grad_logits.stride(0), stride_x = logits.stride(0);
  const int64_t* idp = idc.data_ptr<int64_t>();
  const float *lp = lsec.data_ptr<float>(), *gp = gc.data_ptr<float>();

  if (logits.is_cuda()) {
#ifdef REASONRL_WITH_CUDA
    const c10::cuda::OptionalCUDAGuard guard(logits.device());
    try {
      logprob_bwd_cuda(gx, stride_g, x, dt, stride_x, idp, lp, ent_ptr, gp, gh_ptr, N, V, vocab_start,
                       inv_t, ignore_index, c10::cuda::getCurrentCUDAStream());
    } catch (const std::exception& e) {
      TORCH_CHECK(false, op, " (cuda): ", e.what());
    }
#else
    TORCH_CHECK(false, op, ": reasonrl._C was built without CUDA");
#endif
    return;
  }
  TORCH_CHECK(logits.is_cpu(), op, ": logits must be a CPU or CUDA tensor, got one on ", dev_str(logits));
  at::parallel_for(0, N, row_grain(V), [&](int64_t r0, int64_t r1) {
    logprob_bwd_cpu(gx, stride_g, x, dt, stride_x, idp, lp, ent_ptr, gp, gh_ptr, r0, r1, V,
                    vocab_start, inv_t, ignore_index);
  });
}

// Shapes only, for torch.compile / opcheck (FakeTensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_fwd_meta(const at::Tensor& logits,
                                                                const at::Tensor& ids, double,
                                                                int64_t, bool with_entropy) {
  TORCH_CHECK(logits.dim() == 2, "logprob_fwd: logits must be 2-D (N, V), got shape ", shape_str(logits.sizes()));
  const int64_t N = logits.size(0);
  auto opts = logits.options().dtype(at::kFloat);
  return {at::empty({N}, opts), at::empty({N, 2}, opts), at::empty({with_entropy ? N : 0}, opts)};
}

void logprob_bwd_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const std::optional<at::Tensor>&, const at::Tensor&,
                      const std::optional<at::Tensor>&, double, int64_t, int64_t, at::Tensor&) {}

std::string cpu_isa(const std::string& force) {
  try {
    return logprob_cpu_isa(force);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

}  // namespace
}  // namespace reasonrl

TORCH_LIBRARY_FRAGMENT(reasonrl, m) {
  m.def(
      "logprob_fwd(Tensor logits, Tensor ids, float temperature, int ignore_index, bool with_entropy)"
      " -> (Tensor logp, Tensor lse, Tensor entropy)");
  m.def(
      "logprob_bwd(Tensor logits, Tensor ids, Tensor lse, Tensor? entropy, Tensor grad_logp,"
      " Tensor? grad_entropy, float temperature, int ignore_index, int vocab_start,"
      " Tensor(a!) grad_logits) -> ()");
  m.def("logprob_cpu_isa(str force=\"\") -> str", &reasonrl::cpu_isa);
}

TORCH_LIBRARY_IMPL(reasonrl, CPU, m) {
  m.impl("logprob_fwd", &reasonrl::logprob_fwd);
  m.impl("logprob_bwd", &reasonrl::logprob_bwd);
}

TORCH_LIBRARY_IMPL(reasonrl, Meta, m) {
  m.impl("logprob_fwd", &reasonrl::logprob_fwd_meta);
  m.impl("logprob_bwd", &reasonrl::logprob_bwd_meta);
}

#ifdef REASONRL_WITH_CUDA
TORCH_LIBRARY_IMPL(reasonrl, CUDA, m) {
  m.impl("logprob_fwd", &reasonrl::logprob_fwd);
  m.impl("logprob_bwd", &reasonrl::logprob_bwd);
}
#endif
