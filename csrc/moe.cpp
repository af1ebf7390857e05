// Torch glue of the MoE family: checks with messages that name the argument, then the CPU kernels of
// csrc/cpu/moe.cpp or the CUDA launchers of csrc/cuda/moe.cu. Registers
//   reasonrl::moe_router_fwd(logits (T, E), top_k, sigmoid, bias (E,)?) -> ids (T, K) int64
//   reasonrl::moe_dispatch_fwd(topk_ids (T, K), E, block_size) -> [counts, offsets, sorted_idx
//                              (, padded_offsets, padded_idx, block_expert) when block_size > 0]
//   reasonrl::moe_experts_fwd(x (T, H), ids (T, K) int64, w (T, K) f32, w_gate_up (E, 2I, H),
//                             w_down (E, H, I)) -> out (T, H)                       CPU only
//   reasonrl::moe_experts_bwd(grad_out, x, ids, w, w_gate_up, w_down, need_x, need_w, need_gate_up,
//                             need_down) -> (grad_x, grad_w, grad_gate_up, grad_down)  CPU only
//
// The CPU expert compute is a grouped GEMM by hand: a counting sort of the T*K assignments by expert,
// the tokens gathered into expert-sorted rows, per expert two at::mm (MKL) with SwiGLU between, and
// a per-token combine in k order (deterministic). Backward saves nothing but the inputs: it recomputes
// each expert's (n_e, 2I) gate/up rows (two GEMMs of seven per expert) instead of keeping a T*K-row
// buffer from the forward; its buffers live for the call only. Math in float32 for every input dtype.
// NOTE (bench_moe.py, loaded 2-core AMD EPYC, fp32, fwd+bwd, 1 thread): T=512 H=128 I=64 E=32 top-4
// 9.95 ms vs 66.6 ms for the per-expert loop (6.7x) and 14.7 ms for torch._grouped_mm; Qwen3-shaped
// E=128 top-8 I=48: 22.5 ms vs 646 ms (28.7x), _grouped_mm 30.0 ms. GEMMs (MKL) are about half of it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <exception>
#include <omp.h>
#include <optional>
#include <string>
#include <vector>

#include "glue.h"
#include "moe.h"

#ifdef REASONRL_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace reasonrl {
namespace {

using glue::dt_name;  // messages from plain strings (glue.h)
using glue::num;
using glue::shape;

bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf || s == at::kDouble;
}

void check_ids(const at::Tensor& ids, const char* op) {
  TORCH_CHECK_VALUE(ids.dim() == 2, op, ": topk_ids must be (T, K), got shape ", shape(ids.sizes()));
  TORCH_CHECK_VALUE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
                    ": topk_ids must be int64 or int32, got ", dt_name(ids));
}

// ids (N) int64 on the CPU: every value in [0, E), else a ValueError naming topk_ids.
void check_id_values_cpu(const int64_t* ids, int64_t N, int64_t E, const char* op) {
  for (int64_t a = 0; a < N; ++a) {
    TORCH_CHECK_VALUE(ids[a] >= 0 && ids[a] < E, op, ": topk_ids values must be in [0, ", num(E), "), got ",
                      num(ids[a]), " at flat index ", num(a));
  }
}

// ---- router -----------------------------------------------------------------------------------------
at::Tensor moe_router_fwd(const at::Tensor& logits, int64_t K, bool sigmoid, const std::optional<at::Tensor>& bias) {
  const char* op = "moe_router_fwd";
  TORCH_CHECK_VALUE(logits.dim() == 2 && is_float(logits), op, ": router_logits must be a float (T, E) tensor, got ",
                    dt_name(logits), " of shape ", shape(logits.sizes()));
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK_VALUE(K >= 1 && K <= E, op, ": top_k must be in [1, E=", num(E), "], got ", num(K));
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == E && b.scalar_type() == at::kFloat && b.is_contiguous(), op,
                      ": bias must be a contiguous float32 (", num(E), ",) tensor, got ", dt_name(b), " of shape ",
                      shape(b.sizes()));
    TORCH_CHECK_VALUE(b.device() == logits.device(), op, ": bias must be on router_logits' device");
    bp = b.data_ptr<float>();
  }
  at::Tensor ids = at::empty({T, K}, logits.options().dtype(at::kLong));
  if (T == 0) return ids;
  if (logits.device().is_cpu()) {
    const at::Tensor z = logits.to(at::kFloat).contiguous();
    at::parallel_for(0, T, std::max<int64_t>(1, 32768 / E), [&](int64_t t0, int64_t t1) {
      moe_router_cpu(ids.data_ptr<int64_t>(), z.data_ptr<float>(), bp, E, K, sigmoid, t0, t1);
    });
    return ids;
  }
