"""The compiled (C++ CPU) log-prob kernels called directly: torch.ops.reasonrl.logprob_fwd / _bwd.

What tests/test_logprobs.py (every backend through the public op) does not reach: each compiled
instruction-set path (AVX-512, AVX2, SSE2), in-place backward, vocab_start (vocab chunks), strided
rows on both sides, thread-count independence, special values, and the glue's error messages.
"""
import pytest
import torch

from cpu_isa import forced_isa, runnable_isas
from tolerance import assert_close_to_ref

C = pytest.importorskip("reasonrl._C")
ops = torch.ops.reasonrl
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IGNORE = -100


@pytest.fixture(params=runnable_isas())
def isa(request):
    with forced_isa(request.param):
        yield request.param


def entropy(logz):
    """-sum p log p with 0 log 0 = 0 (masked -inf logits), NaN-free gradients."""
    finite = torch.where(logz.isinf(), torch.zeros_like(logz), logz)
    return -(logz.exp() * finite).sum(-1)


def reference(x, ids, T, gl, ge, vocab_start=0):
    """float64 autograd: (logp, lse, entropy, grad) of sum(gl * logp + ge * entropy)."""
    x64 = x.detach().double().requires_grad_()
    z = x64 / T
    lse = z.logsumexp(-1)
    keep = ids != IGNORE
    logz = z - lse[:, None]
    logp = logz.gather(1, ids.clamp(min=0)[:, None])[:, 0] * keep
    ent = entropy(logz) * keep
    (logp * gl.double() + ent * ge.double()).sum().backward()
    return logp.detach(), lse.detach(), ent.detach(), x64.grad


def same_dtype(x, ids, T, gl, ge):
    """What PyTorch itself gets with float32 math, rounded to the kernel's output dtypes."""
    x32 = x.detach().float().requires_grad_()
    z = x32 / T
    logz = torch.log_softmax(z, -1)
    keep = ids != IGNORE
    logp = logz.gather(1, ids.clamp(min=0)[:, None])[:, 0] * keep
    ent = entropy(logz) * keep
    (logp * gl + ent * ge).sum().backward()
    return logp.detach(), z.logsumexp(-1).detach(), ent.detach(), x32.grad.to(x.dtype)


