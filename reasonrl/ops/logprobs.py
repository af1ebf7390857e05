"""The log-prob family: log-probs (and entropies) of chosen tokens, the hot path of every RL step.

    token_logprobs(logits (..., V), ids (...))                 -> float32 log p(id), [entropy]
    linear_token_logprobs(hidden (N, H), weight (V, H), ids (N,)) -> the same, fused with the LM head

z = logits / temperature; logp = z[id] - logsumexp(z); entropy = -sum softmax(z) log softmax(z).
Positions whose id equals `ignore_index` get logp = 0, entropy = 0 and no gradient.

Backends: "reference" (plain PyTorch autograd, float64-capable: the ground truth), "triton"
(kernels/logprobs.py), "cpp" (reasonrl._C, CPU tensors), "cuda" (reasonrl._C, CUDA tensors);
"auto" picks the fastest available for the device. The kernel backends never materialize a
float32 copy of the logits or of the softmax: forward keeps four floats per row (logp, entropy and
the log-sum-exp as two: `lse` (N, 2) = (m, log s), m the row's largest logit and s = sum_j
exp((x_j - m) / T), so lse = m / T + log s), backward recomputes p = exp((x - m) / T - log s) from
the logits. One float32 lse would round by up to 5e-4 at logits near 1e4, and every p of the row
would carry that relative error (a gradient 2e-4 off where PyTorch's is 1e-7); x - m is exact where
p matters.

The fused op never materializes N x V logits. Forward: row chunks of logits (hidden[rows] @ W^T)
go through the row kernel and are dropped (on CPU: column chunks, merged per row); or, for the
triton backend in bf16/fp16 on the devices in GEMM_LSE_FWD, one Triton GEMM whose epilogue keeps
only each tile's max and sums (kernels/logprobs.py: linear_lse_fwd; no logits in memory at all).
Backward: vocabulary chunks are recomputed (hidden @ W[cols]^T; after the GEMM+LSE forward, by its own
kernel, which writes their gradient directly), turned into their gradient in place, then
    grad_weight[cols] = dz^T @ hidden  (complete: no cross-chunk accumulation, one rounding),
    grad_hidden      += dz @ W[cols]   (float32 accumulator of N x H),
so the backward costs 6NHV FLOPs and the whole op 8NHV, with one chunk of logits alive at a time.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import _backend
from ._backend import autocast_operands, first_order_only, no_autocast

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# NOTE: the CUDA kernels ran token_logprobs fwd+bwd (in place) at N=16384, V=151936, bf16 in
# 3.62 ms on an H200, 1.02x the 3-pass byte floor (benchmarks/RESULTS.md); Triton was not timed
# there yet, so "auto" takes the measured one first.
AUTO_ON_CUDA = ("cuda", "triton")


# ----------------------------------------------------------------------------- reference
def token_logprobs_reference(logits, ids, temperature=1.0, ignore_index=-100, return_entropy=False):
    """Plain PyTorch (autograd). Computes in float64 for float64 input, else float32."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    keep = ids != ignore_index
    # ignored rows zeroed first: a NaN or all -inf row there (padding) gave NaN gradients through the
    # log-softmax's backward (0 * NaN), where the other backends give 0
    x = torch.where(keep.unsqueeze(-1), logits.to(acc), torch.zeros((), dtype=acc, device=logits.device))
    logz = torch.log_softmax(x / temperature, dim=-1)  # (..., V)
    safe = torch.where(keep, ids, torch.zeros_like(ids)).long()
    logp = logz.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(keep, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    ent = entropy_of(logz)
    return logp, torch.where(keep, ent, torch.zeros_like(ent))


def entropy_of(logz):
    """-sum p log p over the last dim of log-probs; p log p is 0 where p = 0 (a masked, -inf logit:
    0 * -inf would be NaN). logz is zeroed there before the product, so the gradient stays finite."""
    p = logz.exp()
    return -(p * torch.where(p > 0, logz, torch.zeros_like(logz))).sum(-1)


def linear_token_logprobs_reference(hidden, weight, ids, temperature=1.0, ignore_index=-100,
                                    return_entropy=False):
    """Plain PyTorch: materializes the N x V logits (in the inputs' dtype, as an eager LM head)."""
    keep = (ids != ignore_index).unsqueeze(-1)  # an ignored row's NaN hidden state must not reach weight.grad
    hidden = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    return token_logprobs_reference(hidden @ weight.T, ids, temperature, ignore_index, return_entropy)


# ----------------------------------------------------------------------------- row kernels
def _rows_fwd(backend, x, ids, inv_t, ignore_index, with_entropy):
    """x (N, V) with unit last stride -> logp (N,), lse (N, 2) (m, log s), entropy (N,) (None if not
    asked), all float32."""
    if backend == "triton":
        from reasonrl.kernels.logprobs import logprob_fwd

        N = x.shape[0]
        logp, lse = x.new_empty(N, dtype=torch.float32), x.new_empty(N, 2, dtype=torch.float32)
        ent = x.new_empty(N, dtype=torch.float32) if with_entropy else None
        logprob_fwd(x, ids, inv_t, ignore_index, with_entropy, logp, lse, ent)
        return logp, lse, ent
    logp, lse, ent = torch.ops.reasonrl.logprob_fwd(x, ids, 1.0 / inv_t, ignore_index, with_entropy)
    return logp, lse, (ent if with_entropy else None)


def _rows_bwd(backend, grad_x, x, ids, lse, ent, g_logp, g_ent, inv_t, ignore_index, vocab_start=0):
    if backend == "triton":
        from reasonrl.kernels.logprobs import logprob_bwd

        logprob_bwd(grad_x, x, ids, lse, ent, g_logp, g_ent, inv_t, ignore_index, vocab_start)
    else:
        torch.ops.reasonrl.logprob_bwd(x, ids, lse, ent, g_logp, g_ent, 1.0 / inv_t, ignore_index,
                                       vocab_start, grad_x)


def _grads(grad_logp, grad_ent, n, device, with_entropy):
    g = grad_logp.reshape(n).float().contiguous() if grad_logp is not None else torch.zeros(n, device=device)
    gh = None
    if with_entropy and grad_ent is not None:
        gh = grad_ent.reshape(n).float().contiguous()
    return g, gh


# ----------------------------------------------------------------------------- autograd
class TokenLogprobsFunction(torch.autograd.Function):
    """logits (N, V), or (B, T, V) whose rows are not one uniform stride apart (the usual
    `logits[:, :-1]` slice): then each batch row goes through the kernels as its own (T, V) view,
    instead of copying the whole tensor to make it flat."""

    @staticmethod
    @no_autocast
    def forward(ctx, logits, ids, temperature, ignore_index, with_entropy, inplace, backend):
        ctx.set_materialize_grads(False)
        inv_t = 1.0 / temperature
        parts = [_rows_fwd(backend, x, i, inv_t, ignore_index, with_entropy) for x, i in _row_views(logits, ids)]
        logp, lse = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        ent = torch.cat([p[2] for p in parts]) if with_entropy else None
        if inplace:  # backward will write over the logits: an op that saved them before now raises
            torch.autograd.graph.increment_version(logits)  # (autograd's "modified by an inplace operation")
        ctx.save_for_backward(logits, ids, lse, ent)
        ctx.cfg = (temperature, ignore_index, with_entropy, inplace, backend)
        ctx.spent = False
        if with_entropy:
            return logp, ent
        return logp

    @staticmethod
    @first_order_only
    @no_autocast
    def backward(ctx, grad_logp, grad_ent=None):
        temperature, ignore_index, with_entropy, inplace, backend = ctx.cfg
        if inplace:
            if ctx.spent:
                raise RuntimeError("token_logprobs(inplace_backward=True): the logits were overwritten by their "
                                   "gradient in the first backward; a second backward through the same graph "
                                   "(retain_graph=True) needs inplace_backward=False")
            ctx.spent = True
        logits, ids, lse, ent = ctx.saved_tensors
        g, gh = _grads(grad_logp, grad_ent, ids.shape[0], logits.device, with_entropy)
        grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
        r0 = 0
        for (x, i), (gx, _) in zip(_row_views(logits, ids), _row_views(grad, ids)):
            r1 = r0 + x.shape[0]
            _rows_bwd(backend, gx, x, i, lse[r0:r1], None if ent is None else ent[r0:r1], g[r0:r1],
                      None if gh is None else gh[r0:r1], 1.0 / temperature, ignore_index)
            r0 = r1
        if inplace:  # an op that saved the logits after this one's forward and runs its backward later raises
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None, None


def _row_views(x, ids):
    """(2-D view, ids) pairs with unit last stride: one for (N, V), one per batch row for (B, T, V)."""
    if x.dim() == 2:
        return [(x, ids)]
    T = x.shape[1]
    return [(x[b], ids[b * T:(b + 1) * T]) for b in range(x.shape[0])]


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    @no_autocast
    def forward(ctx, hidden, weight, ids, temperature, ignore_index, with_entropy, chunk_bytes, backend,
                keep_logits=False):
        ctx.set_materialize_grads(False)
        ctx.lse_cfg = None
        if keep_logits:  # one GEMM; its logits stay for backward, which writes their gradient over them
            z = hidden @ weight.T  # (N, V)
            logp, lse, ent = _rows_fwd(backend, z, ids, 1.0 / temperature, ignore_index, with_entropy)
        elif _gemm_lse_ok(hidden, weight, backend):  # backward recomputes with the same kernel and config
            z, ctx.lse_cfg = None, _gemm_lse_config(hidden, weight)
            logp, lse, ent = _linear_fwd_gemm_lse(hidden, weight, ids, temperature, ignore_index, with_entropy,
                                                  chunk_bytes, ctx.lse_cfg)
        else:
            z = None
            logp, lse, ent = _linear_fwd(hidden, weight, ids, temperature, ignore_index, with_entropy,
                                         chunk_bytes, backend)
        ctx.save_for_backward(hidden, weight, ids, lse, ent, z)
        ctx.cfg = (temperature, ignore_index, with_entropy, chunk_bytes, backend)
        ctx.spent = False
        return (logp, ent) if with_entropy else logp

    @staticmethod
    @first_order_only
    @no_autocast
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, ids, lse, ent, z = ctx.saved_tensors
        temperature, ignore_index, with_entropy, chunk_bytes, backend = ctx.cfg
        N, V = hidden.shape[0], weight.shape[0]
        g, gh = _grads(grad_logp, grad_ent, N, hidden.device, with_entropy)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if z is not None:  # keep_logits: 2 GEMMs (4NHV FLOPs) instead of 3 (6NHV), no float32 accumulator
            if ctx.spent:
                raise RuntimeError("linear_token_logprobs(keep_logits=True): the kept logits were overwritten by "
                                   "their gradient in the first backward; a second backward through the same "
                                   "graph (retain_graph=True) needs keep_logits=False")
            ctx.spent = True
            _rows_bwd(backend, z, z, ids, lse, ent, g, gh, 1.0 / temperature, ignore_index)
            grad_h = z @ weight if need_h else None
            grad_w = z.T @ hidden if need_w else None
            return grad_h, grad_w, None, None, None, None, None, None, None
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        step = _vocab_step(hidden.device, chunk_bytes, N, V, hidden.element_size())
        if ctx.lse_cfg is not None:  # the GEMM + log-sum-exp forward's: chunks start on its column tiles
            from reasonrl.kernels.logprobs import linear_logits_grad

            bn = ctx.lse_cfg["BLOCK_N"]
            step = max(bn, step // bn * bn)
            keep = ids != ignore_index
            rv = torch.stack([lse[:, 0], lse[:, 1], lse[:, 1] - ent if gh is not None else lse[:, 1],
                              torch.where(keep, g, 0.0), torch.where(keep, gh, 0.0) if gh is not None else g])
        for v0 in range(0, V, step):
            w = weight[v0:v0 + step]  # (Vc, H)
            if ctx.lse_cfg is not None:  # the gradient from the forward's own logits, bit for bit
                z = linear_logits_grad(hidden, w, hidden.new_empty(N, w.shape[0]), ctx.lse_cfg, ids, rv, v0,
                                       1.0 / temperature, gh is not None)
            else:
                z = hidden @ w.T  # (N, Vc), recomputed; its gradient overwrites it
                _rows_bwd(backend, z, z, ids, lse, ent, g, gh, 1.0 / temperature, ignore_index, v0)
            if need_w:
                torch.mm(z.T, hidden, out=grad_w[v0:v0 + step])
            if need_h:
                grad_h += (z @ w).float() if z.dtype != torch.float32 else z @ w
        if need_h:
            grad_h = grad_h.to(hidden.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


def _rows_overlap(x) -> bool:
    """Whether rows of x ((N, V) or (B, T, V), unit last stride: _flat_rows' output) may share memory:
    the outer dims, by increasing stride, must each step past everything the inner ones span (the
    usual sufficient test; permuted batches pass it)."""
    extent = x.shape[-1]
    for stride, size in sorted((x.stride(i), x.shape[i]) for i in range(x.dim() - 1) if x.shape[i] > 1):
        if stride < extent:
            return True
        extent += (size - 1) * stride
    return False


def check_inplace_rows(op, x, logits):
    """An in-place gradient needs rows of their own: raise where x's rows (_flat_rows(logits), or a
    (B, T, V) view with unit last stride) may share memory."""
    if _rows_overlap(x):
        raise ValueError(f"{op}: inplace_backward writes the gradient over the logits, whose rows share memory "
                         f"here (an expanded tensor? strides {tuple(logits.stride())}); pass a tensor with its own "
                         f"storage or inplace_backward=False")


def _flat_rows(logits):
    """logits as (N, V) with unit last stride and one row stride, without copying where possible;
    else (B, T, V) with unit last stride (each batch row uniform); else a contiguous copy."""
    V = logits.shape[-1]
    if logits.stride(-1) == 1:
        try:
            return logits.view(-1, V)
        except RuntimeError:
            pass
        if logits.dim() == 3:
            return logits
        if logits.dim() > 3:
            try:
                return logits.view(-1, *logits.shape[-2:])  # merge the leading dims only
            except RuntimeError:
                pass
    return logits.contiguous().view(-1, V)


def _chunk(chunk_bytes, rows, cols, elt, align):
    """How many of `cols` fit `chunk_bytes` beside `rows`, rounded down to `align` (at least 1, also
    for cols == 0: it is a range() step)."""
    n = max(1, chunk_bytes // max(1, rows * elt))
    if n >= align:
        n -= n % align
    return max(1, min(n, cols))


# Devices whose forward splits the logits by vocabulary columns (below), in chunks of at most
# VOCAB_FWD_COLS columns, the backward's chunks: both recompute the same GEMMs, bit for bit.
VOCAB_CHUNKED_FWD = ("cpu",)
VOCAB_FWD_COLS = 2048


def _vocab_step(device, chunk_bytes, N, V, elt):
    """Columns per chunk of the backward, and of the forward where it splits by columns."""
    step = _chunk(chunk_bytes, N, V, elt, align=128)
    return min(step, VOCAB_FWD_COLS) if device.type in VOCAB_CHUNKED_FWD else step


# Devices on which the triton backend's linear forward is one GEMM with the log-sum-exp in its epilogue
# (kernels/logprobs.py: linear_lse_fwd; the logits never reach memory) instead of chunks of cuBLAS
# logits through the row kernel. "cpu" is the interpreter (the tests). NOTE: not on "cuda" until timed
# there: written and tested without a GPU (2026-11-28); benchmarks/bench_logprobs.py times both.
# The backward recomputes the logits with the same kernel's main loop and tiles and turns them into their
# gradient in its epilogue (linear_logits_grad): bit for bit the logits the lse was taken from, and no
# logits pass through memory there either (one write of the gradient chunk, no row-kernel pass). With
# cuBLAS / MKL summing in another order, a last-bit difference at a token with p ~ 1 moved p by exp(ulp)
# (fp16 logits near 1e4: a gradient 20x PyTorch's error).
# bf16 / fp16 only (each logit rounded to that dtype in registers, as PyTorch's logits are): fp32 on the
# GPU is no tensor-core GEMM in Triton.
GEMM_LSE_FWD = {"cpu"}
GEMM_LSE_DTYPES = (torch.bfloat16, torch.float16)


def _gemm_lse_ok(hidden, weight, backend):
    dev = hidden.device.type
    return (backend == "triton" and dev in GEMM_LSE_FWD and hidden.dtype in GEMM_LSE_DTYPES
            and hidden.stride(-1) == 1 and weight.stride(-1) == 1 and not torch.compiler.is_compiling())


def _gemm_lse_config(hidden, weight):
    from reasonrl.kernels.logprobs import lse_gemm_config

    return lse_gemm_config(hidden, weight)


def _linear_fwd_gemm_lse(hidden, weight, ids, temperature, ignore_index, with_entropy, chunk_bytes, config):
    from reasonrl.kernels.logprobs import linear_lse_fwd

    N, V = hidden.shape[0], weight.shape[0]
    logp = hidden.new_empty(N, dtype=torch.float32)
    lse = hidden.new_empty(N, 2, dtype=torch.float32)
    ent = hidden.new_empty(N, dtype=torch.float32) if with_entropy else None
    linear_lse_fwd(hidden, weight, ids, 1.0 / temperature, ignore_index, with_entropy, logp, lse, ent,
                   part_bytes=chunk_bytes // 4, config=config)
    bad = (ids != ignore_index) & ((ids < 0) | (ids >= V))  # checked after the kernels are queued
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise RuntimeError(f"linear_token_logprobs: ids[{i}] = {int(ids[i])} is out of range [0, {V}) and is not "
                           f"ignore_index ({ignore_index})")
    return logp, lse, ent


def _linear_fwd(hidden, weight, ids, temperature, ignore_index, with_entropy, chunk_bytes, backend):
    N, V = hidden.shape[0], weight.shape[0]
    if _gemm_lse_ok(hidden, weight, backend):
        return _linear_fwd_gemm_lse(hidden, weight, ids, temperature, ignore_index, with_entropy, chunk_bytes,
                                    _gemm_lse_config(hidden, weight))
    if hidden.device.type in VOCAB_CHUNKED_FWD and _vocab_step(hidden.device, chunk_bytes, N, V,
                                                                hidden.element_size()) < V:
        return _linear_fwd_by_vocab(hidden, weight, ids, 1.0 / temperature, ignore_index, with_entropy,
                                    chunk_bytes, backend)
    logp = hidden.new_empty(N, dtype=torch.float32)
    lse = hidden.new_empty(N, 2, dtype=torch.float32)
    ent = hidden.new_empty(N, dtype=torch.float32) if with_entropy else None
    # NOTE: rows in multiples of 256, the GEMM's tile height (128 or 256): at N=16384, V=151936 bf16 a
    # 512 MiB chunk held 1728 rows (64-aligned), 13.5 tiles of 128, the last tile row half empty
    step = _chunk(chunk_bytes, V, N, hidden.element_size(), align=256 if hidden.is_cuda else 64)
    side = _side_stream(hidden.device) if step < N else None
    if side is not None:
        return _linear_fwd_overlapped(hidden, weight, ids, temperature, ignore_index, with_entropy, backend,
                                      step, side, logp, lse, ent)
    for r0 in range(0, N, step):
        z = hidden[r0:r0 + step] @ weight.T  # (rows, V), dropped after this chunk
        lp, ls, en = _rows_fwd(backend, z, ids[r0:r0 + step], 1.0 / temperature, ignore_index, with_entropy)
        logp[r0:r0 + step], lse[r0:r0 + step] = lp, ls
        if with_entropy:
            ent[r0:r0 + step] = en
    return logp, lse, ent


def _linear_fwd_overlapped(hidden, weight, ids, temperature, ignore_index, with_entropy, backend, step, side,
                           logp, lse, ent):
    """_linear_fwd on CUDA: the row kernel (a pass over a chunk's logits, memory-bound) of chunk i runs
    on a side stream beside chunk i + 1's GEMM (compute-bound) on the main one, in two buffers of
    `step` rows taken in turn: a buffer's next GEMM waits for the row kernel that read it (an event),
    so exactly two chunks of logits are alive however far the host runs ahead (freed chunks handed
    between streams with record_stream would stay reserved until the side stream caught up)."""
    N, V = hidden.shape[0], weight.shape[0]
    main = torch.cuda.current_stream(hidden.device)
    bufs, done = [], [None, None]
    with torch.autocast("cuda", enabled=False):
        for i, r0 in enumerate(range(0, N, step)):
            rows, j = min(step, N - r0), i % 2
            if len(bufs) <= j:
                bufs.append(torch.empty(min(step, N), V, dtype=hidden.dtype, device=hidden.device))
            if done[j] is not None:
                main.wait_event(done[j])  # the row kernel that read this buffer two chunks ago
            z = bufs[j][:rows]
            torch.mm(hidden[r0:r0 + rows], weight.t(), out=z)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                lp, ls, en = _rows_fwd(backend, z, ids[r0:r0 + rows], 1.0 / temperature, ignore_index,
                                       with_entropy)
                logp[r0:r0 + rows], lse[r0:r0 + rows] = lp, ls
                if with_entropy:
                    ent[r0:r0 + rows] = en
                done[j] = side.record_event()
    main.wait_stream(side)  # the outputs (allocated on main, written on side) and the buffers' last reads
    return logp, lse, ent


_SIDE_STREAMS = {}


def _side_stream(device):
    """A second CUDA stream per device for _linear_fwd's overlap; None off CUDA, under torch.compile
    (streams inside a traced graph) or while a CUDA graph is being captured."""
    if device.type != "cuda" or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SIDE_STREAMS:
        _SIDE_STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _SIDE_STREAMS[idx]


def _linear_fwd_by_vocab(hidden, weight, ids, inv_t, ignore_index, with_entropy, chunk_bytes, backend):
    """The forward over column chunks of the logits (all N rows, a slice of the vocabulary each),
    merged per row. Chunk c gives, through the row kernel, its (m_c, log s_c) and the entropy H_c of
    the softmax over its columns; m = max_c m_c, log s = logsumexp_c ((m_c - m) / T + log s_c), and
    with log w_c = (m_c - m) / T + log s_c - log s the entropy is sum_c w_c (H_c - log w_c). The chosen token's logit is read from its own chunk; an id outside
    [0, V) that is not ignore_index (check_ids=False) raises, as the row kernels' glue does. The
    forward's GEMMs have the backward's shapes (all rows, a column chunk), so the logits the lse
    was taken from are the ones the backward recomputes, to the bit where the chunks agree.
    NOTE: MKL packs a GEMM's whole B operand on every call: row chunks made it pack the whole LM
    head once per chunk, column chunks pack each part once. 2 cores, AVX2-only EPYC, fp32, N=1024
    H=576 V=49152 (SmolLM2's LM head), 2026-11-27: the matmuls alone 930 ms in row chunks of 128,
    475-515 ms in column chunks of 2-4k, 553-720 ms as one GEMM; the whole forward (7 interleaved
    runs) 585 ms in chunks of 2048 columns, 627 in 8192, 678 in 32768, and 793 ms before in row
    chunks of 128 MiB (1015 ms in the former 32 MiB)."""
    N, V = hidden.shape[0], weight.shape[0]
    keep = ids != ignore_index
    bad = (keep & ((ids < 0) | (ids >= V))).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise RuntimeError(f"linear_token_logprobs: ids[{i}] = {int(ids[i])} is out of range [0, {V}) and is not "
                           f"ignore_index ({ignore_index})")
    step = _vocab_step(hidden.device, chunk_bytes, N, V, hidden.element_size())
    zt = torch.zeros(N, dtype=torch.float64, device=hidden.device)  # the chosen logit / T
    lses, ents = [], []
    for v0 in range(0, V, step):
        v1 = min(V, v0 + step)
        z = hidden @ weight[v0:v1].T  # (N, v1 - v0), dropped after this chunk
        inside = (ids >= v0) & (ids < v1)
        local = torch.where(inside, ids - v0, 0)  # every row gets its lse_c and H_c: no row ignored
        _, ls, en = _rows_fwd(backend, z, local, inv_t, -1, with_entropy)
        zt = torch.where(inside, z.gather(1, local[:, None]).squeeze(1).double() * inv_t, zt)
        lses.append(ls)
        ents.append(en)
    pairs = torch.stack(lses, 1).double()  # (N, chunks, 2): (m_c, log s_c)
    m = pairs[..., 0].amax(1)  # the row's largest logit (a float32 value: exact)
    m_safe = torch.where(torch.isfinite(m), m, 0.0)  # all -inf (or NaN) rows: their own NaN, not (-inf) - (-inf)
    log_w = (pairs[..., 0] - m_safe[:, None]) * inv_t + pairs[..., 1]  # log s_c + the shift to m
    log_s = torch.logsumexp(log_w, 1)
    log_w = log_w - log_s[:, None]
    logp = torch.where(keep, zt - m_safe * inv_t - log_s, 0.0).float()
    ent = None
    if with_entropy:
        w = log_w.exp()
        h_c = torch.stack(ents, 1).double()
        ent = torch.where(keep, (w * (h_c - torch.where(w > 0, log_w, 0.0))).sum(1), 0.0).float()
    return logp, torch.stack([m_safe, log_s], 1).float(), ent


# ----------------------------------------------------------------------------- checks
ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def _check_ids(op, ids, lead_shape, V, ignore_index, check_range, of="the logits'"):
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{op}: ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"{op}: ids must be an integer tensor of dtype int64, int32, int16 or uint8, "
                        f"got {ids.dtype}")
    if tuple(ids.shape) != tuple(lead_shape):
        raise ValueError(f"{op}: ids has shape {tuple(ids.shape)} but {of} leading shape is {tuple(lead_shape)}")
    if check_range and ids.numel():
        bad = ((ids < 0) | (ids >= V)) & (ids != ignore_index)
        if bool(bad.any()):
            first = ids[bad].flatten()[0].item()
            raise IndexError(f"{op}: ids out of range [0, {V}) (and not ignore_index={ignore_index}): found {first}")


# The smallest temperature the ops, the sampler and the configs take (0 still means greedy where
# sampling allows it). Below about 1e-38, 1 / temperature is inf in float32 and every log-prob NaN
# (token_logprobs at 1e-39 gave NaN on every backend); far above that, logits / temperature overflows
# float32 for large logits. 1e-5 is vLLM's threshold for greedy sampling.
MIN_TEMPERATURE = 1e-5


def check_temperature(op, temperature):
    """A finite number >= MIN_TEMPERATURE (the kernels scale by 1 / temperature in float32)."""
    if not (isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature >= MIN_TEMPERATURE):
        raise ValueError(f"{op}: temperature must be a finite number >= {MIN_TEMPERATURE} (smaller ones "
                         f"overflow float32 as 1 / temperature), got {temperature!r}")


def _check_common(op, temperature, backend_name, dtype):
    check_temperature(op, temperature)
    if backend_name != "reference" and dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: backend={backend_name!r} takes float32, bfloat16 or float16 inputs, got {dtype}"
                        + (" (float64 runs on backend='reference')" if dtype == torch.float64 else ""))
    if backend_name == "reference" and dtype not in KERNEL_DTYPES + (torch.float64,):
        raise TypeError(f"{op}: logits must be a floating tensor, got {dtype}")


def _default_chunk_bytes(device):
    # NOTE: 512 MiB chunks keep the GEMMs large (>= 1.7k x 152k) on GPU while the live chunk and
    # the float32 grad_hidden accumulator stay well under the 2 GiB extra-memory goal.
    # NOTE: on CPU, MKL packs a GEMM's whole B operand (here the LM head, 113 MB for SmolLM2) on
    # every call, so row chunks of logits pay a pass over the weight each. 2 cores, AVX2-only EPYC,
    # fp32, grpo_loss fused fwd+bwd (2026-11-27): B=16 T=32 H=576 V=49152 (SmolLM2's LM head, 311
    # live rows) 1110-1221 ms in 32 MiB chunks, 776-809 ms in 128 MiB; B=8 T=256 H=512 V=32000
    # 1519-1669 -> 1393-1447 ms; 256 MiB was no faster.
    return (512 << 20) if device.type == "cuda" else (128 << 20)


# ----------------------------------------------------------------------------- public ops
def token_logprobs(logits, ids, temperature=1.0, *, ignore_index=-100, return_entropy=False,
                   inplace_backward=False, check_ids=True, backend="auto"):
    """Float32 log-probs of `ids` under softmax(logits / temperature), shaped like ids.

    logits: (..., V) float32 / bfloat16 / float16 (float64 with backend="reference").
    ids: (...) integer; positions equal to ignore_index give 0 and no gradient.
    return_entropy: also return the per-position entropy of softmax(logits / temperature).
    inplace_backward: backward writes the gradient over the logits buffer (no new N x V tensor);
        the logits must not be used after backward. Ignored by the reference backend.
    check_ids: verify ids are in range (one small reduction; on GPU a host sync).
    """
    op = "token_logprobs"
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise TypeError(f"{op}: logits must be a tensor of shape (..., V)")
    _backend.check_same_device(op, logits=logits, ids=ids)
    name = _backend.resolve(backend, logits.device, op, prefer_cuda=AUTO_ON_CUDA)
    _check_common(op, temperature, name, logits.dtype)
    V = logits.shape[-1]
    if V == 0:
        raise ValueError(f"{op}: logits has an empty vocabulary dimension")
    _check_ids(op, ids, logits.shape[:-1], V, ignore_index, check_ids)
    if name == "reference":
        return token_logprobs_reference(logits, ids, temperature, ignore_index, return_entropy)
    lead = ids.shape
    x = _flat_rows(logits)
    if inplace_backward:
        check_inplace_rows(op, x, logits)
    flat_ids = ids.reshape(-1).to(torch.int64).contiguous()
    out = TokenLogprobsFunction.apply(x, flat_ids, float(temperature), int(ignore_index),
                                      bool(return_entropy), bool(inplace_backward), name)
    if return_entropy:
        return out[0].view(lead), out[1].view(lead)
    return out.view(lead)


def linear_token_logprobs(hidden, weight, ids, temperature=1.0, *, ignore_index=-100, return_entropy=False,
                          chunk_bytes=None, keep_logits=False, check_ids=True, backend="auto"):
    """log p(ids) under softmax(hidden @ weight.T / temperature), without the N x V logits.

    hidden: (..., H); weight: (V, H) (the LM head), same dtype; ids: hidden's leading shape.
    With grad disabled (or no input requiring grad) this is the no-grad path for old-policy and
    reference-policy log-probs: nothing is saved for backward.
    chunk_bytes: size of a chunk of logits (default 512 MiB on GPU, 128 MiB on CPU); the forward on
        CUDA keeps two alive (one in its GEMM, the one before in the log-prob kernel on a side stream).
    keep_logits: with gradients, make the N x V logits in one GEMM and keep them (in hidden's dtype) for
        backward, which writes their gradient over them: 6NHV FLOPs instead of 8NHV (no recompute), for
        N x V elements alive from forward to backward (bf16, N=8192, V=151936: 2.3 GiB). For a step whose
        logits fit the memory at hand; False (the default) keeps one chunk alive at a time. The graph can
        then be backpropagated once only.
    """
    op = "linear_token_logprobs"
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"{op}: hidden must be (..., H) and weight (V, H); got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: hidden's last dim {hidden.shape[-1]} != weight's H {weight.shape[1]} (weight is (V, H))")
    hidden, weight = autocast_operands(hidden, weight)  # under torch.autocast, as a Linear would be
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{op}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    _backend.check_same_device(op, hidden=hidden, weight=weight, ids=ids)
    name = _backend.resolve(backend, hidden.device, op, prefer_cuda=AUTO_ON_CUDA)
    _check_common(op, temperature, name, hidden.dtype)
    V, H = weight.shape
    if V == 0:
        raise ValueError(f"{op}: weight has an empty vocabulary dimension (V = 0 rows)")
    if H == 0:
        raise ValueError(f"{op}: hidden and weight have an empty hidden dimension (H = 0)")
    _check_ids(op, ids, hidden.shape[:-1], V, ignore_index, check_ids, of="hidden's")
    if name == "reference":
        return linear_token_logprobs_reference(hidden, weight, ids, temperature, ignore_index, return_entropy)
    lead = ids.shape
    h = hidden.reshape(-1, H).contiguous()
    flat_ids = ids.reshape(-1).to(torch.int64).contiguous()
    cb = int(chunk_bytes) if chunk_bytes else _default_chunk_bytes(hidden.device)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        out = LinearTokenLogprobsFunction.apply(h, weight, flat_ids, float(temperature), int(ignore_index),
                                                bool(return_entropy), cb, name, bool(keep_logits))
        logp, ent = out if return_entropy else (out, None)
    else:
        logp, _, ent = _linear_fwd(h, weight, flat_ids, float(temperature), int(ignore_index),
                                   bool(return_entropy), cb, name)
    if return_entropy:
        return logp.view(lead), ent.view(lead)
    return logp.view(lead)
