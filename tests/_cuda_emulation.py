"""The CUDA kernels on the CPU, without a GPU: ``csrc/cuda/{relu,softplus,batch_norm,perturb}.cu`` compiled as C++ with the
CUDA emulation of ``csrc/cuda/emulation.h`` (blocks run one at a time, a block's threads as cooperative fibers, so
``__syncthreads``, ``__ballot_sync`` and ``__shared__`` memory behave as on a GPU), built on first use with
``torch.utils.cpp_extension`` into a folder named by the hash of every source it includes, and loaded as the
operator library ``torch.ops.fastjac_cuda_emulation`` (the ``fastjac::relu_*``, ``softplus_*``, ``bn_*``,
``philox_words``, ``perturb_fwd`` and ``noise_row_dot`` schemas, plus ``launch_count()`` and ``set_schedule()``).

What it checks: the CUDA kernels' own indexing, the ReLU mask's warp ballot, BatchNorm's layouts (rows and
columns), the split of a channel across blocks, the fixed-order block reductions and per-channel finishing steps,
races within a block (the tests also run each block's threads in reverse order), and the launch sequence (how many
kernels a call launches). What it cannot: timing, memory coalescing, host/device annotations (the forced CUDA build
checks those), the device's own float rounding (``fma`` contraction, fast intrinsics) and the CUDA runtime.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EMULATED = ("relu", "softplus", "batch_norm", "perturb")  # every CUDA kernel file, compiled for the emulation
WRAPPERS = [ROOT / "tests" / "cuda_emulation" / f"{op}.cpp" for op in EMULATED]


def _sources() -> list[Path]:
    csrc = ROOT / "csrc"
    return sorted([*WRAPPERS, *(csrc / "cuda" / f"{op}.cu" for op in EMULATED), *(csrc / "cuda").glob("*.cuh"),
                   csrc / "cuda" / "emulation.h", csrc / "kernel_schemas.h", *(csrc / "common").glob("*.h")])


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
    load(name="fastjac_cuda_emulation", sources=[str(w) for w in WRAPPERS],
         extra_include_paths=[str(ROOT / "csrc")], extra_cflags=["-O1", "-g0"], is_python_module=False,
         build_directory=str(build), verbose=bool(os.environ.get("FASTJAC_VERBOSE_BUILD")))
    return torch.ops.fastjac_cuda_emulation


def launches(fn) -> int:
    """Kernels ``fn()`` launched in the emulation."""
    before = ops().launch_count()
    fn()
    return ops().launch_count() - before


@contextlib.contextmanager
def reversed_schedule():
    """Within the block: each block's threads run in reverse order between barriers."""
    ops().set_schedule(1)
    try:
        yield
    finally:
        ops().set_schedule(0)