def make(N, V, dtype, scale=3.0, pad=0):
    """Logits with row stride V + pad (pad > 0: not contiguous), ids with some ignored rows."""
    base = torch.randn(N, V + pad) * scale
    x = base.to(dtype)[:, :V] if pad else base.to(dtype)
    ids = torch.randint(0, V, (N,))
    if N > 2:
        ids[torch.randperm(N)[: N // 4]] = IGNORE
    return x, ids


def lse_value(lse, T):
    """The log-sum-exp of z = x / T from the kernels' two floats per row (m, log s): m / T + log s,
    in float64 (the point of two floats: one float32 rounds it by 5e-4 near 1e4)."""
    assert lse.dtype == torch.float32 and lse.dim() == 2 and lse.shape[1] == 2, lse.shape
    return lse[:, 0].double() / T + lse[:, 1].double()


def run(x, ids, T, gl, ge, ent=True, grad=None, vocab_start=0):
    logp, lse, e = ops.logprob_fwd(x, ids, T, IGNORE, ent)
    if grad is None:
        grad = torch.full_like(x, float("nan"))  # poison: every element must be written
    ops.logprob_bwd(x, ids, lse, e if ent else None, gl, ge if ent else None, T, IGNORE, vocab_start, grad)
    return logp, lse, e, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [7, 1000, 32000])
def test_matches_float64_reference(isa, dtype, V):
    N, T = 37, 0.7
    x, ids = make(N, V, dtype, pad=5)
    gl, ge = torch.randn(N), torch.randn(N)
    logp, lse, ent, grad = run(x, ids, T, gl, ge)
    r = reference(x, ids, T, gl, ge)
    s = same_dtype(x, ids, T, gl, ge)
    assert lse.dtype == torch.float32
    for name, out, ref, ref_s in zip(("logp", "lse", "entropy"), (logp, lse_value(lse, T), ent), r, s):
        assert_close_to_ref(out, ref, ref_s, torch.float32, f"{isa} {dtype} V={V} {name}")
    assert grad.dtype == dtype
    assert_close_to_ref(grad, r[3], s[3], dtype, f"{isa} {dtype} V={V} grad")
    assert (grad[ids == IGNORE] == 0).all()
    assert (logp[ids == IGNORE] == 0).all() and (ent[ids == IGNORE] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_qwen_vocab(dtype):
    N, V, T = 4, 151936, 1.0
    x, ids = make(N, V, dtype, pad=3)
    gl, ge = torch.randn(N), torch.randn(N)
    out = list(run(x, ids, T, gl, ge))
    out[1] = lse_value(out[1], T)
    r = reference(x, ids, T, gl, ge)
    s = same_dtype(x, ids, T, gl, ge)
    for name, o, ref, ref_s, dt in zip(("logp", "lse", "entropy", "grad"), out, r, s,
                                      (torch.float32,) * 3 + (dtype,)):
        assert_close_to_ref(o, ref, ref_s, dt, f"{dtype} V={V} {name}")


def test_opcheck():
    """Schema, fake (Meta) kernels and aliasing as torch.compile sees them."""
    x, ids = make(5, 33, torch.bfloat16)
    g = torch.randn(5)
    torch.library.opcheck(ops.logprob_fwd.default, (x, ids, 0.9, IGNORE, True))
    torch.library.opcheck(ops.logprob_fwd.default, (x, ids, 0.9, IGNORE, False))
    logp, lse, e = ops.logprob_fwd(x, ids, 0.9, IGNORE, True)
    torch.library.opcheck(ops.logprob_bwd.default, (x, ids, lse, e, g, g, 0.9, IGNORE, 0, torch.empty_like(x)))
    torch.library.opcheck(ops.logprob_bwd.default, (x, ids, lse, None, g, None, 0.9, IGNORE, 0, torch.empty_like(x)))


def test_without_entropy_and_entropy_grad_only(isa):
    N, V, T = 20, 513, 1.3
    x, ids = make(N, V, torch.float32)
    gl, ge = torch.randn(N), torch.zeros(N)
    logp, lse, e, grad = run(x, ids, T, gl, ge, ent=False)
    assert e.shape == (0,)
    r = reference(x, ids, T, gl, ge)
    s = same_dtype(x, ids, T, gl, ge)
    assert_close_to_ref(logp, r[0], s[0], torch.float32, "logp")
    assert_close_to_ref(grad, r[3], s[3], torch.float32, "grad")
    # entropy gradient alone: no one-hot term
    gl, ge = torch.zeros(N), torch.randn(N)
    _, _, _, grad = run(x, ids, T, gl, ge)
    r = reference(x, ids, T, gl, ge)
    s = same_dtype(x, ids, T, gl, ge)
    assert_close_to_ref(grad, r[3], s[3], torch.float32, "entropy-only grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_isa_paths_agree(dtype):
    """Every compiled path gives (nearly) the answer of the best one: they differ only in summation order."""
    x, ids = make(9, 4099, dtype)
    gl, ge = torch.randn(9), torch.randn(9)
    outs = {}
    for name in runnable_isas():
        with forced_isa(name):
            outs[name] = run(x, ids, 0.9, gl, ge)
    first = next(iter(outs.values()))
    for name, out in outs.items():
        for a, b in zip(out, first):  # default tolerances of each dtype: about one rounding apart
            torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_equals_out_of_place(isa, dtype):
    N, V, T = 23, 3001, 0.8
    x, ids = make(N, V, dtype)
    gl, ge = torch.randn(N), torch.randn(N)
    logp, lse, ent, grad = run(x, ids, T, gl, ge)
    buf = x.clone()
    ops.logprob_bwd(buf, ids, lse, ent, gl, ge, T, IGNORE, 0, buf)  # grad_logits is logits itself
    torch.testing.assert_close(buf, grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vocab_chunks(dtype):
    """Backward over column chunks with vocab_start equals the full-row backward, bit for bit."""
    N, V, T = 17, 1000, 1.0
    x, ids = make(N, V, dtype)
    ids[0], ids[1] = 0, V - 1  # targets on the chunk edges
    gl, ge = torch.randn(N), torch.randn(N)
    logp, lse, ent, full = run(x, ids, T, gl, ge)
    parts = []
    for lo, hi in ((0, 1), (1, 333), (333, 999), (999, V)):
        g = torch.full((N, hi - lo), float("nan"), dtype=dtype)
        ops.logprob_bwd(x[:, lo:hi], ids, lse, ent, gl, ge, T, IGNORE, lo, g)
        parts.append(g)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=0)


def test_strided_rows_both_sides():
    N, V = 11, 777
    big = torch.randn(N, V + 64)
    x = big[:, 30:30 + V]  # row stride V + 64, offset start
    ids = torch.randint(0, V, (N,))
    gl, ge = torch.randn(N), torch.randn(N)
    gbig = torch.full((N, V + 9), 7.0)
    g = gbig[:, 4:4 + V]
    logp, lse, ent, g = run(x, ids, 1.0, gl, ge, grad=g)
    _, _, _, ref = run(x.contiguous(), ids, 1.0, gl, ge)
    torch.testing.assert_close(g, ref, rtol=0, atol=0)
    assert (gbig[:, :4] == 7).all() and (gbig[:, 4 + V:] == 7).all(), "wrote outside grad_logits"
    # expanded (stride-0) per-row gradients, as autograd hands them in for logp.sum()
    _, _, _, g1 = run(x, ids, 1.0, torch.ones(1).expand(N), torch.zeros(1).expand(N))
    _, _, _, g2 = run(x, ids, 1.0, torch.ones(N), torch.zeros(N))
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_thread_count_does_not_change_results():
    x, ids = make(64, 5000, torch.bfloat16)
    gl, ge = torch.randn(64), torch.randn(64)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(x, ids, 1.0, gl, ge)
    finally:
        torch.set_num_threads(n)
    for a, b in zip(one, run(x, ids, 1.0, gl, ge)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_special_values(isa):
    N, V = 6, 300
    x = torch.randn(N, V) * 2
    x[:, 100:200] = float("-inf")  # masked vocabulary
    x[1] = x[1] * 1e4  # spread +-1e4: one-hot softmax, or (top two within ~8) a 5e4-magnitude row
    x[1, x[1].argmax()] += 100.0
    x[2] = torch.where(x[2].isinf(), x[2], 1e4 + x[2])  # all near 1e4
    x[3] = torch.where(x[3].isinf(), x[3], -1e4 + x[3])  # all near -1e4
    ids = torch.randint(0, 100, (N,))
    ids[4] = IGNORE
    gl, ge = torch.randn(N), torch.randn(N)
    logp, lse, ent, grad = run(x, ids, 1.0, gl, ge)
    r = reference(x, ids, 1.0, gl, ge)
    s = same_dtype(x, ids, 1.0, gl, ge)
    for name, out, ref, ref_s in zip(("logp", "lse", "entropy"), (logp, lse_value(lse, 1.0), ent), r, s):
        assert_close_to_ref(out, ref, ref_s, torch.float32, name)
    assert (grad[:, 100:200] == 0).all()
    # Rows near +-1e4 too, at PyTorch's own error: p = exp((x - m) - log s), not exp(z - lse) with a
    # float32 lse, whose ulp of 1e-3 there gave every p ~1e-3 relative error before (2026-11-30).
    for row in range(N):
        assert_close_to_ref(grad[row], r[3][row], s[3][row], torch.float32, f"grad row {row}")
    # a NaN logit poisons its row, never silently
    x[5, 7] = float("nan")
    logp, lse, ent, grad = run(x, ids, 1.0, gl, ge)
    lse = lse_value(lse, 1.0)
    assert lse[5].isnan() and logp[5].isnan() and ent[5].isnan()
    assert torch.isfinite(lse[:5]).all()


def test_tiny_shapes():
    for N, V in ((1, 1), (1, 7), (3, 1)):
        x = torch.randn(N, V)
        ids = torch.zeros(N, dtype=torch.long)
        gl, ge = torch.randn(N), torch.randn(N)
        logp, lse, ent, grad = run(x, ids, 1.0, gl, ge)
        r = reference(x, ids, 1.0, gl, ge)
        for out, ref in zip((logp, lse_value(lse, 1.0), ent, grad), r):
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    logp, lse, ent = ops.logprob_fwd(torch.randn(0, 5), torch.zeros(0, dtype=torch.long), 1.0, IGNORE, True)
    assert logp.shape == ent.shape == (0,) and lse.shape == (0, 2)


def test_meta_shapes():
    x = torch.empty(5, 11, device="meta", dtype=torch.bfloat16)
    ids = torch.empty(5, device="meta", dtype=torch.long)
    logp, lse, ent = ops.logprob_fwd(x, ids, 1.0, IGNORE, False)
    assert logp.shape == (5,) and lse.shape == (5, 2) and ent.shape == (0,) and logp.dtype == torch.float32


def _args(N=4, V=10):
    x = torch.randn(N, V)
    ids = torch.randint(0, V, (N,))
    lse = torch.zeros(N, 2)
    return x, ids, lse, torch.zeros(N), torch.ones(N), torch.ones(N), torch.empty(N, V)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {"x": a["x"][0]}, "logits must be 2-D"),
        (lambda a: {"x": a["x"].double()}, "logits must be float32, bfloat16 or float16"),
        (lambda a: {"x": a["x"].t().contiguous().t()}, "contiguous last dim"),
        (lambda a: {"x": a["x"][:, :0]}, "at least one column"),
        (lambda a: {"ids": a["ids"].int()}, "ids must be Long"),
        (lambda a: {"ids": a["ids"][:3]}, r"ids must have shape \(N,\)"),
        (lambda a: {"ids": torch.tensor([0, 1, 10, 2])}, r"ids\[2\] = 10 is out of range \[0, 10\)"),
        (lambda a: {"ids": torch.tensor([0, -1, 3, 2])}, r"ids\[1\] = -1 is out of range"),
        (lambda a: {"T": 0.0}, "temperature must be a finite number >= 1e-05"),
        (lambda a: {"T": float("inf")}, "temperature"),
    ],
)
def test_fwd_errors_name_the_argument(change, match):
    x, ids, *_ = _args()
    a = {"x": x, "ids": ids, "T": 1.0}
    a.update(change(a))
    with pytest.raises(RuntimeError, match=match):
        ops.logprob_fwd(a["x"], a["ids"], a["T"], IGNORE, True)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {"g": torch.empty(4, 11)}, "grad_logits must have the shape of logits"),
        (lambda a: {"g": torch.empty(4, 10, dtype=torch.bfloat16)}, "grad_logits must have the dtype"),
        (lambda a: {"g": torch.empty(10, 4).t()}, "grad_logits must have a contiguous last dim"),
        (lambda a: {"g": torch.empty(1, 10).expand(4, 10)}, "grad_logits has elements that share memory"),
        (lambda a: {"g": torch.empty(40).as_strided((4, 10), (9, 1))}, "grad_logits has elements that share memory"),
        (lambda a: {"lse": a["lse"][:2]}, r"lse must have shape \(N, 2\) = \(4, 2\)"),
        (lambda a: {"lse": a["lse"][:, 0]}, r"lse must have shape \(N, 2\)"),  # a pre-2026-11-30 (N,) lse
        (lambda a: {"lse": a["lse"].double()}, "lse must be Float"),
        (lambda a: {"gl": a["gl"].half()}, "grad_logp must be Float"),
        (lambda a: {"ent": None}, "grad_entropy was given but entropy is None"),
        (lambda a: {"ge": a["ge"][:1]}, r"grad_entropy must have shape \(N,\)"),
        (lambda a: {"vs": -1}, "vocab_start must be >= 0"),
        (lambda a: {"T": -1.0}, "temperature must be a finite number >= 1e-05"),
    ],
)
def test_bwd_errors_name_the_argument(change, match):
    x, ids, lse, ent, gl, ge, g = _args()
    a = {"x": x, "ids": ids, "lse": lse, "ent": ent, "gl": gl, "ge": ge, "g": g, "T": 1.0, "vs": 0}
    a.update(change(a))
    with pytest.raises(RuntimeError, match=match):
        ops.logprob_bwd(a["x"], a["ids"], a["lse"], a["ent"], a["gl"], a["ge"], a["T"], IGNORE, a["vs"], a["g"])


