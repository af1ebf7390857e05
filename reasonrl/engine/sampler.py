"""Next-token sampling with a random stream per sequence.

Rows with temperature 0 take the argmax. The others sample from softmax(logits / T) after the
filters: top-k (keep the k largest), top-p (the smallest set whose mass reaches p, by descending
probability), min-p (drop p < min_p * p_max). Sampling is inverse-CDF with ONE uniform per row,
drawn on the CPU from that sequence's own torch.Generator: a seeded sequence draws the same
numbers whatever else is in the batch and whatever the device (on CUDA, batches where every row
samples without filters take kernels/sample.py, whose sums run in another order than this module's:
a draw within float rounding of a CDF step can then give the neighbouring token, so a seeded
sequence's tokens can depend on whether its batch takes that path). Every decode step draws one number
per running sequence (greedy and forced rows too), so draw j of a sequence belongs to its step j
however the steps are grouped into windows.

Returned log-probs: log_softmax(logits / T)[token] of the UNFILTERED temperature-scaled
distribution (T = 1 for greedy rows), which is what the training path computes for the same
tokens at the same temperature (reasonrl.ops.token_logprobs(logits, ids, temperature=T)).
Forced tokens (thinking control) get their log-prob under the same distribution.
Host-side flags (any row sampling, any filter) come from the parameters, so the only device sync
per step is the final copy of tokens and log-probs to the host.
"""
from __future__ import annotations

import os

import torch


def _filter(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor):
    """Zero what the filters drop; returns (sorted probs (B, V), their token ids (B, V))."""
    sp, idx = probs.sort(dim=-1, descending=True)  # (B, V)
    V = probs.shape[-1]
    rank = torch.arange(V, device=probs.device)[None, :]
    drop = rank >= torch.where(top_k > 0, top_k, V)[:, None]
    before = sp.cumsum(-1) - sp  # mass strictly above each token
    drop |= before >= top_p[:, None]  # keeps the token that crosses p
    drop |= sp < min_p[:, None] * sp[:, :1]
    drop[:, 0] = False  # always rank 0: a top_p of 1e-46 is 0 in float32 and dropped every token
    return sp.masked_fill(drop, 0.0), idx


def _inverse_cdf_flat(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= x < cdf[i], x = u * total; never an index of zero probability."""
    cdf = probs.cumsum(-1)  # (B, V)
    total = cdf[:, -1]
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # x < total: i < V
    # clamped: a NaN row (a diverged model) gives an index in range and a NaN log-prob, which the engine
    # reports, instead of an index error from the gather that follows
    return torch.searchsorted(cdf, x.unsqueeze(1), right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The same draw, two-level for large vocabularies: a cumsum over chunk sums picks the chunk, a
    cumsum inside that chunk picks the token. NOTE: a full cumsum over (64, 151936) float32 logits took
    242 us per step on an H200 (7% of a decode step); chunk sums are one reduction pass."""
    B, V = probs.shape
    if V <= 8 * chunk:
        return _inverse_cdf_flat(probs, u)
    n = (V + chunk - 1) // chunk
    blocks = torch.nn.functional.pad(probs, (0, n * chunk - V)).view(B, n, chunk)  # (B, n, C)
    sums = blocks.sum(-1)  # (B, n)
    csum = sums.cumsum(-1)
    total = csum[:, -1]
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    c = torch.searchsorted(csum, x.unsqueeze(1), right=True).clamp_(max=n - 1)  # (B, 1): csum[c] > x
    prev = torch.where(c > 0, csum.gather(1, (c - 1).clamp(min=0)), torch.zeros_like(x.unsqueeze(1)))
    inner = blocks.gather(1, c.unsqueeze(2).expand(B, 1, chunk)).squeeze(1).cumsum(-1)  # (B, C)
    rem = torch.minimum(x.unsqueeze(1) - prev, torch.nextafter(inner[:, -1:], torch.zeros_like(prev)))
    i = torch.searchsorted(inner, rem.clamp_(min=0), right=True).clamp_(max=chunk - 1)  # NaN rows: see above
    return (c * chunk + i).squeeze(1).clamp_(max=V - 1)


class Sampler:
    # kernels/sample.py for batches where every row samples without filters or forced tokens, given
    # their uniforms: "auto" on CUDA (2 launches for the ~12 full passes below), True also elsewhere
    # (tests, through the Triton interpreter), False never. It draws from the same distribution with the
    # same uniforms, but its sums run in another order: a draw within rounding of a CDF step can give
    # the neighbouring token, so every step of an engine takes the same path for the same batch kind.
    # REASONRL_SAMPLE_KERNEL=0 turns it off (1: on wherever Triton runs).
    kernel = {"0": False, "1": True}.get(os.environ.get("REASONRL_SAMPLE_KERNEL", "auto"), "auto")

    def _use_kernel(self, logits, u, forced, any_sample, any_filter, any_greedy) -> bool:
        if self.kernel is False or u is None or forced is not None or not any_sample or any_filter or any_greedy:
            return False
        if self.kernel == "auto" and logits.device.type != "cuda":
            return False
        from reasonrl.ops._backend import triton_importable, triton_interpret
        return triton_importable() and (logits.device.type == "cuda") != triton_interpret()

    def __call__(self, logits, temperatures, top_k, top_p, min_p, generators=None, forced=None, *,
                 any_sample=True, any_filter=True, any_greedy=True, u=None):
        """logits (B, V); temperatures/top_p/min_p (B,) float32, top_k (B,) int64, forced (B,) int64
        (-1 = sample), all on logits' device; generators: B CPU torch.Generators, or u (B,) their
        next draws (the engine takes them from each sequence's stream, several steps at once).
        any_sample / any_filter / any_greedy: host-side facts about the rows (False skips that work).
        -> tokens (B,) int64, logprobs (B,) float32."""
        if self._use_kernel(logits, u, forced, any_sample, any_filter, any_greedy):
            from reasonrl.kernels.sample import sample_rows
            return sample_rows(logits, temperatures, u)
        logits = logits.float()
        greedy = temperatures == 0
        t = torch.where(greedy, torch.ones_like(temperatures), temperatures)
        # NOTE: log_softmax is one fused op; logsumexp then (z - lse).exp_() took 2x its time (64 x 85, CPU)
        lsm = torch.log_softmax(logits / t[:, None], dim=-1)  # (B, V)
        tokens = logits.argmax(-1) if any_greedy or not any_sample else None
        if any_sample:
            if u is None:
                u = torch.stack([torch.rand((), generator=g) for g in generators])
            u = u.to(logits.device, non_blocking=True)
            probs = lsm.exp()
            if any_filter:
                sp, idx = _filter(probs, top_k, top_p, min_p)
                drawn = idx.gather(1, _inverse_cdf(sp, u)[:, None]).squeeze(1)
            else:
                drawn = _inverse_cdf(probs, u)
            tokens = torch.where(greedy, tokens, drawn) if any_greedy else drawn
        if forced is not None:
            tokens = torch.where(forced >= 0, forced, tokens)
        return tokens, lsm.gather(1, tokens[:, None]).squeeze(1)
