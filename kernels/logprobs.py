"""Triton kernels for the log-prob family: log p(id | logits / T), entropy, and their gradient.

Math (per row, z = x / T over the vocabulary V):
    lse     = log sum_j exp(z_j) = m / T + log s      (online: running max m of x, s = sum exp((x - m) / T))
    logp    = z[id] - lse
    entropy = lse - S,  S = sum_j p_j z_j,  p = softmax(z)   (running t = sum exp(d) d, d = (x - m) / T)
    d logp    / d z_j = 1[j == id] - p_j
    d entropy / d z_j = p_j (S - z_j) = p_j (k - d_j),  k = log s - entropy
    d / d x = (d / d z) / T
The log-sum-exp is saved as two floats per row, LSE (N, 2) = (m, log s): backward takes
p = exp((x - m) / T - log s), with x - m exact where p matters. One float32 lse rounds by 5e-4 at
logits near 1e4, and every p of the row would carry that relative error.
Forward reads the logits once and writes four floats per row; nothing of size V is materialized.
Backward reads the logits once and writes the gradient once, optionally over the logits buffer
itself (in place: each element is read before the same program writes it). So fwd+bwd is three
passes over the logits: the byte floor.

Backward takes `vocab_start`: its columns are vocab ids [vocab_start, vocab_start + Vc), which
lets the fused LM-head op run it on vocab chunks of recomputed logits.
"""
import math

import torch
import triton
import triton.language as tl

from .moe import _grouped_pid  # GROUP_M row blocks sweep the column blocks together (W tiles stay in L2)

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None


