"""Benchmark the MoE expert compute beside the per-expert loop, torch._grouped_mm and Liger's fused MoE.

    python benchmarks/bench_moe.py                # CPU shapes (the CPU goal: >= 5x the per-expert loop)
    python benchmarks/bench_moe.py --threads 1    # one thread (a loaded 2-core machine times steadier)
    python benchmarks/bench_moe.py --gpu          # the anchor shape of shared/design/GPU.md

Shapes (T tokens, H hidden, I expert intermediate, E experts, top-K):
  CPU train  T=512  H=128  I=64  E=32  K=4    the issue's small shape (64 rows per expert)
  CPU qwen3  T=512  H=128  I=48  E=128 K=8    Qwen3-MoE's proportions scaled down (I/H = 768/2048,
                                             E=128, top-8): fine-grained experts, 32 rows per expert
  CPU decode T=16 at both, forward only        a decode step: one to a few tokens per expert
  GPU        T=16384 H=2048 I=768 E=128 K=8 bf16, decode T=64
References timed in the same run: "loop (HF)" is the per-expert loop as transformers' Qwen3MoeExperts
writes it (in-place index_add_ into zeros), "loop (reasonrl reference)" the op's reference backend
(the same loop, out-of-place, float32 combine), `torch._grouped_mm` on expert-sorted rows where this
torch build has it and it runs on the device, Liger-Kernel's LigerFusedMoEFunction where installed (GPU).
On a Hopper GPU in bf16 the Triton backend runs twice more, with its backward GEMMs through
torch._grouped_mm (kernels/moe.py *_GROUPED_MM): "wgrad" (the two weight gradients), "wgrad+dact"
(and the go Wd GEMM) and "wgrad+dact+dx" (and dx's GEMM); --profile prints the kernels of ours and of the
torch._grouped_mm reference, whose GEMMs are CUTLASS's grouped GEMM at these shapes.
Floor: forward 2*T*K*H*3I FLOPs, forward+backward 3x that (backward does twice the forward's GEMMs;
the C++ backend's recompute of gate/up adds 2*T*K*H*2I more, not counted), over the measured matmul rate;
decode (forward only, a few tokens per expert) the larger of that and the bytes of the experts it hits
(each read once) plus x and the output, over the measured copy bandwidth. Decode's peak memory is taken
without autograd, as it is timed.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

# Liger's fused MoE autotunes ~200 Triton configs on first use unless told not to (minutes of compiles
# on an H100, past the GPU check's 120 s cap for this script; the anchor numbers were taken with it off).
os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")

import torch  # noqa: E402
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    ceilings, device_name, emit_json, exec_with_fixed_mmap_threshold, measured, peak_extra_bytes, print_table, profile_table,
    time_ms,
)

from reasonrl.ops import _backend  # noqa: E402
from reasonrl.ops.moe import moe_experts  # noqa: E402

GiB = float(1 << 30)


def loop_hf(x, ids, w, w_gate_up, w_down):
    """The per-expert loop of transformers' fused-experts modules (mask per expert, in-place index_add_)."""
    out = torch.zeros_like(x)
    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    with torch.no_grad():
        hit = torch.bincount(ids.reshape(-1), minlength=E).nonzero().flatten().tolist()
    for e in hit:
        tok, k = torch.where(ids == e)
        h = F.linear(x[tok], w_gate_up[e])
        y = F.linear(F.silu(h[:, :I]) * h[:, I:], w_down[e]) * w[tok, k, None]
        out.index_add_(0, tok, y.to(x.dtype))
    return out


def grouped_mm(x, ids, w, w_gate_up, w_down):
    """Expert-sorted rows through torch._grouped_mm (two grouped GEMMs), then a weighted index_add."""
    T, K = ids.shape
    I = w_gate_up.shape[1] // 2
    order = torch.argsort(ids.reshape(-1), stable=True)  # (T*K,)
    offs = torch.cumsum(torch.bincount(ids.reshape(-1), minlength=w_gate_up.shape[0]), 0).to(torch.int32)
    tok = order // K
    h = torch._grouped_mm(x[tok], w_gate_up.transpose(1, 2), offs=offs)  # (T*K, 2I)
    y = torch._grouped_mm(F.silu(h[:, :I]) * h[:, I:], w_down.transpose(1, 2), offs=offs)  # (T*K, H)
    y = y.float() * w.reshape(-1)[order, None]
    return torch.zeros(T, x.shape[1], device=x.device).index_add_(0, tok, y).to(x.dtype)


