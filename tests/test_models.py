"""The lean decoder against transformers, and its paged prefill/decode against its own packed forward."""
import os

import pytest
import torch

from reasonrl.models import (AttnContext, CausalLM, ModelConfig, builtin_path, init_model, load_model,
                             load_tokenizer, set_deterministic)

transformers = pytest.importorskip("transformers")

ROPE = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},  # the 4.x spelling
    "linear": {"rope_type": "linear", "factor": 2.0},
}


def hf_tiny(family, tmp_path, tie=False, rope=None, bias=False):
    """A random-init tiny transformers model of `family`, saved with save_pretrained into tmp_path."""
    C = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    kw = dict(vocab_size=101, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, tie_word_embeddings=tie, max_position_embeddings=256,
              rope_theta=5000.0 if family != "llama" else 10000.0)
    if family != "qwen2":
        kw["attention_bias"] = bias
    if rope:
        kw["rope_scaling"] = dict(ROPE[rope])
    hf = transformers.AutoModelForCausalLM.from_config(C(**kw), attn_implementation="eager").eval()
    with torch.no_grad():  # transformers inits biases to 0 and norms to 1: randomize so they count
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = str(tmp_path / family)
    hf.save_pretrained(path)
    return hf, path


def pack(ids, lens):
    """Right-padded (B, L) ids -> packed ids, positions, context."""
    packed = torch.cat([ids[b, :n] for b, n in enumerate(lens)])
    pos = torch.cat([torch.arange(n) for n in lens])
    return packed, pos, AttnContext.from_lengths(lens)


@pytest.mark.parametrize("family,tie,rope,bias", [
    ("llama", False, None, False), ("llama", True, "llama3", True),
    ("qwen2", False, "yarn", False), ("qwen3", True, "linear", False), ("qwen3", False, None, True),
])
def test_logits_parity_padded_and_packed(family, tie, rope, bias, tmp_path):
    hf, path = hf_tiny(family, tmp_path, tie, rope, bias)
    model = load_model(path).eval()
    assert model.config.arch == family and model.config.tie_word_embeddings == tie
    lens = [37, 5, 1, 20]
    L = max(lens)
    ids = torch.randint(0, 101, (len(lens), L))
    mask = torch.arange(L)[None] < torch.tensor(lens)[:, None]  # right padding
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).logits  # (B, L, V)
        packed, pos, ctx = pack(ids, lens)
        out = model.compute_logits(model(packed, pos, ctx))  # (total, V)
        # The padded batch through our model: each row as its own sequence, pads dropped.
        rows = [model.compute_logits(model(ids[b, :n], torch.arange(n), AttnContext.from_lengths([n])))
                for b, n in enumerate(lens)]
    assert (out - ref[mask]).abs().max().item() <= 1e-4
    assert (torch.cat(rows) - ref[mask]).abs().max().item() <= 1e-4
    # positions far from 0 exercise every RoPE frequency band (the scaled ones included)
    with torch.no_grad():
        off = 150
        ref = hf(input_ids=ids[:1, :30], position_ids=torch.arange(off, off + 30)[None]).logits[0]
        out = model.compute_logits(model(ids[0, :30], torch.arange(off, off + 30), AttnContext.from_lengths([30])))
    assert (out - ref).abs().max().item() <= 1e-4


def test_dynamic_ntk_rope_parity(tmp_path):
    """rope_type "dynamic": plain RoPE up to max_position_embeddings (32 here), NTK-scaled theta
    beyond, set by each sequence's own last position: a packed batch equals transformers on each
    sequence alone (transformers' padded batch takes the longest row's length for every row)."""
    C = transformers.LlamaConfig
    hf = transformers.AutoModelForCausalLM.from_config(C(
        vocab_size=101, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=32,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0}), attn_implementation="eager").eval()
    hf.save_pretrained(str(tmp_path / "dyn"))
    model = load_model(str(tmp_path / "dyn")).eval()
    assert model.config.rope_scaling["rope_type"] == "dynamic" and not model.supports_cuda_graphs
    for lens, off in (([20, 7], 0), ([37, 5, 20], 0), ([40, 33, 37], 0), ([30], 150)):  # within M, beyond, far
        ids = [torch.randint(0, 101, (n,)) for n in lens]
        with torch.no_grad():
            refs = []
            for x in ids:  # a forward within M first: transformers keeps the longest length it has seen
                hf(input_ids=x[None, :1])
                refs.append(hf(input_ids=x[None], position_ids=(torch.arange(len(x)) + off)[None]).logits[0])
            pos = torch.cat([torch.arange(n) + off for n in lens])
            out = model.compute_logits(model(torch.cat(ids), pos, AttnContext.from_lengths(lens)))
        assert (out - torch.cat(refs)).abs().max().item() <= 1e-4, (lens, off)
    with pytest.raises(ValueError, match="factor"):
        ModelConfig(rope_scaling={"rope_type": "dynamic"})