@triton.jit
def _logprob_fwd_kernel(
    X, stride_x, IDS, LOGP, LSE, ENT,
    V, inv_t, ignore_index,
    WITH_ENT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    tid = tl.load(IDS + row)
    cols = tl.arange(0, BLOCK)
    m = float("-inf")  # running max of the raw logits (scalar: one exp per element, one rescale per tile)
    s = tl.zeros([BLOCK], tl.float32)  # per-lane sum of exp(d), d = (x - m) / T
    t = tl.zeros([BLOCK], tl.float32)  # per-lane sum of exp(d) * d
    for start in range(0, V, BLOCK):
        c = start + cols
        x = tl.load(x_row + c, mask=c < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        # While every logit so far is -inf (a masked vocabulary's first tiles), m_new is -inf and
        # exp(-inf - -inf) would be NaN for good: the exps subtract 0 instead (s stays 0 there).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        dm = (m - m_safe) * inv_t
        alpha = tl.exp(dm)  # exp(-inf) = 0 on the first tile
        d = (x - m_safe) * inv_t
        e = tl.exp(d)  # masked lanes: exp(-inf) = 0
        if WITH_ENT:
            # t is kept relative to the running max so that no terms of size |z| cancel later
            # (at logits near 1e4 a plain sum of e * z loses three digits of the entropy).
            # alpha = 0 (the first tile, or an old max far below, as masks at finfo.min): nothing of the old
            # terms is left, and dm * s would be -inf there (0 * -inf = NaN: the entropy of a row whose
            # first 3 tiles were finfo.min was NaN)
            t = tl.where(alpha > 0, alpha * (t + dm * s), 0.0)
            # -inf logits (a masked vocabulary, and the lanes past V) have e = 0: add 0, not 0 * -inf
            t += e * tl.where(x > float("-inf"), d, 0.0)
        s = s * alpha + e
        m = m_new
    s_tot = tl.sum(s, 0)
    log_s = tl.log(s_tot)
    keep = tid != ignore_index
    in_range = (tid >= 0) & (tid < V)  # the host checks ids; an id out of range never reads outside the row
    safe = tl.where(keep & in_range, tid, 0)
    xt = tl.load(x_row + safe).to(tl.float32)
    tl.store(LSE + 2 * row, m)
    tl.store(LSE + 2 * row + 1, log_s)
    lp = tl.where(in_range, (xt - m) * inv_t - log_s, float("nan"))
    tl.store(LOGP + row, tl.where(keep, lp, 0.0))
    if WITH_ENT:
        tl.store(ENT + row, tl.where(keep, log_s - tl.sum(t, 0) / s_tot, 0.0))


@triton.jit
def _logprob_bwd_kernel(
    G, stride_g, X, stride_x, IDS, LSE, ENT, GLOGP, GENT,
    V, vocab_start, inv_t, ignore_index,
    WITH_ENT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK  # a 2D grid: long rows are split over several programs
    x_row = X + row * stride_x
    g_row = G + row * stride_g
    tid = tl.load(IDS + row)
    keep = tid != ignore_index
    m = tl.load(LSE + 2 * row)
    log_s = tl.load(LSE + 2 * row + 1)
    g = tl.where(keep, tl.load(GLOGP + row), 0.0)
    if WITH_ENT:
        gh = tl.where(keep, tl.load(GENT + row), 0.0)
        k = log_s - tl.load(ENT + row)
    target = tid - vocab_start
    cols = tl.arange(0, BLOCK)
    for start in range(col0, V, BLOCK * tl.num_programs(1)):
        c = start + cols
        mask = c < V
        d = (tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32) - m) * inv_t
        p = tl.exp(d - log_s)
        dz = tl.where(c == target, g, 0.0) - g * p
        if WITH_ENT:
            dz += gh * tl.where(p > 0, p * (k - d), 0.0)  # p = 0 at -inf logits: 0, not 0 * inf
        dz = tl.where(keep, dz, 0.0) * inv_t
        tl.store(g_row + c, dz.to(G.dtype.element_ty), mask=mask)


def _block(V: int, interpret: bool) -> int:
    # NOTE: on GPU 4096-wide tiles with 8 warps keep 16-byte loads and enough bytes in flight;
    # under the CPU interpreter wider tiles mean fewer (slow) interpreted loop trips.
    cap = 16384 if interpret else 4096
    return min(triton.next_power_of_2(V), cap)


def logprob_fwd(x, ids, inv_t: float, ignore_index: int, with_entropy: bool, out_logp, out_lse, out_ent):
    """x (N, V) with x.stride(1) == 1; ids (N,) int64; outputs float32: logp, entropy (N,), lse (N, 2)."""
    N, V = x.shape
    if N == 0:
        return
    interpret = x.device.type == "cpu"
    BLOCK = _block(V, interpret)
    _logprob_fwd_kernel[(N,)](
        x, x.stride(0), ids, out_logp, out_lse, out_ent if with_entropy else out_lse,
        V, inv_t, ignore_index, WITH_ENT=with_entropy, BLOCK=BLOCK,
        num_warps=1 if interpret else 8,
    )


def logprob_bwd(grad_x, x, ids, lse, entropy, grad_logp, grad_entropy, inv_t: float, ignore_index: int,
                vocab_start: int = 0):
    """Writes d(sum g * logp + gh * entropy)/dx into grad_x (N, Vc); grad_x may be x itself."""
    N, V = x.shape
    if N == 0:
        return
    interpret = x.device.type == "cpu"
    BLOCK = _block(V, interpret)
    with_ent = grad_entropy is not None
    # Few rows: split each row over several programs so the whole GPU is busy.
    splits = 1 if interpret else max(1, min(triton.cdiv(V, BLOCK), triton.cdiv(4 * 132, N)))
    _logprob_bwd_kernel[(N, splits)](
        grad_x, grad_x.stride(0), x, x.stride(0), ids, lse,
        entropy if with_ent else lse, grad_logp, grad_entropy if with_ent else grad_logp,
        V, vocab_start, inv_t, ignore_index, WITH_ENT=with_ent, BLOCK=BLOCK,
        num_warps=1 if interpret else 8,
    )


# ----------------------------------------------------------------------------- LM head + log-sum-exp
# linear_token_logprobs' forward as one GEMM whose epilogue reduces its own tile: program (i, j) makes
# the logits tile x = hidden[rows_i] @ W[cols_j]^T in float32 registers, rounds it to the inputs' dtype
# (as the chunked path's GEMM output is, and as the backward's recomputed logits will be), and writes
# per row only the tile's max m, s = sum exp(d) and t = sum exp(d) d, d = (x - m) / T: three floats per
# row per column block (3 N V / BLOCK_N in all). A second, small kernel merges a row's blocks and
# takes the chosen token's logit as hidden[row] . W[id]. The N x V logits never reach memory: the
# chunked path writes them in bf16 (N=16384, V=151936: 5 GB) and reads them back (2 x 1.0 ms at H200
# rates, beside a 9.6-ms GEMM). Exponentials in base 2 (z2 = z log2 e): exp2 is the hardware's own.


@triton.jit
def _linear_lse_kernel(
    HID, W, PART,
    N, V, HD, scale2,
    stride_hn, stride_wv, stride_pc, stride_pn,
    WITH_ENT: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, RNE_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    IDS=None, RV=None, vocab_start=0, GRAD: tl.constexpr = False,
):
    """PART[0|1|2, row, j] = m, s, t2 over the column block j of the logits z = hidden[row] . W[cols_j]:
    m = max z, s = sum 2^d, t2 = sum 2^d d with d = (z - m) * scale2 (scale2 = log2(e) / T). GRAD (the backward, W a column chunk starting at vocab_start, scale2 =
    1 / T): the gradient of the chunk's logits into PART (N, Vc) at row stride stride_pn, from the same
    main loop, so from bit for bit the logits the forward's lse was taken from (_lse_tile_grad)."""
    num_n = tl.cdiv(V, BLOCK_N)
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_M), num_n, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < N, cols < V
    # rows / cols past the end read row 0 / column 0 (no masks in the K loop); their results are
    # masked below
    r_safe = tl.where(rmask, rows, 0).to(tl.int64)
    c_safe = tl.where(cmask, cols, 0).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = HID + r_safe[:, None] * stride_hn + kk[None, :]  # (BM, BK); hidden's rows are contiguous
    b_ptrs = W + c_safe[None, :] * stride_wv + kk[:, None]  # (BK, BN): W^T, K-major like hidden
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, HD, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = (k0 + kk) < HD
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    _lse_tile_out(acc, rows, cols, rmask, cmask, pid_n, PART, stride_pc, stride_pn, scale2, HID.dtype.element_ty,
                  WITH_ENT, RNE_BITS, N, IDS, RV, vocab_start, GRAD)


@triton.jit
def _linear_lse_tma_kernel(
    h_desc, w_desc, PART,
    N, V, HD, scale2, stride_pc, stride_pn,
    WITH_ENT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, RNE_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    IDS=None, RV=None, vocab_start=0, GRAD: tl.constexpr = False, dz_desc=None, DZ_TMA: tl.constexpr = False,
):
    """_linear_lse_kernel with its tiles loaded by TMA (host tensor descriptors: hidden in (BLOCK_M,
    BLOCK_K) boxes, W in (BLOCK_N, BLOCK_K)); out-of-bounds rows, columns and K are read as zeros.
    DZ_TMA (with GRAD): the gradient tile is stored by TMA too (dz_desc: the output in (BLOCK_M,
    BLOCK_N) boxes; rows and columns past its end are dropped by the copy), so no (BM, BN) tile of
    addresses or of masks is made."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(V, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, HD, BLOCK_K):
        a = h_desc.load([pid_m * BLOCK_M, k0])
        b = w_desc.load([pid_n * BLOCK_N, k0])
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b.T, acc, input_precision=PREC)
    if GRAD and DZ_TMA:
        dz = _lse_tile_dz(_round_to(acc, h_desc.dtype, RNE_BITS), rows, cols, rows < N, scale2, WITH_ENT, N, IDS, RV,
                          vocab_start)
        dz_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], dz.to(dz_desc.dtype))
    else:
        _lse_tile_out(acc, rows, cols, rows < N, cols < V, pid_n, PART, stride_pc, stride_pn, scale2, h_desc.dtype,
                      WITH_ENT, RNE_BITS, N, IDS, RV, vocab_start, GRAD)


@triton.jit
def _round_to(x, IN_TY: tl.constexpr, RNE_BITS: tl.constexpr):
    """float32 x rounded to nearest in IN_TY, back in float32. RNE_BITS: bf16 by its bits (Triton 3.9's
    interpreter truncates in .to(tl.bfloat16))."""
    if RNE_BITS:
        b = x.to(tl.uint32, bitcast=True)
        return ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(IN_TY).to(tl.float32)


@triton.jit
def _lse_tile_out(acc, rows, cols, rmask, cmask, pid_n, PART, stride_pc, stride_pn, scale2, IN_TY: tl.constexpr,
                  WITH_ENT: tl.constexpr, RNE_BITS: tl.constexpr, N, IDS, RV, vocab_start, GRAD: tl.constexpr):
    # rounded to the inputs' dtype first, as the backward's recomputed logits are (bf16 / fp16 logits):
    # an lse of the unrounded logits would leave that backward's softmax summing to 1 +- 1e-2 in bf16
    acc = _round_to(acc, IN_TY, RNE_BITS)
    if GRAD:
        _lse_tile_grad(acc, rows, cols, rmask, cmask, PART, stride_pn, scale2, WITH_ENT, N, IDS, RV, vocab_start)
    else:
        _lse_tile_stats(acc, rows, rmask, cmask, pid_n, PART, stride_pc, stride_pn, scale2, WITH_ENT)


@triton.jit
def _lse_tile_grad(acc, rows, cols, rmask, cmask, DZ, stride_zn, inv_t, WITH_ENT: tl.constexpr, N, IDS, RV,
                   vocab_start):
    """_lse_tile_dz stored through pointers: an int64 base for the tile and int32 offsets inside it
    (BLOCK_M x the chunk's width < 2^31; a (BM, BN) tile of 64-bit addresses would hold two registers
    an element)."""
    dz = _lse_tile_dz(acc, rows, cols, rmask, inv_t, WITH_ENT, N, IDS, RV, vocab_start)
    row0 = tl.min(rows, axis=0)
    tl.store(DZ + row0.to(tl.int64) * stride_zn + ((rows - row0)[:, None] * stride_zn + cols[None, :]),
             dz.to(DZ.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _lse_tile_dz(acc, rows, cols, rmask, inv_t, WITH_ENT: tl.constexpr, N, IDS, RV, vocab_start):
    """d(sum g logp + gh entropy) / d logits for the tile, as _logprob_bwd_kernel (d = (logit - m) / T):
    dz = (1[col == id] - p) g + gh p (k - d), times 1 / T; RV (5, N) float32 holds per row the lse's
    m and log s, k = log s - entropy, and g, gh already zero on ignored rows. Rows past N read row 0
    (their results are not stored)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    r = tl.where(rmask, rows, 0)
    m = tl.load(RV + r)
    log_s = tl.load(RV + N + r)
    g = tl.load(RV + 3 * N + r)
    tid = tl.load(IDS + r) - vocab_start
    d = (acc - m[:, None]) * inv_t
    p = tl.exp2((d - log_s[:, None]) * LOG2E)
    # p (gh (k - d) - g): once p is made, d's last use makes the factor, so two (BM, BN) float32
    # tiles are live at once, not three (Triton 3.6 spilled the three-tile form in every config)
    if WITH_ENT:
        k = tl.load(RV + 2 * N + r)
        gh = tl.load(RV + 4 * N + r)
        dz = p * (tl.where(p > 0, gh[:, None] * (k[:, None] - d), 0.0) - g[:, None])
    else:
        dz = p * -g[:, None]
    return tl.where(cols[None, :] == tid[:, None], dz + g[:, None], dz) * inv_t


@triton.jit
def _lse_tile_stats(acc, rows, rmask, cmask, pid_n, PART, stride_pc, stride_pn, scale2, WITH_ENT: tl.constexpr):
    # Per element: the rounding, one select, the max, a subtraction and a product, exp2, the sum (plus
    # an FMA and a select for the entropy). m is the raw logits' max (the lse's first float, exact).
    acc = tl.where(cmask[None, :], acc, float("-inf"))  # every block has a column < V: the max is finite
    m = tl.max(acc, 1)
    d = (acc - m[:, None]) * scale2  # <= 0; -inf past V
    e = tl.exp2(d)
    pbase = PART + rows.to(tl.int64) * stride_pn + pid_n
    tl.store(pbase, m, mask=rmask)
    tl.store(pbase + stride_pc, tl.sum(e, 1), mask=rmask)
    if WITH_ENT:  # relative to the block's max: no terms of size |z| cancel (see _logprob_fwd_kernel)
        tl.store(pbase + 2 * stride_pc, tl.sum(e * tl.where(cmask[None, :], d, 0.0), 1), mask=rmask)


@triton.jit
def _lse_merge_kernel(
    PART, HID, W, IDS, LOGP, LSE, ENT,
    N, NB, V, HD, scale2, ignore_index, stride_pc, stride_pn, stride_hn, stride_wv,
    WITH_ENT: tl.constexpr, RNE_BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """A row's blocks merged (base 2, converted to natural log at the end), with c = scale2:
    M = max m_j, S = sum s_j 2^((m_j - M) c), T = sum 2^((m_j - M) c) (t_j + (m_j - M) c s_j);
    lse = (M, log2 S ln 2) (so lse = M / T + log S), logp = ((zt - M) c - log2 S) ln 2,
    entropy = (log2 S - T / S) ln 2."""
    LN2: tl.constexpr = 0.6931471805599453
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    base = PART + rows.to(tl.int64)[:, None] * stride_pn
    cc = tl.arange(0, BLOCK_C)
    M = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for c0 in range(0, NB, BLOCK_C):
        msk = rmask[:, None] & ((c0 + cc) < NB)[None, :]
        M = tl.maximum(M, tl.max(tl.load(base + c0 + cc[None, :], mask=msk, other=float("-inf")), 1))
    M_safe = tl.where(rmask, M, 0.0)
    S = tl.zeros((BLOCK_R,), tl.float32)
    T = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(0, NB, BLOCK_C):
        msk = rmask[:, None] & ((c0 + cc) < NB)[None, :]
        p = base + c0 + cc[None, :]
        dm = (tl.load(p, mask=msk, other=float("-inf")) - M_safe[:, None]) * scale2  # <= 0; -inf where masked
        w = tl.exp2(dm)
        s = tl.load(p + stride_pc, mask=msk, other=0.0)
        S += tl.sum(w * s, 1)
        if WITH_ENT:
            t = tl.load(p + 2 * stride_pc, mask=msk, other=0.0)
            T += tl.sum(tl.where(w > 0, w * (t + tl.where(msk, dm, 0.0) * s), 0.0), 1)  # w = 0: see above
    S = tl.where(rmask, S, 1.0)  # rows past N: no log(0)
    log_s = tl.log2(S)
    tid = tl.load(IDS + rows, mask=rmask, other=ignore_index)
    keep = tid != ignore_index
    in_range = (tid >= 0) & (tid < V)  # the host raises for the others
    # the chosen logit: hidden[row] . W[id] (N x H reads, not a compare over every logit in the GEMM's
    # epilogue), rounded to the inputs' dtype as the GEMM's logits are
    hm = rmask & keep & in_range
    t_safe = tl.where(hm, tid, 0)
    kk = tl.arange(0, BLOCK_H)
    zt = tl.zeros((BLOCK_R,), tl.float32)
    for k0 in range(0, HD, BLOCK_H):
        km = hm[:, None] & ((k0 + kk) < HD)[None, :]
        h = tl.load(HID + rows.to(tl.int64)[:, None] * stride_hn + k0 + kk[None, :], mask=km, other=0.0)
        w = tl.load(W + t_safe.to(tl.int64)[:, None] * stride_wv + k0 + kk[None, :], mask=km, other=0.0)
        zt += tl.sum(h.to(tl.float32) * w.to(tl.float32), 1)
    zt = _round_to(zt, HID.dtype.element_ty, RNE_BITS)
    lp = tl.where(in_range, ((zt - M_safe) * scale2 - log_s) * LN2, float("nan"))
    tl.store(LSE + 2 * rows, M_safe, mask=rmask)
    tl.store(LSE + 2 * rows + 1, log_s * LN2, mask=rmask)
    tl.store(LOGP + rows, tl.where(keep, lp, 0.0), mask=rmask)
    if WITH_ENT:
        tl.store(ENT + rows, tl.where(keep, (log_s - T / S) * LN2, 0.0), mask=rmask)


# NOTE: reasoned, not timed (no GPU on 2026-11-28). 128 x 128 tiles, BK 64, 8 warps (two warpgroups of
# m64n128 wgmma), 3 stages, tiles loaded by TMA: compiled for sm_90a (Triton 3.9) that takes 96 KiB of
# shared memory and 100 registers a thread (146 with the entropy), no spills, so two programs share an
# SM without the entropy and one's epilogue (exp2 over its tile, no tensor-core work) runs beside the
# other's GEMM. The same with pointer loads: 113 / 127 registers. The classic large-GEMM config
# (128 x 256: 144 KiB, 196-255 registers, one program an SM) leaves the tensor cores idle through each
# epilogue. bench_logprobs.py --gpu times every candidate below side by side (TMA: H a multiple of 8).
LSE_GEMM_GPU = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, TMA=True)
LSE_GEMM_CANDIDATES = (LSE_GEMM_GPU,
                       dict(LSE_GEMM_GPU, TMA=False),
                       dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, TMA=True),
                       dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, TMA=False),
                       dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=16, num_warps=8, num_stages=4, TMA=True),
                       dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3, TMA=False),
                       dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, TMA=False))
