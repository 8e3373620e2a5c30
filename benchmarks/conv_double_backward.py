"""The convolution's double backward, per VGG-9-BN layer shape: PyTorch's against fastjac's (:func:`fastjac.ops.conv`).

For each distinct convolution of VGG-9-BN at batch 64 (3×32×32 input), one layer's share of a Jacobian loss:
``gx = ∂⟨y, v⟩/∂x`` with a graph, then the gradient of ``⟨gx, u⟩`` w.r.t. ``(v, W)``: the VJP of the input gradient,
the step whose weight part PyTorch computes as a convolution of transposed tensors and fastjac with ATen's
weight-gradient kernel. Times that VJP alone (the input gradient is rebuilt untimed each round), accumulated into
``v.grad`` and ``W.grad`` as a training step's backward does (they start unset, as after ``zero_grad``): a weight
gradient not in the weight's own layout is then copied into it (AccumulateGrad's layout contract), a cost that
returning the gradient would hide. Median of ``repeats``, both variants round-robin in one process.

    python -m benchmarks.conv_double_backward [--repeats 7] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastjac

# (in channels, out channels, spatial size) of VGG-9-BN's convolutions (3×3, padding 1), batch 64
VGG9_LAYERS = [(3, 64, 32), (64, 128, 16), (128, 256, 8), (256, 256, 8), (256, 512, 4), (512, 512, 4), (512, 512, 2)]
VARIANTS = {"pytorch": F.conv2d, "fastjac": fastjac.ops.conv}


def _double_backward(conv, x, w, v, u):
    """``(prepare, run)``: ``prepare()`` builds the input gradient of ``conv`` at (x, w) for cotangent ``v`` and clears
    ``v.grad`` and ``w.grad``; ``run(gx)`` backpropagates ``u`` through it into ``v.grad`` and ``w.grad``."""
    def prepare():
        y = conv(x, w, None, 1, 1)
        (gx,) = torch.autograd.grad(y, x, v, create_graph=True)
        v.grad = w.grad = None
        return gx

    def run(gx):
        torch.autograd.backward(gx, u, inputs=(v, w))

    return prepare, run


def measure(repeats: int = 7, batch: int = 64) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for cin, cout, size in VGG9_LAYERS:
        x = torch.randn(batch, cin, size, size, generator=g, requires_grad=True)
        w = torch.randn(cout, cin, 3, 3, generator=g, requires_grad=True)
        v = torch.randn(batch, cout, size, size, generator=g, requires_grad=True)
        u = torch.randn_like(x)
        calls = {name: _double_backward(conv, x, w, v, u) for name, conv in VARIANTS.items()}
        times = {name: [] for name in calls}
        for prepare, run in calls.values():  # warm-up
            run(prepare())
        for _ in range(repeats):
            for name, (prepare, run) in calls.items():
                gx = prepare()
                start = time.perf_counter()
                run(gx)
                times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        rows.append({"layer": f"{cin}→{cout} @ {size}×{size}", "pytorch_ms": ms["pytorch"], "fastjac_ms": ms["fastjac"],
                     "speedup": ms["pytorch"] / ms["fastjac"]})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| VGG-9 layer (batch 64) | PyTorch, ms | fastjac, ms | PyTorch / fastjac |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['pytorch_ms']:.1f} | {r['fastjac_ms']:.1f} | {r['speedup']:.2f}× |")
    total_p, total_f = sum(r["pytorch_ms"] for r in rows), sum(r["fastjac_ms"] for r in rows)
    lines.append(f"| all seven | {total_p:.1f} | {total_f:.1f} | {total_p / total_f:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, backend {fastjac.backends()}")
    print(markdown(measure(args.repeats)))


if __name__ == "__main__":
    main()
