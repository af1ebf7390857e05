"""Triton MoE expert compute (kernels/moe.py) against the float64 per-expert loop.

Runs under TRITON_INTERPRET=1 on CPU (conftest sets it), so shapes stay small; the K-loop, the
column tiles, masked edges (odd H and I) and padded row blocks are all crossed at these shapes
(CPU blocks: BLOCK_M 16, BLOCK_N/K 32).
"""
import json

import pytest
import torch
from sm90 import available, compile_sm90, report_of

import reasonrl.kernels.moe as km
from reasonrl.kernels.moe import triton_moe_experts
from reasonrl.ops.moe import moe_experts, moe_experts_reference
from tests.tolerance import assert_close_to_ref


@pytest.fixture(autouse=True)
def _poison_buffers(monkeypatch):
    """Every buffer the kernels fill starts as NaN: unwritten or early-read elements cannot hide."""
    monkeypatch.setattr(km, "POISON", True)


def _routing(kind, T, E, K):
    if kind == "balanced":  # K distinct experts per token, as a router picks them
        return torch.rand(T, E).topk(K, dim=1).indices
    if kind == "one_expert":  # every token's first choice is expert E-1; the others stay empty (K=1)
        return torch.full((T, K), E - 1, dtype=torch.int64)
    if kind == "two_experts":  # experts 0 and E-1 take everything, the middle ones are empty
        return torch.tensor([[E - 1, 0]] * T, dtype=torch.int64)
    raise ValueError(kind)


def _inputs(T, H, I, E, K, kind, dtype):
    x = torch.randn(T, H).to(dtype)
    ids = _routing(kind, T, E, K)
    tw = torch.softmax(torch.randn(T, K), dim=1)  # float32, as moe_router returns
    w1 = (torch.randn(E, 2 * I, H) / H ** 0.5).to(dtype)
    wd = (torch.randn(E, H, I) / I ** 0.5).to(dtype)
    return x, ids, tw, w1, wd


def _run(fn, x, ids, tw, w1, wd, g, dtype=None):
    leaves = [t.detach().clone() if dtype is None else t.detach().to(dtype) for t in (x, tw, w1, wd)]
    if dtype is not None:
        leaves[1] = tw.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)
    for t in leaves:
        t.requires_grad_(True)
    out = fn(leaves[0], ids, leaves[1], leaves[2], leaves[3])
    grads = torch.autograd.grad(out, leaves, g.to(out.dtype))
    return out, grads


CASES = [
    # (T, H, I, E, K, routing)
    (21, 70, 40, 5, 2, "balanced"),  # H: 3 K-steps, the last one masked; I: 2 column tiles
    (20, 7, 5, 3, 1, "one_expert"),  # all tokens to one expert, two empty experts, odd H and I
    (18, 24, 16, 4, 2, "two_experts"),  # badly imbalanced: experts 1, 2 empty
    (9, 16, 8, 1, 1, "balanced"),  # E = 1
    (11, 24, 8, 3, 3, "balanced"),  # top_k = E
    (1, 33, 17, 4, 2, "balanced"),  # T = 1
]


# The interpreter costs about 1-4 s a case: every case in float32; the wide, the odd and the T = 1
# cases in bfloat16 too, the odd one in float16.
PARAMS = ([(c, torch.float32) for c in CASES] + [(CASES[i], torch.bfloat16) for i in (0, 1, 5)]
          + [(CASES[1], torch.float16)])


@pytest.mark.parametrize("case,dtype", PARAMS,
                         ids=[f"T{c[0]}-H{c[1]}-I{c[2]}-E{c[3]}-K{c[4]}-{c[5]}-{str(d)[6:]}" for c, d in PARAMS])
def test_moe_experts_triton_matches_loop(case, dtype):
    T, H, I, E, K, kind = case
    x, ids, tw, w1, wd = _inputs(T, H, I, E, K, kind, dtype)
    g = torch.randn(T, H)
    out, grads = _run(triton_moe_experts, x, ids, tw, w1, wd, g)
    ref64, grads64 = _run(moe_experts_reference, x, ids, tw, w1, wd, g, torch.float64)
    ref, grads_ref = _run(moe_experts_reference, x, ids, tw, w1, wd, g, dtype)
    assert out.dtype == dtype
    assert_close_to_ref(out, ref64, ref, dtype, "out")
    for name, a, b, c in zip(("dx", "d topk_weights", "d w_gate_up", "d w_down"), grads, grads64, grads_ref):
        assert a.dtype == c.dtype, f"{name}: dtype {a.dtype} != {c.dtype}"
        assert_close_to_ref(a, b, c, dtype, name)


