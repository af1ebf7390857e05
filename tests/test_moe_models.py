"""MoE decoders (Qwen2-MoE with its shared expert, Qwen3-MoE, Mixtral) against transformers:
logits, the load-balancing aux loss and its gradient, checkpoints both ways (per-expert and fused
tensor names), greedy decode in the rollout engine, and config options we refuse."""
import json
import os

import pytest
import torch

from reasonrl.models import AttnContext, CausalLM, ModelConfig, init_model, init_weights, load_model, save_model

transformers = pytest.importorskip("transformers")

V = 97
# (family, transformers config kwargs): every family once, with dense layers placed by
# mlp_only_layers (Qwen2-MoE) and decoder_sparse_step (Qwen3-MoE), both norm_topk_prob settings.
FAMILIES = {
    "qwen2_moe": dict(num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=40, intermediate_size=56, mlp_only_layers=[1],
                      norm_topk_prob=False),
    "qwen3_moe": dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                      intermediate_size=56, decoder_sparse_step=2, norm_topk_prob=True),
    "mixtral": dict(num_hidden_layers=2, num_local_experts=6, num_experts_per_tok=2, intermediate_size=24),
}
CONFIGS = {"qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig", "mixtral": "MixtralConfig"}


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_moe(family, path, **over):
    """A random-init tiny transformers MoE model, parameters perturbed so that norms and biases
    count, router weights large enough that no top-k choice is a near tie; saved to `path`."""
    kw = dict(vocab_size=V, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
              pad_token_id=None, **FAMILIES[family])
    kw.update(over)
    cfg = getattr(transformers, CONFIGS[family])(**kw)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if name.endswith("mlp.gate.weight") else 0.1))
    hf.save_pretrained(str(path))
    return hf


def hf_config_dict(family):
    return getattr(transformers, CONFIGS[family])(vocab_size=V, hidden_size=64, num_attention_heads=4,
                                                  num_key_value_heads=2, **FAMILIES[family]).to_dict()


def packed(seqs):
    return torch.cat(seqs), torch.cat([torch.arange(len(s)) for s in seqs]), AttnContext.from_lengths([len(s) for s in seqs])


def our_logits(model, seqs):
    ids, pos, ctx = packed(seqs)
    with torch.no_grad():
        return model.compute_logits(model(ids, pos, ctx))  # (total, V)