def grouped_mm_status(device, dtype):
    """None when torch._grouped_mm runs forward and backward here, else why not."""
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm"
    try:
        args = make_inputs(64, 64, 32, 4, 2, dtype, device)  # 16-byte aligned rows, as the GPU kernel wants
        grouped_mm(*args).float().sum().backward()
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "not available here", printed
        return f"torch._grouped_mm failed here: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def liger_fn(device):
    if device.type != "cuda":
        return None, "Liger's fused MoE is Triton on CUDA; skipped on CPU"
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except Exception as e:  # noqa: BLE001
        return None, f"liger_kernel fused MoE not importable ({type(e).__name__})"
    return (lambda x, ids, w, gu, wd: LigerFusedMoEFunction.apply(x, gu, wd, ids.int(), w.to(x.dtype))), None


def make_inputs(T, H, I, E, K, dtype, device):
    x = torch.randn(T, H, device=device).to(dtype).requires_grad_(True)
    gu = (torch.randn(E, 2 * I, H, device=device) / H**0.5).to(dtype).requires_grad_(True)
    wd = (torch.randn(E, H, I, device=device) / I**0.5).to(dtype).requires_grad_(True)
    ids = torch.rand(T, E, device=device).argsort(1)[:, :K]  # balanced random routing
    w = torch.softmax(torch.randn(T, K, device=device), -1).requires_grad_(True)
    return x, ids, w, gu, wd


_SAID = set()


def _skip(msg):
    if msg not in _SAID:
        _SAID.add(msg)
        print(f"# skipped {msg}")


# Backward GEMMs of the Triton backend that can go through torch._grouped_mm (kernels/moe.py):
# a row each in the comparison and a try each in --tune.
GROUPED_MM_VARIANTS = {"wgrad": ("WGRAD_GROUPED_MM",), "wgrad+dact": ("WGRAD_GROUPED_MM", "DACT_GROUPED_MM"),
                       "wgrad+dact+dx": ("WGRAD_GROUPED_MM", "DACT_GROUPED_MM", "DX_GROUPED_MM")}


@contextlib.contextmanager
def via_grouped_mm(device, variant):
    """The Triton backend's backward GEMMs of `variant` through torch._grouped_mm while inside."""
    from reasonrl.kernels import moe as M

    names = GROUPED_MM_VARIANTS[variant]
    old = {n: getattr(M, n) for n in names}
    for n in names:
        setattr(M, n, {device.type})
    try:
        yield
    finally:
        for n, v in old.items():
            setattr(M, n, v)


def grouped_mm_variant_status(device, dtype, H, I):
    """None when the Triton backend's backward GEMMs can go through torch._grouped_mm here, else why not."""
    from reasonrl.kernels import moe as M

    if device.type != "cuda":
        return "the Triton backend is for CUDA (its CPU runs are the interpreter's)"
    if not M._grouped_mm_ok({device.type}, dtype, device, 2 * I, H):
        return "they need torch._grouped_mm, bf16, rows of 16-byte multiples and a Hopper (sm_90)"
    return None


def impls_for(device, dtype, H=0, I=0):
    """[(name, fn, context or None)]: fn runs (forward and backward) inside the context."""
    out = [("loop (HF)", loop_hf)]  # the baseline of speedup_vs_loop
    for b in (["triton", "cuda"] if device.type == "cuda" else ["cpp"]):  # ours before the other references
        if _backend.why_unavailable(b, device) is None and b != "cuda":
            out.append((f"reasonrl {b}", lambda *a, b=b: moe_experts(*a, backend=b)))
            if b == "triton":
                why = grouped_mm_variant_status(device, dtype, H, I)
                if why is not None:
                    _skip(f"reasonrl triton, backward GEMMs by torch._grouped_mm: {why}")
                for v in GROUPED_MM_VARIANTS if why is None else ():
                    out.append((f"reasonrl triton, {v} by torch._grouped_mm",
                                lambda *a: moe_experts(*a, backend="triton"), lambda v=v: via_grouped_mm(device, v)))
    out.append(("loop (reasonrl reference)", lambda *a: moe_experts(*a, backend="reference")))
    why = grouped_mm_status(device, dtype)
    if why is None:
        out.append(("torch._grouped_mm", grouped_mm))
    else:
        _skip(f"torch._grouped_mm: {why}")
    lig, why = liger_fn(device)
    if lig:
        out.append(("liger fused MoE", lig))
    else:
        _skip(f"Liger: {why}")
    return [o if len(o) == 3 else (*o, None) for o in out]


