"""Triton kernels of the rollout sampler on GPU: inverse-CDF sampling from softmax(logits / T) with one
given uniform per row, in two launches instead of the ~12 full passes of reasonrl.engine.sampler's
PyTorch path (float copy, divide, log_softmax, exp, pad, chunk sums, cumsums, searchsorted, gathers).

Same draw as engine.sampler._inverse_cdf (rows all sampling, no top-k / top-p / min-p): with
z = logits / T, lse = logsumexp(z), p = exp(z - lse), total = sum p, x = min(u * total, the float
below total), the token is the first index i with cumsum(p)[i] > x; its log-prob is z_i - lse.
  partial  grid (B, S): each program takes one segment of SEG columns of its row: max m_k of z and
           s_k = sum exp(z - m_k) over the segment (lane-wise online, then reduced).
  pick     grid (B,): lse from the S partials; each segment's mass s_k exp(m_k - lse) and their
           running sum pick the segment where x falls; that segment alone is read again, its p summed
           (the rest of x, clamped below the segment's own sum, so that a rounding gap between the
           two sums never picks a zero-probability token) and scanned chunk by chunk for the token.
The logits are read once (plus one segment per row), in their own dtype. The sums add in another
order than PyTorch's, so a draw within float rounding of a CDF step can land on the neighbouring
token: the same distribution, not always the same token as the PyTorch path for the same uniform
(the engine uses one path or the other for all its steps; see Sampler).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 1024  # columns a program handles at a time
SEG_CHUNKS = 4  # chunks per segment of the partial pass (SEG = 4096 columns)


@triton.jit
def _sample_partial_kernel(L, stride_l, TEMP, PM, PS, V, NS, CHUNK: tl.constexpr, SEG_CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    t = tl.load(TEMP + row)
    cols = tl.arange(0, CHUNK)
    m = tl.full((CHUNK,), float("-inf"), tl.float32)
    s = tl.zeros((CHUNK,), tl.float32)
    for c in range(0, SEG_CHUNKS):
        j = (k * SEG_CHUNKS + c) * CHUNK + cols
        z = tl.load(L + row * stride_l + j, mask=j < V, other=float("-inf")).to(tl.float32) / t
        mn = tl.maximum(m, z)
        live = mn > float("-inf")  # lanes that have seen a finite logit (else exp(-inf - -inf) = NaN)
        ref = tl.where(live, mn, 0.0)
        s = tl.where(live, s * tl.exp(m - ref) + tl.exp(z - ref), 0.0)
        m = mn
    mk = tl.max(m, 0)
    sk = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - mk), 0.0), 0)
    tl.store(PM + row * NS + k, mk)
    tl.store(PS + row * NS + k, sk)


@triton.jit
def _below(x):
    """The float just below x > 0 (nextafter(x, 0))."""
    return (x.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True)


@triton.jit
def _sample_pick_kernel(L, stride_l, TEMP, U, PM, PS, TOK, LP, V, NS,
                        BLOCK_S: tl.constexpr, CHUNK: tl.constexpr, SEG_CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(TEMP + row)
    u = tl.load(U + row)
    ks = tl.arange(0, BLOCK_S)
    km = ks < NS
    pm = tl.load(PM + row * NS + ks, mask=km, other=float("-inf"))
    ps = tl.load(PS + row * NS + ks, mask=km, other=0.0)
    M = tl.max(pm, 0)
    lse = M + tl.log(tl.sum(tl.where(pm > float("-inf"), ps * tl.exp(pm - M), 0.0), 0))
    mass = tl.where(pm > float("-inf"), ps * tl.exp(pm - lse), 0.0)  # (S,) probability of each segment
    csum = tl.cumsum(mass, 0)
    total = tl.max(csum, 0)  # the scan's own total (not tl.sum: another order)
    x = tl.minimum(u * total, _below(total))
    last = tl.max(tl.where(mass > 0, ks, 0), 0)  # never a segment of zero mass
    seg = tl.minimum(tl.sum((csum <= x).to(tl.int32), 0), last)
    rem = x - tl.sum(tl.where(ks < seg, mass, 0.0), 0)
    cols = tl.arange(0, CHUNK)
    base = L + row * stride_l
    # the segment's own sum of p, so that rem stays below it
    acc = tl.zeros((CHUNK,), tl.float32)
    for c in range(0, SEG_CHUNKS):
        j = (seg * SEG_CHUNKS + c) * CHUNK + cols
        z = tl.load(base + j, mask=j < V, other=float("-inf")).to(tl.float32) / t
        acc += tl.exp(z - lse)
    rem = tl.maximum(tl.minimum(rem, _below(tl.sum(acc, 0))), 0.0)
    run = 0.0
    tok = -1
    lastpos = -1
    found = 0
    for c in range(0, SEG_CHUNKS):
        j0 = (seg * SEG_CHUNKS + c) * CHUNK
        j = j0 + cols
        z = tl.load(base + j, mask=j < V, other=float("-inf")).to(tl.float32) / t
        p = tl.exp(z - lse)
        inner = tl.cumsum(p, 0) + run
        first = tl.min(tl.where((inner > rem) & (p > 0), j, 2147483647), 0)  # first positive-p index past rem
        here = (found == 0) & (first < 2147483647)
        tok = tl.where(here, first, tok)
        found = tl.where(here, 1, found)
        lastpos = tl.maximum(lastpos, tl.max(tl.where(p > 0, j, -1), 0))
        run = tl.max(inner, 0)
    tok = tl.where(found == 1, tok, lastpos)  # rounding left rem past the scan's total: the last positive p
    # a row with no positive p (all -inf or NaN logits: a diverged model) found nothing: token 0, whose
    # log-prob is then NaN (the engine reports it), never -1 (a read before the row)
    tok = tl.maximum(tl.minimum(tok, V - 1), 0).to(tl.int64)
    zt = tl.load(base + tok).to(tl.float32) / t
    tl.store(TOK + row, tok)
    tl.store(LP + row, zt - lse)


def sample_rows(logits: torch.Tensor, temperatures: torch.Tensor, u: torch.Tensor):
    """logits (B, V) with unit last stride (any float dtype), temperatures (B,) > 0, u (B,) in [0, 1)
    -> (tokens (B,) int64, log-probs (B,) float32 of the temperature-scaled distribution)."""
    B, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    seg = CHUNK * SEG_CHUNKS
    ns = triton.cdiv(V, seg)
    temp = temperatures.to(device=dev, dtype=torch.float32).contiguous()
    uu = u.to(device=dev, dtype=torch.float32).contiguous()
    pm = torch.empty(B, ns, dtype=torch.float32, device=dev)
    ps = torch.empty(B, ns, dtype=torch.float32, device=dev)
    tok = torch.empty(B, dtype=torch.int64, device=dev)
    lp = torch.empty(B, dtype=torch.float32, device=dev)
    if B == 0:
        return tok, lp
    _sample_partial_kernel[(B, ns)](logits, logits.stride(0), temp, pm, ps, V, ns, CHUNK=CHUNK,
                                    SEG_CHUNKS=SEG_CHUNKS, num_warps=4)
    _sample_pick_kernel[(B,)](logits, logits.stride(0), temp, uu, pm, ps, tok, lp, V, ns,
                              BLOCK_S=max(16, triton.next_power_of_2(ns)), CHUNK=CHUNK, SEG_CHUNKS=SEG_CHUNKS,
                              num_warps=4)
    return tok, lp
