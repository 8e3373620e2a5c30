"""Cost and error of the Hessian-trace estimators in a score-matching training step (issue: "Hessian traces and
score-matching", benchmarks).

    python -m benchmarks.hessian_trace_cost [--steps 5] [--batch 64]

A small Softplus(beta=10) CNN (thesis §5.5's non-linearity) is trained for a few epochs with cross-entropy on
scikit-learn's bundled 8x8 digits (D = 64 inputs, so the exact trace is affordable). Then, on that trained
network, per estimator:

- step time: CPU time of one training step on one thread (``time.process_time``: less disturbed than wall time
  by other processes on a shared machine), one training step ``CE + 1e-3 * ScoreMatchingLoss(method)`` (forward, regulariser, backward into
  the parameters), median of ``--steps`` steps, and its ratio to the step with the exact trace (64 double
  backwards) and to the Hutchinson step (one HVP: the "double backward" baseline);
- relative error of a single-draw estimate (``samples=1``) against the exact trace:
  ``mean_i |h_i - h_i^exact| / mean_i |h_i^exact|`` over a batch of 512 test images, float64.

Prints a markdown table. Timings depend on the machine and its load; run on a quiet machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastjac import hessian_trace
from fastjac.losses import ScoreMatchingLoss

METHODS = (("exact", {}), ("hutchinson", {}), ("taylor", {}), ("taylor", {"control_variate": True}), ("antithetic", {}))


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(d.target, dtype=torch.int64)


def _model():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.Softplus(beta=10.0), nn.Conv2d(16, 32, 3, padding=1), nn.Softplus(beta=10.0),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10),
    )


def _train(model, x, y, epochs=15):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return (model(x).argmax(1) == y).float().mean().item()


def _label(name, extra):
    return name + (" + control variate" if extra.get("control_variate") else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sigma", type=float, default=1e-2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, y = _digits()
    model = _model()
    acc = _train(model, x[:1297], y[:1297])
    print(f"trained: train accuracy {acc:.3f}, threads {torch.get_num_threads()}, sigma {args.sigma}")

    xt, yt = x[1297:1297 + 512].double(), y[1297:1297 + 512]
    m64 = _model().double()
    m64.load_state_dict(model.state_dict())
    fn = lambda z: m64(z).gather(1, yt[:, None]).squeeze(1)  # noqa: E731
    exact = hessian_trace(fn, xt, "exact", create_graph=False)
    errors = {}
    for name, extra in METHODS[1:]:
        est = hessian_trace(fn, xt, name, sigma=args.sigma, seed=1, create_graph=False, **extra)
        errors[_label(name, extra)] = ((est - exact).abs().mean() / exact.abs().mean()).item()
    errors["exact"] = 0.0

    times = {}
    xb, yb = x[:args.batch], y[:args.batch]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same network
    for name, extra in (("cross-entropy only", None),) + METHODS:
        loss_fn = None if extra is None else ScoreMatchingLoss(method=name, sigma=args.sigma, **extra)
        samples = []
        for step in range(args.steps + 2):
            start = time.process_time()
            opt.zero_grad()
            if loss_fn is None:
                loss = F.cross_entropy(model(xb), yb)
            else:
                terms = loss_fn(model, xb, yb, seed=step)
                loss = F.cross_entropy(terms.logits, yb) + 1e-3 * terms.loss
            loss.backward()
            opt.step()
            if step >= 2:
                samples.append(time.process_time() - start)
        times[name if extra is None else _label(name, extra)] = statistics.median(samples)

    base, exact_t, hutch_t = times["cross-entropy only"], times["exact"], times["hutchinson"]
    print(f"\nbatch {args.batch}, float32 steps; errors: float64, 512 test images, one draw per image\n")
    print("| trace estimator | step CPU time (ms) | × CE step | × exact step | × Hutchinson step | rel. error vs exact |")
    print("|---|---|---|---|---|---|")
    for label, t in times.items():
        err = f"{errors[label]:.3g}" if label in errors else "—"
        print(f"| {label} | {1e3 * t:.1f} | {t / base:.2f} | {t / exact_t:.3f} | {t / hutch_t:.2f} | {err} |")


if __name__ == "__main__":
    main()
