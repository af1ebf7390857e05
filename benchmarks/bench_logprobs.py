"""Benchmark the log-prob family beside eager PyTorch, torch.compile and Liger-Kernel (if installed).

    python benchmarks/bench_logprobs.py            # CPU-sized shapes (the CPU goal's shape)
    python benchmarks/bench_logprobs.py --gpu      # the anchor shapes of shared/design/GPU.md

Floors: token_logprobs fwd+bwd reads the logits twice and writes the gradient once (3 passes:
bytes over the measured copy bandwidth); linear_token_logprobs fwd is 2NHV FLOPs and a standalone
fwd+bwd 8NHV (logits recomputed in backward: the floor of a standalone op, as issue 2 sets it), over the
measured matmul rate; job_floor_ms is the job's own 6NHV (what eager, which keeps the logits, computes),
and TFLOP/s counts those 6NHV useful FLOPs for every row, so that rows compare.
bwd_ms is fwd+bwd minus a forward in grad mode (the no-grad fwd_ms, the old/ref-policy path, can take
another code path).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    ceilings, device_name, emit_json, exec_with_fixed_mmap_threshold, measured, peak_extra_bytes, print_table,
    time_ms,
)

from reasonrl.ops import _backend, linear_token_logprobs, token_logprobs  # noqa: E402

GiB = float(1 << 30)


def eager_logprobs(x, ids, T):
    return torch.log_softmax(x.float() / T, -1).gather(-1, ids[:, None]).squeeze(-1)


def eager_linear(h, w, ids, T):
    return eager_logprobs(h @ w.T, ids, T)


def chunked_linear(h, w, ids, T, chunks=8):
    """What a user writes instead of a kernel: checkpointed row chunks (gpu_anchors2.py's shape)."""
    from torch.utils.checkpoint import checkpoint

    out = []
    for hc, ic in zip(h.chunk(chunks), ids.chunk(chunks)):
        out.append(checkpoint(_chunk_fn, hc, w, ic, T, use_reentrant=False))
    return torch.cat(out)


def _chunk_fn(hc, w, ic, T):
    return eager_logprobs(hc @ w.T, ic, T)


_compiled_chunk = None


def compiled_chunked_linear(h, w, ids, T, chunks=8):
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_fn, dynamic=False)
    from torch.utils.checkpoint import checkpoint

    return torch.cat([checkpoint(_compiled_chunk, hc, w, ic, T, use_reentrant=False)
                      for hc, ic in zip(h.chunk(chunks), ids.chunk(chunks))])


def liger_logprobs():
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception:
        return None
    return lambda x, ids, T: -liger_cross_entropy(x / T if T != 1.0 else x, ids, reduction="none")


def backends_for(device):
    names = ["triton", "cuda"] if device.type == "cuda" else ["cpp"]
    return [b for b in names if _backend.why_unavailable(b, device) is None]


def measure(fwd, g, leaves, device, args):
    """(no-grad forward ms, grad-mode forward ms, forward+backward ms, peak extra bytes of one
    forward+backward)."""
    def fb():
        (fwd() * g).sum().backward()
        for t in leaves:
            t.grad = None
    with torch.no_grad():
        t_f = time_ms(fwd, device, args.warmup, args.rep)
    t_fg = time_ms(fwd, device, args.warmup, args.rep)  # what backward follows (its graph freed unused)
    t_fb = time_ms(fb, device, args.warmup, args.rep)
    return t_f, t_fg, t_fb, peak_extra_bytes(fb, device)


def bench_token(args, device, ceil, rows):
    N, V, dtype, T = args.N, args.V, getattr(torch, args.dtype), 1.0
    x = (torch.randn(N, V, device=device, dtype=torch.float32) * 2).to(dtype).requires_grad_(True)
    ids = torch.randint(0, V, (N,), device=device)
    g = torch.randn(N, device=device)
    nbytes = N * V * x.element_size()
    floor_ms = 3 * nbytes / ceil["copy_Bps"] * 1e3
    impls = [("eager", lambda: eager_logprobs(x, ids, T))]
    lig = liger_logprobs() if device.type == "cuda" else None
    if lig:
        impls.append(("liger cross_entropy", lambda: lig(x, ids, T)))
    for b in backends_for(device):
        impls.append((f"reasonrl {b}", lambda b=b: token_logprobs(x, ids, T, backend=b, check_ids=False)))
        impls.append((f"reasonrl {b} in-place",
                      lambda b=b: token_logprobs(x, ids, T, backend=b, check_ids=False, inplace_backward=True)))
    if not args.no_compile:  # last: its compile time must not cost the other rows under a timeout
        comp = torch.compile(eager_logprobs, dynamic=False)
        impls.append(("torch.compile", lambda: comp(x, ids, T)))
    base = None
    for name, fwd in impls:
        t_f, t_fg, t_fb, peak = measure(fwd, g, [x], device, args)
        base = base or t_fb
        rows.append({"op": "token_logprobs", "impl": name, "shape": f"N={N} V={V} {args.dtype}",
                     "fwd_ms": t_f, "fwd+bwd_ms": t_fb, "bwd_ms": t_fb - t_fg,
                     "GB/s": 3 * nbytes / (t_fb / 1e3) / 1e9, "floor_ms": floor_ms, "x_floor": t_fb / floor_ms,
                     "peak_extra_GiB": peak / GiB, "peak_vs_logits": peak / nbytes, "speedup_vs_eager": base / t_fb})
        measured(rows[-1])
        with torch.no_grad():  # in-place runs leave gradients in x: restore fresh logits
            x.copy_((torch.randn(N, V, device=device) * 2).to(dtype))


