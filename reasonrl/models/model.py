"""The lean decoder: Llama, Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm), and their
mixture-of-experts kin Qwen2-MoE, Qwen3-MoE, Mixtral (sparse MLPs in moe.py).

    h_0 = embed(ids)
    a_l = h_{l-1} + W_o Attn(RoPE(W_q n(h)), RoPE(W_k n(h)), W_v n(h)),  n = RMSNorm
    h_l = a_l + W_down(silu(W_gate n(a_l)) * W_up n(a_l))                 (SwiGLU)
    out = RMSNorm(h_L)                                 -> hidden states (total, H), not logits
RMSNorm(x) = w * x / sqrt(mean(x^2) + eps), computed in float32.
In MoE models the MLP of each sparse layer is the routed-experts block (moe.py). A forward with
gradients enabled keeps every sparse layer's router logits and top-k ids (model.router_logits,
model.router_topk_ids) for model.aux_loss(), the load-balancing term of the trainer's loss.

Module and parameter names follow transformers' (model.layers.N.self_attn.q_proj.weight, ...), so
a Hugging Face state dict loads with no renaming. Tokens are packed (total,) with cu_seqlens in
an AttnContext: no padding anywhere. Logits are never made in training: the fused log-prob / GRPO
ops take `hidden` and `lm_head_weight`.

Mixed precision (bf16 on GPU): keep the parameters in float32 (the optimizer's master weights) and
run the forward under `torch.autocast("cuda", dtype=torch.bfloat16)`. Matmuls and attention then
run in bf16, RMSNorm and RoPE in float32, and the residual stream stays float32. The norms before
the GEMMs write bf16 directly (the values autocast's casts would make), and a forward with gradients
runs q/k/v as one GEMM over the stacked weights (functional.QKVFunction), and each residual add
inside the next norm's kernel (add_rms_norm; a layer returns (x, y) for the next to add): fewer kernels
to launch. For rollouts alone, load_model(dtype=torch.bfloat16) gives a bf16 model.
Activation checkpointing: `model.gradient_checkpointing = True` (each decoder layer is recomputed
in backward; saves about the per-layer activations, costs one more forward).
Deterministic mode (tests): reasonrl.models.set_deterministic(True).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import (_flash_varlen, pad_plan, paged_ops, prefix_prefill_attention, shared_prefix_attention,
                        shared_prefix_plan, varlen_attention)
from .config import ModelConfig
from .context import AttnContext
from .functional import FUSED, add_rms_norm, apply_rope, fused_ok, linear, qkv_proj, rms_norm, swiglu
from .moe import SparseMoeBlock, load_balancing_loss_hf
from .rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """out_dtype: round the result to it (None: promote(x, weight)), as the consumer would (autocast)."""
        if fused_ok(x):  # CUDA: one Triton pass each way (kernels/fused.py)
            return rms_norm(x, self.weight, self.eps, out_dtype)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * xf.to(x.dtype)  # the multiply in x's dtype, as transformers does
        return y if out_dtype is None else y.to(out_dtype)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = self.hd ** -0.5
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.hd, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.hd, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.hd, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(self.hd, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, c.rms_norm_eps)
        self.qk_norm = c.qk_norm

    def forward(self, x, cos, sin, ctx: AttnContext, plan: dict, layer: int):
        T = x.shape[0]
        # one GEMM where gradients are taken, RoPE inside it unless q/k norms come first
        q, k, v, rotated = qkv_proj(x, self.q_proj, self.k_proj, self.v_proj,
                                    None if self.qk_norm else (cos, sin, self.hd))
        q = q.view(T, self.nh, self.hd)  # (T, Hq, D)
        k = k.view(T, self.nkv, self.hd)  # (T, Hkv, D)
        v = v.view(T, self.nkv, self.hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if not rotated:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if q.dtype != v.dtype:  # bf16 autocast with fp32 q/k-norm weights: q, k come out fp32, v bf16.
            # SDPA's autocast casts all three to bf16 anyway; doing it here lets flash-attn (and the CPU
            # bf16 path) see one dtype, as transformers' flash path does.
            q, k = q.to(v.dtype), k.to(v.dtype)
        if ctx.kv_caches is None and plan.get("shared") is not None:
            o = shared_prefix_attention(q, k, v, ctx.cu_seqlens, ctx.max_seqlen, plan["lengths"], self.scale,
                                        plan["shared"])
        elif ctx.kv_caches is None:
            o = varlen_attention(q, k, v, ctx.cu_seqlens, ctx.max_seqlen, plan["lengths"], self.scale, _pad(plan, q))
        else:
            store_kv, decode = paged_ops()
            k_cache, v_cache = ctx.kv_caches[layer]
            store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
            if not ctx.is_prefill:
                o = decode(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, self.scale)
            elif plan["prefix"]:
                o = prefix_prefill_attention(q, k_cache, v_cache, ctx, plan["lengths"], plan["ctx_lens"], self.scale,
                                             plan.setdefault("prefix_plan", {}))
            else:
                o = varlen_attention(q, k, v, ctx.cu_seqlens, ctx.max_seqlen, plan["lengths"], self.scale,
                                     _pad(plan, q))
        return linear(o.reshape(T, self.nh * self.hd), self.o_proj)  # CUDA: dW in one kernel (LinearFunction)


def _pad(plan: dict, q: torch.Tensor):
    """plan["pad"], or (flash-attn installed, plan made without it) a callable that makes it once, for
    the layers that fall back to SDPA (fp32 on CUDA: rollouts on fp32 weights, precision="fp32")."""
    if "pad" in plan:
        return plan["pad"]
    return lambda: plan.setdefault("pad", pad_plan(plan["lengths"], q.device))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        # swiglu keeps 2 fewer (N, I) tensors for backward than the three Linears would (functional.py)
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, i: int):
        super().__init__()
        self.self_attn = Attention(c)
        self.sparse = c.is_sparse_layer(i)
        if self.sparse:
            shared = MLP(c.hidden_size, c.shared_expert_intermediate_size) if c.shared_expert_intermediate_size else None
            self.mlp = SparseMoeBlock(c, shared)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, pending, cos, sin, ctx, plan, layer):
        """The layer's output is x + y, returned as (x, y) (pending: the previous layer's y, None for the
        first), so that each residual add runs inside the next norm's pass (add_rms_norm, one kernel
        each way where fused_ok: x + y, the norm, and in backward the residual's gradient and y's, in
        its own dtype, for both); in a sparse layer (x, y, router_logits (T, E), topk_ids (T, K))
        (returned, not stashed, so that activation checkpointing's recompute does not record them twice)."""
        dt = _gemm_dtype(x)
        x, h = _add_norm(x, pending, self.input_layernorm, dt)
        a = self.self_attn(h, cos, sin, ctx, plan, layer)
        x, h = _add_norm(x, a, self.post_attention_layernorm, None if self.sparse else dt)
        if not self.sparse:
            return x, self.mlp(h)
        y, logits, ids = self.mlp(h)
        return x, y, logits, ids


def _add_norm(x, a, norm: RMSNorm, out_dtype):
    """(x + a, norm(x + a)); a None: (x, norm(x)). One pass each way where the fused kernels run."""
    if a is None:
        return x, norm(x, out_dtype)
    if FUSED["step"] and fused_ok(x) and a.shape == x.shape:
        return add_rms_norm(x, a, norm.weight, norm.eps, out_dtype)
    x = x + a
    return x, norm(x, out_dtype)


def _gemm_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the GEMMs after a norm compute in when it is not x's: autocast's, for a float32 residual
    stream. The norms then write it directly (the values autocast's casts would make, one pass fewer
    per norm and per consumer, forward and backward)."""
    dev = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return None if dt == torch.float32 else dt
    return None


class DecoderModel(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                      config.max_position_embeddings)
        self.num_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.num_layers = config.num_hidden_layers
        self.gradient_checkpointing = False
        # Reset by every forward; filled only when it runs with gradients enabled.
        self.router_logits: list[torch.Tensor] = []  # (T, E) per sparse layer
        self.router_topk_ids: list[torch.Tensor] = []  # (T, K) per sparse layer
        # The expert ops read routing counts on the host (per-expert loop), which a CUDA graph
        # cannot capture: the rollout engine should decode MoE models eagerly.
        self.supports_cuda_graphs = not config.is_moe and not self.rotary.dynamic  # dynamic RoPE syncs

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, H): the embedding matrix when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(.., H) -> (.., V). For sampling and tests; training uses the fused ops on hidden."""
        return F.linear(hidden, self.lm_head_weight)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """input_ids, positions (total,) int64 -> hidden (total, H) after the final norm."""
        plan = self._plan(input_ids, positions, ctx)
        x = self.model.embed_tokens(input_ids)  # (total, H)
        cos, sin = self.rotary(positions, ctx.cu_seqlens)  # (total, 1, D/2)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        record = torch.is_grad_enabled()  # rollouts and eval keep nothing
        self.router_logits, self.router_topk_ids = [], []
        y = None  # the last layer's branch, added inside the next norm (DecoderLayer.forward)
        for i, layer in enumerate(self.model.layers):
            if ckpt:
                out = checkpoint(layer, x, y, cos, sin, ctx, plan, i, use_reentrant=False)
            else:
                out = layer(x, y, cos, sin, ctx, plan, i)
            x, y = out[0], out[1]
            if layer.sparse and record:
                self.router_logits.append(out[2])
                self.router_topk_ids.append(out[3])
        return _add_norm(x, y, self.model.norm, None)[1]

    def load_balancing_loss(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """transformers' `aux_loss` (no coefficient) over the sparse layers of the last forward with
        gradients; mask (total,) bool drops tokens (e.g. padding). See moe.load_balancing_loss_hf."""
        if not self.config.is_moe:
            raise ValueError(f"load_balancing_loss: a {self.config.arch} model has no experts")
        if not self.router_logits:
            raise ValueError("load_balancing_loss: no router logits recorded; run a forward with gradients "
                             "enabled first (none are kept under torch.no_grad / inference_mode)")
        c = self.config
        return load_balancing_loss_hf(self.router_logits, self.router_topk_ids, c.num_experts, c.num_experts_per_tok, mask)

    def clear_router_state(self) -> None:
        """Drop the last forward's router logits/ids (non-leaf tensors that keep its graph alive)."""
        self.router_logits, self.router_topk_ids = [], []

    def __getstate__(self):
        """Copies and pickles leave the last forward's router state behind: copy.deepcopy refuses
        non-leaf tensors (the engine's bf16 rollout copy, a reference model, the pipeline's control)."""
        state = dict(super().__getstate__())
        state["router_logits"], state["router_topk_ids"] = [], []
        return state

    def aux_loss(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """router_aux_loss_coef * load_balancing_loss(): what transformers adds to its LM loss (it does
        so when config.output_router_logits is set); differentiable w.r.t. the router weights."""
        return self.config.router_aux_loss_coef * self.load_balancing_loss(mask)

    def _plan(self, input_ids, positions, ctx) -> dict:
        """Checks, and the host-side facts every layer needs (read once: each .tolist() syncs a GPU)."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"CausalLM.forward: input_ids and positions must both be (total,), got "
                             f"{tuple(input_ids.shape)} and {tuple(positions.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32) or positions.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"CausalLM.forward: input_ids/positions must be integer tensors, got "
                             f"{input_ids.dtype}, {positions.dtype}")
        cu = ctx.cu_seqlens
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) \
                or cu.numel() < 2:
            raise ValueError("AttnContext.cu_seqlens must be a 1-D int32/int64 tensor of B+1 offsets, got "
                             + (f"{cu.dtype} of shape {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else repr(cu)))
        total, B = input_ids.shape[0], cu.shape[0] - 1
        if ctx.kv_caches is not None and len(ctx.kv_caches) != self.num_layers:
            raise ValueError(f"AttnContext.kv_caches: need one (k, v) per layer ({self.num_layers}), "
                             f"got {len(ctx.kv_caches)}")
        if not ctx.is_prefill:
            if any(t is None for t in (ctx.kv_caches, ctx.block_tables, ctx.context_lens, ctx.slot_mapping)):
                raise ValueError("AttnContext: decode (is_prefill=False) needs kv_caches, slot_mapping, "
                                 "block_tables and context_lens")
            if total != ctx.block_tables.shape[0]:
                raise ValueError(f"AttnContext: decode takes one token per sequence; got {total} tokens for "
                                 f"{ctx.block_tables.shape[0]} block-table rows")
            return {"lengths": None, "prefix": False}
        if ctx.kv_caches is not None and ctx.slot_mapping is None:
            raise ValueError("AttnContext: kv_caches given without slot_mapping")
        # one host sync for the offsets and the ids' and positions' ranges
        stats = torch.stack([*input_ids.aminmax(), positions.min()]) if total else input_ids.new_zeros(3)
        vals = torch.cat([cu.to(torch.int64), stats.to(cu.device, torch.int64)]).tolist()
        offsets, (lo, hi, pos_lo) = vals[:-3], vals[-3:]
        lengths = [b - a for a, b in zip(offsets, offsets[1:])]
        if offsets[-1] != total or offsets[0] != 0 or min(lengths, default=0) < 1:
            raise ValueError(f"AttnContext.cu_seqlens must rise from 0 to total={total} with every sequence "
                             f"non-empty, got {offsets}")
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"CausalLM.forward: input_ids must lie in [0, vocab_size={self.config.vocab_size}), "
                             f"got values from {lo} to {hi}")
        if pos_lo < 0:
            raise ValueError(f"CausalLM.forward: positions must be >= 0, got {pos_lo}")
        if not isinstance(ctx.max_seqlen, int) or ctx.max_seqlen < max(lengths):
            raise ValueError(f"AttnContext.max_seqlen must be an int >= the longest sequence ({max(lengths)}), "
                             f"got {ctx.max_seqlen!r}")
        flash = input_ids.is_cuda and _flash_varlen() is not None
        if ctx.prefix_of is not None:
            if ctx.kv_caches is not None:
                raise ValueError("AttnContext.prefix_of (shared prefixes) is for training forwards, not with kv_caches")
            shared = shared_prefix_plan(lengths, list(ctx.prefix_of), input_ids.device, flash)
            return {"lengths": lengths, "prefix": False, "pad": None, "shared": shared}
        plan = {"lengths": lengths, "prefix": False}
        if not flash:  # with flash-attn: made on first use by a layer that runs SDPA (_pad)
            plan["pad"] = pad_plan(lengths, input_ids.device)
        if ctx.kv_caches is not None and ctx.context_lens is not None and ctx.block_tables is not None:
            ctx_lens = ctx.context_lens.tolist()
            if len(ctx_lens) != B or any(c < n for c, n in zip(ctx_lens, lengths)):
                raise ValueError(f"AttnContext.context_lens {ctx_lens} must give each of the {B} sequences at "
                                 f"least its {lengths} new tokens")
            plan.update(prefix=any(c > n for c, n in zip(ctx_lens, lengths)), ctx_lens=ctx_lens)
        return plan


@torch.no_grad()
def init_weights(model: CausalLM, seed: int = 0, std: float = 0.02) -> CausalLM:
    """transformers' init: normal(0, std) for matrices and embeddings, zero biases, unit norms."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif p.dim() == 1:
            p.fill_(1.0)
        else:
            # on the CPU (the generator's device), also when built under `with torch.device("cuda")`
            p.copy_(torch.randn(p.shape, generator=g, device="cpu") * std)
    return model


def init_model(config, seed: int = 0, dtype=torch.float32, device="cpu") -> CausalLM:
    """Random weights for a ModelConfig (or a folder with config.json, e.g. builtin_path("tiny"))."""
    if not isinstance(config, ModelConfig):
        config = ModelConfig.from_json(config)
    model = init_weights(CausalLM(config), seed).to(device=device, dtype=dtype)
    model.rotary.reset()  # inv_freq stays float32 (.to(dtype) cast it), as load_model keeps it
    return model