def test_bwd_partial_overlap_is_refused():
    buf = torch.randn(4, 11)
    x, g = buf[:, :10], buf[:, 1:]
    ids, lse = torch.randint(0, 10, (4,)), torch.zeros(4, 2)
    with pytest.raises(RuntimeError, match="grad_logits overlaps logits without being logits itself"):
        ops.logprob_bwd(x, ids, lse, None, torch.ones(4), None, 1.0, IGNORE, 0, g)


def test_isa_switch_errors():
    with pytest.raises(ValueError, match="isa must be"):
        ops.logprob_cpu_isa("avx9000")
    assert ops.logprob_cpu_isa("") in ("x86-64", "x86-64-v3", "x86-64-v4", "generic")


# ---- CUDA kernels (csrc/cuda/logprob.cu) through the same ops ----------------------------------------
def _cuda_built():
    return bool(C.built_with_cuda())


def make_cuda(N, V, dtype, scale=3.0, pad=0, offset=0):
    """Like make(), on the GPU; offset shifts each row's start off the 16-byte grid."""
    base = (torch.randn(N, V + pad + offset, device="cuda") * scale).to(dtype)
    x = base[:, offset:offset + V]
    ids = torch.randint(0, V, (N,), device="cuda")
    if N > 2:
        ids[torch.randperm(N, device="cuda")[: N // 4]] = IGNORE
    return x, ids


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, V, pad, offset", [(37, 7, 0, 0), (37, 1000, 3, 1), (37, 32000, 0, 0),
                                               (5, 32000, 8, 3), (8, 151936, 0, 0), (1, 151936, 0, 5),
                                               (2048, 1000, 0, 0)])
