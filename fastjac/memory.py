"""The CPU output pool of the compiled kernels (``csrc/cpu/output_pool.h``).

Every CPU kernel output of 1 MiB or more (the forward, backward and double-backward outputs of ReLU, Softplus,
BatchNorm and BatchNorm+ReLU) comes from a pool that keeps the pages of freed outputs for the next output of the
same size. A fresh large tensor from PyTorch's CPU allocator is a new ``mmap`` whose first write faults in and
zeroes every page: on this project's 2-core hosts that costs more than the kernel writing it (a 32 MiB output:
~4 ms on fresh pages, ~1-2 ms on reused ones; ``benchmarks/RESULTS.md``, "The CPU output pool").

The pool never raises peak resident memory above what the program reaches without it: a freed block is kept
(where PyTorch's allocator would have returned it), and an output that finds no kept block of its size first
releases kept blocks of at least its size. Kept memory is bounded by ``FASTJAC_CPU_POOL_MB`` (read once, at the
first large output; default a quarter of physical memory up to 8 GiB; ``0`` turns the pool off) or
:func:`set_cpu_pool_limit`, and handed back by :func:`empty_cache`. Allocations show in the PyTorch profiler's
memory events like those of PyTorch's CPU allocator. CUDA tensors are not affected (PyTorch's CUDA allocator
already caches).
"""
from __future__ import annotations

from . import _backend


def cpu_pool_stats() -> dict:
    """Counters of the CPU output pool: ``live_bytes`` (held by tensors), ``cached_bytes`` (kept, free),
    ``limit_bytes`` (bound on ``cached_bytes``; 0 = off), ``hits``, ``misses``, ``released_blocks``. All zero
    without the compiled extension."""
    ext = _backend._C
    if ext is None:
        return dict.fromkeys(("live_bytes", "cached_bytes", "limit_bytes", "hits", "misses", "released_blocks"), 0)
    return dict(ext.output_pool_stats())


def empty_cache() -> None:
    """Release every block the CPU output pool keeps (as :func:`torch.cuda.empty_cache` does for CUDA)."""
    ext = _backend._C
    if ext is not None:
        ext.release_output_pool()


def set_cpu_pool_limit(nbytes: int) -> None:
    """Bound the bytes the CPU output pool keeps; ``0`` turns keeping off. Kept blocks beyond the bound are
    released at once."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"set_cpu_pool_limit: nbytes must be an int >= 0 (0 turns the pool off), got {nbytes!r}")
    ext = _backend._C
    if ext is not None:
        ext.set_output_pool_limit(nbytes)
