// Declarations of the fused training family on CPU (csrc/fused.cpp glue, csrc/cpu/fused.cpp kernels): the
// elementwise passes of a training forward and backward that PyTorch runs as several ops each (RMSNorm,
// RoPE, the SwiGLU product) and the row gathers of packed attention. kernels/fused.py does the same on
// GPU; both round where models.RMSNorm / functional._rotate / F.silu round.
// All row-major and contiguous; float math whatever the storage dtype.
#pragma once
#include <cstdint>

#include "reasonrl.h"

namespace reasonrl {

// Rows [r0, r1) of x (rows, n), dtype dx: r = 1 / sqrt(mean(x^2) + eps) (float32, kept for backward);
// y = dy(w * dx(x * r)) with w float32 (n,), y in dtype dy (dx, or float32 when the weight promotes it).
void rms_fwd_cpu(void* y, float* rstd, const void* x, const float* w, DType dx, DType dy, int64_t r0, int64_t r1,
                 int64_t n, float eps);

// Rows [r0, r1): gx = g * w, xn = x * r; dx = dx(r * (gx - xn * mean(gx * xn))); dw_acc (n,) float32 +=
// g * dx(xn) (the forward's rounded xn). g in dtype dg (y's dtype), dx and x in dtype dx.
void rms_bwd_cpu(void* dx_out, float* dw_acc, const void* g, const void* x, const float* w, const float* rstd,
                 DType dx, DType dg, int64_t r0, int64_t r1, int64_t n);

// Elements [e0, e1): h = dt(dt(silu(g)) * u), silu(g) = g / (1 + exp(-g)), as F.silu(g) * u in dt.
void silu_mul_cpu(void* h, const void* g, const void* u, DType dt, int64_t e0, int64_t e1);

// Elements [e0, e1) of the SwiGLU backward: s = sigmoid(g), a = dt(g s); h = dt(a u) (for dW_down),
// du = dt(dh a), dg = dt(dh u s (1 + g (1 - s))).
void swiglu_bwd_cpu(void* h, void* dg, void* du, const void* dh, const void* g, const void* u, DType dt, int64_t e0,
                    int64_t e1);

// Rows [t0, t1) of x, y (T, H, D), cos/sin (T, D/2) float32: y = dt([x1 c - x2 s, x2 c + x1 s]) (sign -1:
// s negated, the inverse rotation). x's last dim contiguous, its tokens xs_t and heads xs_h elements apart
// (a column view of a packed q/k/v GEMM output); y's ys_t and ys_h apart; y may be x (in place).
void rope_cpu(void* y, const void* x, const float* cos, const float* sin, DType dt, int64_t t0, int64_t t1, int64_t H,
              int64_t D, float sign, int64_t xs_t, int64_t xs_h, int64_t ys_t, int64_t ys_h);

// The backward of a row gather out = x[idx]: dx[r] = dt(sum over i with idx[i] == r of g[i]), in float32,
// the terms in order of i (deterministic). offsets (rows + 1), order (numel of idx): the positions i of
// each row r as order[offsets[r]:offsets[r + 1]]. Rows [r0, r1); row_elems elements per row.
void scatter_rows_cpu(void* dx, const void* g, const int64_t* offsets, const int64_t* order, DType dt, int64_t r0,
                      int64_t r1, int64_t row_elems);

// Attention over a padded batch (CPU training): query row i of batch b sees keys j < min(klen[b], i + off[b] + 1)
// (off 0: causal, top-left aligned; off = the keys before the queries: a shared prefix). q, o (B, Lq, Hq, D);
// k, v (B, Lk, Hkv, D), query head h reading kv head h / (Hq / Hkv); D in {16, 32, 64, 128}
// (attn_head_dim_ok). Work items w = b * Hkv + kv head, [w0, w1).
//   fwd: o = softmax(scale q k^T) v (float math, o rounded to dt), lse (B, Hq, Lq) float32 kept for backward
//   bwd: p = exp(scale q k^T - lse), dp = do v^T, ds = p (dp - rowsum(do o)); dq = scale ds k, dk = scale ds^T q,
//        dv = p^T do (float32 accumulators per work item: no two items write the same rows)
bool attn_head_dim_ok(int64_t D);
void attn_fwd_cpu(void* o, float* lse, const void* q, const void* k, const void* v, const int64_t* off,
                  const int64_t* klen, DType dt, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                  int64_t w0, int64_t w1);
void attn_bwd_cpu(void* dq, void* dk, void* dv, const void* dout, const void* q, const void* k, const void* v,
                  const void* o, const float* lse, const int64_t* off, const int64_t* klen, DType dt, int64_t Lq,
                  int64_t Lk, int64_t Hq, int64_t Hkv, int64_t D, float scale, int64_t w0, int64_t w1);

}  // namespace reasonrl
