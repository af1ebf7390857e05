"""GRPO loss with group advantages computed inside the op (DeepSeekMath / DeepSeek-R1 GRPO, DAPO,
Dr. GRPO, GSPO, RLOO variants).

Notation. B completions of length T, in groups of G adjacent samples of one prompt (B % G == 0).
logp[b,t] = log pi_theta(o_bt | q, o_b<t) at temperature tau (logits / tau); m[b,t] the completion
mask; r[b] the raw reward; old[b,t] the sampling policy's log-probs (absent: old = sg(logp), ratio 1,
gradient that of the on-policy objective); ref[b,t] the reference policy's log-probs.

Advantages (per group g = b // G; r_g = the G rewards of the group; detached, no gradient):
  "grpo"    A_b = (r_b - mean(r_g)) / (std(r_g) + std_eps)      std unbiased (Bessel), as TRL's
                                                                 torch.std; G == 1 is an error
  "dr_grpo" A_b = r_b - mean(r_g)                               (Dr. GRPO: no std scaling)
  "rloo"    A_b = r_b - (sum(r_g) - r_b) / (G - 1)              (leave-one-out; G == 1 an error)
  A group whose rewards are all equal gets A = 0 exactly (mean(r_g) of equal floats is not always
  exactly r_b, and (r_b - mean) / eps would otherwise be noise of order 1e-12 / 1e-4).

Importance ratio, with the log-ratio clamped to [-C, C], C = config.log_ratio_clamp (20: exp(20) =
4.9e8 stays finite in float32; torch.clamp's gradient, 1 inside the closed interval, 0 outside):
  token     lr[b,t] = clamp(logp - old, -C, C);  rho[b,t] = exp(lr[b,t])
  sequence  (GSPO) s_b = sum_t m lr / max(sum_t m, 1);  rho[b,t] = exp(s_b) for every t of row b;
            the gradient flows to every token of the row through s_b.

Per-token loss (PPO clipped surrogate, clip-higher of DAPO, optional dual clip of Ye et al. 2020):
  pg = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))
  dual clip c (> 1), only where A < 0:  pg = min(pg, -c A)
  k3 KL (Schulman): d = clamp(ref - logp, -C, C);  kl = exp(d) - d - 1   (beta == 0: ref never read)
  l[b,t] = pg + beta kl - entropy_coef H[b,t]       H = entropy of pi_theta(. | ...) at temperature tau

Aggregation (TRL GRPOTrainer's loss_type, docs of trl >= 0.20; S = sum_{b,t} m l):
  "grpo"    (1/B) sum_b [ sum_t m l / max(sum_t m, 1) ]        mean of per-sequence token means
  "bnpo"    S / max(sum_{b,t} m, 1)                              token mean over this (local) batch
  "dapo"    S / num_items_in_batch, where num_items_in_batch is the number of active tokens in the
            global accumulated batch (all micro-batches and ranks); when not given, this batch's
            max(sum m, 1), i.e. the same as "bnpo" for one micro-batch on one rank
  "dr_grpo" S / (B * L), L = config.max_completion_length (default: T)
A row with no unmasked token contributes nothing to S (and counts in B for "grpo" and "dr_grpo").

Metrics (detached 0-dim float32 tensors), token means are over unmasked tokens of the batch:
  kl (mean k3 KL; 0 when beta == 0, as ref is not read), clip_frac_low (rho < 1 - eps_low and A < 0),
  clip_frac_high (rho > 1 + eps_high and A > 0), entropy (mean H; only when entropy is computed),
  advantage_mean (mean of A over the B rows), zero_std_frac (fraction of groups with equal rewards),
  num_tokens (sum m).

The fast backends split the op in two: log-probs (and entropies) from reasonrl.ops.logprobs (logits,
optionally with an in-place backward; or hidden + LM-head weight without ever materializing N x V),
then one per-row GRPO kernel (kernels/grpo.py, csrc/cpu/grpo.cpp, csrc/cuda/grpo.cu) that owns a
whole completion, so that GSPO's sequence ratio and the per-sequence aggregation need no second
launch. The logits form with grad and a token-level ratio (config.logits_single_pass, C++ and CUDA)
writes each row's gradient as soon as its log-prob is known (LogitsGRPOLossFunction): the logits are
read once from memory instead of twice. The fused form with grad (config.linear_single_pass) goes
further: a token's gradient
depends only on its own sequence and the row weights only on the mask, so one pass over chunks of
whole sequences computes logits, loss and the gradients to hidden and weight (6NHV FLOPs instead of
the 8NHV of a forward plus a backward that recomputes the logits; backward only scales them).
NOTE (CPU, 2 shared cores, N=1024 H=512 V=32000 fp32, one run of benchmarks/bench_grpo.py):
fwd+bwd 1.83 s single pass, 2.29 s two passes, 2.34 s eager TRL-style, 1.82 s torch.compile of it. The reference below is an independent transcription of
the formulas above in plain PyTorch (float64 capable), on whole (B, T) tensors: the ground truth.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import torch

from reasonrl.ops._backend import autocast_operands, first_order_only, no_autocast
from reasonrl.ops.logprobs import check_temperature, entropy_of

ADVANTAGES = ("grpo", "dr_grpo", "rloo")
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
IMPORTANCE_LEVELS = ("token", "sequence")
METRIC_KEYS = ("kl", "clip_frac_low", "clip_frac_high", "entropy", "advantage_mean", "zero_std_frac",
               "num_tokens")


@dataclass(frozen=True)
class GRPOLossConfig:
    """Options of grpo_loss; the defaults follow TRL's GRPOConfig (beta 0, epsilon 0.2, loss "dapo")."""
    advantage: str = "grpo"                  # "grpo" | "dr_grpo" | "rloo"
    std_eps: float = 1e-4                    # added to the group std ("grpo" advantages)
    epsilon_low: float = 0.2                 # ratio clipped below at 1 - epsilon_low
    epsilon_high: float = 0.2                # ... and above at 1 + epsilon_high (DAPO: 0.28)
    dual_clip: float | None = None           # c > 1: for A < 0 the loss is capped at -c A
    beta: float = 0.0                        # k3 KL coefficient; 0 never reads ref_logprobs
    importance_sampling: str = "token"       # "token" | "sequence" (GSPO)
    loss_type: str = "dapo"                  # "dapo" | "grpo" | "bnpo" | "dr_grpo"
    max_completion_length: int | None = None  # L of "dr_grpo" (default: T of the batch)
    entropy_coef: float = 0.0                # loss -= entropy_coef * H (entropy bonus)
    compute_entropy: bool = True             # entropy metric even when entropy_coef == 0
    log_ratio_clamp: float = 20.0            # C: log-ratios clamped to [-C, C]
    inplace_backward: bool = False           # logits form: the logits' grad overwrites the logits
                                             # (with logits_single_pass: already in the forward)
    logits_single_pass: bool = True          # logits form, token-level ratio, C++ / CUDA backends,
                                             # float32 / bfloat16: the gradient written by the
                                             # forward's pass over each row (read, reread from cache,
                                             # write: one read of the logits less); backward only
                                             # scales it, once (no retain_graph double backward)
    linear_single_pass: bool = True          # fused form: gradients in the forward pass (6NHV FLOPs);
                                             # False: linear_token_logprobs' backward recomputes (8NHV)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"GRPOLossConfig.{name}: {why}, got {getattr(self, name)!r}")

        def wrong_type(name, what):
            v = getattr(self, name)
            raise TypeError(f"GRPOLossConfig.{name}: must be {what}, got {v!r} ({type(v).__name__})")

        # Types and finiteness first, so that the range checks below compare numbers (a str would
        # raise a bare TypeError there, and inf / NaN would pass a one-sided bound).
        for name in ("std_eps", "epsilon_low", "epsilon_high", "dual_clip", "beta", "entropy_coef",
                     "log_ratio_clamp"):
            v = getattr(self, name)
            if v is None and name == "dual_clip":
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                wrong_type(name, "a real number" + (" or None" if name == "dual_clip" else ""))
            if not math.isfinite(v):
                bad(name, "must be finite")
        v = self.max_completion_length
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
            wrong_type("max_completion_length", "None or an int")
        for name in ("compute_entropy", "inplace_backward", "linear_single_pass", "logits_single_pass"):
            if not isinstance(getattr(self, name), bool):
                wrong_type(name, "a bool")
        if self.advantage not in ADVANTAGES:
            bad("advantage", f"must be one of {ADVANTAGES}")
        if self.loss_type not in LOSS_TYPES:
            bad("loss_type", f"must be one of {LOSS_TYPES}")
        if self.importance_sampling not in IMPORTANCE_LEVELS:
            bad("importance_sampling", f"must be one of {IMPORTANCE_LEVELS}")
        if not self.std_eps >= 0:
            bad("std_eps", "must be >= 0")
        if not 0 <= self.epsilon_low < 1:
            bad("epsilon_low", "must be in [0, 1)")
        if not self.epsilon_high >= 0:
            bad("epsilon_high", "must be >= 0")
        if self.dual_clip is not None and not self.dual_clip > 1:
            bad("dual_clip", "must be None or > 1")
        if not self.beta >= 0:
            bad("beta", "must be >= 0")
        if self.max_completion_length is not None and not self.max_completion_length >= 1:
            bad("max_completion_length", "must be None or >= 1")
        if not self.log_ratio_clamp > 0:
            bad("log_ratio_clamp", "must be > 0")

    @property
    def needs_entropy(self) -> bool:
        return self.compute_entropy or self.entropy_coef != 0


