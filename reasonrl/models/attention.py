"""Attention for the lean decoder: varlen causal attention for training/prefill, paged for decode.

Training / prefill without a cache prefix: causal attention inside each packed sequence.
  - flash-attn's flash_attn_varlen_func on CUDA in fp16/bf16 when it is installed (one launch, no
    padding, grouped-query natively);
  - else PyTorch SDPA: one batched call when every sequence has the same length, otherwise one
    call per sequence. Why not one call with a block-diagonal mask: it spends O(total^2) work on
    cross-sequence pairs that are all masked, and the mask itself is total^2 bytes.
Prefill with a cached prefix (context_lens > new tokens): the sequence's keys/values are read back
from the paged cache, and query i of n new tokens attends keys j <= ctx - n + i.
Decode: one query per sequence, reasonrl.ops.paged.paged_attention_decode over the block table.
Training with shared prefixes (AttnContext.prefix_of): the G completions of a GRPO group are packed
after their prompt, which is packed once; each completion's queries attend to all of the prompt's
keys and causally to their own (shared_prefix_plan / shared_prefix_attention). Same values and
gradients as packing prompt+completion G times, for about P + G*C tokens of work instead of G*(P + C).
Prefixes chain: a prompt can itself continue a prefix common to all prompts (a chat template), and
a sequence then sees the keys of all its ancestors, root first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reasonrl.ops._backend import first_order_only  # (the custom backwards: a double backward raises)

_STATE = {"deterministic": False, "native_gqa": True}
MASK_BUDGET = 1 << 26  # mask entries (batch x queries x keys) of one shared-prefix SDPA call
MATH_BUDGET = 1 << 23  # scores (batch x heads x queries x keys) of one CPU training call through _math_attention


def set_deterministic(on: bool = True) -> None:
    """Bitwise-reproducible forward/backward for tests: torch's deterministic algorithms, math SDPA,
    no flash-attn (its backward accumulates dq with atomics)."""
    import os
    _STATE["deterministic"] = bool(on)
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(on))
    torch.backends.cudnn.deterministic = bool(on)
    torch.backends.cudnn.benchmark = not on and torch.backends.cudnn.benchmark


def _flash_varlen():
    if _STATE["deterministic"]:
        return None
    if "flash" not in _STATE:  # imported once: a failed import is not cached by Python, and this runs per layer
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            flash_attn_varlen_func = None
        _STATE["flash"] = flash_attn_varlen_func
    return _STATE["flash"]


def _native_gqa(q, mask) -> bool:
    """Whether SDPA takes the grouped k/v as they are (enable_gqa, torch >= 2.5): only its flash
    backend reads each k/v head once for its group, without a mask (with one, or elsewhere, SDPA falls
    back to its math backend: slower than repeating the heads first). CUDA, fp16/bf16, head dim <= 256.
    Why: the repetition writes Hq/Hkv copies of k and v per layer (7 for Qwen2.5-0.5B) and its backward
    sums them again."""
    if not (_STATE["native_gqa"] and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and mask is None
            and not _STATE["deterministic"] and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0):
        return False
    return torch.backends.cuda.flash_sdp_enabled() and torch.cuda.get_device_capability(q.device)[0] >= 8


def _sdpa(q, k, v, causal, scale, mask=None):
    """q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) -> (B, Hq, Lq, D); grouped-query natively (flash backend)
    or by head repetition."""
    if k.shape[1] != q.shape[1] and _native_gqa(q, mask):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if _math_ok(q, k):
        return _math_attention(q, k, v, causal, scale, mask)
    if _STATE["deterministic"]:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _math_ok(q, k) -> bool:
    """The explicit-softmax path: CPU bf16/fp16 training (grad needed), at most MATH_BUDGET scores a call.

    NOTE: PyTorch's CPU SDPA (its flash kernel) is slow in backward in bf16 at the small, many-sequence
    shapes of packed RL batches. Fwd+bwd of one call, 2 cores, SDPA vs this path: (128 x 4 heads,
    48 queries, 56 keys, D 32, a prefix mask) bf16 37.9 vs 11.5 ms; (8 x 9, 120 causal, D 64) 17.4 vs
    11.1 ms; the tiny model's GRPO update (16 x 8 x 48, autocast bf16) 0.458 -> 0.302 s. In fp32 the
    calls alone gain ~20% but the update did not (0.404 vs 0.424 s, noise): fp32 keeps SDPA. Forward-only
    calls (the engine's prefill) keep SDPA, as fast or faster there. The probabilities are kept for
    backward, hence the budget.
    """
    return (not q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad)
            and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= MATH_BUDGET)


def _math_attention(q, k, v, causal, scale, mask):
    """softmax(q k^T * scale + mask) v in float32 (bf16/fp16 inputs are upcast, as flash kernels
    accumulate); causal is top-left aligned, as SDPA's is_causal; mask is boolean (True: attend)."""
    dt = q.dtype
    if dt in (torch.bfloat16, torch.float16):
        q, k, v = q.float(), k.float(), v.float()
    s = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, H, Lq, Lk)
    if causal:
        Lq, Lk = s.shape[-2:]
        mask = torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v).to(dt)


