"""The autograd Functions of a training step that keep less for backward, or launch fewer kernels,
than PyTorch's autograd over Linears would, and its fused elementwise passes (RMSNorm, RoPE, the
SwiGLU product): Triton kernels on GPU (kernels/fused.py), C++ kernels on CPU (csrc/cpu/fused.cpp),
PyTorch's ops where neither is there.

SwiGLU MLP, y = W_d (silu(W_g x) * W_u x), with gate and up as one GEMM ([g | u] = x [W_g; W_u]^T):
    autograd keeps x, g = W_g x, u = W_u x, silu(g) and h = silu(g) * u: four (N, I) tensors.
    Here only x and [g | u] are kept; silu(g) and h are recomputed in backward (elementwise, no
    matmul, in the same single pass that makes dg and du), with silu'(g) = s (1 + g (1 - s)),
    s = sigmoid(g):
        dW_d = dy^T h,   dh = dy W_d,   du = dh silu(g),   dg = dh u silu'(g)
        dx = [dg | du] [W_g; W_u],   [dW_g; dW_u] = [dg | du]^T x
    Two fewer (N, I) tensors per layer: 28 layers x 2 x 8192 x 8960 bf16 = 8.2 GB at the
    Qwen2.5-1.5B shape, 2 x 4096 tokens. Used where a fused backward pass exists (see swiglu).
q/k/v projections: one GEMM over the stacked weights each way, RoPE on q and k in place inside it
(QKVFunction).
RoPE, a rotation by +angle: its backward is the rotation by -angle, so only cos/sin (shared by
all layers) are kept, not float32 copies of q and k.

Mixed precision: under torch.autocast the matmuls run in the autocast dtype, as a Linear would,
and what is kept for backward is in that dtype; gradients come back in each input's own dtype
(float32 master weights get float32 gradients).
"""
from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

# The custom backwards below compute their gradients with kernels, not traced ops: under create_graph=True
# (a gradient penalty, a Hessian-vector product) first_order_only raises, where once_differentiable dropped
# the second-order terms without a word (0.88 relative error through a tiny Llama, 2026-11-30).
from reasonrl.ops._backend import first_order_only


# On CUDA the elementwise passes of RMSNorm, RoPE and the SwiGLU product run as Triton kernels
# (kernels/fused.py: one pass each way); on CPU as the C++ kernels of csrc/cpu/fused.cpp (the same
# passes and rounding) where reasonrl._C is built. "force": Triton also on CPU tensors, through
# Triton's interpreter (tests only); "cpu": False keeps PyTorch's ops on CPU (tests compare the two).
# "step": False turns off the step-level packing that only cuts kernel launches (q/k/v as one GEMM with
# RoPE inside, each residual add inside the next norm, weight gradients written float32 by their
# GEMM): an ablation for bench_model.py --gpu, which times the step both ways in one process.
FUSED = {"force": False, "cpu": True, "step": True}
_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def _triton_ok() -> bool:
    from reasonrl.ops._backend import triton_importable
    return triton_importable()


def _interpret() -> bool:
    from reasonrl.ops._backend import triton_interpret
    return triton_interpret()


@functools.lru_cache(maxsize=1)
def _cpp_ok() -> bool:
    from reasonrl.ops._backend import cpp_available  # imports reasonrl._C: registers torch.ops.reasonrl.*
    if not (cpp_available() and hasattr(torch.ops.reasonrl, "fused_swiglu_bwd")):
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shapes and dtypes of csrc/fused.cpp's ops for FakeTensor / torch.compile (their C++ kernels are CPU only)."""
    def empty(t, shape=None, dtype=None):
        return t.new_empty(t.shape if shape is None else shape, dtype=t.dtype if dtype is None else dtype)

    fake = torch.library.register_fake
    fake("reasonrl::fused_rms_norm_fwd")(
        lambda x, w, eps: (empty(x, dtype=torch.promote_types(x.dtype, w.dtype)), empty(x, x.shape[:1], torch.float32)))
    fake("reasonrl::fused_rms_norm_bwd")(lambda g, x, w, rstd: (empty(x), empty(x, w.shape, torch.float32)))
    fake("reasonrl::fused_rope")(lambda x, cos, sin, sign: empty(x))
    fake("reasonrl::fused_rope_")(lambda x, cos, sin, sign: None)
    fake("reasonrl::fused_silu_mul")(lambda g, u: empty(g))
    fake("reasonrl::fused_swiglu_bwd")(lambda dh, g, u: (empty(g, g.shape), empty(g, (g.shape[0], 2 * g.shape[1]))))
    fake("reasonrl::scatter_rows")(lambda g, offsets, order, rows: empty(g, (rows, *g.shape[1:])))
    fake("reasonrl::fused_attn_fwd")(
        lambda q, k, v, off, klen, scale: (empty(q), empty(q, (q.shape[0], q.shape[2], q.shape[1]), torch.float32)))
    fake("reasonrl::fused_attn_bwd")(lambda do, q, k, v, o, lse, off, klen, scale: (empty(q), empty(k), empty(v)))