@pytest.mark.parametrize("keep_h", [True, False])
def test_keep_or_recompute_preactivation(keep_h):
    """Both backward paths: the stored [g | u] and its recomputation beside the go Wd GEMM."""
    T, H, I, E, K = 21, 20, 12, 3, 2  # 2I > H: the default recomputes; keep_h=True forces storing
    x, ids, tw, w1, wd = _inputs(T, H, I, E, K, "balanced", torch.float32)
    g = torch.randn(T, H)
    out, grads = _run(lambda *a: triton_moe_experts(*a, keep_h=keep_h), x, ids, tw, w1, wd, g)
    ref64, grads64 = _run(moe_experts_reference, x, ids, tw, w1, wd, g, torch.float64)
    ref, grads_ref = _run(moe_experts_reference, x, ids, tw, w1, wd, g, torch.float32)
    assert_close_to_ref(out, ref64, ref, torch.float32, "out")
    for name, a, b, c in zip(("dx", "dtw", "dw1", "dwd"), grads, grads64, grads_ref):
        assert_close_to_ref(a, b, c, torch.float32, name)


@pytest.mark.parametrize("block_m,block_r", [(32, 16), (16, 64)])
def test_other_tiles(monkeypatch, block_m, block_r):
    """Padding to another BLOCK_M, and a weight-gradient row tile that does not divide it (GPU
    decode shapes pad to 16 rows while the weight-gradient kernel steps 64 rows)."""
    monkeypatch.setattr(km, "_block_m", lambda device, rows_per_expert, dtype: block_m)
    monkeypatch.setitem(km._CONFIGS_CPU, "wgrad", dict(BLOCK_1=16, BLOCK_2=32, BLOCK_R=block_r))
    T, H, I, E, K = 29, 36, 20, 4, 2
    x, ids, tw, w1, wd = _inputs(T, H, I, E, K, "balanced", torch.float32)
    g = torch.randn(T, H)
    out, grads = _run(triton_moe_experts, x, ids, tw, w1, wd, g)
    ref64, grads64 = _run(moe_experts_reference, x, ids, tw, w1, wd, g, torch.float64)
    ref, grads_ref = _run(moe_experts_reference, x, ids, tw, w1, wd, g, torch.float32)
    assert_close_to_ref(out, ref64, ref, torch.float32, "out")
    for name, a, b, c in zip(("dx", "dtw", "dw1", "dwd"), grads, grads64, grads_ref):
        assert_close_to_ref(a, b, c, torch.float32, name)


GROUPED_CASES = [
    # 2I <= H in each case on the path, so that [g | u] is kept and the dact GEMM can go too
    ((21, 96, 40, 5, 2, "balanced"), torch.bfloat16, True),  # padded segments, two column tiles
    ((18, 32, 16, 4, 2, "two_experts"), torch.bfloat16, True),  # experts 1, 2 empty
    (CASES[4], torch.float32, True),  # top_k = E
    (CASES[1], torch.float32, False),  # odd H and I: rows not 16-byte multiples, this file's kernels
]


@pytest.mark.parametrize("variant", ["wgrad", "dact", "dx", "wgrad+dact+dx"])
@pytest.mark.parametrize("case,dtype,path", GROUPED_CASES,
                         ids=["balanced-bf16", "two_experts-empty-bf16", "topk_E-f32", "odd-widths-f32"])