@pytest.mark.parametrize("lens", [[9, 9, 9], [30, 25, 28, 22, 30, 27, 1]])
def test_batched_attention_paths_match_per_sequence(lens, monkeypatch):
    """Equal lengths (one batched SDPA) and similar lengths (one right-padded SDPA) against one
    forward per sequence; the padded path's gradients against the per-sequence loop's."""
    import reasonrl.models.model as mm
    cfg = ModelConfig(arch="qwen3", vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)
    model = init_model(cfg, seed=3).double()
    ids = torch.randint(0, 50, (sum(lens),))
    pos = torch.cat([torch.arange(n) for n in lens])
    assert (mm.pad_plan(lens, "cpu") is not None) == (len(set(lens)) > 1)
    with torch.no_grad():
        single = torch.cat([model(i, p, AttnContext.from_lengths([len(i)]))
                            for i, p in zip(ids.split(lens), pos.split(lens))])
    grads = []
    for plan in (mm.pad_plan, lambda lengths, device: None):
        monkeypatch.setattr(mm, "pad_plan", plan)
        model.zero_grad()
        h = model(ids, pos, AttnContext.from_lengths(lens))
        assert (h - single).abs().max().item() < 1e-12
        (h * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view(h.shape)).sum().backward()
        grads.append([p.grad.clone() for n, p in model.named_parameters() if n != "lm_head.weight"])
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("causal", [True, False])
def test_math_attention_matches_float64_sdpa(dtype, causal, monkeypatch):
    """The CPU bf16 training path (_math_attention through _sdpa; here in every dtype) against float64
    SDPA, values and the gradients of q, k, v, held to the error SDPA itself makes in the same dtype;
    grouped-query heads, a prefix mask with a ragged key count."""
    import reasonrl.models.attention as attn
    from tests.tolerance import assert_close_to_ref
    torch.manual_seed(0)
    B, Hq, Hkv, Lq, Lk, D = 5, 6, 2, 7, 7 if causal else 11, 16
    q64, k64, v64 = (torch.randn(B, h, n, D, dtype=torch.float64) for h, n in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    mask = None
    if not causal:  # query i of sequence b sees keys j <= P_b + i and j < P_b + Lq, P_b ragged
        P = torch.tensor([4, 0, 3, 4, 2])
        j, i = torch.arange(Lk), torch.arange(Lq)
        mask = ((j[None, None, :] <= P[:, None, None] + i[None, :, None])
                & (j[None, None, :] < P[:, None, None] + Lq))[:, None]
    go = torch.randn(B, Hq, Lq, D, dtype=torch.float64)

    def run(fn, dt):
        q, k, v = (t.detach().to(dt, copy=True).requires_grad_() for t in (q64, k64, v64))
        out = fn(q, k, v)
        out.backward(go.to(dt))
        return [out.detach(), q.grad, k.grad, v.grad]

    def sdpa(q, k, v):
        rep = Hq // Hkv
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask, is_causal=causal,
            scale=D ** -0.5)

    ref = run(sdpa, torch.float64)
    theirs = run(sdpa, dtype)
    used = []
    monkeypatch.setattr(attn, "_math_ok", lambda q, k: used.append(q.shape) or True)
    ours = run(lambda q, k, v: attn._sdpa(q, k, v, causal, D ** -0.5, mask), dtype)
    assert used
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), ours, ref, theirs):
        assert a.dtype == dtype
        assert_close_to_ref(a, r, t, dtype, name=f"{name} {dtype} causal={causal}")


def test_math_attention_only_for_cpu_bf16_training_within_budget(monkeypatch):
    import reasonrl.models.attention as attn
    for dt in (torch.bfloat16, torch.float16):
        q, k = torch.zeros(2, 3, 4, 8, dtype=dt, requires_grad=True), torch.zeros(2, 3, 5, 8, dtype=dt)
        assert attn._math_ok(q, k)
        with torch.no_grad():
            assert not attn._math_ok(q, k)  # forward only (the engine's prefill): SDPA
        assert not attn._math_ok(q.detach(), k)
    assert not attn._math_ok(torch.zeros(2, 3, 4, 8, requires_grad=True), torch.zeros(2, 3, 5, 8))  # fp32: SDPA
    monkeypatch.setattr(attn, "MATH_BUDGET", 2 * 3 * 4 * 5 - 1)
    assert not attn._math_ok(q, k)


def test_init_model_in_bf16_keeps_rope_frequencies_float32():
    cfg = ModelConfig(arch="llama", vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=500000.0)
    ref, m = init_model(cfg), init_model(cfg, dtype=torch.bfloat16)
    assert m.lm_head_weight.dtype == torch.bfloat16
    assert m.rotary.inv_freq.dtype == torch.float32 and torch.equal(m.rotary.inv_freq, ref.rotary.inv_freq)


