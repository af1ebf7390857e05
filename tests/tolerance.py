"""flash-attn's rule: hold a kernel to the error PyTorch itself makes in the same dtype.

err(kernel vs float64 reference) <= 2 * err(PyTorch reference in the same dtype vs float64) + atol.
"""
import torch

ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-10}


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_ref(out, ref64, ref_same_dtype, dtype, name="", factor=2.0, atol=None):
    """out: kernel result; ref64: float64 ground truth; ref_same_dtype: PyTorch in the kernel's dtype."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out.double()).all(), f"{name}: non-finite values"
    atol = ATOL[dtype] if atol is None else atol
    err = max_err(out, ref64)
    base = max_err(ref_same_dtype, ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    bound = factor * base + atol * max(1.0, scale)
    assert err <= bound, f"{name}: max err {err:.3e} > bound {bound:.3e} (PyTorch's own err {base:.3e})"


def atol_for(out, dtype):
    """The atol for an output wider than its inputs that the op computes in float32 from them (float32
    log-probs and entropies of bf16 logits): the output's own dtype's. The input dtype's atol (2e-2 for
    bf16, times the largest value) let a kernel that computed log_softmax in bf16 pass at 5e4x PyTorch's
    error. Opt-in: where an op rounds through the input dtype inside (a bf16 GEMM's output, MoE's act),
    the input dtype's atol stays the rule."""
    wider = out.dtype in ATOL and torch.finfo(out.dtype).bits > torch.finfo(dtype).bits
    return ATOL[out.dtype] if wider else ATOL[dtype]
