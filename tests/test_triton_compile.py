"""The log-prob, paged-KV, decode-step, sampler and training-step Triton kernels compile for sm_90a as launched on a GPU.

The CPU interpreter accepts code that compiled Triton rejects (types of loop-carried values, dot
shapes under 16, ...), and these kernels' tests here run only interpreted. So each kernel is
compiled to PTX and a cubin for sm_90a with the GPU launch settings (BLOCK 4096 and 8 warps for the
log-prob rows; padded head groups, block sizes that are not powers of two and both dot precisions
for decode attention). No GPU is needed; the compile runs in a subprocess without TRITON_INTERPRET.
The GRPO and MoE kernels have their own compile tests (test_grpo_loss.py, test_moe_triton.py).
"""
import json

import pytest
import torch
from sm90 import available, compile_sm90, report_of


def _c(fn, ptrs, scalars, constexprs, num_warps=4):
    return compile_sm90(fn, ptrs, scalars, constexprs, dict(num_warps=num_warps))


def _builds():
    """(name, compiled kernel) for every variant; the names say what was varied."""
    from reasonrl.kernels import logprobs as L
    from reasonrl.kernels import paged as P

    out = []
    for dt in ("fp32", "bf16", "fp16"):
        for ent in (False, True):
            V = 151936
            out.append((f"logprob_fwd {dt} entropy={ent}", _c(
                L._logprob_fwd_kernel,
                dict(X=f"*{dt}", IDS="*i64", LOGP="*fp32", LSE="*fp32", ENT="*fp32"),
                dict(stride_x=V, V=V, inv_t=0.7, ignore_index=-100),
                dict(WITH_ENT=ent, BLOCK=4096), num_warps=8)))
            out.append((f"logprob_bwd {dt} entropy={ent}", _c(
                L._logprob_bwd_kernel,
                dict(G=f"*{dt}", X=f"*{dt}", IDS="*i64", LSE="*fp32", ENT="*fp32", GLOGP="*fp32", GENT="*fp32"),
                dict(stride_g=V, stride_x=V, V=V, vocab_start=8192, inv_t=0.7, ignore_index=-100),
                dict(WITH_ENT=ent, BLOCK=4096), num_warps=8)))
    # (cache dtype, kv heads, query heads per kv head, head dim, block size): Qwen2.5-0.5B's shape
    # (2 kv heads, 7 per group, 64), Llama-style 8 x 4 x 128, an odd block size and an odd head dim
    for dt, Hkv, G, D, BS in (("bf16", 2, 7, 64, 16), ("fp16", 8, 4, 128, 32), ("fp32", 4, 1, 32, 17),
                              ("bf16", 1, 16, 80, 24)):
        BD = max(16, 1 << (D - 1).bit_length())
        prec = "ieee" if dt == "fp32" else "tf32"
        out.append((f"paged_decode_split {dt} Hkv={Hkv} G={G} D={D} BS={BS}", _c(
            P._paged_decode_split_kernel,
            dict(q_ptr=f"*{dt}", kc_ptr=f"*{dt}", vc_ptr=f"*{dt}", table_ptr="*i32", lens_ptr="*i32",
                 mid_o_ptr="*fp32", mid_lse_ptr="*fp32"),
            dict(scale=0.125, stride_qb=Hkv * G * D, stride_qh=D, stride_cb=BS * Hkv * D, stride_cs=Hkv * D,
                 stride_ch=D, stride_tb=37, split_len=256, S=4),
            dict(BS=BS, G=G, D=D, BLOCK_G=max(16, 1 << (G - 1).bit_length()), BLOCK_D=BD, BLOCK_N=32,
                 PRECISION=prec, UPCAST=False))))
        out.append((f"paged_decode_reduce {dt} D={D}", _c(
            P._paged_decode_reduce_kernel, dict(mid_o_ptr="*fp32", mid_lse_ptr="*fp32", out_ptr=f"*{dt}"),
            dict(stride_ob=Hkv * G * D, stride_oh=D, Hq=Hkv * G, S=3),
            dict(D=D, BLOCK_S=4, BLOCK_D=BD))))
        out.append((f"store_kv {dt} Hkv={Hkv} D={D}", _c(
            P._store_kv_kernel, dict(k_ptr="*bf16", v_ptr="*bf16", kc_ptr=f"*{dt}", vc_ptr=f"*{dt}", slot_ptr="*i64"),
            dict(stride_kt=3 * Hkv * D, stride_kh=D, stride_vt=3 * Hkv * D, stride_vh=D, stride_cs=Hkv * D,
                 stride_ch=D),
            dict(H=Hkv, D=D, BLOCK_H=1 << (Hkv - 1).bit_length(), BLOCK_D=BD))))
    from reasonrl.kernels import decode as Dk

    # the GPU decode step's elementwise kernels (Qwen2.5-0.5B's widths: hidden 896, 14 / 2 heads of 64,
    # intermediate 4864), with the launch settings of kernels/decode.py
    for dt in ("bf16", "fp16", "fp32"):
        for res in (False, True):
            out.append((f"add_rms_norm {dt} residual={res}", _c(
                Dk._add_rms_norm_kernel,
                dict(X=f"*{dt}", R=f"*{dt}", W=f"*{dt}", Y=f"*{dt}", S=f"*{dt}", RSTD="*fp32"),
                dict(stride_x=896, stride_r=896, stride_y=896, stride_s=896, N=896, eps=1e-6),
                dict(HAS_RES=res, STORE_RSTD=False, BLOCK=1024), num_warps=4)))
        out.append((f"rope_store_kv {dt}", _c(
            Dk._rope_store_kv_kernel,
            dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", COS="*fp32", SIN="*fp32", QO=f"*{dt}", KC=f"*{dt}", VC=f"*{dt}",
                 SLOT="*i64"),
            dict(stride_qt=896, stride_qh=64, stride_kt=128, stride_kh=64, stride_vt=128, stride_vh=64, stride_ct=32,
                 stride_cs=128, stride_ch=64),
            dict(HQ=14, HKV=2, HALF=32, BLOCK_H=16, BLOCK_D=32), num_warps=2)))
        out.append((f"silu_mul {dt}", _c(
            Dk._silu_mul_kernel, dict(G=f"*{dt}", U=f"*{dt}", O=f"*{dt}"),
            dict(stride_g=4864, stride_u=4864, stride_o=4864, N=4864), dict(BLOCK=1024), num_warps=4)))
    from reasonrl.kernels import fused as Fk

    # the training step's passes (kernels/fused.py): float32 residual stream under autocast, bf16 q/k/g/u
    for xdt, wdt, ydt in (("fp32", "fp32", "fp32"), ("bf16", "bf16", "bf16"), ("fp32", "fp32", "bf16")):
        out.append((f"rms_fwd {xdt} -> {ydt}", _c(  # the training forward: decode's kernel keeping rsqrt per row
            Dk._add_rms_norm_kernel, dict(X=f"*{xdt}", R=f"*{xdt}", W=f"*{wdt}", Y=f"*{ydt}", S=f"*{xdt}", RSTD="*fp32"),
            dict(stride_x=896, stride_r=896, stride_y=896, stride_s=896, N=896, eps=1e-6),
            dict(HAS_RES=False, STORE_RSTD=True, BLOCK=1024))))
        if xdt != ydt:  # add_rms_norm's forward: float32 residual + bf16 attention output, bf16 out
            out.append(("add_rms_fwd fp32 + bf16 -> bf16", _c(
                Dk._add_rms_norm_kernel, dict(X="*fp32", R="*bf16", W="*fp32", Y="*bf16", S="*fp32", RSTD="*fp32"),
                dict(stride_x=896, stride_r=896, stride_y=896, stride_s=896, N=896, eps=1e-6),
                dict(HAS_RES=True, STORE_RSTD=True, BLOCK=1024))))
        fused = xdt != ydt  # add_rms_norm's backward: the residual's gradient added, da written in bf16
        out.append((f"rms_bwd {xdt} (g {ydt})", _c(Fk._rms_bwd_kernel,
                                         dict(G=f"*{ydt}", X=f"*{xdt}", W=f"*{wdt}", R="*fp32", DX=f"*{xdt}", DW="*fp32",
                                              GS=f"*{xdt}", DA=f"*{ydt}"),
                                         dict(stride_g=896, stride_x=896, stride_dx=896, stride_gs=896, stride_da=896,
                                              M=8192, N=896, rows_per_prog=16),
                                         dict(HAS_GS=fused, HAS_DA=fused, BLOCK=1024))))
    for dt in ("bf16", "fp32"):
        out.append((f"rope {dt}", _c(Fk._rope_kernel, dict(X=f"*{dt}", COS="*fp32", SIN="*fp32", Y=f"*{dt}"),
                                     dict(stride_xt=1152, stride_xh=64, stride_yt=1152, stride_yh=64, stride_ct=32,
                                          sign=-1.0, H=16),
                                     dict(HALF=32, BLOCK_H=16, BLOCK_D=32), num_warps=4)))
        out.append((f"swiglu_bwd {dt}", _c(Fk._swiglu_bwd_kernel,
                                           dict(DH=f"*{dt}", G=f"*{dt}", U=f"*{dt}", H_OUT=f"*{dt}", DGU=f"*{dt}"),
                                           dict(stride_dh=4864, stride_g=9728, stride_u=9728, N=4864),
                                           dict(BLOCK=1024))))
    from reasonrl.kernels import sample as S

    # the rollout sampler (kernels/sample.py) on Qwen2's vocabulary, bf16 and float32 logits
    for dt in ("bf16", "fp32"):
        out.append((f"sample_partial {dt}", _c(
            S._sample_partial_kernel, dict(L=f"*{dt}", TEMP="*fp32", PM="*fp32", PS="*fp32"),
            dict(stride_l=151936, V=151936, NS=38), dict(CHUNK=S.CHUNK, SEG_CHUNKS=S.SEG_CHUNKS))))
        out.append((f"sample_pick {dt}", _c(
            S._sample_pick_kernel, dict(L=f"*{dt}", TEMP="*fp32", U="*fp32", PM="*fp32", PS="*fp32", TOK="*i64",
                                        LP="*fp32"),
            dict(stride_l=151936, V=151936, NS=38), dict(BLOCK_S=64, CHUNK=S.CHUNK, SEG_CHUNKS=S.SEG_CHUNKS))))
    return out


@pytest.mark.skipif(not available(), reason="triton without its NVIDIA backend")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gpu tests compile and run the kernels")
def test_logprob_and_paged_kernels_compile_for_sm90():
    report = report_of(__file__)
    assert len(report) == 6 * 2 + 4 * 3 + 3 * 4 + 8 + 7, sorted(report)
    for name, rep in report.items():
        assert rep["cubin"], f"{name}: no cubin"
        assert rep["shared"] <= 227 * 1024, f"{name}: {rep['shared']} bytes of shared memory"
        if name.startswith("paged_decode_split") and "fp32" not in name:
            # both products on tensor cores: the reason the head group is padded to 16 rows
            assert rep["mma"], f"{name}: tl.dot did not become an MMA"


if __name__ == "__main__":  # the subprocess of the test above
    report = {}
    for name, k in _builds():
        ttgir = k.asm["ttgir"]
        report[name] = dict(cubin=len(k.asm.get("cubin", b"")) > 0, shared=k.metadata.shared,
                            mma="nvidia_mma" in ttgir or "warp_group_dot" in ttgir)
    print(json.dumps(report))
