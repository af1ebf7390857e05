// Torch glue of the paged KV-cache family: checks with messages that name the argument, then the CPU
// kernels of csrc/cpu/paged.cpp (work split over threads). Registers
//   reasonrl::store_kv_fwd(k_cache (NB, bs, Hkv, D) mutated, v_cache mutated, k (T, Hkv, D), v,
//                          slot_mapping (T,) int64) -> ()
//   reasonrl::paged_attention_decode_fwd(q (B, Hq, D), k_cache, v_cache, block_tables (B, M) int32,
//                          context_lens (B,) int32, scale) -> out (B, Hq, D)
//   reasonrl::decode_layer_fwd(x (B, H), cos, sin (B, 1, D/2), the layer's weights, k_cache, v_cache mutated,
//                          slot_mapping, block_tables, context_lens, eps, scale) -> x (B, H)
//   reasonrl::decode_layers_fwd(x, cos, sin, weights (15 per layer, decode_layer_fwd's order), k_caches,
//                          v_caches mutated, slot_mapping, block_tables, context_lens, num_heads, eps, scale,
//                          chunks, final_norm?, lm_head?, final_eps) -> x (B, H), or the logits (B, V) after
//                          the final norm and the LM head where given: every layer, the batch split in
//                          `chunks` row ranges that run in parallel
//   reasonrl::decode_window_fwd(ids, pos, block_tables, block_size, embed, inv_freq, attention_factor, weights,
//                          k_caches, v_caches mutated, num_heads, eps, scale, chunks, final_norm, lm_head,
//                          final_eps, temperature, u?, stop_ids?, k) -> tokens (B, done), log-probs (B, done):
//                          k decode steps with the sampler, stopping after a step that emits a stop id
//   reasonrl::empty_huge_pages(shape, dtype) -> an uninitialized CPU tensor for the KV cache
//   reasonrl::decode_linear(x (M, K), weight (N, K), bias?) -> (M, N): the decode layers' Linear
// CPU tensors only: on GPU the Triton kernels (kernels/paged.py) run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include <cmath>
#include <cstdint>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "glue.h"
#include "paged.h"

namespace reasonrl {
namespace {

// Messages are built from plain strings: streaming sizes() into TORCH_CHECK segfaulted on the GPU
// machine (torch 2.11+cu130, g++ 13.3; seen by the log-prob family for store_kv_fwd too).
std::string shape(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}

std::string num(int64_t v) { return std::to_string(v); }

using glue::dt_name;

void check_caches(const at::Tensor& kc, const at::Tensor& vc, const char* op) {
  TORCH_CHECK(kc.dim() == 4, op, ": k_cache must be (num_blocks, block_size, Hkv, D), got ", shape(kc.sizes()));
  TORCH_CHECK(vc.sizes() == kc.sizes(), op, ": v_cache shape ", shape(vc.sizes()), " != k_cache shape ",
              shape(kc.sizes()));
  TORCH_CHECK(vc.scalar_type() == kc.scalar_type(), op, ": v_cache dtype ", dt_name(vc), " != k_cache dtype ",
              dt_name(kc));
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous(), op, ": k_cache and v_cache must be contiguous");
  TORCH_CHECK(kc.size(2) >= 1, op, ": k_cache must have at least one kv head (Hkv >= 1), got shape ",
              shape(kc.sizes()));
  TORCH_CHECK(kc.device().is_cpu() && vc.device().is_cpu(), op, ": the cpp backend takes CPU tensors");
  glue::dtype_code(kc, op, "k_cache");
}

// A CPU tensor of dtype dt, contiguous, of `dims` dimensions (1: a vector) with n rows.
void check_vec(const at::Tensor& t, const char* op, const char* name, at::ScalarType dt, int64_t n, int64_t dims = 1) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dt, op, ": ", name, " must be ", c10::toString(dt), ", got ", dt_name(t));
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.dim() == dims && t.size(0) == n, op, ": ", name, " must have shape (", num(n), dims == 1 ? ",)" : ", ...)",
              ", got shape ", shape(t.sizes()));
}

