// Torch glue of the fused training family on CPU: checks with messages that name the argument, then the
// kernels of csrc/cpu/fused.cpp split over threads. Registers (CPU tensors; on GPU kernels/fused.py runs)
//   reasonrl::fused_rms_norm_fwd(x (M, N), w (N,), eps) -> (y (M, N) in promote(x, w), rstd (M,) float32)
//   reasonrl::fused_rms_norm_bwd(g (M, N), x, w, rstd) -> (dx (M, N) in x's dtype, dw (N,) float32)
//   reasonrl::fused_rope(x (T, H, D), cos, sin (T, 1, D/2) or (T, D/2) float32, sign) -> (T, H, D) in x's dtype
//     (contiguous; x may be strided with a contiguous last dim)
//   reasonrl::fused_rope_(x, cos, sin, sign): the same in place (x strided, last dim contiguous)
//   reasonrl::fused_silu_mul(g, u) -> silu(g) * u in g's dtype (2-D g, u read at their row strides)
//   reasonrl::fused_swiglu_bwd(dh, g, u (M, N)) -> (h (M, N), dgu (M, 2N) = [dg | du]), all in g's dtype (g, u
//     read at their row strides: the two halves of the packed gate/up GEMM output)
//   reasonrl::scatter_rows(g (n, ...), offsets (rows + 1,) int64, order (n,) int64, rows) -> (rows, ...): the
//                          backward of a row gather, each destination row summed in float32 (deterministic)
//   reasonrl::fused_attn_fwd(q (B, Lq, Hq, D), k, v (B, Lk, Hkv, D), off, klen (B,) int64, scale) -> (o, lse):
//                          query i of batch b sees keys j < min(klen[b], i + off[b] + 1) (fused.h)
//   reasonrl::fused_attn_bwd(dout, q, k, v, o, lse, off, klen, scale) -> (dq, dk, dv)
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "fused.h"
#include "glue.h"

namespace reasonrl {
namespace {

using glue::dt_name;  // messages from plain strings (glue.h)
using glue::num;
using glue::shape;

DType code(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device().str());
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default:
      TORCH_CHECK_VALUE(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", dt_name(t));
  }
  return DType::f32;
}

void same_shape(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na, const char* nb) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), op, ": ", nb, " must have ", na, "'s shape ", shape(a.sizes()), ", got ",
                    shape(b.sizes()));
}