# ---- argument checks shared by every backend ----------------------------------------------------

def _check_bt(name, t, B, T, op="grpo_loss"):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != (B, T):
        raise ValueError(f"{op}: {name} must have shape (B, T) = ({B}, {T}) like ids, got {tuple(t.shape)}")


def check_inputs(logits, hidden, weight, ids, mask, rewards, group_size, old_logprobs, ref_logprobs,
                 temperature, config, num_items_in_batch=None, defer=False):
    """Validate the arguments of grpo_loss; returns (B, T, G), and with defer=True (B, T, G, finish):
    the value checks (and the ids' range) are then enqueued only, and finish() makes their one host
    sync and raises. Raises naming the argument."""
    op = "grpo_loss"
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"{op}: ids must be a (B, T) integer tensor, got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: ids must be int64 or int32, got {ids.dtype}")
    B, T = ids.shape
    if (logits is None) == (hidden is None and weight is None):
        raise ValueError(f"{op}: pass either logits (B, T, V) or hidden (B*T, H) with weight (V, H)")
    if logits is not None:
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (B, T):
            raise ValueError(f"{op}: logits must have shape (B, T, V) = ({B}, {T}, V) like ids, "
                             f"got {tuple(logits.shape)}")
        if not logits.is_floating_point():
            raise TypeError(f"{op}: logits must be floating point, got {logits.dtype}")
    else:
        if hidden is None or weight is None:
            raise ValueError(f"{op}: the fused form needs both hidden and weight")
        if hidden.dim() != 2 or hidden.shape[0] != B * T:
            raise ValueError(f"{op}: hidden must have shape (B*T, H) = ({B * T}, H), got {tuple(hidden.shape)}")
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
            raise ValueError(f"{op}: weight must have shape (V, H) with H = {hidden.shape[1]} as hidden, "
                             f"got {tuple(weight.shape)}")
    check_temperature(op, temperature)
    V = logits.shape[-1] if logits is not None else weight.shape[0]
    finish = check_grpo_args(op, B, T, mask, rewards, group_size, old_logprobs, ref_logprobs, config,
                             num_items_in_batch, ids_vocab=(ids, V), defer=defer)
    return (B, T, group_size, finish) if defer else (B, T, group_size)


