"""ModelConfig: the few numbers a dense decoder needs, parsed from a Hugging Face config.json.

We parse the JSON ourselves (not through transformers' config classes) so that both spellings of
RoPE settings load: `rope_theta` + `rope_scaling` (transformers 4.x files) and `rope_parameters`
(transformers 5.x files). Anything that would change the math and that we do not implement
(sliding windows, MLP bias, other activations, unknown rope types) raises, naming the option:
a silently different model is worse than no model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

# model_type -> the architectures name transformers writes into config.json
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class ModelConfig:
    arch: str = "llama"  # "llama" | "qwen2" | "qwen3"
    vocab_size: int = 85
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": ..., "factor": ..., ...}; None for plain RoPE
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q/k/v (Qwen2: always; llama/qwen3: also on o_proj)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict, repr=False)  # other config.json keys, written back on save

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"ModelConfig: unknown arch {self.arch!r}; supported: {sorted(ARCHITECTURES)}")
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"ModelConfig: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim must be even for RoPE, got {self.head_dim}")
        if self.arch == "qwen2":
            self.attention_bias = True
        if self.arch == "qwen3":
            self.qk_norm = True
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)

    @property
    def o_bias(self) -> bool:
        # Qwen2 puts biases on q/k/v only; Llama and Qwen3's attention_bias covers o_proj too.
        return self.attention_bias and self.arch != "qwen2"

    # ---- Hugging Face config.json -------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        arch = _arch_of(d)
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
        if d.get("mlp_bias", False):
            raise ValueError("config.json: mlp_bias=true is not supported")
        if d.get("use_sliding_window", False):
            raise ValueError("config.json: use_sliding_window=true is not supported (full attention only)")
        if "sliding_attention" in (d.get("layer_types") or []):
            raise ValueError("config.json: layer_types with 'sliding_attention' are not supported")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"config.json: pretraining_tp={d['pretraining_tp']} is not supported (only 1)")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        if rope and any(isinstance(v, dict) for v in rope.values()):
            raise ValueError("config.json: per-layer-type rope_parameters are not supported")
        theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
        if rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) not in (1, 1.0, None):
            raise ValueError("config.json: partial_rotary_factor != 1 is not supported")
        rtype = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        scaling = None if rtype == "default" else {"rope_type": rtype, **rope}
        if scaling and rtype in ("llama3", "yarn"):
            scaling.setdefault("original_max_position_embeddings",
                               d.get("original_max_position_embeddings") or d["max_position_embeddings"])
        n_heads = d["num_attention_heads"]
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in d.items() if k not in known and k not in _DERIVED_KEYS}
        return cls(
            arch=arch, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_heads, num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads, rope_theta=float(theta),
            rope_scaling=scaling, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=d.get("attention_bias", arch == "qwen2"), qk_norm=arch == "qwen3",
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), extra=extra,
        )

    def to_hf_dict(self) -> dict:
        """A config.json that transformers (4.x and 5.x) parses into the same model."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        d = dict(self.extra)
        d.update(
            architectures=[ARCHITECTURES[self.arch]], model_type=self.arch, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id, rope_theta=self.rope_theta, rope_parameters=rope,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
        )
        if self.arch != "qwen2":
            d["attention_bias"] = self.attention_bias
        if self.arch == "llama":
            d["mlp_bias"] = False
        else:
            d["use_sliding_window"] = False
        return d

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ModelConfig.from_json: no config.json at {path!r}")
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    def save_json(self, folder: str) -> None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


# Keys we rewrite ourselves on save (and must not carry over stale from `extra`).
_DERIVED_KEYS = {"architectures", "model_type", "rope_parameters", "rope_scaling", "hidden_act", "mlp_bias",
                 "use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "dtype",
                 "torch_dtype", "transformers_version", "partial_rotary_factor",
                 "original_max_position_embeddings"}


def _arch_of(d: dict) -> str:
    mt = d.get("model_type")
    archs = d.get("architectures") or []
    by_name = {v: k for k, v in ARCHITECTURES.items()}
    for a in archs:
        if a not in by_name:
            raise ValueError(f"config.json: unknown architecture {a!r}; supported: {sorted(by_name)}")
    if mt is None and not archs:
        raise ValueError("config.json: neither model_type nor architectures is set")
    if mt is not None and mt not in ARCHITECTURES:
        raise ValueError(f"config.json: unknown model_type {mt!r}; supported: {sorted(ARCHITECTURES)}")
    return mt or by_name[archs[0]]


def _check_rope_scaling(s: dict | None) -> dict | None:
    if not s:
        return None
    s = dict(s)
    rtype = s.get("rope_type") or s.get("type")
    if rtype not in ROPE_TYPES:
        raise ValueError(f"rope_scaling: rope type {rtype!r} is not supported; supported: {list(ROPE_TYPES)}")
    s.pop("type", None)
    s["rope_type"] = rtype
    if rtype == "default":
        return None
    if rtype in ("linear", "llama3") and not s.get("factor"):
        raise ValueError(f"rope_scaling: rope type {rtype!r} needs a 'factor'")
    if rtype == "llama3":
        for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if k not in s:
                raise ValueError(f"rope_scaling: rope type 'llama3' needs {k!r}")
    return s
