"""Triton kernels for the log-prob family: log p(id | logits / T), entropy, and their gradient.

Math (per row, z = x / T over the vocabulary V):
    lse     = log sum_j exp(z_j)                      (online: running max m, sum s = sum exp(z - m))
    logp    = z[id] - lse
    entropy = lse - S,  S = sum_j p_j z_j,  p = softmax(z)   (running t = sum exp(z - m) z)
    d logp    / d z_j = 1[j == id] - p_j
    d entropy / d z_j = p_j (S - z_j)
    d / d x = (d / d z) / T
Forward reads the logits once and writes three floats per row; nothing of size V is materialized.
Backward reads the logits once and writes the gradient once, optionally over the logits buffer
itself (in place: each element is read before the same program writes it). So fwd+bwd is three
passes over the logits: the byte floor.

Backward takes `vocab_start`: its columns are vocab ids [vocab_start, vocab_start + Vc), which
lets the fused LM-head op run it on vocab chunks of recomputed logits.
"""
import triton
import triton.language as tl


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
    m = float("-inf")  # running max (scalar: one exp per element, one rescale per tile)
    s = tl.zeros([BLOCK], tl.float32)  # per-lane sum of exp(z - m)
    t = tl.zeros([BLOCK], tl.float32)  # per-lane sum of exp(z - m) * (z - m)
    for start in range(0, V, BLOCK):
        c = start + cols
        z = tl.load(x_row + c, mask=c < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, 0))
        # While every logit so far is -inf (a masked vocabulary's first tiles), m_new is -inf and
        # exp(-inf - -inf) would be NaN for good: the exps subtract 0 instead (s stays 0 there).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)  # exp(-inf) = 0 on the first tile
        e = tl.exp(z - m_safe)  # masked lanes: exp(-inf) = 0
        if WITH_ENT:
            # t is kept relative to the running max so that no terms of size |z| cancel later
            # (at logits near 1e4 a plain sum of e * z loses three digits of the entropy).
            d = tl.maximum(m - m_safe, -3.0e38)  # first tile: s = 0, keep 0 * d finite
            # -inf logits (a masked vocabulary, and the lanes past V) have e = 0: add 0, not 0 * -inf
            t = alpha * (t + d * s) + e * tl.where(z > float("-inf"), z - m_safe, 0.0)
        s = s * alpha + e
        m = m_new
    s_tot = tl.sum(s, 0)
    log_s = tl.log(s_tot)
    lse = m + log_s
    keep = tid != ignore_index
    in_range = (tid >= 0) & (tid < V)  # the host checks ids; an id out of range never reads outside the row
    safe = tl.where(keep & in_range, tid, 0)
    zt = tl.load(x_row + safe).to(tl.float32) * inv_t
    tl.store(LSE + row, lse)
    lp = tl.where(in_range, (zt - m) - log_s, float("nan"))  # not zt - lse: lse rounds at 1e4
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
    lse = tl.load(LSE + row)
    g = tl.where(keep, tl.load(GLOGP + row), 0.0)
    if WITH_ENT:
        gh = tl.where(keep, tl.load(GENT + row), 0.0)
        S = lse - tl.load(ENT + row)
    target = tid - vocab_start
    cols = tl.arange(0, BLOCK)
    for start in range(col0, V, BLOCK * tl.num_programs(1)):
        c = start + cols
        mask = c < V
        z = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32) * inv_t
        p = tl.exp(z - lse)
        dz = tl.where(c == target, g, 0.0) - g * p
        if WITH_ENT:
            dz += gh * tl.where(p > 0, p * (S - z), 0.0)  # p = 0 at -inf logits: 0, not 0 * inf
        dz = tl.where(keep, dz, 0.0) * inv_t
        tl.store(g_row + c, dz.to(G.dtype.element_ty), mask=mask)


def _block(V: int, interpret: bool) -> int:
    # NOTE: on GPU 4096-wide tiles with 8 warps keep 16-byte loads and enough bytes in flight;
    # under the CPU interpreter wider tiles mean fewer (slow) interpreted loop trips.
    cap = 16384 if interpret else 4096
    return min(triton.next_power_of_2(V), cap)


def logprob_fwd(x, ids, inv_t: float, ignore_index: int, with_entropy: bool, out_logp, out_lse, out_ent):
    """x (N, V) with x.stride(1) == 1; ids (N,) int64; outputs float32 (N,)."""
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
