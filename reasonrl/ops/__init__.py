"""Public ops. Every op takes backend="auto" | "reference" | "triton" | "cpp" | "cuda"."""
from .logprobs import (  # noqa: F401
    linear_token_logprobs,
    linear_token_logprobs_reference,
    token_logprobs,
    token_logprobs_reference,
)
