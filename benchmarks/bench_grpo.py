"""Benchmark of reasonrl.ops.grpo_loss, fwd and fwd+bwd, beside what a user would otherwise run:
eager PyTorch written as TRL's GRPOTrainer computes it, torch.compile of that, and Liger-Kernel's
triton_grpo_loss / LigerFusedLinearGRPOLoss where installed.

    python benchmarks/bench_grpo.py                 # CPU-sized shapes (B=8, T=256, V=32000 fp32, ...)
    python benchmarks/bench_grpo.py --gpu           # the GPU anchors of shared/design/GPU.md
    python benchmarks/bench_grpo.py --json out.json # also write the rows there

Two forms: from logits (B, T, V), and fused with the LM head (hidden (N, H), weight (V, H)).
Floors are counted in this run: the logits form moves 3 x the logits' bytes (forward reads them,
backward reads them and writes the gradient), over the copy bandwidth measured here (the single pass
of the C++ / CUDA backends, the default for a token-level ratio, needs 2 x: its second read of a row
comes from cache; "-2pass" rows time the forward and backward kernels it replaces); the fused
form needs 6NHV FLOPs (logits, grad hidden, grad weight) for its N live rows (completions are T/2
to T long: masked rows need no logits), over the matmul rate measured here.
Peak memory is the peak above what was allocated before the call (CUDA allocator stats on GPU,
the process's peak RSS, reset through /proc/self/clear_refs, on CPU). The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from reasonrl.ops import _backend
from reasonrl.ops.grpo import GRPOLossConfig, grpo_loss

BETA, EPS_LO, EPS_HI, TEMP = 0.04, 0.2, 0.28, 1.0


# ---- TRL's loss, as GRPOTrainer computes it (the eager baseline) ---------------------------------

def trl_selective_log_softmax(logits, index):
    """TRL's selective_log_softmax: row loops keep the peak to one row of the log-softmax."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return selected - lse
    out = []
    for row_logits, row_ids in zip(logits, index):
        row_logps = F.log_softmax(row_logits, dim=-1)
        out.append(row_logps.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def trl_loss_from_logits(logits, ids, mask, rewards, G, old, ref):
    """GRPOTrainer: group-normalized advantages, token-level clipped ratio, k3 KL, 'dapo' (one
    process: token mean over the batch)."""
    r = rewards.view(-1, G)
    adv = (rewards - r.mean(1).repeat_interleave(G)) / (r.std(1).repeat_interleave(G) + 1e-4)
    logps = trl_selective_log_softmax(logits / TEMP, ids)
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - EPS_LO, 1 + EPS_HI)
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    per_token = per_token + BETA * (torch.exp(ref - logps) - (ref - logps) - 1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def trl_loss_fused(hidden, weight, ids, mask, rewards, G, old, ref):
    B, T = ids.shape
    return trl_loss_from_logits((hidden @ weight.T).view(B, T, -1), ids, mask, rewards, G, old, ref)


# ---- timing and memory -----------------------------------------------------------------------------

def _rss_peak_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1])
    return 0


def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def measure(fn, dev, warmup, reps, best=False):
    """(median ms, or the fastest with best=True, peak extra GiB)."""
    for _ in range(warmup):
        fn()
    ts = []
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            base = _rss_kib()
        except OSError:
            base = None
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        peak = (_rss_peak_kib() - base) / 2**20 if base is not None else float("nan")
    return (min(ts) if best else statistics.median(ts)), peak


def copy_bandwidth(dev, n):
    """Bytes read + written per second by a device copy of n float32."""
    a = torch.randn(n, device=dev)
    b = torch.empty_like(a)
    ms, _ = measure(lambda: b.copy_(a), dev, 2, 10, best=True)  # a ceiling: the best run
    return 2 * a.numel() * 4 / (ms / 1e3)


def matmul_rate(dev, dtype, m):
    x, y = torch.randn(m, m, device=dev, dtype=dtype), torch.randn(m, m, device=dev, dtype=dtype)
    ms, _ = measure(lambda: x @ y, dev, 2, 10, best=True)
    return 2 * m**3 / (ms / 1e3)


# ---- the cases -----------------------------------------------------------------------------------

