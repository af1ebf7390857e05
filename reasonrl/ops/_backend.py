"""Backend discovery and selection shared by every op family.

`backend="auto"` picks the fastest implementation available for the tensors' device:
CUDA tensors -> "triton" (then "cuda") unless the op names its own order (resolve's prefer_cuda: the
log-prob ops take "cuda" first, logprobs.AUTO_ON_CUDA), CPU tensors -> "cpp" (then "reference").
An explicitly named backend that is not available raises, naming why.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "reference", "triton", "cpp", "cuda")


@functools.lru_cache(maxsize=None)
def _C():
    """The compiled extension, or None (with the import error kept for messages)."""
    try:
        from reasonrl import _C as mod  # noqa: F401  (loading it registers torch.ops.reasonrl.*)
        return mod
    except ImportError as e:  # pragma: no cover - depends on the build
        _C.error = str(e)
        return None


def cpp_available() -> bool:
    return _C() is not None


def cuda_built() -> bool:
    mod = _C()
    return mod is not None and bool(mod.built_with_cuda())


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # pragma: no cover
        return False


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on `device`, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed"
        if device.type == "cuda":
            return "TRITON_INTERPRET=1 is set, which runs Triton on the CPU only" if triton_interpret() else None
        if device.type == "cpu":
            return None if triton_interpret() else "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        return f"Triton does not support device {device}"
    if backend == "cpp":
        if not cpp_available():
            return f"reasonrl._C is not built ({getattr(_C, 'error', 'unknown error')})"
        return None if device.type == "cpu" else f"the cpp backend runs CPU tensors, got a tensor on {device}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors, got a tensor on {device}"
        if not cpp_available():
            return f"reasonrl._C is not built ({getattr(_C, 'error', 'unknown error')})"
        if not cuda_built():
            return "reasonrl._C was built without CUDA (torch without CUDA, no nvcc, or REASONRL_SKIP_CUDA_BUILD=1)"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve(backend: str, device: torch.device, op: str, prefer_cuda: tuple[str, ...] = ("triton", "cuda")) -> str:
    """Turn a backend argument into the concrete backend to run, or raise a clear error."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        order = prefer_cuda + ("reference",) if device.type == "cuda" else ("cpp", "reference")
        for b in order:
            if why_unavailable(b, device) is None:
                return b
        return "reference"
    reason = why_unavailable(backend, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend={backend!r} is not available: {reason}")
    return backend


def check_same_device(op: str, **tensors) -> torch.device:
    """The one device of the given tensors (None entries skipped); raises naming an argument that
    is not a tensor, or listing the devices when they differ."""
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, d in devices.items():
        if d != first:
            listed = ", ".join(f"{n} on {dv}" for n, dv in devices.items())
            raise ValueError(f"{op}: all tensors must be on one device, got {listed}")
    return first


def first_order_only(fn):
    """For autograd.Function.backward of the kernel backends: their gradients are computed by kernels,
    not traced, so under create_graph=True (grad mode on inside backward) a second-order term would be
    dropped silently (torch's once_differentiable only objects when the incoming gradient requires
    grad). Raise instead."""
    @functools.wraps(fn)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            name = fn.__qualname__.split(".")[0]
            raise RuntimeError(f"{name}: double backward (create_graph=True) is not supported by the kernel "
                               "backends; use backend='reference' for higher-order gradients")
        return fn(ctx, *grads)
    return wrapper


def no_autocast(fn):
    """For autograd.Function forward/backward: the op's kernels pick their own precision (float32
    math on the given dtypes), so an enclosing torch.autocast must not recast the matmuls inside
    them (an out= buffer in float32 then meets a bfloat16 product)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def autocast_operands(*tensors: torch.Tensor):
    """The operands of a fused LM-head op under torch.autocast: cast to the autocast dtype, as
    autocast casts a Linear's input and weight (gradients come back in each input's dtype);
    unchanged outside autocast."""
    dev = tensors[0].device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t.is_floating_point() else t for t in tensors)