void store_kv_fwd(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& slots) {
  const char* op = "store_kv_fwd";
  check_caches(k_cache, v_cache, op);
  const int64_t T = k.size(0), row = k_cache.size(2) * k_cache.size(3);
  const int64_t n_slots = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(k.dim() == 3 && k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3), op,
              ": k must be (T, Hkv, D) matching the cache, got ", shape(k.sizes()));
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v shape ", shape(v.sizes()), " != k shape ", shape(k.sizes()));
  for (const auto* t : {&k, &v}) {
    TORCH_CHECK(t->scalar_type() == k_cache.scalar_type() && t->is_contiguous() && t->device().is_cpu(), op,
                ": k and v must be contiguous CPU tensors in the cache's dtype ", dt_name(k_cache));
  }
  check_vec(slots, op, "slot_mapping", at::kLong, T);
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(s[t] >= -1 && s[t] < n_slots, op, ": slot_mapping[", num(t), "] = ", num(s[t]),
                " is outside [-1, ", num(n_slots), ")");
  }
  store_kv_fwd_cpu(k_cache.data_ptr(), v_cache.data_ptr(), k.data_ptr(), v.data_ptr(), k.element_size(), s, T,
                   row);
}

at::Tensor paged_attention_decode_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                      const at::Tensor& v_cache, const at::Tensor& block_tables,
                                      const at::Tensor& context_lens, double scale) {
  const char* op = "paged_attention_decode_fwd";
  check_caches(k_cache, v_cache, op);
  const int64_t NB = k_cache.size(0), bs = k_cache.size(1), Hkv = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(q.dim() == 3 && q.size(2) == D, op, ": q must be (B, Hq, ", num(D), "), got ", shape(q.sizes()));
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.is_contiguous() && q.device().is_cpu(), op,
              ": q must be a contiguous CPU tensor in the cache's dtype ", dt_name(k_cache));
  const int64_t B = q.size(0), Hq = q.size(1);
  TORCH_CHECK(Hq % Hkv == 0, op, ": query heads ", num(Hq), " must be a multiple of kv heads ", num(Hkv));
  check_vec(block_tables, op, "block_tables", at::kInt, B, 2);  // (B, max_blocks)
  check_vec(context_lens, op, "context_lens", at::kInt, B);
  const int64_t M = block_tables.size(1);
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* cl = context_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cl[b] >= 1 && cl[b] <= M * bs, op, ": context_lens[", num(b), "] = ", num(cl[b]),
                " is outside [1, max_blocks * block_size = ", num(M * bs), "]");
    for (int64_t i = 0; i < (cl[b] + bs - 1) / bs; ++i) {
      TORCH_CHECK(bt[b * M + i] >= 0 && bt[b * M + i] < NB, op, ": block_tables[", num(b), ", ", num(i),
                  "] = ", num(bt[b * M + i]), " is outside [0, ", num(NB), ")");
    }
  }
  at::Tensor out = at::empty_like(q);
  const DType dt = glue::dtype_code(q, op, "q");
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    paged_attention_decode_fwd_cpu(out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), dt, bt,
                                   cl, Hq, Hkv, D, bs, M, static_cast<float>(scale), b0, b1);
  });
  return out;
}

// ---- one dense decoder layer for a decode step ------------------------------------------------------
// The ops of reasonrl.models.model (RMSNorm.forward, Attention.forward, functional._rotate and swiglu,
// DecoderLayer.forward) on the same tensors in the same order; the matmuls and residual adds are the
// same ATen calls, while RMSNorm and RoPE are one loop each here, rounding where the model's ops round
// (to x's dtype after x * rsqrt, after the weight multiply, after the rotation): the result equals the
// model's up to float32 summation order in RMSNorm (tests/test_engine.py).
// NOTE: tiny model, B=64, one thread, bf16: the ~25 ATen calls these replace took ~130 us per layer
// (35 us per RMSNorm). SiLU * up stays ATen: its vectorized exp beat a scalar loop 4x.
at::Tensor rms(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t n = x.size(-1);
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.numel() == n, "decode_layer_fwd: a norm weight of ",
              num(w.numel()), " ", dt_name(w), " for rows of ", num(n), " ", dt_name(x));
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor out = at::empty_like(xc);
  rms_norm_rows_cpu(out.data_ptr(), xc.data_ptr(), wc.data_ptr(), glue::dtype_code(xc, "decode_layer_fwd", "x"),
                    xc.numel() / n, n, static_cast<float>(eps));
  return out;
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t B = x.size(0), H = x.size(1), D = x.size(2);
  TORCH_CHECK(D % 2 == 0 && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.numel() == B * D / 2 && sin.numel() == B * D / 2,
              "decode_layer_fwd: cos/sin must be float32 (B, 1, head_dim / 2)");
  const at::Tensor xc = x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor out = at::empty_like(xc);
  rope_rows_cpu(out.data_ptr(), xc.data_ptr(), cc.data_ptr<float>(), sc.data_ptr<float>(),
                glue::dtype_code(xc, "decode_layer_fwd", "q/k"), B, H, D);
  return out;
}