def bench_linear(args, device, ceil, rows):
    N, H, V, dtype, T = args.lN, args.H, args.V, getattr(torch, args.dtype), 1.0
    h = torch.randn(N, H, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, H, device=device, dtype=torch.float32) * (2 / H**0.5)).to(dtype).requires_grad_(True)
    ids = torch.randint(0, V, (N,), device=device)
    g = torch.randn(N, device=device)
    flop = 2 * N * H * V
    impls = [("eager", lambda: eager_linear(h, w, ids, T)),
             ("chunked+checkpoint (8)", lambda: chunked_linear(h, w, ids, T))]
    for b in backends_for(device):
        impls.append((f"reasonrl {b}", lambda b=b: linear_token_logprobs(h, w, ids, T, backend=b, check_ids=False)))
    if device.type == "cuda" and "triton" in backends_for(device):  # GEMM + log-sum-exp fwd, GEMM + gradient bwd
        impls.append(("reasonrl triton, GEMM+LSE fwd and bwd",
                      lambda: with_gemm_lse(None, lambda: linear_token_logprobs(h, w, ids, T, backend="triton",
                                                                                check_ids=False))))
    for b in backends_for(device):  # the logits kept from forward to backward (no recompute; N x V alive)
        impls.append((f"reasonrl {b}, logits kept", lambda b=b: linear_token_logprobs(h, w, ids, T, backend=b,
                                                                                     check_ids=False, keep_logits=True)))
    if not args.no_compile:  # last, as above
        impls.append(("torch.compile chunked (8)", lambda: compiled_chunked_linear(h, w, ids, T)))
    base = None
    for name, fwd in impls:
        try:
            t_f, t_fg, t_fb, peak = measure(fwd, g, [h, w], device, args)
        except Exception as e:  # an untimed kernel (GEMM+LSE) must not cost the rest of the table
            if not name.startswith("reasonrl triton, GEMM+LSE"):
                raise
            print(f"# failed: {name}: {type(e).__name__}: {str(e)[:500]}", flush=True)
            continue
        base = base or t_fb
        rows.append({"op": "linear_token_logprobs", "impl": name, "shape": f"N={N} H={H} V={V} {args.dtype}",
                     "fwd_ms": t_f, "fwd+bwd_ms": t_fb, "bwd_ms": t_fb - t_fg,
                     "TFLOP/s": 3 * flop / (t_fb / 1e3) / 1e12,
                     "floor_ms": 4 * flop / ceil["mm_flops"] * 1e3, "x_floor": t_fb / (4 * flop / ceil["mm_flops"] * 1e3),
                     "job_floor_ms": 3 * flop / ceil["mm_flops"] * 1e3,
                     "x_job_floor": t_fb / (3 * flop / ceil["mm_flops"] * 1e3),
                     "fwd_x_floor": t_f / (flop / ceil["mm_flops"] * 1e3),
                     "peak_extra_GiB": peak / GiB, "speedup_vs_eager": base / t_fb})
        measured(rows[-1])
    if device.type == "cuda" and args.fwd_sweep:
        fwd_sweep(args, device, ceil, rows, h.detach(), w.detach(), ids, flop)


def with_gemm_lse(config, fn):
    """fn() with the triton backend's linear forward as one GEMM with the log-sum-exp in its epilogue
    (ops.logprobs.GEMM_LSE_FWD, off on CUDA until timed), in `config` (kernels.logprobs.LSE_GEMM_GPU)."""
    import reasonrl.kernels.logprobs as K
    import reasonrl.ops.logprobs as L

    old, old_cfg = set(L.GEMM_LSE_FWD), K.LSE_GEMM_GPU
    L.GEMM_LSE_FWD.add("cuda")
    K.LSE_GEMM_GPU = config or old_cfg
    try:
        return fn()
    finally:
        L.GEMM_LSE_FWD.clear()
        L.GEMM_LSE_FWD.update(old)
        K.LSE_GEMM_GPU = old_cfg


