"""Build of the fastjac C++/CUDA extension ``fastjac._C`` (package metadata lives in pyproject.toml).

    pip install -e . --no-build-isolation

Build switches (environment variables):

    FASTJAC_BUILD_CUDA=auto|0|1
        auto (default): build the CUDA kernels when a GPU is visible (torch.cuda.is_available()), the
        installed torch is a CUDA build and a usable CUDA toolkit is found; otherwise build the CPU kernels
        only and say why in one line (shown by `pip install -v`, and recorded in fastjac/_build_info.json,
        which fastjac's "backend 'cuda' is not available" error quotes). A machine with the toolkit but no
        visible GPU gets the CPU-only build, so a CPU user does not wait minutes for kernels they cannot
        run (the convention of pytorch_scatter and torchvision: CUDA when a GPU is visible or when forced).
        1: build the CUDA kernels even without a GPU (e.g. to ship them, or in CI); anything missing is an
        error naming it. 0: never build CUDA.
        A CUDA build defines FASTJAC_WITH_CUDA, so fastjac._C.compiled_with_cuda() returns True.
    CUDA_HOME / CUDA_PATH
        The toolkit root. Usually not needed: build_support/cuda_toolkit.py resolves the root itself, also when
        nvcc on the PATH is a wrapper script that execs the real toolkit's nvcc (torch alone would take the
        wrapper's grandparent folder, which has no libcudart), and accepts a root only if it has bin/nvcc,
        include/cuda_runtime.h and lib64/libcudart.so; a one-kernel compile-and-link probe then checks that
        the toolkit links before the real build starts. The resolved root is exported as CUDA_HOME for torch.
    TORCH_CUDA_ARCH_LIST
        GPU architectures of the CUDA build, default "8.0;9.0" (sm_80 A100, sm_90 H100/H200; read by
        torch.utils.cpp_extension, which would otherwise pick the visible GPU's, or a long list when there is none).
    FASTJAC_CPU_ARCH_FLAGS
        Target flags of the CPU kernels, default "-march=native": the package is built where it runs, so the
        vectorised loops use every instruction set of this machine (AVX2 / AVX-512). Set a portable target
        (e.g. "-march=x86-64-v3") when the built package is copied to other machines, or "" for the compiler's
        default.
    MAX_JOBS
        Parallel compile jobs of the ninja build (read by torch.utils.cpp_extension), default: one per CPU core.

CUDA sources are compiled with nvcc -O3 --expt-relaxed-constexpr -lineinfo (line tables for profilers, no device
debug code). C++ sources are compiled with -O3, no debug info and OpenMP (at::parallel_for, `omp simd` loops). The
C++ standard is the one torch.utils.cpp_extension adds for the installed torch (C++20 for torch 2.14, whose headers require it;
C++17 for torch 2.11); the sources themselves are C++17. After linking, the build checks that fastjac._C links
libstdc++ as a shared library (build_support/libstdcxx.py: a static copy makes its error messages crash the
interpreter) and records the answer in fastjac/_build_info.json; `import fastjac` warns when it is static.
"""
import glob
import json
import os
import shlex
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
from build_support.cuda_toolkit import plan_cuda_build  # noqa: E402
from build_support.libstdcxx import REBUILD_HINT, libstdcxx_linkage  # noqa: E402

BUILD_INFO = os.path.join(ROOT, "fastjac", "_build_info.json")
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


def _say(line):
    print(f"fastjac build: {line}", file=sys.stderr, flush=True)


def _cuda_mode():
    mode = os.environ.get("FASTJAC_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"FASTJAC_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _cuda_toolkit(mode, cuda_sources):
    """The toolkit to build the CUDA kernels with, or (None, why not): see FASTJAC_BUILD_CUDA above."""
    import torch

    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS).replace(" ", ";").split(";")[0]
    return plan_cuda_build(mode, bool(cuda_sources), torch.version.cuda,
                           torch.cuda.is_available(), arch=arch)


def _use_toolkit(toolkit):
    """Point torch.utils.cpp_extension at the resolved root (it reads CUDA_HOME once, at import)."""
    os.environ["CUDA_HOME"] = toolkit.root
    if "torch.utils.cpp_extension" in sys.modules:
        sys.modules["torch.utils.cpp_extension"].CUDA_HOME = toolkit.root
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    _say(f"building the CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']} with the toolkit at {toolkit.root} "
         f"(found by {toolkit.found_by})")


def _write_build_info(info):
    tmp = BUILD_INFO + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(info, handle, indent=1)
    os.replace(tmp, BUILD_INFO)


def _extension():
    cpp_sources = ["csrc/fastjac.cpp"] + _sources("autograd/*.cpp") + _sources("cpu/*.cpp")
    cuda_sources = _sources("cuda/*.cu")
    arch = shlex.split(os.environ.get("FASTJAC_CPU_ARCH_FLAGS", "-march=native"))
    # -g0: Python's CFLAGS add -g, whose debug info is ~25x the code of these templates and doubles build time.
    cxx = ["-O3", "-g0", "-fopenmp", *arch]
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))  # ninja: one compile job per core
    mode = _cuda_mode()
    toolkit, why_not = _cuda_toolkit(mode, cuda_sources)
    if toolkit is None and mode == "1":
        raise RuntimeError(f"FASTJAC_BUILD_CUDA=1, but {why_not}")
    if toolkit is None:
        if mode == "auto":
            _say(f"building the CPU kernels only: {why_not}. "
                 "Set FASTJAC_BUILD_CUDA=1 to build the CUDA kernels anyway (an error then says what is missing).")
        _write_build_info({"cuda": False, "cuda_skipped_because": why_not, "mode": mode})
        from torch.utils.cpp_extension import CppExtension

        return CppExtension("fastjac._C", cpp_sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    _use_toolkit(toolkit)
    _write_build_info({"cuda": True, "cuda_home": toolkit.root, "cuda_archs": os.environ["TORCH_CUDA_ARCH_LIST"],
                       "mode": mode})
    from torch.utils.cpp_extension import CUDAExtension

    return CUDAExtension(
        "fastjac._C",
        cpp_sources + cuda_sources,
        define_macros=[("FASTJAC_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )


def _record_libstdcxx(path):
    """Record how the built extension links libstdc++ (build_support/libstdcxx.py); say so when statically."""
    linkage = libstdcxx_linkage(path)
    try:
        with open(BUILD_INFO) as handle:
            info = json.load(handle)
    except (OSError, ValueError):
        info = {}
    _write_build_info(dict(info, libstdcxx=linkage))
    if linkage == "static":
        _say(f"WARNING: {os.path.basename(path)} links libstdc++ statically, so its error messages crash the "
             f"interpreter instead of raising; {REBUILD_HINT}")


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class BuildAndCheck(BuildExtension.with_options(use_ninja=True)):
        def build_extension(self, ext):
            super().build_extension(ext)
            _record_libstdcxx(self.get_ext_fullpath(ext.name))

    return {"build_ext": BuildAndCheck}


setup(ext_modules=[_extension()], cmdclass=_cmdclass())
