"""The fused RMSNorm, RoPE and SwiGLU passes of a training step: kernels/fused.py (GPU; forced onto
CPU tensors through Triton's interpreter here) and csrc/cpu/fused.cpp (CPU, reasonrl._C): values
and gradients against float64, held to the error PyTorch itself makes in the same dtype
(tolerance.py); a whole model's loss and gradients with and without them; the row gather of packed
attention (models.attention.take_rows) and its scatter_rows backward."""
import os

import pytest
import torch
import torch.nn.functional as F
from cpu_isa import runnable_isas
from tolerance import ATOL, assert_close_to_ref

from reasonrl.models import AttnContext, builtin_path, init_model
from reasonrl.models import functional as Fn
from reasonrl.ops import _backend

pytestmark = [pytest.mark.usefixtures("one_thread")]
_no_triton = pytest.mark.skipif(not _backend.triton_importable(), reason="triton is not installed")
# "cpu": Triton on CPU tensors through the interpreter; "cuda": Triton compiled on a GPU machine
# (pytest -m gpu); "cpp": the C++ kernels on CPU tensors (the default on CPU); "cpp:<isa>": those
# kernels' build for a lower instruction set than this CPU's best (each is compiled for x86-64-v4, -v3
# and the baseline; ops.logprob_cpu_isa picks one for these and the log-prob kernels)


LOWER_ISAS = runnable_isas()[:-1] if Fn._cpp_ok() else []
_no_cpp = pytest.mark.skipif(not Fn._cpp_ok(), reason="reasonrl._C is not built")
DEVICES = [pytest.param("cpu", marks=[_no_triton, pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                                      reason="Triton on CPU tensors needs TRITON_INTERPRET=1")]),
           pytest.param("cuda", marks=[_no_triton, pytest.mark.gpu]),
           pytest.param("cpp", marks=_no_cpp)] + [pytest.param(f"cpp:{isa}") for isa in LOWER_ISAS]


@pytest.fixture
def forced(request):
    """Triton forced on for the "cpu" device (the interpreter); C++ kernels on CPU for "cpp" (built for
    the named instruction set for "cpp:<isa>")."""
    device = request.node.callspec.params.get("device", "cpu")
    Fn.FUSED["force"] = device == "cpu"
    Fn.FUSED["cpu"] = device.startswith("cpp")
    if device.startswith("cpp:"):
        torch.ops.reasonrl.logprob_cpu_isa(device[4:])
    yield
    Fn.FUSED["force"], Fn.FUSED["cpu"] = False, True
    if device.startswith("cpp:"):
        torch.ops.reasonrl.logprob_cpu_isa("best")


def _dev(device):
    return "cpu" if device.startswith("cpp") else device


def _plain(fn):
    """fn with PyTorch's ops on CPU (the references)."""
    def run(*a):
        saved = dict(Fn.FUSED)
        Fn.FUSED.update(force=False, cpu=False)
        try:
            return fn(*a)
        finally:
            Fn.FUSED.update(saved)
    return run