#ifdef REASONRL_WITH_CUDA
  TORCH_CHECK_VALUE(E <= 2048, op, ": the CUDA router takes at most 2048 experts, got E=", num(E),
                    " (backend='auto' runs the reference there)");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor z = logits.scalar_type() == at::kDouble ? logits.to(at::kFloat) : logits;
  z = z.contiguous();
  const DType dt = z.scalar_type() == at::kFloat ? DType::f32 : z.scalar_type() == at::kBFloat16 ? DType::bf16
                                                                                                  : DType::f16;
  const cudaError_t err = moe_router_cuda(ids.data_ptr<int64_t>(), z.data_ptr(), dt, bp, T, E, K, sigmoid,
                                          at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": moe_router_cuda launch failed: ", std::string(cudaGetErrorString(err)));
  return ids;
#else
  TORCH_CHECK(false, op, ": reasonrl._C was built without CUDA; router_logits is not a CPU tensor");
#endif
}

// ---- dispatch -----------------------------------------------------------------------------------------
std::vector<at::Tensor> moe_dispatch_fwd(const at::Tensor& topk_ids, int64_t E, int64_t block_size) {
  const char* op = "moe_dispatch_fwd";
  check_ids(topk_ids, op);
  TORCH_CHECK_VALUE(E >= 1, op, ": num_experts must be >= 1, got ", num(E));
  TORCH_CHECK_VALUE(block_size >= 0, op, ": block_size must be >= 0, got ", num(block_size));
  const int64_t N = topk_ids.numel();
  TORCH_CHECK_VALUE(N < (int64_t(1) << 31), op, ": T*K = ", num(N), " does not fit the int32 indices");
  TORCH_CHECK_VALUE(block_size == 0 || N + E * (block_size - 1) < (int64_t(1) << 31), op, ": block_size=",
                    num(block_size), " with ", num(E), " experts and T*K = ", num(N),
                    " can pad past the int32 indices (T*K + E*(block_size-1) must be < 2**31)");
  const auto iopt = topk_ids.options().dtype(at::kInt);
  at::Tensor counts = at::empty({E}, iopt), offsets = at::empty({E + 1}, iopt), sorted = at::empty({N}, iopt);
  at::Tensor poff = at::empty({block_size > 0 ? E + 1 : 0}, iopt);
  int64_t P = 0;
  if (topk_ids.device().is_cpu()) {
    const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
    check_id_values_cpu(ids.data_ptr<int64_t>(), N, E, op);
    moe_dispatch_cpu(counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), sorted.data_ptr<int32_t>(), nullptr,
                     ids.data_ptr<int64_t>(), N, E);
    if (block_size == 0) return {counts, offsets, sorted};
    P = moe_padded_offsets_cpu(poff.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), E, block_size);
    at::Tensor pidx = at::empty({P}, iopt), bexp = at::empty({P / block_size}, iopt);
    moe_pad_cpu(pidx.data_ptr<int32_t>(), bexp.data_ptr<int32_t>(), sorted.data_ptr<int32_t>(),
                offsets.data_ptr<int32_t>(), poff.data_ptr<int32_t>(), E, block_size);
    return {counts, offsets, sorted, poff, pidx, bexp};
  }