def check_grpo_args(op, B, T, mask, rewards, group_size, old_logprobs, ref_logprobs, config,
                    num_items_in_batch, ids_vocab=None, defer=False):
    """The checks shared by grpo_loss and grpo_loss_from_logprobs (see _check_values for the
    value checks, ids_vocab and defer)."""
    if not isinstance(config, GRPOLossConfig):
        raise TypeError(f"{op}: config must be a GRPOLossConfig, got {type(config).__name__}")
    if mask is None:
        raise ValueError(f"{op}: mask (B, T) is required")
    _check_bt("mask", mask, B, T, op)
    _check_bt("old_logprobs", old_logprobs, B, T, op)
    if config.beta != 0:
        if ref_logprobs is None:
            raise ValueError(f"{op}: config.beta = {config.beta} needs ref_logprobs (B, T)")
        _check_bt("ref_logprobs", ref_logprobs, B, T, op)
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
    if not isinstance(rewards, torch.Tensor) or tuple(rewards.shape) != (B,):
        raise ValueError(f"{op}: rewards must be a (B,) = ({B},) tensor, one per completion, got "
                         f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"{op}: group_size must be a positive int, got {group_size!r}")
    if B % group_size != 0:
        raise ValueError(f"{op}: the batch B = {B} is not a multiple of group_size G = {group_size}")
    if group_size == 1 and config.advantage in ("grpo", "rloo"):
        raise ValueError(f"{op}: group_size 1 with advantage {config.advantage!r} is undefined "
                         f"(a group of one has no std / no leave-one-out mean); use G >= 2")
    if num_items_in_batch is not None:
        if config.loss_type != "dapo":
            raise ValueError(f"{op}: num_items_in_batch is only used by loss_type 'dapo', "
                             f"got loss_type {config.loss_type!r}")
        n = num_items_in_batch
        if isinstance(n, bool) or not (isinstance(n, numbers.Real) or (isinstance(n, torch.Tensor)
                                                                      and n.numel() == 1)):
            raise TypeError(f"{op}: num_items_in_batch must be a number (or a one-element tensor), "
                            f"got {type(n).__name__}")
        if not (math.isfinite(float(n)) and float(n) > 0):
            raise ValueError(f"{op}: num_items_in_batch must be a finite number > 0, got {n!r}")
    return _check_values(op, mask, rewards, old_logprobs, ref_logprobs if config.beta != 0 else None,
                         ids_vocab, defer)


