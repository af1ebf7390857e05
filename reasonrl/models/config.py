"""ModelConfig: the few numbers a decoder needs, parsed from a Hugging Face config.json.

We parse the JSON ourselves (not through transformers' config classes) so that both spellings of
RoPE settings load: `rope_theta` + `rope_scaling` (transformers 4.x files) and `rope_parameters`
(transformers 5.x files). Anything that would change the math and that we do not implement
(sliding windows, MLP bias, other activations, unknown rope types) raises, naming the option:
a silently different model is worse than no model.

Mixture-of-experts families (Qwen2-MoE, Qwen3-MoE, Mixtral) add the expert count, top-k, the
experts' width and which layers are sparse. transformers' rule for Qwen (decoder layer i):
    sparse(i) = i not in mlp_only_layers and num_experts > 0 and (i + 1) % decoder_sparse_step == 0
Mixtral: every layer sparse, and its `intermediate_size` is the experts' width. Router top-k
weights are renormalized when norm_topk_prob (Qwen) and always for Mixtral.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import sys
from dataclasses import dataclass, field

# model_type -> the architectures name transformers writes into config.json
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
MOE_ARCHS = ("qwen2_moe", "qwen3_moe", "mixtral")
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


@dataclass
class ModelConfig:
    arch: str = "llama"  # "llama" | "qwen2" | "qwen3" | "qwen2_moe" | "qwen3_moe" | "mixtral"
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
    # mixture of experts (MOE_ARCHS only)
    num_experts: int = 0  # E; Qwen2-MoE with 0 experts is all dense
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # I of each routed expert (Mixtral: = intermediate_size)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert, gated by sigmoid(x w_g)
    norm_topk_prob: bool = False  # renormalize the top-k weights to sum 1 (Mixtral: always)
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False  # transformers adds the aux loss to its LM loss only when set
    extra: dict = field(default_factory=dict, repr=False)  # other config.json keys, written back on save

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"ModelConfig: unknown arch {self.arch!r}; supported: {sorted(ARCHITECTURES)}")
        for name in _POSITIVE_INTS:
            setattr(self, name, _int_field(name, getattr(self, name), 1))
        for name in ("head_dim", *_MOE_INTS):  # head_dim 0: derived; MoE sizes 0: off
            setattr(self, name, _int_field(name, getattr(self, name), 0))
        for name in ("rms_norm_eps", "rope_theta"):
            setattr(self, name, _real_field(name, getattr(self, name), positive=True))
        self.router_aux_loss_coef = _real_field("router_aux_loss_coef", self.router_aux_loss_coef)
        for name in ("tie_word_embeddings", "attention_bias", "qk_norm", "norm_topk_prob", "output_router_logits"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig: {name} must be true or false, got {getattr(self, name)!r}")
        self.bos_token_id = _token_ids("bos_token_id", self.bos_token_id)
        self.eos_token_id = _token_ids("eos_token_id", self.eos_token_id)
        if isinstance(self.mlp_only_layers, (str, bytes)) or not isinstance(self.mlp_only_layers, (list, tuple)):
            raise ValueError(f"ModelConfig: mlp_only_layers must be a list of layer indices, got {self.mlp_only_layers!r}")
        for i in self.mlp_only_layers:
            _int_field("mlp_only_layers[]", i, 0)
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
            if self.head_dim == 0:
                raise ValueError(f"ModelConfig: hidden_size ({self.hidden_size}) is smaller than num_attention_heads "
                                 f"({self.num_attention_heads}): head_dim would be 0")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"ModelConfig: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim must be even for RoPE, got {self.head_dim}")
        if self.arch == "qwen2":
            self.attention_bias = True
        if self.arch in ("qwen3", "qwen3_moe"):
            self.qk_norm = True
        if self.arch == "mixtral":
            self.attention_bias, self.norm_topk_prob = False, True
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)
        if self.is_moe:
            self._check_moe()

    def _check_moe(self):
        if self.arch == "mixtral":
            self.moe_intermediate_size = self.moe_intermediate_size or self.intermediate_size
            if self.moe_intermediate_size != self.intermediate_size:
                raise ValueError(f"ModelConfig: Mixtral's experts are intermediate_size ({self.intermediate_size}) "
                                 f"wide, got moe_intermediate_size={self.moe_intermediate_size}")
            if self.num_experts < 1:
                raise ValueError(f"ModelConfig: mixtral needs num_experts >= 1, got {self.num_experts}")
        if self.num_experts < 0:
            raise ValueError(f"ModelConfig: num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"ModelConfig: num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                             f"got {self.num_experts_per_tok}")
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise ValueError(f"ModelConfig: moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"ModelConfig: decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        self.mlp_only_layers = sorted({int(i) for i in self.mlp_only_layers})
        if self.arch == "qwen2_moe" and self.num_experts and self.shared_expert_intermediate_size <= 0:
            raise ValueError("ModelConfig: qwen2_moe needs shared_expert_intermediate_size > 0 (its shared "
                             f"expert), got {self.shared_expert_intermediate_size}")
        if self.arch != "qwen2_moe" and self.shared_expert_intermediate_size:
            raise ValueError(f"ModelConfig: shared_expert_intermediate_size is a qwen2_moe option, not {self.arch}'s")

    @property
    def is_moe(self) -> bool:
        return self.arch in MOE_ARCHS

    def is_sparse_layer(self, i: int) -> bool:
        """Whether decoder layer i has routed experts (transformers' rule, see the module docstring)."""
        if not self.is_moe or self.num_experts == 0:
            return False
        if self.arch == "mixtral":
            return True
        return i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @property
    def o_bias(self) -> bool:
        # Qwen2(-MoE) put biases on q/k/v only; Llama and Qwen3(-MoE)'s attention_bias covers o_proj too.
        return self.attention_bias and self.arch not in ("qwen2", "qwen2_moe")

    # ---- Hugging Face config.json -------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config.json: expected a JSON object of settings, got a {type(d).__name__}")
        missing = [k for k in _REQUIRED_KEYS if d.get(k) is None]
        if missing:
            raise ValueError(f"config.json: missing required key(s) {missing}")
        arch = _arch_of(d)
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
        if d.get("mlp_bias", False):
            raise ValueError("config.json: mlp_bias=true is not supported")
        if d.get("attention_dropout") or 0.0:  # train-time only: logits match transformers' eval mode
            print(f"note: config.json: attention_dropout={d['attention_dropout']} is not applied; reasonrl's models "
                  "train without dropout (policy-gradient trainers usually turn it off: it makes the log-probs "
                  "of the update differ from those of the rollout)", file=sys.stderr)
        if d.get("use_sliding_window", False):
            raise ValueError("config.json: use_sliding_window=true is not supported (full attention only)")
        if "sliding_attention" in (d.get("layer_types") or []):
            raise ValueError("config.json: layer_types with 'sliding_attention' are not supported")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"config.json: pretraining_tp={d['pretraining_tp']} is not supported (only 1)")
        # transformers 5: a non-empty rope_scaling wins over rope_parameters (a user who enables YaRN by
        # editing rope_scaling, as model cards say, in a file that also has rope_parameters)
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"config.json: rope_parameters / rope_scaling must be an object, got {rope!r}")
        rope = dict(rope)
        if rope and any(isinstance(v, dict) for v in rope.values()):
            raise ValueError("config.json: per-layer-type rope_parameters are not supported")
        theta = rope.pop("rope_theta", None)
        dflt = _HF_DEFAULTS.get(arch, {})
        theta = next((t for t in (theta, d.get("rope_theta")) if t is not None), dflt.get("rope_theta", 10000.0))
        if rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) not in (1, 1.0, None):
            raise ValueError("config.json: partial_rotary_factor != 1 is not supported")
        rtype = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        scaling = None if rtype == "default" else {"rope_type": rtype, **rope}
        if scaling and rtype in ("llama3", "yarn"):  # transformers: a top-level value wins (Phi-3 files)
            if d.get("original_max_position_embeddings") is not None:
                scaling["original_max_position_embeddings"] = d["original_max_position_embeddings"]
            elif d.get("max_position_embeddings") is not None:  # else _check_rope_scaling names the missing key
                scaling.setdefault("original_max_position_embeddings", d["max_position_embeddings"])
        n_heads = d["num_attention_heads"]
        n_kv = d.get("num_key_value_heads")
        if n_kv is None and "num_key_value_heads" not in d:
            n_kv = dflt.get("num_key_value_heads")  # transformers' class default; None: one per query head
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in d.items() if k not in known and k not in _DERIVED_KEYS}
        moe = _moe_from_hf_dict(arch, d)
        attention_bias = (_json_bool(d, "qkv_bias", True) if arch == "qwen2_moe"
                          else _json_bool(d, "attention_bias", arch == "qwen2"))
        return cls(
            arch=arch, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_heads, num_key_value_heads=n_heads if n_kv is None else n_kv,
            head_dim=d.get("head_dim") or (dflt.get("head_dim", 0) if "head_dim" not in d else 0),
            rope_theta=theta,  # head_dim 0: hidden_size // num_attention_heads
            rope_scaling=scaling, rms_norm_eps=d.get("rms_norm_eps", dflt.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=_json_bool(d, "tie_word_embeddings", False),
            attention_bias=attention_bias,
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            max_position_embeddings=d.get("max_position_embeddings", dflt.get("max_position_embeddings", 2048)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), extra=extra, **moe,
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
        if self.arch == "qwen2_moe":
            d["qkv_bias"] = self.attention_bias
        elif self.arch not in ("qwen2", "mixtral"):
            d["attention_bias"] = self.attention_bias
        if self.arch == "llama":
            d["mlp_bias"] = False
        elif self.arch == "mixtral":
            d.update(sliding_window=None, router_jitter_noise=0.0)
        else:
            d["use_sliding_window"] = False
        if self.is_moe:
            d.update(num_experts_per_tok=self.num_experts_per_tok, router_aux_loss_coef=self.router_aux_loss_coef,
                     output_router_logits=self.output_router_logits)
        if self.arch == "mixtral":
            d["num_local_experts"] = self.num_experts
        elif self.is_moe:
            d.update(num_experts=self.num_experts, moe_intermediate_size=self.moe_intermediate_size,
                     norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=self.decoder_sparse_step,
                     mlp_only_layers=list(self.mlp_only_layers))
        if self.arch == "qwen2_moe":
            d["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
        return d

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ModelConfig.from_json: no config.json at {path!r}")
        try:
            with open(path) as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"ModelConfig.from_json: {path} is not valid JSON: {e}") from e
        try:
            return cls.from_hf_dict(d)
        except ValueError as e:
            raise ValueError(f"{e} (in {path})") from e

    def save_json(self, folder: str) -> None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


# Keys we rewrite ourselves on save (and must not carry over stale from `extra`).
_DERIVED_KEYS = {"architectures", "model_type", "rope_parameters", "rope_scaling", "hidden_act", "mlp_bias",
                 "use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "dtype",
                 "torch_dtype", "transformers_version", "partial_rotary_factor",
                 "original_max_position_embeddings", "num_local_experts", "qkv_bias", "router_jitter_noise"}
# What transformers' config class of each family assumes for a key that config.json leaves out, where
# that is not the Llama default used above (rope_theta 1e4, rms_norm_eps 1e-6, head_dim hidden / heads,
# one kv head per query head, 2048 positions): a config.json that relies on them must load as the same
# model here (tests/test_models.py holds each against transformers' classes).
_HF_DEFAULTS = {
    "qwen2": dict(num_key_value_heads=32, max_position_embeddings=32768),
    "qwen3": dict(head_dim=128, num_key_value_heads=32, max_position_embeddings=32768),
    "qwen2_moe": dict(num_key_value_heads=16, max_position_embeddings=32768),
    "qwen3_moe": dict(num_key_value_heads=4, max_position_embeddings=32768),
    "mixtral": dict(rope_theta=1e6, rms_norm_eps=1e-5, num_key_value_heads=8, max_position_embeddings=131072),
}

_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "decoder_sparse_step")
_MOE_INTS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")


def _int_field(name: str, v, lo: int) -> int:
    """v as an int >= lo; bools, floats (85.5, 85.0), strings ("85") raise, naming the field."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"ModelConfig: {name} must be {'a positive integer' if lo == 1 else f'an integer >= {lo}'}, "
                         f"got {v!r} ({type(v).__name__})")
    if v < lo:
        raise ValueError(f"ModelConfig: {name} must be {'positive' if lo == 1 else f'>= {lo}'}, got {v}")
    return int(v)


def _real_field(name: str, v, positive: bool = False) -> float:
    """v as a finite float (> 0 when positive); bools and strings raise, naming the field."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"ModelConfig: {name} must be a number, got {v!r} ({type(v).__name__})")
    if not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"ModelConfig: {name} must be a finite number{' > 0' if positive else ''}, got {v}")
    return float(v)