#ifdef REASONRL_WITH_CUDA
  TORCH_CHECK_VALUE(E <= 12288, op, ": the CUDA dispatch takes at most 12288 experts (a 48 KiB histogram per "
                    "block), got E=", num(E), " (backend='auto' runs the reference there)");
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor ids = topk_ids.contiguous();
  at::Tensor info = at::zeros({2}, iopt);
  at::Tensor ws = at::empty({(int64_t)moe_dispatch_cuda_workspace(N, E)}, topk_ids.options().dtype(at::kByte));
  cudaError_t err = moe_dispatch_cuda(counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
                                      sorted.data_ptr<int32_t>(), block_size > 0 ? poff.data_ptr<int32_t>() : nullptr,
                                      info.data_ptr<int32_t>(), ids.data_ptr(), ids.scalar_type() == at::kLong, N, E,
                                      block_size, ws.data_ptr(), stream);
  TORCH_CHECK(err == cudaSuccess, op, ": moe_dispatch_cuda launch failed: ", std::string(cudaGetErrorString(err)));
  // One small device-to-host copy: the id check, and P to size padded_idx.
  const at::Tensor host = info.cpu();
  TORCH_CHECK_VALUE(host.data_ptr<int32_t>()[0] == 0, op, ": topk_ids values must be in [0, ", num(E), ")");
  if (block_size == 0) return {counts, offsets, sorted};
  P = host.data_ptr<int32_t>()[1];
  at::Tensor pidx = at::empty({P}, iopt), bexp = at::empty({P / block_size}, iopt);
  err = moe_pad_cuda(pidx.data_ptr<int32_t>(), bexp.data_ptr<int32_t>(), sorted.data_ptr<int32_t>(),
                     offsets.data_ptr<int32_t>(), poff.data_ptr<int32_t>(), N, E, P, block_size, stream);
  TORCH_CHECK(err == cudaSuccess, op, ": moe_pad_cuda launch failed: ", std::string(cudaGetErrorString(err)));
  return {counts, offsets, sorted, poff, pidx, bexp};
#else
  (void)P;
  TORCH_CHECK(false, op, ": reasonrl._C was built without CUDA; topk_ids is not a CPU tensor");
#endif
}

// ---- experts (CPU) ------------------------------------------------------------------------------------
struct Experts {
  int64_t T, H, E, I, K, N;
  at::Tensor x, ids, w, wgu, wd;  // float32 contiguous copies (views when already so)
  at::Tensor counts, offsets, sorted, pos;  // dispatch, int32
};

Experts prepare(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& w, const at::Tensor& wgu,
                const at::Tensor& wd, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be (T, H), got shape ", shape(x.sizes()));
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK_VALUE(wgu.dim() == 3 && wgu.size(2) == H && wgu.size(1) % 2 == 0, op, ": w_gate_up must be (E, 2I, H=",
                    num(H), "), got shape ", shape(wgu.sizes()));
  const int64_t E = wgu.size(0), I = wgu.size(1) / 2;
  TORCH_CHECK_VALUE(wd.dim() == 3 && wd.size(0) == E && wd.size(1) == H && wd.size(2) == I, op,
                    ": w_down must be (E, H, I) = (", num(E), ", ", num(H), ", ", num(I), "), got shape ",
                    shape(wd.sizes()));
  const auto dt = x.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
                    ": x must be float32, bfloat16 or float16, got ", dt_name(x));
  TORCH_CHECK_VALUE(wgu.scalar_type() == dt && wd.scalar_type() == dt, op,
                    ": w_gate_up and w_down must have x's dtype ", dt_name(x), ", got ", dt_name(wgu), " and ",
                    dt_name(wd));
  check_ids(ids, op);
  TORCH_CHECK_VALUE(ids.size(0) == T, op, ": topk_ids must have T=", num(T), " rows, got shape ", shape(ids.sizes()));
  const int64_t K = ids.size(1);
  TORCH_CHECK_VALUE(w.sizes() == ids.sizes() && w.scalar_type() == at::kFloat, op,
                    ": topk_weights must be float32 of topk_ids' shape ", shape(ids.sizes()), ", got ", dt_name(w),
                    " of shape ", shape(w.sizes()));
  for (const auto* t : {&x, &ids, &w, &wgu, &wd}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": the cpp backend takes CPU tensors");
  }
  Experts p{T, H, E, I, K, T * K};
  TORCH_CHECK_VALUE(p.N < (int64_t(1) << 31), op, ": T*K = ", num(p.N), " does not fit the int32 indices");
  // Detached: the GEMMs may run on OpenMP threads, whose thread-local state has grad mode on and the
  // autograd keys not excluded, and at::mm_out refuses inputs that require grad there.
  p.x = x.detach().to(at::kFloat).contiguous();
  p.ids = ids.to(at::kLong).contiguous();
  p.w = w.detach().contiguous();
  p.wgu = wgu.detach().to(at::kFloat).contiguous();
  p.wd = wd.detach().to(at::kFloat).contiguous();
  check_id_values_cpu(p.ids.data_ptr<int64_t>(), p.N, E, op);
  const auto iopt = x.options().dtype(at::kInt);
  p.counts = at::empty({E}, iopt);
  p.offsets = at::empty({E + 1}, iopt);
  p.sorted = at::empty({p.N}, iopt);
  p.pos = at::empty({p.N}, iopt);
  moe_dispatch_cpu(p.counts.data_ptr<int32_t>(), p.offsets.data_ptr<int32_t>(), p.sorted.data_ptr<int32_t>(),
                   p.pos.data_ptr<int32_t>(), p.ids.data_ptr<int64_t>(), p.N, E);
  return p;
}

