"""MoE ops (reasonrl.ops.moe): every backend against float64 ground truths written independently of
the per-expert loop (a dense all-experts einsum, a brute-force router and dispatch), values and
gradients, balanced and badly imbalanced routing, odd sizes, argument errors."""
import pytest
import torch
import torch.nn.functional as F

from reasonrl.ops import _backend
from reasonrl.ops.moe import (load_balancing_loss, moe_block, moe_dispatch, moe_experts, moe_experts_reference,
                              moe_router)
from cpu_isa import forced_isa, runnable_isas
from tolerance import assert_close_to_ref

CPU = torch.device("cpu")


def _has_cpp(op):
    return _backend.cpp_available() and hasattr(torch.ops.reasonrl, op)


def backends(op):
    """reference and cpp. The extension must be built (as for the log-prob tests): a reasonrl._C without
    the op is a failure, not a skip that would pass a broken build."""
    return ["reference", "cpp"]


def test_the_extension_has_the_moe_ops():
    assert _backend.cpp_available(), "reasonrl._C is not built"
    for op in ("moe_router_fwd", "moe_dispatch_fwd", "moe_experts_fwd"):
        assert _has_cpp(op), f"reasonrl._C has no {op}"


# ---------------------------------------------------------------------------------------------
# inputs and independent float64 ground truths
# ---------------------------------------------------------------------------------------------
def make_ids(T, E, K, routing):
    """(T, K) int64 expert ids, distinct within a token.
    balanced: uniform; skewed: every token in experts [0, K) (the rest empty);
    one: every token's first choice is expert E-1 (it gets all T tokens)."""
    if routing == "balanced":
        return torch.rand(T, E).argsort(1)[:, :K]
    if routing == "skewed":
        return torch.rand(T, K).argsort(1)
    if routing == "one":
        rest = torch.rand(T, E - 1).argsort(1)[:, : K - 1]
        return torch.cat([torch.full((T, 1), E - 1), rest], 1)
    raise ValueError(routing)


def make_experts(T, H, I, E, K, routing, dtype):
    x = torch.randn(T, H).to(dtype)
    w_gate_up = (torch.randn(E, 2 * I, H) / H**0.5).to(dtype)  # (E, 2I, H)
    w_down = (torch.randn(E, H, I) / I**0.5).to(dtype)  # (E, H, I)
    ids = make_ids(T, E, K, routing)
    w = torch.softmax(torch.randn(T, K), -1)  # (T, K) float32, as the router gives
    return x, ids, w, w_gate_up, w_down


def experts_dense64(x, ids, w, w_gate_up, w_down):
    """Every expert on every token, then pick: no dispatch, no loop."""
    x, w, gu, wd = (t.double() for t in (x, w, w_gate_up, w_down))
    I = gu.shape[1] // 2
    h = torch.einsum("th,eih->tei", x, gu)  # (T, E, 2I)
    y = torch.einsum("tei,ehi->teh", F.silu(h[..., :I]) * h[..., I:], wd)  # (T, E, H)
    sel = y.gather(1, ids.long()[..., None].expand(-1, -1, y.shape[2]))  # (T, K, H)
    return (w[..., None] * sel).sum(1)