def fwd_sweep(args, device, ceil, rows, h, w, ids, flop):
    """The no-grad forward against the GEMM it cannot beat: cuBLAS's h @ W^T alone, as one GEMM into a
    preallocated (N, V) buffer and in the row chunks the op uses, and the op at each chunk size (rows
    "fwd only"). Where the bare GEMM is itself above 1.3x the FLOP floor, no chunking reaches issue 2's
    forward goal: only a GEMM with the log-sum-exp in its epilogue (no logits written) would: the
    Triton one (kernels.logprobs.linear_lse_fwd) in each of its candidate configs."""
    from reasonrl.ops.logprobs import _chunk

    N, V = h.shape[0], w.shape[0]
    floor = flop / ceil["mm_flops"] * 1e3
    shape = f"N={N} H={h.shape[1]} V={V} {args.dtype}"
    buf = torch.empty(N, V, device=device, dtype=h.dtype)

    def row(impl, t):
        rows.append({"op": "linear_token_logprobs", "impl": impl, "shape": shape, "fwd_ms": t,
                     "TFLOP/s": flop / (t / 1e3) / 1e12, "fwd_x_floor": t / floor})
        measured(rows[-1])

    with torch.no_grad():
        row("cuBLAS GEMM alone, one (N, V)", time_ms(lambda: torch.mm(h, w.t(), out=buf), device, args.warmup,
                                                     args.rep))
        for mib in args.fwd_sweep:
            step = _chunk(mib << 20, V, N, h.element_size(), align=256)

            def gemms(step=step):
                for r0 in range(0, N, step):
                    torch.mm(h[r0:r0 + step], w.t(), out=buf[r0:r0 + step])
            row(f"cuBLAS GEMMs alone, rows of {mib} MiB ({step})", time_ms(gemms, device, args.warmup, args.rep))
        buf = None  # freed before the op runs (its own chunks)
        torch.cuda.empty_cache()
        if "triton" in backends_for(device):
            from reasonrl.kernels.logprobs import LSE_GEMM_CANDIDATES

            for cfg in LSE_GEMM_CANDIDATES:
                tag = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K} g{GROUP_M} w{num_warps} s{num_stages}".format(**cfg)
                tag += " TMA" if cfg.get("TMA") else " ptr"
                try:
                    t = time_ms(lambda cfg=cfg: with_gemm_lse(cfg, lambda: linear_token_logprobs(
                        h, w, ids, 1.0, backend="triton", check_ids=False)), device, args.warmup, args.rep)
                except Exception as e:  # one config that fails to build or run must not cost the others
                    print(f"# failed: GEMM+LSE {tag}: {type(e).__name__}: {str(e)[:500]}", flush=True)
                    continue
                row(f"reasonrl triton, no grad, GEMM+LSE {tag}", t)
        for b in backends_for(device):
            for mib in args.fwd_sweep:
                row(f"reasonrl {b}, no grad, chunks of {mib} MiB",
                    time_ms(lambda b=b, mib=mib: linear_token_logprobs(h, w, ids, 1.0, backend=b, check_ids=False,
                                                                       chunk_bytes=mib << 20),
                            device, args.warmup, args.rep))


def _mib_list(s):
    return [] if s in ("", "none") else [int(x) for x in s.split(",")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="anchor shapes on the GPU")
    p.add_argument("--N", type=int, default=None)
    p.add_argument("--lN", type=int, default=None, help="rows for the fused LM-head op")
    p.add_argument("--H", type=int, default=None)
    p.add_argument("--V", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--only", choices=["token", "linear"], default=None)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (>= 1: the first call's set-up "
                   "cost landed in the timings, a negative bwd = (fwd+bwd) - fwd at 0)")
    p.add_argument("--rep", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the JSON line to this file")
    p.add_argument("--fwd-sweep", type=_mib_list, default=[128, 256, 512, 1024, 2048], metavar="MiB,MiB,...",
                   help="GPU: the linear op's no-grad forward at these chunk sizes beside cuBLAS's GEMM alone "
                        "('none': skip)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    a = p.parse_args()
    if a.warmup < 1:
        p.error("--warmup must be >= 1")
    if not a.gpu:
        exec_with_fixed_mmap_threshold()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.gpu else "cpu")
    if a.gpu and not torch.cuda.is_available():
        sys.exit("--gpu asked for, but torch sees no CUDA device")
    gpu = device.type == "cuda"
    a.N = a.N or (16384 if gpu else 2048)
    a.lN = a.lN or (16384 if gpu else 1024)
    a.H = a.H or (1536 if gpu else 128)
    a.V = a.V or (151936 if gpu else 32000)
    a.dtype = a.dtype or ("bfloat16" if gpu else "float32")
    a.rep = a.rep or (20 if gpu else 5)
    ceil = ceilings(device)
    print(f"device: {device_name(device)}; measured copy {ceil['copy_Bps'] / 1e9:.1f} GB/s (read+write), "
          f"{ceil['mm_dtype']} matmul {ceil['mm_flops'] / 1e12:.2f} TFLOP/s")
    rows = []
    if a.only in (None, "token"):
        bench_token(a, device, ceil, rows)
    if gpu:
        torch.cuda.empty_cache()
    if a.only in (None, "linear"):
        bench_linear(a, device, ceil, rows)
    cols = ["op", "impl", "shape", "fwd_ms", "bwd_ms", "fwd+bwd_ms", "GB/s", "TFLOP/s", "floor_ms", "x_floor",
            "job_floor_ms", "x_job_floor", "fwd_x_floor", "peak_extra_GiB", "speedup_vs_eager"]
    print_table(rows, cols)
    emit_json({"bench": "logprobs", "device": device_name(device), "ceilings": ceil, "rows": rows}, a.json)


if __name__ == "__main__":
    main()