// Elementwise work in chunks of about 32k elements (a task's work far above parallel_for's overhead).
constexpr int64_t kGrain = 1 << 15;
// Chunks of rows in the RMSNorm backward, each with its own float32 partial of dw (at most; M / 16 when less):
// a fixed number, so the sum's order, and dw to the bit, do not depend on the thread count.
constexpr int64_t kRmsChunks = 32;

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  const char* op = "fused_rms_norm_fwd";
  const DType dx = code(x_, op, "x");
  code(w_, op, "w");
  TORCH_CHECK_VALUE(x_.dim() == 2, op, ": x must be (M, N), got shape ", shape(x_.sizes()));
  const int64_t M = x_.size(0), N = x_.size(1);
  TORCH_CHECK_VALUE(w_.dim() == 1 && w_.size(0) == N, op, ": w must be (", num(N), ",), got shape ",
                    shape(w_.sizes()));
  const auto out_t = at::promote_types(x_.scalar_type(), w_.scalar_type());
  TORCH_CHECK_VALUE(out_t == x_.scalar_type() || out_t == at::kFloat, op, ": x ", dt_name(x_), " with w ",
                    dt_name(w_), " is not supported");
  const at::Tensor x = x_.contiguous(), w = w_.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(out_t));
  at::Tensor r = at::empty({M}, x.options().dtype(at::kFloat));
  const DType dy = out_t == x.scalar_type() ? dx : DType::f32;
  at::parallel_for(0, M, std::max<int64_t>(1, kGrain / std::max<int64_t>(N, 1)), [&](int64_t r0, int64_t r1) {
    rms_fwd_cpu(y.data_ptr(), r.data_ptr<float>(), x.data_ptr(), w.data_ptr<float>(), dx, dy, r0, r1, N,
                static_cast<float>(eps));
  });
  return {y, r};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& g_, const at::Tensor& x_, const at::Tensor& w_,
                                                const at::Tensor& rstd_) {
  const char* op = "fused_rms_norm_bwd";
  const DType dx = code(x_, op, "x");
  DType dg = code(g_, op, "g");
  code(w_, op, "w");
  TORCH_CHECK_VALUE(x_.dim() == 2, op, ": x must be (M, N), got shape ", shape(x_.sizes()));
  same_shape(x_, g_, op, "x", "g");
  const int64_t M = x_.size(0), N = x_.size(1);
  TORCH_CHECK_VALUE(w_.dim() == 1 && w_.size(0) == N, op, ": w must be (", num(N), ",), got shape ",
                    shape(w_.sizes()));
  TORCH_CHECK_VALUE(rstd_.dim() == 1 && rstd_.size(0) == M && rstd_.scalar_type() == at::kFloat, op,
                    ": rstd must be float32 (", num(M), ",), got ", dt_name(rstd_), " of shape ",
                    shape(rstd_.sizes()));
  at::Tensor g = g_.contiguous();
  if (dg != dx && dg != DType::f32) {  // e.g. x bf16, g f16: read g as float32
    g = g.to(at::kFloat);
    dg = DType::f32;
  }
  const at::Tensor x = x_.contiguous(), w = w_.to(at::kFloat).contiguous(), rstd = rstd_.contiguous();
  at::Tensor d = at::empty({M, N}, x.options());
  // dw: one float32 partial sum per chunk of rows, added at the end. The split depends on M only, not on
  // the thread count, so dw is bitwise the same with any number of threads (it moved by 5e-5 between 1
  // and 2 threads when the chunks were one per thread).
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(kRmsChunks, M / 16));
  at::Tensor part = at::zeros({chunks, N}, x.options().dtype(at::kFloat));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      rms_bwd_cpu(d.data_ptr(), part.data_ptr<float>() + c * N, g.data_ptr(), x.data_ptr(), w.data_ptr<float>(),
                  rstd.data_ptr<float>(), dx, dg, c * M / chunks, (c + 1) * M / chunks, N);
  });
  return {d, chunks == 1 ? part[0] : part.sum(0)};
}

namespace {
// Checks of a rope call; -> x's dtype code.
DType rope_checks(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_, const char* op) {
  const DType dt = code(x_, op, "x");
  TORCH_CHECK_VALUE(x_.dim() == 3 && x_.size(2) % 2 == 0, op, ": x must be (T, H, D) with D even, got shape ",
                    shape(x_.sizes()));
  const int64_t T = x_.size(0), D = x_.size(2);
  TORCH_CHECK_VALUE(cos_.scalar_type() == at::kFloat && sin_.scalar_type() == at::kFloat, op,
                    ": cos and sin must be float32, got ", dt_name(cos_), " and ", dt_name(sin_));
  TORCH_CHECK_VALUE(cos_.numel() == T * (D / 2) && sin_.numel() == T * (D / 2), op, ": cos and sin must hold (T, D/2) = (",
                    num(T), ", ", num(D / 2), ") values, got shapes ", shape(cos_.sizes()),
                    " and ", shape(sin_.sizes()));
  return dt;
}

void rope_into(const at::Tensor& y, const at::Tensor& x, const at::Tensor& cos_, const at::Tensor& sin_, DType dt,
               double sign) {
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  const at::Tensor c = cos_.contiguous(), s = sin_.contiguous();
  at::parallel_for(0, T, std::max<int64_t>(1, kGrain / std::max<int64_t>(H * D, 1)), [&](int64_t t0, int64_t t1) {
    rope_cpu(y.data_ptr(), x.data_ptr(), c.data_ptr<float>(), s.data_ptr<float>(), dt, t0, t1, H, D,
             static_cast<float>(sign), x.stride(0), x.stride(1), y.stride(0), y.stride(1));
  });
}
}  // namespace

at::Tensor rope(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_, double sign) {
  const DType dt = rope_checks(x_, cos_, sin_, "fused_rope");
  // a strided x (a column view of the packed q/k/v GEMM output) is read in place if its last dim is contiguous
  const at::Tensor x = x_.stride(2) == 1 ? x_ : x_.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  rope_into(y, x, cos_, sin_, dt, sign);
  return y;
}

