"""Triton kernels of the GPU decode step: the elementwise work between its GEMMs in few launches.

Why: a decode step of a small model at batch 64 is hundreds of tiny kernels. The model's own ops
spend about 48 launches per layer (RMSNorm as 8 elementwise ops, twice; RoPE as ~9 per tensor for q
and k; SiLU, multiply, residual adds) against 7 GEMMs and 2 attention kernels, and at these sizes a
launch costs about as much as its work: a Qwen2.5-0.5B-shaped rollout (24 layers, 64 sequences) ran
4.4 ms per step on an H200 under CUDA graphs (benchmarks/RESULTS.md), against ~0.3 ms of weight
reads. These three kernels bring the elementwise work to 3 launches per layer:

  add_rms_norm   s = x + r (rounded to x's dtype, the residual stream), y = w * (s * rsqrt(mean(s^2) + eps)),
                 the multiply by w after rounding to the dtype, as models.RMSNorm; r absent: s = x
  rope_store_kv  q and k rotated (functional._rotate: float32, rounded to the dtype), k and v written
                 to their cache slots (slot -1 writes nothing): one program per token, all heads
  silu_mul       silu(g) rounded to the dtype, times u (F.silu(g) * u)

Arithmetic is float32 inside, rounding where the PyTorch ops round; the sums of squares add in a
different order, so results equal the model's ops up to float32 rounding, not bitwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(X, R, W, Y, S, RSTD, stride_x, stride_r, stride_y, stride_s, N, eps,
                         HAS_RES: tl.constexpr, STORE_RSTD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + row * stride_x + cols, mask=m, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + row * stride_s + cols, x, mask=m)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    xn = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * xn).to(Y.dtype.element_ty), mask=m)
    if STORE_RSTD:  # for the backward (kernels/fused.py)
        tl.store(RSTD + row, rstd)


@triton.jit
def _rope_store_kv_kernel(Q, K, V, COS, SIN, QO, KC, VC, SLOT,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
                          stride_cs, stride_ch, HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    dm = d < HALF
    c = tl.load(COS + t * stride_ct + d, mask=dm, other=0.0).to(tl.float32)  # (1, BD)
    s = tl.load(SIN + t * stride_ct + d, mask=dm, other=0.0).to(tl.float32)
    # q: (HQ, 2 * HALF) -> rotated, to QO (contiguous (T, HQ, 2 * HALF))
    qm = (h < HQ) & dm
    q1 = tl.load(Q + t * stride_qt + h * stride_qh + d, mask=qm, other=0.0).to(tl.float32)
    q2 = tl.load(Q + t * stride_qt + h * stride_qh + HALF + d, mask=qm, other=0.0).to(tl.float32)
    qo = QO + (t * HQ + h) * (2 * HALF) + d
    tl.store(qo, (q1 * c - q2 * s).to(QO.dtype.element_ty), mask=qm)
    tl.store(qo + HALF, (q2 * c + q1 * s).to(QO.dtype.element_ty), mask=qm)
    slot = tl.load(SLOT + t)
    if slot >= 0:
        km = (h < HKV) & dm
        k1 = tl.load(K + t * stride_kt + h * stride_kh + d, mask=km, other=0.0).to(tl.float32)
        k2 = tl.load(K + t * stride_kt + h * stride_kh + HALF + d, mask=km, other=0.0).to(tl.float32)
        dst = slot.to(tl.int64) * stride_cs + h * stride_ch + d
        # rounded to k's dtype first (the model's k), then stored in the cache's dtype
        r1 = (k1 * c - k2 * s).to(K.dtype.element_ty)
        r2 = (k2 * c + k1 * s).to(K.dtype.element_ty)
        tl.store(KC + dst, r1.to(KC.dtype.element_ty), mask=km)
        tl.store(KC + dst + HALF, r2.to(KC.dtype.element_ty), mask=km)
        v1 = tl.load(V + t * stride_vt + h * stride_vh + d, mask=km, other=0.0)
        v2 = tl.load(V + t * stride_vt + h * stride_vh + HALF + d, mask=km, other=0.0)
        tl.store(VC + dst, v1.to(VC.dtype.element_ty), mask=km)
        tl.store(VC + dst + HALF, v2.to(VC.dtype.element_ty), mask=km)


@triton.jit
def _silu_mul_kernel(G, U, O, stride_g, stride_u, stride_o, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < N
    g = tl.load(G + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=m, other=0.0).to(tl.float32)
    a = (g * (1.0 / (1.0 + tl.exp(-g)))).to(O.dtype.element_ty).to(tl.float32)  # as fused.swiglu_bwd
    tl.store(O + row * stride_o + cols, (a * u).to(O.dtype.element_ty), mask=m)


def _warps(block: int, interpret: bool) -> int:
    return 1 if interpret else max(1, min(8, block // 256))


def add_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x, residual (M, N) (last dim contiguous), w (N,) -> (y, s): s = x + residual (x itself when
    residual is None), y = RMSNorm(s) in x's dtype."""
    M, N = x.shape
    if x.stride(1) != 1 or (residual is not None and (residual.shape != x.shape or residual.stride(1) != 1)):
        raise ValueError("add_rms_norm (triton): x and residual must be (M, N) with a contiguous last dim")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = torch.empty_like(y) if residual is not None else x
    if M == 0:
        return y, s
    BLOCK = triton.next_power_of_2(N)
    interpret = x.device.type == "cpu"
    r = residual if residual is not None else x
    _add_rms_norm_kernel[(M,)](x, r, w, y, s, y, x.stride(0), r.stride(0), y.stride(0), s.stride(0), N, float(eps),
                               HAS_RES=residual is not None, STORE_RSTD=False, BLOCK=BLOCK,
                               num_warps=_warps(BLOCK, interpret))
    return y, s


def rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots):
    """q (T, Hq, D), k, v (T, Hkv, D) (last dims contiguous), cos, sin (T, 1, D/2) or (T, D/2) float32,
    caches (NB, bs, Hkv, D), slots (T,) int64 -> q rotated (T, Hq, D); rotated k and v written to
    their slots (the cache's dtype)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if D % 2 or q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("rope_store_kv (triton): head_dim must be even and the last dims contiguous")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(0) != k_cache.shape[1] * k_cache.stride(1):
        raise ValueError("rope_store_kv (triton): k_cache and v_cache need the same strides, blocks laid out densely")
    if (k.shape != v.shape or k.shape[0] != T or k.shape[2] != D or k_cache.shape[2:] != (Hkv, D)
            or cos.numel() != T * (D // 2) or sin.numel() != T * (D // 2) or slots.shape != (T,)):
        raise ValueError(f"rope_store_kv (triton): q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"cache {tuple(k_cache.shape)}, cos {tuple(cos.shape)}, slots {tuple(slots.shape)} disagree")
    cos, sin = cos.reshape(T, D // 2), sin.reshape(T, D // 2)
    if cos.stride(1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    qo = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    if T == 0:
        return qo
    interpret = q.device.type == "cpu"
    BH, BD = triton.next_power_of_2(max(Hq, Hkv)), triton.next_power_of_2(D // 2)
    _rope_store_kv_kernel[(T,)](
        q, k, v, cos, sin, qo, k_cache, v_cache, slots.contiguous(),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(1), k_cache.stride(2), HQ=Hq, HKV=Hkv, HALF=D // 2, BLOCK_H=BH, BLOCK_D=BD,
        num_warps=_warps(BH * BD, interpret))
    return qo


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g, u (M, N) (last dim contiguous) -> F.silu(g) * u in g's dtype."""
    M, N = g.shape
    if g.stride(1) != 1 or u.stride(1) != 1 or u.shape != g.shape:
        raise ValueError("silu_mul (triton): g and u must be the same (M, N) shape with a contiguous last dim")
    out = torch.empty((M, N), dtype=g.dtype, device=g.device)
    if M == 0 or N == 0:
        return out
    interpret = g.device.type == "cpu"
    BLOCK = min(triton.next_power_of_2(N), 16384 if interpret else 1024)
    _silu_mul_kernel[(M, triton.cdiv(N, BLOCK))](g, u, out, g.stride(0), u.stride(0), out.stride(0), N, BLOCK=BLOCK,
                                                 num_warps=_warps(BLOCK, interpret))
    return out
