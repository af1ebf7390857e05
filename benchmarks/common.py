"""Shared benchmark plumbing: timing, peak memory, measured ceilings, a table and a JSON line.

Timing: CUDA events around each call after warm-up (median of `rep`); on CPU, perf_counter.
Peak memory: extra bytes above what was allocated before the call (inputs excluded, outputs and
gradients included): torch.cuda.max_memory_allocated on GPU; on CPU, the process's peak resident
set (VmHWM, reset through /proc/self/clear_refs) above its resident set before the call.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup=2, rep=10, min_s=0.0):
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    t_end = time.perf_counter() + min_s
    while len(ts) < rep or time.perf_counter() < t_end:
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        if len(ts) >= 10 * rep:
            break
    return statistics.median(ts)


def peak_extra_bytes(fn, device):
    """Peak bytes allocated by one call of fn above the bytes allocated before it."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _cpu_peak_rss_delta(fn)


def exec_with_fixed_mmap_threshold():
    """Re-run this process with glibc's mmap threshold pinned at 64 KiB (CPU peak memory only).

    glibc raises its threshold after large frees, up to 32 MiB, so later allocations come from the
    heap and stay resident after free: the peak-RSS mark would then miss them. Pinned, every large
    tensor is its own mapping and the resident set follows the live bytes.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        import sys

        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak_rss_delta(fn):
    """CPU: reset the kernel's peak-RSS mark (Linux clear_refs 5), run, read VmHWM - VmRSS before.

    Counts every page the call touches (torch, the C++ extension, Triton), not just tensors; large
    allocations come from mmap and go back to the OS when freed, so the mark before is the baseline.
    """
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kib("VmRSS")
    fn()
    return max(0, _rss_kib("VmHWM") - before) * 1024


_CEIL = {}


def ceilings(device, dtype=torch.bfloat16):
    """Measured copy bandwidth (bytes read + written per second) and matmul rate on `device`."""
    key = (device.type, dtype)
    if key in _CEIL:
        return _CEIL[key]
    n = (1 << 30) if device.type == "cuda" else (1 << 25)
    a = torch.randn(n, device=device, dtype=torch.float32).to(dtype if device.type == "cuda" else torch.float32)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), device, 2, 10)
    bw = 2 * a.numel() * a.element_size() / (ms / 1e3)
    a = b = None  # freed before the matmul operands
    m = 8192 if device.type == "cuda" else 1024
    mdt = dtype if device.type == "cuda" else torch.float32
    x = torch.randn(m, m, device=device, dtype=mdt)
    y = torch.randn(m, m, device=device, dtype=mdt)
    ms = time_ms(lambda: x @ y, device, 2, 10)
    flops = 2 * m**3 / (ms / 1e3)
    _CEIL[key] = {"copy_Bps": bw, "mm_flops": flops, "mm_dtype": str(mdt).replace("torch.", "")}
    return _CEIL[key]


def proc_kib(field: str) -> int:
    """A KiB field of /proc/self/status (VmRSS, VmHWM); OSError where there is none (not Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def print_table(rows, cols):
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def measured(row: dict) -> None:
    """Print one row as soon as it is measured (flushed), so that a run cut off by a timeout (the GPU
    check's stage caps) still leaves every finished row in its log."""
    print(f"# measured {json.dumps(row)}", flush=True)


def emit_json(obj, path=None):
    line = json.dumps(obj)
    if path:
        with open(path, "w") as f:
            f.write(line + "\n")
    print(line)


def profile_table(fn, device, title, rows=20):
    """One call of fn under torch.profiler (after the timed runs, so compiles and graph captures are
    done): the ops and kernels that took the most device (or CPU) time, and the call's wall time.
    For finding where a step's time goes; the numbers in tables come from the timed runs."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    wall = (time.perf_counter() - t) * 1e3
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"# profile: {title}: one call {wall:.2f} ms wall under the profiler")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))