def grads(fn, inputs, g):
    """Gradients of <fn(*inputs), g> w.r.t. the float inputs (ids excluded)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(g.to(out.dtype))
    return out.detach(), [t.grad for t in leaves if t.is_floating_point()]


# ---------------------------------------------------------------------------------------------
# moe_experts
# ---------------------------------------------------------------------------------------------
EXPERT_CASES = [  # (T, H, I, E, K, routing)
    (37, 16, 8, 6, 2, "balanced"),
    (37, 16, 8, 6, 2, "skewed"),  # experts 2..5 empty
    (29, 7, 5, 5, 3, "one"),  # odd sizes, one expert takes every token
    (11, 8, 4, 1, 1, "balanced"),  # E = 1
    (13, 8, 6, 4, 4, "balanced"),  # top_k = E
    (1, 9, 3, 8, 2, "balanced"),  # T = 1
    (9, 16, 8, 8, 2, "one"),  # decode-like: one expert with 9 rows, the others 0 to 3 (the few-rows path)
]
NAMES = ["x", "topk_weights", "w_gate_up", "w_down"]


@pytest.mark.parametrize("case", EXPERT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_experts_reference_float64(case):
    T, H, I, E, K, routing = case
    inputs = make_experts(T, H, I, E, K, routing, torch.float64)
    g = torch.randn(T, H, dtype=torch.float64)
    out, gs = grads(moe_experts_reference, inputs, g)
    out64, gs64 = grads(experts_dense64, inputs, g)
    torch.testing.assert_close(out, out64, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(NAMES, gs, gs64):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend", backends("moe_experts_fwd"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", EXPERT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_experts_fwd_bwd(case, dtype, backend):
    T, H, I, E, K, routing = case
    inputs = make_experts(T, H, I, E, K, routing, dtype)
    g = torch.randn(T, H)
    run = lambda *a: moe_experts(*a, backend=backend)  # noqa: E731
    out, gs = grads(run, inputs, g.to(dtype))
    ref, gs_ref = grads(moe_experts_reference, inputs, g.to(dtype))
    out64, gs64 = grads(experts_dense64, inputs, g.double())
    assert out.dtype == dtype
    assert_close_to_ref(out, out64, ref, dtype, name="out")
    for name, a, r, b in zip(NAMES, gs, gs_ref, gs64):
        assert a.dtype == r.dtype, name
        assert_close_to_ref(a, b, r, dtype, name=f"grad {name}")


@pytest.mark.skipif(not _backend.cpp_available(), reason="reasonrl._C not built")
@pytest.mark.parametrize("isa", runnable_isas())
@pytest.mark.parametrize("case", EXPERT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cpp_experts_every_isa_build(case, isa):
    """csrc/cpu/moe.cpp's AVX2 and baseline builds both, forced as the log-prob kernels' are (it ignored the
    forced ISA before 2026-11-30, so on an AVX2 machine no test ran its baseline build)."""
    T, H, I, E, K, routing = case
    inputs = make_experts(T, H, I, E, K, routing, torch.float32)
    g = torch.randn(T, H)
    with forced_isa(isa):
        out, gs = grads(lambda *a: moe_experts(*a, backend="cpp"), inputs, g)
    ref, gs_ref = grads(moe_experts_reference, inputs, g)
    out64, gs64 = grads(experts_dense64, inputs, g.double())
    assert_close_to_ref(out, out64, ref, torch.float32, name=f"out {isa}")
    for name, a, r, b in zip(NAMES, gs, gs_ref, gs64):
        assert_close_to_ref(a, b, r, torch.float32, name=f"grad {name} {isa}")


@pytest.mark.parametrize("backend", backends("moe_experts_fwd"))
def test_experts_noncontiguous_and_int32_ids(backend):
    T, H, I, E, K = 21, 12, 6, 5, 2
    x, ids, w, gu, wd = make_experts(T, H, I, E, K, "balanced", torch.float32)
    x_nc = x.T.contiguous().T  # (T, H) with strides (1, T)
    gu_nc = gu.transpose(1, 2).contiguous().transpose(1, 2)
    out = moe_experts(x_nc, ids.int(), w, gu_nc, wd, backend=backend)
    out64 = experts_dense64(x, ids, w, gu, wd)
    assert_close_to_ref(out, out64, moe_experts_reference(x, ids, w, gu, wd), torch.float32, name="out")


@pytest.mark.parametrize("backend", backends("moe_experts_fwd"))
def test_experts_empty_tokens(backend):
    x, ids, w, gu, wd = make_experts(0, 8, 4, 3, 2, "balanced", torch.float32)
    x.requires_grad_(True)
    out = moe_experts(x, ids, w, gu, wd, backend=backend)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert x.grad.shape == (0, 8)


@pytest.mark.parametrize("backend", backends("moe_experts_fwd"))
def test_experts_no_columns(backend):
    """top-k of width 0 (topk_ids (T, 0)): the output is 0 and every gradient 0, not a crash."""
    x, _, _, gu, wd = make_experts(5, 8, 4, 3, 2, "balanced", torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (x, gu, wd)]
    w = torch.zeros(5, 0, requires_grad=True)
    out = moe_experts(leaves[0], torch.zeros(5, 0, dtype=torch.int64), w, leaves[1], leaves[2], backend=backend)
    assert out.shape == (5, 8) and not out.any()
    out.sum().backward()
    assert all(t.grad is None or not t.grad.any() for t in leaves)


@pytest.mark.parametrize("backend", backends("moe_experts_fwd"))
def test_experts_errors(backend):
    x, ids, w, gu, wd = make_experts(5, 8, 4, 3, 2, "balanced", torch.float32)
    bad = ids.clone()
    bad[2, 1] = 3
    with pytest.raises(ValueError, match="topk_ids"):
        moe_experts(x, bad, w, gu, wd, backend=backend)
    bad[2, 1] = -1
    with pytest.raises(ValueError, match="topk_ids"):
        moe_experts(x, bad, w, gu, wd, backend=backend)
    with pytest.raises(ValueError, match="w_down"):
        moe_experts(x, ids, w, gu, wd[:, :, :3], backend=backend)
    with pytest.raises(ValueError, match="w_gate_up"):
        moe_experts(x, ids, w, gu[:, :, :5], wd, backend=backend)
    with pytest.raises(ValueError, match="w_gate_up"):
        moe_experts(x, ids, w, gu.double(), wd, backend=backend)
    with pytest.raises(ValueError, match="topk_weights"):
        moe_experts(x, ids, w[:, :1], gu, wd, backend=backend)
    with pytest.raises(ValueError, match="topk_ids"):
        moe_experts(x, ids[:4], w[:4], gu, wd, backend=backend)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_experts_double_backward_is_refused(backend):
    """A gradient penalty through the kernel backends (create_graph=True) lost the MoE part's second-order
    term without a word: None (triton) or 0 (cpp) where the reference gives 1e4 (2026-11-30). The kernel
    backwards now raise, as the log-prob and GRPO ones do; the reference backend differentiates twice."""
    x, ids, w, gu, wd = make_experts(7, 8, 4, 3, 2, "balanced", torch.float32)
    x, gu = x.detach().requires_grad_(), gu.detach().requires_grad_()
    out = moe_experts(x, ids, w, gu, wd, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    out = moe_experts(x, ids, w, gu, wd, backend="reference")
    (dx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    assert torch.autograd.grad(dx.pow(2).sum(), gu)[0].abs().sum() > 0
    out = moe_experts(x, ids, w, gu, wd, backend=backend)  # first order still works
    out.pow(2).sum().backward()


def test_experts_backend_errors():
    x, ids, w, gu, wd = make_experts(5, 8, 4, 3, 2, "balanced", torch.float32)
    with pytest.raises(ValueError, match="backend"):
        moe_experts(x, ids, w, gu, wd, backend="fast")
    with pytest.raises(RuntimeError, match="cuda"):
        moe_experts(x, ids, w, gu, wd, backend="cuda")
    with pytest.raises(ValueError, match="float64"):
        moe_experts(x.double(), ids, w, gu.double(), wd.double(), backend="cpp")


# ---------------------------------------------------------------------------------------------
# moe_router
# ---------------------------------------------------------------------------------------------
def router_brute(logits, K, scoring, renormalize, bias):
    """Per token: scores in float32, ids by (score + bias) descending, lower id first on ties."""
    s = torch.softmax(logits.float(), -1) if scoring == "softmax" else torch.sigmoid(logits.float())
    sel = s if bias is None else s + bias.float()
    rows = sel.tolist()
    ids = torch.tensor([sorted(range(len(r)), key=lambda e: (-r[e], e))[:K] for r in rows],
                       dtype=torch.int64).reshape(s.shape[0], K)
    w = s.double().gather(1, ids)
    return (w / w.sum(1, keepdim=True) if renormalize else w), ids


ROUTER_CASES = [(33, 8, 2), (17, 5, 5), (9, 1, 1), (1, 16, 4), (40, 64, 8)]  # (T, E, K)


@pytest.mark.parametrize("backend", backends("moe_router_fwd"))
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_router(backend, scoring, renormalize, with_bias, ties):
    for T, E, K in ROUTER_CASES:
        logits = torch.randint(-2, 3, (T, E)).float() if ties else 3 * torch.randn(T, E)
        bias = None
        if with_bias:
            bias = (torch.randint(0, 2, (E,)) * 0.25).float() if ties else 0.1 * torch.randn(E)
        w, ids = moe_router(logits, K, scoring=scoring, renormalize=renormalize, bias=bias, backend=backend)
        w64, ids64 = router_brute(logits, K, scoring, renormalize, bias)
        assert ids.dtype == torch.int64 and w.dtype == torch.float32
        assert torch.equal(ids, ids64), f"T={T} E={E} K={K}"
        torch.testing.assert_close(w.double(), w64, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backends("moe_router_fwd"))
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_router_grad(backend, scoring):
    T, E, K = 23, 8, 3
    logits = 2 * torch.randn(T, E)
    g = torch.randn(T, K)
    lg = logits.clone().requires_grad_(True)
    w, ids = moe_router(lg, K, scoring=scoring, backend=backend)
    w.backward(g)
    lg64 = logits.double().requires_grad_(True)
    w64, ids64 = moe_router(lg64, K, scoring=scoring, backend="reference")
    w64.backward(g.double())
    assert torch.equal(ids, ids64)
    torch.testing.assert_close(lg.grad.double(), lg64.grad, rtol=1e-5, atol=1e-6)
    # and the float64 reference itself by finite differences (ids fixed by the random logits' gaps)
    f = lambda z: moe_router(z, K, scoring=scoring, backend="reference")[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (logits[:5].double().requires_grad_(True),))


def test_router_errors():
    logits = torch.randn(4, 6)
    with pytest.raises(ValueError, match="top_k"):
        moe_router(logits, 7)
    with pytest.raises(ValueError, match="top_k"):
        moe_router(logits, 0)
    with pytest.raises(ValueError, match="scoring"):
        moe_router(logits, 2, scoring="relu")
    with pytest.raises(ValueError, match="bias"):
        moe_router(logits, 2, bias=torch.zeros(5))
    with pytest.raises(ValueError, match="router_logits"):
        moe_router(logits[0], 2)


# ---------------------------------------------------------------------------------------------
# load_balancing_loss
# ---------------------------------------------------------------------------------------------
def lb_brute(logits, ids, E, K, mask):
    keep = [t for t in range(logits.shape[0]) if mask is None or mask[t]]
    p = torch.softmax(logits.double(), -1)
    f = [sum(int(ids[t, k]) == e for t in keep for k in range(K)) / (len(keep) * K) for e in range(E)]
    P = [sum(p[t, e] for t in keep) / len(keep) for e in range(E)]
    return E * sum(fe * Pe for fe, Pe in zip(f, P))


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss(masked):
    T, E, K = 19, 6, 2
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    _, ids = moe_router(logits, K)
    mask = torch.rand(T) < 0.6 if masked else None
    if masked:
        mask[0] = True
    loss = load_balancing_loss(logits, ids, E, K, mask)
    torch.testing.assert_close(loss, lb_brute(logits.detach(), ids, E, K, mask), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: load_balancing_loss(z, ids, E, K, mask), (logits,))
    # perfectly uniform routing and probabilities give exactly 1
    uni = torch.zeros(E, E, dtype=torch.float64)
    ids_uni = torch.arange(E)[:, None]
    torch.testing.assert_close(load_balancing_loss(uni, ids_uni, E, 1), torch.tensor(1.0, dtype=torch.float64))


def test_load_balancing_loss_all_masked_and_errors():
    logits = torch.randn(5, 4, requires_grad=True)
    _, ids = moe_router(logits, 2)
    loss = load_balancing_loss(logits, ids, 4, 2, torch.zeros(5, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(ValueError, match="num_experts"):
        load_balancing_loss(logits, ids, 5, 2)
    with pytest.raises(ValueError, match="topk_ids"):
        load_balancing_loss(logits, ids, 4, 3)
    with pytest.raises(ValueError, match="mask"):
        load_balancing_loss(logits, ids, 4, 2, torch.ones(4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# moe_dispatch
# ---------------------------------------------------------------------------------------------
def check_dispatch(d, ids, E, bs):
    flat = ids.reshape(-1).tolist()
    want = [[] for _ in range(E)]
    for a, e in enumerate(flat):  # in order of a: stable by construction
        want[e].append(a)
    counts = [len(s) for s in want]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    for name in ("counts", "offsets", "sorted_idx"):
        assert getattr(d, name).dtype == torch.int32, name
    assert d.counts.tolist() == counts
    assert d.offsets.tolist() == offsets
    assert d.sorted_idx.tolist() == [a for s in want for a in s]
    if bs == 0:
        assert d.padded_offsets is None and d.padded_idx is None and d.block_expert is None
        return
    padded = [(c + bs - 1) // bs * bs for c in counts]
    pidx, blocks, poff = [], [], [0]
    for ex, (s, p) in enumerate(zip(want, padded)):
        pidx += s + [-1] * (p - len(s))
        blocks += [ex] * (p // bs)
        poff.append(poff[-1] + p)
    assert d.padded_offsets.dtype == d.padded_idx.dtype == d.block_expert.dtype == torch.int32
    assert d.padded_offsets.tolist() == poff
    assert d.padded_idx.tolist() == pidx
    assert d.block_expert.tolist() == blocks


@pytest.mark.parametrize("backend", backends("moe_dispatch_fwd"))
@pytest.mark.parametrize("bs", [0, 1, 4, 16])
def test_dispatch(backend, bs):
    for T, E, K, routing in [(37, 6, 2, "balanced"), (37, 6, 2, "skewed"), (29, 5, 3, "one"), (7, 1, 1, "balanced"),
                             (1, 8, 2, "balanced"), (0, 4, 2, "balanced"), (50, 4, 4, "balanced")]:
        ids = make_ids(T, E, K, routing)
        for t in (ids, ids.int()):
            check_dispatch(moe_dispatch(t, E, bs, backend=backend), ids, E, bs)


@pytest.mark.parametrize("backend", backends("moe_dispatch_fwd"))
def test_dispatch_errors(backend):
    ids = make_ids(9, 4, 2, "balanced")
    for v in (4, -1):
        bad = ids.clone()
        bad[3, 0] = v
        with pytest.raises(ValueError, match="topk_ids"):
            moe_dispatch(bad, 4, backend=backend)
    with pytest.raises(ValueError, match="topk_ids"):
        moe_dispatch(ids.float(), 4, backend=backend)
    with pytest.raises(ValueError, match="block_size"):
        moe_dispatch(ids, 4, -2, backend=backend)


# ---------------------------------------------------------------------------------------------
# moe_block
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_block_grads_to_router(backend, scoring):
    T, H, I, E, K = 25, 12, 6, 5, 2
    x = torch.randn(T, H)
    rw = torch.randn(E, H) / H**0.5
    gu = torch.randn(E, 2 * I, H) / H**0.5
    wd = torch.randn(E, H, I) / I**0.5
    g = torch.randn(T, H)

    def run(x, rw, gu, wd, dtype, b):
        out, logits = moe_block(x, rw, gu, wd, K, scoring=scoring, backend=b)
        return out.to(dtype), logits

    def dense(x, rw, gu, wd):
        logits = x @ rw.T
        w, ids = moe_router(logits, K, scoring=scoring, backend="reference")
        return experts_dense64(x, ids, w, gu, wd)

    res = {}
    for key, dtype, b in (("out", torch.float32, backend), ("ref", torch.float32, "reference"), ("64", torch.float64, None)):
        leaves = [t.to(dtype).clone().requires_grad_(True) for t in (x, rw, gu, wd)]
        y = dense(*leaves) if b is None else run(*leaves, dtype, b)[0]
        y.backward(g.to(dtype))
        res[key] = [y.detach()] + [t.grad for t in leaves]
    for i, name in enumerate(["out", "x", "router_weight", "w_gate_up", "w_down"]):
        assert_close_to_ref(res["out"][i], res["64"][i], res["ref"][i], torch.float32, name=name)


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA routing kernels and the GPU auto path against the reference (run by the device check)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_router_cuda(dtype, scoring):
    for T, E, K in ROUTER_CASES + [(4096, 128, 8), (300, 256, 8)]:
        for ties in (False, True):
            logits = (torch.randint(-2, 3, (T, E)).float() if ties else 3 * torch.randn(T, E)).to(dtype)
            bias = (torch.randint(0, 2, (E,)) * 0.25).float() if ties else 0.1 * torch.randn(E)
            for b in (None, bias):
                w, ids = moe_router(logits.cuda(), K, scoring=scoring, bias=None if b is None else b.cuda(), backend="cuda")
                w64, ids64 = router_brute(logits.float(), K, scoring, True, b)
                near = _near_tie_rows(logits.float(), K, scoring, b)  # float32 rounding may order these either way
                assert torch.equal(ids.cpu()[~near], ids64[~near]), f"T={T} E={E} K={K} ties={ties}"
                assert near.float().mean() < 0.05
                torch.testing.assert_close(w.cpu().double()[~near], w64[~near], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_router_cuda_nan_and_dead_rows(scoring):
    """The CUDA router on the rows of test_router_nan_and_dead_rows_agree_across_backends."""
    z, bias = _nan_and_dead_rows(8)
    for bb in (None, bias):
        ref = moe_router(z, 3, scoring=scoring, bias=bb, backend="reference")[1]
        got = moe_router(z.cuda(), 3, scoring=scoring, bias=None if bb is None else bb.cuda(), backend="cuda")[1]
        assert torch.equal(got.cpu(), ref)


def _near_tie_rows(logits, K, scoring, bias, gap=1e-6):
    """(T,) bool: rows where two neighbours among the K + 1 largest selection values (float64) lie
    within gap (relative) without being equal: the order of the ids there is float rounding's."""
    z = logits.double()
    s = torch.softmax(z, -1) if scoring == "softmax" else torch.sigmoid(z)
    sel = s if bias is None else s + bias.double()
    top = sel.sort(-1, descending=True).values[:, : K + 1]
    a, b = top[:, :-1], top[:, 1:]
    near = (a != b) & ((a - b).abs() <= gap * a.abs().clamp_min(1e-30))  # exact ties: by id everywhere
    return near.any(-1)