class Rows:
    """An index of rows to gather from a tensor of n rows (x[idx]), made once per forward plan.

    NOTE: the backward of x[idx] on CPU is index_put_ with accumulate, which runs serially, element by
    element: 21 of 231 ms of the tiny model's bf16 GRPO update (16 x 8 x 48, 2 cores) went to the
    q/k/v/o gathers of shared-prefix attention. take_rows's backward instead sums each source row's
    gradients in float32 (csrc/cpu/fused.cpp scatter_rows), in parallel, over the index's transpose
    (made once per plan, at the first backward)."""
    __slots__ = ("idx", "n", "_csr")

    def __init__(self, idx: torch.Tensor, n: int):
        self.idx, self.n, self._csr = idx, int(n), None

    def numel(self) -> int:
        return self.idx.numel()

    def csr(self):
        """(offsets (n + 1,), order): the positions i with idx[i] == r are order[offsets[r]:offsets[r + 1]]."""
        if self._csr is None:
            idx = self.idx.cpu()
            offsets = torch.zeros(self.n + 1, dtype=torch.long)
            offsets[1:] = torch.bincount(idx, minlength=self.n).cumsum(0)
            self._csr = (offsets, torch.argsort(idx, stable=True))
        return self._csr


class _TakeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows):
        ctx.rows = rows
        return x.index_select(0, rows.idx)

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        offsets, order = ctx.rows.csr()
        return torch.ops.reasonrl.scatter_rows(g.contiguous(), offsets, order, ctx.rows.n), None


def take_rows(x: torch.Tensor, rows) -> torch.Tensor:
    """x[rows] for a Rows index (or a slice): on CPU with gradients, with scatter_rows as the backward."""
    if isinstance(rows, slice):
        return x[rows]
    if (x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and _cpp_fused()):
        if x.shape[0] != rows.n:
            raise ValueError(f"take_rows: the index was made for {rows.n} rows, the tensor has {x.shape[0]}")
        return _TakeRows.apply(x, rows)
    return x[rows.idx]


def _cpp_fused() -> bool:
    from .functional import FUSED, _cpp_ok
    return FUSED["cpu"] and _cpp_ok()


def _fused_attn_ok(q, k) -> bool:
    """The C++ attention (csrc/cpu/fused.cpp) for a padded CPU training call (B, L, H, D): gradients
    needed, float dtypes, head dim 16/32/64/128, reasonrl._C built (models.functional.FUSED["cpu"]), and
    at least two (sequence, kv head) work items per thread: the kernel splits the work by those only,
    so a few long sequences on many cores stay with SDPA, which also splits the queries."""
    return (q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16) and k.dtype == q.dtype
            and q.shape[-1] in (16, 32, 64, 128) and q.shape[0] * k.shape[2] >= 2 * torch.get_num_threads()
            and _cpp_fused())


class _PaddedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, off, klen, scale):
        o, lse = torch.ops.reasonrl.fused_attn_fwd(q, k, v, off, klen, scale)
        ctx.save_for_backward(q, k, v, o, lse, off, klen)
        ctx.scale = scale
        return o

    @staticmethod
    @first_order_only
    def backward(ctx, do):
        q, k, v, o, lse, off, klen = ctx.saved_tensors
        dq, dk, dv = torch.ops.reasonrl.fused_attn_bwd(do, q, k, v, o, lse, off, klen, ctx.scale)
        return dq, dk, dv, None, None, None


