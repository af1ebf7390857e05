"""Paged KV-cache ops: every backend against a float64 loop reference (odd block sizes, GQA, splits)."""
import pytest
import torch

from reasonrl.ops import _backend
from reasonrl.ops.paged import paged_attention_decode, paged_attention_decode_reference, store_kv
from cpu_isa import forced_isa, runnable_isas
from tolerance import assert_close_to_ref

CPU_BACKENDS = ["reference", "triton"] + (["cpp"] if _backend.cpp_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def loop_decode(q, k_cache, v_cache, tables, lens, scale):
    """The definition, one sequence and head at a time, in float64."""
    B, Hq, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    out = torch.empty(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        pos = torch.arange(n)
        rows = tables[b, pos // bs].long() * bs + pos % bs
        k = k_cache.reshape(-1, Hkv, D)[rows].double()  # (n, Hkv, D)
        v = v_cache.reshape(-1, Hkv, D)[rows].double()
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            p = torch.softmax(k[:, kh] @ q[b, h].double() * scale, 0)
            out[b, h] = p @ v[:, kh]
    return out


def make_case(B, Hq, Hkv, D, bs, max_len, dtype, num_blocks=None):
    lens = torch.randint(1, max_len + 1, (B,), dtype=torch.int32)
    lens[0] = max_len
    M = (max_len + bs - 1) // bs
    num_blocks = num_blocks or B * M + 3
    perm = torch.randperm(num_blocks)[: B * M].view(B, M).int()  # scattered blocks
    tables = torch.full((B, M + 2), -1, dtype=torch.int32)  # wider than needed; unused entries -1
    tables[:, :M] = perm
    for b in range(B):  # blocks past a sequence's length are not its own
        tables[b, (int(lens[b]) + bs - 1) // bs:] = -1
    kc = torch.randn(num_blocks, bs, Hkv, D).to(dtype)
    vc = torch.randn(num_blocks, bs, Hkv, D).to(dtype)
    q = torch.randn(B, Hq, D).to(dtype)
    return q, kc, vc, tables, lens


@pytest.mark.parametrize("num_splits", [2, 8, 64])
def test_triton_decode_splits_follow_each_context(num_splits):
    """Each sequence cuts its own context into the splits (whole 32-key tiles), whatever the width of
    the block tables: a CUDA graph's tables are as wide as the longest sequence allows; contexts
    below, at and past tile edges, and shorter than the split count."""
    from reasonrl.kernels.paged import paged_attention_decode_fwd

    q, kc, vc, _, lens = make_case(5, 4, 2, 16, 4, 300, torch.float32)
    lens.copy_(torch.tensor([1, 33, 64, 65, 300], dtype=lens.dtype))
    tables = torch.randperm(kc.shape[0])[: 5 * 75].view(5, 75).int()  # every block of 300 keys its own
    wide = torch.cat([tables, torch.zeros(5, 200, dtype=tables.dtype)], 1)  # 800 keys more than any
    ref64 = loop_decode(q, kc, vc, tables, lens, 0.3)
    out = paged_attention_decode_fwd(q, kc, vc, wide, lens, 0.3, num_splits=num_splits)
    same = paged_attention_decode_reference(q, kc, vc, tables, lens, 0.3)
    assert_close_to_ref(out, ref64, same, torch.float32, f"splits={num_splits}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,D,bs,max_len", [(3, 4, 2, 16, 16, 37), (2, 6, 1, 12, 5, 23), (4, 2, 2, 32, 1, 9),
                                                   (1, 8, 2, 8, 7, 130), (5, 8, 2, 64, 16, 77), (2, 4, 4, 128, 8, 40),
                                                   (2, 2, 1, 256, 3, 19)])
def test_decode_matches_reference(backend, dtype, B, Hq, Hkv, D, bs, max_len):
    q, kc, vc, tables, lens = make_case(B, Hq, Hkv, D, bs, max_len, dtype)
    scale = D ** -0.5
    ref64 = loop_decode(q, kc, vc, tables, lens, scale)
    same = paged_attention_decode_reference(q.float(), kc.float(), vc.float(), tables, lens, scale).to(dtype)
    out = paged_attention_decode(q, kc, vc, tables, lens, scale, backend=backend)
    assert out.dtype == dtype
    assert_close_to_ref(out, ref64, same, dtype, f"decode[{backend}]")


@pytest.mark.skipif(not _backend.cpp_available(), reason="reasonrl._C not built")
@pytest.mark.parametrize("isa", runnable_isas())
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_decode_every_isa_build(isa, dtype):
    """csrc/cpu/paged.cpp's AVX2 and baseline builds both, forced as the log-prob kernels' are (it ignored the
    forced ISA before 2026-11-30, so on an AVX2 machine no test ran its baseline build)."""
    for B, Hq, Hkv, D, bs, max_len in ((3, 4, 2, 16, 16, 37), (2, 6, 1, 12, 5, 23), (2, 2, 1, 256, 3, 19)):
        q, kc, vc, tables, lens = make_case(B, Hq, Hkv, D, bs, max_len, dtype)
        scale = D ** -0.5
        ref64 = loop_decode(q, kc, vc, tables, lens, scale)
        same = paged_attention_decode_reference(q.float(), kc.float(), vc.float(), tables, lens, scale).to(dtype)
        with forced_isa(isa), torch.inference_mode():  # inference: the direct C++ call
            out = paged_attention_decode(q, kc, vc, tables, lens, scale, backend="cpp")
        assert_close_to_ref(out, ref64, same, dtype, f"decode[cpp {isa}] D={D}")


@pytest.mark.parametrize("grad", [True, False])
def test_zero_kv_heads_and_matrix_lengths_are_refused(grad):
    """A cache with no kv heads divided by zero in the C++ glue (SIGFPE, the process gone) and a (B, 2)
    context_lens or (T, 2) slot_mapping passed the C++ checks on the no-grad path, which used their first
    B values (2026-11-30); each now raises, naming it, with or without autograd."""
    q, kc, vc, tables, lens = make_case(2, 4, 2, 16, 4, 9, torch.float32)
    k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    slots = torch.tensor([0, 3])
    with torch.set_grad_enabled(grad), torch.inference_mode(not grad):
        empty = kc[:, :, :0]
        with pytest.raises((ValueError, RuntimeError), match="at least one kv head"):
            paged_attention_decode(q, empty.contiguous(), empty.contiguous(), tables, lens, 0.3)
        with pytest.raises((ValueError, RuntimeError), match="context_lens"):
            paged_attention_decode(q, kc, vc, tables, lens[:, None].expand(2, 2).contiguous(), 0.3)
        with pytest.raises((ValueError, RuntimeError), match="slot_mapping"):
            store_kv(k, v, kc, vc, slots[:, None].expand(2, 2).contiguous())


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_triton_decode_splits(num_splits):
    from reasonrl.kernels.paged import paged_attention_decode_fwd

    q, kc, vc, tables, lens = make_case(3, 4, 2, 16, 4, 45, torch.float32)
    lens[1] = 1  # most splits of this sequence are empty
    ref64 = loop_decode(q, kc, vc, tables, lens, 0.3)
    out = paged_attention_decode_fwd(q, kc, vc, tables.clamp(min=0), lens, 0.3, num_splits=num_splits)
    same = paged_attention_decode_reference(q, kc, vc, tables, lens, 0.3)
    assert_close_to_ref(out, ref64, same, torch.float32, f"splits={num_splits}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_exactly_the_slots(backend, dtype):
    NB, bs, Hkv, D, T = 6, 5, 3, 12, 11
    kc = torch.full((NB, bs, Hkv, D), float("nan"), dtype=dtype)  # poison: untouched slots stay NaN
    vc = kc.clone()
    k, v = torch.randn(T, Hkv, D, dtype=dtype), torch.randn(T, Hkv, D, dtype=dtype)
    slots = torch.randperm(NB * bs)[:T]
    slots[[2, 7]] = -1
    store_kv(k, v, kc, vc, slots, backend=backend)
    flat_k, flat_v = kc.view(-1, Hkv, D), vc.view(-1, Hkv, D)
    keep = slots >= 0
    assert torch.equal(flat_k[slots[keep]], k[keep]) and torch.equal(flat_v[slots[keep]], v[keep])
    written = torch.zeros(NB * bs, dtype=torch.bool)
    written[slots[keep]] = True
    assert torch.isnan(flat_k[~written].float()).all() and torch.isnan(flat_v[~written].float()).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_store_kv_strided_input(backend):
    kc, vc = torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8)
    kv = torch.randn(5, 2, 2, 8)  # k and v interleaved: non-contiguous views
    slots = torch.tensor([3, 0, 9, 15, -1])
    store_kv(kv[:, 0], kv[:, 1], kc, vc, slots, backend=backend)
    assert torch.equal(kc.view(-1, 2, 8)[slots[:4]], kv[:4, 0]) and torch.equal(vc.view(-1, 2, 8)[slots[:4]], kv[:4, 1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_input_raises_clear_errors(backend):
    q, kc, vc, tables, lens = make_case(2, 4, 2, 8, 4, 10, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_attention_decode(q[:, :3], kc, vc, tables, lens, 1.0, backend=backend)
    with pytest.raises(ValueError, match="context_lens must be"):
        paged_attention_decode(q, kc, vc, tables, lens[:1], 1.0, backend=backend)
    bad = lens.clone()
    bad[1] = 0
    with pytest.raises((ValueError, RuntimeError), match="context_lens"):
        paged_attention_decode(q, kc, vc, tables, bad, 1.0, backend=backend)
    bad_tables = tables.clone()
    bad_tables[0, 0] = 10_000
    with pytest.raises((ValueError, RuntimeError), match="block_tables"):
        paged_attention_decode(q, kc, vc, bad_tables, lens, 1.0, backend=backend)
    k = torch.randn(3, 2, 8)
    with pytest.raises((ValueError, RuntimeError), match="slot_mapping"):
        store_kv(k, k, kc, vc, torch.tensor([0, 1, kc.shape[0] * kc.shape[1]]), backend=backend)
    with pytest.raises(ValueError, match="k must be"):
        store_kv(torch.randn(3, 3, 8), torch.randn(3, 3, 8), kc, vc, torch.tensor([0, 1, 2]), backend=backend)


def test_unavailable_backend_is_named():
    q, kc, vc, tables, lens = make_case(1, 2, 2, 8, 4, 5, torch.float32)
    with pytest.raises(RuntimeError, match="cuda"):
        paged_attention_decode(q, kc, vc, tables, lens, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        store_kv(q, q, kc, vc, torch.zeros(1, dtype=torch.long), backend="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_on_gpu(dtype):
    q, kc, vc, tables, lens = make_case(16, 14, 2, 64, 16, 700, dtype)
    ref64 = loop_decode(q, kc, vc, tables, lens, 0.125)
    same = paged_attention_decode_reference(q.float(), kc.float(), vc.float(), tables, lens, 0.125).to(dtype)
    dev = torch.device("cuda")
    out = paged_attention_decode(q.to(dev), kc.to(dev), vc.to(dev), tables.to(dev), lens.to(dev), 0.125, backend="triton")
    assert_close_to_ref(out.cpu(), ref64, same, dtype, "triton gpu")
    kc2 = torch.zeros_like(kc, device=dev)
    vc2 = torch.zeros_like(vc, device=dev)
    k, v = torch.randn(40, 2, 64, dtype=dtype, device=dev), torch.randn(40, 2, 64, dtype=dtype, device=dev)
    slots = torch.randperm(kc.shape[0] * 16, device=dev)[:40]
    store_kv(k, v, kc2, vc2, slots, backend="triton")
    assert torch.equal(kc2.view(-1, 2, 64)[slots], k) and torch.equal(vc2.view(-1, 2, 64)[slots], v)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decode_query_dtype_differs_from_cache(backend):
    """fp32 queries over a bf16 cache (a forward under autocast with fp32 master weights)."""
    q, kc, vc, tables, lens = make_case(3, 4, 2, 16, 5, 21, torch.bfloat16)
    q = torch.randn(q.shape)
    out = paged_attention_decode(q, kc, vc, tables, lens, 0.25, backend=backend)
    ref64 = loop_decode(q, kc, vc, tables, lens, 0.25)
    assert out.dtype == torch.float32 and (out.double() - ref64).abs().max() < 2e-2


def test_auto_backend_float64_cache():
    """float64 (a test or reference model) has no compiled kernel: auto falls back to the reference."""
    q, kc, vc, tables, lens = make_case(2, 4, 2, 8, 4, 11, torch.float64)
    out = paged_attention_decode(q, kc, vc, tables, lens, 0.5)
    assert (out - loop_decode(q, kc, vc, tables, lens, 0.5)).abs().max() < 1e-12
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    store_kv(q[:, :2], q[:, 2:], kc2, vc2, torch.tensor([5, 0]))
    assert torch.equal(kc2.view(-1, 2, 8)[5], q[0, :2]) and torch.equal(vc2.view(-1, 2, 8)[0], q[1, 2:])


@pytest.mark.skipif(not _backend.cpp_available(), reason="reasonrl._C not built")
def test_cpp_direct_path_without_autograd():
    """Without autograd (the rollout engine), exact CPU inputs go straight to the C++ ops, past the
    Python checks: the same results, and bad input still raises naming the argument (C++ checks)."""
    q, kc, vc, tables, lens = make_case(5, 4, 2, 32, 16, 50, torch.float32)
    ref = paged_attention_decode(q, kc, vc, tables, lens, 0.3)
    k, v = torch.randn(7, 2, 32), torch.randn(7, 2, 32)
    slots = torch.randperm(kc.shape[0] * 16)[:7]
    kr, vr = kc.clone(), vc.clone()
    store_kv(k, v, kr, vr, slots)
    with torch.inference_mode():
        assert torch.equal(paged_attention_decode(q, kc, vc, tables, lens, 0.3), ref)
        store_kv(k, v, kc, vc, slots)
        assert torch.equal(kc, kr) and torch.equal(vc, vr)
        for bad_q, bad_lens, match in ((q[:, :3].contiguous(), lens, "multiple of kv heads"),
                                       (q, lens[:1], "context_lens"), (q, lens * 0, "context_lens")):
            with pytest.raises((ValueError, RuntimeError), match=match):
                paged_attention_decode(bad_q, kc, vc, tables, bad_lens, 0.3)
        with pytest.raises((ValueError, RuntimeError), match="slot_mapping"):
            store_kv(k, v, kc, vc, slots + kc.shape[0] * 16)
        with pytest.raises((ValueError, RuntimeError), match="k must be"):
            store_kv(torch.randn(7, 3, 32), torch.randn(7, 3, 32), kc, vc, slots)


@pytest.mark.parametrize("shape,dtype", [((4, 2, 40, 16, 4, 32), torch.float32), ((3, 5), torch.bfloat16),
                                         ((0, 7), torch.float16), ((2, 2, 9, 16, 2, 8), torch.float32)])
def test_empty_kv_cache(shape, dtype):
    """The engine's CPU cache: the asked shape and dtype, contiguous, writable; from 2 MiB up (C++ op
    built, Linux) on its own 2 MiB-aligned mapping."""
    import sys

    from reasonrl.ops.paged import _cpp_has, empty_kv_cache
    t = empty_kv_cache(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    t.fill_(1.5)
    assert t.numel() == 0 or t.float().sum().item() == 1.5 * t.numel()
    if _cpp_has("empty_huge_pages") and sys.platform == "linux" and t.numel() * t.element_size() >= 2**21:
        assert t.data_ptr() % 2**21 == 0
    del t
    if _cpp_has("empty_huge_pages"):
        with pytest.raises(RuntimeError, match="negative size"):
            torch.ops.reasonrl.empty_huge_pages([3, -1], torch.float32)


def test_float64_never_runs_the_float32_triton_kernel(monkeypatch):
    """backend="triton" took float64 q and caches, computed in float32 and handed back float64 (2.7e-8
    off where the reference is 4e-16), and "auto" on CUDA resolves to triton (2026-11-30). Now triton
    refuses float64 by name, and auto takes the reference for it wherever it resolves to triton."""
    import reasonrl.ops.paged as P

    q, kc, vc, tables, lens = make_case(3, 4, 2, 16, 4, 11, torch.float64)
    with pytest.raises(ValueError, match="backend='triton' computes in float32"):
        paged_attention_decode(q, kc, vc, tables, lens, 0.25, backend="triton")
    monkeypatch.setattr(P, "_resolve", lambda *a: "triton")  # as "auto" resolves on a CUDA device
    out = paged_attention_decode(q, kc, vc, tables, lens, 0.25)
    assert out.dtype == torch.float64
    assert (out - loop_decode(q, kc, vc, tables, lens, 0.25)).abs().max() < 1e-12


@pytest.mark.skipif(not _backend.cpp_available(), reason="reasonrl._C not built")
def test_decode_layers_fwd_bad_arguments_are_named():
    """The all-layers decode op says which argument is wrong (its results: tests/test_engine.py)."""
    B, H, L = 2, 8, 2
    x, cs = torch.randn(B, H), torch.randn(B, 1, 2)
    kc = [torch.randn(4, 4, 1, 4) for _ in range(L)]
    slots, tables = torch.zeros(B, dtype=torch.int64), torch.zeros(B, 1, dtype=torch.int32)
    lens = torch.ones(B, dtype=torch.int32)
    w = [torch.randn(1)] * (15 * L)
    op = torch.ops.reasonrl.decode_layers_fwd
    with pytest.raises(RuntimeError, match="one k and one v cache per layer"):
        op(x, cs, cs, w, kc, kc[:1], slots, tables, lens, 2, 1e-6, 0.5, 1)
    with pytest.raises(RuntimeError, match="15 weights per layer"):
        op(x, cs, cs, w[:-1], kc, kc, slots, tables, lens, 2, 1e-6, 0.5, 1)
    with pytest.raises(RuntimeError, match="layer 1 lacks required weight #12"):
        op(x, cs, cs, w[:15 + 12] + [None] + w[15 + 13:], kc, kc, slots, tables, lens, 2, 1e-6, 0.5, 1)
    with pytest.raises(RuntimeError, match="chunks must be >= 1"):
        op(x, cs, cs, w, kc, kc, slots, tables, lens, 2, 1e-6, 0.5, 0)
    with pytest.raises(RuntimeError, match="final_norm and lm_head come together"):
        op(x, cs, cs, w, kc, kc, slots, tables, lens, 2, 1e-6, 0.5, 1, torch.ones(H))


def _gemm_isas():
    """The builds this CPU runs, less the baseline where a vector one runs (it has no small GEMM: at::linear)."""
    isas = runnable_isas()
    return [i for i in isas if i != "x86-64"] or isas or ["none"]


def _small_gemm_runs(isa, M, N, K):
    """csrc/cpu/gemm.cpp's small_gemm_available, as dlinear calls it (M <= 64, weight >= 256 KiB)."""
    if M > 64 or N * K * 4 < 256 * 1024:
        return False
    if isa == "x86-64-v4":
        return K % 16 == 0
    return isa == "x86-64-v3" and K % 8 == 0 and (M <= 16 or N * K * 4 >= 8 << 20)


@pytest.mark.skipif(not _backend.cpp_available(), reason="reasonrl._C not built")
@pytest.mark.parametrize("isa", _gemm_isas())
@pytest.mark.parametrize("M", [1, 3, 5, 16, 33, 64, 65])
@pytest.mark.parametrize("N,K", [(1031, 64), (4099, 16), (517, 128), (7, 48), (85, 128), (2000, 40), (4099, 520),
                                 (5, 520)])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear(isa, M, N, K, bias):
    """The decode layers' Linear against float64: the small GEMM (M <= 64 rows, a weight of >= 256 KiB;
    AVX-512 with K % 16 == 0, or AVX2 with K % 8 == 0 and M <= 16 or a weight of >= 8 MiB) with its row
    and column tails, for each ISA this CPU runs, and at::linear for everything else."""
    import torch.nn.functional as F
    torch.manual_seed(M * 7 + N + K)
    x, w = torch.randn(M, K), torch.randn(N, K)
    b = torch.randn(N) if bias else None
    with forced_isa(isa):
        y = torch.ops.reasonrl.decode_linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    same = F.linear(x, w, b)
    assert_close_to_ref(y, ref, same, torch.float32, f"decode_linear {isa} M={M} N={N} K={K}")
    if not _small_gemm_runs(isa, M, N, K):  # at::linear itself
        assert torch.equal(y, same)
    else:  # the kernel ran: another summation order than MKL's somewhere in M x N outputs
        assert not torch.equal(y, same)


@pytest.mark.skipif(not _backend.cpp_available(), reason="reasonrl._C not built")
def test_decode_linear_other_dtypes_and_layouts_fall_back():
    import torch.nn.functional as F
    x, w = torch.randn(8, 64), torch.randn(4096, 64)
    for xx, ww in ((x.bfloat16(), w.bfloat16()), (x.double(), w.double()), (x, w.t().contiguous().t())):
        assert torch.equal(torch.ops.reasonrl.decode_linear(xx, ww), F.linear(xx, ww))


@pytest.mark.parametrize("backend", ["auto"] + CPU_BACKENDS)
@pytest.mark.parametrize("grad", [False, True])  # no grad: the direct C++ call without Python checks
@pytest.mark.parametrize("scale,err", [(float("nan"), ValueError), (float("inf"), ValueError), (0.0, ValueError),
                                       (-0.5, ValueError), ("a", TypeError), (None, TypeError),
                                       (True, TypeError)])
def test_decode_scale_must_be_finite_positive(backend, grad, scale, err):
    q, kc, vc, tables, lens = make_case(2, 4, 2, 8, 4, 7, torch.float32)
    with torch.set_grad_enabled(grad), pytest.raises(err, match="scale"):
        paged_attention_decode(q, kc, vc, tables, lens, scale, backend=backend)


def test_decode_scale_accepts_ints_and_one_element_tensors():
    q, kc, vc, tables, lens = make_case(2, 4, 2, 8, 4, 7, torch.float32)
    want = paged_attention_decode(q, kc, vc, tables, lens, 1.0, backend="reference")
    for scale in (1, torch.tensor(1.0)):
        torch.testing.assert_close(paged_attention_decode(q, kc, vc, tables, lens, scale), want)
