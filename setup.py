"""Builds reasonrl._C: C++ CPU kernels everywhere, CUDA kernels where torch has CUDA and nvcc exists.

Environment switches:
  REASONRL_CUDA_ARCHS       e.g. "90a" or "80;90a" (default: the visible GPU's arch, else 80;90a)
  REASONRL_SKIP_CUDA_BUILD  "1" builds the CPU kernels only, even where CUDA is available
  MAX_JOBS                  parallel compile jobs (read by torch's BuildExtension)
Install with `pip install --no-build-isolation -e .` so the build uses the torch already installed.
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_archs(torch):
    env = os.environ.get("REASONRL_CUDA_ARCHS", "").strip()
    if env:
        archs = [a.strip() for a in env.replace(",", ";").split(";") if a.strip()]
    elif torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs = [f"{major}{minor}" + ("a" if major == 9 else "")]
    else:
        archs = ["80", "90a"]
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
    except ImportError as e:  # pragma: no cover - a message for people who skipped the README
        raise RuntimeError(
            "reasonrl builds its C++/CUDA extension against an installed torch. Install torch first "
            "(e.g. `pip install torch==2.13.0`), then `pip install --no-build-isolation -e .`"
        ) from e

    glue = glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
    cpu = glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    cu = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    opt = ["-O3", "-std=c++17", "-fopenmp"]
    with_cuda = (
        os.environ.get("REASONRL_SKIP_CUDA_BUILD", "0") != "1"
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and (shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    )
    include = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        ext = CUDAExtension(
            "reasonrl._C",
            _rel(glue + cpu + cu),
            include_dirs=include,
            define_macros=[("REASONRL_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": opt,
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", *_cuda_archs(torch)],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "reasonrl._C",
            _rel(glue + cpu),
            include_dirs=include,
            extra_compile_args={"cxx": opt},
            extra_link_args=["-fopenmp"],
        )
    print(f"reasonrl: building reasonrl._C with CUDA={'yes' if with_cuda else 'no'}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
