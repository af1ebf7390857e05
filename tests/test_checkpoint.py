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
