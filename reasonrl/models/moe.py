"""The sparse MLP of Qwen2-MoE, Qwen3-MoE and Mixtral decoder layers.

For the tokens x (T, H) of one layer:
    logits = x W_r^T                                   (T, E)  kept for the load-balancing loss
    w, ids = top_k(softmax(logits in float32))         (T, K)  renormalized to sum 1 when
                                                               norm_topk_prob (always for Mixtral)
    y[t]   = sum_k w[t, k] * expert_{ids[t, k]}(x[t]),   expert_e(v) = W_d,e (silu(W_g,e v) * W_u,e v)
Qwen2-MoE adds an always-on shared expert behind a scalar sigmoid gate:
    y[t]  += sigmoid(x[t] . w_sg) * W_d,s (silu(W_g,s x[t]) * W_u,s x[t])
The routed experts are stored stacked, as transformers 5.x holds them in memory and as
reasonrl.ops.moe_experts takes them (no copy per forward):
    experts.gate_up_proj (E, 2I, H): rows [0, I) gate_proj, rows [I, 2I) up_proj
    experts.down_proj    (E, H, I)
Checkpoints on the Hub keep one matrix per expert; checkpoint.py converts both ways.

Mixed precision: under torch.autocast the experts run in the autocast dtype (the fp32 master
weights are cast per forward, as autocast does for a Linear); the router's softmax stays float32.
"""
from __future__ import annotations

import torch
from torch import nn

from reasonrl.ops.moe import load_balancing_loss, moe_experts, moe_router

from .config import ModelConfig
from .functional import _compute_dtype


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))  # (E, 2I, H)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))  # (E, H, I)


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ Qwen2-MoE's gated shared expert, passed in as a dense MLP module).

    forward(x (T, H)) -> (y (T, H), router_logits (T, E), topk_ids (T, K))."""

    def __init__(self, c: ModelConfig, shared_expert: nn.Module | None = None):
        super().__init__()
        self.top_k, self.renormalize = c.num_experts_per_tok, c.norm_topk_prob
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)  # router W_r (E, H)
        self.experts = Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size)
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = nn.Linear(c.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor):
        logits = self.gate(x)  # (T, E)
        w, ids = moe_router(logits, self.top_k, scoring="softmax", renormalize=self.renormalize)  # (T, K)
        dt = _compute_dtype(x)
        y = moe_experts(x.to(dt), ids, w, self.experts.gate_up_proj.to(dt), self.experts.down_proj.to(dt))
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y, logits, ids


def load_balancing_loss_hf(router_logits: list[torch.Tensor], topk_ids: list[torch.Tensor], num_experts: int,
                           top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' `aux_loss` of an MoE CausalLM: the Switch loss over the tokens of every sparse
    layer pooled together (not a mean of per-layer losses), with f_e counting each token's K
    assignments (so sum_e f_e = K):
        aux = E * sum_e f_e P_e,  f_e = #{(l, t, k): ids = e} / (L T),  P_e = mean_{l, t} softmax(logits)[e]
    = K * reasonrl.ops.load_balancing_loss on the layers' logits and ids stacked along T."""
    logits = torch.cat(router_logits)  # (L*T, E)
    ids = torch.cat(topk_ids)  # (L*T, K)
    if mask is not None:
        mask = mask.repeat(len(router_logits))  # (L*T,)
    return top_k * load_balancing_loss(logits, ids, num_experts, top_k, mask)