def rms_torch(x, w, eps):  # models.RMSNorm's PyTorch ops
    xf = x.float() if x.dtype != torch.float64 else x
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def grads(fn, inputs, g, device="cpu"):
    """Output and input gradients of fn, computed on `device`, returned on the CPU."""
    inputs = [t.detach().to(device).requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(g.to(device, out.dtype))
    return [out.detach().cpu()] + [t.grad.cpu() for t in inputs]


@pytest.mark.parametrize("xdt,wdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("M,N", [(1, 16), (37, 100), (130, 576)])
@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm(forced, xdt, wdt, M, N, device):
    x = torch.randn(M, N) * 2
    w = 1 + 0.1 * torch.randn(N)
    g = torch.randn(M, N)
    got = grads(lambda a, b: Fn.rms_norm(a, b, 1e-6), [x.to(xdt), w.to(wdt)], g, _dev(device))
    ref64 = grads(lambda a, b: rms_torch(a, b, 1e-6), [x.double(), w.double()], g)
    same = grads(lambda a, b: rms_torch(a, b, 1e-6), [x.to(xdt), w.to(wdt)], g)
    # Tolerances at x's precision: the kernels round x * rsqrt(...) to x's dtype, as PyTorch does, and a
    # last-bit difference in the rsqrt can move that rounding by one ulp of x's dtype, which then shows in
    # y and dw even where those are float32 (w float32).
    for name, o, r, s in zip(("y", "dx", "dw"), got, ref64, same):
        assert_close_to_ref(o, r, s, xdt, name, factor=3)
    assert got[0].dtype == torch.promote_types(xdt, wdt) and got[2].dtype == wdt


@pytest.mark.parametrize("xdt,adt,out_dtype", [(torch.float32, torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.float32, None),
                                               (torch.bfloat16, torch.bfloat16, None)])
@pytest.mark.parametrize("M,N", [(1, 16), (37, 100)])
@pytest.mark.parametrize("device", DEVICES)
def test_add_rms_norm(forced, xdt, adt, out_dtype, M, N, device):
    """(s, y) = (x + a, rms_norm(x + a)) in one pass each way (the post-attention residual add and norm;
    under autocast x is the float32 residual stream, a the bf16 attention output, y bf16 for the MLP's
    GEMM): values and the gradients of x, a and w against float64 and against PyTorch's add-then-norm
    in the same dtypes, with gradients arriving for both s and y."""
    dev = _dev(device)
    x, a = torch.randn(M, N) * 2, torch.randn(M, N)
    w = 1 + 0.1 * torch.randn(N)
    ydt = out_dtype or torch.promote_types(xdt, torch.float32)
    g_s, g_y = torch.randn(M, N).to(xdt), torch.randn(M, N).to(ydt)

    def run(fn, xx, aa, ww, dev="cpu"):
        xx, aa, ww = (t.detach().to(dev).requires_grad_(True) for t in (xx, aa, ww))
        s_, y_ = fn(xx, aa, ww)
        torch.autograd.backward([s_, y_], [g_s.to(dev, s_.dtype), g_y.to(dev, y_.dtype)])
        return [t.detach().cpu() for t in (s_, y_, xx.grad, aa.grad, ww.grad)]

    def plain(xx, aa, ww):
        s_ = (xx + aa).to(xx.dtype)
        y_ = rms_torch(s_, ww, 1e-6)
        return s_, (y_ if out_dtype is None or xx.dtype == torch.float64 else y_.to(out_dtype))

    got = run(lambda *t: Fn.add_rms_norm(*t, 1e-6, out_dtype), x.to(xdt), a.to(adt), w, dev)
    ref64 = run(plain, x.double(), a.to(adt).double(), w.double())
    same = run(plain, x.to(xdt), a.to(adt), w)
    assert [t.dtype for t in got] == [xdt, ydt, xdt, adt, torch.float32]
    # Triton's interpreter ("cpu") rounds float32 -> bf16 toward zero where compiled Triton and torch round
    # to nearest: with bf16 x, s and then y are truncated, up to ~4x PyTorch's own error (seen 3.6x), and
    # where the few elements of a 1 x 16 case happen to round well for PyTorch, more than any multiple of
    # its error (seen 6.4x): there one bf16 ulp (2^-7 of the largest value) is allowed on top
    trunc = device == "cpu" and torch.bfloat16 in (xdt, adt, ydt)
    factor = 6 if trunc else 3
    for name, o, r, s_, dt in zip(("s", "y", "dx", "da", "dw"), got, ref64, same, (xdt, ydt, xdt, adt, xdt)):
        assert_close_to_ref(o, r, s_, dt, name, factor=factor,
                            atol=max(ATOL[dt], 2.0 ** -7) if trunc else None)


@pytest.mark.parametrize("used", ["y", "s"])
@pytest.mark.parametrize("device", DEVICES)
def test_add_rms_norm_one_output_used(forced, used, device):
    """Only y used (the final norm after the last layer's residual add: no gradient arrives for s, and
    none is made of zeros) or only s: the gradients of x, a and w are PyTorch's add-then-norm's."""
    dev = _dev(device)
    M, N = 37, 100
    x, a, w = torch.randn(M, N) * 2, torch.randn(M, N).bfloat16(), 1 + 0.1 * torch.randn(N)
    g = torch.randn(M, N)

    def run(fn, xx, aa, ww, dev="cpu"):
        xx, aa, ww = (t.detach().to(dev).requires_grad_(True) for t in (xx, aa, ww))
        s_, y_ = fn(xx, aa, ww)
        out = y_ if used == "y" else s_
        out.backward(g.to(dev, out.dtype))
        return [t.detach().cpu() if t is not None else torch.zeros(N) for t in (out, xx.grad, aa.grad, ww.grad)]

    def plain(xx, aa, ww):
        s_ = (xx + aa).to(xx.dtype)
        y_ = rms_torch(s_, ww, 1e-6)
        return s_, (y_ if xx.dtype == torch.float64 else y_.to(torch.bfloat16))

    got = run(lambda *t: Fn.add_rms_norm(*t, 1e-6, torch.bfloat16), x, a, w, dev)
    ref64 = run(plain, x.double(), a.double(), w.double())
    same = run(plain, x, a, w)
    factor = 6 if device == "cpu" else 3
    for name, o, r, s_, dt in zip(("out", "dx", "da", "dw"), got, ref64, same,
                                  (torch.bfloat16 if used == "y" else torch.float32, torch.float32, torch.bfloat16,
                                   torch.float32)):
        if used == "s" and name == "dw":
            assert (o == 0).all()  # w does not reach s
            continue
        assert o.dtype == s_.dtype, name
        assert_close_to_ref(o, r, s_, dt, name, factor=factor)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N", [(1, 16), (37, 100)])
@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_out_dtype(forced, out_dtype, M, N, device):
    """out_dtype (the norm before an autocast GEMM): float32 x and w, y written in out_dtype, the gradient
    arriving in out_dtype; y as PyTorch's float32 norm cast to out_dtype, dx and dw float32."""
    x = torch.randn(M, N) * 2
    w = 1 + 0.1 * torch.randn(N)
    g = torch.randn(M, N)
    got = grads(lambda a, b: Fn.rms_norm(a, b, 1e-6, out_dtype), [x, w], g, _dev(device))
    ref64 = grads(lambda a, b: rms_torch(a, b, 1e-6), [x.double(), w.double()], g.to(out_dtype))
    same = grads(lambda a, b: rms_torch(a, b, 1e-6).to(out_dtype), [x, w], g)
    assert got[0].dtype == out_dtype and got[1].dtype == got[2].dtype == torch.float32
    for name, o, r, s, dt in zip(("y", "dx", "dw"), got, ref64, same, (out_dtype, torch.float32, torch.float32)):
        assert_close_to_ref(o, r, s, dt, name, factor=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,H,D", [(1, 1, 2), (13, 7, 12), (40, 20, 64)])
@pytest.mark.parametrize("device", DEVICES)
def test_rope(forced, dtype, T, H, D, device):
    x = torch.randn(T, H + 1, D)[:, :H]  # strided over heads
    ang = torch.rand(T, 1, D // 2) * 100
    cos, sin = ang.cos(), ang.sin()
    g = torch.randn(T, H, D)
    dev = _dev(device)
    got = grads(lambda a: Fn.apply_rope(a, cos.to(dev), sin.to(dev)), [x.to(dtype)], g, dev)
    ref64 = grads(_plain(lambda a: Fn.apply_rope(a, cos.double(), sin.double())), [x.double()], g)
    same = grads(_plain(lambda a: Fn.apply_rope(a, cos, sin)), [x.to(dtype)], g)
    for name, o, r, s in zip(("y", "dx"), got, ref64, same):
        assert_close_to_ref(o, r, s, dtype, name, factor=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,D", [(1, 1, 2), (13, 7, 12), (40, 20, 64)])
@pytest.mark.parametrize("device", DEVICES)
def test_rope_in_place(forced, dtype, T, H, D, device):
    """rope_ (QKVFunction's RoPE on the q and k columns of its GEMM output, in place, strided): the same
    values as the out-of-place kernel; the columns around it untouched; sign -1 undoes it."""
    dev = _dev(device)
    buf = torch.randn(T, (H + 2) * D).to(dtype).to(dev)
    ang = torch.rand(T, 1, D // 2) * 100
    cos, sin = ang.cos().to(dev), ang.sin().to(dev)
    x = buf[:, D:(H + 1) * D].view(T, H, D)  # strided over tokens
    before = buf.clone()
    want = Fn._rope(x.clone(), cos, sin)
    Fn.rope_(x, cos, sin)
    assert torch.equal(x, want)
    assert torch.equal(buf[:, :D], before[:, :D]) and torch.equal(buf[:, (H + 1) * D:], before[:, (H + 1) * D:])
    Fn.rope_(x, cos, sin, -1.0)
    assert_close_to_ref(x.cpu(), before[:, D:(H + 1) * D].view(T, H, D).double().cpu(),
                        _plain(lambda a: Fn._rope(Fn._rope(a, cos.cpu(), sin.cpu()), cos.cpu(), sin.cpu(), -1.0))(
                            before[:, D:(H + 1) * D].view(T, H, D).cpu()), dtype, "round trip", factor=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,H,I", [(1, 8, 8), (33, 24, 100), (7, 16, 1037)])
@pytest.mark.parametrize("device", DEVICES)
def test_swiglu(forced, dtype, N, H, I, device):
    x = torch.randn(N, H)
    ws = [torch.randn(I, H) / H ** 0.5, torch.randn(I, H) / H ** 0.5, torch.randn(H, I) / I ** 0.5]
    g = torch.randn(N, H)

    def plain(a, wg, wu, wd):
        return F.linear(F.silu(F.linear(a, wg)) * F.linear(a, wu), wd)

    got = grads(Fn.SwiGLUFunction.apply, [x.to(dtype)] + [w.to(dtype) for w in ws], g, _dev(device))
    ref64 = grads(plain, [x.double()] + [w.double() for w in ws], g)
    same = grads(plain, [x.to(dtype)] + [w.to(dtype) for w in ws], g)
    for name, o, r, s in zip(("y", "dx", "dw_gate", "dw_up", "dw_down"), got, ref64, same):
        assert_close_to_ref(o, r, s, dtype, name, factor=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N", [(1, 1), (9, 37), (5, 300)])
@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_kernels_read_packed_halves(forced, dtype, M, N, device):
    """silu_mul and swiglu_bwd on g and u as the two halves of one (M, 2N) GEMM output (row stride 2N,
    read in place), dh contiguous: h = silu(g) u and [dg | du] against float64, and bitwise the same as
    on contiguous copies of g and u."""
    dev = _dev(device)
    gu = (torch.randn(M, 2 * N) * 3).to(dtype).to(dev)
    dh = torch.randn(M, N).to(dtype).to(dev)
    g, u = gu[:, :N], gu[:, N:]
    k = Fn.kernels_for(gu)
    h, dgu = k.swiglu_bwd(dh, g, u)
    assert h.shape == (M, N) and dgu.shape == (M, 2 * N) and h.dtype == dgu.dtype == dtype
    g64, u64, dh64 = g.double().cpu(), u.double().cpu(), dh.double().cpu()
    s64 = torch.sigmoid(g64)
    want = (F.silu(g64) * u64, torch.cat((dh64 * u64 * s64 * (1 + g64 * (1 - s64)), dh64 * F.silu(g64)), 1))
    same = (F.silu(g.cpu()) * u.cpu(), torch.cat((torch.ops.aten.silu_backward(dh.cpu() * u.cpu(), g.cpu()),
                                                  dh.cpu() * F.silu(g.cpu())), 1))
    for name, o, r, s_ in zip(("h", "dgu"), (h.cpu(), dgu.cpu()), want, same):
        assert_close_to_ref(o, r, s_, dtype, name, factor=3)
    h2, dgu2 = k.swiglu_bwd(dh, g.contiguous(), u.contiguous())
    assert torch.equal(h, h2) and torch.equal(dgu, dgu2)
    hf = k.silu_mul(g, u)
    assert torch.equal(hf, k.silu_mul(g.contiguous(), u.contiguous())) and torch.equal(hf, h)


BACKENDS = [pytest.param("triton", marks=[_no_triton, pytest.mark.skipif(
                os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1")]),
            pytest.param("cpp", marks=pytest.mark.skipif(not Fn._cpp_ok(), reason="reasonrl._C is not built"))]


def _packed(layout):
    """ids, positions and AttnContext for a packed batch: "varlen" (6 ragged sequences: the padded
    SDPA plan) or "shared" (2 prompts with 3 and 2 completions each: shared-prefix attention)."""
    if layout == "varlen":
        lengths, prefix_of, start = [20, 30, 17, 25, 22, 28], None, [0] * 6
    else:
        lengths, prefix_of = [9, 6, 7, 5, 8, 4, 6], [-1, -1, 0, 0, 0, 1, 1]
        start = [0, 0, 9, 9, 9, 6, 6]
    pos = torch.cat([torch.arange(s0, s0 + n) for s0, n in zip(start, lengths)])
    ctx = AttnContext.from_lengths(lengths, prefix_of=prefix_of) if prefix_of else AttnContext.from_lengths(lengths)
    return pos, ctx


@pytest.mark.parametrize("arch", ["tiny", "qwen3"])
@pytest.mark.parametrize("layout", ["varlen", "shared"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_loss_and_grads_with_fused_kernels(arch, layout, backend):
    """A training forward and backward through the model (RMSNorm, q/k norms, RoPE, SwiGLU, the row
    gathers of packed attention) with the kernels on, against the same model with PyTorch's ops:
    float32, equal up to float32 rounding."""
    from reasonrl.models import ModelConfig

    cfg = builtin_path("tiny") if arch == "tiny" else ModelConfig(
        arch="qwen3", vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, qk_norm=True)
    model = init_model(cfg, seed=0)
    pos, ctx = _packed(layout)
    ids = torch.randint(0, model.config.vocab_size, pos.shape)
    outs = []
    for on in (False, True):
        Fn.FUSED.update(force=on and backend == "triton", cpu=on and backend == "cpp")
        try:
            model.zero_grad()
            h = model(ids, pos, ctx)
            (h.double().sin().sum()).backward()
        finally:
            Fn.FUSED.update(force=False, cpu=True)
        outs.append((h.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (h0, g0), (h1, g1) = outs
    assert (h1 - h0).abs().max() <= 1e-5 * h0.abs().max()
    for n in g0:
        assert (g1[n] - g0[n]).abs().max() <= 1e-4 * g0[n].abs().max() + 1e-6, n


@pytest.mark.skipif(not Fn._cpp_ok(), reason="reasonrl._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["repeats", "unused rows", "permutation", "empty"])
def test_take_rows_backward(dtype, case):
    """take_rows (x[idx] with scatter_rows as the backward) against x[idx] in float64: rows gathered
    several times, rows never gathered (zero gradient), a permutation, an empty index; (n, H, D)."""
    from reasonrl.models.attention import Rows, take_rows

    n = 37
    idx = {"repeats": torch.randint(0, n, (300,)), "unused rows": torch.arange(0, n, 3).repeat(2),
           "permutation": torch.randperm(n), "empty": torch.zeros(0, dtype=torch.long)}[case]
    x = torch.randn(n, 3, 5)
    g = torch.randn(idx.numel(), 3, 5)
    rows = Rows(idx, n)
    got = grads(lambda a: take_rows(a, rows), [x.to(dtype)], g)
    ref64 = grads(lambda a: a[idx], [x.double()], g)
    same = grads(lambda a: a[idx], [x.to(dtype)], g)
    for name, o, r, s_ in zip(("y", "dx"), got, ref64, same):
        assert_close_to_ref(o, r, s_, dtype, name)
    assert torch.equal(got[1], grads(lambda a: take_rows(a, rows), [x.to(dtype)], g)[1])  # deterministic
    with pytest.raises(ValueError, match="made for 37 rows"):
        take_rows(torch.randn(n + 1, 3, 5, requires_grad=True), rows)


@pytest.mark.skipif(not Fn._cpp_ok(), reason="reasonrl._C is not built")
def test_cpp_fused_ops_reject_bad_input():
    ops = torch.ops.reasonrl
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="x must be float32, bfloat16 or float16"):
        ops.fused_rms_norm_fwd(x.double(), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match=r"w must be \(8,\)"):
        ops.fused_rms_norm_fwd(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="u must have g's shape"):
        ops.fused_silu_mul(x, torch.randn(4, 9))
    with pytest.raises(ValueError, match="share one dtype"):
        ops.fused_swiglu_bwd(x, x, x.bfloat16())
    with pytest.raises(ValueError, match=r"g must be \(M, N\)"):
        ops.fused_swiglu_bwd(x[None], x[None], x[None])
    with pytest.raises(ValueError, match="D even"):
        ops.fused_rope(torch.randn(2, 3, 5), torch.randn(2, 2), torch.randn(2, 2), 1.0)
    with pytest.raises(ValueError, match="offsets must run from 0 to 3"):
        ops.scatter_rows(torch.randn(3, 2), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), 2)
    with pytest.raises(ValueError, match=r"order values must be in \[0, 3\)"):
        ops.scatter_rows(torch.randn(3, 2), torch.tensor([0, 1, 3]), torch.tensor([0, 1, 5]), 2)
    # rows = -1 with empty offsets passed the shape check and read offsets[0]: a segfault (2026-11-30)
    with pytest.raises(ValueError, match="rows must be >= 0, got -1"):
        ops.scatter_rows(torch.randn(3, 2), torch.empty(0, dtype=torch.long), torch.tensor([0, 1, 2]), -1)
    # an expanded x (every head one memory) was rotated once per head (2026-11-30); PyTorch's in-place ops refuse it
    c, s = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="share memory"):
        ops.fused_rope_(torch.randn(3, 1, 8).expand(3, 4, 8), c, s, 1.0)


@pytest.mark.skipif(not Fn._cpp_ok(), reason="reasonrl._C is not built")
def test_rms_norm_backward_is_the_same_with_any_thread_count():
    """dw's partial sums were one per thread, so dw moved by 5e-5 between 1 and 2 threads (2026-11-30); the
    split is fixed now, and dw bitwise the same."""
    ops = torch.ops.reasonrl
    x, g, w = torch.randn(1000, 64), torch.randn(1000, 64), torch.randn(64)
    _, r = ops.fused_rms_norm_fwd(x, w, 1e-6)
    n = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(ops.fused_rms_norm_bwd(g, x, w, r))
    finally:
        torch.set_num_threads(n)
    for dx, dw in outs[1:]:
        assert torch.equal(dx, outs[0][0]) and torch.equal(dw, outs[0][1])


@pytest.mark.skipif(not Fn._cpp_ok(), reason="reasonrl._C is not built")
def test_cpp_fused_ops_pass_opcheck():
    """Schemas, fake-tensor shapes (functional._register_fakes) and dispatch of csrc/fused.cpp's ops."""
    ops = torch.ops.reasonrl
    x, g = torch.randn(5, 12), torch.randn(5, 12)
    w = torch.randn(12)
    y, r = ops.fused_rms_norm_fwd(x, w, 1e-6)
    for dt in (torch.float32, torch.bfloat16):
        torch.library.opcheck(ops.fused_rms_norm_fwd.default, (x.to(dt), w, 1e-6))
        torch.library.opcheck(ops.fused_silu_mul.default, (x.to(dt), g.to(dt)))
        torch.library.opcheck(ops.fused_swiglu_bwd.default, (x.to(dt), g.to(dt), x.to(dt)))
        gu = torch.randn(5, 24).to(dt)  # the halves of a packed gate/up output, read at their row stride
        torch.library.opcheck(ops.fused_silu_mul.default, (gu[:, :12], gu[:, 12:]))
        torch.library.opcheck(ops.fused_swiglu_bwd.default, (x.to(dt), gu[:, :12], gu[:, 12:]))
        torch.library.opcheck(ops.fused_rope.default, (torch.randn(3, 2, 8).to(dt), torch.randn(3, 1, 4),
                                                       torch.randn(3, 1, 4), -1.0))
        torch.library.opcheck(ops.fused_rope_.default, (torch.randn(3, 4, 8).to(dt)[:, 1:3], torch.randn(3, 1, 4),
                                                        torch.randn(3, 1, 4), 1.0))
    torch.library.opcheck(ops.fused_rms_norm_bwd.default, (g, x, w, r))
    torch.library.opcheck(ops.scatter_rows.default, (torch.randn(4, 3), torch.tensor([0, 2, 2, 4]),
                                                     torch.tensor([1, 3, 0, 2]), 3))
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 7, 2, 16)
    off, klen = torch.tensor([0, 2]), torch.tensor([7, 4])
    o, lse = ops.fused_attn_fwd(q, k, k, off, klen, 0.25)
    torch.library.opcheck(ops.fused_attn_fwd.default, (q, k, k, off, klen, 0.25))
    torch.library.opcheck(ops.fused_attn_bwd.default, (torch.randn_like(o), q, k, k, o, lse, off, klen, 0.25))


def _attn_ref(q, k, v, off, klen, scale):
    """padded_attention's definition in float64 ops: query i of batch b sees keys j < klen[b], j <= i + off[b]."""
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    kh, vh = (t.transpose(1, 2).repeat_interleave(Hq // Hkv, 1) for t in (k, v))
    s = q.transpose(1, 2) @ kh.transpose(-1, -2) * scale
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    seen = (j[None] <= i[None] + off[:, None, None]) & (j[None] < klen[:, None, None])
    return (s.masked_fill(~seen[:, None], float("-inf")).softmax(-1) @ vh).transpose(1, 2)


@pytest.mark.parametrize("device", [pytest.param("cpp", marks=_no_cpp)] + [f"cpp:{isa}" for isa in LOWER_ISAS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Lq,Lk,Hq,Hkv,D", [(2, 1, 1, 1, 1, 16), (5, 7, 12, 6, 2, 32), (3, 13, 40, 4, 4, 64),
                                             (2, 9, 17, 2, 1, 128), (4, 21, 21, 3, 3, 16)])
def test_padded_attention(forced, device, dtype, B, Lq, Lk, Hq, Hkv, D):
    """The C++ attention of CPU training (models.attention.padded_attention) against float64, values and
    q/k/v gradients, for each instruction set's build: grouped-query heads, shared-prefix offsets, key
    counts short of Lk (padding), Lq not a multiple of the 4-row block, Lk not a multiple of 16, a single
    query and key."""
    from reasonrl.models.attention import _fused_attn_ok, padded_attention

    q, k, v = torch.randn(B, Lq, Hq, D), torch.randn(B, Lk, Hkv, D), torch.randn(B, Lk, Hkv, D)
    off = torch.randint(0, max(1, Lk - Lq + 1), (B,))
    klen = torch.clamp(torch.randint(1, Lk + 1, (B,)), min=1)
    klen[0] = Lk
    g = torch.randn(B, Lq, Hq, D)
    scale = D ** -0.5
    assert _fused_attn_ok(q.requires_grad_(), k)  # (one thread: one work item per thread is enough)
    got = grads(lambda a, b, c: padded_attention(a, b, c, scale, off, klen), [q.to(dtype), k.to(dtype), v.to(dtype)], g)
    ref64 = grads(lambda a, b, c: _attn_ref(a, b, c, off, klen, scale), [q.double(), k.double(), v.double()], g)
    same = grads(lambda a, b, c: _attn_ref(a.float(), b.float(), c.float(), off, klen, scale).to(dtype),
                 [q.to(dtype), k.to(dtype), v.to(dtype)], g)
    for name, o, r, s_ in zip(("o", "dq", "dk", "dv"), got, ref64, same):
        assert_close_to_ref(o, r, s_, dtype, name, factor=3)
    # the causal default (off 0, all keys) is SDPA's is_causal
    if Lq == Lk:
        o = padded_attention(q.to(dtype), k.to(dtype), v.to(dtype), scale)
        Fn.FUSED["cpu"] = False
        try:
            o_sdpa = padded_attention(q.to(dtype), k.to(dtype), v.to(dtype), scale)
        finally:
            Fn.FUSED["cpu"] = True
        tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
        assert (o.float() - o_sdpa.float()).abs().max().item() <= tol * max(1.0, o_sdpa.abs().max().item())


@pytest.mark.skipif(not Fn._cpp_ok(), reason="reasonrl._C is not built")
def test_fused_attention_work_split_gate():
    """Too few (sequence, kv head) items for the threads: SDPA, which also splits the queries."""
    from reasonrl.models.attention import _fused_attn_ok

    q, k = torch.randn(1, 64, 4, 32, requires_grad=True), torch.randn(1, 64, 2, 32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _fused_attn_ok(q, k)
        torch.set_num_threads(2)
        assert not _fused_attn_ok(q, k)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        assert not _fused_attn_ok(q, k)  # training calls only


@pytest.mark.skipif(not Fn._cpp_ok(), reason="reasonrl._C is not built")
def test_fused_attention_rejects_bad_input():
    ops = torch.ops.reasonrl
    q, k = torch.randn(2, 3, 4, 32), torch.randn(2, 5, 2, 32)
    off, klen = torch.zeros(2, dtype=torch.long), torch.full((2,), 5)
    with pytest.raises(ValueError, match="head dim must be 16, 32, 64 or 128, got 24"):
        ops.fused_attn_fwd(torch.randn(2, 3, 4, 24), torch.randn(2, 5, 2, 24), torch.randn(2, 5, 2, 24), off, klen, 1.0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ops.fused_attn_fwd(torch.randn(2, 3, 3, 32), k, k, off, klen, 1.0)
    with pytest.raises(ValueError, match=r"klen\[1\] must be in \[1, Lk=5\], got 6"):
        ops.fused_attn_fwd(q, k, k, off, torch.tensor([5, 6]), 1.0)
    with pytest.raises(ValueError, match=r"off\[0\] must be in \[0, 2\^40\], got 9223372036854775807"):
        ops.fused_attn_fwd(q, k, k, torch.tensor([2**63 - 1, 0]), klen, 1.0)  # i + off + 1 overflowed: a segfault
    with pytest.raises(ValueError, match=r"off\[0\] must be in \[0, 2\^40\]"):
        ops.fused_attn_fwd(q, k, k, torch.tensor([-1, 0]), klen, 1.0)
    with pytest.raises(ValueError, match="share one dtype"):
        ops.fused_attn_fwd(q, k.bfloat16(), k, off, klen, 1.0)
