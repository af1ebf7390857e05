"""The instruction sets whose builds of the C++ CPU kernels this CPU can run.

csrc/ compiles its log-prob, fused and small-GEMM kernels for x86-64-v4 (AVX-512), x86-64-v3 (AVX2)
and the baseline, and picks the best this CPU runs; torch.ops.reasonrl.logprob_cpu_isa(name) forces
one ("best" restores it), so one machine tests every build at or below its own.
"""
import contextlib

import torch

from reasonrl.ops import _backend

ORDER = ["x86-64", "x86-64-v3", "x86-64-v4"]


def runnable_isas():
    """Lowest first, ending with this CPU's best; [] where reasonrl._C is not built."""
    if not _backend.cpp_available():
        return []
    best = torch.ops.reasonrl.logprob_cpu_isa("")
    return ORDER[: ORDER.index(best) + 1] if best in ORDER else [best]


@contextlib.contextmanager
def forced_isa(name):
    """Run the C++ CPU kernels' build for `name` inside the block."""
    torch.ops.reasonrl.logprob_cpu_isa(name)
    try:
        yield
    finally:
        torch.ops.reasonrl.logprob_cpu_isa("best")
