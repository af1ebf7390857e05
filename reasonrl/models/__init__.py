"""reasonrl.models: lean decoders (Llama, Qwen2, Qwen3) with Hugging Face checkpoint I/O."""
from .config import ModelConfig
from .context import AttnContext
from .tokenizer import builtin_path, load_tokenizer

__all__ = ["ModelConfig", "AttnContext", "builtin_path", "load_tokenizer"]
