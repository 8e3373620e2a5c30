"""The CUDA BatchNorm kernels on the CPU, without a GPU: ``csrc/cuda/batch_norm.cu`` compiled as C++ with the CUDA
emulation of ``csrc/cuda/emulation.h`` (blocks run one at a time, a block's threads as cooperative fibers, so
``__syncthreads`` and ``__shared__`` memory behave as on a GPU), built on first use with
``torch.utils.cpp_extension`` into a folder named by the hash of every source it includes, and loaded as the
operator library ``torch.ops.fastjac_cuda_emulation`` (the ``fastjac::bn_*`` schemas, plus ``launch_count()``).

What it checks: the CUDA kernels' own indexing, both layouts (rows and columns), the split of a channel across
blocks, the fixed-order block reductions and per-channel finishing steps, and the launch sequence (how many kernels
a call launches). What it cannot: timing, memory coalescing, warp intrinsics, the device's own float rounding
(``fma`` contraction) and anything of the CUDA runtime.
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = ROOT / "tests" / "cuda_emulation" / "batch_norm.cpp"


def _sources() -> list[Path]:
    csrc = ROOT / "csrc"
    return sorted([WRAPPER, *(csrc / "cuda").glob("batch_norm.cu"), *(csrc / "cuda").glob("*.cuh"),
                   csrc / "cuda" / "emulation.h", *(csrc / "common").glob("*.h")])


@functools.cache
def ops():
    """``torch.ops.fastjac_cuda_emulation``, built (or reused, when no source changed) and loaded."""
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256()
    for path in _sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    build = Path(tempfile.gettempdir()) / f"fastjac_cuda_emulation_{torch.__version__}_{digest.hexdigest()[:16]}"
    build.mkdir(parents=True, exist_ok=True)
    # -O1: a quarter of -O3's compile time; the emulation is about behaviour, not speed.
    load(name="fastjac_cuda_emulation", sources=[str(WRAPPER)], extra_include_paths=[str(ROOT / "csrc")],
         extra_cflags=["-O1", "-g0"], is_python_module=False, build_directory=str(build),
         verbose=bool(os.environ.get("FASTJAC_VERBOSE_BUILD")))
    return torch.ops.fastjac_cuda_emulation


def launches(fn) -> int:
    """Kernels ``fn()`` launched in the emulation."""
    before = ops().launch_count()
    fn()
    return ops().launch_count() - before