// Experts with at most this many rows skip at::mm (a call costs a few us, the rows' work less).
// NOTE: decode T=16, E=32, top-4 (2 rows per expert), 1 thread, loaded 2-core CPU: see bench_moe.py.
constexpr int64_t kFewRows = 4;

// Per-thread scratch rows of one expert at a time: its gathered tokens, gate/up, activation and the
// activation's gradient. Sized by the largest expert, so they stay in cache instead of spanning T*K rows.
struct Scratch {
  at::Tensor x, h, a, ga;  // (maxc, H), (maxc, 2I), (maxc, I), (maxc, I)
};

// Runs fn(e, row0, rows, scratch) for every expert with rows. Experts go to threads largest first
// (dynamic schedule, MKL single-threaded inside); when one expert holds most rows, or there are few,
// the experts run one after another and MKL threads each GEMM instead.
template <class F>
void for_each_expert(const Experts& p, bool with_grad, const F& fn) {
  const int32_t* c = p.counts.data_ptr<int32_t>();
  const int32_t* o = p.offsets.data_ptr<int32_t>();
  std::vector<int64_t> order;
  int64_t maxc = 0;
  for (int64_t e = 0; e < p.E; ++e) {
    if (c[e] > 0) order.push_back(e);
    maxc = std::max<int64_t>(maxc, c[e]);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return c[a] > c[b]; });
  const int64_t n = static_cast<int64_t>(order.size());
  int nt = at::get_num_threads();
  if (nt <= 1 || n < 2 * nt || maxc * nt > p.N) nt = 1;
  const auto fopt = p.x.options();
  std::vector<Scratch> scratch(nt);
  for (auto& sc : scratch) {
    sc.x = at::empty({maxc, p.H}, fopt);
    sc.h = at::empty({maxc, 2 * p.I}, fopt);
    sc.a = at::empty({maxc, p.I}, fopt);
    if (with_grad) sc.ga = at::empty({maxc, p.I}, fopt);
  }
  if (nt == 1) {
    for (int64_t e : order) fn(e, o[e], c[e], scratch[0]);
    return;
  }
  std::exception_ptr err;  // an exception must not leave an OpenMP region: keep the first, rethrow
  // The caller's thread-local state (inference mode above all: the scratch tensors made under
  // torch.inference_mode are inference tensors, which only inference mode may write) goes to the
  // workers, as at::parallel_for does.
  const at::ThreadLocalState tls;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t i = 0; i < n; ++i) {
    try {
      const at::ThreadLocalStateGuard tls_guard(tls);
      const at::NoGradGuard no_grad;
      fn(order[i], o[order[i]], c[order[i]], scratch[omp_get_thread_num()]);
    } catch (...) {
#pragma omp critical(reasonrl_moe_err)
      if (!err) err = std::current_exception();
    }
  }
  if (err) std::rethrow_exception(err);
}

template <class F>
void for_rows(int64_t n, int64_t row_elems, const F& fn) {
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)), fn);
}

// x rows of expert e (sorted rows [r0, r0 + n)) gathered into the scratch, gate/up, and SwiGLU.
void expert_hidden(const Experts& p, int64_t e, int64_t r0, int64_t n, Scratch& sc) {
  moe_gather_rows_cpu(sc.x.data_ptr<float>(), p.x.data_ptr<float>(), p.sorted.data_ptr<int32_t>() + r0, p.K, p.H, 0,
                      n);
  at::Tensor he = sc.h.narrow(0, 0, n);
  at::mm_out(he, sc.x.narrow(0, 0, n), p.wgu[e].t());  // (n, 2I)
  moe_swiglu_fwd_cpu(sc.a.data_ptr<float>(), he.data_ptr<float>(), n, p.I);
}

