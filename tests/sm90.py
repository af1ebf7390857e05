"""Compiling Triton kernels for sm_90a without a GPU (for the tests that check what the interpreter
cannot: that a kernel builds, its products become MMAs, its shared memory fits an H100/H200 SM)."""
import json
import os
import subprocess
import sys


def available() -> bool:
    """Triton with its NVIDIA backend (the compiler needs no GPU)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        return True
    except Exception:
        return False


def compile_sm90(fn, ptrs, scalars, constexprs, options):
    """fn specialized as Triton's JIT specializes at run time: 16-byte aligned pointers (ptrs: name ->
    "*bf16", ...), int scalars that are multiples of 16 marked so and ints equal to 1 folded to
    constants, float scalars as fp32. options: num_warps, num_stages, ..."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs, cex = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name], attrs[(i,)] = ptrs[name], [["tt.divisibility", 16]]
        elif isinstance(scalars[name], float):
            sig[name] = "fp32"
        elif scalars[name] == 1:
            sig[name], cex[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if scalars[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(fn.arg_names) - set(sig)
    assert not missing, f"{fn.__name__}: no signature for {sorted(missing)}"
    return triton.compile(ASTSource(fn, sig, cex, attrs=attrs), target=GPUTarget("cuda", 90, 32), options=options)


def ptxas_usage(kernel):
    """(registers a thread, spill bytes) of a compiled kernel, from Triton's own ptxas -v on its PTX;
    (None, None) where that ptxas cannot be found or run."""
    import re
    import tempfile

    try:
        from triton.backends.nvidia.compiler import get_ptxas
        tool = get_ptxas(90)
        tool = getattr(tool, "path", None) or tool[0]
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "k.ptx"), "w") as f:
                f.write(kernel.asm["ptx"])
            r = subprocess.run([tool, "-arch=sm_90a", "-v", os.path.join(d, "k.ptx"), "-o", os.path.join(d, "k.cubin")],
                               capture_output=True, text=True, timeout=300, check=True)
    except Exception:
        return None, None
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", r.stderr)]
    return (int(regs.group(1)) if regs else None), sum(spills)


def report_of(test_file: str) -> dict:
    """Runs test_file as a script without TRITON_INTERPRET (the interpreter is switched on for the
    whole test session) and returns the JSON report on its last stdout line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    env["PYTHONPATH"] = os.pathsep.join([root, here, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, os.path.abspath(test_file)], env=env, cwd=root, capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