def padded_attention(qb, kb, vb, scale, off=None, klen=None):
    """qb (B, Lq, Hq, D), kb/vb (B, Lk, Hkv, D) -> (B, Lq, Hq, D): query i of batch b sees the keys
    j < klen[b] with j <= i + off[b] (off, klen: (B,) int64 CPU tensors; None: 0 and Lk, i.e. causal,
    top-left aligned; SDPA gets them as a boolean mask).

    NOTE: CPU training calls run csrc/cpu/fused.cpp's attention: blocks of 4 query rows against 16 keys
    at a time, the log-sum-exp kept, the probabilities recomputed in backward. Fwd+bwd at the tiny
    model's GRPO shape (128 x 4 heads, 48 queries, 56 keys, D 32, prefix of 8; 2 threads): fp32 6.9 ms
    against SDPA's 14.5 ms, bf16 5.6 ms against SDPA's 36.9 ms (and ~11 ms for _math_attention).
    """
    if _fused_attn_ok(qb, kb):
        B, Lk = qb.shape[0], kb.shape[1]
        off = torch.zeros(B, dtype=torch.long) if off is None else off
        klen = torch.full((B,), Lk, dtype=torch.long) if klen is None else klen
        return _PaddedAttention.apply(qb, kb, vb, off, klen, scale)
    mask = None
    if off is not None:
        Lq, Lk, dev = qb.shape[1], kb.shape[1], qb.device
        j, i = torch.arange(Lk, device=dev), torch.arange(Lq, device=dev)[:, None]
        off, klen = off.to(dev)[:, None, None], klen.to(dev)[:, None, None]
        mask = ((j <= i + off) & (j < klen))[:, None]  # (B, 1, Lq, Lk)
    o = _sdpa(qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), mask is None, scale, mask)
    return o.transpose(1, 2)


def pad_plan(lengths, device):
    """Gather indices for one right-padded SDPA call over many packed sequences, or None.

    Right padding is exact under a causal mask: a real query at position i only sees keys 0..i,
    which are all real; the pad rows are computed and dropped. The price is attention on the
    padding, B * max(L)^2 against sum(L^2), so it is used only while that stays under 2x. Why at
    all: one call instead of B small ones. NOTE: 64 sequences of 32-64 tokens, 4 heads of 32, fwd+bwd
    of one layer on 2 (shared, loaded) CPU cores: 291 ms padded vs 641 ms one call per sequence.
    """
    B, L = len(lengths), max(lengths)
    if B < 4 or len(set(lengths)) == 1 or B * L * L > 2 * sum(n * n for n in lengths):
        return None
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)  # (B,)
    lens = torch.tensor(lengths)
    j = torch.arange(L)
    real = j[None, :] < lens[:, None]  # (B, L)
    src = torch.where(real, starts[:, None] + j[None, :], starts[:, None])  # pad rows repeat row 0 of the sequence
    dst = (torch.arange(B)[:, None] * L + j[None, :])[real]  # (T,), in packed order
    return Rows(src.reshape(-1).to(device), sum(lengths)), Rows(dst.to(device), B * L)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, lengths, scale, pad=None):
    """q (T, Hq, D), k/v (T, Hkv, D), causal within each sequence -> (T, Hq, D).

    lengths: the sequence lengths as a Python list (read once per forward, not per layer).
    pad: pad_plan(lengths) (also made once per forward), None for one SDPA call per sequence, or a
    callable returning one of those (made only if this call does not take flash-attn).
    """
    flash = _flash_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if flash is not None:
        return flash(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=True)
    if callable(pad):
        pad = pad()
    if len(set(lengths)) == 1:  # all the same length: one batched call
        B, L = len(lengths), lengths[0]
        qb, kb, vb = (t.view(B, L, t.shape[1], t.shape[2]) for t in (q, k, v))
        return padded_attention(qb, kb, vb, scale).reshape(q.shape)
    if pad is not None:  # many sequences of similar length: one right-padded batched call
        src, dst = pad  # (B * L,) rows of q to gather, (T,) rows of the padded output to keep
        B, L = len(lengths), max(lengths)
        qb, kb, vb = (take_rows(t, src).view(B, L, t.shape[1], t.shape[2]) for t in (q, k, v))
        o = padded_attention(qb, kb, vb, scale).reshape(B * L, q.shape[1], q.shape[2])
        return take_rows(o, dst)
    # NOTE: torch.cat, not writes into slices of one output: the backward of B slice-writes zero-fills
    # and adds a full (T, Hq, D) gradient per sequence (O(B * T)); it took 2.4 of 4.7 s per tiny-model
    # step at 64 sequences on 2 CPU cores.
    outs = []
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        o = _sdpa(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None], True, scale)
        outs.append(o[0].transpose(0, 1))  # (n, Hq, D)
    return torch.cat(outs)