at::Tensor moe_experts_fwd(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& w, const at::Tensor& wgu,
                           const at::Tensor& wd) {
  const Experts p = prepare(x, ids, w, wgu, wd, "moe_experts_fwd");
  const auto fopt = p.x.options();
  at::Tensor out = at::empty({p.T, p.H}, fopt);
  if (p.N == 0) return out.zero_().to(x.scalar_type());
  at::Tensor y = at::empty({p.N, p.H}, fopt);  // expert outputs, expert-sorted rows
  for_each_expert(p, false, [&](int64_t e, int64_t r0, int64_t n, Scratch& sc) {
    if (n <= kFewRows) {
      moe_gather_rows_cpu(sc.x.data_ptr<float>(), p.x.data_ptr<float>(), p.sorted.data_ptr<int32_t>() + r0, p.K,
                          p.H, 0, n);
      moe_expert_rows_fwd_cpu(y.data_ptr<float>() + r0 * p.H, sc.h.data_ptr<float>(), sc.x.data_ptr<float>(),
                              p.wgu.data_ptr<float>() + e * 2 * p.I * p.H, p.wd.data_ptr<float>() + e * p.H * p.I,
                              n, p.H, p.I);
      return;
    }
    expert_hidden(p, e, r0, n, sc);
    at::Tensor ye = y.narrow(0, r0, n);
    at::mm_out(ye, sc.a.narrow(0, 0, n), p.wd[e].t());  // (n, H)
  });
  for_rows(p.T, p.K * p.H, [&](int64_t t0, int64_t t1) {
    moe_combine_cpu(out.data_ptr<float>(), y.data_ptr<float>(), p.pos.data_ptr<int32_t>(), p.w.data_ptr<float>(),
                    p.K, p.H, t0, t1);
  });
  return out.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& ids, const at::Tensor& w,
    const at::Tensor& wgu, const at::Tensor& wd, bool need_x, bool need_w, bool need_gu, bool need_down) {
  const char* op = "moe_experts_bwd";
  const Experts p = prepare(x, ids, w, wgu, wd, op);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes() && grad_out.device().is_cpu(), op,
                    ": grad_out must be a CPU tensor of x's shape ", shape(x.sizes()), ", got ",
                    shape(grad_out.sizes()));
  const auto fopt = p.x.options();
  const at::Tensor g = grad_out.detach().to(at::kFloat).contiguous();
  // A gradient not asked for comes back as an empty (0,) tensor.
  at::Tensor gx = need_x ? at::empty({p.T, p.H}, fopt) : at::empty({0}, fopt);
  at::Tensor gw = need_w ? at::empty({p.T, p.K}, fopt) : at::empty({0}, fopt);
  // Gradients of experts without rows are zero; the others are written whole by one GEMM each.
  at::Tensor ggu = need_gu ? at::empty({p.E, 2 * p.I, p.H}, fopt) : at::empty({0}, fopt);
  at::Tensor gd = need_down ? at::empty({p.E, p.H, p.I}, fopt) : at::empty({0}, fopt);
  const int32_t* counts = p.counts.data_ptr<int32_t>();
  for (int64_t e = 0; e < p.E; ++e) {
    if (counts[e] > 0) continue;
    if (need_gu) ggu[e].zero_();
    if (need_down) gd[e].zero_();
  }
  auto cast = [&](at::Tensor t, const at::Tensor& like) { return t.to(like.scalar_type()); };
  if (p.N == 0) return {cast(gx.zero_(), x), gw, cast(ggu, wgu), cast(gd, wd)};
  at::Tensor gs = at::empty({p.N, p.H}, fopt);  // grad_out rows in expert order, then grad of x rows
  at::Tensor ws = at::empty({p.N}, fopt), gws = at::empty({p.N}, fopt);  // weights / their grads, expert order
  const int32_t* sorted = p.sorted.data_ptr<int32_t>();
  const float* wp = p.w.data_ptr<float>();
  float* wsp = ws.data_ptr<float>();
  for_each_expert(p, true, [&](int64_t e, int64_t r0, int64_t n, Scratch& sc) {
    expert_hidden(p, e, r0, n, sc);  // recomputed gate/up and activation
    moe_gather_rows_cpu(gs.data_ptr<float>(), g.data_ptr<float>(), sorted, p.K, p.H, r0, r0 + n);
    for (int64_t r = r0; r < r0 + n; ++r) wsp[r] = wp[sorted[r]];
    at::Tensor xe = sc.x.narrow(0, 0, n), ge = gs.narrow(0, r0, n);  // (n, H)
    at::Tensor he = sc.h.narrow(0, 0, n), ae = sc.a.narrow(0, 0, n), gae = sc.ga.narrow(0, 0, n);
    at::mm_out(gae, ge, p.wd[e]);  // (n, I): d<g, y>/d act, before the routing weight
    moe_swiglu_bwd_cpu(he.data_ptr<float>(), ae.data_ptr<float>(), gws.data_ptr<float>() + r0, gae.data_ptr<float>(),
                       wsp + r0, n, p.I);
    if (need_down) {
      at::Tensor gde = gd[e];
      at::mm_out(gde, ge.t(), ae);  // (H, I) = g^T (w * act)
    }
    if (need_gu) {
      at::Tensor ggue = ggu[e];
      at::mm_out(ggue, he.t(), xe);  // (2I, H)
    }
    if (need_x) at::mm_out(ge, he, p.wgu[e]);  // (n, H): grad of the gathered x rows, over g's rows
  });
  if (need_x) {
    for_rows(p.T, p.K * p.H, [&](int64_t t0, int64_t t1) {
      moe_combine_cpu(gx.data_ptr<float>(), gs.data_ptr<float>(), p.pos.data_ptr<int32_t>(), nullptr, p.K, p.H, t0,
                      t1);
    });
  }
  if (need_w) {
    const int32_t* pos = p.pos.data_ptr<int32_t>();
    for (int64_t a = 0; a < p.N; ++a) gw.data_ptr<float>()[a] = gws.data_ptr<float>()[pos[a]];
  }
  return {cast(gx, x), gw, cast(ggu, wgu), cast(gd, wd)};
}

