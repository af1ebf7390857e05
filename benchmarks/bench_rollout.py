"""Rollout throughput and KV memory: reasonrl's paged engine beside transformers' generate.

    python benchmarks/bench_rollout.py           # CPU: the built-in tiny model, 8 prompts x 8 samples
    python benchmarks/bench_rollout.py --gpu     # Qwen2.5-0.5B shape, random bf16 weights, prompt 128, 256 new

Both sides get the same weights, dtype, threads, batch (P prompts x G samples), prompt lengths,
number of new tokens (EOS ignored, so every sample generates exactly --new tokens), sampling
(temperature 1, no top-k / top-p) and a KV cache (transformers: use_cache, --hf-cache dynamic or
static). Throughput = generated tokens / wall time of one whole generate call (median of --rep
calls, the two sides alternating, after a warm-up call each), KV allocation and CUDA-graph capture
included.
KV memory: ours = the peak of blocks in use x bytes per block; transformers' = its dense cache of
P*G rows x (prompt + new - 1) positions (computed from the shapes). The per-group ratio divides the
token slots we held at the peak by the tokens of one prompt plus its G completions, per group.
Floor (GPU): every decode step reads all weights once: steps x weight bytes / copy bandwidth.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ceilings, device_name, emit_json, measured, print_table, profile_table, time_ms  # noqa: E402

from reasonrl.engine import LLMEngine, SamplingParams  # noqa: E402
from reasonrl.ops import _backend  # noqa: E402
from reasonrl.ops.paged import paged_attention_decode  # noqa: E402
from reasonrl.models import builtin_path, init_model, save_model  # noqa: E402

QWEN25_05B = {  # Qwen2.5-0.5B's config.json (architecture only)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16",
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns, device, rep):
    """Median seconds of each fn; the calls alternate (a, b, a, b, ...) so that a load that comes and
    goes on a shared machine hits every side alike. One warm-up call each (CUDA graphs, Triton)."""
    for fn in fns:
        fn()
    ts = [[] for _ in fns]
    for _ in range(rep):
        for fn, t_fn in zip(fns, ts):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            t_fn.append(time.perf_counter() - t)
    return [statistics.median(t) for t in ts]


def build_models(args, device, dtype, folder):
    if args.gpu:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(QWEN25_05B, f)
        model = init_model(folder, seed=0, dtype=dtype, device=device)
    else:
        model = init_model(builtin_path("tiny"), seed=0, dtype=dtype, device=device)
    save_model(model, folder)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return model, hf


def bench_decode_op(cfg, head_dim, B, ctx, block_size, device, dtype):
    """The paged decode op alone, every available backend, at one decode step of the rollout."""
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim
    M = (ctx + block_size - 1) // block_size
    kc = torch.randn(B * M + 1, block_size, Hkv, D, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(B, Hq, D, device=device, dtype=dtype)
    tables = torch.randperm(B * M + 1, device=device)[: B * M].view(B, M).int()
    lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    rows, ref_ms = [], None
    kv_bytes = 2 * B * ctx * Hkv * D * dtype.itemsize
    floor_ms = kv_bytes / ceilings(device)["copy_Bps"] * 1e3  # the cache read once, at the copy's traffic rate
    for b in ("reference", "cpp", "triton"):
        if _backend.why_unavailable(b, device) is not None or (b == "triton" and device.type == "cpu"):
            continue
        ms = time_ms(lambda: paged_attention_decode(q, kc, vc, tables, lens, D ** -0.5, backend=b), device, 3, 20)
        ref_ms = ms if b == "reference" else ref_ms
        rows.append({"op": f"paged_attention_decode[{b}]", "shape": f"B={B} Hq={Hq} Hkv={Hkv} D={D} ctx={ctx}",
                     "ms": ms, "GB/s": kv_bytes / ms / 1e6, "floor ms": floor_ms, "x floor": ms / floor_ms,
                     "vs reference": ref_ms / ms})
        measured(rows[-1])
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--rep", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both sides (default: torch's)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-cache", default="dynamic", choices=["dynamic", "static"],
                    help="transformers' KV cache (dynamic: its default and, measured here, its faster on CPU)")
    ap.add_argument("--no-graphs", action="store_true", help="eager decode steps on GPU (no CUDA graphs)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="weights and KV cache of both sides (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one more call of ours")
    args = ap.parse_args()
    if args.gpu and not torch.cuda.is_available():  # was an AssertionError traceback from deep inside torch
        sys.exit("--gpu asked for, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if args.gpu else torch.float32
    P, G = args.prompts, args.samples
    plen = args.prompt_len or (128 if args.gpu else 16)
    new = args.new or (256 if args.gpu else 64)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        model, hf = build_models(args, device, dtype, folder)
    cfg = model.config
    prompts = torch.randint(10, min(cfg.vocab_size, 30000), (P, plen))
    gen_tokens = P * G * new
    rows = []

    eng = LLMEngine(model, block_size=args.block_size, max_num_seqs=max(256, P * G), use_cuda_graphs=not args.no_graphs)
    params = SamplingParams(temperature=1.0, max_tokens=new, ignore_eos=True, seed=0)
    ids = prompts.to(device)
    hf_cache = {"cache_implementation": "static"} if args.hf_cache == "static" else {}  # dynamic: the default

    def hf_generate():  # EOS cannot end a sample early: min_new_tokens masks it, as ignore_eos does ours
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=None,
                               top_p=None, num_return_sequences=G, max_new_tokens=new, min_new_tokens=new,
                               pad_token_id=0, use_cache=True, **hf_cache)

    ours = lambda: eng.generate(prompts.tolist(), params, n=G)  # noqa: E731
    t_ours, *t_hf = timed([ours] + ([] if args.skip_hf else [hf_generate]), device, args.rep)
    st = eng.stats
    bytes_per_block = st["kv_bytes_allocated"] // st["num_blocks"]
    group_ratio = st["peak_blocks_used"] * args.block_size / (P * (plen + G * new))
    rows.append({"impl": "reasonrl LLMEngine (paged)", "tok/s": gen_tokens / t_ours, "seconds": t_ours,
                 "peak KV MiB": st["peak_kv_bytes"] / 2**20, "KV / ideal": group_ratio})

    kv_hf = 2 * cfg.num_hidden_layers * P * G * (plen + new - 1) * cfg.num_key_value_heads * model.head_dim * dtype.itemsize
    if not args.skip_hf:
        t_hf = t_hf[0]
        rows.append({"impl": f"transformers generate (sdpa, {args.hf_cache} cache)", "tok/s": gen_tokens / t_hf,
                     "seconds": t_hf,
                     "peak KV MiB": kv_hf / 2**20, "KV / ideal": P * G * (plen + new - 1) / (P * (plen + G * new))})
    speedup = rows[0]["tok/s"] / rows[1]["tok/s"] if len(rows) > 1 else None

    floor = None
    if args.gpu:
        wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        floor = gen_tokens / (new * wbytes / ceilings(device)["copy_Bps"])
    for r in rows:
        r["floor tok/s"], r["share of floor"] = floor, (r["tok/s"] / floor if floor else None)
        measured(r)
    if args.profile:  # a short call: a whole rollout's tens of thousands of kernels overran the profiler's time
        short = min(new, 32)
        profile_table(lambda: eng.generate(prompts.tolist(), dataclasses.replace(params, max_tokens=short), n=G),
                      device, f"LLMEngine.generate, {P} x {G} samples, {short} new tokens (per decode step: "
                      f"divide by {short})", rows=30)
    op_rows = bench_decode_op(cfg, model.head_dim, P * G, plen + new, args.block_size, device, dtype)
    print(f"device: {device_name(device)}; model {cfg.arch} H={cfg.hidden_size} L={cfg.num_hidden_layers} "
          f"V={cfg.vocab_size} {str(dtype).replace('torch.', '')}; {P} prompts x {G} samples, prompt {plen}, "
          f"{new} new tokens, block size {args.block_size}")
    print_table(rows, ["impl", "tok/s", "seconds", "peak KV MiB", "KV / ideal", "floor tok/s", "share of floor"])
    print(f"speedup vs transformers: {speedup:.2f}x" if speedup else "speedup: transformers skipped")
    print(f"peak blocks {st['peak_blocks_used']} of {st['num_blocks']} ({bytes_per_block} B each), "
          f"preemptions {st['preemptions']}, steps {st['steps']}, CUDA-graph capture {st['graph_capture_s']:.3f} s "
          f"of the last call's {st['seconds']:.3f} s"
          + (f"; weight-read floor {floor:.0f} tok/s" if floor else ""))
    print_table(op_rows, ["op", "shape", "ms", "GB/s", "floor ms", "x floor", "vs reference"])
    emit_json({"ops": op_rows, "bench": "rollout", "device": device_name(device), "prompts": P, "samples": G, "prompt_len": plen,
               "new_tokens": new, "block_size": args.block_size, "ours_tok_s": rows[0]["tok/s"],
               "hf_tok_s": rows[1]["tok/s"] if len(rows) > 1 else None, "speedup": speedup,
               "ours_peak_kv_bytes": st["peak_kv_bytes"], "hf_kv_bytes": kv_hf, "group_kv_ratio": group_ratio,
               "floor_tok_s": floor, "graph_capture_s": st["graph_capture_s"], "threads": torch.get_num_threads(), "hf_cache": args.hf_cache}, args.json)


if __name__ == "__main__":
    main()
