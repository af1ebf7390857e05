"""The log-prob family against the float64 reference: every backend, values and gradients."""
import pytest
import torch

from reasonrl.ops import _backend, linear_token_logprobs, token_logprobs
from reasonrl.ops.logprobs import token_logprobs_reference
from tolerance import assert_close_to_ref, atol_for

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def cpu_backends():
    out = ["triton"]
    out.append("cpp")  # must be built: a missing extension is a failure, not a skip
    return out


def _logits(N, V, dtype, scale=3.0):
    return (torch.randn(N, V, dtype=torch.float64) * scale).to(dtype)


def _ids(N, V, pad_frac=0.2, ignore_index=-100):
    ids = torch.randint(0, V, (N,))
    pad = torch.rand(N) < pad_frac
    return ids.masked_fill(pad, ignore_index)


def _run(fn, x, ids, g, gh, **kw):
    x = x.detach().clone().requires_grad_(True)
    lp, ent = fn(x, ids, return_entropy=True, **kw)
    loss = (lp.double() * g).sum() + (ent.double() * gh).sum()
    (gx,) = torch.autograd.grad(loss, x)
    return lp.detach(), ent.detach(), gx


def _check(backend, x, ids, temperature, inplace=False, device=None):
    """The backend (on `device`, default the inputs' CPU) against the float64 reference, held to the
    error of PyTorch's own same-dtype computation."""
    dtype = x.dtype
    N = ids.numel()
    g, gh = torch.randn(ids.shape, dtype=torch.float64), torch.randn(ids.shape, dtype=torch.float64)
    ref = _run(token_logprobs_reference, x.double(), ids, g, gh, temperature=temperature)
    same = _run(token_logprobs_reference, x, ids, g, gh, temperature=temperature)
    kw = dict(temperature=temperature, backend=backend, inplace_backward=inplace)
    d = device or x.device
    out = tuple(t.cpu() for t in _run(token_logprobs, x.to(d), ids.to(d), g.to(d), gh.to(d), **kw))
    for name, o, r, s in zip(("logp", "entropy", "grad"), out, ref, same):
        assert_close_to_ref(o, r, s, dtype, name=f"{backend} {name} N={N} dtype={dtype}", atol=atol_for(o, dtype))
    keep = ids != -100
    assert (out[0][~keep] == 0).all() and (out[2][~keep] == 0).all()
    assert out[0].dtype == torch.float32 and out[2].dtype == dtype