def test_cuda_matches_float64_reference(dtype, N, V, pad, offset):
    if not _cuda_built():
        pytest.skip("reasonrl._C built without CUDA")
    T = 0.7
    x, ids = make_cuda(N, V, dtype, pad=pad, offset=offset)
    gl, ge = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
    logp, lse, ent, grad = run(x, ids, T, gl, ge)
    r = reference(x, ids, T, gl, ge)
    s = same_dtype(x, ids, T, gl, ge)
    for name, out, ref, ref_s in zip(("logp", "lse", "entropy"), (logp, lse_value(lse, T), ent), r, s):
        assert_close_to_ref(out, ref, ref_s, torch.float32, f"cuda {dtype} V={V} {name}")
    assert_close_to_ref(grad, r[3], s[3], dtype, f"cuda {dtype} V={V} grad")
    assert (grad[ids == IGNORE] == 0).all()
    # the C++ CPU kernels agree
    cpu = run(x.cpu(), ids.cpu(), T, gl.cpu(), ge.cpu())
    for a, b in zip((logp, lse, ent, grad), cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4 if a.dtype == torch.float32 else None,
                                   atol=1e-4 if a.dtype == torch.float32 else None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_inplace_chunks_and_mixed_alignment(dtype):
    if not _cuda_built():
        pytest.skip("reasonrl._C built without CUDA")
    N, V, T = 19, 5003, 1.1
    x, ids = make_cuda(N, V, dtype, pad=1)
    ids[0], ids[1] = 0, V - 1
    gl, ge = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
    logp, lse, ent, full = run(x, ids, T, gl, ge)
    buf = x.clone()
    ops.logprob_bwd(buf, ids, lse, ent, gl, ge, T, IGNORE, 0, buf)  # in place
    torch.testing.assert_close(buf, full, rtol=0, atol=0)
    parts = []
    for lo, hi in ((0, 3), (3, 2050), (2050, 4999), (4999, V)):  # odd chunk starts: scalar heads
        g = torch.full((N, hi - lo), float("nan"), device="cuda", dtype=dtype)
        ops.logprob_bwd(x[:, lo:hi], ids, lse, ent, gl, ge, T, IGNORE, lo, g)
        parts.append(g)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=0)
    gbig = torch.full((N, V + 7), 5.0, device="cuda", dtype=dtype)  # grad misaligned vs logits
    g = gbig[:, 1:1 + V]
    ops.logprob_bwd(x, ids, lse, ent, gl, ge, T, IGNORE, 0, g)
    torch.testing.assert_close(g, full, rtol=0, atol=0)
    assert (gbig[:, 0] == 5).all() and (gbig[:, 1 + V:] == 5).all()