// A decode step's Linear: for at most kSmallRows float32 rows and a weight of at least kSmallMinWeight
// bytes, where the CPU has AVX-512 (K % 16 == 0) or AVX2 (K % 8 == 0; M <= 16 or a weight of >= 8 MiB), the
// small GEMM of csrc/cpu/gemm.cpp (weights read in place, columns split over threads); else at::linear.
// NOTE: rollouts alternating in one process (2026-11-26): SmolLM2-135M, 32 rows, 48 tokens: 6.10 s
// against 7.41 s with 2 threads, 10.98 against 11.64 s with 1 thread. The tiny model (all weights in
// cache, every matrix under 256 KiB): no gain (263 vs 246 ms, 178 vs 177 ms), so MKL keeps those.
constexpr int64_t kSmallRows = 64;
constexpr int64_t kSmallMinWeight = 256 * 1024;

at::Tensor dlinear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b = std::nullopt) {
  const bool small = x.dim() == 2 && x.size(0) <= kSmallRows && x.scalar_type() == at::kFloat &&
                     w.scalar_type() == at::kFloat && x.is_contiguous() && w.is_contiguous() && w.dim() == 2 &&
                     w.size(1) == x.size(1) && x.device().is_cpu() && w.device().is_cpu() &&
                     (!b.has_value() || (b->scalar_type() == at::kFloat && b->is_contiguous() &&
                                         b->numel() == w.size(0))) &&
                     w.numel() * 4 >= kSmallMinWeight && small_gemm_available(x.size(0), w.size(0), x.size(1));
  if (!small) return at::linear(x, w, b);
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.has_value() ? b->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, 8, [&](int64_t q0, int64_t q1) {
    small_gemm_f32(xp, wp, bp, yp, M, N, K, 4 * q0, std::min(4 * q1, N));
  });
  return y;
}

at::Tensor decode_layer_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& w_in, const at::Tensor& wq, const std::optional<at::Tensor>& bq,
                            const at::Tensor& wk, const std::optional<at::Tensor>& bk, const at::Tensor& wv,
                            const std::optional<at::Tensor>& bv, const at::Tensor& wo,
                            const std::optional<at::Tensor>& bo, const std::optional<at::Tensor>& wq_norm,
                            const std::optional<at::Tensor>& wk_norm, const at::Tensor& w_post,
                            const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                            at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
                            const at::Tensor& tables, const at::Tensor& lens, int64_t num_heads, double eps,
                            double scale) {
  const char* op = "decode_layer_fwd";
  TORCH_CHECK(x.dim() == 2, op, ": x must be (B, hidden), got ", shape(x.sizes()));
  check_caches(k_cache, v_cache, op);
  const int64_t B = x.size(0), Hkv = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(num_heads > 0 && num_heads % Hkv == 0 && wq.dim() == 2 && wq.size(0) == num_heads * D, op,
              ": q_proj weight must be (num_heads * head_dim, hidden) = (", num(num_heads * D), ", .), got ",
              shape(wq.sizes()));
  TORCH_CHECK(wq_norm.has_value() == wk_norm.has_value(), op, ": q_norm and k_norm come together");
  at::Tensor h = rms(x, w_in, eps);
  at::Tensor q = dlinear(h, wq, bq).view({B, num_heads, D});  // (B, Hq, D)
  at::Tensor k = dlinear(h, wk, bk).view({B, Hkv, D});        // (B, Hkv, D)
  at::Tensor v = dlinear(h, wv, bv).view({B, Hkv, D});
  if (wq_norm.has_value()) {
    q = rms(q, *wq_norm, eps);
    k = rms(k, *wk_norm, eps);
  }
  q = rotate(q, cos, sin);
  k = rotate(k, cos, sin);
  store_kv_fwd(k_cache, v_cache, k, v.contiguous(), slots);
  at::Tensor o = paged_attention_decode_fwd(q, k_cache, v_cache, tables, lens, scale);
  at::Tensor y = x + dlinear(o.reshape({B, num_heads * D}), wo, bo);
  h = rms(y, w_post, eps);
  return y + dlinear(at::silu(dlinear(h, w_gate)) * dlinear(h, w_up), w_down);
}

