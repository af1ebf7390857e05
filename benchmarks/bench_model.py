"""Training-step throughput of the lean decoder beside transformers' model of the same config.

One step = forward + backward of the mean next-token log-prob (no optimizer step):
  ours: packed tokens (no padding) -> hidden -> reasonrl.ops.linear_token_logprobs (no N x V logits)
  transformers: right-padded (B, T) batch, attn_implementation="sdpa" -> logits -> log_softmax ->
      gather, the code a user writes (masked to the real tokens)
Both start from the same random weights (the state dict names are the same). On GPU both keep fp32
parameters and run under torch.autocast(bfloat16); the fused op gets bf16 hidden/weight, as autocast
would give a Linear. Tokens/s counts real (non-pad) tokens. Peak memory: extra bytes above the
weights during one step, gradients included: on GPU torch.cuda.max_memory_allocated
(benchmarks/common.py); on CPU the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after malloc_trim) over one step, because torch 2.13's CPU profiler records
frees but no allocations. The two backends are timed in alternation, so that the load of a shared
machine hits both alike; the table gives medians.
Floor: model FLOPs (6 x matmul params x tokens + causal attention 6 x L x Hq x D x sum(len^2))
over the measured matmul rate.

NOTE: measured on an H200 (torch 2.11, transformers 5.17, no flash-attn), 2 x 4096 tokens, bf16
autocast, at commit 2b5fd1c (before the SwiGLU/RoPE autograd Functions, not re-measured since), when
the peaks left out both sides' fp32 gradients (1.84 and 5.7 GiB; counted since 2026-11-29):
    Qwen2.5-0.5B: 122.8 ms, 13.1 GiB  vs transformers 131.1 ms, 27.5 GiB  (1.07x, 0.48x memory)
    Qwen2.5-1.5B: 230.1 ms, 25.2 GiB  vs transformers 241.3 ms, 38.9 GiB  (1.05x, 0.65x memory)
    Qwen2.5-1.5B --ckpt: 284.7 ms, 1.67 GiB                           (0.85x, 0.04x memory)

    python benchmarks/bench_model.py                 # CPU: the built-in tiny model, 64 seqs of 32-64 tokens
    python benchmarks/bench_model.py --gpu           # Qwen2.5-0.5B and 1.5B shapes, 2 x 4096 tokens
    python benchmarks/bench_model.py --preset qwen2.5-1.5b --batch 4 --seq 4096 --ckpt
    python benchmarks/bench_model.py --preset qwen2.5-0.5b --batch 2 --seq 16 --count-ops --amp-cpu --narrow
                                                     # ops one step dispatches (what a GPU step launches;
                                                     # on CPU the attention and LM-head ops are CPU's own)
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ceilings, device_name, emit_json, measured, peak_extra_bytes, print_table,  # noqa: E402
                    proc_kib, profile_table, sync)

from reasonrl.models import AttnContext, CausalLM, ModelConfig, builtin_path  # noqa: E402
from reasonrl.ops import linear_token_logprobs  # noqa: E402

GiB = float(1 << 30)
PRESETS = {  # public config.json numbers of the Qwen2.5 models (random weights here)
    "qwen2.5-0.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=32768),
}


def make_config(name, narrow=False):
    """narrow: the preset's layers, heads, biases and tying at a small width (hidden 64, head_dim 16,
    intermediate 128, vocab 512): the same ops per step, counted in seconds (--count-ops)."""
    if name == "tiny":
        return ModelConfig.from_json(builtin_path("tiny"))
    kw = dict(PRESETS[name])
    if narrow:
        kw.update(hidden_size=64, head_dim=16, intermediate_size=128, vocab_size=512)
    return ModelConfig(**kw)


def build_models(cfg, device, seed):
    import transformers
    d = cfg.to_hf_dict()
    hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **{k: v for k, v in d.items() if v is not None})
    torch.manual_seed(seed)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
        ours = CausalLM(cfg)
    missing = ours.load_state_dict(hf.state_dict(), strict=False).missing_keys
    assert not missing, f"weights not shared: {missing[:3]}"
    return ours.train(), hf.train()


def make_batch(cfg, B, T, vary, device, seed):
    g = torch.Generator().manual_seed(seed)
    lens = (torch.randint(T // 2, T + 1, (B,), generator=g) if vary else torch.full((B,), T)).tolist()
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lens]
    packed = torch.cat(seqs).to(device)
    pos = torch.cat([torch.arange(n) for n in lens]).to(device)
    tgt = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs]).to(device)  # next token
    padded = torch.zeros(B, T, dtype=torch.int64)
    labels = torch.full((B, T), -100, dtype=torch.int64)
    for b, s in enumerate(seqs):
        padded[b, : len(s)] = s
        labels[b, : len(s) - 1] = s[1:]
    mask = (torch.arange(T)[None] < torch.tensor(lens)[:, None]).long()
    return dict(lens=lens, packed=packed, pos=pos, tgt=tgt, ctx=AttnContext.from_lengths(lens, device=device),
                padded=padded.to(device), labels=labels.to(device), mask=mask.to(device))


def step_ours(model, b, amp, device, keep_logits=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        h = model(b["packed"], b["pos"], b["ctx"])  # (N, H)
        w = model.lm_head_weight
        if amp:
            h, w = h.to(torch.bfloat16), w.to(torch.bfloat16)
    lp = linear_token_logprobs(h, w, b["tgt"], keep_logits=keep_logits)  # (N,) float32, 0 at ignore_index
    loss = -lp.sum() / (b["tgt"] != -100).sum()
    loss.backward()
    return loss.detach()


def _unfused(step, *a, key="cpu"):
    """step with models.functional.FUSED[key] off: "cpu", PyTorch's elementwise ops on CPU; "step", the
    launch-cutting packing of the step (q/k/v GEMM with RoPE inside, residual adds inside the norms,
    float32-writing weight-gradient GEMMs) off."""
    from reasonrl.models import functional as Fn
    Fn.FUSED[key] = False
    try:
        return step(*a)
    finally:
        Fn.FUSED[key] = True


def step_hf(model, b, amp, device):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(input_ids=b["padded"], attention_mask=b["mask"]).logits  # (B, T, V)
    keep = b["labels"] != -100
    lp = torch.log_softmax(logits.float(), -1).gather(-1, b["labels"].clamp(min=0)[..., None])[..., 0]
    loss = -(lp * keep).sum() / keep.sum()
    loss.backward()
    return loss.detach()


def peak_bytes(fn, device):
    """Peak extra bytes of one call of fn (see the module docstring for how, per device)."""
    if device.type == "cuda":
        return peak_extra_bytes(fn, device)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = proc_kib("VmRSS")
    except OSError:
        return peak_extra_bytes(fn, device)
    fn()
    return (proc_kib("VmHWM") - base) * 1024


def time_alternating(fns, device, warmup, rep):
    """Median ms of each fn, calls interleaved: a, b, a, b, ..."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    ts = [[] for _ in fns]
    for _ in range(rep):
        for i, fn in enumerate(fns):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            ts[i].append((time.perf_counter() - t) * 1e3)
    return [statistics.median(t) for t in ts]