@pytest.mark.gpu
def test_cuda_special_values():
    if not _cuda_built():
        pytest.skip("reasonrl._C built without CUDA")
    N, V = 5, 3000
    x = torch.randn(N, V, device="cuda") * 2
    x[:, 1000:2000] = float("-inf")
    x[1] = x[1] * 1e4
    x[2, :] = float("-inf")
    ids = torch.randint(0, 1000, (N,), device="cuda")
    ids[2] = IGNORE
    gl, ge = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
    logp, lse, ent, grad = run(x, ids, 1.0, gl, ge)
    keep = [0, 1, 3, 4]
    r = reference(x[keep], ids[keep], 1.0, gl[keep], ge[keep])
    s = same_dtype(x[keep], ids[keep], 1.0, gl[keep], ge[keep])
    for name, out, ref, ref_s in zip(("logp", "entropy", "grad"), (logp, ent, grad), (r[0], r[2], r[3]),
                                     (s[0], s[2], s[3])):
        assert_close_to_ref(out[keep], ref, ref_s, torch.float32, f"cuda {name}")
    assert (grad[:, 1000:2000] == 0).all() and (grad[2] == 0).all()
    x[3, 17] = float("nan")
    logp, lse, ent, grad = run(x, ids, 1.0, gl, ge)
    lse = lse_value(lse, 1.0)
    assert lse[3].isnan() and logp[3].isnan() and ent[3].isnan() and torch.isfinite(lse[[0, 1, 4]]).all()


@pytest.mark.gpu  # (a skipif before: `pytest -m gpu`, the GPU check, never selected it)
def test_mixed_devices_are_refused():
    x = torch.randn(4, 10, device="cuda")
    with pytest.raises(RuntimeError, match="ids is on cpu but logits is on cuda"):
        ops.logprob_fwd(x, torch.zeros(4, dtype=torch.long), 1.0, IGNORE, False)