def test_backward_gemms_through_grouped_mm(monkeypatch, variant, case, dtype, path):
    """The backward's GEMMs through torch._grouped_mm (kernels/moe.py WGRAD_GROUPED_MM: both weight
    gradients; DACT_GROUPED_MM: c = go[tok] Wd[e], then the elementwise SwiGLU backward; DX_GROUPED_MM:
    dx's rows in padded order, combined through each assignment's padded row): the padded
    layout's zero rows, empty experts (zero gradients), against the float64 loop, the forward
    unchanged; widths it cannot take fall back to the Triton kernels. The buffers start as NaN
    (POISON): a padding row left unwritten would make an expert's weight gradient NaN."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    T, H, I, E, K, kind = case
    x, ids, tw, w1, wd = _inputs(T, H, I, E, K, kind, dtype)
    g = torch.randn(T, H)
    out0, grads0 = _run(triton_moe_experts, x, ids, tw, w1, wd, g)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(a[1].dim()) or real(*a, **k))
    if "wgrad" in variant:
        monkeypatch.setattr(km, "WGRAD_GROUPED_MM", {"cpu"})
    if "dact" in variant:
        monkeypatch.setattr(km, "DACT_GROUPED_MM", {"cpu"})
    if "dx" in variant:
        monkeypatch.setattr(km, "DX_GROUPED_MM", {"cpu"})
    out, grads = _run(triton_moe_experts, x, ids, tw, w1, wd, g)
    n3 = ("dact" in variant) + ("dx" in variant)  # 2d x 3d: c and the dx rows; 2d x 2d: the two dW
    assert len(calls) == ((2 if "wgrad" in variant else 0) + n3 if path else 0)
    assert calls.count(3) == (n3 if path else 0)
    ref64, grads64 = _run(moe_experts_reference, x, ids, tw, w1, wd, g, torch.float64)
    ref, grads_ref = _run(moe_experts_reference, x, ids, tw, w1, wd, g, dtype)
    assert torch.equal(out, out0)
    for name, a, b, c in zip(("dx", "d topk_weights", "d w_gate_up", "d w_down"), grads, grads64, grads_ref):
        assert a.dtype == c.dtype and a.shape == c.shape, name
        assert_close_to_ref(a, b, c, dtype, name)
    empty = torch.bincount(ids.flatten(), minlength=E) == 0
    assert torch.all(grads[2][empty] == 0) and torch.all(grads[3][empty] == 0)


def test_dact_through_grouped_mm_needs_the_kept_preactivation(monkeypatch):
    """With [g | u] recomputed in backward (2I > H) the fused SwiGLU-backward kernel stays: c is
    never made through torch._grouped_mm there."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    monkeypatch.setattr(km, "DACT_GROUPED_MM", {"cpu"})
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    T, H, I, E, K = 21, 16, 24, 3, 2
    x, ids, tw, w1, wd = _inputs(T, H, I, E, K, "balanced", torch.float32)
    g = torch.randn(T, H)
    out, grads = _run(triton_moe_experts, x, ids, tw, w1, wd, g)
    assert calls == []
    ref64, grads64 = _run(moe_experts_reference, x, ids, tw, w1, wd, g, torch.float64)
    ref, grads_ref = _run(moe_experts_reference, x, ids, tw, w1, wd, g, torch.float32)
    for name, a, b, c in zip(("dx", "dtw", "dw1", "dwd"), grads, grads64, grads_ref):
        assert_close_to_ref(a, b, c, torch.float32, name)


def test_strided_inputs_deterministic_and_public_op():
    """Non-contiguous x / grad_out / weights; two runs agree bitwise (no atomics); the public op's
    backend='triton' reaches this kernel."""
    T, H, I, E, K = 16, 24, 16, 4, 2
    x, ids, tw, w1, wd = _inputs(T, 2 * H, I, E, K, "balanced", torch.float32)
    x = x[:, ::2]  # (T, H), stride 2
    w1 = torch.randn(E, H, 2 * I).transpose(1, 2) / H ** 0.5  # (E, 2I, H), transposed strides
    wd = torch.randn(E, I, H).transpose(1, 2) / I ** 0.5  # (E, H, I)
    g = torch.randn(H, T).T  # (T, H), non-contiguous upstream gradient
    runs = [_run(triton_moe_experts, x, ids, tw, w1, wd, g) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)
    ref64, grads64 = _run(moe_experts_reference, x, ids, tw, w1, wd, g, torch.float64)
    ref, grads_ref = _run(moe_experts_reference, x, ids, tw, w1, wd, g, torch.float32)
    assert_close_to_ref(runs[0][0], ref64, ref, torch.float32, "out")
    for name, a, b, c in zip(("dx", "dtw", "dw1", "dwd"), runs[0][1], grads64, grads_ref):
        assert_close_to_ref(a, b, c, torch.float32, name)
    pub = moe_experts(x, ids, tw, w1, wd, backend="triton")
    assert torch.equal(pub, runs[0][0])


