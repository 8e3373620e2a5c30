"""Where the time of one fused op goes on a GPU: wall time per call, CPU issue time, and GPU kernel time.

    python -m benchmarks.gpu_profile [--device cuda]

For each op case and implementation (PyTorch autograd, fastjac with each GPU backend forced) one
forward + backward + double backward (:func:`benchmarks._common.make_op_workload`):
``wall`` = synchronized time per iteration (20 iterations after 5 warm-ups); ``issue`` = the same loop's time
before the final synchronize (the CPU cost of issuing the work; wall ≈ issue means the run is CPU-bound);
``gpu`` = the summed device time of the CUDA kernels per iteration (torch.profiler, kernel rows only).
Then the CPU cost per call of each layer of the fused-ReLU call chain (C++ op, custom op, autograd.Function).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fastjac

from ._common import OpCase, make_op_workload

CASES = (OpCase("bn", (128, 64, 32, 32)), OpCase("bn_relu", (128, 64, 32, 32)), OpCase("bn", (128, 256, 8, 8)),
         OpCase("relu", (128, 64, 32, 32)), OpCase("softplus", (128, 64, 32, 32)))
IMPLS = ("torch", "fastjac-cuda", "fastjac-triton")


def profile_case(case: OpCase, impl: str, device: str, iters: int = 20) -> dict:
    run = make_op_workload(case, impl, device=device)
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        run()
    issue = (time.perf_counter() - t0) / iters
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / iters
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"wall": wall, "issue": issue, "gpu": sum(e.self_device_time_total for e in kernels) / 5 / 1e6,
            "kernels": sum(e.count for e in kernels) / 5}


def call_overhead(device: str, n: int = 2000) -> dict:
    """CPU microseconds per call of each layer of fastjac's ReLU (64×64 input, no synchronisation in the loop)."""
    import importlib

    relu_mod = importlib.import_module("fastjac.ops.relu")
    x = torch.randn(64, 64, device=device)
    xg = x.clone().requires_grad_()
    cases = {
        "torch.relu, no grad": lambda: torch.relu(x),
        "torch.ops.fastjac.relu_fwd (the C++ op)": lambda: torch.ops.fastjac.relu_fwd(x),
        "custom op fastjac::relu, no grad": lambda: relu_mod._relu_op(x),
        "torch.relu, input requires grad": lambda: torch.relu(xg),
        "fastjac.ops.relu, input requires grad": lambda: fastjac.ops.relu(xg),
    }
    out = {}
    for name, fn in cases.items():
        for _ in range(200):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = (time.perf_counter() - t0) / n * 1e6
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    print(f"device: {torch.cuda.get_device_name(args.device)}; torch {torch.__version__}")
    print("| op | shape | impl | wall ms | CPU issue ms | GPU kernel ms | kernels |")
    print("|---|---|---|---:|---:|---:|---:|")
    for case in CASES:
        for impl in IMPLS:
            r = profile_case(case, impl, args.device)
            print(f"| {case.label} | {case.shape_str} | {impl} | {r['wall'] * 1e3:.3f} | {r['issue'] * 1e3:.3f} | "
                  f"{r['gpu'] * 1e3:.3f} | {r['kernels']:.0f} |")
    print("\n| call (ReLU, 64×64) | CPU µs per call |\n|---|---:|")
    for name, us in call_overhead(args.device).items():
        print(f"| {name} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
