"""A lean decode step for the dense decoder (reasonrl.models.CausalLM: Llama, Qwen2, Qwen3).

The same ops on the same tensors in the same order as CausalLM.forward + compute_logits, so the
logits of the Python path are bitwise equal (tests/test_engine.py holds it to torch.equal), minus what costs time and
does nothing in a decode step without autograd: nn.Module calls, the per-forward plan and checks
(the runner built the inputs), and the rotation of q and k as two separate calls (they are rotated
as one (B, Hq + Hkv, D) tensor: elementwise ops, so the same numbers).
On CPU the whole step after the embedding is one C++ call (csrc/paged.cpp decode_layers_fwd: every
layer, the final norm and the LM head; decode_layer_fwd per layer where the layers differ in heads, eps
or scale): the same ATen matmuls, with RMSNorm and RoPE as loops of its own (equal up to float32
summation order in RMSNorm, not bitwise). For small models it splits the rows over the threads, each
running the whole stack on its range (LeanDecode.chunks). A whole decode window of the engine (k steps
with their sampling) is one C++ call too (LeanDecode.window, csrc/paged.cpp decode_window_fwd).
Anything else (MoE layers, another model class, autograd on) runs the model's own forward.
NOTE: tiny model (4 layers, d=128), B=64, one thread: the module calls and per-op Python of the
model's forward cost about as much as its 29 matmuls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reasonrl.models.functional import _interpret, _rotate, _triton_ok, adjacent_rows
from reasonrl.ops.paged import _CPP_FLOATS, _cpp_has, paged_attention_decode, store_kv


# Weights (bytes) up to which a decode step splits its rows over threads (LeanDecode.chunks).
SPLIT_MAX_WEIGHT_BYTES = 16 * 2**20


def pack_rows(params):
    """Store the parameters back to back in one new buffer, so that adjacent_rows sees them as one:
    the same Parameter objects (their .data rebound; an optimizer holding them is unaffected), the same
    values, the old storage freed. Made outside inference mode, so training can use them after.
    Parameters that are inference tensors (made in inference mode) are left as they are: rebinding
    their .data leaves tensors that fail at their next use. -> whether they were packed."""
    if any(p.is_inference() for p in params):
        return False
    with torch.inference_mode(False), torch.no_grad():
        p0 = params[0]
        buf = torch.empty(sum(p.numel() for p in params), dtype=p0.dtype, device=p0.device)
        off = 0
        for p in params:
            n = p.numel()
            buf[off:off + n].copy_(p.detach().reshape(-1))
            p.data = buf[off:off + n].view(p.shape)
            off += n
    return True


def _rms(x, w, eps):
    xf = x.float()  # as RMSNorm.forward
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def lean_decode(model):
    """A LeanDecode for a dense CausalLM, else None (the runner then calls the model itself)."""
    from reasonrl.models.model import MLP, Attention, CausalLM, DecoderLayer, RMSNorm

    if type(model) is not CausalLM or model.gradient_checkpointing and model.training:
        return None
    for layer in model.model.layers:
        if (type(layer) is not DecoderLayer or getattr(layer, "sparse", False) or type(layer.mlp) is not MLP
                or type(layer.self_attn) is not Attention or type(layer.input_layernorm) is not RMSNorm):
            return None
    return LeanDecode(model)


def _fusable(layer):
    """A layer's weights that the GPU decode step runs as one GEMM each: ([q, k, v] weights, their
    biases [bq, bk, bv] (entries None where a projection has none), [gate, up] weights)."""
    a, mlp = layer.self_attn, layer.mlp
    return ([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias],
            [mlp.gate_proj.weight, mlp.up_proj.weight])


def pack_for_decode(model, force=False) -> bool:
    """Where the decode step runs its GPU path (LeanDecode.triton), store each layer's q/k/v weights
    (and biases) and gate/up weights back to back (pack_rows), so that they run as one GEMM each.
    Called by the engine before it sizes the KV cache (the packing briefly holds one group twice).
    Cheap when already packed. force: on any device (tests). -> whether anything was packed."""
    lean = lean_decode(model)
    if lean is None or not (lean.triton or force):
        return False
    packed = False
    for layer in model.model.layers:
        ws, bs, gu = _fusable(layer)
        for g in [ws, gu] + ([bs] if all(b is not None for b in bs) else []):
            if adjacent_rows(g) is None and pack_rows(g):
                packed = True
    return packed


class LeanDecode:
    def __init__(self, model):
        self.model = model
        p = next(model.parameters())
        # On CPU C++ calls (csrc/paged.cpp decode_layers_fwd, or decode_layer_fwd per layer) run these same ops.
        self.fused = p.device.type == "cpu" and p.dtype in _CPP_FLOATS and _cpp_has("decode_layer_fwd")
        self.layer_args = [_layer_args(layer) for layer in model.model.layers] if self.fused else None
        self.fused = self.fused and None not in self.layer_args
        # One C++ call for all layers (decode_layers_fwd) where every layer has the same heads, eps and scale.
        self.stack = None
        if self.fused and _cpp_has("decode_layers_fwd") and len({a[1:] for a in self.layer_args}) == 1:
            self.stack = ([t for a in self.layer_args for t in a[0]], *self.layer_args[0][1:])
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        # On GPU: the elementwise work between the GEMMs as 3 Triton launches per layer (kernels/decode.py)
        self.triton = p.device.type == "cuda" and p.dtype in (torch.float16, torch.bfloat16, torch.float32) \
            and model.config.hidden_size <= 16384 and _triton_ok() and not _interpret()  # a row per program
        # There, q/k/v and gate/up run as one GEMM each (two and one fewer launches per layer, wider
        # GEMMs at decode's few rows) over views of the model's own weights where the engine stored
        # them back to back (pack_for_decode: once; nothing is copied per step); else three and two
        self._fused = None
        # Whole decode windows in C++ (decode_window_fwd): the stacked layers, and RoPE from inv_freq
        # (not dynamic NTK, which recomputes it from the positions)
        self.windows = self.stack is not None and _cpp_has("decode_window_fwd") and not model.rotary.dynamic

    def chunks(self, rows: int) -> int:
        """Row ranges that run the layer stack in parallel, one per thread (decode_layers_fwd): only for
        weights small enough to stay in the shared cache (each thread reads all of them) and at least 16
        rows per range; otherwise 1 (the layers' ops use the threads themselves).
        NOTE: tiny model (3.4 MiB of weights), B=64, fp32, 2 threads: a rollout 1.7-1.9x faster than with
        one thread (1.2x before, when the layers used the threads op by op); benchmarks/RESULTS.md."""
        if self.weight_bytes > SPLIT_MAX_WEIGHT_BYTES:
            return 1
        return max(1, min(torch.get_num_threads(), rows // 16))

    def window(self, ids, pos, tables, block_size, kv_caches, temperature, u, stop, k):
        """k decode steps and their sampling (one temperature, no filters; 0 = greedy, else u (B, >= k)
        float32 uniforms) in one C++ call, stopping after the first step that emits an id in `stop`.
        -> (tokens (B, done) int64, log-probs (B, done) float32), or None where this path does not apply
        (then the engine runs the steps one by one). The ops outside the layers are the Python step's
        ATen ops in its order (Runner.decode_step, __call__, Sampler): the same tokens and log-probs."""
        m = self.model
        if (not self.windows or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")
                or kv_caches[0][0].dtype != m.model.embed_tokens.weight.dtype):
            return None
        w, nh, eps, scale = self.stack
        rot = m.rotary
        return torch.ops.reasonrl.decode_window_fwd(
            ids, pos, tables, block_size, m.model.embed_tokens.weight, rot.inv_freq, float(rot.attention_factor), w,
            [kc for kc, _ in kv_caches], [vc for _, vc in kv_caches], nh, eps, scale, self.chunks(ids.shape[0]),
            m.model.norm.weight, m.lm_head_weight, m.model.norm.eps, float(temperature), u, stop, k)

    def __call__(self, ids, pos, slots, lens, tables, kv_caches) -> torch.Tensor:
        """ids, pos, slots (B,) int64, lens (B,) int32, tables (B, M) int32 -> logits (B, V)."""
        m = self.model
        if torch.is_grad_enabled():
            raise RuntimeError("LeanDecode: decode steps run without autograd (torch.inference_mode)")
        x = F.embedding(ids, m.model.embed_tokens.weight)  # (B, H)
        cos, sin = m.rotary(pos)  # (B, 1, D/2)
        if self.triton and not torch.is_autocast_enabled(x.device.type) and kv_caches[0][0].dtype == x.dtype:
            return self._triton_forward(x, cos, sin, slots, lens, tables, kv_caches)
        fused = self.fused and not torch.is_autocast_enabled("cpu") and kv_caches[0][0].dtype == x.dtype
        if fused and self.stack is not None:
            w, nh, eps, scale = self.stack
            return torch.ops.reasonrl.decode_layers_fwd(
                x, cos, sin, w, [k for k, _ in kv_caches], [v for _, v in kv_caches], slots, tables, lens, nh, eps,
                scale, self.chunks(x.shape[0]), m.model.norm.weight, m.lm_head_weight, m.model.norm.eps)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(m.model.layers, kv_caches)):
            if fused:
                w, nh, eps, scale = self.layer_args[i]
                x = torch.ops.reasonrl.decode_layer_fwd(x, cos, sin, *w, k_cache, v_cache, slots, tables, lens,
                                                        nh, eps, scale)
            else:
                x = self._layer(layer, x, cos, sin, k_cache, v_cache, slots, lens, tables)
        return m.compute_logits(_rms(x, m.model.norm.weight, m.model.norm.eps))

    def _triton_forward(self, x, cos, sin, slots, lens, tables, kv_caches):
        """The layers with kernels/decode.py between the GEMMs: RMSNorm fused with the residual add
        before it (the residual stream s = x + branch, rounded as the model rounds it), RoPE of q and
        k fused with the cache write, SiLU * up. Equal to the model's ops up to float32 rounding."""
        from reasonrl.kernels.decode import add_rms_norm, rope_store_kv, silu_mul

        m, B = self.model, x.shape[0]
        layers = m.model.layers
        fused = self.fused_weights()
        n0 = layers[0].input_layernorm
        h, s = add_rms_norm(x, n0.weight, n0.eps)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(layers, kv_caches)):
            a = layer.self_attn
            w_qkv, b_qkv, w_gu = fused[i] if fused else (None, None, None)
            if w_qkv is not None:  # one GEMM, split into row-strided views (the kernels take strides)
                q, k, v = F.linear(h, w_qkv, b_qkv).split([a.nh * a.hd, a.nkv * a.hd, a.nkv * a.hd], 1)
                q, k, v = q.view(B, a.nh, a.hd), k.view(B, a.nkv, a.hd), v.view(B, a.nkv, a.hd)
            else:
                q = F.linear(h, a.q_proj.weight, a.q_proj.bias).view(B, a.nh, a.hd)
                k = F.linear(h, a.k_proj.weight, a.k_proj.bias).view(B, a.nkv, a.hd)
                v = F.linear(h, a.v_proj.weight, a.v_proj.bias).view(B, a.nkv, a.hd)
            if a.qk_norm:
                q = add_rms_norm(q.reshape(B * a.nh, a.hd), a.q_norm.weight, a.q_norm.eps)[0].view(B, a.nh, a.hd)
                k = add_rms_norm(k.reshape(B * a.nkv, a.hd), a.k_norm.weight, a.k_norm.eps)[0].view(B, a.nkv, a.hd)
            q = rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
            o = paged_attention_decode(q, k_cache, v_cache, tables, lens, a.scale)
            o = F.linear(o.reshape(B, a.nh * a.hd), a.o_proj.weight, a.o_proj.bias)
            n2 = layer.post_attention_layernorm
            h, s = add_rms_norm(o, n2.weight, n2.eps, residual=s)  # s = x + attention
            mlp = layer.mlp
            if w_gu is not None:
                gu = F.linear(h, w_gu)  # (B, 2I): [gate | up]
                inner = gu.shape[1] // 2
                act = silu_mul(gu[:, :inner], gu[:, inner:])
            else:
                act = silu_mul(F.linear(h, mlp.gate_proj.weight), F.linear(h, mlp.up_proj.weight))
            y = F.linear(act, mlp.down_proj.weight)
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else m.model.norm
            h, s = add_rms_norm(y, nxt.weight, nxt.eps, residual=s)  # s = x + mlp; h: the next norm
        return m.compute_logits(h)

    def fused_weights(self):
        """Per layer (q/k/v weight, its bias or None, gate/up weight) as single views over the model's
        parameters where they lie back to back (pack_for_decode), else Nones. Computed once per
        LeanDecode (one generate() call: the parameters do not change inside it)."""
        if self._fused is None:
            out = []
            for layer in self.model.model.layers:
                ws, bs, gu = _fusable(layer)
                w, b = adjacent_rows(ws), adjacent_rows(bs)  # None where any bias is None
                if any(t is not None for t in bs) and b is None:  # biases not packed (or only some): 3 GEMMs
                    w = None
                out.append((w, b, adjacent_rows(gu)))
            self._fused = out
        return self._fused

    @staticmethod
    def _layer(layer, x, cos, sin, k_cache, v_cache, slots, lens, tables):
        a, B = layer.self_attn, x.shape[0]
        h = _rms(x, layer.input_layernorm.weight, layer.input_layernorm.eps)
        q = F.linear(h, a.q_proj.weight, a.q_proj.bias).view(B, a.nh, a.hd)  # (B, Hq, D)
        k = F.linear(h, a.k_proj.weight, a.k_proj.bias).view(B, a.nkv, a.hd)  # (B, Hkv, D)
        v = F.linear(h, a.v_proj.weight, a.v_proj.bias).view(B, a.nkv, a.hd)
        if a.qk_norm:
            q, k = _rms(q, a.q_norm.weight, a.q_norm.eps), _rms(k, a.k_norm.weight, a.k_norm.eps)
        q, k = _rotate(torch.cat([q, k], 1), cos, sin).split([a.nh, a.nkv], 1)
        store_kv(k.contiguous(), v, k_cache, v_cache, slots)
        o = paged_attention_decode(q.contiguous(), k_cache, v_cache, tables, lens, a.scale)
        x = x + F.linear(o.reshape(B, a.nh * a.hd), a.o_proj.weight, a.o_proj.bias)
        mlp, n2 = layer.mlp, layer.post_attention_layernorm
        h = _rms(x, n2.weight, n2.eps)
        return x + F.linear(F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight),
                            mlp.down_proj.weight)


def _layer_args(layer):
    """decode_layer_fwd's weights (in its argument order), head count, eps (one for all the layer's
    norms, as ModelConfig has one) and scale."""
    a, mlp = layer.self_attn, layer.mlp
    eps = layer.input_layernorm.eps
    norms = (a.q_norm.weight, a.k_norm.weight) if a.qk_norm else (None, None)
    if layer.post_attention_layernorm.eps != eps or a.qk_norm and not a.q_norm.eps == a.k_norm.eps == eps:
        return None
    w = (layer.input_layernorm.weight, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias,
         a.v_proj.weight, a.v_proj.bias, a.o_proj.weight, a.o_proj.bias, *norms, layer.post_attention_layernorm.weight,
         mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    return w, a.nh, eps, a.scale