// All layers of a decode step, the batch split into `chunks` row ranges that run the whole layer stack
// in parallel, one per thread (decode rows are independent: attention reads only the row's own sequence,
// and each sequence writes its own slot). Why: at a small model's sizes a layer's matmuls are too small
// for MKL to split well and its elementwise ops too small for ATen's threads, so a second thread did
// little; a row range per thread keeps every op single-threaded and the weights shared through L3.
// chunks = 1 runs the layers one after another on the whole batch (ATen/MKL threads inside).
at::Tensor decode_layers_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                             const c10::List<std::optional<at::Tensor>>& weights, at::TensorList k_caches,
                             at::TensorList v_caches, const at::Tensor& slots, const at::Tensor& tables,
                             const at::Tensor& lens, int64_t num_heads, double eps, double scale, int64_t chunks,
                             const std::optional<at::Tensor>& final_norm, const std::optional<at::Tensor>& lm_head,
                             double final_eps) {
  const char* op = "decode_layers_fwd";
  constexpr int64_t kPer = 15;  // decode_layer_fwd's weights per layer
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(v_caches.size()) == L, op, ": need one k and one v cache per layer, got ",
              num(L), " and ", num(static_cast<int64_t>(v_caches.size())));
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kPer * L, op, ": need ", num(kPer), " weights per layer (",
              num(kPer * L), " for ", num(L), " layers), got ", num(static_cast<int64_t>(weights.size())));
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous (B, hidden) tensor");
  const int64_t B = x.size(0);
  TORCH_CHECK(chunks >= 1, op, ": chunks must be >= 1, got ", num(chunks));
  std::vector<std::optional<at::Tensor>> w(weights.begin(), weights.end());
  for (int64_t l = 0; l < L; ++l) {
    for (const int64_t i : {0, 1, 3, 5, 7, 11, 12, 13, 14}) {
      TORCH_CHECK(w[kPer * l + i].has_value(), op, ": layer ", num(l), " lacks required weight #", num(i));
    }
  }
  TORCH_CHECK(final_norm.has_value() == lm_head.has_value(), op, ": final_norm and lm_head come together");
  const bool logits = lm_head.has_value();
  TORCH_CHECK(!logits || (lm_head->dim() == 2 && lm_head->size(1) == x.size(1)), op,
              ": lm_head must be (vocab, hidden = ", num(x.size(1)), ")");
  const int64_t n_chunks = std::max<int64_t>(1, std::min(chunks, B));
  const at::Tensor cosc = cos.contiguous(), sinc = sin.contiguous();
  auto run = [&](int64_t r0, int64_t n) {
    at::Tensor h = x.narrow(0, r0, n);
    const at::Tensor c = cosc.narrow(0, r0, n), s = sinc.narrow(0, r0, n), sl = slots.narrow(0, r0, n);
    const at::Tensor tb = tables.narrow(0, r0, n), ln = lens.narrow(0, r0, n);
    for (int64_t l = 0; l < L; ++l) {
      const auto* wl = w.data() + kPer * l;
      h = decode_layer_fwd(h, c, s, *wl[0], *wl[1], wl[2], *wl[3], wl[4], *wl[5], wl[6], *wl[7], wl[8], wl[9],
                           wl[10], *wl[11], *wl[12], *wl[13], *wl[14], k_caches[l], v_caches[l], sl, tb, ln,
                           num_heads, eps, scale);
    }
    return logits ? dlinear(rms(h, *final_norm, final_eps), *lm_head, std::nullopt) : h;
  };
  if (n_chunks == 1) return run(0, B);
  at::Tensor out = logits ? at::empty({B, lm_head->size(0)}, x.options()) : at::empty_like(x);
  const int64_t per = (B + n_chunks - 1) / n_chunks;
  const at::ThreadLocalState tls;  // inference mode, grad mode: OpenMP's threads do not inherit them
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    const at::ThreadLocalStateGuard guard(tls);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * per, n = std::min(per, B - r0);
      if (n > 0) out.narrow(0, r0, n).copy_(run(r0, n));
    }
  });
  return out;
}