def _token_ids(name: str, v):
    """None, a token id, or a list of them (eos_token_id may be several); ids are ints >= 0."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return [_int_field(name, t, 0) for t in v]
    return _int_field(name, v, 0)


def _json_bool(d: dict, key: str, default: bool) -> bool:
    """A config.json flag: true/false (0/1 accepted; null is the default). "false" must not become True."""
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
        return bool(v)
    raise ValueError(f"config.json: {key} must be true or false, got {v!r}")


def _moe_from_hf_dict(arch: str, d: dict) -> dict:
    """The MoE fields of a config.json (empty for dense archs); options we do not implement raise."""
    if arch not in MOE_ARCHS:
        return {}
    spellings = {k: d[k] for k in ("num_experts", "num_local_experts") if d.get(k) is not None}
    if len(set(spellings.values())) > 1:
        raise ValueError(f"config.json: num_experts and num_local_experts disagree: {spellings}")
    if not spellings:
        raise ValueError(f"config.json: a {ARCHITECTURES[arch]} config needs num_experts (or num_local_experts)")
    if arch == "mixtral":
        if d.get("sliding_window") is not None:
            raise ValueError(f"config.json: sliding_window={d['sliding_window']} is not supported (full attention "
                             "only; Mixtral applies a window whenever sliding_window is set)")
        if d.get("router_jitter_noise") or 0.0:
            raise ValueError(f"config.json: router_jitter_noise={d['router_jitter_noise']} is not supported (only 0)")
    need = ["num_experts_per_tok"] + ([] if arch == "mixtral" else ["moe_intermediate_size"])
    need += ["shared_expert_intermediate_size"] if arch == "qwen2_moe" else []
    missing = [k for k in need if d.get(k) is None]
    if missing:
        raise ValueError(f"config.json: a {ARCHITECTURES[arch]} config needs {missing}")
    # types and ranges are checked by ModelConfig.__post_init__ (no int()/float() here: 2.5 must not become 2)
    moe = dict(num_experts=next(iter(spellings.values())), num_experts_per_tok=d["num_experts_per_tok"],
               router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001),
               output_router_logits=_json_bool(d, "output_router_logits", False))
    if arch == "mixtral":
        return moe
    moe.update(moe_intermediate_size=d["moe_intermediate_size"], norm_topk_prob=_json_bool(d, "norm_topk_prob", False),
               decoder_sparse_step=d.get("decoder_sparse_step", 1), mlp_only_layers=d.get("mlp_only_layers") or [])
    if arch == "qwen2_moe":
        moe["shared_expert_intermediate_size"] = d["shared_expert_intermediate_size"]
    return moe


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
    if rtype in ("linear", "llama3", "dynamic", "yarn") and not s.get("factor"):
        raise ValueError(f"rope_scaling: rope type {rtype!r} needs a 'factor'")
    if rtype == "llama3":
        for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if k not in s:
                raise ValueError(f"rope_scaling: rope type 'llama3' needs {k!r}")
    for k in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow"):
        v = s.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0):
            raise ValueError(f"rope_scaling: {k} must be a finite number > 0, got {v!r}")
    if rtype in ("llama3", "yarn"):
        if s.get("original_max_position_embeddings") is None:
            raise ValueError(f"rope_scaling: rope type {rtype!r} needs 'original_max_position_embeddings' "
                             "(or max_position_embeddings in config.json)")
        _int_field("rope_scaling.original_max_position_embeddings", s["original_max_position_embeddings"], 1)
    return s
