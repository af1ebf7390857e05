"""Triton kernels of the GRPO loss: one program per completion row.

Inputs are float32 (B, T): logp (from reasonrl.ops.logprobs), old / ref log-probs, entropy, mask;
rewards (B,). With A the group advantage of the row (computed here from the G rewards of its group),
lr = clamp(logp - old, -C, C), rho = exp(lr) (token) or exp(sum_t m lr / max(sum_t m, 1)) (GSPO):
    pg = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high));  dual clip: A < 0 -> min(pg, -c A)
    kl = exp(d) - d - 1,  d = clamp(ref - logp, -C, C)
    l  = pg + beta kl - entropy_coef H
Forward writes 8 per-row sums (loss, mask, kl, clip low / high counts, entropy, A, zero-std flag);
the caller turns them into the aggregated loss and the metrics. Backward, given the row weight
`scale` (upstream grad / the aggregation's normalizer), writes
    d/d logp_t = scale m_t [dpg/drho rho 1_in(lr_t) + beta 1_in(d_t) (1 - e^d_t)]           (token)
    d/d logp_t = scale m_t [dpg/drho rho (sum m / max(sum m, 1)) 1_in(lr_t) + beta ...]      (GSPO)
    d/d H_t    = -entropy_coef scale m_t
A row is whole inside one program, so GSPO's ratio (a mean over the row) and the per-sequence
aggregation take no second launch. The bytes are B*T floats: noise beside the B*T*V logits pass of
the log-prob kernels that produce logp, so these kernels aim at clarity, not bandwidth.
The full formulas: reasonrl/ops/grpo.py.

Names: no `_` for unused results inside the kernels: compiled Triton treats a name assigned before
and inside a loop as loop-carried, and `_` would change type (the interpreter does not mind).
"""
import triton
import triton.language as tl

ADV_CODES = {"grpo": 0, "dr_grpo": 1, "rloo": 2}
NSTATS = 8