@pytest.mark.gpu
@pytest.mark.parametrize("bs", [0, 16, 64])
def test_dispatch_cuda(bs):
    for T, E, K, routing in [(37, 6, 2, "balanced"), (5000, 128, 8, "balanced"), (3000, 64, 8, "skewed"),
                             (2900, 16, 3, "one"), (1, 8, 2, "balanced"), (0, 4, 2, "balanced")]:
        ids = make_ids(T, E, K, routing)
        for t in (ids, ids.int()):
            d = moe_dispatch(t.cuda(), E, bs, backend="cuda")
            check_dispatch(type(d)(*[None if v is None else v.cpu() for v in d]), ids, E, bs)
    bad = make_ids(9, 4, 2, "balanced")
    bad[3, 1] = 4
    with pytest.raises(ValueError, match="topk_ids"):
        moe_dispatch(bad.cuda(), 4, backend="cuda")


@pytest.mark.gpu
def test_experts_cuda_auto():
    T, H, I, E, K = 300, 64, 32, 16, 4
    inputs = [t.cuda() for t in make_experts(T, H, I, E, K, "balanced", torch.bfloat16)]
    g = torch.randn(T, H, device="cuda")
    out, gs = grads(lambda *a: moe_experts(*a, backend="auto"), inputs, g.bfloat16())
    ref, gs_ref = grads(moe_experts_reference, inputs, g.bfloat16())
    out64, gs64 = grads(experts_dense64, inputs, g.double())
    assert_close_to_ref(out, out64, ref, torch.bfloat16, name="out")
    for name, a, r, b in zip(NAMES, gs, gs_ref, gs64):
        assert_close_to_ref(a, b, r, torch.bfloat16, name=f"grad {name}")