@pytest.mark.parametrize("H,I", [(32, 8), (16, 24)])
def test_saved_for_backward(H, I):
    """What the op keeps between forward and backward: the inputs, int32 dispatch metadata, and
    the (P, 2I) pre-activation only when 2I <= H; never a (T*K, H) buffer."""
    T, E, K = 12, 3, 2
    x, ids, tw, w1, wd = _inputs(T, H, I, E, K, "balanced", torch.float32)
    for t in (x, tw, w1, wd):
        t.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        triton_moe_experts(x, ids, tw, w1, wd)
    inputs = {id(t) for t in (x, tw, w1, wd)}
    extra = [t for t in saved if id(t) not in inputs and t.is_floating_point()]
    if 2 * I <= H:
        assert [tuple(t.shape[1:]) for t in extra] == [(2 * I,)]  # h (P, 2I)
    else:
        assert extra == []
    assert all(t.dtype == torch.int32 for t in saved if not t.is_floating_point())
    saved.clear()
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = triton_moe_experts(x, ids, tw, w1, wd)  # inference (rollouts): nothing kept
    assert saved == [] and out.grad_fn is None
    assert_close_to_ref(out, moe_experts_reference(x.double(), ids, tw.double(), w1.double(), wd.double()),
                        moe_experts_reference(x, ids, tw, w1, wd), torch.float32, "out (no grad)")


def test_partial_gradients():
    """Only some inputs need a gradient (frozen experts, fixed routing): the others are skipped."""
    T, H, I, E, K = 10, 20, 12, 3, 2
    x, ids, tw, w1, wd = _inputs(T, H, I, E, K, "balanced", torch.float32)
    x.requires_grad_(True)
    wd.requires_grad_(True)
    g = torch.randn(T, H)
    dx, dwd = torch.autograd.grad(triton_moe_experts(x, ids, tw, w1, wd), [x, wd], g)
    xr, wdr = x.detach().double().requires_grad_(), wd.detach().double().requires_grad_()
    rx, rwd = torch.autograd.grad(moe_experts_reference(xr, ids, tw.double(), w1.double(), wdr), [xr, wdr], g.double())
    xs, wds = x.detach().clone().requires_grad_(), wd.detach().clone().requires_grad_()
    sx, swd = torch.autograd.grad(moe_experts_reference(xs, ids, tw, w1, wds), [xs, wds], g)
    assert_close_to_ref(dx, rx, sx, torch.float32, "dx")
    assert_close_to_ref(dwd, rwd, swd, torch.float32, "d w_down")


def test_bad_inputs_raise():
    x, ids, tw, w1, wd = _inputs(4, 8, 4, 2, 1, "balanced", torch.float32)
    with pytest.raises(ValueError, match="w_down"):
        triton_moe_experts(x, ids, tw, w1, wd[:, :, :3])
    with pytest.raises(ValueError, match="w_gate_up"):
        triton_moe_experts(x, ids, tw, w1.double(), wd)
    with pytest.raises(ValueError, match="topk_weights"):
        triton_moe_experts(x, ids, tw[:, :0], w1, wd)
    with pytest.raises(ValueError, match="topk_ids"):
        triton_moe_experts(x, ids.float(), tw, w1, wd)
    with pytest.raises(ValueError, match="topk_ids"):
        triton_moe_experts(x, ids + 2, tw, w1, wd)  # expert id out of range
    with pytest.raises(ValueError, match="x must be"):
        triton_moe_experts(x.double(), ids, tw, w1.double(), wd.double())


def test_no_tokens():
    x, ids, tw, w1, wd = _inputs(0, 8, 4, 2, 1, "balanced", torch.float32)
    x.requires_grad_(True)
    w1.requires_grad_(True)
    out = triton_moe_experts(x, ids, tw, w1, wd)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.equal(w1.grad, torch.zeros_like(w1))