// The sampler's inverse-CDF draw (reasonrl/engine/sampler.py _inverse_cdf_flat / _inverse_cdf), the same
// ATen ops in the same order: the same token for the same uniform.
at::Tensor inverse_cdf_flat(const at::Tensor& probs, const at::Tensor& u) {
  const at::Tensor cdf = probs.cumsum(-1);
  const at::Tensor total = cdf.select(1, -1);
  const at::Tensor x = at::minimum(u * total, at::nextafter(total, at::zeros_like(total)));
  // clamped: a NaN row (a diverged model) gives an index in range and a NaN log-prob, which the engine reports
  return at::searchsorted(cdf, x.unsqueeze(1), /*out_int32=*/false, /*right=*/true).squeeze(1).clamp_(std::nullopt,
                                                                                                      probs.size(1) - 1);
}

at::Tensor inverse_cdf(const at::Tensor& probs, const at::Tensor& u) {
  constexpr int64_t chunk = 1024;
  const int64_t B = probs.size(0), V = probs.size(1);
  if (V <= 8 * chunk) return inverse_cdf_flat(probs, u);
  const int64_t n = (V + chunk - 1) / chunk;
  const at::Tensor blocks = at::constant_pad_nd(probs, {0, n * chunk - V}).view({B, n, chunk});
  const at::Tensor csum = blocks.sum(-1).cumsum(-1);
  const at::Tensor total = csum.select(1, -1);
  const at::Tensor x = at::minimum(u * total, at::nextafter(total, at::zeros_like(total)));
  const at::Tensor c = at::searchsorted(csum, x.unsqueeze(1), false, true).clamp_(std::nullopt, n - 1);  // (B, 1)
  const at::Tensor prev = at::where(c > 0, csum.gather(1, (c - 1).clamp(0)), at::zeros_like(x.unsqueeze(1)));
  const at::Tensor inner = blocks.gather(1, c.unsqueeze(2).expand({B, 1, chunk})).squeeze(1).cumsum(-1);
  const at::Tensor rem = at::minimum(x.unsqueeze(1) - prev, at::nextafter(inner.narrow(1, chunk - 1, 1),
                                                                           at::zeros_like(prev)));
  const at::Tensor i = at::searchsorted(inner, rem.clamp_(0), false, true).clamp_(std::nullopt, chunk - 1);
  return (c * chunk + i).squeeze(1).clamp_(std::nullopt, V - 1);
}