def test_cpp_opcheck():
    """Schemas, fake-tensor (Meta) shapes and torch.compile's dispatch agree with the CPU kernels."""
    from torch.library import opcheck
    x, ids, w, gu, wd = make_experts(9, 16, 8, 4, 2, "balanced", torch.float32)
    ops = torch.ops.reasonrl
    opcheck(ops.moe_experts_fwd.default, (x, ids, w, gu, wd))
    opcheck(ops.moe_router_fwd.default, (torch.randn(9, 4), 2, False, None))
    for flags in ((True, True, True, True), (True, False, False, True), (False, True, True, False)):
        opcheck(ops.moe_experts_bwd.default, (torch.randn(9, 16), x, ids, w, gu, wd, *flags))


@pytest.mark.parametrize("backend", backends("moe_experts_fwd"))
@pytest.mark.parametrize("which", [(0,), (2, 3), (1,)], ids=["x", "weights", "topk_weights"])
def test_experts_partial_grads(backend, which):
    """Only some inputs need gradients (frozen experts, frozen router): those match, the rest stay None."""
    inputs = list(make_experts(23, 12, 6, 5, 2, "balanced", torch.float32))
    float_pos = [0, 2, 3, 4]  # x, topk_weights, w_gate_up, w_down
    leaves = [t.clone() for t in inputs]
    for i in which:
        leaves[float_pos[i]].requires_grad_(True)
    g = torch.randn(23, 12)
    moe_experts(*leaves, backend=backend).backward(g)
    _, gs64 = grads(experts_dense64, inputs, g.double())
    _, gs_ref = grads(moe_experts_reference, inputs, g)
    for i, pos in enumerate(float_pos):
        if i in which:
            assert_close_to_ref(leaves[pos].grad, gs64[i], gs_ref[i], torch.float32, name=NAMES[i])
        else:
            assert leaves[pos].grad is None