GPU_CASES = [(2048, 512, 256, 16, 4, "balanced"),  # BLOCK_M 128, wgmma
             (5, 512, 256, 16, 4, "balanced"),  # decode: BLOCK_M 16, 4 warps
             (1024, 384, 192, 8, 2, "two_experts")]  # long weight-gradient segments, empty experts


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"T{c[0]}-{c[5]}" for c in GPU_CASES])
def test_moe_experts_triton_gpu(case, dtype):
    """Compiled kernels with the GPU configs."""
    T, H, I, E, K, kind = case
    x, ids, tw, w1, wd = (t.cuda() for t in _inputs(T, H, I, E, K, kind, dtype))
    g = torch.randn(T, H, device="cuda")
    out, grads = _run(triton_moe_experts, x, ids, tw, w1, wd, g)
    ref64, grads64 = _run(moe_experts_reference, x, ids, tw, w1, wd, g, torch.float64)
    ref, grads_ref = _run(moe_experts_reference, x, ids, tw, w1, wd, g, dtype)
    assert_close_to_ref(out, ref64, ref, dtype, "out")
    for name, a, b, c in zip(("dx", "dtw", "dw1", "dwd"), grads, grads64, grads_ref):
        assert_close_to_ref(a, b, c, dtype, name)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"T{c[0]}-{c[5]}" for c in GPU_CASES])
def test_backward_gemms_grouped_mm_gpu(monkeypatch, case):
    """The backward's GEMMs through torch._grouped_mm on the GPU (bf16, Hopper; every switch on):
    against float64, and zero weight gradients for the empty experts of the two_experts case
    (pytorch#172439 saw nonzero ones on Blackwell), on a second backward too (recycled blocks)."""
    for name in ("WGRAD_GROUPED_MM", "DACT_GROUPED_MM", "DX_GROUPED_MM"):
        monkeypatch.setattr(km, name, {"cuda"})
    if not km._grouped_mm_ok({"cuda"}, torch.bfloat16, torch.device("cuda"), 8, 8):
        pytest.skip("torch._grouped_mm backward GEMMs are for bf16 on a Hopper GPU")
    T, H, I, E, K, kind = case
    x, ids, tw, w1, wd = (t.cuda() for t in _inputs(T, H, I, E, K, kind, torch.bfloat16))
    g = torch.randn(T, H, device="cuda")
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(2):
        out, grads = _run(triton_moe_experts, x, ids, tw, w1, wd, g)
    assert len(calls) == 8
    ref64, grads64 = _run(moe_experts_reference, x, ids, tw, w1, wd, g, torch.float64)
    ref, grads_ref = _run(moe_experts_reference, x, ids, tw, w1, wd, g, torch.bfloat16)
    for name, a, b, c in zip(("dx", "dtw", "dw1", "dwd"), grads, grads64, grads_ref):
        assert_close_to_ref(a, b, c, torch.bfloat16, name)
    empty = torch.bincount(ids.flatten(), minlength=E) == 0
    assert torch.all(grads[2][empty] == 0) and torch.all(grads[3][empty] == 0)