def hf_logits(hf, seqs):
    with torch.no_grad():
        return torch.cat([hf(input_ids=s[None]).logits[0] for s in seqs])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_parity_packed_vs_transformers_per_sequence(family, tmp_path):
    hf = hf_moe(family, tmp_path / family)
    model = load_model(str(tmp_path / family)).eval()
    c = model.config
    assert c.arch == family and c.is_moe
    sparse = [i for i in range(c.num_hidden_layers) if c.is_sparse_layer(i)]
    hf_sparse = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    assert sparse == hf_sparse and 0 < len(sparse)
    if family != "mixtral":
        assert len(sparse) < c.num_hidden_layers  # a dense layer is in the mix
    seqs = [torch.randint(0, V, (n,)) for n in (29, 1, 7, 16)]
    assert (our_logits(model, seqs) - hf_logits(hf, seqs)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_aux_loss_and_its_gradient_match_transformers(family, tmp_path):
    hf = hf_moe(family, tmp_path / family, router_aux_loss_coef=0.02)
    model = load_model(str(tmp_path / family))
    lens = [11, 4, 9]
    seqs = [torch.randint(0, V, (n,)) for n in lens]
    ids = torch.zeros(len(lens), max(lens), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = s, 1
    ref = hf(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss  # padding excluded
    ref.backward()
    got = model.load_balancing_loss() if model(*packed(seqs)) is not None else None
    assert len(model.router_logits) == sum(model.config.is_sparse_layer(i) for i in range(model.num_layers))
    assert abs(got.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    got.backward()
    for i, layer in enumerate(model.model.layers):
        if layer.sparse:
            g, g_ref = layer.mlp.gate.weight.grad, hf.model.layers[i].mlp.gate.weight.grad
            assert (g - g_ref).abs().max().item() <= 1e-5 * max(1.0, g_ref.abs().max().item())
    assert abs(model.aux_loss().item() - 0.02 * ref.item()) <= 1e-6
    # a mask drops tokens: the loss over all but the last sequence equals the loss of a forward without it
    keep = torch.cat([torch.full((n,), b < 2) for b, n in enumerate(lens)])
    masked = model.load_balancing_loss(mask=keep)
    model(*packed(seqs[:2]))
    assert abs(masked.item() - model.load_balancing_loss().item()) <= 1e-6


def test_router_logits_kept_only_with_grad_and_once_under_checkpointing(tmp_path):
    cfg = ModelConfig(arch="qwen3_moe", vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16)
    model = init_model(cfg, seed=int(torch.randint(0, 1000, ()))).double()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(30)  # well-separated routing
    seqs = [torch.randint(0, 50, (n,)) for n in (12, 5)]
    with torch.no_grad():
        model(*packed(seqs))
    assert model.router_logits == []
    with pytest.raises(ValueError, match="no router logits"):
        model.aux_loss()
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.train().zero_grad()
        h = model(*packed(seqs))
        assert len(model.router_logits) == 2 and model.router_logits[0].shape == (17, 4)
        loss = h.square().mean() + model.aux_loss()
        loss.backward()
        assert len(model.router_logits) == 2  # the recompute in backward recorded nothing
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("experts" in n for n in grads[0])
    for n in grads[0]:
        assert (grads[0][n] - grads[1][n]).abs().max().item() < 1e-12, n


@pytest.mark.parametrize("family,shard", [("qwen2_moe", None), ("qwen3_moe", "60KB"), ("mixtral", None)])
def test_we_save_transformers_loads(family, shard, tmp_path):
    hf_moe(family, tmp_path / "src")
    model = load_model(str(tmp_path / "src")).eval()
    save_model(model, str(tmp_path / "ours"), max_shard_size=shard)
    if shard:
        assert os.path.isfile(tmp_path / "ours" / "model.safetensors.index.json")
    names = json.load(open(tmp_path / "ours" / "model.safetensors.index.json"))["weight_map"] if shard else None
    if names is not None:  # the Hub's per-expert names
        prefix = "block_sparse_moe" if family == "mixtral" else "mlp"
        assert not any(k.endswith("gate_up_proj") for k in names) and any(f".{prefix}.experts.0." in k for k in names)
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), attn_implementation="eager").eval()
    assert hf2.config.model_type == family
    seqs = [torch.randint(0, V, (n,)) for n in (13, 6)]
    assert (our_logits(model, seqs) - hf_logits(hf2, seqs)).abs().max().item() <= 1e-4
    again = load_model(str(tmp_path / "ours"))
    for (n, p), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n == n2 and torch.equal(p, p2), n


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_fused_expert_tensor_names_load(family, tmp_path):
    """A file with transformers' in-memory names (mlp.experts.gate_up_proj, mlp.gate) loads the same."""
    from safetensors.torch import save_file

    hf = hf_moe(family, tmp_path / "hub")
    path = tmp_path / "fused"
    os.makedirs(path)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path / "model.safetensors"))
    os.replace(tmp_path / "hub" / "config.json", path / "config.json")
    model = load_model(str(path)).eval()
    seqs = [torch.randint(0, V, (n,)) for n in (10, 3)]
    assert (our_logits(model, seqs) - hf_logits(hf, seqs)).abs().max().item() <= 1e-4


