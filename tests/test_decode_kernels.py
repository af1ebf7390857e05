"""kernels/decode.py (the GPU decode step's elementwise kernels), run here by Triton's interpreter:
each kernel against the PyTorch ops it replaces, and the decode step built on them (LeanDecode's
triton path) against the model's forward. Tolerances: float32 summation order in the sums of squares,
which can move a bf16/fp16 rounding by one unit, and the interpreter's bfloat16 rounding (toward zero)."""
import os

import pytest
import torch
import torch.nn.functional as F

from decode_case import decode_case

from reasonrl.models import AttnContext
from reasonrl.models.functional import _rotate
from reasonrl.ops import _backend

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not _backend.triton_importable(), reason="triton is not installed")]
# CPU tensors through the interpreter here; CUDA tensors compiled on a GPU machine (pytest -m gpu)
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                        reason="Triton on CPU tensors needs TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.gpu)]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ulps(dtype):
    return {torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]


def rms_ref(x, w, eps):  # models.RMSNorm.forward
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N", [(1, 8), (7, 100), (33, 576)])
@pytest.mark.parametrize("device", DEVICES)
def test_add_rms_norm(dtype, M, N, device):
    with torch.device(device):
        from reasonrl.kernels.decode import add_rms_norm

        x = (torch.randn(M, N) * 3).to(dtype)
        r = torch.randn(M, 2 * N).to(dtype)[:, ::2].contiguous()
        w = (1 + 0.1 * torch.randn(N)).to(dtype)
        y, s = add_rms_norm(x, w, 1e-6)
        assert s is x
        ref = rms_ref(x, w, 1e-6)
        assert ((y.float() - ref.float()).abs() <= 2 * ulps(dtype) * ref.float().abs().clamp(min=1)).all()
        y, s = add_rms_norm(x, w, 1e-5, residual=r)
        # the residual stream, rounded as the model rounds it (Triton 3.9's interpreter rounds float32 to
        # bfloat16 toward zero, not to nearest: one unit there; compiled Triton rounds to nearest)
        if dtype == torch.bfloat16:
            assert ((s.float() - (x + r).float()).abs() <= ulps(dtype) * (x + r).float().abs()).all()
        else:
            assert torch.equal(s, x + r)
        ref = rms_ref(s, w, 1e-5)  # the norm of the residual stream it returned
        assert ((y.float() - ref.float()).abs() <= 2 * ulps(dtype) * ref.float().abs().clamp(min=1)).all()
        with pytest.raises(ValueError, match="contiguous last dim"):
            add_rms_norm(x.t(), w, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,Hq,Hkv,D,bs", [(1, 1, 1, 2, 1), (9, 7, 1, 12, 4), (5, 14, 2, 64, 16)])
@pytest.mark.parametrize("device", DEVICES)
def test_rope_store_kv(dtype, T, Hq, Hkv, D, bs, device):
    with torch.device(device):
        from reasonrl.kernels.decode import rope_store_kv

        q = torch.randn(T, Hq + 1, D).to(dtype)[:, :Hq]  # strided over heads
        k, v = torch.randn(T, Hkv, D).to(dtype), torch.randn(T, Hkv, D).to(dtype)
        ang = torch.rand(T, 1, D // 2) * 50
        cos, sin = ang.cos(), ang.sin()
        NB = T + 3
        kc, vc = torch.randn(NB, bs, Hkv, D).to(dtype), torch.randn(NB, bs, Hkv, D).to(dtype)
        slots = torch.randperm(NB * bs)[:T]
        if T > 1:
            slots[1] = -1  # writes nothing
        kc0, vc0 = kc.clone(), vc.clone()
        qo = rope_store_kv(q, k, v, cos, sin, kc, vc, slots)
        tol = 2 * ulps(dtype)
        assert (qo.float() - _rotate(q, cos, sin).float()).abs().max() <= tol * 4
        want_k, want_v = kc0.view(-1, Hkv, D).clone(), vc0.view(-1, Hkv, D).clone()
        keep = slots >= 0
        want_k[slots[keep]] = _rotate(k, cos, sin)[keep]
        want_v[slots[keep]] = v[keep]
        assert (kc.view(-1, Hkv, D).float() - want_k.float()).abs().max() <= tol * 4
        assert torch.equal(vc.view(-1, Hkv, D), want_v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N", [(1, 1), (5, 96), (64, 4864)])
@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul(dtype, M, N, device):
    with torch.device(device):
        from reasonrl.kernels.decode import silu_mul

        g, u = (torch.randn(M, N) * 4).to(dtype), torch.randn(M, N).to(dtype)
        ref = F.silu(g) * u
        got = silu_mul(g, u)
        assert ((got.float() - ref.float()).abs() <= 2 * ulps(dtype) * ref.float().abs().clamp(min=1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True])
def test_triton_decode_step_matches_model_forward(arch, dtype, device, packed):
    """LeanDecode's GPU path (on CPU tensors forced, through the interpreter): the logits and the KV
    cache of the model's decode forward, up to rounding; packed: q/k/v (with Qwen2's biases) and
    gate/up stored back to back by pack_for_decode, run as one GEMM each over row-strided views."""
    with torch.device(device):
        from reasonrl.engine.decode_forward import lean_decode, pack_for_decode

        model, ids, pos, slots, lens, tables, kv = decode_case(arch, dtype, seed=3, pad_row=3)
        B = ids.shape[0]
        kv2 = kv.clone()
        model.to(device)
        if packed:
            assert pack_for_decode(model, force=True) and not pack_for_decode(model, force=True)  # once
        lean = lean_decode(model)
        assert lean is not None and lean.triton == (device == "cuda")  # on GPUs only, unless forced
        lean.triton = True
        fused = lean.fused_weights()
        assert all((w is not None, gu is not None) == (packed, packed) for w, _, gu in fused)
        assert all((b is not None) == (packed and arch != "llama") for _, b, _ in fused)  # biases: qwen2, qwen3 here
        with torch.inference_mode():
            ctx = AttnContext(cu_seqlens=torch.arange(B + 1, dtype=torch.int32), max_seqlen=1, is_prefill=False,
                              slot_mapping=slots, block_tables=tables, context_lens=lens,
                              kv_caches=[(kv[i, 0], kv[i, 1]) for i in range(2)])
            ref = model.compute_logits(model(ids, pos, ctx)).float()
            got = lean(ids, pos, slots, lens, tables, [(kv2[i, 0], kv2[i, 1]) for i in range(2)]).float()
        scale = ref.abs().max().item()
        tol = {torch.float32: 1e-5, torch.bfloat16: 4e-2}[dtype]
        assert (got - ref).abs().max().item() < tol * scale
        assert (kv2.float() - kv.float()).abs().max().item() < tol * kv.float().abs().max().item()


def test_pack_for_decode_keeps_parameters_training_and_checkpoints(tmp_path):
    """pack_for_decode rebinds each parameter's storage (same Parameter objects, same values): a
    training step on the packed model equals one on an unpacked copy to the bit, and it saves and
    loads as before (safetensors refuses tensors that share storage: the saver copies them apart)."""
    import copy

    from reasonrl.engine.decode_forward import adjacent_rows, pack_for_decode
    from reasonrl.models import load_model, save_model

    model = decode_case("qwen2", torch.float32, seed=5, pad_row=0)[0]
    plain = copy.deepcopy(model)
    params = list(model.parameters())
    assert pack_for_decode(model, force=True)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    a = model.model.layers[0].self_attn
    assert adjacent_rows([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]) is not None
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    for m in (model, plain):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        m.train()
        logits = m.compute_logits(m(ids[0], torch.arange(9), AttnContext.from_lengths([9])))
        torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).backward()
        opt.step()
    for (name, x), y in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(x, y), name
    assert adjacent_rows([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]) is not None  # still packed
    save_model(model, str(tmp_path / "m"))
    back = load_model(str(tmp_path / "m"))
    for (name, x), y in zip(back.named_parameters(), model.parameters()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_engine_packs_the_model_and_its_rollout_copy(dtype, monkeypatch):
    """pack_for_decode where the engine calls it on CUDA (forced here): on the model itself, and on the
    dtype-cast copy the engine makes for a call (made outside inference mode so that it can be
    packed; as inference tensors it had failed at its next use): the same completions as unpacked."""
    import copy

    import reasonrl.engine.llm_engine as le
    from reasonrl.engine import LLMEngine, SamplingParams
    from reasonrl.engine.decode_forward import pack_for_decode

    model = decode_case("qwen2", torch.float32, seed=5)[0]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    ref = LLMEngine(copy.deepcopy(model), max_num_seqs=4, dtype=dtype).generate(prompts, params)
    calls = []
    monkeypatch.setattr(le, "pack_for_decode", lambda m: calls.append(pack_for_decode(m, force=True)))
    got = LLMEngine(model, max_num_seqs=4, dtype=dtype).generate(prompts, params)
    assert calls == [True]
    assert [c.token_ids for g in got for c in g] == [c.token_ids for g in ref for c in g]
