"""Triton kernels of the paged KV-cache family: the cache write and split-K decode attention.

store_kv: program t copies token t's (Hkv, D) keys and values to its slot (block * bs + offset);
slot -1 writes nothing.

Decode attention (flash-decoding): one query token per sequence b. The context 0..n-1
(n = context_lens[b]) is cut into S splits of ceil(n / S) keys (rounded up to whole tiles of
BLOCK_N keys); program (b, h, s) handles kv head h, its G = Hq / Hkv query heads together (each
key/value row is read once for the whole group: grouped-query attention's bandwidth saving; the G
heads are padded to 16 rows so both products run as tl.dot on tensor cores) and the keys of split
s, with an online softmax in float32:
    m = max_j s_j,  l = sum_j exp(s_j - m),  o = sum_j exp(s_j - m) v_j / l,  lse = m + log l
A second pass merges the splits of each (b, head):
    out = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M),   M = max_s lse_s
Why split: at batch 1-8 with long contexts, B * Hkv programs would leave most SMs idle.
Key j's address is block_tables[b, j // bs] * bs + j % bs, looked up per token, so any block
size works (not only powers of two). The number of splits depends only on tensor shapes, never on
context_lens values, so the launch is CUDA-graph safe.
Materialized: float32 partials (B, Hq, S, D) and (B, Hq, S); nothing of size context x heads.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cs, stride_ch,  # cache viewed as (num_blocks * bs, Hkv, D); last dim contiguous
                     H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # t * stride_kt in int64, as every other kernel's row offsets
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < H) & (d < D)
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        dst = slot * stride_cs + h * stride_ch + d
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _paged_decode_split_kernel(q_ptr, kc_ptr, vc_ptr, table_ptr, lens_ptr, mid_o_ptr, mid_lse_ptr, scale,
                               stride_qb, stride_qh, stride_cb, stride_cs, stride_ch, stride_tb,
                               S, BS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                               BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                               UPCAST: tl.constexpr):
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.load(lens_ptr + b)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask, dmask = g < G, d < D
    heads = h * G + g  # query heads of this kv head
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # (BG, BD), the cache's dtype
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    # this sequence's own context cut into S splits (whole BLOCK_N tiles): every split of a sequence
    # has work, whatever the width of the block tables (a CUDA graph's are the longest sequence's)
    split_len = tl.cdiv(tl.cdiv(n, S), BLOCK_N) * BLOCK_N
    start = s * split_len
    end = tl.minimum(start + split_len, n)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jmask = j < end
        blk = tl.load(table_ptr + b * stride_tb + j // BS, mask=jmask, other=0).to(tl.int64)
        row = blk * stride_cb + (j % BS) * stride_cs + h * stride_ch  # (BN,)
        kv_mask = jmask[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
        v = tl.load(vc_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:  # Triton 3.9's interpreter gets bf16 tl.dot wrong: run it in float32 there
            k, v = k.to(tl.float32), v.to(tl.float32)
        sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BG, BN) float32
        sc = tl.where(jmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        # p rounded to the values' dtype for the tensor-core product, as flash attention does
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    has = l > 0  # an empty split (start >= n) reports lse = -inf and o = 0
    o = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
    base = (b * (G * tl.num_programs(1)) + heads) * S + s  # mid layout (B, Hq, S, D)
    tl.store(mid_o_ptr + base[:, None] * D + d[None, :], o, mask=gmask[:, None] & dmask[None, :])
    tl.store(mid_lse_ptr + base, lse, mask=gmask)


@triton.jit
def _paged_decode_reduce_kernel(mid_o_ptr, mid_lse_ptr, out_ptr, stride_ob, stride_oh, Hq, S,
                                D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b, hq = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    base = (b * Hq + hq) * S
    lse = tl.load(mid_lse_ptr + base + s, mask=s < S, other=float("-inf"))  # (BS,)
    w = tl.exp(lse - tl.max(lse, axis=0))
    o = tl.load(mid_o_ptr + (base + s)[:, None] * D + d[None, :], mask=(s < S)[:, None] & (d < D)[None, :], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def _last_dim_contiguous(name, t):
    if t.stride(-1) != 1:
        raise ValueError(f"paged triton kernels: {name} needs a contiguous last dim, got strides {t.stride()}")


def store_kv_fwd(k, v, k_cache, v_cache, slot_mapping):
    """k, v (T, Hkv, D) -> k_cache, v_cache (NB, bs, Hkv, D) in place."""
    T, H, D = k.shape
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        _last_dim_contiguous(name, t)
    if k_cache.stride() != v_cache.stride() or k_cache.stride(0) != k_cache.shape[1] * k_cache.stride(1):
        raise ValueError("store_kv (triton): k_cache and v_cache need the same strides with blocks laid out densely")
    _store_kv_kernel[(T,)](k, v, k_cache, v_cache, slot_mapping.contiguous(),
                           k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           k_cache.stride(1), k_cache.stride(2),
                           H=H, D=D, BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D))


def num_splits_for(B: int, Hkv: int, max_len: int) -> int:
    """Enough programs to fill a GPU (~1024 of them), with at least 64 keys a split at the longest
    context (each sequence splits its own context: shorter ones get shorter splits)."""
    by_len = triton.cdiv(max_len, 64)
    by_fill = max(1, 1024 // max(1, B * Hkv))
    return max(1, min(by_len, by_fill, 64))


def paged_attention_decode_fwd(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None):
    """q (B, Hq, D) -> (B, Hq, D) in q's dtype. num_splits None: chosen from the shapes."""
    B, Hq, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _last_dim_contiguous(name, t)
    if k_cache.stride() != v_cache.stride():
        raise ValueError("paged_attention_decode (triton): k_cache and v_cache need the same strides")
    out = torch.empty_like(q)  # in q's dtype; q itself runs in the cache's dtype (e.g. under autocast)
    q = q.to(k_cache.dtype)
    block_tables = block_tables.contiguous()
    max_len = block_tables.shape[1] * bs
    S = num_splits or num_splits_for(B, Hkv, max_len)
    BLOCK_N = 32
    upcast = q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    mid_o = torch.empty(B, Hq, S, D, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    _paged_decode_split_kernel[(B, Hkv, S)](
        q, k_cache, v_cache, block_tables, context_lens.contiguous(), mid_o, mid_lse, float(scale),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        S, BS=bs, G=G, D=D, BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=BLOCK_N,
        PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast)
    # S is a runtime argument (only index arithmetic): without CUDA graphs the block tables widen as
    # sequences grow, and a constexpr S compiled both kernels again at every new split count
    _paged_decode_reduce_kernel[(B, Hq)](mid_o, mid_lse, out, out.stride(0), out.stride(1), Hq, S,
                                         D=D, BLOCK_S=max(2, triton.next_power_of_2(S)),
                                         BLOCK_D=triton.next_power_of_2(D))
    return out