def bench_shape(name, T, H, I, E, K, dtype, device, ceil, args, rows, decode=False):
    x, ids, w, gu, wd = make_inputs(T, H, I, E, K, dtype, device)
    g = torch.randn(T, H, device=device).to(dtype)
    leaves = [x, w, gu, wd]
    flop_f = 2 * T * K * H * 3 * I
    # decode reads every expert it hits once: at few tokens a bandwidth floor, far above the FLOP floor
    hit = int(torch.unique(ids).numel())
    decode_bytes = hit * 3 * H * I * gu.element_size() + 2 * T * H * x.element_size()
    base = None
    for impl, fn, ctx in impls_for(device, dtype, H, I):
        def fwd():
            return fn(x, ids, w, gu, wd)

        def fb():
            fwd().backward(g)
            for t in leaves:
                t.grad = None
        if decode and ctx is not None:
            continue  # a backward-only variant: its forward is the row above's
        try:
            with ctx() if ctx else contextlib.nullcontext():
                with torch.no_grad():
                    t_f = time_ms(fwd, device, args.warmup, args.rep)
                t_fb = None if decode else time_ms(fb, device, args.warmup, args.rep)
                if decode:  # measured as timed: without autograd (the leaves require grad)
                    with torch.no_grad():
                        peak = peak_extra_bytes(fwd, device)
                else:
                    peak = peak_extra_bytes(fb, device)
                # ours, and torch._grouped_mm's GEMMs (how fast CUTLASS's grouped GEMM runs these shapes)
                if getattr(args, "profile", False) and (impl.startswith("reasonrl") or impl == "torch._grouped_mm"):
                    profile_table(fwd if decode else fb, device, f"{impl} at {name}")
        except Exception as e:  # noqa: BLE001 - print and go on: one failing reference must not stop the table
            print(f"# {impl} at {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        t = t_f if decode else t_fb
        base = base or t
        floor = (max(flop_f / ceil["mm_flops"], decode_bytes / ceil["copy_Bps"]) if decode
                 else 3 * flop_f / ceil["mm_flops"]) * 1e3
        rows.append({"shape": name, "impl": impl, "T": T, "H": H, "I": I, "E": E, "K": K,
                     "dtype": str(dtype).replace("torch.", ""), "fwd_ms": t_f, "fwd+bwd_ms": t_fb,
                     "TFLOP/s": (flop_f if decode else 3 * flop_f) / (t / 1e3) / 1e12, "floor_ms": floor,
                     "x_floor": t / floor, "peak_extra_MiB": peak / (1 << 20), "speedup_vs_loop": base / t})
        measured(rows[-1])
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --tune: block configs tried one kernel at a time (the others at kernels/moe.py's values), bf16 on GPU.
# The first sweep on an H200 (2026-11-27, benchmarks/RESULTS.md) moved the weight gradient's tile from
# 128 x 256 to 128 x 128 (12.4 -> 11.5 ms); the rest stayed. Each candidate compiles its kernel once
# (the weight-gradient one twice: two operand layouts), a few seconds each on the GPU machine.
TUNE_CANDIDATES = {
    "wgrad": [dict(BLOCK_1=128, BLOCK_2=256, BLOCK_R=64, num_warps=8, num_stages=3),  # the old default
              dict(BLOCK_1=128, BLOCK_2=128, BLOCK_R=64, num_warps=4, num_stages=4),
              dict(BLOCK_1=128, BLOCK_2=128, BLOCK_R=32, num_warps=8, num_stages=4),
              dict(BLOCK_1=128, BLOCK_2=256, BLOCK_R=64, num_warps=8, num_stages=4),
              dict(BLOCK_1=256, BLOCK_2=128, BLOCK_R=64, num_warps=8, num_stages=3),
              dict(BLOCK_1=128, BLOCK_2=256, BLOCK_R=32, num_warps=8, num_stages=5),
              dict(BLOCK_1=64, BLOCK_2=256, BLOCK_R=64, num_warps=4, num_stages=4)],
    "gate_up": [dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
                dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
                dict(BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=3)],
    "rows": [dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
             dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
             dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4)],
    # the SwiGLU backward (1.94 ms for its 0.4 TFLOP on the H200) re-reads each gathered go tile once per
    # BLOCK_N columns of I: wider tiles read it less, at the price of registers in its epilogue
    "swiglu_bwd": [dict(BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4),
                   dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
                   dict(BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=4),
                   dict(BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=4)],
}


def tune(device, args, rows, shape=(16384, 2048, 768, 128, 8)):
    """fwd+bwd of the Triton backend at the GPU train shape with one kernel's config changed at a time
    (kernels/moe.py's _CONFIGS_GPU), then with the row tile (the dispatch padding) at 64: which block
    sizes to keep. Prints a row per try as it finishes. (shape: (T, H, I, E, K), smaller for a dry run.)"""
    from reasonrl.kernels import moe as M

    T, H, I, E, K = shape
    x, ids, w, gu, wd = make_inputs(T, H, I, E, K, torch.bfloat16, device)
    g = torch.randn(T, H, device=device).to(torch.bfloat16)

    def fb():
        moe_experts(x, ids, w, gu, wd, backend="triton").backward(g)
        for t in (x, w, gu, wd):
            t.grad = None

    def run(kernel, cfg):
        try:
            ms = time_ms(fb, device, args.warmup, args.rep)
        except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is a row, not the end
            ms, cfg = float("nan"), {**cfg, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
        rows.append({"shape": "tune", "impl": f"triton {kernel}", "config": str(cfg), "fwd+bwd_ms": ms})
        measured(rows[-1])

    run("defaults", {})
    if grouped_mm_variant_status(device, torch.bfloat16, H, I) is None:
        for v in GROUPED_MM_VARIANTS:
            with via_grouped_mm(device, v):
                run(v, {"impl": "torch._grouped_mm"})
    base = {k: dict(v) for k, v in M._CONFIGS_GPU.items() if isinstance(v, dict)}
    for kernel, cands in TUNE_CANDIDATES.items():
        for cfg in cands:
            M._CONFIGS_GPU[kernel] = cfg
            run(kernel, cfg)
        M._CONFIGS_GPU[kernel] = base[kernel]
    orig = M._block_m
    M._block_m = lambda dev, rpe, dt: 64 if dev.type == "cuda" and rpe >= 256 else orig(dev, rpe, dt)
    try:
        run("row tile", {"BLOCK_M": 64})
    finally:
        M._block_m = orig


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the anchor shape on the GPU")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--only", choices=["train", "qwen3", "decode"], default=None)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (>= 1: the first call's set-up "
                   "cost landed in the timings, a negative bwd = (fwd+bwd) - fwd at 0)")
    p.add_argument("--rep", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the JSON line to this file")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one call of ours per shape")
    p.add_argument("--tune", action="store_true", help="GPU: block configs of the Triton kernels, one kernel at a time "
                   "(TUNE_CANDIDATES), instead of the comparison")
    p.add_argument("--no-pin", action="store_true",
                   help="CPU: keep glibc's dynamic mmap threshold (what a training process has): truer times, "
                        "but the peak-memory column then misses freed heap memory")
    a = p.parse_args()
    if a.warmup < 1:
        p.error("--warmup must be >= 1")
    if not a.gpu and not a.no_pin:
        exec_with_fixed_mmap_threshold()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.gpu else "cpu")
    if a.gpu and not torch.cuda.is_available():
        sys.exit("--gpu asked for, but torch sees no CUDA device")
    gpu = device.type == "cuda"
    a.rep = a.rep or (20 if gpu else 15)
    ceil = ceilings(device)
    print(f"device: {device_name(device)}; measured {ceil['mm_dtype']} matmul {ceil['mm_flops'] / 1e12:.3f} TFLOP/s")
    rows = []
    if a.tune:
        if not gpu:
            sys.exit("--tune is for the GPU (--gpu)")
        tune(device, a, rows)
        print_table(rows, ["impl", "config", "fwd+bwd_ms"])
        emit_json({"bench": "moe-tune", "device": device_name(device), "rows": rows}, a.json)
        return
    if gpu:
        shapes = [("train", 16384, 2048, 768, 128, 8, False), ("decode", 64, 2048, 768, 128, 8, True)]
        dtype = torch.bfloat16
    else:
        shapes = [("train", 512, 128, 64, 32, 4, False), ("qwen3", 512, 128, 48, 128, 8, False),
                  ("decode", 16, 128, 64, 32, 4, True), ("decode", 16, 128, 48, 128, 8, True)]
        dtype = torch.float32
    for name, T, H, I, E, K, decode in shapes:
        if a.only in (None, name):
            bench_shape(name, T, H, I, E, K, dtype, device, ceil, a, rows, decode)
    cols = ["shape", "impl", "T", "E", "K", "I", "dtype", "fwd_ms", "fwd+bwd_ms", "TFLOP/s", "floor_ms", "x_floor",
            "peak_extra_MiB", "speedup_vs_loop"]
    print_table(rows, cols)
    emit_json({"bench": "moe", "device": device_name(device), "ceilings": ceil, "rows": rows}, a.json)


if __name__ == "__main__":
    main()
