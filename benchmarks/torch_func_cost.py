"""``torch.func`` on a converted model vs the unconverted one (issue 16): ``jacrev`` of the logits w.r.t. the input and
per-sample gradients (``vmap(grad)`` with ``functional_call``), eval mode, the models the trainer builds
(:func:`fastjac.training.models.build_model`, ``fused`` True/False). Under ``vmap`` each fused op is one kernel call
over the batch (``fastjac/ops/_vmap.py``); the target (issue 16) is ``jacrev`` of the converted model ``≤ 1×`` the
unconverted model's time; per-sample gradients are reported beside it without a target. Timed
round-robin in one run, median of ``repeats``. Used by ``benchmarks/test_bench_torch_func.py`` and
``python -m benchmarks.report``.

    python -m benchmarks.torch_func_cost [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap

from fastjac.training.models import build_model

# (name, model spec, input shape (N, C, H, W))
MODELS = (
    ("digits VGG-4 (width 0.5)", {"arch": "vgg4", "num_classes": 10, "in_channels": 1, "width": 0.5}, (16, 1, 8, 8)),
    ("VGG-9 softplus", {"arch": "vgg9", "num_classes": 10, "activation": "softplus"}, (4, 3, 32, 32)),
    ("VGG-9", {"arch": "vgg9", "num_classes": 10}, (4, 3, 32, 32)),
)
TRANSFORMS = ("jacrev", "per-sample grad")
TARGETS = {"jacrev": 1.0}  # converted ÷ unconverted, at most


def _models(spec: dict) -> dict:
    torch.manual_seed(0)
    plain = build_model(dict(spec, fused=False))
    for m in plain.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    converted = build_model(dict(spec, fused=True))
    converted.load_state_dict(plain.state_dict())
    return {"torch": plain.eval(), "fastjac": converted.eval()}


def workload(model: torch.nn.Module, transform: str, shape: tuple) -> Callable:
    """``run()`` computing ``transform`` of ``model`` on a fixed input of ``shape``; returns the result."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    if transform == "jacrev":
        return lambda: jacrev(model)(x)
    target = torch.randint(0, 10, (shape[0],), generator=g)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, xb, tb):
        return F.cross_entropy(functional_call(model, (p, buffers), (xb[None],)), tb[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    return lambda: per_sample(params, x, target)


def measure(repeats: int = 5) -> list[dict]:
    """Per (model, transform): median seconds of each implementation, round-robin, and the ratio."""
    rows = []
    for name, spec, shape in MODELS:
        models = _models(spec)
        for transform in TRANSFORMS:
            runs = {impl: workload(m, transform, shape) for impl, m in models.items()}
            ref = None
            for impl, run in runs.items():  # warm-up, and the two must agree
                out = run()
                out = out if isinstance(out, torch.Tensor) else torch.cat([v.flatten() for v in out.values()])
                ref = out if ref is None else ref
            err = (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())
            times = {impl: [] for impl in runs}
            for _ in range(repeats):
                for impl, run in runs.items():
                    t0 = time.perf_counter()
                    run()
                    times[impl].append(time.perf_counter() - t0)
            med = {impl: statistics.median(t) for impl, t in times.items()}
            rows.append({"model": name, "input": "×".join(map(str, shape)), "transform": transform,
                         "torch_s": med["torch"], "fastjac_s": med["fastjac"], "ratio": med["fastjac"] / med["torch"],
                         "max_rel_diff": err, "target": TARGETS.get(transform)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model (eval) | input | transform | unconverted, ms | converted, ms | converted ÷ unconverted | "
             "max rel. diff | result |", "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        result = "—" if r["target"] is None else f"{'PASS' if r['ratio'] <= r['target'] else 'FAIL'} (≤ {r['target']:g}×)"
        lines.append(f"| {r['model']} | {r['input']} | {r['transform']} | {1e3 * r['torch_s']:.1f} | "
                     f"{1e3 * r['fastjac_s']:.1f} | {r['ratio']:.2f}× | {r['max_rel_diff']:.1e} | {result} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.torch_func_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(markdown(measure(args.repeats)))


if __name__ == "__main__":
    main()