def _ids_and_lengths(B, T, V):
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    return ids, torch.randint(T // 2, T + 1, (B,), generator=g), g


def make_inputs(B, T, V, G, dtype, dev, H=None):
    ids, lengths, g = _ids_and_lengths(B, T, V)
    ids = ids.to(dev)
    mask = (torch.arange(T)[None] < lengths[:, None]).float().to(dev)  # (B, T)
    rewards = torch.randint(0, 2, (B,), generator=g).float().to(dev)
    if H is None:
        x = {"logits": (torch.randn(B, T, V, device=dev, dtype=torch.float32) * 2).to(dtype)}  # (B, T, V)
        with torch.no_grad():
            from reasonrl.ops.logprobs import token_logprobs
            lp = token_logprobs(x["logits"], ids, TEMP)  # (B, T)
    else:
        x = {"hidden": torch.randn(B * T, H, device=dev, dtype=dtype),
             "weight": (torch.randn(V, H, device=dev, dtype=dtype) * H**-0.5)}
        with torch.no_grad():
            from reasonrl.ops.logprobs import linear_token_logprobs
            lp = linear_token_logprobs(x["hidden"], x["weight"], ids.view(-1), TEMP).view(B, T)
    old = lp + 0.1 * torch.randn(B, T, device=dev)
    ref = lp + 0.1 * torch.randn(B, T, device=dev)
    return x, ids, mask, rewards, old, ref


def backends_for(dev):
    return [b for b in ("cpp", "triton", "cuda") if _backend.why_unavailable(b, dev) is None]


PROFILE = False  # --profile
STAGE_KB = (0, 64, 227)  # CUDA single pass: REASONRL_GRPO_STAGE_KB beside the default (H200, V=151936: 112 KiB)


def _with_stage(kb, f):
    def go():
        os.environ["REASONRL_GRPO_STAGE_KB"] = str(kb)
        try:
            return f()
        finally:
            del os.environ["REASONRL_GRPO_STAGE_KB"]
    return go


def run_case(form, B, T, V, G, dtype, dev, H, warmup, reps, with_compile, only):
    x, ids, mask, rewards, old, ref = make_inputs(B, T, V, G, dtype, dev, H)
    leaves = {k: v.requires_grad_(True) for k, v in x.items()}
    cfg = GRPOLossConfig(beta=BETA, epsilon_low=EPS_LO, epsilon_high=EPS_HI, loss_type="dapo",
                         compute_entropy=False)
    kw = dict(ids=ids, mask=mask, rewards=rewards, group_size=G, old_logprobs=old, ref_logprobs=ref,
              temperature=TEMP)
    fns = {}
    inplace = GRPOLossConfig(**{**cfg.__dict__, "inplace_backward": True})
    two_pass = GRPOLossConfig(**{**cfg.__dict__, "linear_single_pass": False})  # recompute in backward
    trl = trl_loss_from_logits if form == "logits" else trl_loss_fused
    args = (lambda: (leaves["logits"],)) if form == "logits" else (lambda: (leaves["hidden"], leaves["weight"]))
    # the references first: a kernel that faults the GPU takes every later row of this process with it
    fns["eager-trl"] = lambda: trl(*args(), ids, mask, rewards, G, old, ref)
    fns.update(liger_fns(form, leaves, ids, mask, rewards, G, old, ref, B, T))
    if form == "logits":
        # the two-kernel path (forward kernel, backward kernel) where the single pass is the default,
        # before the single pass (new code runs after what was measured before)
        two = GRPOLossConfig(**{**cfg.__dict__, "logits_single_pass": False})
        for b in backends_for(dev):
            if b != "triton":
                fns[f"reasonrl-{b}-2pass"] = (lambda b=b: grpo_loss(leaves["logits"], config=two, backend=b, **kw)[0])
    for b in backends_for(dev):
        if form == "logits":
            fns[f"reasonrl-{b}"] = (lambda b=b: grpo_loss(leaves["logits"], config=cfg, backend=b, **kw)[0])
        else:
            fns[f"reasonrl-{b}"] = (lambda b=b: grpo_loss(hidden=leaves["hidden"], weight=leaves["weight"],
                                                          config=cfg, backend=b, **kw)[0])
            fns[f"reasonrl-{b}-2pass"] = (lambda b=b: grpo_loss(hidden=leaves["hidden"], weight=leaves["weight"],
                                                                config=two_pass, backend=b, **kw)[0])
    if form == "logits":
        # last: the in-place paths leave gradients in the logits (Liger's, run above, in place too: the
        # rows after it read its gradients as logits; these kernels' time does not depend on the values)
        for b in backends_for(dev):
            fns[f"reasonrl-{b}-inplace"] = (lambda b=b: grpo_loss(leaves["logits"], config=inplace, backend=b, **kw)[0])
        if "cuda" in backends_for(dev):  # how much of each row the single pass keeps in shared memory
            for kb in STAGE_KB:
                fns[f"reasonrl-cuda-inplace-stage{kb}"] = _with_stage(kb, lambda: grpo_loss(
                    leaves["logits"], config=inplace, backend="cuda", **kw)[0])
    if with_compile:  # last: compiling takes longest, and a timeout should cut only this
        compiled = torch.compile(trl, dynamic=False)
        fns["compile-trl"] = lambda: compiled(*args(), ids, mask, rewards, G, old, ref)
    if only:
        fns = {k: v for k, v in fns.items() if any(o in k for o in only)}

    def fwd_bwd(f):
        def go():
            f().backward()
            for t in leaves.values():
                t.grad = None
        return go

    rows = []
    for name, f in fns.items():
        try:
            ms_fwd_ng = ms_fwd = float("nan")
            if not name.startswith("compile"):  # each grad mode is another compilation: time fwd+bwd only
                with torch.no_grad():
                    ms_fwd_ng, _ = measure(f, dev, warmup, reps)
                ms_fwd, _ = measure(f, dev, warmup, reps)
            ms, peak = measure(fwd_bwd(f), dev, warmup, reps)
            if PROFILE and (name.startswith("reasonrl") or name.startswith("liger")):
                sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
                from common import profile_table

                profile_table(fwd_bwd(f), dev, f"{form} form, {name}, fwd+bwd")
            rows.append(dict(form=form, backend=name, fwd_nograd_ms=ms_fwd_ng, fwd_ms=ms_fwd, fwd_bwd_ms=ms,
                             peak_extra_GiB=peak))
        except Exception as ex:  # a missing or failing baseline is reported, not fatal
            rows.append(dict(form=form, backend=name, error=repr(ex)[:200]))
        # one line as soon as it is measured: a run cut short by a timeout keeps what it had
        print(f"# measured {json.dumps(rows[-1])}", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def liger_fns(form, leaves, ids, mask, rewards, G, old, ref, B, T):
    if leaves[next(iter(leaves))].device.type != "cuda":
        return {}
    r = rewards.view(-1, G)
    adv = (rewards - r.mean(1).repeat_interleave(G)) / (r.std(1).repeat_interleave(G) + 1e-4)
    try:
        if form == "logits":
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss

            def liger():
                # Liger reads logits shaped (B, L + 1, V) (the model's shifted output) and per-token
                # tensors (B, L), contiguous (it asserts so): here L = T - 1, the bytes differ by 1 / T.
                c = lambda t: t[:, :-1].contiguous()  # noqa: E731
                loss, _ = triton_grpo_loss(leaves["logits"], c(old), c(ref), c(ids), adv, c(mask),
                                           temperature=TEMP, beta=BETA, eps_low=EPS_LO, eps_high=EPS_HI,
                                           inplace=True, loss_type="dapo", reduce=True)
                return loss
            return {"liger-triton_grpo_loss": liger}
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        lf = LigerFusedLinearGRPOLoss(beta=BETA, use_ref_model=True, loss_type="dapo",
                                      epsilon_low=EPS_LO, epsilon_high=EPS_HI, temperature=TEMP)

        def liger_fused():
            out = lf(leaves["hidden"].view(B, T, -1), leaves["weight"], ids, mask, adv,
                     ref_per_token_logps=ref, old_per_token_logps=old)
            return out[0] if isinstance(out, tuple) else out
        return {"liger-FusedLinearGRPOLoss": liger_fused}
    except Exception as ex:  # not installed, or an API that moved
        print(f"# liger ({form}) unavailable: {ex!r}"[:200], file=sys.stderr)
        return {}


# ---- report ------------------------------------------------------------------------------------

def annotate(rows, form, size, dev, bw, mm):
    if form == "logits":
        bytes_moved = 3 * size
        floor_ms = bytes_moved / bw * 1e3
    else:
        flops = 6 * size
        floor_ms = flops / mm * 1e3
    eager = next((r["fwd_bwd_ms"] for r in rows if r["backend"] == "eager-trl" and "fwd_bwd_ms" in r), None)
    for r in rows:
        if "fwd_bwd_ms" not in r:
            continue
        r["floor_ms"] = floor_ms
        r["share_of_floor"] = floor_ms / r["fwd_bwd_ms"]
        if form == "logits":
            r["GBps"] = bytes_moved / (r["fwd_bwd_ms"] / 1e3) / 1e9
        else:
            r["TFLOPs"] = 6 * size / (r["fwd_bwd_ms"] / 1e3) / 1e12
        r["speedup_vs_eager"] = eager / r["fwd_bwd_ms"] if eager else None


def print_table(rows):
    hdr = f"{'form':7} {'backend':28} {'fwd(nograd)':>11} {'fwd':>9} {'fwd+bwd':>9} {'rate':>12} {'floor':>8} {'%floor':>7} {'peak GiB':>9} {'x eager':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['form']:7} {r['backend']:28} error: {r['error']}")
            continue
        rate = f"{r['GBps']:.1f} GB/s" if "GBps" in r else f"{r['TFLOPs']:.2f} TF/s"
        sp = f"{r['speedup_vs_eager']:.2f}" if r.get("speedup_vs_eager") else "-"
        print(f"{r['form']:7} {r['backend']:28} {r['fwd_nograd_ms']:9.2f}ms {r['fwd_ms']:7.2f}ms "
              f"{r['fwd_bwd_ms']:7.2f}ms {rate:>12} {r['floor_ms']:6.2f}ms {100 * r['share_of_floor']:6.1f}% "
              f"{r['peak_extra_GiB']:9.3f} {sp:>8}")


def _exec_with_fixed_mmap_threshold():
    """glibc raises its mmap threshold after large frees (up to 32 MiB), and then serves chunks from
    a heap that stays resident: peak RSS would miss them. A fixed threshold keeps every large tensor
    an mmap of its own, so RSS follows the live tensors. Re-exec once with it set."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="the GPU anchor shapes on cuda")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on CPU)")
    ap.add_argument("--only", nargs="*", default=None, help="substrings of backend names to run")
    ap.add_argument("--forms", nargs="*", default=["logits", "fused"])
    ap.add_argument("--profile", action="store_true",
                    help="print a torch.profiler table of one fwd+bwd of ours and Liger's")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.gpu and not torch.cuda.is_available():  # was an AssertionError traceback from deep inside torch
        sys.exit("--gpu asked for, but torch sees no CUDA device")
    global PROFILE
    PROFILE = a.profile
    dev = torch.device("cuda" if a.gpu else "cpu")
    if not a.gpu and argv is None:
        _exec_with_fixed_mmap_threshold()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.gpu:
        logits_shape = dict(B=8, T=2048, V=151936, G=4, dtype=torch.bfloat16)
        fused_shape = dict(B=8, T=2048, V=151936, G=4, H=1536, dtype=torch.bfloat16)  # N = B*T = 16384
        reps, warmup = a.reps or 10, 3
        bw, mm = copy_bandwidth(dev, 1 << 29), matmul_rate(dev, torch.bfloat16, 8192)
    else:
        logits_shape = dict(B=8, T=256, V=32000, G=4, dtype=torch.float32)
        fused_shape = dict(B=4, T=256, V=32000, G=4, H=512, dtype=torch.float32)  # N = 1024
        reps, warmup = a.reps or 5, 1
        bw, mm = copy_bandwidth(dev, 1 << 26), matmul_rate(dev, torch.float32, 1024)
    print(f"# device: {torch.cuda.get_device_name() if a.gpu else f'CPU, {torch.get_num_threads()} threads'}; "
          f"torch {torch.__version__}; copy {bw / 1e9:.1f} GB/s, matmul {mm / 1e12:.2f} TFLOP/s (measured now)")
    rows = []
    if "logits" in a.forms:
        s = logits_shape
        print(f"# logits form: B={s['B']} T={s['T']} V={s['V']} G={s['G']} {s['dtype']}")
        r = run_case("logits", s["B"], s["T"], s["V"], s["G"], s["dtype"], dev, None, warmup, reps,
                     not a.no_compile, a.only)
        elt = torch.empty((), dtype=s["dtype"]).element_size()
        annotate(r, "logits", s["B"] * s["T"] * s["V"] * elt, dev, bw, mm)
        for x in r:
            x["logits_GiB"] = s["B"] * s["T"] * s["V"] * elt / 2**30
        rows += r
    if "fused" in a.forms:
        s = fused_shape
        print(f"# fused form: N={s['B'] * s['T']} H={s['H']} V={s['V']} {s['dtype']}")
        r = run_case("fused", s["B"], s["T"], s["V"], s["G"], s["dtype"], dev, s["H"], warmup, reps,
                     not a.no_compile, a.only)
        live = int(_ids_and_lengths(s["B"], s["T"], s["V"])[1].sum())  # rows with a loss: the op's work
        annotate(r, "fused", live * s["H"] * s["V"], dev, bw, mm)
        rows += r
    print_table(rows)
    if "logits" in a.forms:
        s = logits_shape
        size = s["B"] * s["T"] * s["V"] * torch.empty((), dtype=s["dtype"]).element_size()
        print(f"# logits form, the single pass's own floor (one read, one write): {2 * size / bw * 1e3:.2f} ms")
    meta = dict(device=torch.cuda.get_device_name() if a.gpu else f"cpu-{os.cpu_count()}cores",
                torch=torch.__version__, copy_GBps=bw / 1e9, matmul_TFLOPs=mm / 1e12)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(json.dumps(dict(bench="grpo", **meta, rows=rows)))


if __name__ == "__main__":
    main()