@functools.lru_cache(maxsize=1)
def _triton_kernels():
    from reasonrl.kernels import decode, fused
    return types.SimpleNamespace(rms_norm_fwd=fused.rms_norm_fwd, rms_norm_bwd=fused.rms_norm_bwd, rope=fused.rope,
                                 add_rms_norm_fwd=fused.add_rms_norm_fwd, add_rms_norm_bwd=fused.add_rms_norm_bwd,
                                 rope_=lambda x, c, s, sign=1.0: fused.rope(x, c, s, sign, out=x),
                                 silu_mul=decode.silu_mul, swiglu_bwd=fused.swiglu_bwd)


@functools.lru_cache(maxsize=1)
def _cpp_kernels():
    ops = torch.ops.reasonrl

    def rms_norm_fwd(x, w, eps, out_dtype=None):
        y, r = ops.fused_rms_norm_fwd(x, w, eps)
        return (y if out_dtype is None else y.to(out_dtype)), r  # the C++ kernel writes x's dtype or float32

    def add_rms_norm_fwd(x, a, w, eps, out_dtype=None):  # the ops autograd would run: add, then the norm
        s_ = (x + a).to(x.dtype)
        y, r = rms_norm_fwd(s_, w, eps, out_dtype)
        return y, s_, r

    def add_rms_norm_bwd(g, s_, w, r, g_s, a_dtype):
        dx, dw = ops.fused_rms_norm_bwd(g, s_, w, r)
        if g_s is not None:
            dx = dx + g_s
        return dx, dw, dx.to(a_dtype)

    return types.SimpleNamespace(rms_norm_fwd=rms_norm_fwd, add_rms_norm_fwd=add_rms_norm_fwd,
                                 add_rms_norm_bwd=add_rms_norm_bwd, rms_norm_bwd=ops.fused_rms_norm_bwd,
                                 rope=lambda x, c, s, sign=1.0: ops.fused_rope(x, c, s, sign),
                                 rope_=lambda x, c, s, sign=1.0: ops.fused_rope_(x, c, s, sign),
                                 silu_mul=ops.fused_silu_mul, swiglu_bwd=ops.fused_swiglu_bwd)


def kernels_for(x: torch.Tensor):
    """The fused kernels for x (rms_norm_fwd, rms_norm_bwd, rope, rope_ (in place), silu_mul, swiglu_bwd, with
    kernels/fused.py's signatures), or None: PyTorch's ops."""
    if x.dtype not in _FLOAT:
        return None
    if x.is_cuda or FUSED["force"]:
        if x.is_cuda and _interpret():  # the interpreter would copy every CUDA operand to the host
            return None
        # rows up to kernels.fused.MAX_ROW = 16384 elements are one program's registers
        return _triton_kernels() if x.shape[-1] <= 16384 and _triton_ok() else None
    if x.device.type == "cpu" and FUSED["cpu"] and _cpp_ok():
        return _cpp_kernels()
    return None


def fused_ok(x: torch.Tensor) -> bool:
    """Whether x's elementwise passes run as fused kernels (kernels_for)."""
    return kernels_for(x) is not None