void rope_(const at::Tensor& x, const at::Tensor& cos_, const at::Tensor& sin_, double sign) {
  const DType dt = rope_checks(x, cos_, sin_, "fused_rope_");
  TORCH_CHECK_VALUE(x.stride(2) == 1 || x.size(2) == 0, "fused_rope_: x's last dim must be contiguous, got strides ",
                    shape(x.strides()));
  // an expanded x (heads or tokens sharing memory) would be rotated once per alias
  TORCH_CHECK_VALUE(at::has_internal_overlap(x) != at::MemOverlap::Yes,
                    "fused_rope_: x has elements that share memory (an expanded tensor? strides ", shape(x.strides()),
                    "); rotate a tensor with its own storage, or use fused_rope");
  rope_into(x, x, cos_, sin_, dt, sign);
}

namespace {
// A 2-D tensor as it is where its rows are contiguous (a column view of the packed gate/up GEMM output),
// else a contiguous copy; with its row stride in elements.
std::pair<at::Tensor, int64_t> rows_view(const at::Tensor& t) {
  const at::Tensor r = t.stride(1) == 1 || t.size(1) <= 1 ? t : t.contiguous();
  return {r, r.stride(0)};
}

char* at_row(const at::Tensor& t, int64_t row, int64_t stride) {
  return static_cast<char*>(t.data_ptr()) + row * stride * static_cast<int64_t>(t.element_size());
}
}  // namespace

at::Tensor silu_mul(const at::Tensor& g_, const at::Tensor& u_) {
  const char* op = "fused_silu_mul";
  const DType dt = code(g_, op, "g");
  same_shape(g_, u_, op, "g", "u");
  TORCH_CHECK_VALUE(u_.scalar_type() == g_.scalar_type(), op, ": u must be ", dt_name(g_), " as g, got ",
                    dt_name(u_));
  if (g_.dim() == 2 && g_.size(1) > 0) {  // rows at their strides: no copy of a column view
    const auto [g, sg] = rows_view(g_);
    const auto [u, su] = rows_view(u_);
    const int64_t M = g.size(0), N = g.size(1);
    at::Tensor h = at::empty({M, N}, g.options().memory_format(at::MemoryFormat::Contiguous));
    at::parallel_for(0, M, std::max<int64_t>(1, kGrain / N), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        silu_mul_cpu(at_row(h, r, N), at_row(g, r, sg), at_row(u, r, su), dt, 0, N);
    });
    return h;
  }
  const at::Tensor g = g_.contiguous(), u = u_.contiguous();
  at::Tensor h = at::empty(g.sizes(), g.options());
  at::parallel_for(0, g.numel(), kGrain, [&](int64_t e0, int64_t e1) {
    silu_mul_cpu(h.data_ptr(), g.data_ptr(), u.data_ptr(), dt, e0, e1);
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dh_, const at::Tensor& g_, const at::Tensor& u_) {
  const char* op = "fused_swiglu_bwd";
  const DType dt = code(g_, op, "g");
  TORCH_CHECK_VALUE(g_.dim() == 2, op, ": g must be (M, N), got shape ", shape(g_.sizes()));
  same_shape(g_, u_, op, "g", "u");
  same_shape(g_, dh_, op, "g", "dh");
  TORCH_CHECK_VALUE(u_.scalar_type() == g_.scalar_type() && dh_.scalar_type() == g_.scalar_type(), op,
                    ": dh, g and u must share one dtype, got ", dt_name(dh_), ", ", dt_name(g_), ", ", dt_name(u_));
  const int64_t M = g_.size(0), N = g_.size(1);
  // dg and du side by side in one (M, 2N) tensor: the gradient of the packed gate/up GEMM's output
  at::Tensor h = at::empty({M, N}, g_.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dgu = at::empty({M, 2 * N}, h.options());
  if (N == 0) return {h, dgu};
  const auto [dh, sd] = rows_view(dh_);
  const auto [g, sg] = rows_view(g_);
  const auto [u, su] = rows_view(u_);
  const int64_t es = static_cast<int64_t>(h.element_size());
  at::parallel_for(0, M, std::max<int64_t>(1, kGrain / N), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      char* d = at_row(dgu, r, 2 * N);
      swiglu_bwd_cpu(at_row(h, r, N), d, d + N * es, at_row(dh, r, sd), at_row(g, r, sg), at_row(u, r, su), dt, 0, N);
    }
  });
  return {h, dgu};
}

