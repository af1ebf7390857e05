"""Triton kernels of MoE expert compute: grouped GEMMs over expert-sorted rows, SwiGLU, combine.

Math (T tokens, top-K, E experts; x (T, H), w_gate_up (E, 2I, H) = [Wg; Wu], w_down (E, H, I)):
    assignment a = t*K + k goes to expert e = ids[t, k] with weight w_a = topk_weights[t, k]
    g_a = x_t Wg_e^T,  u_a = x_t Wu_e^T                       (I,)
    act_a = silu(g_a) * u_a,  y_a = act_a Wd_e^T              (I,), (H,)
    out_t = sum_k w_{tK+k} y_{tK+k}                           (H,)
Backward, with go_t = d loss / d out_t and s = sigmoid(g):
    dact_a = w_a (go_t Wd_e)                                  (the unweighted go_t Wd_e is c_a)
    d w_a  = go_t . y_a = act_a . c_a                         (no (T*K, H) y kept: a dot over I)
    dg_a = dact_a * u_a * s (1 + g_a (1 - s)),  du_a = dact_a * silu(g_a)
    dWd_e = sum_{a in e} go_t^T (w_a act_a),   dW_e = sum_{a in e} [dg_a | du_a]^T x_t
    dx_t  = sum_k [dg_a | du_a] W_e
Layout: reasonrl.ops.moe.moe_dispatch(ids, E, block_size=BLOCK_M) sorts the assignments by expert
and pads each expert's segment to a multiple of BLOCK_M with -1, so every BLOCK_M-row block has one
expert (block_expert) and the row loops of the kernels need no segment bounds. Token rows of x and
of go are gathered inside the GEMM loads (row a -> token a // K): no gathered copy of x is made.
Combine: the second GEMM writes each assignment's weighted output to its row a of a (T*K, H)
buffer, then a reduce kernel sums each token's K rows in order k = 0..K-1 in float32. No atomics,
so results are bitwise reproducible run to run. dx is combined the same way.

Kept for backward: the inputs, the dispatch metadata (P int32 rows), and the pre-activation
[g | u] (P, 2I) in x's dtype when 2I <= H (at the goal shape T=16384, H=2048, I=768, E=128, top-8
that is 0.75 of a (T*K, H) buffer, and recomputing it would cost the whole first GEMM again: 4 of
the 18 T*K*H*I FLOP units of fwd+bwd, +22%). When 2I > H (Mixtral: I = 3.5 H) nothing of size
T*K is kept: the backward kernel recomputes g, u from x beside its go Wd GEMM (same reduction over
H, one more pair of tl.dot per step). act is never kept: it is elementwise from g, u.
Transient buffers (P = T*K plus padding): act (P, I) and the weighted per-assignment outputs
(T*K, H) in forward; [dg | du] (P, 2I), w*act (P, I), the per-assignment dx (T*K, H) and
float32 partial dots (T*K, I / BLOCK_N) in backward; each is freed when its pass returns.

Optional, off until timed (WGRAD_GROUPED_MM, DACT_GROUPED_MM, DX_GROUPED_MM): the backward's
weight-gradient GEMMs, its go Wd GEMM and its dx GEMM through torch._grouped_mm on Hopper, with
go[tok] and x[tok] gathered into (P, H) buffers for them (transient, zeros in the padding rows); the
SwiGLU backward is then an elementwise kernel over the given c, and dx's combine reads padded rows.

Verified (tests/test_moe_triton.py): values and all four gradients against a float64 per-expert
loop under TRITON_INTERPRET=1 on CPU (float32, bfloat16 and float16, the latter two multiplied in
float32 inside the interpreter, whose bf16 tl.dot is wrong in Triton 3.9); and, without a GPU, that
the four GEMM kernels compile for sm_90a with Triton 3.9 at the goal shape with the configs below:
wgmma, software-pipelined loads, shared memory and registers as noted at _CONFIGS_GPU.
NOT verified: any run on a GPU, Triton 3.6, speed; the GPU block configs are reasoned, not timed.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from reasonrl.ops._backend import first_order_only  # (ops import kernels lazily: no cycle)


@triton.jit
def _grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
    # GROUP_M row blocks (mostly of one expert) sweep the column blocks together, so each weight
    # tile is read from L2 by GROUP_M programs in a row and the gathered x rows stay hot too.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _rows_of_block(IDX, BLOCK_EXPERT, pid_m, K, BLOCK_M: tl.constexpr):
    e = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # padded rows (BM,)
    a = tl.load(IDX + rows).to(tl.int64)  # assignment ids, -1 in the padding
    valid = a >= 0
    a = tl.where(valid, a, 0)
    return e, rows, a, a // K, valid


@triton.jit
def _moe_gate_up_fwd_kernel(
    X, W1, IDX, BLOCK_EXPERT, ACT, HPRE,
    num_m, H, I, K,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wh,
    STORE_H: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """act[r, n] = silu(x[tok] . Wg[e, n]) * (x[tok] . Wu[e, n]) for padded row r, column n < I."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), num_m, tl.cdiv(I, BLOCK_N), GROUP_M)
    e, rows, _a, tok, valid = _rows_of_block(IDX, BLOCK_EXPERT, pid_m, K, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < I
    kk = tl.arange(0, BLOCK_K)
    x_ptrs = X + tok[:, None] * stride_xt + kk[None, :] * stride_xh  # (BM, BK) gathered token rows
    wg_ptrs = W1 + e * stride_we + n[None, :] * stride_wn + kk[:, None] * stride_wh  # (BK, BN)
    wu_ptrs = wg_ptrs + I * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kmask = (k0 + kk) < H
        xt = tl.load(x_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        wu = tl.load(wu_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:
            xt, wg, wu = xt.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_g = tl.dot(xt, wg, acc_g, input_precision=PREC)
        acc_u = tl.dot(xt, wu, acc_u, input_precision=PREC)
        x_ptrs += BLOCK_K * stride_xh
        wg_ptrs += BLOCK_K * stride_wh
        wu_ptrs += BLOCK_K * stride_wh
    act = acc_g * tl.sigmoid(acc_g) * acc_u  # padding rows: g = u = 0 -> act = 0
    omask = nmask[None, :]
    tl.store(ACT + rows[:, None] * I + n[None, :], act.to(ACT.dtype.element_ty), mask=omask)
    if STORE_H:
        h_ptrs = HPRE + rows[:, None] * (2 * I) + n[None, :]
        tl.store(h_ptrs, acc_g.to(HPRE.dtype.element_ty), mask=omask)
        tl.store(h_ptrs + I, acc_u.to(HPRE.dtype.element_ty), mask=omask)


@triton.jit
def _moe_rows_kernel(
    A, B, IDX, BLOCK_EXPERT, TW, OUT,
    num_m, N, KD, K,
    stride_be, stride_bk, stride_bn,
    HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """OUT[a(r), n] = (w_a) * sum_j A[r, j] B[e, j, n]: A (P, KD) padded rows (contiguous), OUT (T*K, N).

    Forward: A = act, B = w_down viewed (E, I, H), scaled by the routing weight.
    Backward: A = [dg | du], B = w_gate_up (E, 2I, H), unscaled (dx per assignment)."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    e, rows, a, _tok, valid = _rows_of_block(IDX, BLOCK_EXPERT, pid_m, K, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None] * KD + kk[None, :]  # (BM, BK)
    b_ptrs = B + e * stride_be + kk[:, None] * stride_bk + n[None, :] * stride_bn  # (BK, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        kmask = (k0 + kk) < KD
        at = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:
            at, bt = at.to(tl.float32), bt.to(tl.float32)
        acc = tl.dot(at, bt, acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if HAS_SCALE:
        acc = acc * tl.load(TW + a, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(OUT + a[:, None] * N + n[None, :], acc.to(OUT.dtype.element_ty),
             mask=valid[:, None] & nmask[None, :])


@triton.jit
def _moe_combine_kernel(Y, POS, OUT, H, K, stride_ot, HAS_POS: tl.constexpr, BLOCK_H: tl.constexpr):
    """OUT[t] = sum_{k < K} Y[row(t*K + k)] in float32, k in order: deterministic, no atomics.
    row(a) = a, or POS[a] (Y in padded row order) when HAS_POS."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for k in range(K):
        if HAS_POS:
            row = tl.load(POS + t * K + k).to(tl.int64)
        else:
            row = t * K + k
        acc += tl.load(Y + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + t * stride_ot + cols, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _moe_swiglu_bwd_kernel(
    GO, WD, X, W1, HPRE, IDX, BLOCK_EXPERT, TW, DH, ACTW, DWP,
    num_m, H, I, K,
    stride_gt, stride_gh, stride_de, stride_dh, stride_di,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wh,
    RECOMPUTE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c = go[tok] Wd[e] (a GEMM over H), then through SwiGLU: writes [dg | du], w*act, and the
    partial dot act . c of this column block (summed over blocks outside: d topk_weights)."""
    num_n = tl.cdiv(I, BLOCK_N)
    pid_m, pid_n = _grouped_pid(tl.program_id(0), num_m, num_n, GROUP_M)
    e, _rows, a, tok, valid = _rows_of_block(IDX, BLOCK_EXPERT, pid_m, K, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < I
    kk = tl.arange(0, BLOCK_K)
    go_ptrs = GO + tok[:, None] * stride_gt + kk[None, :] * stride_gh  # (BM, BK) gathered
    wd_ptrs = WD + e * stride_de + kk[:, None] * stride_dh + n[None, :] * stride_di  # (BK, BN) = Wd[e][h, n]
    x_ptrs = X + tok[:, None] * stride_xt + kk[None, :] * stride_xh
    wg_ptrs = W1 + e * stride_we + n[None, :] * stride_wn + kk[:, None] * stride_wh
    wu_ptrs = wg_ptrs + I * stride_wn
    acc_c = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kmask = (k0 + kk) < H
        rmask = valid[:, None] & kmask[None, :]
        wmask = kmask[:, None] & nmask[None, :]
        got = tl.load(go_ptrs, mask=rmask, other=0.0)
        wd = tl.load(wd_ptrs, mask=wmask, other=0.0)
        if UPCAST:
            got, wd = got.to(tl.float32), wd.to(tl.float32)
        acc_c = tl.dot(got, wd, acc_c, input_precision=PREC)
        if RECOMPUTE:
            xt = tl.load(x_ptrs, mask=rmask, other=0.0)
            wg = tl.load(wg_ptrs, mask=wmask, other=0.0)
            wu = tl.load(wu_ptrs, mask=wmask, other=0.0)
            if UPCAST:
                xt, wg, wu = xt.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
            acc_g = tl.dot(xt, wg, acc_g, input_precision=PREC)
            acc_u = tl.dot(xt, wu, acc_u, input_precision=PREC)
            x_ptrs += BLOCK_K * stride_xh  # advanced only when used: dead loop-carried pointers cost registers
            wg_ptrs += BLOCK_K * stride_wh
            wu_ptrs += BLOCK_K * stride_wh
        go_ptrs += BLOCK_K * stride_gh
        wd_ptrs += BLOCK_K * stride_dh
    # Epilogue ordered so that few (BM, BN) float32 tiles are live at once (at 128 x 64 and 8 warps
    # each costs 32 registers a thread); offsets inside the block are int32 from an int64 base.
    omask = nmask[None, :]
    r0 = pid_m.to(tl.int64) * BLOCK_M
    loc = tl.arange(0, BLOCK_M)[:, None]
    if RECOMPUTE:
        g, u = acc_g, acc_u
    else:
        h_ptrs = HPRE + r0 * (2 * I) + loc * (2 * I) + n[None, :]
        g = tl.load(h_ptrs, mask=omask, other=0.0).to(tl.float32)
        u = tl.load(h_ptrs + I, mask=omask, other=0.0).to(tl.float32)
    _swiglu_bwd_store(acc_c, g, u, TW, DH, ACTW, DWP, a, valid, r0, loc, n, omask, pid_n, num_n, I)


@triton.jit
def _swiglu_bwd_store(c, g, u, TW, DH, ACTW, DWP, a, valid, r0, loc, n, omask, pid_n, num_n, I):
    """SwiGLU's backward from c (BM, BN) float32 and the pre-activation g, u: writes the partial dot
    act . c of this column block, w*act and [dg | du] of rows r0 + loc (padding rows: zeros)."""
    w = tl.load(TW + a, mask=valid, other=0.0).to(tl.float32)[:, None]  # (BM, 1)
    s = tl.sigmoid(g)
    silu = g * s
    act = silu * u
    part = tl.sum(tl.where(omask, act * c, 0.0), axis=1)  # (BM,) this block's share of act . c
    tl.store(DWP + a * num_n + pid_n, part, mask=valid)
    tl.store(ACTW + r0 * I + loc * I + n[None, :], (act * w).to(ACTW.dtype.element_ty), mask=omask)
    dact = c * w
    dh_ptrs = DH + r0 * (2 * I) + loc * (2 * I) + n[None, :]
    tl.store(dh_ptrs + I, (dact * silu).to(DH.dtype.element_ty), mask=omask)
    tl.store(dh_ptrs, (dact * u * s * (1.0 + g * (1.0 - s))).to(DH.dtype.element_ty), mask=omask)


@triton.jit
def _moe_swiglu_bwd_ew_kernel(C, HPRE, IDX, BLOCK_EXPERT, TW, DH, ACTW, DWP, I, K,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The SwiGLU backward without its GEMM: c = go[tok] Wd[e] given (P, I) in padded row order
    (torch._grouped_mm made it), the pre-activation [g | u] kept from forward. Grid (num_m, num_n)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    num_n = tl.cdiv(I, BLOCK_N)
    _e, _rows, a, _tok, valid = _rows_of_block(IDX, BLOCK_EXPERT, pid_m, K, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    omask = (n < I)[None, :]
    r0 = pid_m.to(tl.int64) * BLOCK_M
    loc = tl.arange(0, BLOCK_M)[:, None]
    c = tl.load(C + r0 * I + loc * I + n[None, :], mask=omask, other=0.0).to(tl.float32)
    h_ptrs = HPRE + r0 * (2 * I) + loc * (2 * I) + n[None, :]
    g = tl.load(h_ptrs, mask=omask, other=0.0).to(tl.float32)
    u = tl.load(h_ptrs + I, mask=omask, other=0.0).to(tl.float32)
    _swiglu_bwd_store(c, g, u, TW, DH, ACTW, DWP, a, valid, r0, loc, n, omask, pid_n, num_n, I)


@triton.jit
def _moe_wgrad_kernel(
    A, B, IDX, POFF, OUT,
    N1, N2, K,
    stride_ar, stride_ac, stride_br, stride_bc, stride_oe, stride_o1, stride_o2,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_1: tl.constexpr, BLOCK_2: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """OUT[e] (N1, N2) = sum over expert e's rows r of A[row_A(r)]^T B[row_B(r)]: a GEMM whose
    reduction runs over the expert's padded segment; row_X(r) = token of r when X_GATHER else r.
    dWd: A = go (gathered), B = w*act.  dW_gate_up: A = [dg | du], B = x (gathered).
    An empty expert runs no step and writes zeros."""
    nb1 = tl.cdiv(N1, BLOCK_1)
    nb2 = tl.cdiv(N2, BLOCK_2)
    pid = tl.program_id(0)
    e = pid // (nb1 * nb2)  # expert outermost: its rows are re-read by neighbouring programs
    p1 = (pid % (nb1 * nb2)) // nb2
    p2 = pid % nb2
    start = tl.load(POFF + e)
    end = tl.load(POFF + e + 1)
    c1 = p1 * BLOCK_1 + tl.arange(0, BLOCK_1)
    c2 = p2 * BLOCK_2 + tl.arange(0, BLOCK_2)
    m1 = c1 < N1
    m2 = c2 < N2
    acc = tl.zeros((BLOCK_1, BLOCK_2), tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)  # P < 2^31: int32 is exact here
        # BLOCK_R need not divide BLOCK_M (the segment's padding): rows past the segment are masked
        a = tl.load(IDX + rows, mask=rows < end, other=-1).to(tl.int64)
        valid = a >= 0
        tok = tl.where(valid, a, 0) // K
        if A_GATHER:
            ra = tok
        else:
            ra = rows
        if B_GATHER:
            rb = tok
        else:
            rb = rows
        at = tl.load(A + c1[:, None] * stride_ac + ra[None, :] * stride_ar,
                     mask=m1[:, None] & valid[None, :], other=0.0)  # (B1, BR)
        bt = tl.load(B + rb[:, None] * stride_br + c2[None, :] * stride_bc,
                     mask=valid[:, None] & m2[None, :], other=0.0)  # (BR, B2)
        if UPCAST:
            at, bt = at.to(tl.float32), bt.to(tl.float32)
        acc = tl.dot(at, bt, acc, input_precision=PREC)
    tl.store(OUT + e.to(tl.int64) * stride_oe + c1[:, None] * stride_o1 + c2[None, :] * stride_o2,
             acc.to(OUT.dtype.element_ty), mask=m1[:, None] & m2[None, :])


# Block sizes. BLOCK_M is also the dispatch padding, so it is fixed before any launch (no autotune
# over it); the rest are fixed too, so a first call compiles once per dtype and nothing is timed
# at run time. The GPU values start from the usual Hopper tl.dot configs (128-row tiles, BK 64,
# 8 warps, 3 stages) and were then swept one kernel at a time on an H200 (2026-11-27, bench_moe.py
# --tune at T=16384 H=2048 I=768 E=128 top-8, bf16 fwd+bwd, benchmarks/RESULTS.md): the weight
# gradient's 128 x 128 output tile (11.5 ms against 12.4 for 128 x 256; 256 x 128: 12.2; 64 x 256:
# 14.1) is the one change that paid; no gate_up, rows or SwiGLU-backward candidate beat these by more
# than the run-to-run spread (12.3-12.8 ms), and a 64-row BLOCK_M cost 14.3 ms. Compiled for sm_90a
# at the goal shape (test_kernels_compile_for_hopper) they take 175-242 registers a thread without
# spills and 96-168 KiB of shared memory; the SwiGLU backward keeps 128 x 64 (three accumulators when it
# recomputes [g | u]; 255 registers and 56 bytes of spill in its epilogue when it loads them, 228
# and none when it recomputes), since at 128 x 32 every go tile would be gathered 24 times.
_CONFIGS_GPU = dict(gate_up=dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),  # g and u: 128 x 256
                    rows=dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
                    swiglu_bwd=dict(BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
                    wgrad=dict(BLOCK_1=128, BLOCK_2=128, BLOCK_R=64, num_warps=8, num_stages=3),
                    GROUP_M=8)
# float32 on GPU: exact float32 products (PyTorch's default, not TF32) run as FMA, not wgmma, and
# hold their operand tiles in registers: the tiles above need 10-18 KiB of stack a thread there.
# These (BLOCK_M <= 64) compile for sm_90a without spills.
_CONFIGS_GPU_FP32 = dict(gate_up=dict(BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2),
                         rows=dict(BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
                         swiglu_bwd=dict(BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2),
                         wgrad=dict(BLOCK_1=64, BLOCK_2=64, BLOCK_R=32, num_warps=8, num_stages=2),
                         GROUP_M=8)
# The interpreter runs each program in numpy: few, small programs; tl.dot needs dims >= 16.
_CONFIGS_CPU = dict(gate_up=dict(BLOCK_N=32, BLOCK_K=32), rows=dict(BLOCK_N=32, BLOCK_K=32),
                    swiglu_bwd=dict(BLOCK_N=32, BLOCK_K=32), wgrad=dict(BLOCK_1=32, BLOCK_2=32, BLOCK_R=16),
                    GROUP_M=4)


def _block_m(device, rows_per_expert: float, dtype) -> int:
    """Row tile = dispatch padding: small for decode (few tokens per expert wastes less padding),
    128 when experts are full (fewer re-reads of each weight tile)."""
    if device.type == "cpu":
        return 16
    if rows_per_expert <= 16:
        return 16
    if rows_per_expert <= 32:
        return 32
    return 64 if rows_per_expert < 256 or dtype == torch.float32 else 128


# Device types whose backward GEMMs go through torch._grouped_mm (CUTLASS's grouped GEMM on Hopper)
# instead of this file's kernels, where _grouped_mm_ok allows. Empty until timed on a GPU. On an H200
# (2026-11-28, one fwd+bwd at T=16384 H=2048 I=768 E=128 top-8, 11.7 ms) the two weight gradients took
# 5.7 ms (about 216 TFLOP/s, against 798 measured for a dense bf16 GEMM) and the SwiGLU backward's
# go Wd GEMM 1.9 ms (about 210); whether CUTLASS's persistent grouped GEMM does better on segments of
# ~1024 rows, after a (P, H) gather of go and of x, is what bench_moe.py's rows "reasonrl triton,
# ... by torch._grouped_mm" measure. Tests add "cpu".
#   WGRAD_GROUPED_MM: dW_gate_up = [dg | du]^T x[tok] and dWd = go[tok]^T (w act), per expert
#   DACT_GROUPED_MM: c = go[tok] Wd[e] (then _moe_swiglu_bwd_ew_kernel), when [g | u] was kept
#   DX_GROUPED_MM: dx rows = [dg | du] W[e] in padded row order (the rows GEMM: 2.1 ms there), then
#     the combine reads each assignment's row through its padded position
WGRAD_GROUPED_MM: set[str] = set()
DACT_GROUPED_MM: set[str] = set()
DX_GROUPED_MM: set[str] = set()

# Tests set this: every buffer a kernel should fill starts as NaN, so an element left unwritten (or
# read before it is written) shows up in the outputs instead of passing as stale memory.
POISON = False


def _empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device) if POISON else \
        torch.empty(shape, dtype=dtype, device=device)


def _cfg(device, dtype):
    if device.type == "cpu":
        return _CONFIGS_CPU
    return _CONFIGS_GPU_FP32 if dtype == torch.float32 else _CONFIGS_GPU


def _row_cfg(c, BM):
    """A kernel's config at row tile BM: 16/32-row tiles run plain mma, where 4 warps cover the tile."""
    return dict(c, num_warps=4) if BM <= 32 and "num_warps" in c else c


def _precision(dtype, upcast):
    # float32 in -> float32 products (PyTorch's default), not TF32; bf16/fp16 ignore this.
    return "ieee" if dtype == torch.float32 or upcast else "tf32"


def _upcast(x) -> bool:
    """Triton 3.9's interpreter gets bf16/fp16 tl.dot wrong: run the products in float32 there."""
    return x.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _combine(y, T, K, out, pos=None):
    """y (T*K, H) -> out (T, H): each token's K rows summed in order, float32. pos (T*K,): assignment
    a's row of y where y is in padded row order (P, H)."""
    H = y.shape[1]
    BLOCK_H = min(triton.next_power_of_2(H), 1024)
    _moe_combine_kernel[(T, triton.cdiv(H, BLOCK_H))](y, y if pos is None else pos, out, H, K, out.stride(0),
                                                      HAS_POS=pos is not None, BLOCK_H=BLOCK_H,
                                                      num_warps=1 if y.device.type == "cpu" else 4)
    return out


def _rows_gemm(a, b, strides_b, d, tw, n_out, T, K, out_dtype):
    """Per-assignment rows (T*K, n_out) = [w *] a (P, KD) @ B[e] (KD, n_out)."""
    P, KD = a.shape
    cfg = _cfg(a.device, a.dtype)
    c = cfg["rows"]
    BM = P // d.block_expert.numel()
    y = _empty((T * K, n_out), out_dtype, a.device)  # (T*K, N)
    num_m = P // BM
    grid = (num_m * triton.cdiv(n_out, c["BLOCK_N"]),)
    upcast = _upcast(a)
    _moe_rows_kernel[grid](a, b, d.padded_idx, d.block_expert, tw if tw is not None else a, y,
                           num_m, n_out, KD, K, *strides_b,
                           HAS_SCALE=tw is not None, UPCAST=upcast, PREC=_precision(a.dtype, upcast),
                           BLOCK_M=BM, GROUP_M=cfg["GROUP_M"], **_row_cfg(c, BM))
    return y


def _grouped_mm_ok(devices, dtype, device, *widths) -> bool:
    """Whether a GEMM goes through torch._grouped_mm (devices: one of the *_GROUPED_MM sets):
    the set names the device type, the torch has it, rows are 16-byte multiples (its stride check), and
    on CUDA bf16 (the only dtype its CUDA kernel takes) on a Hopper (sm_90). Why Hopper only: there an
    expert with no rows gets a zero weight gradient, while on Blackwell (sm_100) torch._grouped_mm left
    such groups nonzero (pytorch/pytorch#172439)."""
    if device.type not in devices or not hasattr(torch, "_grouped_mm"):
        return False
    if any(w * dtype.itemsize % 16 for w in widths):  # its stride check, on CPU too
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] == 9
    return True


def _gather_padded(src, d, K):
    """(P, N): src's row of each padded row's token (row a -> token a // K), zeros in the padding."""
    T, N = src.shape
    idx = d.padded_idx.long()
    tok = torch.where(idx >= 0, idx // K, T)  # T: the zero row appended below
    return torch.cat([src, src.new_zeros(1, N)]).index_select(0, tok)


def _wgrad_grouped(a, a_gather, b, b_gather, d, K):
    """_wgrad through torch._grouped_mm's varying-K form: (N1, P) x (P, N2) -> (E, N1, N2), groups at
    the padded offsets. The gathered operand is made in memory, (P, width): transient, one at a time.
    The padding rows are zero on both sides (the SwiGLU backward writes zeros there; _gather_padded
    too), so they add nothing to their expert's sum."""
    A = _gather_padded(a, d, K) if a_gather else a
    B = _gather_padded(b, d, K) if b_gather else b
    return torch._grouped_mm(A.t(), B, offs=_group_ends(d))


def _padded_rows_of(d, n):
    """(n,) int32: the padded row of each assignment a < n (every one has exactly one). The padding
    rows' -1 are sent to a spare slot past n, so no host sync is needed to drop them."""
    idx = d.padded_idx.long()
    pos = torch.empty(n + 1, dtype=torch.int32, device=idx.device)
    rows = torch.arange(idx.numel(), dtype=torch.int32, device=idx.device)
    return pos.scatter_(0, torch.where(idx >= 0, idx, n), rows)[:n]


def _group_ends(d):
    """torch._grouped_mm's offs: each expert's end in the padded rows, a view (int32). The last is P:
    moe_dispatch sizes padded_idx to padded_offsets[-1] exactly, so every padded row is in a group."""
    return d.padded_offsets[1:]


def _wgrad(a, a_gather, b, b_gather, d, K, weight):
    """-> (E, N1, N2) of weight's shape and dtype: [e] = sum over expert e's rows of a[row]^T b[row]
    (rows gathered by token where asked)."""
    E, N1, N2 = weight.shape
    if _grouped_mm_ok(WGRAD_GROUPED_MM, weight.dtype, a.device, N1, N2):
        return _wgrad_grouped(a, a_gather, b, b_gather, d, K)
    out = _empty(weight.shape, weight.dtype, a.device)
    c = _cfg(out.device, out.dtype)["wgrad"]
    upcast = _upcast(a)
    grid = (E * triton.cdiv(N1, c["BLOCK_1"]) * triton.cdiv(N2, c["BLOCK_2"]),)
    _moe_wgrad_kernel[grid](a, b, d.padded_idx, d.padded_offsets, out, N1, N2, K,
                            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                            out.stride(0), out.stride(1), out.stride(2),
                            A_GATHER=a_gather, B_GATHER=b_gather, UPCAST=upcast,
                            PREC=_precision(a.dtype, upcast), **c)
    return out


def moe_experts_fwd(x, topk_ids, topk_weights, w_gate_up, w_down, keep_h: bool):
    """-> (out (T, H) in x's dtype, dispatch, h (P, 2I) or None)."""
    from reasonrl.ops.moe import moe_dispatch

    T, H = x.shape
    K = topk_ids.shape[1]
    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    BM = _block_m(x.device, T * K / E, x.dtype)
    d = moe_dispatch(topk_ids, E, block_size=BM)
    P = d.padded_idx.numel()
    num_m = P // BM
    cfg = _cfg(x.device, x.dtype)
    c = cfg["gate_up"]
    act = _empty((P, I), x.dtype, x.device)  # (P, I), expert-sorted rows
    h = _empty((P, 2 * I), x.dtype, x.device) if keep_h else None  # (P, 2I)
    upcast = _upcast(x)
    grid = (num_m * triton.cdiv(I, c["BLOCK_N"]),)
    _moe_gate_up_fwd_kernel[grid](
        x, w_gate_up, d.padded_idx, d.block_expert, act, h if keep_h else act,
        num_m, H, I, K, x.stride(0), x.stride(1), *w_gate_up.stride(),
        STORE_H=keep_h, UPCAST=upcast, PREC=_precision(x.dtype, upcast),
        BLOCK_M=BM, GROUP_M=cfg["GROUP_M"], **_row_cfg(c, BM))
    tw = topk_weights.reshape(-1).contiguous()  # (T*K,)
    # w_down[e] (H, I) read as (I, H): element (i, h) at i * stride(2) + h * stride(1)
    y = _rows_gemm(act, w_down, (w_down.stride(0), w_down.stride(2), w_down.stride(1)), d, tw, H, T, K,
                   x.dtype)  # (T*K, H) weighted per-assignment outputs
    del act
    out = _combine(y, T, K, _empty((T, H), x.dtype, x.device))
    return out, d, h


def moe_experts_bwd(go, x, topk_weights, w_gate_up, w_down, d, h, need):
    """-> (dx, d topk_weights (T, K) float32, d w_gate_up, d w_down); None where need[i] is False.
    need = (x, topk_weights, w_gate_up, w_down)."""
    T, H = x.shape
    K = topk_weights.shape[1]
    I = w_gate_up.shape[1] // 2
    P = d.padded_idx.numel()
    BM = P // d.block_expert.numel()
    num_m = P // BM
    cfg = _cfg(x.device, x.dtype)
    c = cfg["swiglu_bwd"]
    num_n = triton.cdiv(I, c["BLOCK_N"])
    dh = _empty((P, 2 * I), x.dtype, x.device)  # (P, 2I) [dg | du]
    actw = _empty((P, I), x.dtype, x.device)  # (P, I) w * act
    dwp = _empty((T * K, num_n), torch.float32, x.device)  # partial act . c
    tw = topk_weights.reshape(-1).contiguous()
    upcast = _upcast(x)
    dact_mm = h is not None and _grouped_mm_ok(DACT_GROUPED_MM, x.dtype, x.device, H, I)
    # go[tok] in padded row order, made once where a torch._grouped_mm wants it (c here, dWd below)
    go_rows = _gather_padded(go, d, K) if dact_mm or (
        need[3] and _grouped_mm_ok(WGRAD_GROUPED_MM, w_down.dtype, x.device, H, I)) else None
    if dact_mm:
        cmat = torch._grouped_mm(go_rows, w_down, offs=_group_ends(d))  # (P, I): go[tok] Wd[e]
        _moe_swiglu_bwd_ew_kernel[(num_m, num_n)](
            cmat, h, d.padded_idx, d.block_expert, tw, dh, actw, dwp, I, K, BLOCK_M=BM, BLOCK_N=c["BLOCK_N"],
            num_warps=1 if x.device.type == "cpu" else 8)  # 128 x 64: 118 registers (4 warps spill 1.2 KB)
        del cmat
    else:
        _moe_swiglu_bwd_kernel[(num_m * num_n,)](
            go, w_down, x, w_gate_up, h if h is not None else dh, d.padded_idx, d.block_expert, tw, dh, actw, dwp,
            num_m, H, I, K, go.stride(0), go.stride(1), *w_down.stride(), x.stride(0), x.stride(1),
            *w_gate_up.stride(), RECOMPUTE=h is None, UPCAST=upcast, PREC=_precision(x.dtype, upcast),
            BLOCK_M=BM, GROUP_M=cfg["GROUP_M"], **_row_cfg(c, BM))
    gx = gw = g1 = gd = None
    if need[3]:  # first: the gathered go rows and w*act go before the next transients come
        gd = _wgrad(go, True, actw, False, d, K, w_down) if go_rows is None else \
            _wgrad(go_rows, False, actw, False, d, K, w_down)
    del go_rows, actw
    if need[0] and _grouped_mm_ok(DX_GROUPED_MM, x.dtype, x.device, 2 * I, H):
        yx = torch._grouped_mm(dh, w_gate_up, offs=_group_ends(d))  # (P, H): [dg | du] W[e], padded rows
        gx = _combine(yx, T, K, _empty((T, H), x.dtype, x.device), _padded_rows_of(d, T * K))
        del yx
    elif need[0]:
        yx = _rows_gemm(dh, w_gate_up, w_gate_up.stride(), d, None, H, T, K, x.dtype)  # (T*K, H)
        gx = _combine(yx, T, K, _empty((T, H), x.dtype, x.device))
        del yx
    if need[1]:
        gw = dwp.sum(dim=1).view(T, K)  # fixed-order reduction: deterministic
    if need[2]:
        g1 = _wgrad(dh, False, x, True, d, K, w_gate_up)
    return gx, gw, g1, gd


class MoEExpertsTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w_gate_up, w_down, keep_h):
        out, d, h = moe_experts_fwd(x, topk_ids, topk_weights, w_gate_up, w_down, keep_h)
        ctx.save_for_backward(x, topk_weights, w_gate_up, w_down, d.padded_idx, d.block_expert,
                              d.padded_offsets, h)
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        x, tw, w_gate_up, w_down, padded_idx, block_expert, padded_offsets, h = ctx.saved_tensors
        from reasonrl.ops.moe import MoEDispatch

        d = MoEDispatch(None, None, None, padded_offsets, padded_idx, block_expert)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        gx, gw, g1, gd = moe_experts_bwd(grad_out.to(x.dtype), x, tw, w_gate_up, w_down, d, h, need)
        return gx, None, None if gw is None else gw.to(tw.dtype), g1, gd, None


def triton_moe_experts(x, topk_ids, topk_weights, w_gate_up, w_down, *, keep_h: bool | None = None):
    """x (T, H) -> (T, H) in x's dtype: out[t] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]).

    Differentiable w.r.t. x, topk_weights, w_gate_up and w_down. keep_h: keep the (T*K, 2I)
    pre-activation for backward (default: when 2I <= H) instead of recomputing it there."""
    _check(x, topk_ids, topk_weights, w_gate_up, w_down)
    T, H = x.shape
    if T == 0:
        # keeps the graph so backward gives zero gradients
        return x.new_zeros(0, H) + 0 * (x.sum() + w_gate_up.sum() + w_down.sum() + topk_weights.sum())
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, topk_weights, w_gate_up, w_down))):
        return moe_experts_fwd(x, topk_ids, topk_weights, w_gate_up, w_down, keep_h=False)[0]  # rollouts: keep nothing
    if keep_h is None:
        keep_h = w_gate_up.shape[1] <= H
    return MoEExpertsTritonFunction.apply(x, topk_ids, topk_weights, w_gate_up, w_down, bool(keep_h))


def _check(x, topk_ids, topk_weights, w_gate_up, w_down):
    op = "triton_moe_experts"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be (T, H), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    T, H = x.shape
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != H or w_gate_up.shape[1] % 2:
        raise ValueError(f"{op}: w_gate_up must be (E, 2I, H={H}), got shape {tuple(w_gate_up.shape)}")
    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if tuple(w_down.shape) != (E, H, I):
        raise ValueError(f"{op}: w_down must be (E, H, I) = ({E}, {H}, {I}), got shape {tuple(w_down.shape)}")
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dtype != x.dtype:
            raise ValueError(f"{op}: {name} must have x's dtype {x.dtype}, got {w.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: topk_ids must be an int64/int32 (T={T}, K) tensor, got {topk_ids.dtype} "
                         f"of shape {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape or not topk_weights.is_floating_point():
        raise ValueError(f"{op}: topk_weights must be a float tensor of topk_ids' shape {tuple(topk_ids.shape)}, "
                         f"got {topk_weights.dtype} of shape {tuple(topk_weights.shape)}")
    devs = {t.device for t in (x, topk_ids, topk_weights, w_gate_up, w_down)}
    if len(devs) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devs))}")