@pytest.mark.parametrize("backend", backends("moe_experts_fwd"))
def test_experts_inference_mode_threads(backend):
    """Under torch.inference_mode (the rollout engine) with the experts spread over 2 threads."""
    x, ids, w, gu, wd = make_experts(256, 16, 8, 16, 4, "balanced", torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            out = moe_experts(x, ids, w, gu, wd, backend=backend)
    finally:
        torch.set_num_threads(threads)
    assert_close_to_ref(out, experts_dense64(x, ids, w, gu, wd), moe_experts_reference(x, ids, w, gu, wd),
                        torch.float32, name="out")


def _nan_and_dead_rows(E):
    """Router logits whose rows hold NaN scores and rows of only -inf, and a bias with distinct values."""
    z = 2 * torch.randn(6, E)
    z[0, 1] = float("nan")  # softmax: the whole row's scores are NaN; sigmoid: one expert's
    z[1, E - 1] = float("nan")
    z[2] = float("-inf")  # softmax: scores 0 (a dead row), picked by the bias alone
    z[3, : E // 2] = float("-inf")
    # softmax: subnormal scores, kept apart; float32 sigmoid: 0 (exp(-z) overflows), ties by id
    z[4] = torch.tensor([0.0, -100.0, -90.0, -95.0] + [-97.0 - 2 * i for i in range(E - 4)])
    z[5] = 17.0 + torch.arange(E, dtype=torch.float32).flip(0)  # float32 sigmoid: all 1.0, ties by id
    return z, torch.randperm(E).float() * 0.01


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_router_nan_and_dead_rows_agree_across_backends(scoring):
    """Every backend ranks a NaN score last, scores a softmax row of only -inf as 0 (so the bias picks),
    and keeps subnormal scores apart: the same ids."""
    E, K = 8, 3
    z, bias = _nan_and_dead_rows(E)
    outs = {}
    for b in ["reference", "cpp"]:
        for bb in (None, bias):
            outs[(b, bb is None)] = moe_router(z, K, scoring=scoring, bias=bb, backend=b)[1]
    for (b, nob), ids in outs.items():
        assert torch.equal(ids, outs[("reference", nob)]), (b, nob)
    ref = outs[("reference", False)]
    if scoring == "softmax":
        assert ref[2].tolist() == bias.argsort(descending=True, stable=True)[:K].tolist()  # the dead row: by bias
    else:
        assert 1 not in ref[0].tolist() and E - 1 not in ref[1].tolist()  # NaN scores rank last
    if scoring == "softmax":  # (float32 sigmoid of -90 is 0: those tie, by id, on every backend)
        assert outs[("reference", True)][4].tolist() == [0, 2, 3]  # e^-90 > e^-95 > e^-97: subnormal, apart


def test_dispatch_padding_past_int32_is_an_error():
    ids = torch.zeros(3, 1, dtype=torch.int64)
    for b in ["reference", "cpp"]:
        with pytest.raises(ValueError, match="can pad past the int32 indices"):
            moe_dispatch(ids, 4, block_size=2**30, backend=b)


@pytest.mark.parametrize("backend", backends("moe_router_fwd"))
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_router_dead_rows_give_zero_weights_not_nan(backend, scoring, renormalize):
    """A row whose selected scores are all 0 (sigmoid of logits near -200 underflows in float32; a
    softmax row of only -inf) gets weights 0 and zero gradient, not 0/0 = NaN; the other rows match
    the float64 brute force, and both backends pick the same ids."""
    T, E, K = 6, 8, 3
    logits = 2 * torch.randn(T, E)
    logits[1] = -200.0 + torch.randn(E)  # sigmoid underflows to 0 in float32; softmax is fine
    logits[3] = float("-inf")  # no expert can be scored
    lg = logits.clone().requires_grad_(True)
    w, ids = moe_router(lg, K, scoring=scoring, renormalize=renormalize, backend=backend)
    w.backward(torch.randn(T, K))
    assert torch.isfinite(w).all() and torch.isfinite(lg.grad).all()
    assert (w[3] == 0).all() and (lg.grad[3] == 0).all()
    if scoring == "sigmoid":
        assert (w[1] == 0).all()
    _, ids_ref = moe_router(logits, K, scoring=scoring, renormalize=renormalize, backend="reference")
    assert torch.equal(ids, ids_ref)
    live = [0, 2, 4, 5] + ([1] if scoring == "softmax" else [])
    w64, ids64 = router_brute(logits[live], K, scoring, renormalize, None)
    assert torch.equal(ids[live], ids64)
    torch.testing.assert_close(w[live].double(), w64, rtol=1e-6, atol=1e-6)
