"""Paged KV cache ops: write new keys/values through a slot mapping, and decode attention over
a block table.

Cache layout (vLLM's): k_cache, v_cache are (num_blocks, block_size, Hkv, D). A token's slot is
`block_id * block_size + offset`; slot -1 means "do not write" (padding, or a token whose KV is
already cached because its prefix is shared).

Decode attention, one new query token per sequence b, grouped-query (Hq % Hkv == 0, query head h
reads kv head h // (Hq // Hkv)):
    ctx_b = context_lens[b]   (includes the token just written)
    key j of sequence b lives at k_cache[block_tables[b, j // bs], j % bs]
    s_j = scale * <q_h, k_j>,  out_h = sum_j softmax(s)_j v_j      j < ctx_b
Softmax is accumulated in float32 (float64 for float64 inputs) whatever the cache dtype.

Backends: "reference" (plain PyTorch, gathers the blocks into a padded (B, L, Hkv, D) view), and
"triton" / "cpp" where built; see kernels/paged.py and csrc/cpu/paged.cpp.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch

from reasonrl.ops._backend import check_same_device, cpp_available, resolve

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CPP_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# checks: shapes / dtypes always; values (slot range, context lengths) only for CPU tensors, since
# on GPU they would cost a device sync per layer per step (and break CUDA graph capture).
# ---------------------------------------------------------------------------------------------
def _check_cache(op, k_cache, v_cache):
    if k_cache.dim() != 4:
        raise ValueError(f"{op}: k_cache must be (num_blocks, block_size, Hkv, D), got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    if k_cache.shape[2] < 1:
        raise ValueError(f"{op}: k_cache must have at least one kv head (Hkv >= 1), got shape {tuple(k_cache.shape)}")
    if k_cache.dtype not in _FLOATS or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{op}: k_cache/v_cache must share a float dtype, got {k_cache.dtype}, {v_cache.dtype}")


def _check_store(k, v, k_cache, v_cache, slot_mapping):
    op = "store_kv"
    _check_cache(op, k_cache, v_cache)
    _, bs, hkv, d = k_cache.shape
    if k.dim() != 3 or k.shape[1:] != (hkv, d):
        raise ValueError(f"store_kv: k must be (T, {hkv}, {d}) to match the cache, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"store_kv: v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"store_kv: slot_mapping must be (T,) = ({k.shape[0]},), got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"store_kv: slot_mapping must be int64 (or int32), got {slot_mapping.dtype}")
    dev = k_cache.device
    if not (k.device == v.device == v_cache.device == slot_mapping.device == dev):
        check_same_device(op, k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)


def _check_store_values(k_cache, slot_mapping):
    if slot_mapping.device.type == "cpu" and slot_mapping.numel():
        n_slots = k_cache.shape[0] * k_cache.shape[1]
        lo, hi = slot_mapping.min().item(), slot_mapping.max().item()
        if lo < -1 or hi >= n_slots:
            raise ValueError(f"store_kv: slot_mapping values must be -1 or in [0, {n_slots}), got range [{lo}, {hi}]")


def _check_decode(q, k_cache, v_cache, block_tables, context_lens):
    op = "paged_attention_decode"
    _check_cache(op, k_cache, v_cache)
    nb, bs, hkv, d = k_cache.shape
    if q.dim() != 3 or q.shape[2] != d:
        raise ValueError(f"{op}: q must be (B, Hq, {d}), got {tuple(q.shape)}")
    B, hq = q.shape[0], q.shape[1]
    if hq % hkv:
        raise ValueError(f"{op}: query heads {hq} must be a multiple of kv heads {hkv}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"{op}: block_tables must be (B={B}, max_blocks), got {tuple(block_tables.shape)}")
    if context_lens.shape != (B,):
        raise ValueError(f"{op}: context_lens must be (B,) = ({B},), got {tuple(context_lens.shape)}")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{op}: {name} must be int32, got {t.dtype}")
    if not (q.device == v_cache.device == block_tables.device == context_lens.device == k_cache.device):
        check_same_device(op, q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                          context_lens=context_lens)


def _check_scale(scale) -> float:
    """scale as a Python float: a finite number > 0 (NaN would make every output NaN)."""
    if type(scale) is float and 0.0 < scale < math.inf:  # the usual case, per layer per decode step
        return scale
    op = "paged_attention_decode"
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.dtype.is_complex:
        value = float(scale)
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        value = float(scale)
    else:
        raise TypeError(f"{op}: scale must be a float (a finite number > 0), got {type(scale).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: scale must be a finite number > 0, got {value!r}")
    return value


def _check_decode_values(q, k_cache, block_tables, context_lens):
    op = "paged_attention_decode"
    nb, bs = k_cache.shape[:2]
    if context_lens.device.type == "cpu" and q.shape[0]:
        lo, hi = context_lens.min().item(), context_lens.max().item()
        cap = block_tables.shape[1] * bs
        if lo < 1 or hi > cap:
            raise ValueError(f"{op}: context_lens must be in [1, max_blocks * block_size = {cap}], got range [{lo}, {hi}]")
        used = block_tables[:, : (hi + bs - 1) // bs]
        need = torch.arange(used.shape[1]).unsqueeze(0) * bs < context_lens.unsqueeze(1)
        bad = need & ((used < 0) | (used >= nb))
        if bad.any():
            raise ValueError(f"{op}: block_tables has ids outside [0, {nb}) inside the context lengths")


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------
def store_kv_reference(k, v, k_cache, v_cache, slot_mapping):
    """k, v (T, Hkv, D) -> written in place into the flat (num_blocks * block_size, Hkv, D) view."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    kc = k_cache.view(-1, *k_cache.shape[2:])  # (num_blocks * bs, Hkv, D)
    vc = v_cache.view(-1, *v_cache.shape[2:])
    kc.index_copy_(0, slots, k[keep].to(k_cache.dtype))
    vc.index_copy_(0, slots, v[keep].to(v_cache.dtype))


