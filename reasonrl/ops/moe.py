"""Mixture-of-experts ops: router, load-balancing loss, dispatch metadata, expert compute.

Weights (transformers 5.x fused-experts layout, e.g. Qwen3MoeExperts / MixtralExperts):
    w_gate_up (E, 2I, H): rows [0, I) gate_proj, rows [I, 2I) up_proj;   h_e = x @ w_gate_up[e].T
    w_down    (E, H, I):                                                 y_e = (silu(gate) * up) @ w_down[e].T

Router (per token t):
    s = softmax(logits_t) or sigmoid(logits_t)          (float32; float64 for float64 logits)
    ids = top_k(s + bias), ties toward the lower expert id   (bias only selects: DeepSeek-V3's
                                                             auxiliary-loss-free balancing)
    w = s[ids], renormalized to sum 1 when asked
Experts:
    out[t] = sum_k w[t, k] * expert_{ids[t, k]}(x[t]),  expert_e(v) = (silu(v Wg^T) * (v Wu^T)) Wd^T
Dispatch: the T*K assignments a = t*K + k sorted by expert (stable), with counts and offsets, and
optionally each expert's segment padded to a GEMM block size (for grouped-GEMM kernels).

Backends: "reference" (plain PyTorch: the per-expert loop, float64-capable), "cpp" (csrc/cpu/moe.cpp,
CPU tensors), "cuda" (csrc/cuda/moe.cu: router and dispatch), "triton" (kernels/moe.py: experts).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from reasonrl.ops._backend import check_same_device, cpp_available, first_order_only, no_autocast, resolve

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INTS = (torch.int64, torch.int32)


class MoEDispatch(NamedTuple):
    counts: torch.Tensor  # (E,) int32
    offsets: torch.Tensor  # (E+1,) int32
    sorted_idx: torch.Tensor  # (T*K,) int32, assignment ids a = t*K + k
    padded_offsets: torch.Tensor | None = None  # (E+1,) int32
    padded_idx: torch.Tensor | None = None  # (P,) int32, -1 in the padding
    block_expert: torch.Tensor | None = None  # (P // block_size,) int32


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
CUDA_ROUTER_MAX_EXPERTS = 2048  # csrc/moe.cpp: the CUDA router's per-warp scores in shared memory
CUDA_DISPATCH_MAX_EXPERTS = 12288  # csrc/moe.cpp: the CUDA dispatch's per-block histogram (48 KiB)


def _check_logits(op, router_logits, top_k):
    if router_logits.dim() != 2:
        raise ValueError(f"{op}: router_logits must be (T, E), got shape {tuple(router_logits.shape)}")
    if router_logits.dtype not in _FLOATS:
        raise ValueError(f"{op}: router_logits must be a float tensor, got {router_logits.dtype}")
    E = router_logits.shape[1]
    if not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"{op}: top_k must be an int in [1, E={E}], got {top_k!r}")


def _check_ids(op, topk_ids, num_experts, T=None, K=None):
    if topk_ids.dim() != 2:
        raise ValueError(f"{op}: topk_ids must be (T, K), got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in _INTS:
        raise ValueError(f"{op}: topk_ids must be int64 (or int32), got {topk_ids.dtype}")
    if T is not None and topk_ids.shape[0] != T:
        raise ValueError(f"{op}: topk_ids must have T={T} rows, got shape {tuple(topk_ids.shape)}")
    if K is not None and topk_ids.shape[1] != K:
        raise ValueError(f"{op}: topk_ids must have K={K} columns, got shape {tuple(topk_ids.shape)}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"{op}: num_experts must be a positive int, got {num_experts!r}")


def _check_id_values(op, topk_ids, num_experts):
    """A value check costs a device sync; it runs for CPU tensors (the CUDA kernels check in place)."""
    if topk_ids.numel() and topk_ids.device.type == "cpu":
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"{op}: topk_ids values must be in [0, {num_experts}), got range [{lo}, {hi}]")


def _check_experts(x, topk_ids, topk_weights, w_gate_up, w_down):
    op = "moe_experts"
    if x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"{op}: x must be a float (T, H) tensor, got {x.dtype} of shape {tuple(x.shape)}")
    T, H = x.shape
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != H or w_gate_up.shape[1] % 2:
        raise ValueError(f"{op}: w_gate_up must be (E, 2I, H={H}), got shape {tuple(w_gate_up.shape)}")
    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if w_down.shape != (E, H, I):
        raise ValueError(f"{op}: w_down must be (E, H, I) = ({E}, {H}, {I}), got shape {tuple(w_down.shape)}")
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dtype != x.dtype:
            raise ValueError(f"{op}: {name} must have x's dtype {x.dtype}, got {w.dtype}")
    _check_ids(op, topk_ids, E, T=T)
    if topk_weights.shape != topk_ids.shape or topk_weights.dtype not in _FLOATS:
        raise ValueError(f"{op}: topk_weights must be a float tensor of topk_ids' shape {tuple(topk_ids.shape)}, "
                         f"got {topk_weights.dtype} of shape {tuple(topk_weights.shape)}")
    check_same_device(op, x=x, topk_ids=topk_ids, topk_weights=topk_weights, w_gate_up=w_gate_up, w_down=w_down)
    _check_id_values(op, topk_ids, E)
    return T, H, E, I


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------
def _scores(router_logits, scoring):
    acc = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    z = router_logits.to(acc)
    if scoring == "softmax":
        # A row of only -inf (a token no expert may take) gets scores 0, not softmax's 0/0 = NaN;
        # its logits are replaced before the softmax so that the gradient stays finite (zero) too.
        dead = torch.isneginf(z).all(dim=-1, keepdim=True)  # (T, 1)
        return torch.where(dead, 0.0, torch.softmax(torch.where(dead, 0.0, z), dim=-1))
    if scoring == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"moe_router: scoring must be 'softmax' or 'sigmoid', got {scoring!r}")


def _renormalize(w):
    """w / sum(w) per row, the sum clamped to the dtype's smallest normal (DeepSeek-V3 adds 1e-20):
    a row whose selected scores are all 0 (a row of -inf logits; float32 sigmoid of logits below
    about -88.7, where exp(-z) overflows) keeps weights 0 instead of 0/0 = NaN; a row whose sum is a
    normal number is unchanged (float32 sigmoid scores whose sum is subnormal, logits below about
    -87, come out below 1 in sum)."""
    return w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def moe_router_reference(router_logits, top_k, scoring="softmax", renormalize=True, bias=None):
    """-> (topk_weights (T, K) float32 (float64 for float64 logits), topk_ids (T, K) int64)."""
    scores = _scores(router_logits, scoring)  # (T, E)
    sel = scores.detach() if bias is None else scores.detach() + bias.to(scores.dtype)
    sel = torch.where(sel.isnan(), float("-inf"), sel)  # a NaN score ranks last, as in the C++/CUDA kernels
    # A stable descending sort keeps equal scores in id order: ties go to the lower expert id.
    ids = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :top_k]  # (T, K)
    w = scores.gather(1, ids)  # (T, K)
    if renormalize:
        w = _renormalize(w)
    return w, ids


def load_balancing_loss(router_logits, topk_ids, num_experts: int, top_k: int, mask=None):
    """Switch / Mixtral auxiliary loss E * sum_e f_e * P_e (a scalar, float32; float64 for float64 logits).

    f_e: share of the kept tokens' T*K assignments routed to e (no gradient);
    P_e: mean over kept tokens of softmax(router_logits)[:, e] (carries the gradient)."""
    op = "load_balancing_loss"
    _check_logits(op, router_logits, top_k)
    T, E = router_logits.shape
    if num_experts != E:
        raise ValueError(f"{op}: num_experts={num_experts} must equal router_logits' E={E}")
    _check_ids(op, topk_ids, E, T=T, K=top_k)
    _check_id_values(op, topk_ids, E)
    probs = _scores(router_logits, "softmax")  # (T, E)
    if mask is not None:
        if mask.shape != (T,) or mask.dtype != torch.bool:
            raise ValueError(f"{op}: mask must be a bool (T,) = ({T},) tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
        probs = probs[mask]
        topk_ids = topk_ids[mask]
    n = probs.shape[0]
    if n == 0:  # every token masked: no signal, but keep the graph so backward works
        return probs.sum() * 0.0
    f = torch.bincount(topk_ids.reshape(-1).long(), minlength=E).to(probs.dtype) / (n * top_k)  # (E,)
    P = probs.mean(dim=0)  # (E,)
    return E * (f * P).sum()


def moe_dispatch_reference(topk_ids, num_experts, block_size=0):
    flat = topk_ids.reshape(-1).long()  # (T*K,)
    counts = torch.bincount(flat, minlength=num_experts)  # (E,)
    offsets = F.pad(torch.cumsum(counts, 0), (1, 0))  # (E+1,)
    sorted_idx = torch.sort(flat, stable=True).indices  # (T*K,)
    if block_size <= 0:
        return MoEDispatch(counts.int(), offsets.int(), sorted_idx.int())
    padded = (counts + block_size - 1) // block_size * block_size  # (E,)
    padded_offsets = F.pad(torch.cumsum(padded, 0), (1, 0))  # (E+1,)
    P = int(padded_offsets[-1])
    padded_idx = torch.full((P,), -1, dtype=torch.int64, device=flat.device)
    e_sorted = flat[sorted_idx]  # (T*K,) expert of each sorted position
    rank = torch.arange(flat.numel(), device=flat.device) - offsets[e_sorted]  # position within its expert
    padded_idx[padded_offsets[e_sorted] + rank] = sorted_idx
    block_expert = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), padded // block_size)
    return MoEDispatch(counts.int(), offsets.int(), sorted_idx.int(), padded_offsets.int(), padded_idx.int(),
                       block_expert.int())


def moe_experts_reference(x, topk_ids, topk_weights, w_gate_up, w_down):
    """The per-expert loop: gather expert e's tokens, three GEMMs, weighted index_add back.

    GEMMs run in x's dtype (what a PyTorch user gets); the combine accumulates in float32 (float64
    for float64 inputs). Differentiable through plain autograd."""
    T, H = x.shape
    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    K = topk_ids.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if topk_ids.numel() == 0:  # no assignments: zeros that still carry a graph, so backward runs
        return x * 0 + (topk_weights.sum() + w_gate_up.sum() + w_down.sum()).to(x.dtype) * 0
    d = moe_dispatch_reference(topk_ids, E)
    bounds = d.offsets.tolist()
    sorted_idx = d.sorted_idx.long()
    w_flat = topk_weights.reshape(-1).to(acc)  # (T*K,)
    out = torch.zeros(T, H, dtype=acc, device=x.device)
    for e in range(E):
        a = sorted_idx[bounds[e]:bounds[e + 1]]  # (n_e,) assignment ids
        if a.numel() == 0:
            continue
        tok = a // K
        h = x.index_select(0, tok) @ w_gate_up[e].T  # (n_e, 2I)
        y = (F.silu(h[:, :I]) * h[:, I:]) @ w_down[e].T  # (n_e, H)
        out = out.index_add(0, tok, y.to(acc) * w_flat[a, None])
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------------------------
def _cpp_has(name):
    return cpp_available() and hasattr(torch.ops.reasonrl, name)


@functools.lru_cache(maxsize=None)
def _resolve(backend, device, op, cpp_name, has_cuda, has_triton):
    """The concrete backend for this op: auto picks cpp on CPU, cuda/triton on GPU, where the
    op has such a kernel; an explicit backend the op lacks raises."""
    if backend == "triton" and not has_triton:
        raise RuntimeError(f"{op}: backend='triton' is not available: {op} has no Triton kernel")
    if backend == "cuda" and not has_cuda:
        raise RuntimeError(f"{op}: backend='cuda' is not available: {op} has no CUDA kernel (use 'triton')")
    prefer = tuple(b for b, ok in (("triton", has_triton), ("cuda", has_cuda)) if ok)
    b = resolve(backend, device, op, prefer_cuda=prefer)
    if b in ("cpp", "cuda") and not _cpp_has(cpp_name):
        if backend == b:
            raise RuntimeError(f"{op}: backend={b!r} is not available: reasonrl._C has no {cpp_name} (rebuild)")
        b = "reference"
    if b == "triton" and not _triton_experts_importable():
        if backend == "triton":
            raise RuntimeError(f"{op}: backend='triton' is not available: reasonrl.kernels.moe.triton_moe_experts "
                               "cannot be imported")
        b = "reference"
    return b


@functools.lru_cache(maxsize=None)
def _triton_experts_importable():
    try:
        from reasonrl.kernels.moe import triton_moe_experts  # noqa: F401
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# C++ expert compute (autograd around reasonrl::moe_experts_fwd / _bwd)
# ---------------------------------------------------------------------------------------------
class MoEExpertsFunction(torch.autograd.Function):
    """Saves only the inputs: backward recomputes each expert's (n_e, 2I) gate/up rows instead of
    keeping a (T*K, H) or (T*K, 2I) buffer."""

    @staticmethod
    @no_autocast
    def forward(ctx, x, topk_ids, topk_weights, w_gate_up, w_down):
        ids = topk_ids.long().contiguous()
        w = topk_weights.float().contiguous()
        x_, wgu, wd = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
        out = torch.ops.reasonrl.moe_experts_fwd(x_, ids, w, wgu, wd)  # (T, H) x.dtype
        ctx.save_for_backward(x_, ids, w, wgu, wd)
        ctx.w_dtype = topk_weights.dtype
        return out

    @staticmethod
    @first_order_only
    @no_autocast
    def backward(ctx, grad_out):
        x, ids, w, wgu, wd = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx, gw, ggu, gd = torch.ops.reasonrl.moe_experts_bwd(
            grad_out.to(x.dtype).contiguous(), x, ids, w, wgu, wd, bool(need[0]), bool(need[2]),
            bool(need[3]), bool(need[4]))
        return (gx if need[0] else None, None, gw.to(ctx.w_dtype) if need[2] else None,
                ggu if need[3] else None, gd if need[4] else None)


# ---------------------------------------------------------------------------------------------
# public ops
# ---------------------------------------------------------------------------------------------
def moe_router(router_logits, top_k: int, *, scoring="softmax", renormalize: bool = True, bias=None,
               backend="auto"):
    """router_logits (T, E) -> (topk_weights (T, K) float32, topk_ids (T, K) int64).

    Differentiable w.r.t. router_logits through topk_weights."""
    op = "moe_router"
    _check_logits(op, router_logits, top_k)
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"{op}: scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    E = router_logits.shape[1]
    if bias is not None:
        if bias.shape != (E,) or bias.dtype not in _FLOATS:
            raise ValueError(f"{op}: bias must be a float (E,) = ({E},) tensor, got {bias.dtype} of shape {tuple(bias.shape)}")
        check_same_device(op, router_logits=router_logits, bias=bias)
    b = _resolve(backend, router_logits.device, op, "moe_router_fwd", True, False)
    if b == "cuda" and E > CUDA_ROUTER_MAX_EXPERTS and backend == "auto":
        b = "reference"
    if b == "reference" or router_logits.dtype == torch.float64 or router_logits.shape[0] == 0:
        return moe_router_reference(router_logits, top_k, scoring, renormalize, bias)
    # The compiled kernels pick the ids (no gradient); the weights are re-gathered in PyTorch so
    # that autograd reaches the logits through the same few ops as the reference.
    ids = torch.ops.reasonrl.moe_router_fwd(router_logits.contiguous(), top_k, scoring == "sigmoid",
                                            None if bias is None else bias.float().contiguous())  # (T, K) int64
    w = _scores(router_logits, scoring).gather(1, ids)
    if renormalize:
        w = _renormalize(w)
    return w, ids


def moe_dispatch(topk_ids, num_experts: int, block_size: int = 0, *, backend="auto") -> MoEDispatch:
    """topk_ids (T, K) -> MoEDispatch (counts, offsets, sorted_idx [, padded_offsets, padded_idx, block_expert])."""
    op = "moe_dispatch"
    _check_ids(op, topk_ids, num_experts)
    if not isinstance(block_size, int) or block_size < 0:
        raise ValueError(f"{op}: block_size must be an int >= 0, got {block_size!r}")
    if block_size and topk_ids.numel() + num_experts * (block_size - 1) >= 2**31:
        raise ValueError(f"{op}: block_size={block_size} with {num_experts} experts and T*K={topk_ids.numel()} "
                         f"can pad past the int32 indices (T*K + E*(block_size-1) must be < 2**31)")
    b = _resolve(backend, topk_ids.device, op, "moe_dispatch_fwd", True, False)
    if b == "cuda" and num_experts > CUDA_DISPATCH_MAX_EXPERTS and backend == "auto":
        b = "reference"
    if b == "reference":
        _check_id_values(op, topk_ids, num_experts)
        return moe_dispatch_reference(topk_ids, num_experts, block_size)
    outs = torch.ops.reasonrl.moe_dispatch_fwd(topk_ids.contiguous(), num_experts, block_size)  # checks ids
    return MoEDispatch(*outs[:3]) if block_size == 0 else MoEDispatch(*outs)


def moe_experts(x, topk_ids, topk_weights, w_gate_up, w_down, *, backend="auto"):
    """x (T, H) -> (T, H) in x's dtype: out[t] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t])."""
    op = "moe_experts"
    _check_experts(x, topk_ids, topk_weights, w_gate_up, w_down)
    b = _resolve(backend, x.device, op, "moe_experts_fwd", False, True)
    if b == "cpp" and x.dtype == torch.float64:  # the C++ kernels take float32 / bfloat16 / float16
        if backend == "cpp":
            raise ValueError(f"{op}: backend='cpp' takes float32, bfloat16 or float16, got {x.dtype}")
        b = "reference"
    if b == "reference" or x.shape[0] == 0 or topk_ids.shape[1] == 0:
        return moe_experts_reference(x, topk_ids, topk_weights, w_gate_up, w_down)
    if b == "triton":
        from reasonrl.kernels.moe import triton_moe_experts
        return triton_moe_experts(x, topk_ids, topk_weights, w_gate_up, w_down)
    return MoEExpertsFunction.apply(x, topk_ids, topk_weights, w_gate_up, w_down)


def moe_block(x, router_weight, w_gate_up, w_down, top_k, *, scoring="softmax", renormalize=True, bias=None,
              backend="auto"):
    """x (T, H), router_weight (E, H) -> (out (T, H), router_logits (T, E))."""
    if router_weight.dim() != 2 or router_weight.shape[1] != x.shape[-1]:
        raise ValueError(f"moe_block: router_weight must be (E, H={x.shape[-1]}), got shape {tuple(router_weight.shape)}")
    if router_weight.shape[0] != w_gate_up.shape[0]:
        raise ValueError(f"moe_block: router_weight has E={router_weight.shape[0]} rows but w_gate_up has "
                         f"E={w_gate_up.shape[0]} experts")
    router_logits = x @ router_weight.T  # (T, E)
    # One backend name for both ops: where one of them has no such kernel it takes "auto".
    rb = "auto" if backend == "triton" else backend
    eb = "auto" if backend == "cuda" else backend
    w, ids = moe_router(router_logits, top_k, scoring=scoring, renormalize=renormalize, bias=bias, backend=rb)
    return moe_experts(x, ids, w, w_gate_up, w_down, backend=eb), router_logits