// k decode steps of a fixed batch in one call (the engine's decode window, LLMEngine._decode_window, for
// the CPU stack of decode_layers_fwd): per step the slots and context lengths from the block tables,
// the embedding, RoPE's cos/sin, all layers and the LM head, then the sampler for one temperature
// without filters (0: greedy), drawing u[:, step]. Stops after the first step in which a row emits one
// of stop_ids. Every op outside the layers is the ATen op the Python step runs, in its order, so the
// tokens and log-probs equal the Python window's. -> tokens (B, done) int64, log-probs (B, done) float32.
// NOTE: tiny model, 64 rows, 2 threads: the Python around each step (about 0.4 ms: slots, RoPE,
// sampler, bookkeeping) was a quarter of a rollout once the layers ran in parallel.
std::tuple<at::Tensor, at::Tensor> decode_window_fwd(
    const at::Tensor& ids0, const at::Tensor& pos0, const at::Tensor& tables, int64_t block_size,
    const at::Tensor& embed, const at::Tensor& inv_freq, double attention_factor,
    const c10::List<std::optional<at::Tensor>>& weights, at::TensorList k_caches, at::TensorList v_caches,
    int64_t num_heads, double eps, double scale, int64_t chunks, const at::Tensor& final_norm,
    const at::Tensor& lm_head, double final_eps, double temperature, const std::optional<at::Tensor>& u,
    const std::optional<at::Tensor>& stop_ids, int64_t k) {
  const char* op = "decode_window_fwd";
  TORCH_CHECK(ids0.dim() == 1 && pos0.dim() == 1 && ids0.size(0) == pos0.size(0) && ids0.scalar_type() == at::kLong &&
                  pos0.scalar_type() == at::kLong,
              op, ": ids and pos must be (B,) int64");
  const int64_t B = ids0.size(0);
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && tables.scalar_type() == at::kInt, op,
              ": block_tables must be (B, width) int32");
  TORCH_CHECK(k >= 1 && block_size >= 1, op, ": k and block_size must be >= 1");
  TORCH_CHECK(temperature == 0 || (std::isfinite(temperature) && temperature >= glue::kMinTemperature), op,
              ": temperature must be 0 (greedy) or a finite number >= 1e-05, got ", glue::real(temperature));
  const bool sample = temperature > 0;
  TORCH_CHECK(!sample || (u.has_value() && u->dim() == 2 && u->size(0) == B && u->size(1) >= k &&
                          u->scalar_type() == at::kFloat),
              op, ": sampling needs u (B, >= k) float32");
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.is_floating_point(), op, ": inv_freq must be a (D/2,) float tensor");
  at::Tensor toks = at::empty({B, k}, ids0.options());
  at::Tensor lps = at::empty({B, k}, ids0.options().dtype(at::kFloat));
  at::Tensor ids = ids0, pos = pos0;
  const at::Tensor inv = inv_freq.unsqueeze(0);
  // The sampler's temperature column, as _sample_args makes it: (B,) float32, ones for greedy rows.
  const at::Tensor t = at::full({B}, sample ? temperature : 1.0, ids0.options().dtype(at::kFloat)).unsqueeze(1);
  int64_t done = 0;
  while (done < k) {
    // Runner.decode_step
    const at::Tensor slots = tables.gather(1, at::floor_divide(pos, block_size).unsqueeze(1)).squeeze(1).to(at::kLong) *
                                 block_size +
                             at::remainder(pos, block_size);
    const at::Tensor lens = (pos + 1).to(at::kInt);
    // LeanDecode.__call__: embedding and RotaryEmbedding.forward
    const at::Tensor x = at::embedding(embed, ids);
    const at::Tensor ang = pos.to(at::kFloat).unsqueeze(1) * inv;
    const at::Tensor cos = (ang.cos() * attention_factor).unsqueeze(1), sin = (ang.sin() * attention_factor).unsqueeze(1);
    const at::Tensor logits = decode_layers_fwd(x, cos, sin, weights, k_caches, v_caches, slots, tables, lens,
                                                num_heads, eps, scale, chunks, final_norm, lm_head, final_eps)
                                  .to(at::kFloat);
    // Sampler.__call__ (no filters, no forced tokens)
    const at::Tensor lsm = at::log_softmax(logits / t, -1);
    at::Tensor tokens;
    if (sample) {
      tokens = inverse_cdf(lsm.exp(), u->select(1, done));
    } else {
      tokens = logits.argmax(-1);
    }
    toks.select(1, done).copy_(tokens);
    lps.select(1, done).copy_(lsm.gather(1, tokens.unsqueeze(1)).squeeze(1));
    ++done;
    if (stop_ids.has_value() && at::isin(tokens, *stop_ids).any().item<bool>()) break;
    ids = tokens;
    pos = pos + 1;
  }
  return {toks.narrow(1, 0, done), lps.narrow(1, 0, done)};
}