def test_missing_expert_and_wrong_shape_raise(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_moe("qwen3_moe", tmp_path / "m")
    f = str(tmp_path / "m" / "model.safetensors")
    sd = load_file(f)
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    assert name in sd
    save_file({k: v for k, v in sd.items() if k != name}, f)
    with pytest.raises(ValueError, match="missing.*experts.gate_up_proj"):
        load_model(str(tmp_path / "m"))
    save_file({**sd, name: sd[name][:, :-1].contiguous()}, f)
    with pytest.raises(ValueError, match="experts.5.up_proj.*shape"):
        load_model(str(tmp_path / "m"))
    save_file({**sd, "model.layers.1.mlp.experts.8.up_proj.weight": sd[name].clone()}, f)  # E = 8: ids 0..7
    with pytest.raises(ValueError, match="unexpected tensor.*experts.8"):
        load_model(str(tmp_path / "m"))


@pytest.mark.parametrize("family,bad,match", [
    ("mixtral", dict(sliding_window=64), "sliding_window"),
    ("mixtral", dict(router_jitter_noise=0.1), "router_jitter_noise"),
    ("qwen3_moe", dict(hidden_act="gelu"), "hidden_act"),
    ("qwen2_moe", dict(use_sliding_window=True), "use_sliding_window"),
    ("qwen3_moe", dict(num_experts_per_tok=9), "num_experts_per_tok"),
    ("qwen2_moe", dict(decoder_sparse_step=0), "decoder_sparse_step"),
])
def test_unsupported_options_raise_naming_them(family, bad, match, tmp_path):
    d = hf_config_dict(family)
    d.update(bad)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_config_round_trip(family):
    d = hf_config_dict(family)
    c = ModelConfig.from_hf_dict(d)
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    hc = getattr(transformers, CONFIGS[family]).from_dict(c.to_hf_dict())
    for k in ("num_experts_per_tok", "router_aux_loss_coef", "output_router_logits"):
        assert getattr(hc, k) == getattr(c, k)
    assert (hc.num_local_experts if family == "mixtral" else hc.num_experts) == c.num_experts


def test_engine_greedy_decode_matches_transformers_generate(tmp_path):
    """The rollout engine's paged prefill + decode with an MoE model: few tokens per expert per
    decode step (batch of 5 over 8 experts, top-2), token for token equal to transformers."""
    from reasonrl.engine import LLMEngine, SamplingParams

    hf = hf_moe("qwen2_moe", tmp_path / "m", num_experts=8, mlp_only_layers=[], decoder_sparse_step=1)
    model = load_model(str(tmp_path / "m")).eval()
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (5, 12, 1, 8, 3)]
    n_new = 10
    eng = LLMEngine(model, block_size=4, eos_token_ids=[], use_cuda_graphs=model.supports_cuda_graphs)
    out = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=n_new))
    for p, (c,) in zip(prompts, out):
        ids = torch.tensor([p])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                          pad_token_id=0)[0, len(p):].tolist()
        assert c.token_ids == ref, f"prompt of length {len(p)}"


