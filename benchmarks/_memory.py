"""Child process for peak-memory measurement: ``python -m benchmarks._memory VARIANT [--backend NAME]``.

Prints one JSON line. Method (one fresh process per variant, so nothing from other variants lingers):

1. build the model, optimizer and batch;
2. two steps under ``torch.profiler`` with ``profile_memory=True`` (the first is the warm-up: lazy
   allocations such as SGD momentum buffers and oneDNN primitive caches become steady state). The running
   sum of the allocation/free events (every c10 CPU tensor allocation, nothing else) peaks during the
   second step ``alloc_peak_bytes`` above the live bytes at its start: the allocator-level cross-check;
3. ``gc.collect()``, ``malloc_trim(0)``, ``fastjac.empty_cache()`` (the CPU output pool's kept blocks are released,
   so the measured step maps again whatever it reuses from the pool: the peak counts them); baseline = current
   RSS (``VmRSS``);
4. reset the kernel's peak-RSS high-water mark (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``);
5. run the measured step (no profiler: its event records would inflate RSS); peak = ``VmHWM``; report
   ``step_peak_bytes = peak - baseline``: the extra resident memory one step needs on top of the
   model/optimizer state (activations, saved tensors, gradient graphs, temporaries, oneDNN scratch), at
   page granularity.

The parent runs this with ``MALLOC_MMAP_THRESHOLD_=65536`` so large blocks are mmapped and returned on
free; RSS then tracks live memory instead of glibc's free-list caching. If ``clear_refs`` is not writable
``ru_maxrss`` (never reset, so it includes the two earlier steps) is used instead of ``VmHWM``; ``method`` says which one ran.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _trim() -> None:
    import fastjac

    gc.collect()
    fastjac.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def allocator_peak(step) -> int:
    """Run ``step()`` twice under ``torch.profiler(profile_memory=True)``; return the peak of live c10 CPU
    allocator bytes during the second call, relative to the live bytes at its start. Two calls: the
    profiler reports frees only of blocks it saw allocated, and the second step frees the first one's
    gradients (``zero_grad(set_to_none=True)``); the first call is the warm-up step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        with record_function("fastjac_bench_measured_step"):
            step()
    events = list(prof.profiler.kineto_results.events())
    window = next(e for e in events if e.name() == "fastjac_bench_measured_step")
    lo, hi = window.start_ns(), window.end_ns()
    memory = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )
    live = 0
    start = peak = None
    for t, nbytes in memory:
        if start is None and t >= lo:
            start = peak = live
        live += nbytes
        if start is not None and t <= hi:
            peak = max(peak, live)
    del prof, events
    return 0 if start is None else peak - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant")
    ap.add_argument("--backend", default=None)
    args = ap.parse_args(argv)

    import fastjac

    from ._common import make_vgg_step

    if args.backend:
        fastjac.set_backend(args.backend)
    step, _model = make_vgg_step(args.variant)
    # warm-up + allocator-level measurement (steps 1-2)
    alloc_peak = allocator_peak(step)
    can_reset = _reset_hwm()
    if can_reset:
        method = "VmHWM after clear_refs, minus VmRSS after two warm-up steps"
    else:
        method = "ru_maxrss (never reset: includes the warm-up steps) minus VmRSS before the step"
    _trim()
    baseline_kib = _status_kib("VmRSS")
    if can_reset:
        _reset_hwm()
    step()
    if can_reset:
        peak_kib = _status_kib("VmHWM")
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({
        "variant": args.variant,
        "baseline_bytes": baseline_kib * 1024,
        "peak_bytes": peak_kib * 1024,
        "step_peak_bytes": (peak_kib - baseline_kib) * 1024,
        "alloc_peak_bytes": alloc_peak,
        "pool_kept_after_step_bytes": fastjac.cpu_pool_stats()["cached_bytes"],
        "method": method,
    }))


if __name__ == "__main__":
    main()