def paged_attention_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Gathers each sequence's blocks into a padded (B, L, Hkv, D) tensor, masks j >= ctx_b."""
    B, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    nblk = block_tables.shape[1]
    if q.device.type == "cpu" and B:  # trim to the longest context (values already checked)
        nblk = min(nblk, (int(context_lens.max()) + bs - 1) // bs)
    tables = block_tables[:, :nblk].long().clamp(0, k_cache.shape[0] - 1)  # (B, nblk)
    k = k_cache[tables].reshape(B, nblk * bs, hkv, d).to(acc)  # (B, L, Hkv, D)
    v = v_cache[tables].reshape(B, nblk * bs, hkv, d).to(acc)
    g = hq // hkv
    qg = q.to(acc).view(B, hkv, g, d)  # (B, Hkv, G, D)
    s = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale  # (B, Hkv, G, L)
    mask = torch.arange(nblk * bs, device=q.device)[None, :] >= context_lens[:, None]  # (B, L)
    s = s.masked_fill(mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("bhgl,blhd->bhgd", p, v)  # (B, Hkv, G, D)
    return out.reshape(B, hq, d).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# public ops
# ---------------------------------------------------------------------------------------------
def _cpp_has(name):
    return cpp_available() and hasattr(torch.ops.reasonrl, name)


def _cpp_fits(k_cache, v_cache):
    """The C++ kernels take contiguous f32/bf16/f16 caches; anything else runs the reference."""
    return k_cache.dtype != torch.float64 and k_cache.is_contiguous() and v_cache.is_contiguous()


def empty_kv_cache(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor for a KV cache: its own 2 MiB-aligned mapping advised for
    transparent huge pages, returned to the OS when the tensor dies (csrc/paged.cpp empty_huge_pages;
    plain torch.empty without the C++ op). Decode attention reads blocks at scattered addresses: with
    huge pages the TLB covers the whole cache and first touches fault once per 2 MiB, not per 4 KiB."""
    if _cpp_has("empty_huge_pages"):
        return torch.ops.reasonrl.empty_huge_pages(list(shape), dtype)
    return torch.empty(shape, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _resolve(backend, device, op, cpp_name):
    """The concrete backend; "cpp" needs this op in reasonrl._C, and there is no CUDA C++ version.
    Cached: it runs per layer per decode step, and its answer depends only on its arguments."""
    if backend == "cuda":
        raise RuntimeError(f"{op}: backend='cuda' is not available: paged ops have no CUDA C++ kernel (use 'triton')")
    b = resolve(backend, device, op, prefer_cuda=("triton",))
    if b == "cpp" and not _cpp_has(cpp_name):
        if backend == "cpp":
            raise RuntimeError(f"{op}: backend='cpp' is not available: reasonrl._C has no {cpp_name} (rebuild)")
        b = "reference"
    return b


def _cpp_direct(op, cpp_name, backend, device, dt, *tensors) -> bool:
    """The C++ op can take these exact tensors as they are (CPU, one f32/bf16/f16 dtype, contiguous, no
    autograd): then it is called without the Python checks, since it checks shapes and values itself.
    NOTE: the Python checks and conversions cost 8 us (store) and 20 us (decode) per layer per decode
    step against 3 us for store_kv_fwd itself (tiny model, one thread)."""
    return (device.type == "cpu" and backend in ("auto", "cpp") and dt in _CPP_FLOATS and not torch.is_grad_enabled()
            and all(t.dtype == dt and t.is_contiguous() for t in tensors) and _resolve(backend, device, op, cpp_name) == "cpp")


@torch.no_grad()
def _store_kv(k, v, k_cache, v_cache, slot_mapping, backend):
    _check_store(k, v, k_cache, v_cache, slot_mapping)
    if k.shape[0] == 0:
        return
    b = _resolve(backend, k.device, "store_kv", "store_kv_fwd")
    if b == "cpp" and _cpp_fits(k_cache, v_cache):  # checks slot values itself
        k, v = (t.to(k_cache.dtype).contiguous() for t in (k, v))
        torch.ops.reasonrl.store_kv_fwd(k_cache, v_cache, k, v, slot_mapping.long().contiguous())
        return
    _check_store_values(k_cache, slot_mapping)
    if b == "triton":
        from reasonrl.kernels.paged import store_kv_fwd
        store_kv_fwd(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_reference(k, v, k_cache, v_cache, slot_mapping)


def store_kv(k, v, k_cache, v_cache, slot_mapping, *, backend="auto"):
    """Write k, v (T, Hkv, D) into k_cache, v_cache (num_blocks, block_size, Hkv, D) at slot_mapping (T,)."""
    if slot_mapping.dtype == torch.int64 and _cpp_direct("store_kv", "store_kv_fwd", backend, k_cache.device,
                                                   k_cache.dtype, k, v, k_cache, v_cache):
        if slot_mapping.is_contiguous() and k.dim() == 3:
            return torch.ops.reasonrl.store_kv_fwd(k_cache, v_cache, k, v, slot_mapping)
    return _store_kv(k, v, k_cache, v_cache, slot_mapping, backend)


def paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale: float, *, backend="auto"):
    """q (B, Hq, D) against the paged cache -> (B, Hq, D) in q's dtype."""
    scale = _check_scale(scale)
    if (block_tables.dtype == context_lens.dtype == torch.int32 and block_tables.is_contiguous()
            and context_lens.is_contiguous() and _cpp_direct("paged_attention_decode", "paged_attention_decode_fwd", backend,
                                                            q.device, k_cache.dtype, q, k_cache, v_cache)):
        return torch.ops.reasonrl.paged_attention_decode_fwd(q, k_cache, v_cache, block_tables, context_lens, scale)
    return _paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, backend)


@torch.no_grad()
def _paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, backend):
    _check_decode(q, k_cache, v_cache, block_tables, context_lens)
    if q.shape[0] == 0:
        return q.new_empty(q.shape)
    b = _resolve(backend, q.device, "paged_attention_decode", "paged_attention_decode_fwd")
    if b == "cpp":  # checks context lengths and block ids itself; q runs in the cache's dtype
        if _cpp_fits(k_cache, v_cache):
            return torch.ops.reasonrl.paged_attention_decode_fwd(
                q.to(k_cache.dtype).contiguous(), k_cache, v_cache, block_tables.int().contiguous(),
                context_lens.int().contiguous(), float(scale)).to(q.dtype)
        if backend == "cpp":
            raise ValueError("paged_attention_decode: backend='cpp' needs contiguous float32/bfloat16/float16 "
                             f"caches, got {k_cache.dtype}")
    _check_decode_values(q, k_cache, block_tables, context_lens)
    if b == "triton" and torch.float64 in (q.dtype, k_cache.dtype):  # the kernel's math is float32
        if backend == "triton":
            raise ValueError("paged_attention_decode: backend='triton' computes in float32; float64 q or caches "
                             "run on backend='reference' (or 'auto')")
        b = "reference"
    if b == "triton":
        from reasonrl.kernels.paged import paged_attention_decode_fwd
        return paged_attention_decode_fwd(q, k_cache, v_cache, block_tables, context_lens, scale)
    return paged_attention_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale)
