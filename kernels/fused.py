"""Triton kernels of the training forward and backward on GPU: RMSNorm, RoPE and the SwiGLU product.

Why: at 2 x 4096 tokens of a Qwen2.5-0.5B-shaped model, PyTorch runs RMSNorm as ~6 elementwise
passes forward and ~10 backward over float32 (T, H) tensors, RoPE as ~8 passes each way and the
SwiGLU product as 2 forward and 5 backward over (T, I): a pass-count estimate puts them near a sixth
of the step (4096 x 2 tokens, 24 layers, ~3 TB/s). Fused, each is one pass each way:

  rms_norm    fwd: y = w * dtype(x * r), r = rsqrt(mean(x^2) + eps) (models.RMSNorm), keeps r (T,)
              (decode._add_rms_norm_kernel without a residual)
              bwd: xn = x r, gw = g w; dx = r (gw - xn mean(gw xn)); dw = sum_rows g xn
              (partial sums per program, added by one torch.sum)
  add_rms_norm  s = x + a (the residual add) and rms_norm(s) in one pass (decode's kernel with its
              residual); backward: rms_norm's, plus the residual stream's own gradient, written
              also in a's dtype (the gradient of the added branch)
  rope        y = [x1 c - x2 s, x2 c + x1 s] in float32, rounded to x's dtype; backward: the same
              kernel with -s (a rotation by -angle)
  swiglu_bwd  h = silu(g) u (for dW_down), du = dh silu(g), dg = dh u silu'(g),
              silu'(g) = s (1 + g (1 - s)), s = sigmoid(g), written as [dg | du] (the gradient of the
              packed gate/up GEMM's output, whose halves g and u are read at their row strides);
              forward: decode.silu_mul

Used by models/functional.py and models/model.py on CUDA tensors (reasonrl.models.functional.fused_ok).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode import _add_rms_norm_kernel  # the forward: decode's kernel, keeping rsqrt per row


@triton.jit
def _rms_bwd_kernel(G, X, W, R, DX, DW, GS, DA, stride_g, stride_x, stride_dx, stride_gs, stride_da, M, N,
                    rows_per_prog, HAS_GS: tl.constexpr, HAS_DA: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    row0 = pid * rows_per_prog
    for i in range(0, rows_per_prog):
        row = (row0 + i).to(tl.int64)
        if row < M:
            x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            g = tl.load(G + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
            r = tl.load(R + row)
            xn = x * r
            gw = g * w
            dx = r * (gw - xn * (tl.sum(gw * xn, 0) / N))
            if HAS_GS:  # the residual stream's own gradient (add_rms_norm: x is s = x0 + a)
                dx += tl.load(GS + row * stride_gs + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=m)
            if HAS_DA:  # the same gradient in the added branch's dtype
                tl.store(DA + row * stride_da + cols, dx.to(DA.dtype.element_ty), mask=m)
            dw += g * xn.to(X.dtype.element_ty).to(tl.float32)
    tl.store(DW + pid * N + cols, dw, mask=m)


@triton.jit
def _rope_kernel(X, COS, SIN, Y, stride_xt, stride_xh, stride_yt, stride_yh, stride_ct, sign, H, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    dm = d < HALF
    m = (h < H) & dm
    c = tl.load(COS + t * stride_ct + d, mask=dm, other=0.0).to(tl.float32)
    s = tl.load(SIN + t * stride_ct + d, mask=dm, other=0.0).to(tl.float32) * sign
    x1 = tl.load(X + t * stride_xt + h * stride_xh + d, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(X + t * stride_xt + h * stride_xh + HALF + d, mask=m, other=0.0).to(tl.float32)
    y = Y + t * stride_yt + h * stride_yh + d  # Y may be X (in place): both halves are loaded first
    tl.store(y, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=m)
    tl.store(y + HALF, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(DH, G, U, H_OUT, DGU, stride_dh, stride_g, stride_u, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < N
    dh = tl.load(DH + row * stride_dh + cols, mask=m, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=m, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    silu = (g * s).to(G.dtype.element_ty).to(tl.float32)  # F.silu(g) in g's dtype, as decode.silu_mul
    tl.store(H_OUT + row * N + cols, (silu * u).to(H_OUT.dtype.element_ty), mask=m)
    d = DGU + row * (2 * N) + cols  # [dg | du]
    tl.store(d, (dh * u * (s * (1.0 + g * (1.0 - s)))).to(DGU.dtype.element_ty), mask=m)
    tl.store(d + N, (dh * silu).to(DGU.dtype.element_ty), mask=m)


# Rows up to this many elements are one program's registers (the backward spilled past 8192 with 8
# warps when compiled for sm_90a); wider rows keep PyTorch's ops (models.functional.fused_ok).
MAX_ROW = 16384


def _interp(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _row_warps(block: int, interpret: bool) -> int:
    return 1 if interpret else (16 if block >= 8192 else max(1, min(8, block // 256)))


def rms_norm_fwd(x: torch.Tensor, w: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None):
    """x (M, N) contiguous -> (y (M, N) in out_dtype (None: promote(x, w)), r (M,) float32)."""
    y, _, r = _norm_fwd(x, None, w, eps, out_dtype)
    return y, r


def rms_norm_bwd(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor):
    """-> dx (M, N) in x's dtype, dw (N,) float32."""
    dx, dw, _ = _rms_bwd(g, x, w, r, None, None)
    return dx, dw