class RMSNormFunction(torch.autograd.Function):
    """y = w * dtype(x * rsqrt(mean(x^2) + eps)) over the last dim (models.RMSNorm), one fused pass
    each way (kernels_for); keeps x and the per-row rsqrt. out_dtype (None: promote(x, w)) rounds y
    to the dtype its consumer computes in (autocast's bf16 for the next GEMM): the same values the
    consumer's own cast would make, without that cast's pass and its backward's (the gradient then
    arrives in out_dtype and is read as it is)."""
    @staticmethod
    def forward(ctx, x, w, eps, out_dtype=None):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, r = kernels_for(x2).rms_norm_fwd(x2, w, eps, out_dtype)
        ctx.save_for_backward(x2, w, r)
        ctx.shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        x2, w, r = ctx.saved_tensors
        dx, dw = kernels_for(x2).rms_norm_bwd(g.reshape(-1, g.shape[-1]).contiguous(), x2, w, r)
        return dx.view(ctx.shape), dw.to(w.dtype), None, None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """models.RMSNorm's forward through the fused kernels (callers check fused_ok(x))."""
    return RMSNormFunction.apply(x, w, eps, out_dtype)


class AddRMSNormFunction(torch.autograd.Function):
    """(s, y) = (x + a, rms_norm(x + a)): the residual add and the norm after it (post-attention), one
    fused pass each way on GPU (kernels/fused.py add_rms_norm_*). s is in x's dtype (the residual stream),
    y in out_dtype (None: promote(s, w)). Backward: ds = g_s + the norm's backward of g_y, written for
    x and, in a's dtype, for a, in the same pass; autograd ran an add, the norm's pass, another add and
    a cast there. Also the MLP's residual add with the next layer's input norm (DecoderLayer), and the
    last one with the final norm, whose s is not used (no gradient for it: none is made of zeros)."""
    @staticmethod
    def forward(ctx, x, a, w, eps, out_dtype=None):
        ctx.set_materialize_grads(False)
        n = x.shape[-1]
        y, s, r = kernels_for(x).add_rms_norm_fwd(x.reshape(-1, n).contiguous(), a.reshape(-1, n).contiguous(), w,
                                                  eps, out_dtype)
        ctx.save_for_backward(s, w, r)
        ctx.meta = (x.shape, a.dtype)
        return s.view(x.shape), y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @first_order_only
    def backward(ctx, g_s, g_y):
        s, w, r = ctx.saved_tensors
        shape, a_dt = ctx.meta
        n = shape[-1]
        if g_y is None:  # only s was used: the add's backward
            return g_s, None if g_s is None else g_s.to(a_dt), None, None, None
        g_s = None if g_s is None else g_s.reshape(-1, n).contiguous()
        dx, dw, da = kernels_for(s).add_rms_norm_bwd(g_y.reshape(-1, n).contiguous(), s, w, r, g_s, a_dt)
        return dx.view(shape), da.view(shape), dw.to(w.dtype), None, None


