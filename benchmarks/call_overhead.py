"""Per-call cost of the fused ops on tiny tensors, one thread: what remains is the host-side call chain.

On a 2×3×4×4 input the kernels do almost nothing, so the time of a call is the Python / dispatcher / autograd
cost of reaching them: the forward call alone (``requires_grad`` inputs, so the autograd node is built), and the
chain forward + backward(create_graph) + double backward. fastjac and PyTorch autograd are timed round-robin in
one run; the targets of issue 12 are ratios fastjac ÷ PyTorch. Used by ``benchmarks/test_bench_call_overhead.py``
(pytest-benchmark) and ``python -m benchmarks.report``.

    python -m benchmarks.call_overhead [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import fastjac

SHAPE = (2, 3, 4, 4)
OPS = ("relu", "softplus", "batch_norm", "batch_norm_relu")
ORDERS = ("forward", "chain")
CALLS = 200  # calls per timed round
TARGETS = {  # fastjac ÷ PyTorch, at most (issue 12, "Measure")
    ("relu", "forward"): 2.0, ("softplus", "forward"): 2.0, ("batch_norm", "forward"): 1.0,
    ("batch_norm_relu", "forward"): 1.0, ("relu", "chain"): 1.0, ("softplus", "chain"): 1.0,
    ("batch_norm", "chain"): 0.5, ("batch_norm_relu", "chain"): 0.5,
}


def _fn(op: str, impl: str, device: str) -> Callable:
    c = SHAPE[1]
    w = (torch.rand(c, device=device) + 0.5).requires_grad_()
    b = torch.randn(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    if op == "relu":
        return torch.relu if impl == "torch" else fastjac.ops.relu
    if op == "softplus":
        return F.softplus if impl == "torch" else fastjac.ops.softplus
    if impl == "fastjac":
        fused = fastjac.ops.batch_norm_relu if op == "batch_norm_relu" else fastjac.ops.batch_norm
        return lambda x: fused(x, rm, rv, w, b, True, 0.1, 1e-5)
    if op == "batch_norm_relu":
        return lambda x: torch.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))
    return lambda x: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)


def workload(op: str, impl: str, order: str, device: str = "cpu", calls: int = CALLS) -> Callable:
    """``run()`` making ``calls`` calls of ``op`` by ``impl`` (``torch`` / ``fastjac``); ``order``: ``forward``
    (the call alone) or ``chain`` (forward, backward with create_graph, double backward w.r.t. x and v)."""
    fn = _fn(op, impl, device)
    x = torch.randn(SHAPE, device=device, requires_grad=True)
    v, u = torch.randn_like(x).requires_grad_(), torch.randn_like(x)

    def once():
        y = fn(x)
        if order == "forward":
            return y
        (gx,) = torch.autograd.grad(y, x, v, create_graph=True)
        # w.r.t. x and v: ReLU's second derivative w.r.t. x is absent in fastjac (exact zero, never built)
        return torch.autograd.grad(gx, (x, v), u, allow_unused=True)[1]

    def run():
        for _ in range(calls):
            out = once()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def measure(repeats: int = 7, device: str = "cpu") -> list[dict]:
    """One thread; per (op, order) the median µs per call of each impl, round-robin, and the ratio."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for op in OPS:
            for order in ORDERS:
                runs = {impl: workload(op, impl, order, device) for impl in ("torch", "fastjac")}
                times = {impl: [] for impl in runs}
                for run in runs.values():
                    run()  # warm-up
                for _ in range(repeats):
                    for impl, run in runs.items():
                        t0 = time.perf_counter()
                        run()
                        times[impl].append((time.perf_counter() - t0) / CALLS)
                med = {impl: statistics.median(t) * 1e6 for impl, t in times.items()}
                rows.append({"op": op, "order": order, "torch_us": med["torch"], "fastjac_us": med["fastjac"],
                             "ratio": med["fastjac"] / med["torch"], "target": TARGETS[(op, order)]})
        return rows
    finally:
        torch.set_num_threads(threads)


def markdown(rows: list[dict]) -> str:
    """The table of :func:`measure` with each target's PASS/FAIL."""
    lines = [f"| op ({'×'.join(map(str, SHAPE))}, 1 thread) | calls | PyTorch, µs | fastjac, µs | fastjac ÷ PyTorch "
             "| target | result |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        what = "forward" if r["order"] == "forward" else "fwd + bwd(create_graph) + dbwd"
        lines.append(f"| {r['op']} | {what} | {r['torch_us']:.1f} | {r['fastjac_us']:.1f} | {r['ratio']:.2f}× "
                     f"| ≤ {r['target']:g}× | {'PASS' if r['ratio'] <= r['target'] else 'FAIL'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.call_overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    print(markdown(measure(args.repeats)))


if __name__ == "__main__":
    main()
