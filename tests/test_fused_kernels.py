"""kernels/fused.py (RMSNorm, RoPE and SwiGLU passes of the GPU training step), forced onto CPU
tensors through Triton's interpreter: values and gradients against float64, held to the error
PyTorch itself makes in the same dtype (tolerance.py), and a whole model's loss and gradients with
and without them."""
import os

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_to_ref

from reasonrl.models import AttnContext, builtin_path, init_model
from reasonrl.models import functional as Fn
from reasonrl.ops import _backend

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not _backend.triton_importable(), reason="triton is not installed")]
# CPU tensors through the interpreter here; CUDA tensors compiled on a GPU machine (pytest -m gpu)
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                        reason="Triton on CPU tensors needs TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def forced():
    Fn.FUSED["force"] = True
    yield
    Fn.FUSED["force"] = False


def rms_torch(x, w, eps):  # models.RMSNorm's PyTorch ops
    xf = x.float() if x.dtype != torch.float64 else x
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def grads(fn, inputs, g, device="cpu"):
    """Output and input gradients of fn, computed on `device`, returned on the CPU."""
    inputs = [t.detach().to(device).requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(g.to(device, out.dtype))
    return [out.detach().cpu()] + [t.grad.cpu() for t in inputs]


@pytest.mark.parametrize("xdt,wdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.float32)])
@pytest.mark.parametrize("M,N", [(1, 16), (37, 100), (130, 576)])
@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm(forced, xdt, wdt, M, N, device):
    x = torch.randn(M, N) * 2
    w = 1 + 0.1 * torch.randn(N)
    g = torch.randn(M, N)
    got = grads(lambda a, b: Fn.rms_norm(a, b, 1e-6), [x.to(xdt), w.to(wdt)], g, device)
    ref64 = grads(lambda a, b: rms_torch(a, b, 1e-6), [x.double(), w.double()], g)
    same = grads(lambda a, b: rms_torch(a, b, 1e-6), [x.to(xdt), w.to(wdt)], g)
    for name, o, r, s in zip(("y", "dx", "dw"), got, ref64, same):
        assert_close_to_ref(o, r, s, o.dtype if o.dtype != torch.float64 else torch.float32, name, factor=3)
    assert got[0].dtype == torch.promote_types(xdt, wdt) and got[2].dtype == wdt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,D", [(1, 1, 2), (13, 7, 12), (40, 20, 64)])
@pytest.mark.parametrize("device", DEVICES)
def test_rope(forced, dtype, T, H, D, device):
    x = torch.randn(T, H + 1, D)[:, :H]  # strided over heads
    ang = torch.rand(T, 1, D // 2) * 100
    cos, sin = ang.cos(), ang.sin()
    g = torch.randn(T, H, D)
    got = grads(lambda a: Fn.apply_rope(a, cos.to(device), sin.to(device)), [x.to(dtype)], g, device)
    Fn.FUSED["force"] = False
    ref64 = grads(lambda a: Fn.apply_rope(a, cos.double(), sin.double()), [x.double()], g)
    same = grads(lambda a: Fn.apply_rope(a, cos, sin), [x.to(dtype)], g)
    for name, o, r, s in zip(("y", "dx"), got, ref64, same):
        assert_close_to_ref(o, r, s, dtype, name, factor=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,H,I", [(1, 8, 8), (33, 24, 100)])
@pytest.mark.parametrize("device", DEVICES)
def test_swiglu(forced, dtype, N, H, I, device):
    x = torch.randn(N, H)
    ws = [torch.randn(I, H) / H ** 0.5, torch.randn(I, H) / H ** 0.5, torch.randn(H, I) / I ** 0.5]
    g = torch.randn(N, H)

    def plain(a, wg, wu, wd):
        return F.linear(F.silu(F.linear(a, wg)) * F.linear(a, wu), wd)

    got = grads(Fn.SwiGLUFunction.apply, [x.to(dtype)] + [w.to(dtype) for w in ws], g, device)
    ref64 = grads(plain, [x.double()] + [w.double() for w in ws], g)
    same = grads(plain, [x.to(dtype)] + [w.to(dtype) for w in ws], g)
    for name, o, r, s in zip(("y", "dx", "dw_gate", "dw_up", "dw_down"), got, ref64, same):
        assert_close_to_ref(o, r, s, dtype, name, factor=3)


@pytest.mark.parametrize("arch", ["tiny", "qwen3"])
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_model_loss_and_grads_with_fused_kernels(arch):
    """A training forward and backward through the model (RMSNorm, q/k norms, RoPE) with the kernels
    forced on, against the same model without them: float32, equal up to float32 rounding."""
    from reasonrl.models import ModelConfig

    cfg = builtin_path("tiny") if arch == "tiny" else ModelConfig(
        arch="qwen3", vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, qk_norm=True)
    model = init_model(cfg, seed=0)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (50,))
    pos = torch.cat([torch.arange(20), torch.arange(30)])
    ctx = AttnContext.from_lengths([20, 30])
    outs = []
    for force in (False, True):
        Fn.FUSED["force"] = force
        try:
            model.zero_grad()
            h = model(ids, pos, ctx)
            (h.double().sin().sum()).backward()
        finally:
            Fn.FUSED["force"] = False
        outs.append((h.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (h0, g0), (h1, g1) = outs
    assert (h1 - h0).abs().max() <= 1e-5 * h0.abs().max()
    for n in g0:
        assert (g1[n] - g0[n]).abs().max() <= 1e-4 * g0[n].abs().max() + 1e-6, n
