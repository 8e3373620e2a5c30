"""Cost and error of the Hessian-trace estimators in a score-matching training step (issue: "Hessian traces and
score-matching", benchmarks).

    python -m benchmarks.hessian_trace_cost [--steps 5] [--batch 64]

A small Softplus(beta=10) CNN (thesis §5.5's non-linearity) is trained for a few epochs with cross-entropy on
scikit-learn's bundled 8x8 digits (D = 64 inputs, so the exact trace is affordable). Then, on that trained
network, per estimator:

- step time: CPU time of one training step on one thread (``time.process_time``: less disturbed than wall time
  by other processes on a shared machine), median of ``--steps`` steps, for ``CE + 1e-3 * mean(h)`` (the trace
  term alone: Taylor and antithetic need no input gradient) and for ``CE + 1e-3 * ScoreMatchingLoss(method)``
  (Eq. 5.4, whose gradient-norm term needs a double backward whatever the trace estimator), each also as a
  ratio to the cross-entropy-only step and to the step with the exact trace (64 double backwards);
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

    xb, yb = x[:args.batch], y[:args.batch]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same network
    fb = lambda z: model(z).gather(1, yb[:, None]).squeeze(1)  # noqa: E731

    def step_time(regulariser):
        samples = []
        for step in range(args.steps + 2):
            start = time.process_time()
            opt.zero_grad()
            loss = regulariser(step)
            loss.backward()
            opt.step()
            if step >= 2:
                samples.append(time.process_time() - start)
        return statistics.median(samples)

    base = step_time(lambda step: F.cross_entropy(model(xb), yb))
    rows = []
    for name, extra in METHODS:
        sm = ScoreMatchingLoss(method=name, sigma=args.sigma, **extra)

        def trace_only(step):
            xr = xb.detach().requires_grad_(name in ("hutchinson", "exact") or bool(extra))  # input gradient needed
            logits = model(xr)
            fx = logits.gather(1, yb[:, None]).squeeze(1)
            h = hessian_trace(fb, xr, name, sigma=args.sigma, seed=step, fx=fx, **extra)
            return F.cross_entropy(logits, yb) + 1e-3 * h.mean()

        def score_matching(step):
            terms = sm(model, xb, yb, seed=step)
            return F.cross_entropy(terms.logits, yb) + 1e-3 * terms.loss

        rows.append((_label(name, extra), step_time(trace_only), step_time(score_matching)))

    print(f"\nbatch {args.batch}: float32 training steps, CPU time on one thread, median of {args.steps}; "
          f"cross-entropy-only step {1e3 * base:.1f} ms")
    print("errors: float64, 512 test images, one draw per image\n")
    print("| trace estimator | CE + trace step (ms) | × CE step | × exact | CE + Eq. 5.4 step (ms) | × CE step "
          "| × exact | rel. error vs exact |")
    print("|---|---|---|---|---|---|---|---|")
    exact_trace, exact_sm = rows[0][1], rows[0][2]
    for label, t_trace, t_sm in rows:
        print(f"| {label} | {1e3 * t_trace:.1f} | {t_trace / base:.2f} | {t_trace / exact_trace:.3f} "
              f"| {1e3 * t_sm:.1f} | {t_sm / base:.2f} | {t_sm / exact_sm:.3f} | {errors[label]:.3g} |")


if __name__ == "__main__":
    main()