def _check_values(op, mask, rewards, old_logprobs, ref_logprobs, ids_vocab=None, defer=False):
    """Value checks: one reduction per tensor and a single host sync for all of them (on GPU).
    A NaN reward would poison a whole group; a mask value other than 0 / 1 (NaN, -1, 0.5) would
    give NaN or negative token counts; a NaN / inf old or reference log-prob at an unmasked position
    would make the loss NaN. Masked positions are never read, so garbage there is fine.
    ids_vocab = (ids, V): also ids in [0, V) where the mask is on.
    defer=True returns finish(), which enqueues the reductions, makes the one sync and raises: called
    after the kernels are enqueued, its launches overlap the log-prob kernel instead of leaving the
    GPU idle while the host launches them (on an H200 the two syncs before the kernels had cost
    grpo_loss's forward 0.9 ms of its 2.2). On CUDA the reductions run on a high-priority side stream
    that waits only for the inputs (an event recorded here, before the kernels), and finish() waits
    only for them: the host goes on (to the backward, say) while the kernels still run, instead of
    idling the GPU through its own work after a sync on everything. Whatever the kernels made of
    bad values is dropped when finish() raises; they never read outside their inputs on bad ids (an
    out-of-range id gives NaN there)."""
    ready = None
    dev = rewards.device
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"{op}: its value checks read a result on the host, which CUDA graph capture "
                                   "does not allow; call it outside the captured region")
        if defer:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(dev))  # the inputs as they are now, before the kernels

    def flags_of():
        flags = {"rewards": ~torch.isfinite(rewards.detach().double()).all()}
        m = mask.detach()
        if m.dtype != torch.bool:
            flags["mask"] = ((m != 0) & (m != 1)).any()
        for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
            if t is not None:
                on = (m if m.device == t.device else m.to(t.device)) != 0
                flags[name] = (on & ~torch.isfinite(t.detach())).any()
        if ids_vocab is not None:
            ids, V = ids_vocab
            on = (m if m.device == ids.device else m.to(ids.device)) != 0
            flags["ids"] = (on & ((ids < 0) | (ids >= V))).any()
        return list(flags), torch.stack([f.to(dev) for f in flags.values()])

    def finish():
        if ready is None:
            names, flags = flags_of()
            values = flags.tolist()  # the one sync
        else:
            side = _check_stream(dev)
            with torch.cuda.device(dev), torch.cuda.stream(side):
                side.wait_event(ready)
                names, flags = flags_of()
                host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
                host.copy_(flags, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
            done.synchronize()  # the side stream's few reductions, not the kernels before them
            values = host.tolist()
        _raise_bad(op, dict(zip(names, values)), mask.detach(), old_logprobs, ref_logprobs, ids_vocab)

    if defer:
        return finish
    finish()
    return None


_CHECK_STREAMS = {}


def _check_stream(dev):
    """The high-priority side stream of the deferred value checks on CUDA device dev (one per device):
    their few small reductions get SMs ahead of the log-prob kernel's waiting blocks."""
    i = dev.index if dev.index is not None else torch.cuda.current_device()
    if i not in _CHECK_STREAMS:
        _CHECK_STREAMS[i] = torch.cuda.Stream(device=i, priority=-1)  # -1: high (0, the default: low)
    return _CHECK_STREAMS[i]


def _raise_bad(op, bad, m, old_logprobs, ref_logprobs, ids_vocab):
    if bad.get("mask"):
        wrong = m[(m != 0) & (m != 1)].flatten()[0].item()
        raise ValueError(f"{op}: mask must hold only 0 and 1 (or be a bool tensor), found {wrong}")
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if bad.get(name):
            at = ((m.to(t.device) != 0) & ~torch.isfinite(t.detach())).nonzero()[0].tolist()
            raise ValueError(f"{op}: {name} must be finite where mask is on, found "
                             f"{t[tuple(at)].item()} at (b, t) = {tuple(at)}")
    if bad["rewards"]:
        raise ValueError(f"{op}: rewards contain NaN or inf")
    if bad.get("ids"):
        ids, V = ids_vocab
        on = (m.to(ids.device) != 0) & ((ids < 0) | (ids >= V))
        at = on.nonzero()[0].tolist()
        raise IndexError(f"{op}: ids out of range [0, {V}) where mask is on: found {ids[tuple(at)].item()} "
                         f"at (b, t) = {tuple(at)}")


# ---- the reference ---------------------------------------------------------------------------------

def group_advantages_reference(rewards, group_size, config, dtype=None):
    """(A (B,), zero_std (B // G,) bool) per the docstring's formulas."""
    dtype = dtype or (torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    # statistics in float64, then dtype: rewards of 1e38 are finite in float32 but their std was inf (A = 0)
    r = rewards.detach().to(torch.float64).view(-1, group_size)  # (B/G, G)
    mean = r.mean(dim=1, keepdim=True)
    if config.advantage == "grpo":
        adv = (r - mean) / (r.std(dim=1, keepdim=True) + config.std_eps)
    elif config.advantage == "dr_grpo":
        adv = r - mean
    else:  # rloo
        adv = r - (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    zero_std = r.amax(dim=1) == r.amin(dim=1)  # (B/G,)
    adv = torch.where(zero_std[:, None], torch.zeros_like(adv), adv)
    return adv.reshape(-1).to(dtype), zero_std


def grpo_loss_reference(logits=None, *, hidden=None, weight=None, ids, mask, rewards, group_size,
                        old_logprobs=None, ref_logprobs=None, temperature=1.0,
                        config=GRPOLossConfig(), num_items_in_batch=None, dtype=None):
    """Plain PyTorch, whole tensors, autograd for gradients. Computes in `dtype` (default float64 for
    float64 inputs, else float32); materializes the (B, T, V) log-softmax. Returns (loss, metrics)."""
    check_inputs(logits, hidden, weight, ids, mask, rewards, group_size, old_logprobs, ref_logprobs,
                 temperature, config, num_items_in_batch)
    B, T = ids.shape
    src = logits if logits is not None else hidden
    dtype = dtype or (torch.float64 if src.dtype == torch.float64 else torch.float32)
    live = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=src.device)
    if logits is None:  # masked rows zeroed: a NaN hidden state there (padding) must not reach weight.grad
        h = torch.where(live.reshape(-1, 1), hidden.to(dtype), zero)
        logits = (h @ weight.to(dtype).t()).view(B, T, weight.shape[0])  # (B, T, V)
    else:  # as the other backends: a masked row's NaN or -inf logits give no NaN gradient
        logits = torch.where(live.unsqueeze(-1), logits.to(dtype), zero)
    V = logits.shape[-1]
    if ((ids[live] < 0) | (ids[live] >= V)).any():
        raise ValueError(f"grpo_loss: ids at unmasked positions must be in [0, V = {V})")
    safe_ids = torch.where(live, ids.long(), torch.zeros_like(ids, dtype=torch.long))
    logprobs_all = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)  # (B, T, V)
    logp = logprobs_all.gather(-1, safe_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    entropy = entropy_of(logprobs_all) if config.needs_entropy else None  # (B, T)
    return grpo_loss_from_logprobs_reference(logp, entropy, mask=mask, rewards=rewards,
                                             group_size=group_size, old_logprobs=old_logprobs,
                                             ref_logprobs=ref_logprobs, config=config,
                                             num_items_in_batch=num_items_in_batch)


def grpo_loss_from_logprobs_reference(logp, entropy=None, *, mask, rewards, group_size,
                                      old_logprobs=None, ref_logprobs=None, config=GRPOLossConfig(),
                                      num_items_in_batch=None):
    """The formulas of the module docstring on whole (B, T) tensors, in logp's dtype."""
    dtype = logp.dtype
    B, T = logp.shape
    m = mask.to(dtype)  # (B, T)
    live = m != 0

    def unread(x):  # masked positions are never read: garbage there (NaN, inf) changes nothing
        return None if x is None else torch.where(live, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))

    logp, entropy, old_logprobs, ref_logprobs = unread(logp), unread(entropy), unread(old_logprobs), unread(
        ref_logprobs if config.beta != 0 else None)
    C = config.log_ratio_clamp
    old = logp.detach() if old_logprobs is None else old_logprobs
    lr = torch.clamp(logp - old, -C, C)
    if config.importance_sampling == "sequence":
        s = (lr * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # (B,)
        ratio = torch.exp(s).unsqueeze(-1).expand(B, T)
    else:
        ratio = torch.exp(lr)

    adv, zero_std = group_advantages_reference(rewards, group_size, config, dtype)
    A = adv.unsqueeze(-1)  # (B, 1)
    clipped = torch.clamp(ratio, 1 - config.epsilon_low, 1 + config.epsilon_high)
    pg = torch.maximum(-A * ratio, -A * clipped)
    if config.dual_clip is not None:
        pg = torch.where(A < 0, torch.minimum(pg, -config.dual_clip * A), pg)
    per_token = pg
    if config.beta != 0:
        d = torch.clamp(ref_logprobs - logp, -C, C)
        kl = torch.expm1(d) - d  # exp(d) - d - 1 without the cancellation near d = 0
        per_token = per_token + config.beta * kl
    if entropy is not None and config.entropy_coef != 0:
        per_token = per_token - config.entropy_coef * entropy

    S = (per_token * m).sum()
    n_tok = m.sum()
    if config.loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif config.loss_type == "bnpo" or (config.loss_type == "dapo" and num_items_in_batch is None):
        loss = S / n_tok.clamp(min=1.0)
    elif config.loss_type == "dapo":
        loss = S / float(num_items_in_batch)
    else:  # dr_grpo
        loss = S / (B * (config.max_completion_length or T))

    def tok_mean(x):
        return ((x * m).sum() / n_tok.clamp(min=1.0)).detach().float()

    with torch.no_grad():
        metrics = {
            "kl": tok_mean(kl) if config.beta != 0 else torch.zeros((), device=m.device),
            "clip_frac_low": tok_mean(((ratio < 1 - config.epsilon_low) & (A < 0)).to(dtype)),
            "clip_frac_high": tok_mean(((ratio > 1 + config.epsilon_high) & (A > 0)).to(dtype)),
            "advantage_mean": adv.mean().float() if B else torch.zeros((), device=m.device),
            "zero_std_frac": zero_std.to(dtype).mean().float() if B else torch.zeros((), device=m.device),
            "num_tokens": n_tok.detach().float(),
        }
        if entropy is not None:
            metrics["entropy"] = tok_mean(entropy)
    return loss, metrics


# ---- kernels: one autograd Function over the per-row kernels -----------------------------------------

def _kernel_params(config, old, ref, G):
    return dict(old=old, ref=ref, advantage=config.advantage, std_eps=float(config.std_eps),
                eps_low=float(config.epsilon_low), eps_high=float(config.epsilon_high),
                dual_clip=float(config.dual_clip or 0.0), beta=float(config.beta),
                entropy_coef=float(config.entropy_coef), clamp=float(config.log_ratio_clamp),
                sequence=config.importance_sampling == "sequence", G=G)


_ADV_CODES = {"grpo": 0, "dr_grpo": 1, "rloo": 2}  # GRPOAdvantage in csrc/grpo.h


def _cpp_args(p):
    return (p["G"], _ADV_CODES[p["advantage"]], p["std_eps"], p["eps_low"], p["eps_high"], p["dual_clip"],
            p["beta"], p["entropy_coef"], p["clamp"], p["sequence"])


_FAKES_REGISTERED = False


def _register_fakes():
    """Shape functions of the compiled ops, so that torch.compile / opcheck can trace them."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return
    _FAKES_REGISTERED = True

    @torch.library.register_fake("reasonrl::grpo_fwd")
    def _fwd_fake(logp, old, ref, entropy, mask, rewards, group_size, advantage, std_eps, eps_low,
                  eps_high, dual_clip, beta, entropy_coef, clamp, sequence, row0=0):
        return logp.new_empty(logp.shape[0], 8)  # (B, 8)

    @torch.library.register_fake("reasonrl::grpo_logits")
    def _logits_fake(logits, grad, ids, rewards, scale, old, ref, group_size, advantage, std_eps, eps_low,
                     eps_high, dual_clip, beta, entropy_coef, clamp, sequence, temperature, with_entropy,
                     stage_bytes=-1):
        n = logits.shape[0] * logits.shape[1]
        f32 = dict(dtype=torch.float32, device=logits.device)
        return logits.new_empty(n, **f32), logits.new_empty(n if with_entropy or entropy_coef != 0 else 0, **f32)

    @torch.library.register_fake("reasonrl::grpo_logits_inplace")
    def _logits_inplace_fake(logits, ids, rewards, scale, old, ref, group_size, advantage, std_eps, eps_low,
                             eps_high, dual_clip, beta, entropy_coef, clamp, sequence, temperature, with_entropy,
                             stage_bytes=-1):
        return _logits_fake(logits, logits, ids, rewards, scale, old, ref, group_size, advantage, std_eps, eps_low,
                            eps_high, dual_clip, beta, entropy_coef, clamp, sequence, temperature, with_entropy)

    @torch.library.register_fake("reasonrl::grpo_bwd")
    def _bwd_fake(scale, logp, old, ref, mask, rewards, group_size, advantage, std_eps, eps_low,
                  eps_high, dual_clip, beta, entropy_coef, clamp, sequence, with_entropy, row0=0):
        return logp.new_empty(logp.shape), logp.new_empty(logp.shape if with_entropy else (0,))


def _fwd(backend, logp, entropy, mask, rewards, p, row0=0):
    """Per-row stats (B, 8) of rows [row0, row0 + B) of the batch that `rewards` covers."""
    if backend == "triton":
        from reasonrl.kernels.grpo import grpo_fwd
        return grpo_fwd(logp, entropy, mask, rewards, p["G"], p, row0)
    _register_fakes()
    return torch.ops.reasonrl.grpo_fwd(logp, p["old"], p["ref"], entropy, mask, rewards, *_cpp_args(p),
                                       row0)


def _bwd(backend, scale, logp, mask, rewards, p, with_entropy, row0=0):
    if backend == "triton":
        from reasonrl.kernels.grpo import grpo_bwd
        return grpo_bwd(scale, logp, mask, rewards, p["G"], p, with_entropy, row0)
    gl, ge = torch.ops.reasonrl.grpo_bwd(scale, logp, p["old"], p["ref"], mask, rewards, *_cpp_args(p),
                                         with_entropy, row0)
    return gl, (ge if with_entropy else None)


def _row_weights(msum, config, T, num_items_in_batch):
    """w_b with loss = sum_b w_b * (sum_t m l)_b, per the aggregation. msum (B,) float32."""
    B = msum.shape[0]
    if config.loss_type == "grpo":
        return 1.0 / (B * msum.clamp(min=1.0))
    if config.loss_type == "dr_grpo":
        return torch.full_like(msum, 1.0 / (B * (config.max_completion_length or T)))
    if config.loss_type == "dapo" and num_items_in_batch is not None:
        return torch.full_like(msum, 1.0 / float(num_items_in_batch))
    return (1.0 / msum.sum().clamp(min=1.0)).expand(B)


class GRPOLossFunction(torch.autograd.Function):
    """(logp, entropy) (B, T) float32 -> (loss, per-row stats (B, 8)); gradients to logp, entropy."""

    @staticmethod
    @no_autocast
    def forward(ctx, logp, entropy, mask, rewards, p, config, num_items_in_batch, backend):
        stats = _fwd(backend, logp, entropy, mask, rewards, p)  # (B, 8)
        w = _row_weights(stats[:, 1], config, logp.shape[1], num_items_in_batch)  # (B,)
        loss = (stats[:, 0] * w).sum()
        ctx.save_for_backward(logp, mask, rewards, w)
        ctx.cfg = (p, backend, entropy is not None and config.entropy_coef != 0)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @first_order_only
    @no_autocast
    def backward(ctx, grad_loss, grad_stats):
        logp, mask, rewards, w = ctx.saved_tensors
        p, backend, with_entropy = ctx.cfg
        scale = (grad_loss.float() * w).contiguous()  # (B,)
        gl, ge = _bwd(backend, scale, logp, mask, rewards, p, with_entropy and ctx.needs_input_grad[1])
        return gl, ge, None, None, None, None, None, None


class LinearGRPOLossFunction(torch.autograd.Function):
    """hidden (N, H), weight (V, H) -> (loss, per-row stats (B, 8)), gradients computed in forward.

    The loss is a scalar and a token's gradient depends only on its own sequence, so one pass over
    chunks of whole sequences does everything: z = h W^T (2NHV FLOPs), the row kernels' logp / lse
    / entropy, the GRPO row kernels' d loss / d logp, z overwritten by d loss / d z, then
    grad_h = dz W and grad_W += dz^T h (4NHV): 6NHV in all, where a forward plus a backward that
    recomputes the logits costs 8NHV. Backward only scales the stored gradients by the upstream
    gradient. One chunk of logits is alive at a time. grad_W accumulates across chunks in the
    weight's dtype (addmm: float32 inside each GEMM, one rounding per chunk in bf16).
    Masked-out rows (completions shorter than T) get no logits: each chunk gathers its unmasked rows
    first, and the masked ones keep log-prob 0 and a zero gradient, as the loss gives them.
    NOTE: SmolLM2's GRPO batch, completions of ~25 tokens padded to 48: half the LM-head GEMMs."""

    @staticmethod
    @no_autocast
    def forward(ctx, hidden, weight, ids, mask, rewards, p, config, num_items_in_batch, temperature,
                need_ent, chunk_bytes, backend):
        from reasonrl.ops.logprobs import _rows_bwd, _rows_fwd

        B, T = mask.shape
        V = weight.shape[0]
        inv_t = 1.0 / temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = _row_weights(mask.sum(1), config, T, num_items_in_batch)  # (B,): known before any logit
        ent_grad = need_ent and config.entropy_coef != 0
        stats = torch.empty(B, 8, dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        live = mask.reshape(-1) != 0
        rows_live = live.nonzero().squeeze(1)  # (n,) flat rows that have a loss
        ends = live.view(B, T).sum(1).cumsum(0).tolist()  # live rows before each sequence's end
        seqs = max(1, chunk_bytes // max(1, T * V * hidden.element_size()))
        for s0 in range(0, B, seqs):
            s1 = min(B, s0 + seqs)
            r0, r1 = s0 * T, s1 * T
            rows = rows_live[(ends[s0 - 1] if s0 else 0):ends[s1 - 1]]  # this chunk's live rows
            h = hidden[rows]
            z = h @ weight.T  # (live rows, V), the only logits alive
            lp_live, lse, ent_live = _rows_fwd(backend, z, ids[rows], inv_t, -100, need_ent)
            lp = hidden.new_zeros(r1 - r0, dtype=torch.float32).index_copy_(0, rows - r0, lp_live)
            ent = None if ent_live is None else torch.zeros_like(lp).index_copy_(0, rows - r0, ent_live)
            pc = {**p, "old": _rows(p["old"], s0, s1), "ref": _rows(p["ref"], s0, s1)}
            lp2 = lp.view(s1 - s0, T)
            ent2 = ent.view(s1 - s0, T) if ent is not None else None
            stats[s0:s1] = _fwd(backend, lp2, ent2, mask[s0:s1], rewards, pc, row0=s0)
            if not (need_h or need_w) or rows.numel() == 0:
                continue
            gl, ge = _bwd(backend, w[s0:s1].contiguous(), lp2, mask[s0:s1], rewards, pc, ent_grad, row0=s0)
            _rows_bwd(backend, z, z, ids[rows], lse, ent_live, gl.view(-1)[rows - r0].contiguous(),
                      ge.reshape(-1)[rows - r0].contiguous() if ge is not None else None, inv_t, -100)  # z := dz
            if need_h:
                grad_h.index_copy_(0, rows, z @ weight)
            if need_w:
                grad_w.addmm_(z.T, h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(stats)
        return (stats[:, 0] * w).sum(), stats

    @staticmethod
    @first_order_only
    @no_autocast
    def backward(ctx, grad_loss, grad_stats):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None, None, None, None


def _stage_bytes():
    """REASONRL_GRPO_STAGE_KB: how much of each row of logits the CUDA single-pass kernel keeps in
    shared memory between its two reads (unset: the whole row where it fits one block, else what
    lets two blocks share an SM, 112 KiB on an H200; 0: none, the second read from L2)."""
    kb = os.environ.get("REASONRL_GRPO_STAGE_KB", "").strip()
    if not kb:
        return -1
    try:
        v = int(kb)
    except ValueError:
        raise ValueError(f"REASONRL_GRPO_STAGE_KB must be an integer number of KiB, got {kb!r}") from None
    if v < 0:
        raise ValueError(f"REASONRL_GRPO_STAGE_KB must be >= 0, got {v}")
    return v * 1024


class LogitsGRPOLossFunction(torch.autograd.Function):
    """logits (B, T, V) -> (loss, per-row stats (B, 8)) for the token-level ratio, gradient in forward.

    A token's d loss / d logp depends only on its own log-prob (csrc/grpo.h, grpo_token_coefs) and
    each row's weight w_b only on the mask, so the compiled op reasonrl::grpo_logits reads each row of
    logits, makes its log-prob, entropy and coefficients, and writes the row's gradient while the row
    is still in cache: the logits are read once from memory and the gradient written once, where a
    forward kernel plus a backward kernel read them twice. The stats come from the per-row GRPO kernel
    over the log-probs, as in the two-pass path. Backward returns the stored gradient, scaled in place
    unless the upstream gradient is 1 (reasonrl::grpo_scale_grad_, no host sync on CUDA), once: a
    second backward of a graph kept with retain_graph=True raises (the buffer it handed out may be a
    leaf's .grad by then). inplace: the gradient is written over the logits themselves, during the
    forward (also when the deferred value checks then raise); their version counter is bumped, so that
    an op that saved them for its own backward raises there. float16 logits take the two-pass path:
    a gradient rounded to float16 at upstream 1 would underflow where a loss scaler scales it up."""

    @staticmethod
    @no_autocast
    def forward(ctx, logits, ids, mask, rewards, w, p, temperature, need_ent, inplace, backend):
        args = (ids, rewards, w, p["old"], p["ref"], *_cpp_args(p), float(temperature), need_ent, _stage_bytes())
        if inplace:
            grad = logits
            logp, ent = torch.ops.reasonrl.grpo_logits_inplace(logits, *args)
        else:
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            logp, ent = torch.ops.reasonrl.grpo_logits(logits, grad, *args)
        B, T = mask.shape
        lp2 = logp.view(B, T)
        ent2 = ent.view(B, T) if need_ent else None  # need_ent covers an entropy bonus
        stats = _fwd(backend, lp2, ent2, mask, rewards, p)  # (B, 8)
        if inplace:
            torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(grad)
        ctx.done = False
        ctx.mark_non_differentiable(stats)
        return (stats[:, 0] * w).sum(), stats

    @staticmethod
    @first_order_only
    @no_autocast
    def backward(ctx, grad_loss, grad_stats):
        if ctx.done:  # (before saved_tensors, whose version check would raise less clearly)
            raise RuntimeError("grpo_loss (logits_single_pass): this graph's logits gradient was handed out by "
                               "an earlier backward (it may be a leaf's .grad now, or scaled in place); use "
                               "GRPOLossConfig(logits_single_pass=False) to backward through it more than once")
        ctx.done = True
        (grad,) = ctx.saved_tensors
        # grad *= upstream unless it is 1 (the gradient then stays as the forward wrote it). On CUDA the
        # kernel reads the upstream value itself: the host does not wait to learn it (a sync here left
        # the GPU idle through the rest of the backward's host work: on the H200 fwd+bwd took 4.05 ms
        # around a 2.66 ms kernel)
        torch.ops.reasonrl.grpo_scale_grad_(grad, grad_loss.detach().float().reshape(1))
        torch.autograd.graph.increment_version(grad)  # (the op may have written it; the same on every device)
        # a new tensor object over the same memory: the saved one is still referenced here, so a leaf's
        # AccumulateGrad would copy it; this alias it takes as the leaf's .grad
        return grad.view(grad.shape), None, None, None, None, None, None, None, None, None


def _rows(t, s0, s1):
    return None if t is None else t[s0:s1]


def _metrics(stats, B, G):
    n = stats[:, 1].sum()
    d = n.clamp(min=1.0)
    zero = torch.zeros((), device=stats.device)
    return {
        "kl": stats[:, 2].sum() / d,
        "clip_frac_low": stats[:, 3].sum() / d,
        "clip_frac_high": stats[:, 4].sum() / d,
        "advantage_mean": stats[:, 6].mean() if B else zero,
        "zero_std_frac": stats[:, 7].mean() if B else zero,  # every group has G rows
        "num_tokens": n,
    }


def grpo_loss_from_logprobs(logp, entropy=None, *, mask, rewards, group_size, old_logprobs=None,
                            ref_logprobs=None, config=GRPOLossConfig(), num_items_in_batch=None,
                            backend="auto"):
    """The GRPO part alone, for log-probs computed elsewhere: logp (B, T) (with grad), entropy (B, T)
    or None (used for the entropy bonus and metric). Same outputs as grpo_loss."""
    from reasonrl.ops._backend import check_same_device, resolve

    op = "grpo_loss_from_logprobs"
    if not isinstance(config, GRPOLossConfig):
        raise TypeError(f"{op}: config must be a GRPOLossConfig, got {type(config).__name__}")
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2 or not logp.is_floating_point():
        raise ValueError(f"{op}: logp must be a floating (B, T) tensor")
    B, T = logp.shape
    _check_bt("entropy", entropy, B, T, op)
    # The device check comes before check_grpo_args, whose value checks combine these tensors.
    device = check_same_device(op, logp=logp, entropy=entropy, mask=mask, rewards=rewards,
                               old_logprobs=old_logprobs,
                               ref_logprobs=ref_logprobs if config.beta != 0 else None)
    check_grpo_args(op, B, T, mask, rewards, group_size, old_logprobs, ref_logprobs, config,
                    num_items_in_batch)
    b = resolve(backend, device, op)
    if b == "reference":
        return grpo_loss_from_logprobs_reference(
            logp, entropy, mask=mask, rewards=rewards, group_size=group_size, old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs, config=config, num_items_in_batch=num_items_in_batch)
    if logp.dtype == torch.float64:
        raise TypeError(f"{op}: float64 runs on backend='reference'; the kernels take float32")
    return _from_logprobs(b, logp, entropy, mask, rewards, group_size, old_logprobs, ref_logprobs,
                          config, num_items_in_batch)


def _from_logprobs(b, logp, entropy, mask, rewards, G, old_logprobs, ref_logprobs, config,
                   num_items_in_batch):
    B = logp.shape[0]
    p = _kernel_params(config, _f32(old_logprobs), _f32(ref_logprobs) if config.beta != 0 else None, G)
    lp = logp.float().contiguous()
    ent = entropy.float().contiguous() if entropy is not None else None
    loss, stats = GRPOLossFunction.apply(lp, ent, _f32(mask), _f32(rewards), p, config,
                                         num_items_in_batch, b)
    return loss, _all_metrics(stats, B, G, entropy is not None)


def _f32(t):
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _all_metrics(stats, B, G, with_entropy):
    with torch.no_grad():
        metrics = _metrics(stats, B, G)
        if with_entropy:
            metrics["entropy"] = stats[:, 5].sum() / stats[:, 1].sum().clamp(min=1.0)
    return metrics


def _single_pass_logits(backend, logits, config):
    """Whether grpo_loss takes LogitsGRPOLossFunction: the compiled backends, a gradient wanted, and a
    token-level ratio (GSPO's sequence ratio needs the whole row of tokens before any coefficient)."""
    from reasonrl.ops.logprobs import KERNEL_DTYPES

    # float16: the gradient is rounded to the logits' dtype at upstream 1; GradScaler's scale comes after
    # (measured: 83% of a V=32000 gradient's entries flushed to 0 at scale 65536; the two-pass path: 0.06%)
    return (config.logits_single_pass and backend in ("cpp", "cuda") and config.importance_sampling == "token"
            and torch.is_grad_enabled() and logits.requires_grad
            and logits.dtype in KERNEL_DTYPES and logits.dtype != torch.float16)


# ---- public op --------------------------------------------------------------------------------------

def grpo_loss(logits=None, *, hidden=None, weight=None, ids, mask, rewards, group_size,
              old_logprobs=None, ref_logprobs=None, temperature=1.0, config=GRPOLossConfig(),
              num_items_in_batch=None, backend="auto"):
    """GRPO loss from raw rewards: (loss 0-dim, metrics dict of detached 0-dim tensors).

    logits (B, T, V), or hidden (B*T, H) with the LM-head weight (V, H) (never materializes B*T x V);
    ids, mask (B, T); rewards (B,), groups of `group_size` adjacent completions; old_logprobs,
    ref_logprobs (B, T) or None; num_items_in_batch: "dapo"'s global active-token count (optional).
    The formulas are in this module's docstring.
    """
    from reasonrl.ops._backend import check_same_device, resolve

    if not isinstance(config, GRPOLossConfig):
        raise TypeError(f"grpo_loss: config must be a GRPOLossConfig, got {type(config).__name__}")
    device = check_same_device("grpo_loss", logits=logits, hidden=hidden, weight=weight, ids=ids,
                               mask=mask, rewards=rewards, old_logprobs=old_logprobs,
                               ref_logprobs=ref_logprobs if config.beta != 0 else None)
    from reasonrl.ops.logprobs import AUTO_ON_CUDA

    # "auto" on CUDA: the log-prob op family's order (its CUDA kernels are the measured ones, and they
    # are most of this op's time); resolve's default would have taken Triton for both parts.
    b = resolve(backend, device, "grpo_loss", prefer_cuda=AUTO_ON_CUDA)
    if hidden is not None and weight is not None:  # under torch.autocast: the LM head in its dtype
        hidden, weight = autocast_operands(hidden, weight)
    if b == "reference":
        return grpo_loss_reference(logits, hidden=hidden, weight=weight, ids=ids, mask=mask,
                                   rewards=rewards, group_size=group_size, old_logprobs=old_logprobs,
                                   ref_logprobs=ref_logprobs, temperature=temperature, config=config,
                                   num_items_in_batch=num_items_in_batch)
    # On CUDA the value and ids checks sync once, after the kernels are enqueued (see _check_values)
    B, T, G, finish = check_inputs(logits, hidden, weight, ids, mask, rewards, group_size, old_logprobs,
                                   ref_logprobs, temperature, config, num_items_in_batch, defer=True)
    if device.type != "cuda":
        finish()  # on the CPU the kernels run as they are called: check first, as before
        finish = None
    from reasonrl.ops.logprobs import linear_token_logprobs, token_logprobs

    need_ent = config.needs_entropy
    # Masked positions become ignore_index: the log-prob kernels skip them (zero logp, zero grad),
    # and whatever id padding carries there is never range-checked (finish checks where mask is on)
    # or gathered.
    ids_eff = torch.where(mask.bool(), ids.long(), torch.full_like(ids, -100, dtype=torch.long))
    if logits is None and config.linear_single_pass and torch.is_grad_enabled() and (
            hidden.requires_grad or weight.requires_grad):
        from reasonrl.ops.logprobs import KERNEL_DTYPES, _check_ids, _default_chunk_bytes

        if hidden.dtype != weight.dtype or hidden.dtype not in KERNEL_DTYPES:
            raise TypeError(f"grpo_loss: backend={b!r} takes hidden and weight of one dtype among "
                            f"{KERNEL_DTYPES}, got {hidden.dtype} and {weight.dtype}")
        _check_ids("grpo_loss", ids_eff, (B, T), weight.shape[0], -100, False)  # range: in finish
        p = _kernel_params(config, _f32(old_logprobs), _f32(ref_logprobs) if config.beta != 0 else None, G)
        loss, stats = LinearGRPOLossFunction.apply(
            hidden.contiguous(), weight, ids_eff.view(-1), _f32(mask), _f32(rewards), p, config,
            num_items_in_batch, float(temperature), need_ent, _default_chunk_bytes(hidden.device), b)
        result = loss, _all_metrics(stats, B, G, need_ent)
    elif logits is not None and _single_pass_logits(b, logits, config):
        from reasonrl.ops.logprobs import check_inplace_rows

        x = logits if logits.stride(-1) == 1 else logits.contiguous()
        if config.inplace_backward:
            check_inplace_rows("grpo_loss", x, logits)
        p = _kernel_params(config, _f32(old_logprobs), _f32(ref_logprobs) if config.beta != 0 else None, G)
        m32 = _f32(mask)
        w = _row_weights(m32.sum(1), config, T, num_items_in_batch).contiguous()  # (B,): from the mask alone
        loss, stats = LogitsGRPOLossFunction.apply(x, ids_eff.reshape(-1).contiguous(), m32, _f32(rewards), w, p,
                                                   float(temperature), need_ent, config.inplace_backward, b)
        result = loss, _all_metrics(stats, B, G, need_ent)
    else:
        # the ids' range is part of the value checks (finish), not token_logprobs' own sync
        if logits is not None:
            out = token_logprobs(logits, ids_eff, temperature, ignore_index=-100, return_entropy=need_ent,
                                 inplace_backward=config.inplace_backward, check_ids=False, backend=b)
        else:
            out = linear_token_logprobs(hidden, weight, ids_eff.view(-1), temperature, ignore_index=-100,
                                        return_entropy=need_ent, check_ids=False, backend=b)  # (B*T,)
        logp, ent = out if need_ent else (out, None)
        result = _from_logprobs(b, logp.view(B, T), ent.view(B, T) if ent is not None else None, mask,
                                rewards, G, old_logprobs, ref_logprobs, config, num_items_in_batch)
    if finish is not None:
        finish()
    return result