def add_rms_norm(x, a, w, eps, out_dtype=None):
    """(x + a, rms_norm(x + a)) through the fused kernels (callers check fused_ok(x))."""
    return AddRMSNormFunction.apply(x, a, w, eps, out_dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class SwiGLUFunction(torch.autograd.Function):
    """The SwiGLU MLP (module docstring) with gate and up as one GEMM over their stacked weights: g and
    u are the two halves of its (N, 2I) output, read at their row strides; the backward's fused pass
    writes [dg | du] side by side, so dx is one GEMM and dW_gate, dW_up one more (split as row views).
    Kernels a layer under autocast, against three Linears: forward 5 (2 weight casts, 2 GEMMs, the
    product), backward 7 (3 GEMMs for dh, dW_down, dx, one for dW_gate|up, the fused pass, 2 casts; 5
    on CUDA, where the two weight-gradient GEMMs write float32 themselves: _mm_to)."""
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        dt = _compute_dtype(x)
        xc = x.to(dt)
        # the weights in the compute dtype, kept for the backward as autocast keeps its casts: casting
        # them again there was more kernels a layer (the GPU step waits on the host's launches)
        wgu, wd = _cat_to((w_gate, w_up), dt), w_down.to(dt)  # (2I, H), (H, I); a view where no copy is needed
        I = w_gate.shape[0]
        gu = F.linear(xc, wgu)  # (N, 2I)
        g, u = gu[..., :I], gu[..., I:]
        k = kernels_for(gu)
        if k is not None:
            h = k.silu_mul(g.reshape(-1, I), u.reshape(-1, I)).view(g.shape)
        else:
            h = F.silu(g) * u
        y = F.linear(h, wd)  # (N, H)
        # the weights themselves too (no copy): autograd's in-place check then fires on them, as it would
        # for three Linears, where the casts above would hide a change made between forward and backward
        ctx.save_for_backward(xc, gu, wgu, wd, w_gate, w_up, w_down)
        ctx.dtypes = (x.dtype, w_gate.dtype, w_up.dtype, w_down.dtype)
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        xc, gu, wgu, wd = ctx.saved_tensors[:4]
        x_dt, g_dt, u_dt, d_dt = ctx.dtypes
        dt, I = gu.dtype, gu.shape[-1] // 2
        dy2 = dy.to(dt).reshape(-1, dy.shape[-1])
        gu2 = gu.reshape(-1, 2 * I)
        g, u = gu2[:, :I], gu2[:, I:]
        dh = dy2 @ wd  # (N, I)
        k = kernels_for(gu)
        if k is not None:  # h = silu(g) u and [dg | du] in one pass
            h, dgu = k.swiglu_bwd(dh, g, u)
        else:
            silu = F.silu(g)
            h = silu * u
            dgu = torch.cat((torch.ops.aten.silu_backward(dh * u, g), dh * silu), 1)  # dh u silu'(g) fused
        dw_down = _mm_to(dy2.t(), h, d_dt)  # (H, I)
        dx = (dgu @ wgu).view(*gu.shape[:-1], wgu.shape[1])
        x2 = xc.reshape(-1, xc.shape[-1])
        if dgu.is_cuda:
            dw_gate, dw_up = _mm_to(dgu.t(), x2, g_dt).split(I)  # row views
        else:  # two GEMMs into one buffer: MKL ran the stacked one at half speed with few rows
            dwgu = torch.empty(2 * I, x2.shape[1], dtype=dt, device=x2.device)
            torch.mm(dgu[:, :I].t(), x2, out=dwgu[:I])
            torch.mm(dgu[:, I:].t(), x2, out=dwgu[I:])
            dw_gate, dw_up = dwgu.to(g_dt).split(I)
        if u_dt != g_dt:
            dw_up = dw_up.to(u_dt)
        return dx.to(x_dt), dw_gate, dw_up, dw_down


_MM_OUT_DTYPE = {}


def _mm_out_dtype_ok(device) -> bool:
    """Whether torch.mm(a, b, out_dtype=torch.float32) runs for bf16 operands on this CUDA device
    (aten::mm.dtype: torch >= 2.8, CUDA only): probed once per device with a transposed operand, as
    the weight gradients use it; not probed (False) while a CUDA graph is being captured."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _MM_OUT_DTYPE:
        if torch.cuda.is_current_stream_capturing():
            return False
        try:
            a = torch.ones(64, 16, device=device, dtype=torch.bfloat16)
            out = torch.mm(a.t(), a, out_dtype=torch.float32)
            _MM_OUT_DTYPE[idx] = out.dtype == torch.float32 and bool((out == 64).all())
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[idx] = False
    return _MM_OUT_DTYPE[idx]


def _mm_to(a, b, dt):
    """a @ b written in dt. A weight gradient on CUDA (bf16/fp16 operands, float32 master weight): one
    GEMM that writes its float32 accumulator as float32 (torch.mm out_dtype), where autocast's Linear
    rounds dW to bf16 and then casts it up: one kernel fewer per weight (the GPU step waits on the
    host's launches), and dW without the bf16 rounding. Elsewhere the product, then a cast to dt."""
    if (dt == torch.float32 and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype
            and FUSED["step"] and _mm_out_dtype_ok(a.device)):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).to(dt)


class LinearFunction(torch.autograd.Function):
    """y = x W^T (+ b) as a Linear under autocast computes it (x and W in the compute dtype, one GEMM),
    with W's gradient written by its GEMM in W's own dtype (_mm_to) instead of rounded to bf16 and cast
    back up: the attention's output projection on CUDA (Attention.forward)."""
    @staticmethod
    def forward(ctx, x, w, b):
        dt = _compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        wc = w.to(dt)
        y = x2 @ wc.t() if b is None else torch.addmm(b.to(dt), x2, wc.t())
        ctx.save_for_backward(x2, wc, w)  # w itself for autograd's in-place check (SwiGLUFunction)
        ctx.meta = (x.dtype, x.shape, w.dtype, None if b is None else b.dtype)
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x2, wc = ctx.saved_tensors[:2]
        x_dt, x_shape, w_dt, b_dt = ctx.meta
        dy2 = dy.reshape(-1, dy.shape[-1]).to(wc.dtype)
        dx = (dy2 @ wc).view(x_shape).to(x_dt) if ctx.needs_input_grad[0] else None
        dw = _mm_to(dy2.t(), x2, w_dt) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0, dtype=b_dt) if b_dt is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x, layer: torch.nn.Linear):
    """layer(x); on CUDA with gradients, through LinearFunction (its weight gradient in one kernel)."""
    if x.is_cuda and FUSED["step"] and torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad):
        return LinearFunction.apply(x, layer.weight, layer.bias)
    return layer(x)