at::Tensor scatter_rows(const at::Tensor& g_, const at::Tensor& offsets_, const at::Tensor& order_, int64_t rows) {
  const char* op = "scatter_rows";
  const DType dt = code(g_, op, "g");
  TORCH_CHECK_VALUE(g_.dim() >= 1, op, ": g must have a row dimension");
  const int64_t n = g_.size(0);
  TORCH_CHECK_VALUE(offsets_.scalar_type() == at::kLong && order_.scalar_type() == at::kLong, op,
                    ": offsets and order must be int64, got ", dt_name(offsets_), " and ", dt_name(order_));
  TORCH_CHECK_VALUE(rows >= 0, op, ": rows must be >= 0, got ", num(rows));
  TORCH_CHECK_VALUE(offsets_.dim() == 1 && offsets_.size(0) == rows + 1, op, ": offsets must be (rows + 1,) = (",
                    num(rows + 1), ",), got shape ", shape(offsets_.sizes()));
  TORCH_CHECK_VALUE(order_.dim() == 1 && order_.size(0) == n, op, ": order must be (", num(n),
                    ",) as g's rows, got shape ", shape(order_.sizes()));
  const at::Tensor g = g_.contiguous(), offsets = offsets_.contiguous(), order = order_.contiguous();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* ord = order.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(off[0] == 0 && off[rows] == n, op, ": offsets must run from 0 to ", num(n));
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_VALUE(off[r] <= off[r + 1], op, ": offsets must not decrease (row ", num(r), ")");
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(ord[i] >= 0 && ord[i] < n, op, ": order values must be in [0, ", num(n), ")");
  std::vector<int64_t> sizes(g.sizes().begin(), g.sizes().end());
  sizes[0] = rows;
  at::Tensor dx = at::empty(sizes, g.options());
  const int64_t row_elems = n ? g.numel() / n : (rows ? dx.numel() / rows : 0);
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(row_elems, 1)), [&](int64_t r0, int64_t r1) {
    scatter_rows_cpu(dx.data_ptr(), g.data_ptr(), off, ord, dt, r0, r1, row_elems);
  });
  return dx;
}

void check_attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& off,
                const at::Tensor& klen, const char* op) {
  code(q, op, "q");
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
                    ": q must be (B, Lq, Hq, D) and k, v (B, Lk, Hkv, D), got shapes ", shape(q.sizes()), ", ",
                    shape(k.sizes()), ", ", shape(v.sizes()));
  same_shape(k, v, op, "k", "v");
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                    ": q, k and v must share one dtype, got ", dt_name(q), ", ", dt_name(k), ", ", dt_name(v));
  const int64_t B = q.size(0), Hq = q.size(2), Hkv = k.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(attn_head_dim_ok(D), op, ": head dim must be 16, 32, 64 or 128, got ", num(D));
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, op, ": k must be (", num(B), ", Lk, Hkv, ", num(D),
                    "), got shape ", shape(k.sizes()));
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, op, ": query heads (", num(Hq), ") must be a multiple of kv heads (",
                    num(Hkv), ")");
  TORCH_CHECK_VALUE(off.scalar_type() == at::kLong && klen.scalar_type() == at::kLong && off.dim() == 1 &&
                        klen.dim() == 1 && off.size(0) == B && klen.size(0) == B && off.is_cpu() && klen.is_cpu(),
                    op, ": off and klen must be int64 CPU tensors of shape (", num(B), ",)");
  const at::Tensor o2 = off.contiguous(), k2 = klen.contiguous();
  const int64_t* po = o2.data_ptr<int64_t>();
  const int64_t* pk = k2.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    // (a position offset past 2^62 overflowed i + off + 1 in the kernels' row bounds)
    TORCH_CHECK_VALUE(po[b] >= 0 && po[b] <= (int64_t{1} << 40), op, ": off[", num(b), "] must be in [0, 2^40], got ",
                      num(po[b]));
    TORCH_CHECK_VALUE(pk[b] >= 1 && pk[b] <= k.size(1), op, ": klen[", num(b), "] must be in [1, Lk=", num(k.size(1)),
                      "], got ", num(pk[b]));
  }
}