# Ops that make views or metadata, not a kernel launch (a GPU step's host cost is mostly its launches)
_VIEW_OPS = {"view", "_unsafe_view", "detach", "t", "transpose", "permute", "expand", "alias", "as_strided", "slice",
             "select", "split", "split_with_sizes", "unsqueeze", "squeeze", "_reshape_alias", "lift_fresh", "empty",
             "empty_like", "new_empty", "empty_strided"}


def count_ops(fn):
    """The ATen (and reasonrl) ops one call of fn dispatches and the Triton kernels it launches, forward
    and backward, by name: a count of what a GPU step launches (views and allocations left out).
    -> (total, {name: count})."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = Counter()

        inside = 0  # >0 while a Triton launch runs (the interpreter's own copies are not the step's)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in _VIEW_OPS and not self.inside:
                self.n[f"{func.namespace}.{name}"] += 1
            return func(*args, **(kwargs or {}))

    c = Count()
    patched = []  # Triton kernels launch without the dispatcher: counted at their launch
    try:
        from triton.runtime import interpreter, jit
        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            def run(self, *a, _run=cls.run, **kw):
                if not c.inside:
                    c.n[f"triton.{getattr(self, '__name__', None) or getattr(self.fn, '__name__', '?')}"] += 1
                c.inside += 1
                try:
                    return _run(self, *a, **kw)
                finally:
                    c.inside -= 1
            patched.append((cls, cls.run))
            cls.run = run
    except ImportError:
        pass
    try:
        with c:
            fn()
    finally:
        for cls, orig in patched:
            cls.run = orig
    return sum(c.n.values()), dict(c.n.most_common())


def flops(cfg, lens):
    H, I, nl = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    qkvo = H * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    per_tok = nl * (qkvo + 3 * H * I) + cfg.vocab_size * H
    attn = 6 * nl * cfg.num_attention_heads * cfg.head_dim * sum(n * n for n in lens)
    return 6 * per_tok * sum(lens) + attn


def run(preset, B, T, vary, device, amp, ckpt, hf_ckpt, rep, profile=False, ops_only=False, narrow=False):
    cfg = make_config(preset, narrow)
    ours, hf = build_models(cfg, device, seed=0)
    ours.gradient_checkpointing = ckpt
    if hf_ckpt:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    b = make_batch(cfg, B, T, vary, device, seed=1)
    ntok = sum(b["lens"])
    l_ours, l_hf = step_ours(ours, b, amp, device).item(), step_hf(hf, b, amp, device).item()
    if ops_only:
        rows = []
        unpacked = functools.partial(_unfused, step_ours, key="step")
        for name, step, model in (("reasonrl", step_ours, ours), ("transformers", step_hf, hf),
                                  ("reasonrl, step packing off", unpacked, ours)):
            n, by = count_ops(lambda: step(model, b, amp, device))
            top = ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in list(by.items())[:6])
            rows.append(dict(preset=preset + (" (narrow)" if narrow else ""), backend=name, B=B, T=T, dtype="bf16-autocast" if amp else "fp32",
                             ops=n, ops_per_layer=n / cfg.num_hidden_layers, top=top, by_op=by))
        for r in rows[:1] + rows[2:]:
            r["vs_transformers"] = r["ops"] / rows[1]["ops"]
        return rows
    ceil = ceilings(device)
    fl = flops(cfg, b["lens"])
    rows = []
    fns = {"reasonrl": lambda: step_ours(ours, b, amp, device), "transformers": lambda: step_hf(hf, b, amp, device)}
    if device.type == "cpu":  # an ablation: the fused C++ elementwise passes off (models.functional.FUSED)
        fns["reasonrl, PyTorch elementwise"] = lambda: _unfused(step_ours, ours, b, amp, device)
    else:  # an ablation: the packing that only cuts launches off (what it buys a host-bound step)
        fns["reasonrl, step packing off"] = lambda: _unfused(step_ours, ours, b, amp, device, key="step")
    # the LM head's logits kept from forward to backward (linear_token_logprobs keep_logits: no recompute,
    # N x V in the compute dtype alive from forward to backward; its peak is in the row)
    fns["reasonrl, logits kept"] = lambda: step_ours(ours, b, amp, device, keep_logits=True)
    times = time_alternating(list(fns.values()), device, warmup=1, rep=rep)
    for (name, fn), ms in zip(fns.items(), times):
        if profile:
            profile_table(fn, device, f"{preset} training step, {name}")
        # the gradients counted: freed before the baseline (each step sets them to None first, so
        # gradients left from the last call were in the baseline and the step's own were not counted)
        ours.zero_grad(set_to_none=True)
        hf.zero_grad(set_to_none=True)
        peak = peak_bytes(fn, device)
        rows.append(dict(preset=preset, backend=name, B=B, T=T, tokens=ntok, lengths="vary" if vary else "equal",
                         dtype="bf16-autocast" if amp else "fp32", ckpt=ckpt if name.startswith("reasonrl") else hf_ckpt,
                         ms=ms, tok_per_s=ntok / (ms / 1e3), peak_GiB=peak / GiB,
                         TFLOPs=fl / (ms / 1e3) / 1e12, floor_ms=fl / ceil["mm_flops"] * 1e3, x_floor=ms / (fl / ceil["mm_flops"] * 1e3)))
    for r in rows[:1] + rows[2:]:
        r["speedup"] = rows[1]["ms"] / r["ms"]
        r["mem_ratio"] = r["peak_GiB"] / rows[1]["peak_GiB"]
    rows[0]["loss_diff"] = abs(l_ours - l_hf)  # same weights and tokens: should agree
    for r in rows:
        measured(r)
    fns = ours = hf = b = None  # freed before empty_cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="the GPU shapes: Qwen2.5-0.5B and 1.5B at --seq 4096")
    ap.add_argument("--preset", action="append", choices=["tiny", *PRESETS], help="repeatable")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--lengths", choices=["vary", "equal"], default=None,
                    help="vary: lengths uniform in [seq/2, seq] (default on CPU); equal (default on GPU)")
    ap.add_argument("--ckpt", action="store_true", help="activation checkpointing in our model")
    ap.add_argument("--hf-ckpt", action="store_true", help="activation checkpointing in transformers' model")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    ap.add_argument("--rep", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the JSON line to this file")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step of each side")
    ap.add_argument("--count-ops", action="store_true",
                    help="no timing: count the ops one step of each side dispatches (views left out), on any device; "
                         "--amp-cpu counts the autocast path on CPU")
    ap.add_argument("--amp-cpu", action="store_true", help="bf16 autocast on CPU too (as on GPU)")
    ap.add_argument("--triton-cpu", action="store_true",
                    help="with --count-ops on CPU: the GPU path (its Triton kernels through the interpreter; "
                         "needs TRITON_INTERPRET=1) instead of the C++ kernels")
    ap.add_argument("--narrow", action="store_true",
                    help="the presets at a small width (hidden 64, vocab 512), their layer and head counts kept")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.gpu and not torch.cuda.is_available():  # was an AssertionError traceback from deep inside torch
        sys.exit("--gpu asked for, but torch sees no CUDA device")
    device = torch.device("cuda" if a.gpu or (a.preset and a.preset != ["tiny"] and torch.cuda.is_available()) else "cpu")
    presets = a.preset or (list(PRESETS) if a.gpu else ["tiny"])
    gpu = device.type == "cuda"
    B = a.batch or (2 if gpu else 64)
    T = a.seq or (4096 if gpu else 64)
    vary = (a.lengths or ("equal" if gpu else "vary")) == "vary"
    if a.triton_cpu:
        from reasonrl.models import functional as Fn
        Fn.FUSED["force"] = True
    rows = []
    for p in presets:
        rows += run(p, B, T, vary, device, amp=(gpu or a.amp_cpu) and not a.fp32, ckpt=a.ckpt, hf_ckpt=a.hf_ckpt,
                    rep=a.rep or (5 if gpu else 7), profile=a.profile, ops_only=a.count_ops, narrow=a.narrow)
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    if a.count_ops:
        print_table(rows, ["preset", "backend", "B", "T", "dtype", "ops", "ops_per_layer", "vs_transformers", "top"])
        emit_json({"bench": "model-ops", "device": device_name(device), "rows": rows}, a.json)
        return
    print_table(rows, ["preset", "backend", "B", "T", "tokens", "lengths", "dtype", "ckpt", "ms", "tok_per_s",
                       "peak_GiB", "TFLOPs", "floor_ms", "x_floor", "speedup", "mem_ratio", "loss_diff"])
    emit_json({"bench": "model", "device": device_name(device), "rows": rows}, a.json)


if __name__ == "__main__":
    main()