def adjacent_rows(ts):
    """One view over tensors stored back to back in one storage (2-D with the same columns: rows
    stacked; 1-D: concatenated), or None where they are not: q/k/v (or gate/up) as one GEMM's weight
    without a copy."""
    t0 = ts[0]
    if any(t is None for t in ts):
        return None
    cols = t0.shape[1:]
    if not all(t.is_contiguous() and t.dtype == t0.dtype and t.device == t0.device and t.shape[1:] == cols
               and t.untyped_storage().data_ptr() == t0.untyped_storage().data_ptr() for t in ts):
        return None
    off = t0.storage_offset()
    for t in ts:
        if t.storage_offset() != off:
            return None
        off += t.numel()
    shape = (sum(t.shape[0] for t in ts), *cols)
    return t0.as_strided(shape, torch.empty(shape, device="meta").stride(), t0.storage_offset())


def _cat_to(ts, dt, dim=0):
    """torch.cat(ts, dim) written in dt: one pass, also where the parts are float32 master weights and
    dt is autocast's bf16 (a cat then a cast would be two). Rows already back to back in dt (the
    engine packs q/k/v and gate/up that way, decode_forward.pack_rows) come back as one view, no copy.
    NOTE: CPU, float32, Qwen2.5-0.5B shapes: stacking gate/up (2 x 4864 x 896) took 17.5 ms a layer."""
    if dim == 0 and all(t.dtype == dt for t in ts):
        v = adjacent_rows(ts)
        if v is not None:
            return v
    shape = list(ts[0].shape)
    shape[dim] = sum(t.shape[dim] for t in ts)
    return torch.cat(ts, dim=dim, out=torch.empty(shape, dtype=dt, device=ts[0].device))


class QKVFunction(torch.autograd.Function):
    """q, k, v = x W_q^T + b_q, x W_k^T + b_k, x W_v^T + b_v as one GEMM over the three weights
    stacked by rows (made once per call, in the compute dtype: autocast's under autocast), returned
    as column views of its output. Backward: the three gradients side by side, then one GEMM for dx
    (its three products summed inside the GEMM's float32 accumulator, not as three rounded outputs
    added), one for the stacked dW (split into the three weights' gradients as row views) and one
    column sum for the biases, in their own dtype.
    Why: the separate projections under autocast were 12 kernels a layer forward (3 GEMMs, 3 casts
    of x, 6 of the weights and biases) and 20 backward; this is 5 and 6 (5 on CUDA, where dW's GEMM
    writes float32 itself: _mm_to). A GPU training step waits on the host's launches (H200 profile
    of the Qwen2.5-0.5B shape: GPU busy 76 of 104 ms)."""
    @staticmethod
    def forward(ctx, x, wq, wk, wv, bq, bk, bv, cos=None, sin=None, head_dim=0):
        dt = _compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        w = _cat_to((wq, wk, wv), dt)  # (Q + K + V, H)
        y = x2 @ w.t() if bq is None else torch.addmm(_cat_to((bq, bk, bv), dt), x2, w.t())
        ctx.sizes = (wq.shape[0], wk.shape[0], wv.shape[0])
        ctx.rot = None
        if cos is not None:  # RoPE on q and k (adjacent columns) in place: one pass for both
            ctx.rot = (cos, sin, head_dim)
            rope_(y[:, :ctx.sizes[0] + ctx.sizes[1]].view(y.shape[0], -1, head_dim), cos, sin)
        ctx.save_for_backward(x2, w, wq, wk, wv)  # the weights for autograd's in-place check (SwiGLUFunction)
        ctx.meta = (x.dtype, x.shape, wq.dtype, None if bq is None else bq.dtype)
        lead = x.shape[:-1]
        return tuple(t.view(*lead, t.shape[1]) for t in y.split(ctx.sizes, dim=1))

    @staticmethod
    @first_order_only
    def backward(ctx, dq, dk, dv):
        x2, w = ctx.saved_tensors[:2]
        x_dt, x_shape, w_dt, b_dt = ctx.meta
        dy = _cat_to([d.reshape(-1, d.shape[-1]) for d in (dq, dk, dv)], w.dtype, 1)  # (N, Q + K + V)
        if ctx.rot is not None:  # through RoPE: the rotation by -angle, in place
            cos, sin, D = ctx.rot
            rope_(dy[:, :ctx.sizes[0] + ctx.sizes[1]].view(dy.shape[0], -1, D), cos, sin, -1.0)
        dx = (dy @ w).view(x_shape).to(x_dt) if ctx.needs_input_grad[0] else None
        dws = (None,) * 3
        if any(ctx.needs_input_grad[1:4]):
            dws = _mm_to(dy.t(), x2, w_dt).split(ctx.sizes)  # row views: each contiguous
        dbs = (None,) * 3
        if b_dt is not None and any(ctx.needs_input_grad[4:7]):
            dbs = dy.sum(0, dtype=b_dt).split(ctx.sizes)
        return (dx, *dws, *dbs, None, None, None)