std::tuple<at::Tensor, at::Tensor> attn_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                            const at::Tensor& off_, const at::Tensor& klen_, double scale) {
  const char* op = "fused_attn_fwd";
  check_attn(q_, k_, v_, off_, klen_, op);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), off = off_.contiguous(),
                   klen = klen_.contiguous();
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), D = q.size(3), Lk = k.size(1), Hkv = k.size(2);
  at::Tensor o = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  const DType dt = code(q, op, "q");
  at::parallel_for(0, B * Hkv, 1, [&](int64_t w0, int64_t w1) {
    attn_fwd_cpu(o.data_ptr(), lse.data_ptr<float>(), q.data_ptr(), k.data_ptr(), v.data_ptr(), off.data_ptr<int64_t>(),
                 klen.data_ptr<int64_t>(), dt, Lq, Lk, Hq, Hkv, D, static_cast<float>(scale), w0, w1);
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(const at::Tensor& do_, const at::Tensor& q_,
                                                        const at::Tensor& k_, const at::Tensor& v_,
                                                        const at::Tensor& o_, const at::Tensor& lse_,
                                                        const at::Tensor& off_, const at::Tensor& klen_, double scale) {
  const char* op = "fused_attn_bwd";
  check_attn(q_, k_, v_, off_, klen_, op);
  same_shape(q_, o_, op, "q", "o");
  same_shape(q_, do_, op, "q", "dout");
  const int64_t B = q_.size(0), Lq = q_.size(1), Hq = q_.size(2), D = q_.size(3), Lk = k_.size(1), Hkv = k_.size(2);
  TORCH_CHECK_VALUE(lse_.scalar_type() == at::kFloat && lse_.dim() == 3 && lse_.size(0) == B && lse_.size(1) == Hq &&
                        lse_.size(2) == Lq,
                    op, ": lse must be float32 (B, Hq, Lq), got ", dt_name(lse_), " of shape ", shape(lse_.sizes()));
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(),
                   o = o_.to(q_.scalar_type()).contiguous(), dout = do_.to(q_.scalar_type()).contiguous(),
                   lse = lse_.contiguous(), off = off_.contiguous(), klen = klen_.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  const DType dt = code(q, op, "q");
  at::parallel_for(0, B * Hkv, 1, [&](int64_t w0, int64_t w1) {
    attn_bwd_cpu(dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), dout.data_ptr(), q.data_ptr(), k.data_ptr(),
                 v.data_ptr(), o.data_ptr(), lse.data_ptr<float>(), off.data_ptr<int64_t>(), klen.data_ptr<int64_t>(),
                 dt, Lq, Lk, Hq, Hkv, D, static_cast<float>(scale), w0, w1);
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace reasonrl

TORCH_LIBRARY_FRAGMENT(reasonrl, m) {
  m.def("fused_rms_norm_fwd(Tensor x, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("fused_rms_norm_bwd(Tensor g, Tensor x, Tensor w, Tensor rstd) -> (Tensor, Tensor)");
  m.def("fused_rope(Tensor x, Tensor cos, Tensor sin, float sign) -> Tensor");
  m.def("fused_rope_(Tensor(a!) x, Tensor cos, Tensor sin, float sign) -> ()");
  m.def("fused_silu_mul(Tensor g, Tensor u) -> Tensor");
  m.def("fused_swiglu_bwd(Tensor dh, Tensor g, Tensor u) -> (Tensor, Tensor)");
  m.def("scatter_rows(Tensor g, Tensor offsets, Tensor order, int rows) -> Tensor");
  m.def("fused_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor off, Tensor klen, float scale) -> (Tensor, Tensor)");
  m.def(
      "fused_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor off, Tensor klen,"
      " float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(reasonrl, CPU, m) {
  m.impl("fused_rms_norm_fwd", &reasonrl::rms_norm_fwd);
  m.impl("fused_rms_norm_bwd", &reasonrl::rms_norm_bwd);
  m.impl("fused_rope", &reasonrl::rope);
  m.impl("fused_rope_", &reasonrl::rope_);
  m.impl("fused_silu_mul", &reasonrl::silu_mul);
  m.impl("fused_swiglu_bwd", &reasonrl::swiglu_bwd);
  m.impl("scatter_rows", &reasonrl::scatter_rows);
  m.impl("fused_attn_fwd", &reasonrl::attn_fwd);
  m.impl("fused_attn_bwd", &reasonrl::attn_bwd);
}