def add_rms_norm_fwd(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, eps: float,
                     out_dtype: torch.dtype | None = None):
    """The residual add and the norm after it, one pass: x (M, N), a (M, N) (last dims contiguous) ->
    (y = w * dtype(s * r) in out_dtype (None: promote(x, w)), s = x + a in x's dtype, r (M,) float32)."""
    if a.shape != x.shape or x.stride(1) != 1 or a.stride(1) != 1:
        raise ValueError("add_rms_norm_fwd (triton): x and a must be (M, N) of one shape with contiguous rows")
    return _norm_fwd(x, a, w, eps, out_dtype)


def _norm_fwd(x, a, w, eps, out_dtype):
    """decode's add+norm kernel keeping rsqrt per row; a None: no residual add (s is then x itself)."""
    M, N = x.shape
    y = torch.empty((M, N), dtype=out_dtype or torch.promote_types(x.dtype, w.dtype), device=x.device)
    s = x if a is None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    r = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        BLOCK = triton.next_power_of_2(N)
        res = x if a is None else a
        _add_rms_norm_kernel[(M,)](x, res, w, y, s, r, x.stride(0), res.stride(0), y.stride(0), s.stride(0), N,
                                   float(eps), HAS_RES=a is not None, STORE_RSTD=True, BLOCK=BLOCK,
                                   num_warps=_row_warps(BLOCK, _interp(x)))
    return y, s, r


def add_rms_norm_bwd(g: torch.Tensor, s: torch.Tensor, w: torch.Tensor, r: torch.Tensor, g_s: torch.Tensor,
                     a_dtype: torch.dtype):
    """Backward of add_rms_norm_fwd: g (grad of y), g_s (grad of s) -> (dx in s's dtype (= ds), dw (N,)
    float32, da = ds in a_dtype (dx itself where that is s's dtype)), one pass."""
    dx, dw, da = _rms_bwd(g, s, w, r, g_s, None if a_dtype == s.dtype else a_dtype)
    return dx, dw, dx if da is None else da


def _rms_bwd(g, x, w, r, g_s, a_dtype):
    M, N = x.shape
    dx = torch.empty_like(x)
    da = None if a_dtype is None else torch.empty((M, N), dtype=a_dtype, device=x.device)
    if M == 0:
        return dx, torch.zeros(N, dtype=torch.float32, device=x.device), da
    progs = min(M, 4 if _interp(x) else 4 * 132)
    rows = triton.cdiv(M, progs)
    progs = triton.cdiv(M, rows)
    dw = torch.empty((progs, N), dtype=torch.float32, device=x.device)
    BLOCK = triton.next_power_of_2(N)
    gs = x if g_s is None else g_s
    _rms_bwd_kernel[(progs,)](g, x, w, r, dx, dw, gs, dx if da is None else da, g.stride(0), x.stride(0),
                              dx.stride(0), gs.stride(0), dx.stride(0) if da is None else da.stride(0), M, N, rows,
                              HAS_GS=g_s is not None, HAS_DA=da is not None, BLOCK=BLOCK,
                              num_warps=_row_warps(BLOCK, _interp(x)))
    return dx, dw.sum(0), da


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float = 1.0, out: torch.Tensor | None = None):
    """x (T, H, D) (last dim contiguous), cos/sin (T, 1, D/2) float32 -> rotated (T, H, D) in x's dtype
    (sign -1: the inverse rotation), into `out` where given (last dim contiguous; may be x: in place)."""
    T, H, D = x.shape
    cos, sin = cos.reshape(T, D // 2), sin.reshape(T, D // 2)
    if cos.stride(1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty((T, H, D), dtype=x.dtype, device=x.device) if out is None else out
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or (D > 1 and out.stride(2) != 1)):
        raise ValueError("rope (triton): out must be x's shape and dtype with a contiguous last dim")
    if T:
        BH = min(triton.next_power_of_2(H), 16)
        BD = triton.next_power_of_2(D // 2)
        _rope_kernel[(T, triton.cdiv(H, BH))](x, cos, sin, y, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                                            cos.stride(0), float(sign), H, HALF=D // 2, BLOCK_H=BH, BLOCK_D=BD,
                                            num_warps=1 if _interp(x) else max(1, min(4, BH * BD // 128)))
    return y


def swiglu_bwd(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
    """dh, g, u (M, N), one dtype, each with contiguous rows (g and u: the halves of the packed gate/up
    GEMM output) -> (h = silu(g) u (M, N), dgu = [dg | du] (M, 2N)), in g's dtype."""
    M, N = g.shape
    if not dh.shape == g.shape == u.shape or any(t.stride(1) != 1 and N > 1 for t in (dh, g, u)):
        raise ValueError("swiglu_bwd (triton): dh, g and u must be (M, N) of one shape with contiguous rows")
    h = torch.empty((M, N), dtype=g.dtype, device=g.device)
    dgu = torch.empty((M, 2 * N), dtype=g.dtype, device=g.device)
    if M and N:
        BLOCK = min(triton.next_power_of_2(N), 16384 if _interp(g) else 1024)
        _swiglu_bwd_kernel[(M, triton.cdiv(N, BLOCK))](dh, g, u, h, dgu, dh.stride(0), g.stride(0), u.stride(0), N,
                                                       BLOCK=BLOCK,
                                                       num_warps=1 if _interp(g) else max(1, min(4, BLOCK // 256)))
    return h, dgu
