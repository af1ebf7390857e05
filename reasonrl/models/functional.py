"""Two autograd Functions that keep less for backward than PyTorch's autograd would.

SwiGLU MLP, y = W_d (silu(W_g x) * W_u x):
    autograd keeps x, g = W_g x, u = W_u x, silu(g) and h = silu(g) * u: four (N, I) tensors.
    Here only x, g and u are kept; silu(g) and h are recomputed in backward (elementwise, no
    matmul), with silu'(g) = s (1 + g (1 - s)), s = sigmoid(g):
        dW_d = dy^T h,   dh = dy W_d,   du = dh silu(g),   dg = dh u silu'(g)
        dx = dg W_g + du W_u,   dW_g = dg^T x,   dW_u = du^T x
    Two fewer (N, I) tensors per layer: 28 layers x 2 x 8192 x 8960 bf16 = 8.2 GB at the
    Qwen2.5-1.5B shape, 2 x 4096 tokens. Used on CUDA only (see swiglu).
RoPE, a rotation by +angle: its backward is the rotation by -angle, so only cos/sin (shared by
all layers) are kept, not float32 copies of q and k.

Mixed precision: under torch.autocast the matmuls run in the autocast dtype, as a Linear would,
and what is kept for backward is in that dtype; gradients come back in each input's own dtype
(float32 master weights get float32 gradients).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        dt = _compute_dtype(x)
        xc = x.to(dt)
        g = F.linear(xc, w_gate.to(dt))  # (N, I)
        u = F.linear(xc, w_up.to(dt))  # (N, I)
        y = F.linear(F.silu(g) * u, w_down.to(dt))  # (N, H)
        ctx.save_for_backward(xc, g, u, w_gate, w_up, w_down)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, g, u, w_gate, w_up, w_down = ctx.saved_tensors
        dt = g.dtype
        dy = dy.to(dt)
        silu = F.silu(g)
        dh = dy @ w_down.to(dt)  # (N, I)
        dw_down = dy.flatten(0, -2).t() @ (silu * u).flatten(0, -2)  # (H, I)
        du = dh * silu
        dg = torch.ops.aten.silu_backward(dh * u, g)  # one fused kernel for dh u silu'(g)
        dx = dg @ w_gate.to(dt) + du @ w_up.to(dt)
        dw_gate = dg.flatten(0, -2).t() @ xc.flatten(0, -2)
        dw_up = du.flatten(0, -2).t() @ xc.flatten(0, -2)
        return (dx.to(ctx.x_dtype), dw_gate.to(w_gate.dtype), dw_up.to(w_up.dtype), dw_down.to(w_down.dtype))


def swiglu(x, w_gate, w_up, w_down):
    """x (N, H) -> (N, H); weights in nn.Linear layout (out, in)."""
    # NOTE: CUDA only. The recompute costs two elementwise passes over (N, I) in backward; on CPU
    # with the 0.8M-parameter tiny model that made a training step 19% slower (2 cores) for
    # activations that are small there anyway.
    if x.is_cuda and torch.is_grad_enabled() and (x.requires_grad or w_gate.requires_grad):
        return SwiGLUFunction.apply(x, w_gate, w_up, w_down)
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def _rotate(x, cos, sin):
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D), cos/sin (T, 1, D/2) float32 -> (T, H, D) in x's dtype, rotated in float32."""
    if torch.is_grad_enabled() and x.requires_grad:
        return RopeFunction.apply(x, cos, sin)
    return _rotate(x, cos, sin)