// ---- shapes only, for torch.compile / opcheck (FakeTensor) -------------------------------------------
at::Tensor moe_router_meta(const at::Tensor& logits, int64_t K, bool, const std::optional<at::Tensor>&) {
  return at::empty({logits.size(0), K}, logits.options().dtype(at::kLong));
}

at::Tensor moe_experts_fwd_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&) {
  return at::empty_like(x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_bwd_meta(
    const at::Tensor&, const at::Tensor& x, const at::Tensor&, const at::Tensor& w, const at::Tensor& wgu,
    const at::Tensor& wd, bool need_x, bool need_w, bool need_gu, bool need_down) {
  return {need_x ? at::empty_like(x) : at::empty({0}, x.options()),
          need_w ? at::empty_like(w, w.options().dtype(at::kFloat)) : at::empty({0}, w.options().dtype(at::kFloat)),
          need_gu ? at::empty_like(wgu) : at::empty({0}, wgu.options()),
          need_down ? at::empty_like(wd) : at::empty({0}, wd.options())};
}

}  // namespace
}  // namespace reasonrl

TORCH_LIBRARY_FRAGMENT(reasonrl, m) {
  m.def("moe_router_fwd(Tensor router_logits, int top_k, bool sigmoid, Tensor? bias) -> Tensor");
  m.def("moe_dispatch_fwd(Tensor topk_ids, int num_experts, int block_size) -> Tensor[]");
  m.def("moe_experts_fwd(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w_gate_up, Tensor w_down) -> Tensor");
  m.def(
      "moe_experts_bwd(Tensor grad_out, Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w_gate_up,"
      " Tensor w_down, bool need_x, bool need_w, bool need_gate_up, bool need_down)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(reasonrl, CPU, m) {
  m.impl("moe_router_fwd", &reasonrl::moe_router_fwd);
  m.impl("moe_dispatch_fwd", &reasonrl::moe_dispatch_fwd);
  m.impl("moe_experts_fwd", &reasonrl::moe_experts_fwd);
  m.impl("moe_experts_bwd", &reasonrl::moe_experts_bwd);
}

TORCH_LIBRARY_IMPL(reasonrl, Meta, m) {
  m.impl("moe_router_fwd", &reasonrl::moe_router_meta);
  m.impl("moe_experts_fwd", &reasonrl::moe_experts_fwd_meta);
  m.impl("moe_experts_bwd", &reasonrl::moe_experts_bwd_meta);
}

#ifdef REASONRL_WITH_CUDA
TORCH_LIBRARY_IMPL(reasonrl, CUDA, m) {
  m.impl("moe_router_fwd", &reasonrl::moe_router_fwd);
  m.impl("moe_dispatch_fwd", &reasonrl::moe_dispatch_fwd);
}
#endif