def qkv_proj(x, q_proj, k_proj, v_proj, rope=None):
    """(q, k, v, rotated) of three nn.Linear: one GEMM each way (QKVFunction) where gradients are taken,
    with RoPE applied to q and k inside it (rotated True) where rope = (cos, sin, head_dim) is given; three
    Linears otherwise (rollouts: stacking the weights on every decode step would be a pass over them), and
    rotated False: the caller applies RoPE."""
    ws, bs = (q_proj.weight, k_proj.weight, v_proj.weight), (q_proj.bias, k_proj.bias, v_proj.bias)
    if (FUSED["step"] and torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in ws))
            and len({w.dtype for w in ws}) == 1 and len({b is None for b in bs}) == 1):
        cos, sin, hd = rope if rope is not None else (None, None, 0)
        return (*QKVFunction.apply(x, *ws, *bs, cos, sin, hd), rope is not None)
    return q_proj(x), k_proj(x), v_proj(x), False


def swiglu(x, w_gate, w_up, w_down):
    """x (N, H) -> (N, H); weights in nn.Linear layout (out, in)."""
    # NOTE: CUDA, or a fused backward pass on CPU. With PyTorch's ops the recompute costs two more
    # elementwise passes over (N, I) in backward; on CPU that made a tiny-model training step 19%
    # slower (2 cores) for activations that are small there anyway.
    if torch.is_grad_enabled() and (x.requires_grad or w_gate.requires_grad) and (x.is_cuda or fused_ok(x)):
        return SwiGLUFunction.apply(x, w_gate, w_up, w_down)
    g, u = F.linear(x, w_gate), F.linear(x, w_up)
    k = kernels_for(g)
    if k is not None and not g.is_cuda and g.dim() == 2:  # one pass for silu(g) u (CPU prefill, eval)
        return F.linear(k.silu_mul(g, u), w_down)
    return F.linear(F.silu(g) * u, w_down)


def _rotate(x, cos, sin):
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _rope(x, cos, sin, sign=1.0):
    k = kernels_for(x)
    if k is not None and x.dim() == 3 and x.stride(-1) == 1 and x.shape[-1] % 2 == 0 and cos.dtype == torch.float32:
        return k.rope(x, cos, sin, sign)
    return _rotate(x, cos, sin if sign > 0 else -sin)


def rope_(x, cos, sin, sign=1.0) -> None:
    """x (T, H, D) rotated in place (a column view of the packed q/k/v GEMM output; sign -1: inverse)."""
    k = kernels_for(x)
    if k is not None and x.stride(-1) == 1 and x.shape[-1] % 2 == 0 and cos.dtype == torch.float32:
        k.rope_(x, cos, sin, sign)
    else:
        x.copy_(_rotate(x, cos, sin if sign > 0 else -sin))


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope(x, cos, sin)

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rope(grad, cos, sin, -1.0), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D), cos/sin (T, 1, D/2) float32 -> (T, H, D) in x's dtype, rotated in float32."""
    if torch.is_grad_enabled() and x.requires_grad:
        return RopeFunction.apply(x, cos, sin)
    return _rope(x, cos, sin)
