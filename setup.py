"""Build of the fastjac C++/CUDA extension ``fastjac._C`` (package metadata lives in pyproject.toml).

    pip install -e . --no-build-isolation

Build switches (environment variables):

    FASTJAC_BUILD_CUDA=auto|0|1
        auto (default): build the CUDA kernels when nvcc is found (CUDA_HOME, else nvcc on PATH), the
        installed torch is a CUDA build, and csrc/cuda/*.cu sources exist; otherwise CPU only.
        1: require the CUDA build (error if any of the above is missing). 0: never build CUDA.
        A CUDA build defines FASTJAC_WITH_CUDA, so fastjac._C.compiled_with_cuda() returns True.
    TORCH_CUDA_ARCH_LIST
        GPU architectures of the CUDA build, default "8.0;9.0" (sm_80 A100, sm_90 H100/H200; read by
        torch.utils.cpp_extension, which would otherwise pick the visible GPU's, or a long list when there is none).
    FASTJAC_CPU_ARCH_FLAGS
        Target flags of the CPU kernels, default "-march=native": the package is built where it runs, so the
        vectorised loops use every instruction set of this machine (AVX2 / AVX-512). Set a portable target
        (e.g. "-march=x86-64-v3") when the built package is copied to other machines, or "" for the compiler's
        default.
    MAX_JOBS
        Parallel compile jobs of the ninja build (read by torch.utils.cpp_extension).

CUDA sources are compiled with nvcc -O3 --expt-relaxed-constexpr -lineinfo (line tables for profilers, no device
debug code). C++ sources are compiled with -O3, no debug info and OpenMP (at::parallel_for, `omp simd` loops). The
C++ standard is the one torch.utils.cpp_extension adds for the installed torch (C++20 for torch 2.14, whose headers require it);
the sources themselves are C++17.
"""
import glob
import os
import shlex

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


def _want_cuda(cuda_sources):
    """Whether to build the CUDA kernels, per FASTJAC_BUILD_CUDA."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    mode = os.environ.get("FASTJAC_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"FASTJAC_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    missing = []
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        missing.append("nvcc (set CUDA_HOME)")
    if torch.version.cuda is None:
        missing.append("a CUDA build of torch")
    if not cuda_sources:
        missing.append("csrc/cuda/*.cu sources")
    if missing and mode == "1":
        raise RuntimeError("FASTJAC_BUILD_CUDA=1 but the CUDA build lacks: " + ", ".join(missing))
    return not missing


def _extension():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpp_sources = ["csrc/fastjac.cpp"] + _sources("cpu/*.cpp")
    cuda_sources = _sources("cuda/*.cu")
    arch = shlex.split(os.environ.get("FASTJAC_CPU_ARCH_FLAGS", "-march=native"))
    # -g0: Python's CFLAGS add -g, whose debug info is ~25x the code of these templates and doubles build time.
    cxx = ["-O3", "-g0", "-fopenmp", *arch]
    if _want_cuda(cuda_sources):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return CUDAExtension(
            "fastjac._C",
            cpp_sources + cuda_sources,
            define_macros=[("FASTJAC_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "fastjac._C",
        cpp_sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=[_extension()], cmdclass=_cmdclass())