def shared_prefix_plan(lengths, prefix_of, device, flash: bool) -> dict:
    """Index tensors for shared_prefix_attention, made once per forward.

    lengths: tokens of each packed sequence; prefix_of[b]: the sequence whose tokens b's tokens
    continue (-1: none), which may continue another in turn. Sequence b then attends over keys
    [its ancestors' tokens, root first, its own tokens] with the causal diagonal aligned
    bottom-right: its query i sees keys j <= P + i, P its ancestors' tokens.
    """
    B = len(lengths)
    if len(prefix_of) != B:
        raise ValueError(f"AttnContext.prefix_of: need one entry per sequence ({B}), got {len(prefix_of)}")
    for b, a in enumerate(prefix_of):
        if a != -1 and not (0 <= a < B and a != b):
            raise ValueError(f"AttnContext.prefix_of[{b}] = {a}: must be -1 or the index of another sequence")
    ancestors = [_ancestors(prefix_of, b) for b in range(B)]
    klens = [lengths[b] + sum(lengths[a] for a in ancestors[b]) for b in range(B)]
    plan = {"lengths_k": klens, "ancestors": ancestors, "args": (list(lengths), list(prefix_of), device)}
    if flash:  # one varlen launch in bf16/fp16: k/v gathered per sequence as [ancestors' rows, own rows]
        rows = _rows_of(lengths)
        kidx = [r for b in range(B) for a in (*ancestors[b], b) for r in rows(a)]
        cu_k = torch.tensor([0] + klens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        plan.update(kidx=torch.tensor(kidx, device=device), cu_k=cu_k.to(device), max_k=max(klens))
    else:  # the SDPA part now; with flash-attn only if a layer does not take the flash path (fp32)
        _sdpa_part(plan)
    return plan


def _ancestors(prefix_of, b) -> list[int]:
    """The chain of sequences b continues, root first; a cycle is an error."""
    chain, a = [], prefix_of[b]
    while a != -1:
        if a == b or a in chain:
            raise ValueError(f"AttnContext.prefix_of: sequence {b}'s prefixes form a cycle")
        chain.append(a)
        a = prefix_of[a]
    return chain[::-1]


def _rows_of(lengths):
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    return lambda b: range(starts[b], starts[b] + lengths[b])


def _sdpa_part(plan: dict) -> None:
    """SDPA (CPU, fp32, or no flash-attn): the roots as plain causal sequences, then the continuations
    in padded batched calls. Fills plan["roots"], ["roots_pad"], ["inv"], ["conts"]."""
    lengths, prefix_of, device = plan["args"]
    klens, rows, B = plan["lengths_k"], _rows_of(lengths), len(lengths)
    conts = [b for b in range(B) if prefix_of[b] != -1]
    roots = [b for b in range(B) if prefix_of[b] == -1]
    cost = lambda cs: sum(lengths[c] * klens[c] for c in cs)  # noqa: E731  attention work without padding
    padded = lambda cs: len(cs) * max(lengths[c] for c in cs) * max(klens[c] for c in cs)  # noqa: E731
    if conts and padded(conts) > 2 * cost(conts):  # ragged: by length, so that batched calls pad little
        conts = sorted(conts, key=lambda b: (klens[b], lengths[b]))
    root_rows = [r for b in roots for r in rows(b)]
    cont_rows = [r for b in conts for r in rows(b)]
    order = root_rows + cont_rows
    R = len(root_rows)
    root_lengths = [lengths[b] for b in roots]
    T = sum(lengths)
    plan["roots"] = (slice(0, R) if root_rows == list(range(R)) else Rows(torch.tensor(root_rows, device=device), T),
                     root_lengths, torch.tensor([0] + root_lengths).cumsum(0).to(device, torch.int32),
                     max(root_lengths, default=0))
    plan["roots_pad"] = pad_plan(plan["roots"][1], device)
    plan["inv"] = None if order == list(range(len(order))) else Rows(torch.tensor(order, device=device).argsort(), T)
    # Continuations: right-padded batched SDPA calls of at most MASK_BUDGET mask entries and at most 2x
    # the unpadded attention work, each query row i of sequence b at key position P_b + i. Pad query
    # rows repeat row 0 and see every real key.
    chunks, cur, lq, lk, work = [], [], 0, 0, 0
    for b in conts:
        nq, nk, nw = max(lq, lengths[b]), max(lk, klens[b]), work + lengths[b] * klens[b]
        size = (len(cur) + 1) * nq * nk
        if cur and (size > MASK_BUDGET or size > 2 * nw):
            chunks.append(cur)
            cur, nq, nk, nw = [], lengths[b], klens[b], lengths[b] * klens[b]
        cur.append(b)
        lq, lk, work = nq, nk, nw
    if cur:
        chunks.append(cur)
    plan["conts"] = []
    for chunk in chunks:
        Bc, Lq, Lk = len(chunk), max(lengths[b] for b in chunk), max(klens[b] for b in chunk)
        qsrc, ksrc = [], []
        off, klen = [], []  # per row of the chunk: its ancestors' keys, all its keys (padded_attention)
        for b in chunk:
            own, pre = list(rows(b)), [r for a in plan["ancestors"][b] for r in rows(a)]
            qsrc += own + [own[0]] * (Lq - len(own))
            keys = pre + own
            ksrc += keys + [keys[0]] * (Lk - len(keys))
            off.append(len(pre))  # query row i sits at key position off + i
            klen.append(len(keys))
        dst = torch.cat([torch.arange(lengths[b]) + i * Lq for i, b in enumerate(chunk)])
        plan["conts"].append((Rows(torch.tensor(qsrc, device=device), T), Rows(torch.tensor(ksrc, device=device), T),
                              torch.tensor(off), Rows(dst.to(device), Bc * Lq), torch.tensor(klen), Bc, Lq, Lk))


def shared_prefix_attention(q, k, v, cu_seqlens, max_seqlen, lengths, scale, plan):
    """q (T, Hq, D), k/v (T, Hkv, D) packed with shared prefixes (shared_prefix_plan) -> (T, Hq, D)."""
    flash = _flash_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if flash is not None and "kidx" in plan:
        # flash-attn >= 2.1 aligns the causal mask bottom-right when seqlen_q < seqlen_k, as wanted here
        kidx = plan["kidx"]
        return flash(q, k[kidx], v[kidx], cu_seqlens, plan["cu_k"], max_seqlen, plan["max_k"],
                     softmax_scale=scale, causal=True)
    if "roots" not in plan:  # planned for flash-attn, but this layer runs SDPA (e.g. fp32 on CUDA)
        _sdpa_part(plan)
    sel, root_lengths, root_cu, root_max = plan["roots"]
    outs = []
    if root_lengths:
        outs.append(varlen_attention(take_rows(q, sel), take_rows(k, sel), take_rows(v, sel), root_cu, root_max,
                                     root_lengths, scale, plan["roots_pad"]))
    Hq, D = q.shape[1], q.shape[2]
    for qsrc, ksrc, off, dst, klen, Bc, Lq, Lk in plan["conts"]:
        qb = take_rows(q, qsrc).view(Bc, Lq, Hq, D)
        kb, vb = (take_rows(t, ksrc).view(Bc, Lk, t.shape[1], D) for t in (k, v))
        o = padded_attention(qb, kb, vb, scale, off, klen).reshape(Bc * Lq, Hq, D)
        outs.append(take_rows(o, dst))
    o = torch.cat(outs) if len(outs) > 1 else outs[0]
    return o if plan["inv"] is None else take_rows(o, plan["inv"])


def _gather_cache(cache, table, n):
    """cache (num_blocks, bs, Hkv, D), table (max_blocks,) -> the first n tokens (n, Hkv, D)"""
    bs = cache.shape[1]
    nblk = (n + bs - 1) // bs
    return cache[table[:nblk].long()].reshape(nblk * bs, *cache.shape[2:])[:n]


def _cache_rows(tables, ctx_lens, bs):
    """Flat cache rows (sum(ctx_lens),) of every sequence's first ctx_lens[b] positions, in order."""
    dev = tables.device
    lens = torch.tensor(ctx_lens, device=dev)
    seq = torch.repeat_interleave(torch.arange(len(ctx_lens), device=dev), lens)
    j = torch.arange(int(lens.sum()), device=dev) - (lens.cumsum(0) - lens)[seq]
    return tables[seq, j // bs].long() * bs + j % bs


def prefix_prefill_attention(q, k_cache, v_cache, ctx, lengths, ctx_lens, scale, plan=None):
    """Prefill where part of each sequence is already cached: q (T, Hq, D) of the new tokens; the
    keys of sequence b are the first ctx_lens[b] positions in the cache (its new ones written).

    flash-attn: one varlen call over the gathered keys (causal aligned bottom-right). SDPA: one
    right-padded batched call while padding at most doubles the work (an engine prefill after a
    cached common prefix: every sequence a few blocks of new tokens), else one call per sequence.
    plan: a dict shared by the layers of one forward; the index tensors are made at the first layer."""
    plan = {} if plan is None else plan
    B, bs = len(lengths), k_cache.shape[1]
    Lq, Lk = max(lengths), max(ctx_lens)
    kc, vc = k_cache.reshape(-1, *k_cache.shape[2:]), v_cache.reshape(-1, *v_cache.shape[2:])
    flash = _flash_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if flash is not None:
        if "flash" not in plan:
            cu_k = torch.tensor([0] + list(ctx_lens), device=q.device).cumsum(0, dtype=torch.int32)
            plan["flash"] = (_cache_rows(ctx.block_tables, ctx_lens, bs), cu_k)
        rows, cu_k = plan["flash"]
        return flash(q, kc[rows].to(q.dtype), vc[rows].to(q.dtype), ctx.cu_seqlens, cu_k, Lq, Lk,
                     softmax_scale=scale, causal=True)
    work = sum(n * c for n, c in zip(lengths, ctx_lens))
    if B > 1 and B * Lq * Lk <= min(2 * work, MASK_BUDGET):
        if "padded" not in plan:
            plan["padded"] = _padded_prefix_plan(ctx.block_tables, lengths, ctx_lens, bs)
        qsrc, ksrc, mask, keep = plan["padded"]
        Hq, D = q.shape[1], q.shape[2]
        qb = q[qsrc].view(B, Lq, Hq, D).transpose(1, 2)
        kb, vb = (t[ksrc].to(q.dtype).view(B, Lk, t.shape[1], D).transpose(1, 2) for t in (kc, vc))
        o = _sdpa(qb, kb, vb, False, scale, mask).transpose(1, 2)  # (B, Lq, Hq, D)
        return o.reshape(B * Lq, Hq, D)[keep]
    outs = []
    start = 0
    for b, (n, c) in enumerate(zip(lengths, ctx_lens)):
        kb = _gather_cache(k_cache, ctx.block_tables[b], c).to(q.dtype)  # (c, Hkv, D)
        vb = _gather_cache(v_cache, ctx.block_tables[b], c).to(q.dtype)
        # query i sits at absolute position c - n + i and sees keys 0 .. c - n + i
        mask = torch.arange(c, device=q.device)[None, :] <= (c - n + torch.arange(n, device=q.device))[:, None]
        o = _sdpa(q[start:start + n].transpose(0, 1)[None], kb.transpose(0, 1)[None], vb.transpose(0, 1)[None],
                  False, scale, mask[None, None])
        outs.append(o[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


def _padded_prefix_plan(tables, lengths, ctx_lens, bs):
    """Indices of the right-padded prefill call: query rows (B*Lq,), cache rows of the keys (B*Lk,),
    the mask (B, 1, Lq, Lk) and the real output rows (B*Lq,) bool."""
    dev = tables.device
    n_t, c_t = torch.tensor(lengths, device=dev), torch.tensor(ctx_lens, device=dev)
    i, j = torch.arange(max(lengths), device=dev), torch.arange(max(ctx_lens), device=dev)
    starts = n_t.cumsum(0) - n_t
    qsrc = starts[:, None] + torch.minimum(i[None, :], n_t[:, None] - 1)  # (B, Lq): pad rows repeat the last
    # key rows past a sequence's context read its last one (masked): the CPU cache is not zeroed,
    # and a never-written slot can hold NaN, which a mask does not remove (NaN * 0 = NaN)
    pos_k = torch.minimum(j[None, :], c_t[:, None] - 1)  # (B, Lk)
    ksrc = tables.gather(1, pos_k // bs).long() * bs + pos_k % bs
    # query i of sequence b sits at position c - n + i and sees keys 0 .. c - n + i (pad rows: all)
    mask = (j[None, None, :] <= (c_t - n_t)[:, None, None] + i[None, :, None]) & (j[None, None, :] < c_t[:, None, None])
    keep = i[None, :] < n_t[:, None]
    return qsrc.reshape(-1), ksrc.reshape(-1), mask[:, None], keep.reshape(-1)


def paged_ops():
    from reasonrl.ops.paged import paged_attention_decode, store_kv
    return store_kv, paged_attention_decode
