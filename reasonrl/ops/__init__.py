"""Public ops. Every op takes backend="auto" | "reference" | "triton" | "cpp" | "cuda"."""
from .grpo import GRPOLossConfig, grpo_loss, grpo_loss_from_logprobs, grpo_loss_reference  # noqa: F401
from .logprobs import (  # noqa: F401
    linear_token_logprobs,
    linear_token_logprobs_reference,
    token_logprobs,
    token_logprobs_reference,
)
from .moe import (  # noqa: F401
    MoEDispatch,
    load_balancing_loss,
    moe_block,
    moe_dispatch,
    moe_experts,
    moe_experts_reference,
    moe_router,
)
from .paged import paged_attention_decode, store_kv  # noqa: F401