LSE_GEMM_CPU = dict(BLOCK_M=32, BLOCK_N=512, BLOCK_K=32, GROUP_M=4)  # the interpreter: few, wide programs


def lse_gemm_config(hidden, weight):
    """The block config for linear_lse_fwd (and its backward's linear_logits_grad) on these tensors, with
    "TMA" resolved: TMA wants 16-byte aligned bases and row strides (H a multiple of 8 in bf16)."""
    c = dict(LSE_GEMM_CPU if hidden.device.type == "cpu" else LSE_GEMM_GPU)
    c["TMA"] = bool(c.get("TMA", False) and TensorDescriptor is not None and all(
        t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in (hidden, weight)))
    return c


def _lse_gemm_flags(hidden):
    interpret = hidden.device.type == "cpu"
    upcast = interpret and hidden.dtype != torch.float32  # the interpreter's bf16/fp16 tl.dot is wrong
    prec = "ieee" if hidden.dtype == torch.float32 or upcast else "tf32"  # fp32: PyTorch's exact products
    rne = interpret and hidden.dtype == torch.bfloat16  # Triton 3.9's interpreter truncates to bf16
    return interpret, upcast, prec, rne


def linear_logits_grad(hidden, weight, out, config, ids, rv, vocab_start: int, inv_t: float, with_entropy: bool):
    """out (N, Vc) = the gradient of sum g logp + gh entropy with respect to the logits hidden @ weight.T
    (weight = W[vocab_start:vocab_start + Vc]), in hidden's dtype, straight from linear_lse_fwd's own main
    loop in `config` (lse_gemm_config's, as the forward used): with vocab_start a multiple of BLOCK_N
    every tile is one of the forward's, so the logits are, bit for bit, the ones the forward's lse was
    taken from (a cuBLAS / MKL recompute sums in another order: at a token with p ~ 1 a last-bit
    difference moves p by exp(ulp)), and no logits reach memory (one write of the gradient).
    rv (5, N) float32: the lse's m and log s, log s - entropy, g and gh (zero on ignored rows); ids (N,)
    int64."""
    N, H = hidden.shape
    Vc = weight.shape[0]
    if N == 0 or Vc == 0:
        return out
    _launch_tiles(hidden, weight, out, inv_t, 0, out.stride(0), config, with_entropy,
                  dict(IDS=ids, RV=rv, vocab_start=vocab_start, GRAD=True))
    return out