SHAPES = [(1, 7), (37, 7), (37, 1000), (301, 7), (5, 32000), (1, 151936)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_matches_float64(backend, N, V, dtype):
    x = _logits(N, V, dtype)
    _check(backend, x, _ids(N, V), temperature=0.7)


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_large_cpp(backend, dtype):
    _check(backend, _logits(2048, 1000, dtype), _ids(2048, 1000), temperature=1.3)
    _check(backend, _logits(2048, 7, dtype), _ids(2048, 7), temperature=0.5)
    _check(backend, _logits(37, 151936, dtype), _ids(37, 151936), temperature=1.0)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("inplace", [False, True])
def test_noncontiguous_and_inplace(backend, inplace):
    base = _logits(6 * 37, 1000 + 24, torch.float32).view(6, 37, 1024)
    x = base[:, :, 3:1003]  # (6, 37, 1000): row stride 1024
    ids = _ids(6 * 37, 1000).view(6, 37)
    _check(backend, x, ids, temperature=1.0, inplace=inplace)
    xt = _logits(37, 6 * 1000, torch.float32).view(37, 6, 1000).transpose(0, 1)  # (6, 37, 1000) permuted
    _check(backend, xt, ids, temperature=2.0, inplace=inplace)
    xs = _logits(6 * 38, 1000, torch.bfloat16).view(6, 38, 1000)[:, :-1]  # the usual logits[:, :-1]
    _check(backend, xs, ids, temperature=1.0, inplace=inplace)


@pytest.mark.parametrize("backend", cpu_backends())
def test_sliced_batch_is_not_copied(backend):
    """(B, T+1, V)[:, :-1] runs per batch row: the in-place gradient lands in the model's buffer."""
    full = _logits(3 * 9, 50, torch.float32).view(3, 9, 50)
    leaf = full.clone().requires_grad_(True)
    y = leaf * 1.0
    ids = _ids(3 * 8, 50).view(3, 8)
    token_logprobs(y[:, :-1], ids, backend=backend, inplace_backward=True).sum().backward()
    ref = full.double().requires_grad_(True)
    token_logprobs_reference(ref[:, :-1], ids).sum().backward()
    assert torch.allclose(leaf.grad.double(), ref.grad, atol=1e-6)
    assert torch.equal(y.detach()[:, :-1], leaf.grad[:, :-1])  # written over y's own storage


@pytest.mark.parametrize("backend", cpu_backends())
def test_inplace_writes_over_logits_buffer(backend):
    x = _logits(37, 1000, torch.float32).requires_grad_(True)
    buf = x.detach().clone()
    leaf = buf.clone().requires_grad_(True)
    y = leaf * 1.0  # an intermediate, as an LM head's output would be
    ids = _ids(37, 1000)
    lp = token_logprobs(y, ids, backend=backend, inplace_backward=True)
    lp.sum().backward()
    (gref,) = torch.autograd.grad(token_logprobs_reference(x.double(), ids).sum(), x)
    assert torch.allclose(leaf.grad.double(), gref.double(), atol=1e-5)
    assert torch.equal(y.detach(), leaf.grad)  # the gradient now lives in y's buffer


@pytest.mark.parametrize("backend", cpu_backends())
def test_inplace_never_gives_a_silently_wrong_gradient(backend):
    """inplace_backward writes the gradient over the logits: an op that saved them before this one, or a
    second backward through the graph, now raises (they read the overwritten buffer silently: the leaf's
    gradient was off by 0.06-0.24). An op that saved them after this one still gets the right values."""
    leaf = _logits(6, 50, torch.float32).requires_grad_(True)
    ids = _ids(6, 50, pad_frac=0.0)
    y = leaf * 1.0
    sq = (y * y).sum()  # mul saves y
    lp = token_logprobs(y, ids, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + sq).backward()
    y = leaf * 1.0
    lp = token_logprobs(y, ids, backend=backend, inplace_backward=True)
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        lp.sum().backward()
    grads = []
    for inplace in (True, False):
        leaf.grad = None
        y = leaf * 1.0
        lp = token_logprobs(y, ids, backend=backend, inplace_backward=inplace)
        (lp.sum() + (y * y).sum()).backward()  # mul after token_logprobs: its backward runs first
        grads.append(leaf.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits_and_fully_padded(backend, dtype):
    N, V = 9, 1000
    x = _logits(N, V, torch.float64, scale=1.0)
    x[:, 0] = 1e4
    x[:, 1] = -1e4
    x[3] = -1e4 + torch.rand(V, dtype=torch.float64)
    x = x.to(dtype)
    ids = _ids(N, V, pad_frac=0.0)
    ids[0], ids[1] = 0, 1
    _check(backend, x, ids, temperature=1.0)
    # fully padded: every position ignored -> zeros, zero gradient
    ids_pad = torch.full((N,), -100)
    lp, ent, gx = _run(token_logprobs, x, ids_pad, torch.randn(N), torch.randn(N), backend=backend)
    assert (lp == 0).all() and (ent == 0).all() and (gx == 0).all()


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("offset", [1e4, -3e4])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logits_with_a_large_common_offset(backend, offset, temperature):
    """Every logit of every row near 1e4 (or -3e4), float32: the gradient at PyTorch's own error. The
    kernels kept the log-sum-exp as one float32, whose rounding there (ulp 1e-3) every p of the row
    carried: a gradient 2.4e-4 off (relative) at 1e4 where PyTorch's is 6e-8 (2026-11-30); it is now
    (m, log s), two floats, and p = exp((x - m) / T - log s)."""
    x = (_logits(37, 1000, torch.float64) + offset).float()
    _check(backend, x, _ids(37, 1000), temperature)


@pytest.mark.parametrize("backend", cpu_backends())
def test_linear_logits_with_a_large_common_offset(backend):
    """The fused op at logits near 1e4 that float32 holds exactly (eighths, H = 16, a constant column):
    PyTorch's logits then carry no rounding, and its gradient error is ~1e-7, so the bound is tight.
    One float32 lse (before 2026-11-30) gave 2.6e-5 relative at 100x smaller logits."""
    N, H, V = 29, 16, 700
    h = torch.randint(-16, 17, (N, H)).double() / 8
    w = torch.randint(-16, 17, (V, H)).double() / 8
    h[:, -1], w[:, -1] = 1.0, 1e4  # every logit = 1e4 + a sum of 15 products of eighths: exact in float32
    ids = _ids(N, V)
    _lin_check(backend, h.float(), w.float(), ids, torch.float32, "offset 1e4")
    _lin_check(backend, h.float(), w.float(), ids, torch.float32, "offset 1e4, vocabulary chunks",
               chunk_bytes=N * 128 * 4)


# ----------------------------------------------------------------------------- fused LM head
def _lin_run(fn, h, w, ids, g, gh, **kw):
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    lp, ent = fn(h, w, ids, return_entropy=True, **kw)
    loss = (lp.double() * g).sum() + (ent.double() * gh).sum()
    gx, gw = torch.autograd.grad(loss, (h, w))
    return lp.detach(), ent.detach(), gx, gw


@pytest.mark.parametrize("backend", cpu_backends() + ["cpp-rows"])
@pytest.mark.parametrize("N,H,V", [(1, 16, 7), (37, 24, 1000), (64, 8, 32000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_token_logprobs_matches_float64(backend, N, H, V, dtype, monkeypatch):
    """"cpp-rows": the forward in row chunks, as on GPU (the CPU splits by vocabulary columns)."""
    if backend == "cpp-rows":
        monkeypatch.setattr("reasonrl.ops.logprobs.VOCAB_CHUNKED_FWD", ())
        backend = "cpp"
    h = (torch.randn(N, H, dtype=torch.float64)).to(dtype)
    w = (torch.randn(V, H, dtype=torch.float64) * (2.0 / H**0.5)).to(dtype)
    ids = _ids(N, V)
    g, gh = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    # small chunks so the chunk loops run several trips, with ragged last chunks
    kw = dict(temperature=0.8, backend=backend, chunk_bytes=max(1, (N * V * h.element_size()) // 3))
    out = _lin_run(linear_token_logprobs, h, w, ids, g, gh, **kw)
    ref = _lin_run(linear_token_logprobs, h.double(), w.double(), ids, g, gh, temperature=0.8, backend="reference")
    same = _lin_run(linear_token_logprobs, h, w, ids, g, gh, temperature=0.8, backend="reference")
    for name, o, r, s in zip(("logp", "entropy", "grad_hidden", "grad_weight"), out, ref, same):
        assert_close_to_ref(o, r, s, dtype, name=f"{backend} {name} N={N} V={V} {dtype}", atol=atol_for(o, dtype))


def _lin_check(backend, h, w, ids, dtype, what, **kw):
    N = ids.numel()
    g, gh = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    out = _lin_run(linear_token_logprobs, h, w, ids, g, gh, backend=backend, **kw)
    rkw = {k: v for k, v in kw.items() if k in ("temperature", "ignore_index")}
    ref = _lin_run(linear_token_logprobs, h.double(), w.double(), ids, g, gh, backend="reference", **rkw)
    same = _lin_run(linear_token_logprobs, h, w, ids, g, gh, backend="reference", **rkw)
    for name, o, r, s in zip(("logp", "entropy", "grad_hidden", "grad_weight"), out, ref, same):
        assert_close_to_ref(o, r, s, dtype, name=f"{backend} {what} {name} {dtype}", atol=atol_for(o, dtype))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_issue_shapes_and_edge_cases(dtype):
    """The issue's list for the fused LM-head op too (the token op has its own above): N = 2048 and
    V = 151936, a non-contiguous hidden, logits near +-1e4, fully padded rows; cpp backend (Triton runs
    the small shapes above under the interpreter)."""
    def mk(N, H, V, scale=1.0):
        h = torch.randn(N, H, dtype=torch.float64).to(dtype)
        w = (torch.randn(V, H, dtype=torch.float64) * (scale / H ** 0.5)).to(dtype)
        return h, w
    h, w = mk(2048, 8, 1000)
    _lin_check("cpp", h, w, _ids(2048, 1000), dtype, "N=2048")
    h, w = mk(3, 8, 151936)
    _lin_check("cpp", h, w, _ids(3, 151936, pad_frac=0.0), dtype, "V=151936")
    base, w = mk(37, 48, 1000)
    _lin_check("cpp", base[:, ::2], w[:, :24].contiguous(), _ids(37, 1000), dtype, "non-contiguous hidden")
    # logits near +-1e4: one vocabulary row far out along each hidden row's direction
    h, w = mk(9, 16, 1000)
    w = w.double()
    w[0] = 1e4 * h[0].double() / h[0].double().pow(2).sum()
    w[1] = -1e4 * h[1].double() / h[1].double().pow(2).sum()
    w = w.to(dtype)
    z = (h.double() @ w.double().T)
    assert z.abs().max() > 5e3
    _lin_check("cpp", h, w, _ids(9, 1000, pad_frac=0.0), dtype, "extreme logits")
    # fully padded rows: log-prob 0, entropy 0, no gradient from them
    h, w = mk(6, 16, 1000)
    ids = _ids(6, 1000, pad_frac=0.0)
    ids[[1, 4]] = -100
    lp, ent, gx, gw = _lin_check("cpp", h, w, ids, dtype, "padded rows")
    assert (lp[[1, 4]] == 0).all() and (ent[[1, 4]] == 0).all() and (gx[[1, 4]] == 0).all()
    lp, ent, gx, gw = _lin_run(linear_token_logprobs, h, w, torch.full((6,), -100), torch.randn(6), torch.randn(6),
                               backend="cpp")
    assert (lp == 0).all() and (gx == 0).all() and (gw == 0).all()


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("N,H,V", [(1, 16, 7), (37, 24, 1000), (64, 8, 32000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_keep_logits_matches_float64(backend, N, H, V, dtype):
    """keep_logits=True: one GEMM forward, the logits kept and their gradient written over them; values and
    both gradients held to PyTorch's own error, as the chunked path is. A second backward through the same
    graph is refused (the logits are gone), not a wrong gradient."""
    h = (torch.randn(N, H, dtype=torch.float64)).to(dtype)
    w = (torch.randn(V, H, dtype=torch.float64) * (2.0 / H**0.5)).to(dtype)
    ids = _ids(N, V)
    g, gh = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    out = _lin_run(linear_token_logprobs, h, w, ids, g, gh, temperature=0.8, backend=backend, keep_logits=True)
    ref = _lin_run(linear_token_logprobs, h.double(), w.double(), ids, g, gh, temperature=0.8, backend="reference")
    same = _lin_run(linear_token_logprobs, h, w, ids, g, gh, temperature=0.8, backend="reference")
    for name, o, r, s in zip(("logp", "entropy", "grad_hidden", "grad_weight"), out, ref, same):
        assert_close_to_ref(o, r, s, dtype, name=f"{backend} keep {name} N={N} V={V} {dtype}", atol=atol_for(o, dtype))
    hh = h.detach().clone().requires_grad_(True)
    lp = linear_token_logprobs(hh, w, ids, backend=backend, keep_logits=True)
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="keep_logits"):
        lp.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_forward_by_vocabulary(dtype, monkeypatch):
    """The CPU forward over column chunks (lse and entropy merged across chunks), against float64,
    with an ignore_index that is a valid id in a later chunk, a row whose softmax sits almost all on
    one token, and an out-of-range id with check_ids=False (an error that names it, never a
    plausible number)."""
    import reasonrl.ops.logprobs as lp_mod
    monkeypatch.setattr(lp_mod, "VOCAB_FWD_COLS", 300)
    N, H, V = 29, 16, 1000
    h = torch.randn(N, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) * (2.0 / H**0.5)
    w[777] = h[5] * (40.0 / h[5].dot(h[5]))  # row 5: logit 40 for id 777, the others ~N(0, |h|^2 / 4): p(777) ~ 1
    ids = torch.randint(0, V, (N,))
    ids[0], ids[5], ids[7], ids[8] = 650, 777, 650, 299  # 650: the ignore_index below
    h, w = h.to(dtype), w.to(dtype)
    g, gh = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    kw = dict(temperature=1.3, ignore_index=650, chunk_bytes=N * 128 * h.element_size())
    out = _lin_run(linear_token_logprobs, h, w, ids, g, gh, backend="cpp", **kw)
    ref = _lin_run(linear_token_logprobs, h.double(), w.double(), ids, g, gh, backend="reference", **kw)
    same = _lin_run(linear_token_logprobs, h, w, ids, g, gh, backend="reference", **kw)
    for name, o, r, s in zip(("logp", "entropy", "grad_hidden", "grad_weight"), out, ref, same):
        assert_close_to_ref(o, r, s, dtype, name=f"by vocabulary: {name} {dtype}")
    assert (out[0][[0, 7]] == 0).all() and (out[1][[0, 7]] == 0).all()  # ignored rows
    assert out[1][5] < 1e-2 and float(out[0][5]) > -1e-2  # one token holds the mass
    bad = ids.clone()
    bad[3] = V + 5
    with torch.no_grad(), pytest.raises(RuntimeError, match=f"{V + 5} is out of range"):
        linear_token_logprobs(h, w, bad, check_ids=False, backend="cpp", **kw)


@pytest.mark.parametrize("devices,chunk_bytes,want", [(("cpu",), 4096, True), (("cpu",), None, False),
                                                      ((), 4096, False)])
def test_linear_forward_split_choice(devices, chunk_bytes, want, monkeypatch):
    """The column split runs only on the devices named (CPU) and only where the logits exceed one
    chunk; elsewhere (the GPU's row chunks) it is never called."""
    import reasonrl.ops.logprobs as lp_mod
    calls, orig = [], lp_mod._linear_fwd_by_vocab
    monkeypatch.setattr(lp_mod, "VOCAB_CHUNKED_FWD", devices)
    monkeypatch.setattr(lp_mod, "_linear_fwd_by_vocab", lambda *a: calls.append(1) or orig(*a))
    h, w, ids = torch.randn(37, 16), torch.randn(1000, 16), torch.randint(0, 1000, (37,))
    with torch.no_grad():
        lp = linear_token_logprobs(h, w, ids, chunk_bytes=chunk_bytes, backend="cpp")
    assert bool(calls) is want
    assert torch.allclose(lp.double(), token_logprobs_reference(h.double() @ w.double().T, ids), atol=1e-4)


@pytest.mark.parametrize("backend", cpu_backends())
def test_linear_no_grad_path(backend):
    h, w = torch.randn(37, 16), torch.randn(1000, 16) * 0.5
    ids = _ids(37, 1000)
    with torch.no_grad():
        lp = linear_token_logprobs(h, w, ids, backend=backend, chunk_bytes=4096)
    assert not lp.requires_grad
    ref = token_logprobs_reference((h.double() @ w.double().T), ids)
    assert torch.allclose(lp.double(), ref, atol=1e-4)


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    x = torch.randn(4, 10)
    ids = torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match="integer"):
        token_logprobs(x, ids.float())
    with pytest.raises(ValueError, match="shape"):
        token_logprobs(x, ids[:3])
    with pytest.raises(IndexError, match="out of range"):
        token_logprobs(x, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(IndexError, match="out of range"):
        token_logprobs(x, torch.tensor([0, 1, -5, 2]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(x, ids, temperature=0.0)
    with pytest.raises(TypeError, match="float64"):
        token_logprobs(x.double(), ids, backend="cpp")
    with pytest.raises(ValueError, match="backend must be one of"):
        token_logprobs(x, ids, backend="nope")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        token_logprobs(x, ids, backend="cuda")
    with pytest.raises(TypeError, match="share a dtype"):
        linear_token_logprobs(torch.randn(4, 8), torch.randn(10, 8).double(), ids)
    with pytest.raises(ValueError, match="weight's H"):
        linear_token_logprobs(torch.randn(4, 8), torch.randn(10, 9), ids)


@pytest.mark.gpu
def test_mixed_devices_name_the_problem():
    x, ids = torch.randn(4, 10), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="one device"):
        token_logprobs(x.cuda(), ids)


def test_auto_picks_compiled_on_cpu():
    assert _backend.resolve("auto", torch.device("cpu"), "t") == "cpp"


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("N,V", [(1, 7), (37, 1000), (2048, 32000), (64, 151936)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_gpu(backend, N, V, dtype):
    x = _logits(N, V, dtype).cuda()
    ids = _ids(N, V).cuda()
    g, gh = torch.randn(N, dtype=torch.float64).cuda(), torch.randn(N, dtype=torch.float64).cuda()
    ref = _run(token_logprobs_reference, x.double(), ids, g, gh, temperature=0.7)
    same = _run(token_logprobs_reference, x, ids, g, gh, temperature=0.7)
    for inplace in (False, True):
        out = _run(token_logprobs, x, ids, g, gh, temperature=0.7, backend=backend, inplace_backward=inplace)
        for name, o, r, s in zip(("logp", "entropy", "grad"), out, ref, same):
            assert_close_to_ref(o.cpu(), r.cpu(), s.cpu(), dtype, name=f"{backend} {name} {N}x{V} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_gpu(backend, dtype):
    N, H, V = 300, 64, 50000
    h = torch.randn(N, H, dtype=torch.float64).to(dtype).cuda()
    w = (torch.randn(V, H, dtype=torch.float64) * (2.0 / H**0.5)).to(dtype).cuda()
    ids = _ids(N, V).cuda()
    g, gh = torch.randn(N, dtype=torch.float64).cuda(), torch.randn(N, dtype=torch.float64).cuda()
    out = _lin_run(linear_token_logprobs, h, w, ids, g, gh, backend=backend, chunk_bytes=N * V)
    ref = _lin_run(linear_token_logprobs, h.double(), w.double(), ids, g, gh, backend="reference")
    same = _lin_run(linear_token_logprobs, h, w, ids, g, gh, backend="reference")
    for name, o, r, s in zip(("logp", "entropy", "grad_hidden", "grad_weight"), out, ref, same):
        assert_close_to_ref(o.cpu(), r.cpu(), s.cpu(), dtype, name=f"{backend} {name} {dtype}")
    keep = _lin_run(linear_token_logprobs, h, w, ids, g, gh, backend=backend, keep_logits=True)
    for name, o, r, s in zip(("logp", "entropy", "grad_hidden", "grad_weight"), keep, ref, same):
        assert_close_to_ref(o.cpu(), r.cpu(), s.cpu(), dtype, name=f"{backend} keep_logits {name} {dtype}")
    # five row chunks, each one's row kernel on a side stream beside the next GEMM: the no-grad path
    # gives the grad path's forward to the bit
    with torch.no_grad():
        lp, ent = linear_token_logprobs(h, w, ids, return_entropy=True, backend=backend, chunk_bytes=N * V)
    assert torch.equal(lp, out[0]) and torch.equal(ent, out[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_gemm_lse_forward_edge_cases(dtype):
    """The triton backend's forward in bf16 / fp16 as one GEMM with the log-sum-exp in its epilogue (the
    interpreter runs it for every such triton case above; here its corners): logits near +-1e4, a row whose softmax sits on one
    token, fully padded rows, an ignore_index that is a valid id, H a multiple of the K tile (no K mask)
    and not, several row chunks with a ragged last one, N = 1; an id out of range with check_ids=False
    raises, naming it."""
    import reasonrl.ops.logprobs as lp_mod
    assert "cpu" in lp_mod.GEMM_LSE_FWD  # else the cases above tested the chunked path instead
    calls, orig = [], lp_mod._linear_fwd_gemm_lse
    lp_mod._linear_fwd_gemm_lse = lambda *a: calls.append(1) or orig(*a)
    try:
        for N, H, V in ((1, 24, 7), (70, 64, 1300), (45, 40, 600)):
            h = torch.randn(N, H, dtype=torch.float64)
            w = torch.randn(V, H, dtype=torch.float64) * (2.0 / H ** 0.5)
            ids = _ids(N, V, pad_frac=0.0)
            if N > 3:
                w[V - 1] = 1e4 * h[0] / h[0].pow(2).sum()  # row 0: one logit near +1e4 in the last, ragged block
                w[1] = -1e4 * h[1] / h[1].pow(2).sum()  # row 1: one near -1e4
                ids[0], ids[1] = V - 1, 1
            h, w = h.to(dtype), w.to(dtype)
            for ignore in (-100, 650 % V):  # 650 % V: an ignore_index that is a valid id
                if N > 3:
                    ids[2] = ignore  # a padded row
                out = _lin_check("triton", h, w, ids, dtype, f"GEMM+LSE N={N} H={H} V={V}", ignore_index=ignore,
                                 temperature=0.9)
                # the same forward in row chunks of 32 (the interpreter's BLOCK_M: 70 rows -> 32, 32, 6)
                from reasonrl.kernels.logprobs import LSE_GEMM_CPU, linear_lse_fwd
                lp, lse, ent = torch.empty(N), torch.empty(N, 2), torch.empty(N)
                linear_lse_fwd(h, w, ids, 1 / 0.9, ignore, True, lp, lse, ent, part_bytes=3 * 4 * 3 * 32)
                assert torch.equal(lp, out[0]) and torch.equal(ent, out[1])
                # and its TMA kernel (tensor descriptors; H = 24, 40, 64: 16-byte row strides)
                linear_lse_fwd(h, w, ids, 1 / 0.9, ignore, True, lp, lse, ent, part_bytes=3 * 4 * 3 * 32,
                               config=dict(LSE_GEMM_CPU, TMA=True))
                torch.testing.assert_close(lp, out[0], rtol=1e-6, atol=1e-5)
                torch.testing.assert_close(ent, out[1], rtol=1e-6, atol=1e-5)
        # a fully padded batch: 0, no gradient
        lp, ent, gx, gw = _lin_run(linear_token_logprobs, h, w, torch.full((N,), -100), torch.randn(N),
                                   torch.randn(N), backend="triton")
        assert (lp == 0).all() and (ent == 0).all() and (gx == 0).all() and (gw == 0).all()
        bad = ids.clone()
        bad[N - 1] = V + 3
        with torch.no_grad(), pytest.raises(RuntimeError, match=f"{V + 3} is out of range"):
            linear_token_logprobs(h, w, bad, check_ids=False, backend="triton")
    finally:
        lp_mod._linear_fwd_gemm_lse = orig
    assert len(calls) == 8  # 3 shapes x 2 ignore indices, the padded batch, the bad id


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_lse_backward_tma_store(dtype):
    """The backward's gradient tiles stored by TMA (linear_logits_grad with a TMA config and a 16-byte
    aligned output: DZ_TMA) equal the pointer store's, with rows and columns past the output's end
    (N, Vc not multiples of the tile) dropped, not written; an output whose rows are not 16-byte
    multiples takes the pointer store inside the TMA kernel. Both against float64."""
    from reasonrl.kernels import logprobs as kl

    calls = []
    real = kl._linear_lse_tma_kernel
    N, H = 45, 40
    for Vc, aligned in ((600, True), (7, False)):
        h = torch.randn(N, H, dtype=torch.float64)
        w = torch.randn(Vc, H, dtype=torch.float64) * (2.0 / H ** 0.5)
        ids = _ids(N, Vc, pad_frac=0.2)
        keep = ids != -100
        z64 = (h.to(dtype).double() @ w.to(dtype).double().T).to(dtype).double()  # the rounded logits
        logp = z64.log_softmax(-1)
        p = logp.exp()
        lse = torch.logsumexp(z64, -1)
        ent = -(p * logp).sum(-1)
        g, gh = torch.randn(N, dtype=torch.float64) * keep, torch.randn(N, dtype=torch.float64) * keep
        m = z64.amax(-1)  # the lse as the forward keeps it: (m, log s), lse = m + log s at T = 1
        rv = torch.stack([m, lse - m, lse - m - ent, g, gh]).float().contiguous()
        onehot = torch.zeros(N, Vc, dtype=torch.float64)
        onehot[keep, ids[keep]] = 1.0
        ref = g[:, None] * (onehot - p) + gh[:, None] * p * (lse - ent - z64.T).T  # d/dz, T = 1
        outs = {}
        for tma in (True, False):
            out = torch.full((N + 3, Vc), float("nan"), dtype=dtype)[:N]  # rows past N stay NaN if untouched
            spare = torch.full((3, Vc), float("nan"), dtype=dtype)
            buf = torch.cat([out, spare])
            out = buf[:N]
            kl._linear_lse_tma_kernel = _spy(real, calls)
            try:
                kl.linear_logits_grad(h.to(dtype), w.to(dtype), out, dict(kl.LSE_GEMM_CPU, TMA=tma), ids, rv, 0,
                                      1.0, True)
            finally:
                kl._linear_lse_tma_kernel = real
            assert torch.isnan(buf[N:]).all(), "rows past N were written"
            outs[tma] = out.double()
            torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
        torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=0)
        assert calls.pop() is aligned  # DZ_TMA where the output allows it


def _spy(kernel, calls):
    """kernel[grid](...) that records whether the launch asked for the TMA store."""
    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                calls.append(bool(kw.get("DZ_TMA", False)))
                return kernel[grid](*a, **kw)
            return launch
    return Spy()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gpu tests compile and run the kernel")
def test_gemm_lse_kernel_compiles_for_hopper():
    """The GEMM + log-sum-exp kernel builds for sm_90a at issue 2's shape (N=16384, H=1536, V=151936, bf16)
    in every candidate config, forward (with and without the entropy) and the backward's recompute-and-gradient:
    wgmma, software-pipelined (TMA or cp.async) loads, shared memory within an H100/H200 SM, no register spills
    (but in the larger tiles' backward); the default config without the entropy fits two programs an SM
    (<= 128 registers, <= 113 KiB), so one's epilogue runs beside the other's GEMM. No GPU needed: a subprocess without TRITON_INTERPRET."""
    from sm90 import available, report_of
    if not available():
        pytest.skip("triton without its NVIDIA backend")
    report = report_of(__file__)
    for rep in report["configs"]:
        name = f"{rep['config']} entropy={rep['entropy']}"
        assert rep["wgmma"], f"{name}: tl.dot did not become wgmma"
        assert rep["pipelined"], f"{name}: loads are not software-pipelined"
        assert rep["shared"] <= 227 * 1024, f"{name}: {rep['shared']} bytes of shared memory"
        if rep["regs"] is not None:
            # the backward's epilogue (the gradient with the entropy's term) spills in the 128 x 256, 256 x 128
            # and 4-warp tiles: allowed there (they are forward candidates), not in the default
            if rep["entropy"] != "grad" or rep["default"]:
                assert rep["spill"] == 0, f"{name}: {rep['spill']} bytes of spill"
            if rep["default"] and rep["entropy"] is False:
                assert rep["regs"] <= 128 and rep["shared"] <= 113 * 1024, f"{name}: not two programs an SM"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", [64, 68])  # 68: no TMA (136-byte rows), a ragged K tile
def test_linear_gemm_lse_forward_gpu(dtype, H, monkeypatch):
    """The GEMM + log-sum-exp forward on the GPU (off there by default until timed): every candidate config,
    values and gradients against float64, H a multiple of the K tile and not, ragged N and V."""
    import reasonrl.kernels.logprobs as kl
    import reasonrl.ops.logprobs as lp_mod
    if _backend.why_unavailable("triton", torch.device("cuda")):
        pytest.skip(_backend.why_unavailable("triton", torch.device("cuda")))
    monkeypatch.setattr(lp_mod, "GEMM_LSE_FWD", {"cpu", "cuda"})
    N, V = 300, 50001
    h = torch.randn(N, H, dtype=torch.float64).to(dtype).cuda()
    w = (torch.randn(V, H, dtype=torch.float64) * (2.0 / H**0.5)).to(dtype).cuda()
    ids = _ids(N, V).cuda()
    g, gh = torch.randn(N, dtype=torch.float64).cuda(), torch.randn(N, dtype=torch.float64).cuda()
    ref = _lin_run(linear_token_logprobs, h.double(), w.double(), ids, g, gh, backend="reference", temperature=0.9)
    same = _lin_run(linear_token_logprobs, h, w, ids, g, gh, backend="reference", temperature=0.9)
    for cfg in kl.LSE_GEMM_CANDIDATES:
        monkeypatch.setattr(kl, "LSE_GEMM_GPU", cfg)
        out = _lin_run(linear_token_logprobs, h, w, ids, g, gh, backend="triton", temperature=0.9)
        for name, o, r, s in zip(("logp", "entropy", "grad_hidden", "grad_weight"), out, ref, same):
            assert_close_to_ref(o.cpu(), r.cpu(), s.cpu(), dtype, name=f"GEMM+LSE {cfg} {name} {dtype} H={H}",
                                atol=atol_for(o, dtype))
        with torch.no_grad():  # the no-grad path is the grad path's forward, to the bit
            lp, ent = linear_token_logprobs(h, w, ids, 0.9, return_entropy=True, backend="triton")
        assert torch.equal(lp, out[0]) and torch.equal(ent, out[1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "gemm_lse"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_extreme_logits_gpu(backend, dtype, monkeypatch):
    """Logits near +-1e4 with a token at p ~ 1 on the GPU: the backward's recomputed logits must be the ones the
    forward's lse came from (a last-bit difference moves p by exp(ulp)); the chunked paths' forward and backward
    GEMMs are cuBLAS calls of different shapes, the GEMM+LSE path recomputes with its own kernel."""
    if backend == "gemm_lse":
        monkeypatch.setattr("reasonrl.ops.logprobs.GEMM_LSE_FWD", {"cpu", "cuda"})
        backend = "triton"
    dev = _cuda_for(backend)
    N, H, V = 257, 64, 30011
    h = torch.randn(N, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) * (2.0 / H ** 0.5)
    for r in range(0, N - 1, 16):  # every 16th row: one logit near +1e4 (p ~ 1), another near -1e4
        w[(r * 7919) % V] = 1e4 * h[r] / h[r].pow(2).sum()
        w[(r * 104729 + 1) % V] = -1e4 * h[r + 1] / h[r + 1].pow(2).sum()
    h, w = h.to(dtype), w.to(dtype)
    ids = _ids(N, V)
    g, gh = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    kw = dict(temperature=0.9, chunk_bytes=N * 4096 * 2)  # several row and column chunks
    out = _lin_run(linear_token_logprobs, h.to(dev), w.to(dev), ids.to(dev), g.to(dev), gh.to(dev), backend=backend,
                   **kw)
    ref = _lin_run(linear_token_logprobs, h.double(), w.double(), ids, g, gh, backend="reference", temperature=0.9)
    same = _lin_run(linear_token_logprobs, h, w, ids, g, gh, backend="reference", temperature=0.9)
    for name, o, r, s in zip(("logp", "entropy", "grad_hidden", "grad_weight"), out, ref, same):
        assert_close_to_ref(o.cpu(), r, s, dtype, name=f"{backend} extreme {name} {dtype}", atol=atol_for(o, dtype))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_masked_vocabulary_entropy_and_grad_are_finite(backend):
    """-inf logits (a masked vocabulary) hold p = 0 and add nothing to the entropy (not 0 * -inf = NaN);
    the result equals the float64 op on the unmasked columns alone, the masked columns get zero grad."""
    N, V = 6, 12
    x = _logits(N, V, torch.float64)
    keep_cols = torch.randperm(V)[:7].sort().values
    masked = torch.ones(V, dtype=torch.bool)
    masked[keep_cols] = False
    x[:, masked] = float("-inf")
    sub_ids = torch.randint(0, keep_cols.numel(), (N,))
    sub_ids[0] = -100
    ids = torch.where(sub_ids >= 0, keep_cols[sub_ids.clamp(min=0)], sub_ids)
    g, gh = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    lp, ent, gx = _run(token_logprobs, x.float(), ids, g, gh, temperature=0.9, backend=backend)
    ref = _run(token_logprobs_reference, x[:, keep_cols], sub_ids, g, gh, temperature=0.9)
    assert torch.isfinite(ent).all() and torch.isfinite(gx).all()
    torch.testing.assert_close(lp.double(), ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx[:, keep_cols].double(), ref[2], rtol=1e-5, atol=1e-5)
    assert (gx[:, masked] == 0).all()


def _check_masked_first_tiles(backend, device, V, masked):
    N = 3
    x = _logits(N, V, torch.float64)
    x[:, :masked] = float("-inf")
    ids = masked + torch.randint(0, V - masked, (N,))
    g, gh = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    lp, ent, gx = _run(token_logprobs, x.float().to(device), ids.to(device), g.to(device), gh.to(device),
                       backend=backend)
    ref = _run(token_logprobs_reference, x[:, masked:], ids - masked, g, gh)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(gx).all()
    torch.testing.assert_close(lp.cpu().double(), ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.cpu().double(), ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx[:, masked:].cpu().double(), ref[2], rtol=1e-5, atol=1e-5)
    assert (gx[:, :masked] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_masked_first_tiles(backend):
    """A row whose whole first tile of the vocabulary is -inf (Triton's tile: 16384 columns under the
    interpreter, 4096 on GPU): the online max starts at -inf and must not turn the sums into NaN."""
    if backend != "reference" and backend not in cpu_backends():
        pytest.skip(f"{backend} not available on CPU here")
    _check_masked_first_tiles(backend, "cpu", 16384 + 300, 16384)


def _cuda_for(backend):
    """The CUDA device, or a skip naming why the backend cannot run there."""
    dev = torch.device("cuda")
    why = _backend.why_unavailable(backend, dev)
    if why is not None:
        pytest.skip(why)
    return dev


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_masked_first_tiles_gpu(backend):
    _check_masked_first_tiles(backend, _cuda_for(backend), 3 * 4096 + 300, 2 * 4096 + 7)


def _check_unchecked_ids_stay_in_row(backend, dev):
    """check_ids=False with an id outside [0, V) (grpo_loss checks the range after its kernels are
    enqueued): that row's log-prob is NaN, the others are right, and nothing is read outside a row
    (the bad ids sit on the last row, whose row + id would pass the buffer's end)."""
    N, V = 5, 300
    x = torch.randn(N, V, device=dev)
    ids = torch.randint(0, V, (N,), device=dev)
    good = token_logprobs(x, ids, backend=backend)
    for bad in (V, V + 10**6, -3):
        ids_bad = ids.clone()
        ids_bad[N - 1] = bad
        with torch.no_grad():
            out = token_logprobs(x, ids_bad, check_ids=False, backend=backend)
        assert torch.isnan(out[N - 1]), (bad, out)
        torch.testing.assert_close(out[: N - 1], good[: N - 1].detach())


@pytest.mark.parametrize("backend", ["triton"])
def test_unchecked_ids_stay_in_row(backend):
    if backend not in cpu_backends() or _backend.why_unavailable(backend, torch.device("cpu")):
        pytest.skip(f"{backend} not available on CPU here")
    _check_unchecked_ids_stay_in_row(backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_unchecked_ids_stay_in_row_gpu(backend):
    _check_unchecked_ids_stay_in_row(backend, _cuda_for(backend))


def test_inplace_backward_refuses_rows_that_share_memory():
    x = torch.randn(1, 50).expand(4, 50)
    with pytest.raises(ValueError, match="inplace_backward writes the gradient over the logits"):
        token_logprobs(x, torch.randint(0, 50, (4,)), inplace_backward=True, backend="auto")
    overlapping = torch.randn(200).as_strided((4, 50), (40, 1))
    with pytest.raises(ValueError, match="rows share memory"):
        token_logprobs(overlapping, torch.randint(0, 50, (4,)), inplace_backward=True)
    token_logprobs(torch.randn(4, 50), torch.randint(0, 50, (4,)), inplace_backward=True)  # fine


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), -1.0, 0.0, 5e-324, 1e-39, 1e-6, True, "1.0"])
def test_temperature_must_be_finite_and_positive(backend, temperature):
    """1e-39 passed (1 / t is finite in float64) and every backend returned NaN (inf in float32)."""
    x, ids = torch.randn(4, 10), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(x, ids, temperature, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        linear_token_logprobs(torch.randn(4, 8), torch.randn(10, 8), ids, temperature, backend=backend)


@pytest.mark.parametrize("backend", ["reference"] + cpu_backends())
@pytest.mark.parametrize("grad", [False, True])
def test_linear_empty_batch(backend, grad):
    """N = 0 rows: empty results (and empty / zero gradients), as the reference gives."""
    h = torch.randn(0, 8, requires_grad=grad)
    w = torch.randn(10, 8, requires_grad=grad)
    lp, ent = linear_token_logprobs(h, w, torch.zeros(0, dtype=torch.long), return_entropy=True, backend=backend)
    assert lp.shape == (0,) and ent.shape == (0,) and lp.dtype == torch.float32
    if grad:
        (lp.sum() + ent.sum()).backward()
        assert h.grad.shape == (0, 8) and (w.grad == 0).all()
    lp2 = linear_token_logprobs(torch.randn(2, 0, 8), w, torch.zeros(2, 0, dtype=torch.long), backend=backend)
    assert lp2.shape == (2, 0)


def test_argument_types_are_named():
    x, ids = torch.randn(4, 10), torch.randint(0, 10, (4,))
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(TypeError, match="ids must be a torch.Tensor, got list"):
        token_logprobs(x, ids.tolist())
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor, got list"):
        linear_token_logprobs(h.tolist(), w, ids)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        linear_token_logprobs(h, w.tolist(), ids)
    with pytest.raises(TypeError, match="ids must be a torch.Tensor, got list"):
        linear_token_logprobs(h, w, ids.tolist())
    with pytest.raises(TypeError, match=r"ids must be an integer tensor of dtype int64, int32, int16 or uint8, "
                                        r"got torch.int8"):
        token_logprobs(x, ids.to(torch.int8))
    for backend in ("reference", "cpp"):
        with pytest.raises(ValueError, match="weight has an empty vocabulary"):
            linear_token_logprobs(h, w[:0], torch.full((4,), -100), backend=backend)


def test_the_tolerance_catches_a_kernel_that_computes_in_bf16():
    """atol_for: the output's dtype where it is wider than the input's: float32 log-probs of bf16 logits
    computed in bf16 (about 5e4 x PyTorch's error) passed the bf16 input's atol before."""
    x = _logits(37, 1000, torch.bfloat16)
    ids = _ids(37, 1000, pad_frac=0.0)
    ref64 = token_logprobs_reference(x.double(), ids)
    same = token_logprobs_reference(x, ids)
    sloppy = x.log_softmax(-1).gather(1, ids[:, None]).squeeze(1).float()  # log_softmax in bf16
    with pytest.raises(AssertionError, match="max err"):
        assert_close_to_ref(sloppy, ref64, same, torch.bfloat16, "bf16 log_softmax", atol=atol_for(sloppy, x.dtype))
    out = token_logprobs(x, ids, backend="cpp")
    assert_close_to_ref(out, ref64, same, torch.bfloat16, "cpp", atol=atol_for(out, x.dtype))


def test_linear_errors_name_hidden():
    with pytest.raises(ValueError, match="hidden's leading shape"):
        linear_token_logprobs(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"empty hidden dimension \(H = 0\)"):
        linear_token_logprobs(torch.randn(4, 0), torch.randn(10, 0), torch.zeros(4, dtype=torch.long))


if __name__ == "__main__":  # the subprocess of test_gemm_lse_kernel_compiles_for_hopper
    import json

    from sm90 import compile_sm90, ptxas_usage

    from reasonrl.kernels import logprobs as kl
    N, H, V = 16384, 1536, 151936
    out = []
    for cfg in kl.LSE_GEMM_CANDIDATES:
        for ent in (False, True, "grad"):  # "grad": the backward's recompute (linear_logits_grad, with entropy)
            c = dict(cfg)
            opts = dict(num_warps=c.pop("num_warps"), num_stages=c.pop("num_stages"))
            tma = c.pop("TMA")
            nb = -(-V // c["BLOCK_N"])
            cex = dict(WITH_ENT=ent is not False, UPCAST=False, PREC="tf32", RNE_BITS=False, GRAD=ent == "grad", **c)
            if tma and ent == "grad":  # the launch at this shape: the gradient tile stored by TMA
                cex["DZ_TMA"] = True
            elif tma:
                cex.update(dz_desc=None, DZ_TMA=False)  # as the launcher binds the defaults
            if tma:  # descriptor arguments: compiled directly (sm90.compile_sm90 knows pointers and scalars)
                import triton
                from triton.backends.compiler import GPUTarget
                from triton.compiler import ASTSource
                fn = kl._linear_lse_tma_kernel
                sig = dict(h_desc=f"tensordesc<bf16[{c['BLOCK_M']}, {c['BLOCK_K']}]>",
                           w_desc=f"tensordesc<bf16[{c['BLOCK_N']}, {c['BLOCK_K']}]>",
                           PART="*bf16" if ent == "grad" else "*fp32", N="i32",
                           V="i32", HD="i32", scale2="fp32", stride_pc="i32", stride_pn="i32", IDS="*i64",
                           RV="*fp32", vocab_start="i32",
                           **({"dz_desc": f"tensordesc<bf16[{c['BLOCK_M']}, {c['BLOCK_N']}]>"} if ent == "grad" else {}),
                           **{name: "constexpr" for name in cex})
                sig = {name: sig[name] for name in fn.arg_names if name in sig}  # in the kernel's order
                k = triton.compile(ASTSource(fn, sig, cex, attrs={(fn.arg_names.index("PART"),): [["tt.divisibility", 16]]}),
                                   target=GPUTarget("cuda", 90, 32), options=opts)
            else:
                k = compile_sm90(kl._linear_lse_kernel,
                                 dict(HID="*bf16", W="*bf16", PART="*bf16" if ent == "grad" else "*fp32",
                                      IDS="*i64", RV="*fp32"),
                                 dict(N=N, V=V, HD=H, scale2=1.4, stride_hn=H, stride_wv=H, stride_pc=N * nb,
                                      stride_pn=nb, vocab_start=12345), dict(EVEN_K=True, **cex), opts)
            ttgir = k.asm["ttgir"]
            regs, spill = ptxas_usage(k)
            loads = "async_tma_copy_global_to_local" if tma else "async_copy_global_to_local"
            out.append(dict(config=cfg, entropy=ent, default=cfg is kl.LSE_GEMM_GPU, wgmma="warp_group_dot" in ttgir,
                            pipelined=loads in ttgir, shared=k.metadata.shared, regs=regs, spill=spill))
    print(json.dumps({"configs": out}))


# ---- found by an audit (2026-11-29) -------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_ignored_rows_with_nan_or_minus_inf_logits_give_zero_gradient(bad):
    """A padded row's logits can be NaN (a fully masked attention row) or all -inf: the reference gave NaN
    gradients there (0 * NaN through the log-softmax's backward), the C++ backend 0."""
    ids = torch.tensor([1, -100, 3])
    for backend in ["reference"] + cpu_backends():
        x = torch.randn(3, 5)
        x[1] = bad
        x.requires_grad_(True)
        logp, ent = token_logprobs(x, ids, return_entropy=True, backend=backend)
        (logp.sum() + ent.sum()).backward()
        assert logp[1] == 0 and ent[1] == 0 and torch.isfinite(x.grad).all() and (x.grad[1] == 0).all(), backend
    h, w = torch.randn(3, 4), torch.randn(5, 4, requires_grad=True)
    h[1] = float("nan")
    linear_token_logprobs(h, w, ids, backend="reference").sum().backward()
    assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("backend", cpu_backends())
def test_double_backward_is_an_error_not_a_dropped_term(backend):
    """create_graph=True returned a gradient with no grad_fn: a second-order term vanished silently."""
    x = torch.randn(3, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward .create_graph=True. is not supported"):
        torch.autograd.grad(token_logprobs(x, torch.tensor([0, 2, 5]), backend=backend).sum(), x, create_graph=True)
    h, w = torch.randn(3, 4, requires_grad=True), torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(linear_token_logprobs(h, w, torch.tensor([0, 2, 5]), backend=backend).sum(), h,
                            create_graph=True)
    g, = torch.autograd.grad(token_logprobs(x, torch.tensor([0, 2, 5]), backend="reference").sum(), x,
                             create_graph=True)
    assert g.grad_fn is not None  # the reference traces its gradient


@pytest.mark.parametrize("backend", cpu_backends())
def test_entropy_with_leading_tiles_masked_at_finfo_min(backend):
    """Rows whose first tiles are masked with finfo(float32).min (a constrained vocabulary) and the rest
    ordinary: the running entropy term was rescaled by exp(dm) = 0 times dm * s = -inf, NaN in Triton
    (and CUDA, by reading) for the whole row (2026-11-30). 3 tiles of the interpreter's 16384 columns."""
    V = 60000
    x = torch.randn(3, V, dtype=torch.float64) * 3
    x[:, :49152] = torch.finfo(torch.float32).min
    x[2, :] = torch.finfo(torch.float32).min  # one row masked everywhere but its last column
    x[2, -1] = 1.0
    ids = torch.tensor([V - 1, V - 7, V - 1])
    _check(backend, x.float(), ids, temperature=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_with_leading_tiles_masked_at_finfo_min_gpu(backend, temperature):
    """The CUDA part of the finfo.min fix (absorb/merge) was checked by reading and a CPU port only; 12 of
    the GPU Triton kernel's 4096-column tiles masked."""
    dev = _cuda_for(backend)
    V = 60000
    x = torch.randn(3, V, dtype=torch.float64) * 3
    x[:, :49152] = torch.finfo(torch.float32).min
    x[2, :] = torch.finfo(torch.float32).min
    x[2, -1] = 1.0
    _check(backend, x.float(), torch.tensor([V - 1, V - 7, V - 1]), temperature=temperature, device=dev)