// An uninitialized CPU tensor on its own 2 MiB-aligned anonymous mapping, advised for transparent huge
// pages (Linux; elsewhere, or under 2 MiB, at::empty). Unmapped when the tensor dies, so a rollout's KV
// cache goes back to the OS at its end. Why: decode attention reads each sequence's blocks at
// scattered addresses; with 4 KiB pages a 20 MiB cache is 5,000 pages (more than the L2 TLB holds) and
// 5,000 first-touch faults per rollout. NOTE: tiny model, B=64, 4 layers' caches and 4 MiB of other
// reads between attention calls, one thread: 367-402 -> 265-269 us per call at context 80 (about even
// at 48); whole rollouts, alternating in one process: 2-6% faster.
at::Tensor empty_huge_pages(c10::IntArrayRef sizes, at::ScalarType dtype) {
  const auto opts = at::TensorOptions().dtype(dtype).device(at::kCPU);
  int64_t numel = 1;
  for (const int64_t d : sizes) {
    TORCH_CHECK(d >= 0, "empty_huge_pages: negative size in ", shape(sizes));
    numel *= d;
  }
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t bytes = static_cast<uintptr_t>(numel) * c10::elementSize(dtype);
  if (bytes >= kHuge) {
    const uintptr_t len = (bytes + kHuge - 1) & ~(kHuge - 1);
    void* raw = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw != MAP_FAILED) {
      const uintptr_t a = reinterpret_cast<uintptr_t>(raw), start = (a + kHuge - 1) & ~(kHuge - 1);
      if (start > a) munmap(raw, start - a);  // the unaligned head and tail go back at once
      if (a + len + kHuge > start + len) munmap(reinterpret_cast<void*>(start + len), a + len + kHuge - start - len);
      void* p = reinterpret_cast<void*>(start);
      madvise(p, len, MADV_HUGEPAGE);  // advice only: where THP is off the pages are 4 KiB, still correct
      return at::from_blob(p, sizes, [len](void* q) { munmap(q, len); }, opts);
    }
  }
#endif
  return at::empty(sizes, opts);
}

}  // namespace
}  // namespace reasonrl

TORCH_LIBRARY_FRAGMENT(reasonrl, m) {
  m.def(
      "decode_layers_fwd(Tensor x, Tensor cos, Tensor sin, Tensor?[] weights, Tensor(a!)[] k_caches,"
      " Tensor(b!)[] v_caches, Tensor slot_mapping, Tensor block_tables, Tensor context_lens, int num_heads,"
      " float eps, float scale, int chunks, Tensor? final_norm=None, Tensor? lm_head=None, float final_eps=0.)"
      " -> Tensor");
  m.def(
      "decode_window_fwd(Tensor ids, Tensor pos, Tensor block_tables, int block_size, Tensor embed, Tensor inv_freq,"
      " float attention_factor, Tensor?[] weights, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int num_heads,"
      " float eps, float scale, int chunks, Tensor final_norm, Tensor lm_head, float final_eps, float temperature,"
      " Tensor? u, Tensor? stop_ids, int k) -> (Tensor, Tensor)");
  m.def("empty_huge_pages(int[] shape, ScalarType dtype) -> Tensor");
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("store_kv_fwd(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slot_mapping) -> ()");
  m.def(
      "paged_attention_decode_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables,"
      " Tensor context_lens, float scale) -> Tensor");
  m.def(
      "decode_layer_fwd(Tensor x, Tensor cos, Tensor sin, Tensor w_in, Tensor wq, Tensor? bq, Tensor wk,"
      " Tensor? bk, Tensor wv, Tensor? bv, Tensor wo, Tensor? bo, Tensor? wq_norm, Tensor? wk_norm,"
      " Tensor w_post, Tensor w_gate, Tensor w_up, Tensor w_down, Tensor(a!) k_cache, Tensor(b!) v_cache,"
      " Tensor slot_mapping, Tensor block_tables, Tensor context_lens, int num_heads, float eps,"
      " float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(reasonrl, CPU, m) {
  m.impl("store_kv_fwd", &reasonrl::store_kv_fwd);
  m.impl("paged_attention_decode_fwd", &reasonrl::paged_attention_decode_fwd);
  m.impl("decode_layer_fwd", &reasonrl::decode_layer_fwd);
  m.impl("decode_layers_fwd", &reasonrl::decode_layers_fwd);
  m.impl("decode_window_fwd", &reasonrl::decode_window_fwd);
  m.impl("decode_linear", &reasonrl::dlinear);
}

// No tensor argument to dispatch on: registered for every key.
TORCH_LIBRARY_IMPL(reasonrl, CompositeExplicitAutograd, m) {
  m.impl("empty_huge_pages", &reasonrl::empty_huge_pages);
}