def _launch_tiles(hidden, weight, out, scale2, stride_pc, stride_pn, config, with_entropy, extra=None, w_desc=None):
    """One launch of the tile kernel (TMA or pointer loads, as config["TMA"] says) over hidden x weight."""
    N, H = hidden.shape
    c = dict(config)
    BM, BN, BK, GM = (c.pop(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"))
    tma = c.pop("TMA", False)
    _, upcast, prec, rne = _lse_gemm_flags(hidden)
    grid = (triton.cdiv(N, BM) * triton.cdiv(weight.shape[0], BN),)
    flags = dict(WITH_ENT=with_entropy, UPCAST=upcast, PREC=prec, RNE_BITS=rne, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                 GROUP_M=GM, **(extra or {}), **c)
    if tma:
        if flags.get("GRAD") and out.stride(1) == 1 and out.stride(0) * out.element_size() % 16 == 0 \
                and out.data_ptr() % 16 == 0:  # TMA's alignment; otherwise the pointer store
            flags.update(dz_desc=TensorDescriptor(out, list(out.shape), [stride_pn, 1], [BM, BN]), DZ_TMA=True)
        _linear_lse_tma_kernel[grid](TensorDescriptor.from_tensor(hidden, [BM, BK]),
                                     w_desc or TensorDescriptor.from_tensor(weight, [BN, BK]), out, N,
                                     weight.shape[0], H, scale2, stride_pc, stride_pn, **flags)
    else:
        _linear_lse_kernel[grid](hidden, weight, out, N, weight.shape[0], H, scale2, hidden.stride(0),
                                 weight.stride(0), stride_pc, stride_pn, EVEN_K=H % BK == 0, **flags)


def linear_lse_fwd(hidden, weight, ids, inv_t: float, ignore_index: int, with_entropy: bool,
                   out_logp, out_lse, out_ent, part_bytes: int, config=None):
    """hidden (N, H) with unit last stride, weight (V, H) with unit last stride, ids (N,) int64 ->
    float32 outputs: logp and entropy (N,), lse (N, 2) (m, log s; see the module docstring). Rows go in chunks whose partials (3 x rows x cdiv(V, BLOCK_N) float32)
    fit part_bytes. ids outside [0, V) that are not ignore_index get NaN: the caller checks ids."""
    N, H = hidden.shape
    V = weight.shape[0]
    if N == 0:
        return
    config = config or lse_gemm_config(hidden, weight)
    BM, BN = config["BLOCK_M"], config["BLOCK_N"]
    interpret, _, _, rne = _lse_gemm_flags(hidden)
    w_desc = TensorDescriptor.from_tensor(weight, [BN, config["BLOCK_K"]]) if config.get("TMA") else None
    nb = triton.cdiv(V, BN)
    step = max(BM, part_bytes // (3 * 4 * nb) // BM * BM)
    step = min(step, N)
    part = torch.empty(3, step, nb, dtype=torch.float32, device=hidden.device)
    BR, BC = (16, 64) if interpret else (16, 128)
    scale2 = inv_t * math.log2(math.e)
    for r0 in range(0, N, step):
        rows = min(step, N - r0)
        h, i = hidden[r0:r0 + rows], ids[r0:r0 + rows]
        _launch_tiles(h, weight, part, scale2, part.stride(0), part.stride(1), config, with_entropy, w_desc=w_desc)
        _lse_merge_kernel[(triton.cdiv(rows, BR),)](
            part, h, weight, i, out_logp[r0:r0 + rows], out_lse[r0:r0 + rows],
            out_ent[r0:r0 + rows] if with_entropy else out_lse[r0:r0 + rows],
            rows, nb, V, H, scale2, ignore_index, part.stride(0), part.stride(1), h.stride(0), weight.stride(0),
            WITH_ENT=with_entropy, RNE_BITS=rne, BLOCK_R=BR, BLOCK_C=BC, BLOCK_H=64 if interpret else 128,
            num_warps=1 if interpret else 4)