def _hopper_build(kernel):
    """Compile one GEMM kernel at the goal shape (T=16384, H=2048, I=768, E=128, top-8, bf16,
    BLOCK_M 128) with the GPU config."""
    T, H, I, K, BM = 16384, 2048, 768, 8, 128  # E = 128 experts: only strides of one expert enter
    num_m = T * K // BM
    G = km._CONFIGS_GPU
    c = dict(G["swiglu_bwd" if kernel == "swiglu_bwd_ew" else kernel])
    opts = dict(num_warps=c.pop("num_warps"), num_stages=c.pop("num_stages"))
    bf = "*bf16"
    rows = dict(BLOCK_M=BM, GROUP_M=G["GROUP_M"], UPCAST=False, PREC="tf32", **c)
    w1s = dict(stride_we=2 * I * H, stride_wn=H, stride_wh=1)
    if kernel == "gate_up":
        return compile_sm90(km._moe_gate_up_fwd_kernel,
                             dict(X=bf, W1=bf, IDX="*i32", BLOCK_EXPERT="*i32", ACT=bf, HPRE=bf),
                             dict(num_m=num_m, H=H, I=I, K=K, stride_xt=H, stride_xh=1, **w1s),
                             dict(STORE_H=True, **rows), opts)
    if kernel == "rows":
        return compile_sm90(km._moe_rows_kernel,
                             dict(A=bf, B=bf, IDX="*i32", BLOCK_EXPERT="*i32", TW="*fp32", OUT=bf),
                             dict(num_m=num_m, N=H, KD=I, K=K, stride_be=H * I, stride_bk=1, stride_bn=I),
                             dict(HAS_SCALE=True, **rows), opts)
    if kernel == "swiglu_bwd":
        return compile_sm90(km._moe_swiglu_bwd_kernel,
                             dict(GO=bf, WD=bf, X=bf, W1=bf, HPRE=bf, IDX="*i32", BLOCK_EXPERT="*i32",
                                  TW="*fp32", DH=bf, ACTW=bf, DWP="*fp32"),
                             dict(num_m=num_m, H=H, I=I, K=K, stride_gt=H, stride_gh=1, stride_de=H * I,
                                  stride_dh=I, stride_di=1, stride_xt=H, stride_xh=1, **w1s),
                             dict(RECOMPUTE=False, **rows), opts)
    if kernel == "swiglu_bwd_ew":  # the elementwise SwiGLU backward after a torch._grouped_mm c
        return compile_sm90(km._moe_swiglu_bwd_ew_kernel,
                             dict(C=bf, HPRE=bf, IDX="*i32", BLOCK_EXPERT="*i32", TW="*fp32", DH=bf, ACTW=bf,
                                  DWP="*fp32"),
                             dict(I=I, K=K), dict(BLOCK_M=BM, BLOCK_N=c["BLOCK_N"]), dict(num_warps=8, num_stages=1))
    return compile_sm90(km._moe_wgrad_kernel, dict(A=bf, B=bf, IDX="*i32", POFF="*i32", OUT=bf),
                         dict(N1=2 * I, N2=H, K=K, stride_ar=2 * I, stride_ac=1, stride_br=H, stride_bc=1,
                              stride_oe=2 * I * H, stride_o1=H, stride_o2=1),
                         dict(A_GATHER=False, B_GATHER=True, UPCAST=False, PREC="tf32", **c), opts)


HOPPER_KERNELS = ("gate_up", "rows", "swiglu_bwd", "wgrad")


@pytest.mark.skipif(not available(), reason="triton without its NVIDIA backend")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gpu tests compile and run the kernels")
def test_kernels_compile_for_hopper():
    """The GEMM kernels build for sm_90a at the goal shape with the GPU configs: wgmma,
    software-pipelined loads, shared memory within an H100/H200 SM. No GPU needed; the
    interpreter sees none of this, so it runs in a subprocess without TRITON_INTERPRET."""
    report = report_of(__file__)
    for kernel in HOPPER_KERNELS:
        rep = report[kernel]
        assert rep["wgmma"], f"{kernel}: tl.dot did not become wgmma"
        assert rep["pipelined"], f"{kernel}: loads are not software-pipelined"
        assert rep["shared"] <= 227 * 1024, f"{kernel}: {rep['shared']} bytes of shared memory"
    ew = report["swiglu_bwd_ew"]  # no GEMM: it compiles, and its registers hold without spilling
    assert ew["spill"] in (None, 0), f"swiglu_bwd_ew: {ew['spill']} bytes of spill ({ew['regs']} registers)"


if __name__ == "__main__":  # the subprocess of test_kernels_compile_for_hopper
    from sm90 import ptxas_usage

    out = {}
    for name in HOPPER_KERNELS + ("swiglu_bwd_ew",):
        k = _hopper_build(name)
        ttgir = k.asm["ttgir"]
        regs, spill = ptxas_usage(k)
        out[name] = dict(wgmma="warp_group_dot" in ttgir, pipelined="async_copy_global_to_local" in ttgir,
                         shared=k.metadata.shared, regs=regs, spill=spill)
    print(json.dumps(out))