def _moe_config(arch, **kw):
    base = dict(vocab_size=V, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=4, moe_intermediate_size=64,
                tie_word_embeddings=False)
    base.update(kw)
    return ModelConfig(arch=arch, **base)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp32_and_bf16_autocast_match_float64(device):
    """top_k = E: the routing weights are a smooth softmax, so low precision cannot flip an expert
    choice and a max-error bound holds. Gradients reach the fp32 master weights through bf16."""
    cfg = _moe_config("qwen2_moe", norm_topk_prob=True, shared_expert_intermediate_size=80, attention_bias=True)
    model = init_model(cfg, seed=int(torch.randint(0, 1000, ())))
    lens = [70, 1, 33]
    ids = torch.randint(0, V, (sum(lens),))
    pos = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        ref = model.double()(ids, pos, AttnContext.from_lengths(lens)).float()
        model = model.float().to(device)
        ctx = AttnContext.from_lengths(lens, device)
        out32 = model(ids.to(device), pos.to(device), ctx).cpu()
        with torch.autocast(device, dtype=torch.bfloat16):
            out16 = model(ids.to(device), pos.to(device), ctx).float().cpu()
    scale = ref.abs().max().item()
    assert (out32 - ref).abs().max().item() < 1e-3 * scale
    assert (out16 - ref).abs().max().item() < 5e-2 * scale
    with torch.autocast(device, dtype=torch.bfloat16):
        h = model(ids.to(device), pos.to(device), ctx)
    (h.float().square().mean() + model.aux_loss()).backward()
    for n, p in model.named_parameters():
        if n == "lm_head.weight":  # the loss is on hidden states
            continue
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n
    assert all(layer.mlp.experts.gate_up_proj.grad.abs().sum() > 0 for layer in model.model.layers)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_engine_decode_consistent_with_packed_forward(device):
    """Greedy rollouts of a top-2-of-8 model: every generated token is the argmax of the model's own
    packed forward over prompt + completion (a near tie, top-2 logit gap < 1e-3, may go either way)."""
    from reasonrl.engine import LLMEngine, SamplingParams

    cfg = _moe_config("qwen3_moe", num_experts=8, num_experts_per_tok=2, num_hidden_layers=3, mlp_only_layers=[1])
    model = init_weights(CausalLM(cfg), seed=int(torch.randint(0, 1000, ())), std=0.1).to(device).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.sparse:
                layer.mlp.gate.weight.mul_(20)  # spread the router logits: few near-tie expert choices
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (9, 1, 4, 14, 6, 2)]
    eng = LLMEngine(model, block_size=4, eos_token_ids=[], use_cuda_graphs=model.supports_cuda_graphs)
    out = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    for p, (c,) in zip(prompts, out):
        full = torch.tensor(p + c.token_ids, device=device)
        with torch.no_grad():
            logits = model.compute_logits(model(full, torch.arange(len(full), device=device),
                                                AttnContext.from_lengths([len(full)], device)))[len(p) - 1:-1]
        top2 = logits.topk(2, dim=-1).values
        agree = logits.argmax(-1).cpu() == torch.tensor(c.token_ids)
        assert (agree | (top2[:, 0] - top2[:, 1] < 1e-3).cpu()).all(), f"prompt of length {len(p)}"


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_training_checkpoint_round_trip_and_copies(family, tmp_path):
    """A training checkpoint of an MoE policy (experts saved per expert, as the Hub has them) loads back
    into the stacked parameters (--resume); a missing expert piece is an error, not uninitialized
    memory. After a training forward (router state kept for the aux loss), the engine's bf16 rollout
    copy and a reference-model copy work."""
    import copy

    from reasonrl.engine import LLMEngine
    from reasonrl.train.checkpoint import load_checkpoint, save_checkpoint
    from reasonrl.train.common import copy_model, moe_aux_loss
    cfg = ModelConfig(arch=family, vocab_size=50, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16)
    model = init_model(cfg, seed=1)
    opt = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(str(tmp_path), model, opt, {"step": 1})
    other = init_model(cfg, seed=2)
    load_checkpoint(path, other, torch.optim.AdamW(other.parameters()))
    for (n, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), n
    from safetensors.torch import load_file, save_file
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    dropped = next(k for k in tensors if ".experts.3." in k)
    del tensors[dropped]
    save_file(tensors, file)
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(path, init_model(cfg, seed=2))

    seqs = [torch.randint(0, 50, (n,)) for n in (7, 4)]
    model(*packed(seqs)).sum().backward()  # a training forward: router state kept
    assert model.router_logits
    eng = LLMEngine(model, dtype=torch.bfloat16)
    assert next(eng._rollout_model().parameters()).dtype == torch.bfloat16
    model(*packed(seqs)).sum()
    ref = copy_model(model)
    assert not model.router_logits and not ref.router_logits
    model(*packed(seqs))
    aux = moe_aux_loss(model)
    assert aux is not None and not model.router_logits  # read, then dropped
    copy.deepcopy(model)
