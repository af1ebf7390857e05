"""reasonrl.models: lean decoders (Llama, Qwen2, Qwen3; MoE: Qwen2-MoE, Qwen3-MoE, Mixtral) with Hugging Face
checkpoint I/O."""
from .attention import set_deterministic
from .checkpoint import load_model, save_model
from .config import ModelConfig
from .context import AttnContext
from .model import CausalLM, init_model, init_weights
from .tokenizer import builtin_path, load_tokenizer

__all__ = ["ModelConfig", "AttnContext", "CausalLM", "init_model", "init_weights", "set_deterministic",
           "load_model", "save_model",
           "builtin_path", "load_tokenizer"]