@triton.jit
def _advantage(R, row, G, std_eps, ADV: tl.constexpr, BLOCK_G: tl.constexpr):
    """A of the row in float64, as csrc/grpo.h does: compiled float32 `/` is an approximate division
    on the GPU (a few ulp), which turned RLOO's exact 0 for a reward equal to its group's other mean
    ((2 - 0.5) / 3 == 0.5) into -6e-8, flipping that row's clip counts against PyTorch's."""
    g0 = (row // G) * G
    offs = tl.arange(0, BLOCK_G)
    ok = offs < G
    r = tl.load(R + g0 + offs, mask=ok, other=0.0).to(tl.float64)
    rb = tl.load(R + row).to(tl.float64)
    s = tl.sum(r, 0)
    mean = s / G
    zero = tl.min(tl.where(ok, r, float("inf")), 0) == tl.max(tl.where(ok, r, float("-inf")), 0)
    if ADV == 0:
        d = tl.where(ok, r - mean, 0.0)
        std = tl.sqrt(tl.sum(d * d, 0) / (G - 1))
        A = (rb - mean) / (std + std_eps)
    elif ADV == 1:
        A = rb - mean
    else:
        A = rb - (s - rb) / (G - 1)
    return tl.where(zero, 0.0, A).to(tl.float32), zero


@triton.jit
def _k3(d):
    """exp(d) - d - 1 without the cancellation near d = 0 (the series through d^7 for |d| < 0.1)."""
    series = d * d * (0.5 + d * (1.0 / 6 + d * (1.0 / 24 + d * (1.0 / 120 + d * (1.0 / 720 + d / 5040)))))
    return tl.where(tl.abs(d) < 0.1, series, tl.exp(d) - d - 1.0)


@triton.jit
def _clamp(x, C):
    return tl.minimum(tl.maximum(x, -C), C), ((x >= -C) & (x <= C)).to(tl.float32)


@triton.jit
def _surrogate(rho, A, lo, hi, dual, DUAL: tl.constexpr):
    """pg and d pg / d rho; the unclipped branch wins ties (same gradient there)."""
    clipped = tl.minimum(tl.maximum(rho, lo), hi)
    u = -A * rho
    c = -A * clipped
    take_c = c > u
    pg = tl.where(take_c, c, u)
    dpg = tl.where(take_c, 0.0, -A)
    if DUAL:
        cap = -dual * A
        if A < 0:  # a per-row scalar (a bool scalar & a bool vector trips the interpreter)
            capped = cap < pg
            pg = tl.where(capped, cap, pg)
            dpg = tl.where(capped, 0.0, dpg)
    return pg, dpg


@triton.jit
def _sequence_ratio(LOGP, OLD, MASK, base, T, C, HAS_OLD: tl.constexpr, BLOCK_T: tl.constexpr):
    """GSPO: exp(sum_t m lr / max(sum_t m, 1)) of one row, and sum_t m."""
    offs = tl.arange(0, BLOCK_T)
    acc_s = tl.zeros([BLOCK_T], tl.float32)
    acc_m = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs
        ok = t < T
        m = tl.load(MASK + base + t, mask=ok, other=0.0)
        if HAS_OLD:
            lr, in_lr = _clamp(tl.load(LOGP + base + t, mask=ok, other=0.0)
                           - tl.load(OLD + base + t, mask=ok, other=0.0), C)
            acc_s += tl.where(m != 0, m * lr, 0.0)
        acc_m += m
    msum = tl.sum(acc_m, 0)
    return tl.exp(tl.sum(acc_s, 0) / tl.maximum(msum, 1.0)), msum


@triton.jit
def _grpo_fwd_kernel(
    STATS, LOGP, OLD, REF, ENT, MASK, R, row0,
    T, G, std_eps, lo, hi, dual, beta, ent_coef, C,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, SEQ: tl.constexpr,
    DUAL: tl.constexpr, ADV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    A, zero = _advantage(R, row0 + row, G, std_eps, ADV, BLOCK_G)
    rho_seq = 1.0
    if SEQ:
        rho_seq, msum_seq = _sequence_ratio(LOGP, OLD, MASK, base, T, C, HAS_OLD, BLOCK_T)
    offs = tl.arange(0, BLOCK_T)
    acc_loss = tl.zeros([BLOCK_T], tl.float32)
    acc_m = tl.zeros([BLOCK_T], tl.float32)
    acc_kl = tl.zeros([BLOCK_T], tl.float32)
    acc_low = tl.zeros([BLOCK_T], tl.float32)
    acc_high = tl.zeros([BLOCK_T], tl.float32)
    acc_ent = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs
        ok = t < T
        m = tl.load(MASK + base + t, mask=ok, other=0.0)
        live = m != 0
        lp = tl.load(LOGP + base + t, mask=ok, other=0.0)
        if SEQ:
            rho = rho_seq + tl.zeros([BLOCK_T], tl.float32)
        elif HAS_OLD:
            lr, in_lr = _clamp(lp - tl.load(OLD + base + t, mask=ok, other=0.0), C)
            rho = tl.exp(lr)
        else:
            rho = tl.full([BLOCK_T], 1.0, tl.float32)
        l, dpg = _surrogate(rho, A, lo, hi, dual, DUAL)
        if HAS_REF:
            d, in_d = _clamp(tl.load(REF + base + t, mask=ok, other=0.0) - lp, C)
            kl = _k3(d)
            l += beta * kl
            acc_kl += tl.where(live, m * kl, 0.0)
        if HAS_ENT:
            h = tl.load(ENT + base + t, mask=ok, other=0.0)
            l -= tl.where(ent_coef != 0.0, ent_coef * h, 0.0)  # the bonus only where asked, as the reference
            acc_ent += tl.where(live, m * h, 0.0)
        acc_loss += tl.where(live, m * l, 0.0)
        acc_m += m
        acc_low += tl.where(rho < lo, m, 0.0) * (A < 0).to(tl.float32)
        acc_high += tl.where(rho > hi, m, 0.0) * (A > 0).to(tl.float32)
    out = STATS + row * 8
    tl.store(out + 0, tl.sum(acc_loss, 0))
    tl.store(out + 1, tl.sum(acc_m, 0))
    tl.store(out + 2, tl.sum(acc_kl, 0))
    tl.store(out + 3, tl.sum(acc_low, 0))
    tl.store(out + 4, tl.sum(acc_high, 0))
    tl.store(out + 5, tl.sum(acc_ent, 0))
    tl.store(out + 6, A)
    tl.store(out + 7, zero.to(tl.float32))


@triton.jit
def _grpo_bwd_kernel(
    GRAD_LOGP, GRAD_ENT, SCALE, LOGP, OLD, REF, MASK, R, row0,
    T, G, std_eps, lo, hi, dual, beta, ent_coef, C,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, WITH_ENT: tl.constexpr, SEQ: tl.constexpr,
    DUAL: tl.constexpr, ADV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    A, zero = _advantage(R, row0 + row, G, std_eps, ADV, BLOCK_G)
    scale = tl.load(SCALE + row)
    seq_coef = 0.0
    if SEQ:
        rho_seq, msum = _sequence_ratio(LOGP, OLD, MASK, base, T, C, HAS_OLD, BLOCK_T)
        pg_seq, dpg_seq = _surrogate(rho_seq, A, lo, hi, dual, DUAL)
        seq_coef = dpg_seq * rho_seq * msum / tl.maximum(msum, 1.0)
    offs = tl.arange(0, BLOCK_T)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs
        ok = t < T
        m = tl.load(MASK + base + t, mask=ok, other=0.0)
        lp = tl.load(LOGP + base + t, mask=ok, other=0.0)
        if HAS_OLD:
            lr, inside = _clamp(lp - tl.load(OLD + base + t, mask=ok, other=0.0), C)
        else:
            lr = tl.zeros([BLOCK_T], tl.float32)
            inside = tl.full([BLOCK_T], 1.0, tl.float32)
        if SEQ:
            g = seq_coef * inside
        else:
            rho = tl.exp(lr)
            pg, dpg = _surrogate(rho, A, lo, hi, dual, DUAL)
            g = dpg * rho * inside
        if HAS_REF:
            d, in_d = _clamp(tl.load(REF + base + t, mask=ok, other=0.0) - lp, C)
            g += beta * in_d * -(_k3(d) + d)  # 1 - exp(d) = -(kl + d): exact near d = 0 too
        g = tl.where(m != 0, scale * m * g, 0.0)
        tl.store(GRAD_LOGP + base + t, g, mask=ok)
        if WITH_ENT:
            tl.store(GRAD_ENT + base + t, -ent_coef * scale * m, mask=ok)


def _meta(B, T, G, p):
    block_t = min(triton.next_power_of_2(max(T, 1)), 1024)
    return dict(HAS_OLD=p["old"] is not None, SEQ=p["sequence"], DUAL=p["dual_clip"] > 0,
                ADV=ADV_CODES[p["advantage"]], BLOCK_T=block_t, BLOCK_G=triton.next_power_of_2(G))


def _scalars(p):
    return (p["std_eps"], 1.0 - p["eps_low"], 1.0 + p["eps_high"], p["dual_clip"], p["beta"],
            p["entropy_coef"], p["clamp"])


def grpo_fwd(logp, entropy, mask, rewards, G, p, row0=0):
    """logp, mask, entropy (or None) (B, T) float32 contiguous, rows [row0, row0 + B) of the batch
    whose rewards (B_total,) are given; p: the options dict (with old / ref tensors (B, T) or None).
    Returns stats (B, 8) float32."""
    B, T = logp.shape
    stats = logp.new_empty(B, NSTATS)
    if B == 0:
        return stats
    old, ref = p["old"], p["ref"]
    _grpo_fwd_kernel[(B,)](
        stats, logp, old if old is not None else logp, ref if ref is not None else logp,
        entropy if entropy is not None else logp, mask, rewards, row0,
        T, G, *_scalars(p),
        HAS_REF=p["beta"] != 0, HAS_ENT=entropy is not None, **_meta(B, T, G, p),
    )
    return stats


def grpo_bwd(scale, logp, mask, rewards, G, p, with_entropy, row0=0):
    """Returns grad_logp (B, T) and grad_entropy (B, T) (None unless with_entropy)."""
    B, T = logp.shape
    grad_logp = logp.new_empty(B, T)
    grad_ent = logp.new_empty(B, T) if with_entropy else None
    if B == 0 or T == 0:
        return grad_logp, grad_ent
    old, ref = p["old"], p["ref"]
    _grpo_bwd_kernel[(B,)](
        grad_logp, grad_ent if with_entropy else grad_logp, scale, logp,
        old if old is not None else logp, ref if ref is not None else logp, mask, rewards, row0,
        T, G, *_scalars(p),
        HAS_REF=p["beta"] != 0, WITH_ENT=with_entropy, **_meta(B, T, G, p),
    )
    return grad_logp, grad_ent