def test_qk_norm_under_autocast_gives_attention_one_dtype(monkeypatch):
    """Qwen3's q/k norms have fp32 weights: under bf16 autocast q and k came out fp32 beside a bf16 v,
    which kept flash-attn (and the CPU bf16 path) from running. Attention now sees one dtype."""
    import reasonrl.models.model as mm
    cfg = ModelConfig(arch="qwen3", vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = init_model(cfg)
    seen = []
    for name in ("varlen_attention", "shared_prefix_attention"):
        fn = getattr(mm, name)
        monkeypatch.setattr(mm, name, lambda q, k, v, *a, _fn=fn: seen.append((q.dtype, k.dtype, v.dtype)) or _fn(q, k, v, *a))
    lens = [5, 3, 4]
    ids, pos = torch.randint(0, 40, (sum(lens),)), torch.cat([torch.arange(n) for n in lens])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model(ids, pos, AttnContext.from_lengths(lens))
        ctx = AttnContext.from_lengths(lens)
        ctx.prefix_of = [-1, 0, 0]
        model(ids, pos, ctx)
    h.float().sum().backward()
    assert len(seen) == 4 and all(d == (torch.bfloat16,) * 3 for d in seen), seen
    with torch.no_grad():
        model(ids, pos, AttnContext.from_lengths(lens))  # no autocast: float32 throughout
    assert seen[-1] == (torch.float32,) * 3


def test_pad_plan_made_on_first_use_when_planned_for_flash():
    """With flash-attn installed the forward's plan has no "pad"; a layer that runs SDPA (fp32 on
    CUDA) makes it once (model._pad), with the same result as a plan made up front."""
    import reasonrl.models.model as mm
    from reasonrl.models.attention import varlen_attention
    lens = [30, 25, 28, 22, 30, 27]
    q, k, v = (torch.randn(sum(lens), h, 8, dtype=torch.float64) for h in (4, 2, 2))
    cu = torch.tensor([0] + lens).cumsum(0).int()
    plan = {"lengths": lens, "prefix": False}
    lazy = mm._pad(plan, q)
    assert callable(lazy) and "pad" not in plan
    got = varlen_attention(q, k, v, cu, max(lens), lens, 0.3, lazy)
    assert plan["pad"] is not None
    assert mm._pad(plan, q) is plan["pad"]  # made once per forward
    ref = varlen_attention(q, k, v, cu, max(lens), lens, 0.3, None)  # one call per sequence
    assert (got - ref).abs().max().item() < 1e-12


def _paged_setup(model, n_blocks, bs, max_blocks, B, dtype, device="cpu"):
    caches = [(torch.zeros(n_blocks, bs, model.num_kv_heads, model.head_dim, dtype=dtype, device=device),
               torch.zeros(n_blocks, bs, model.num_kv_heads, model.head_dim, dtype=dtype, device=device))
              for _ in range(model.num_layers)]
    tables = torch.randperm(n_blocks)[: B * max_blocks].view(B, max_blocks).int()  # scattered blocks
    return caches, tables.to(device)


def _slots(tables, b, start, n, bs):
    p = torch.arange(start, start + n, device=tables.device)
    return tables[b, p // bs].long() * bs + p % bs


# float32: the compiled paged kernels (backend "auto") take float32/bf16/fp16 caches, not float64.
@pytest.mark.parametrize("family,device", [("llama", "cpu"), ("qwen2", "cpu"), ("qwen3", "cpu"),
                                           pytest.param("qwen3", "cuda", marks=pytest.mark.gpu)])
def test_paged_prefill_then_decode_matches_packed_forward(family, device):
    cfg = ModelConfig(arch=family, vocab_size=61, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=family == "llama")
    model = init_model(cfg, seed=int(torch.randint(0, 1000, ())), device=device).eval()
    lens, prompt = [13, 6, 9], [4, 6, 1]  # full length, prompt length per sequence
    bs, B = 4, len(lens)
    caches, tables = _paged_setup(model, 16, bs, 4, B, torch.float32, device)
    seqs = [torch.randint(0, 61, (n,), device=device) for n in lens]
    ar = lambda *a: torch.arange(*a, device=device)  # noqa: E731
    with torch.no_grad():
        full = model(torch.cat(seqs), torch.cat([ar(n) for n in lens]), AttnContext.from_lengths(lens, device))
        ref = list(full.split(lens))
        # prefill the prompts into the cache
        ctx = AttnContext.from_lengths(prompt, device, slot_mapping=torch.cat([_slots(tables, b, 0, p, bs) for b, p in enumerate(prompt)]),
                                       kv_caches=caches, block_tables=tables,
                                       context_lens=torch.tensor(prompt, dtype=torch.int32, device=device))
        h = model(torch.cat([s[:p] for s, p in zip(seqs, prompt)]), torch.cat([ar(p) for p in prompt]), ctx)
        got = [[x] for x in h.split(prompt)]
        # decode the rest one token at a time; sequences that are done drop out of the batch
        for t in range(max(lens)):
            live = [b for b in range(B) if prompt[b] + t < lens[b]]
            if not live:
                break
            pos = torch.tensor([prompt[b] + t for b in live], device=device)
            ctx = AttnContext(cu_seqlens=ar(len(live) + 1).int(), max_seqlen=1, is_prefill=False,
                              slot_mapping=torch.cat([_slots(tables, b, prompt[b] + t, 1, bs) for b in live]),
                              block_tables=tables[live], context_lens=(pos + 1).int(), kv_caches=caches)
            h = model(torch.stack([seqs[b][prompt[b] + t] for b in live]), pos, ctx)
            for i, b in enumerate(live):
                got[b].append(h[i:i + 1])
    for b in range(B):
        assert (torch.cat(got[b]) - ref[b]).abs().max().item() < 1e-4, f"sequence {b}"


@pytest.mark.gpu
def test_cuda_forward_fp32_and_bf16_autocast_match_cpu_float64():
    cfg = ModelConfig(arch="qwen3", vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    model = init_model(cfg, seed=7)
    lens = [200, 37, 150, 180, 199, 1]  # the right-padded batched path and the per-sequence one
    ids = torch.randint(0, 300, (sum(lens),))
    pos = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        ref = model.double()(ids, pos, AttnContext.from_lengths(lens)).float()
        model = model.float().cuda()
        ctx = AttnContext.from_lengths(lens, "cuda")
        out32 = model(ids.cuda(), pos.cuda(), ctx).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out16 = model(ids.cuda(), pos.cuda(), ctx).float().cpu()
    scale = ref.abs().max().item()
    assert (out32 - ref).abs().max().item() < 1e-3 * scale  # TF32 matmuls may be on
    assert (out16 - ref).abs().max().item() < 5e-2 * scale
    # gradients flow through the bf16 path into the fp32 master weights
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = model(ids.cuda(), pos.cuda(), ctx)
    h.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for n, p in model.named_parameters() if n != "lm_head.weight")


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.gpu), "cpu"])
def test_training_step_gradients_match_float64(family, device):
    """The training step as the trainer runs it on a GPU (float32 master weights, bf16 autocast: q/k/v GEMM
    with RoPE inside, residual adds inside the norms' Triton kernels, weight gradients written float32 by
    their GEMMs, the output projection's LinearFunction) and on CPU under bf16 autocast (the C++ kernels):
    every gradient within bf16's error of the float64 model (largest seen on CPU: 1.4% of the gradient's
    largest element), and of the same step with that packing off (FUSED["step"])."""
    from reasonrl.models import functional as Fn
    cfg = ModelConfig(arch=family, vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, qk_norm=family == "qwen3",
                      attention_bias=family == "qwen2")
    lens = [130, 61, 97]
    ids = torch.randint(0, 300, (sum(lens),))
    pos = torch.cat([torch.arange(n) for n in lens])
    wt = torch.randn(sum(lens), cfg.hidden_size)

    def grads(model, device, amp):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            h = model(ids.to(device), pos.to(device), AttnContext.from_lengths(lens, device))
        dt = torch.float32 if amp else torch.float64
        (h.to(dt) * wt.to(device, dt)).sum().backward()
        return {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads(init_model(cfg, seed=11).double(), "cpu", False)
    model = init_model(cfg, seed=11).float().to(device)
    packed = grads(model, device, True)
    Fn.FUSED["step"] = False
    try:
        plain = grads(model, device, True)
    finally:
        Fn.FUSED["step"] = True
    assert packed.keys() == ref.keys() == plain.keys()
    for n in ref:
        scale = ref[n].abs().max().item() + 1e-12
        assert model.get_parameter(n).grad.dtype == torch.float32, n
        assert (packed[n] - ref[n]).abs().max().item() <= 4e-2 * scale, n
        assert (packed[n] - plain[n]).abs().max().item() <= 4e-2 * scale, n


@pytest.mark.gpu
def test_cuda_native_gqa_matches_repeated_heads():
    """SDPA's native grouped-query attention (flash backend, bf16) against repeating the k/v heads:
    outputs and every gradient agree up to bf16 rounding (flash's dK/dV sums run in another order)."""
    from reasonrl.models import attention as A

    cfg = ModelConfig(arch="qwen2", vocab_size=300, hidden_size=448, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=7, num_key_value_heads=1, head_dim=64)
    lens = [256, 256]  # one batched causal call, no mask: the native path
    ids = torch.randint(0, 300, (sum(lens),)).cuda()
    pos = torch.cat([torch.arange(n) for n in lens]).cuda()
    outs = []
    for native in (True, False):
        model = init_model(cfg, seed=3).float().cuda()
        A._STATE["native_gqa"] = native
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                h = model(ids, pos, AttnContext.from_lengths(lens, "cuda"))
            h.float().square().mean().backward()
        finally:
            A._STATE["native_gqa"] = True
        outs.append((h.float(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (h1, g1), (h2, g2) = outs
    assert (h1 - h2).abs().max().item() <= 2e-2 * h2.abs().max().item()
    for n in g2:
        scale = g2[n].abs().max().item()
        assert (g1[n] - g2[n]).abs().max().item() <= 3e-2 * scale + 1e-8, n


def test_prefill_with_cached_prefix_matches_packed_forward():
    cfg = ModelConfig(arch="qwen2", vocab_size=40, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = init_model(cfg, seed=5).eval()
    lens, first = [11, 7], [5, 7]  # sequence 1 has nothing left for the second chunk -> only seq 0 continues
    bs = 4
    caches, tables = _paged_setup(model, 12, bs, 3, 2, torch.float32)
    seqs = [torch.randint(0, 40, (n,)) for n in lens]
    with torch.no_grad():
        ref = model(seqs[0], torch.arange(11), AttnContext.from_lengths([11]))
        ctx = AttnContext.from_lengths(first, slot_mapping=torch.cat([_slots(tables, b, 0, n, bs) for b, n in enumerate(first)]),
                                       kv_caches=caches, block_tables=tables, context_lens=torch.tensor(first, dtype=torch.int32))
        h1 = model(torch.cat([s[:n] for s, n in zip(seqs, first)]), torch.cat([torch.arange(n) for n in first]), ctx)
        ctx = AttnContext.from_lengths([6], slot_mapping=_slots(tables, 0, 5, 6, bs), kv_caches=caches,
                                       block_tables=tables[:1], context_lens=torch.tensor([11], dtype=torch.int32))
        h2 = model(seqs[0][5:], torch.arange(5, 11), ctx)
    assert (torch.cat([h1[:5], h2]) - ref).abs().max().item() < 1e-4


def test_gradient_checkpointing_same_grads():
    model = init_model(builtin_path("tiny"), seed=1).double()
    ids = torch.randint(0, model.config.vocab_size, (30,))
    packed, pos, ctx = ids, torch.cat([torch.arange(12), torch.arange(18)]), AttnContext.from_lengths([12, 18])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model.train()
        h = model(packed, pos, ctx)
        (model.compute_logits(h).log_softmax(-1).gather(-1, packed[:, None]).sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() < 1e-10


def test_deterministic_mode_bitwise():
    set_deterministic(True)
    try:
        model = init_model(builtin_path("tiny"), seed=2)
        ids = torch.randint(0, 85, (40,))
        pos = torch.cat([torch.arange(25), torch.arange(15)])
        outs = []
        for _ in range(2):
            model.zero_grad()
            h = model(ids, pos, AttnContext.from_lengths([25, 15]))
            h.square().sum().backward()
            outs.append((h.detach(), model.model.embed_tokens.weight.grad.clone()))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    finally:
        set_deterministic(False)


def test_bf16_autocast_close_to_fp32():
    model = init_model(builtin_path("tiny"), seed=4)
    ids = torch.randint(0, 85, (24,))
    pos, ctx = torch.arange(24), AttnContext.from_lengths([24])
    with torch.no_grad():
        ref = model(ids, pos, ctx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, pos, ctx)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert torch.isfinite(out).all() and (out.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_bf16_weights_model_close_to_fp32():
    """A bf16 model (load_model(dtype=torch.bfloat16), e.g. for rollouts) against its fp32 self."""
    model = init_model(builtin_path("tiny"), seed=8)
    lens = [17, 30, 5]
    ids = torch.randint(0, 85, (sum(lens),))
    pos = torch.cat([torch.arange(n) for n in lens])
    ctx = AttnContext.from_lengths(lens)
    with torch.no_grad():
        ref = model.double()(ids, pos, ctx)
        same = model.float()(ids, pos, ctx)
        out = model.bfloat16()(ids, pos, ctx)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    err, base = (out.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item() and base < 1e-4 * ref.abs().max().item()


def test_fused_logprobs_from_hidden_match_logits():
    ops = pytest.importorskip("reasonrl.ops")
    if not hasattr(ops, "linear_token_logprobs"):
        pytest.skip("reasonrl.ops.linear_token_logprobs not exported yet")
    model = init_model(builtin_path("tiny"), seed=6).double()
    ids = torch.randint(0, 85, (33,))
    h = model(ids, torch.arange(33), AttnContext.from_lengths([33]))
    lp = ops.linear_token_logprobs(h, model.lm_head_weight, ids, backend="reference")
    ref = model.compute_logits(h).log_softmax(-1).gather(-1, ids[:, None])[:, 0]
    assert (lp.double() - ref).abs().max().item() < 1e-5


def test_tiny_builtin_and_tokenizer():
    cfg = ModelConfig.from_json(builtin_path("tiny"))
    tok = load_tokenizer(builtin_path("tiny"))
    assert cfg.vocab_size == len(tok) and cfg.tie_word_embeddings and cfg.hidden_size == 128
    assert 0.5e6 < sum(p.numel() for p in CausalLM(cfg).parameters()) < 1.2e6
    text = "What is 4093*7?\n<think>4093*7: 3*7=21 write 1 carry 2, 9*7=63+2=65 write 5 carry 6</think><answer>28651</answer>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert len(tok.encode(tag)) == 1
    assert tok.eos_token_id == cfg.eos_token_id and tok.bos_token_id == cfg.bos_token_id
    assert len(ids) == len(text) - sum(len(t) - 1 for t in ("<think>", "</think>", "<answer>", "</answer>"))


@pytest.mark.parametrize("bad,msg", [
    (dict(arch="deepseek_v3"), "unknown arch"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "longrope"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
])
def test_config_errors(bad, msg):
    kw = dict(vocab_size=10, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=4)
    kw.update(bad)
    with pytest.raises(ValueError, match=msg):
        ModelConfig(**kw)


def test_forward_input_errors():
    model = init_model(builtin_path("tiny"))
    ids = torch.randint(0, 85, (6,))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, torch.arange(6), AttnContext.from_lengths([3, 2]))
    with pytest.raises(ValueError, match="input_ids and positions"):
        model(ids, torch.arange(5), AttnContext.from_lengths([6]))
    with pytest.raises(ValueError, match="decode"):
        model(ids, torch.arange(6), AttnContext(cu_seqlens=torch.tensor([0, 6], dtype=torch.int32), max_seqlen=6, is_prefill=False))
    with pytest.raises(ValueError, match="positive"):
        AttnContext.from_lengths([3, 0])
    # named errors, not torch's generic ones (sixteenth session)
    V, pos = model.config.vocab_size, torch.arange(6)
    for bad in (torch.tensor([0, 1, 2, V, 4, 5]), torch.tensor([0, -1, 2, 3, 4, 5])):
        with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size"):
            model(bad, pos, AttnContext.from_lengths([6]))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        model(ids, pos - 1, AttnContext.from_lengths([6]))
    for cu in (torch.tensor([[0, 6]], dtype=torch.int32), torch.tensor([0.0, 6.0]), torch.tensor([0], dtype=torch.int32)):
        with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32/int64 tensor"):
            model(ids, pos, AttnContext(cu_seqlens=cu, max_seqlen=6))
    for m in (5, 6.0, None):  # a max_seqlen below the longest sequence was silently wrong with flash-attn
        with pytest.raises(ValueError, match="max_seqlen must be an int >= the longest sequence"):
            model(ids, pos, AttnContext(cu_seqlens=torch.tensor([0, 6], dtype=torch.int32), max_seqlen=m))
    model(ids, pos, AttnContext(cu_seqlens=torch.tensor([0, 6]), max_seqlen=8))  # int64 offsets, room to spare


def test_swiglu_and_rope_functions_gradcheck():
    from reasonrl.models.functional import SwiGLUFunction, apply_rope
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((10, 6), (10, 6), (6, 10))]
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (x, *ws))
    ang = torch.randn(9, 1, 4, dtype=torch.float64)
    q = torch.randn(9, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q: apply_rope(q, ang.cos(), ang.sin()), (q,))


def test_swiglu_function_under_autocast():
    """SwiGLUFunction as a GPU training step runs it: float32 weights and input under bf16 autocast. The
    output is bf16; gradients come back in each argument's own dtype (float32), within bf16's error of
    the float64 gradients; the weights' bf16 casts are made once, in the forward."""
    from reasonrl.models.functional import SwiGLUFunction

    N, H, I = 37, 24, 40
    x = torch.randn(N, H, requires_grad=True)
    ws = [(torch.randn(I, H) / H ** 0.5).requires_grad_(True), (torch.randn(I, H) / H ** 0.5).requires_grad_(True),
          (torch.randn(H, I) / I ** 0.5).requires_grad_(True)]
    dy = torch.randn(N, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = SwiGLUFunction.apply(x, *ws)
    assert y.dtype == torch.bfloat16
    got = torch.autograd.grad(y, [x, *ws], dy.bfloat16())
    x64, w64 = x.detach().double().requires_grad_(True), [w.detach().double().requires_grad_(True) for w in ws]
    g64, u64 = x64 @ w64[0].t(), x64 @ w64[1].t()
    y64 = (torch.nn.functional.silu(g64) * u64) @ w64[2].t()
    want = torch.autograd.grad(y64, [x64, *w64], dy.double())
    for name, a, b in zip(("x", "w_gate", "w_up", "w_down"), got, want):
        assert a.dtype == torch.float32, name
        err = (a.double() - b).abs().max().item()
        assert err <= 3e-2 * b.abs().max().item(), f"{name}: {err:.3e} vs {b.abs().max().item():.3e}"
    assert (y.double() - y64).abs().max().item() <= 3e-2 * y64.abs().max().item()


@pytest.mark.parametrize("bias", [False, True])
def test_qkv_function_gradcheck(bias):
    from reasonrl.models.functional import QKVFunction
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(n, 6, dtype=torch.float64, requires_grad=True) for n in (8, 4, 4)]
    bs = [torch.randn(n, dtype=torch.float64, requires_grad=True) if bias else None for n in (8, 4, 4)]
    assert torch.autograd.gradcheck(lambda *a: QKVFunction.apply(*a), (x, *ws, *bs))
    # only some outputs used (the others get zero gradients); x alone needing a gradient
    q, k, v = QKVFunction.apply(x, *(w.detach() for w in ws), *bs)
    gx, = torch.autograd.grad(k.sum(), [x])
    assert torch.allclose(gx, ws[1].detach().sum(0).expand(7, 6))
    # with RoPE on q and k inside (head_dim 4: q two heads, k one): against the Linears then apply_rope
    from reasonrl.models.functional import apply_rope
    ang = torch.randn(7, 1, 2, dtype=torch.float64)
    cos, sin = ang.cos(), ang.sin()
    assert torch.autograd.gradcheck(lambda *a: QKVFunction.apply(*a, cos, sin, 4), (x, *ws, *bs))
    got = QKVFunction.apply(x, *ws, *bs, cos, sin, 4)
    lin = [torch.nn.functional.linear(x, w, b) for w, b in zip(ws, bs)]
    want = [apply_rope(lin[0].view(7, 2, 4), cos, sin).view(7, 8), apply_rope(lin[1].view(7, 1, 4), cos, sin).view(7, 4),
            lin[2]]
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_qkv_function_under_autocast(bias):
    """The packed projection as a GPU training step runs it: float32 weights under bf16 autocast. Outputs
    are the three Linears' under autocast (one GEMM over the stacked weights); gradients come back float32,
    within bf16's error of float64, the weights' as row views of one stacked gradient that accumulate
    like any other (a second backward adds)."""
    from reasonrl.models.functional import QKVFunction
    N, H, sizes = 33, 24, (32, 8, 8)
    x = torch.randn(N, H).requires_grad_(True)
    ws = [(torch.randn(n, H) / H ** 0.5).requires_grad_(True) for n in sizes]
    bs = [(0.1 * torch.randn(n)).requires_grad_(True) if bias else None for n in sizes]
    dys = [torch.randn(N, n) for n in sizes]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = QKVFunction.apply(x, *ws, *bs)
        want = [torch.nn.functional.linear(x, w, b) for w, b in zip(ws, bs)]
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and g.shape == w.shape
        assert (g.float() - w.float()).abs().max().item() <= 2e-2 * w.float().abs().max().item()
    params = [x, *ws, *(b for b in bs if b is not None)]
    sum((g.float() * d).sum() for g, d in zip(got, dys)).backward()
    first = [p.grad.clone() for p in params]
    x64 = x.detach().double().requires_grad_(True)
    p64 = [t.detach().double().requires_grad_(True) for t in params[1:]]
    w64, b64 = p64[:3], (p64[3:] if bias else [None] * 3)
    ys = [torch.nn.functional.linear(x64, w, b) for w, b in zip(w64, b64)]
    ref = torch.autograd.grad(sum((y * d.double()).sum() for y, d in zip(ys, dys)), [x64, *p64])
    for p, g, r in zip(params, first, ref):
        assert g.dtype == torch.float32 and g.shape == p.shape
        assert (g.double() - r).abs().max().item() <= 3e-2 * r.abs().max().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = QKVFunction.apply(x, *ws, *bs)
    sum((g.float() * d).sum() for g, d in zip(got, dys)).backward()
    for p, g in zip(params, first):
        assert torch.allclose(p.grad, 2 * g, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_function(bias):
    """LinearFunction (the attention's output projection on CUDA): float64 gradcheck; under bf16 autocast
    the Linear's values, float32 gradients within bf16's error of float64 that accumulate."""
    from reasonrl.models.functional import LinearFunction
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(lambda *a: LinearFunction.apply(*a), (x, w, b))
    N, H, O = 33, 24, 40
    x = torch.randn(N, H).requires_grad_(True)
    w = (torch.randn(O, H) / H ** 0.5).requires_grad_(True)
    b = (0.1 * torch.randn(O)).requires_grad_(True) if bias else None
    dy = torch.randn(N, O)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = LinearFunction.apply(x, w, b)
        want = torch.nn.functional.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert (got.float() - want.float()).abs().max().item() <= 2e-2 * want.float().abs().max().item()
    (got.float() * dy).sum().backward()
    params = [x, w] + ([b] if bias else [])
    first = [p.grad.clone() for p in params]
    p64 = [p.detach().double().requires_grad_(True) for p in params]
    ref = torch.autograd.grad((torch.nn.functional.linear(*p64, *([] if bias else [None])) * dy.double()).sum(), p64)
    for p, g, r in zip(params, first, ref):
        assert g.dtype == torch.float32 and g.shape == p.shape
        assert (g.double() - r).abs().max().item() <= 3e-2 * r.abs().max().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (LinearFunction.apply(x, w, b).float() * dy).sum().backward()
    for p, g in zip(params, first):
        assert torch.allclose(p.grad, 2 * g, rtol=1e-6, atol=1e-6)


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket) + ("." + func._overloadname if func._overloadname != "default" else ""))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_weight_gradient_gemm_writes_float32(device):
    """_mm_to: on CUDA a bf16 weight-gradient GEMM writes float32 from its accumulator (aten::mm.dtype;
    no bf16 rounding, no cast kernel); on CPU the product and a cast. Then through the three Functions
    under autocast: float32 weight gradients, and on CUDA no cast in their backward."""
    from reasonrl.models.functional import LinearFunction, QKVFunction, SwiGLUFunction, _mm_to
    torch.manual_seed(0)
    a = torch.randn(300, 64, device=device).bfloat16()
    b = torch.randn(300, 48, device=device).bfloat16()
    with _OpNames() as ops:
        got = _mm_to(a.t(), b, torch.float32)
    ref = a.t().double() @ b.double()
    assert got.dtype == torch.float32 and got.shape == (64, 48)
    rounded = (a.t() @ b).to(torch.float32)  # what autocast's Linear gives: bf16, then cast up
    if device == "cuda":
        assert "aten.mm.dtype" in ops.names and "aten._to_copy" not in ops.names, ops.names
        assert (got.double() - ref).abs().max() <= (rounded.double() - ref).abs().max()
        assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    else:
        assert torch.equal(got, rounded)
    N, H, I = 40, 32, 48
    x = torch.randn(N, H, device=device).bfloat16().requires_grad_(True)  # as the norms write it under autocast
    ws = {"linear": [torch.randn(16, H, device=device)], "qkv": [torch.randn(n, H, device=device) for n in (32, 16, 16)],
          "swiglu": [torch.randn(I, H, device=device), torch.randn(I, H, device=device), torch.randn(H, I, device=device)]}
    for name, w in ws.items():
        w = [(t / H ** 0.5).requires_grad_(True) for t in w]
        with torch.autocast(device, dtype=torch.bfloat16):
            if name == "linear":
                out = LinearFunction.apply(x, w[0], None).sum()
            elif name == "qkv":
                out = sum(o.sum() for o in QKVFunction.apply(x, *w, None, None, None))
            else:
                out = SwiGLUFunction.apply(x, *w).sum()
        assert out.dtype == torch.bfloat16  # so that the loss's own backward casts nothing
        with _OpNames() as ops:
            out.backward()
        for t in w:
            assert t.grad is not None and t.grad.dtype == torch.float32 and t.grad.shape == t.shape
        if device == "cuda":
            assert ops.names.count("aten.mm.dtype") == {"linear": 1, "qkv": 1, "swiglu": 2}[name], (name, ops.names)
            assert "aten._to_copy" not in ops.names, (name, ops.names)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_step_packing_ablation_is_the_same_model(family, monkeypatch):
    """FUSED["step"] off (bench_model.py's ablation): three q/k/v Linears and RoPE after them, each residual
    add before its norm; the same hidden states and gradients in float32, and neither QKVFunction nor
    AddRMSNormFunction runs."""
    from reasonrl.models import functional as Fn
    cfg = ModelConfig(arch=family, vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=family == "qwen2")
    model = init_model(cfg, seed=5)
    lens = [9, 13]
    ids = torch.randint(0, 61, (sum(lens),))
    pos = torch.cat([torch.arange(n) for n in lens])
    ctx = AttnContext.from_lengths(lens)
    calls = []
    for cls in (Fn.QKVFunction, Fn.AddRMSNormFunction):
        monkeypatch.setattr(cls, "apply", classmethod(lambda c, *a, _f=cls.apply: (calls.append(c.__name__), _f(*a))[1]))

    def run():
        model.zero_grad(set_to_none=True)
        h = model(ids, pos, ctx)
        (h * torch.linspace(-1, 1, h.numel()).view(h.shape)).sum().backward()
        return h.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    on = run()
    assert calls.count("QKVFunction") == 3 and calls.count("AddRMSNormFunction") == 3 * 2, calls
    calls.clear()
    monkeypatch.setitem(Fn.FUSED, "step", False)
    off = run()
    assert calls == []
    assert (on[0] - off[0]).abs().max() <= 1e-5 * off[0].abs().max()
    for n in on[1]:  # float32 sums in other orders (one GEMM for q/k/v's dx, not three added)
        assert (on[1][n] - off[1][n]).abs().max() <= 1e-5 * off[1][n].abs().max(), n


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("kernels", ["default", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1"))])
def test_training_forward_under_autocast_matches_separate_projections(family, kernels, monkeypatch):
    """Under bf16 autocast the training forward writes the norms' outputs in bf16 and runs q/k/v as one
    GEMM (QKVFunction): the same values autocast's casts and three Linears make, so hidden states and
    every gradient match that path within bf16 rounding; with no autocast nothing changes dtype."""
    import reasonrl.models.model as mm
    from reasonrl.models import functional as Fn
    if kernels == "triton":  # the GPU path's kernels (RMSNorm with bf16 out, add+norm, RoPE in place, SwiGLU)
        monkeypatch.setitem(Fn.FUSED, "force", True)
    cfg = ModelConfig(arch=family, vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, qk_norm=family == "qwen3",
                      attention_bias=family == "qwen2")
    model = init_model(cfg, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    lens = [11, 7, 14]
    ids = torch.randint(0, 61, (sum(lens),))
    pos = torch.cat([torch.arange(n) for n in lens])
    ctx = AttnContext.from_lengths(lens)
    seen = []
    monkeypatch.setattr(mm.Attention, "forward", lambda self, x, *a, _f=mm.Attention.forward: (
        seen.append(x.dtype), _f(self, x, *a))[1])

    def run(amp):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            h = model(ids, pos, ctx)
        (h.float() * torch.linspace(-1, 1, h.numel()).view(h.shape)).sum().backward()
        return h.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}

    new = run(True)
    assert seen == [torch.bfloat16] * 2  # the attention's input: the norm wrote bf16
    seen.clear()
    fp32 = run(False)
    assert seen == [torch.float32] * 2
    monkeypatch.setattr(mm, "qkv_proj", lambda x, q, k, v, rope=None: (q(x), k(x), v(x), False))
    monkeypatch.setattr(mm, "_gemm_dtype", lambda x: None)
    old = run(True)
    # Triton's interpreter rounds float32 -> bf16 toward zero (compiled Triton rounds to nearest, as
    # torch's casts do), so with its kernels the new path's bf16 norm outputs and in-kernel RoPE drift
    # further from the old path's torch casts (largest seen over 20 seeds: hidden 1.9e-2, gradients
    # 6.2e-2), hence the wider bounds there; an error of the path itself (a sign, a wrong column) is O(1).
    tol, htol = (1e-1, 4e-2) if kernels == "triton" else (3e-2, 2e-2)
    assert (new[0] - old[0]).abs().max().item() <= htol * old[0].abs().max().item()
    for n in old[1]:
        ref = old[1][n].abs().max().item()
        assert (new[1][n] - old[1][n]).abs().max().item() <= tol * ref + 1e-6, n
        assert (new[1][n] - fp32[1][n]).abs().max().item() <= 2 * tol * fp32[1][n].abs().max().item() + 1e-6, n


@pytest.mark.parametrize("family,force_fn", [("qwen2", False), ("qwen3", True)])
def test_gradients_match_transformers(family, force_fn, tmp_path, monkeypatch):
    """Training parity, not just logits: the gradient of every parameter against transformers'.
    force_fn: run the MLP through SwiGLUFunction (which the model uses on CUDA only) on CPU too."""
    if force_fn:
        import reasonrl.models.model as mm
        from reasonrl.models.functional import SwiGLUFunction
        monkeypatch.setattr(mm, "swiglu", SwiGLUFunction.apply)
    hf, path = hf_tiny(family, tmp_path, tie=family == "qwen3")
    hf.train()
    model = load_model(path).train()
    lens = [19, 7, 12, 16]
    L = max(lens)
    ids = torch.randint(0, 101, (len(lens), L))
    mask = torch.arange(L)[None] < torch.tensor(lens)[:, None]
    w = torch.randn(int(mask.sum()))  # one shared upstream gradient per token
    ref = hf(input_ids=ids, attention_mask=mask.long()).logits.log_softmax(-1)[mask].gather(-1, ids[mask][:, None])[:, 0]
    (ref * w).sum().backward()
    packed, pos, ctx = pack(ids, lens)
    out = model.compute_logits(model(packed, pos, ctx)).log_softmax(-1).gather(-1, packed[:, None])[:, 0]
    (out * w).sum().backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        g_ref = hf_params[name].grad
        assert (p.grad - g_ref).abs().max().item() <= 1e-4 * max(1.0, g_ref.abs().max().item()), name


_SMALL = dict(vocab_size=10, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=4)


@pytest.mark.parametrize("bad,msg", [
    (dict(num_attention_heads=0), "num_attention_heads must be positive"),  # was ZeroDivisionError
    (dict(num_key_value_heads=0), "num_key_value_heads must be positive"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps must be a finite number > 0"),  # was: every logit NaN
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps"),
    (dict(rms_norm_eps="1e-6"), "rms_norm_eps must be a number"),
    (dict(rope_theta=0.0), "rope_theta must be a finite number > 0"),
    (dict(max_position_embeddings=0), "max_position_embeddings must be positive"),
    (dict(vocab_size="85"), r"vocab_size must be a positive integer, got '85' \(str\)"),
    (dict(vocab_size=85.5), "vocab_size must be a positive integer"),
    (dict(vocab_size=10.0), "vocab_size must be a positive integer"),
    (dict(vocab_size=True), "vocab_size must be a positive integer"),
    (dict(hidden_size=2), "head_dim would be 0"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
    (dict(eos_token_id="x"), "eos_token_id"),
    (dict(eos_token_id=[2, -1]), "eos_token_id"),
    (dict(rope_scaling={"rope_type": "linear", "factor": -2.0}), "factor must be a finite number > 0"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "original_max_position_embeddings"),
])
def test_config_rejects_bad_values_naming_the_field(bad, msg):
    with pytest.raises(ValueError, match=msg):
        ModelConfig(**{**_SMALL, **bad})


def _write_config(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    return str(tmp_path / "config.json")


def test_config_json_errors_name_the_file_and_the_key(tmp_path):
    import json
    import re

    good = ModelConfig(**_SMALL).to_hf_dict()
    assert ModelConfig.from_json(_write_config(tmp_path, json.dumps(good))).vocab_size == 10

    def raises(text, msg):
        path = _write_config(tmp_path, text)
        with pytest.raises(ValueError, match=msg) as e:
            ModelConfig.from_json(str(tmp_path))
        assert path in str(e.value), str(e.value)

    raises("{not json", "not valid JSON")
    raises("[1, 2]", "expected a JSON object")  # was AttributeError
    raises(json.dumps({k: v for k, v in good.items() if k != "vocab_size"}), re.escape("missing required key(s) ['vocab_size']"))
    for key, value, msg in [("rms_norm_eps", -1.0, "rms_norm_eps"), ("max_position_embeddings", 0, "max_position_embeddings"),
                            ("vocab_size", "85", "vocab_size"), ("vocab_size", 85.5, "vocab_size"),
                            ("num_attention_heads", 0, "num_attention_heads"), ("hidden_size", "16", "hidden_size"),
                            ("tie_word_embeddings", "false", "tie_word_embeddings"),
                            ("num_key_value_heads", 0, "num_key_value_heads")]:
        raises(json.dumps({**good, key: value}), msg)
    # rope_theta 0 was silently replaced by 10000 (`or` chain), in both spellings
    raises(json.dumps({**good, "rope_theta": 0, "rope_parameters": None}), "rope_theta")
    raises(json.dumps({**good, "rope_parameters": {"rope_type": "default", "rope_theta": 0}}), "rope_theta")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_missing_config_keys_take_transformers_defaults(arch):
    """A config.json that leaves out head_dim, rope_theta, rms_norm_eps, num_key_value_heads or
    max_position_embeddings loads as the model transformers' class of that family builds (Qwen3 without
    head_dim took hidden / heads = 8 instead of 128; Mixtral without rope_theta and rms_norm_eps loaded
    silently with 1e4 and 1e-6 instead of 1e6 and 1e-5)."""
    from transformers import AutoConfig

    from reasonrl.models.config import ARCHITECTURES, ModelConfig
    keys = dict(vocab_size=100, hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=32)
    keys.update({"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
                 "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                   shared_expert_intermediate_size=64),
                 "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)}.get(arch, {}))
    ours = ModelConfig.from_hf_dict(dict(model_type=arch, architectures=[ARCHITECTURES[arch]], **keys))
    hf = AutoConfig.for_model(arch, **keys)
    rope = getattr(hf, "rope_parameters", None) or {}
    assert ours.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert ours.rope_theta == rope.get("rope_theta", getattr(hf, "rope_theta", None))
    assert ours.rms_norm_eps == hf.rms_norm_eps
    assert ours.num_key_value_heads == hf.num_key_value_heads
    assert ours.max_position_embeddings == hf.max_position_embeddings
    assert ours.tie_word_embeddings == hf.tie_word_embeddings


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("linear_loss", [False, True])
def test_double_backward_through_the_model_raises(arch, linear_loss):
    """The model's custom Functions (RMSNorm, q/k/v, RoPE, SwiGLU, attention) were once_differentiable: a
    gradient penalty through torch.autograd.grad(create_graph=True) lost their second-order terms without
    a word (0.88 relative error in float64, 2026-11-30); now the double backward raises, naming the
    Function, and a plain backward is unchanged."""
    cfg = ModelConfig(arch=arch, vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = init_model(cfg, seed=1).double()
    ids, pos = torch.randint(0, 40, (11,)), torch.cat([torch.arange(6), torch.arange(5)])
    ctx = AttnContext.from_lengths([6, 5])
    h = model(ids, pos, ctx)
    loss = h.sum() if linear_loss else h.pow(2).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    model(ids, pos, ctx).pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
               and p is not model.lm_head.weight)


def test_attention_dropout_is_noted_not_applied(capsys):
    cfg = ModelConfig.from_hf_dict({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 40,
                                    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                                    "num_attention_heads": 4, "num_key_value_heads": 2, "attention_dropout": 0.1})
    assert cfg.arch == "qwen2"
    assert "attention_dropout=0.1 is not applied" in capsys.readouterr().err


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("name", ["q_proj", "v_proj", "gate_proj", "down_proj"])
def test_a_weight_changed_between_forward_and_backward_raises(autocast, name):
    """The fused q/k/v and SwiGLU Functions keep stacked or cast copies of the weights: a weight changed in
    place between forward and backward (an optimizer step in the wrong place) gave gradients of the old
    weights without a word; now autograd's in-place check fires, as it does for plain Linears."""
    from reasonrl.models.functional import fused_ok
    cfg = ModelConfig(arch="qwen2", vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = init_model(cfg, seed=2)
    if name in ("gate_proj", "down_proj") and not fused_ok(torch.zeros(1)):
        pytest.skip("SwiGLU runs as plain Linears here (no fused CPU kernels)")
    ids, pos = torch.randint(0, 40, (9,)), torch.arange(9)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, pos, AttnContext.from_lengths([9])).float().pow(2).sum()
    w = dict(model.named_parameters())[f"model.layers.0.{'self_attn' if name[0] in 'qkv' else 'mlp'}.{name}.weight"]
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
