"""How much of a Jacobian step is convolution: the floor that fused BatchNorm / ReLU kernels cannot lower.

Profiles one step of each VGG-9-BN variant of the kernel report (:func:`benchmarks._common.make_vgg_step`: CE step;
Jacobian step of the PyTorch model; of the converted model) and of the trainer's own Jacobian-norm step
(:mod:`benchmarks.trainer_step`, converted VGG-9, ``live`` and ``frozen``), and splits the profiler's self CPU
time into PyTorch's convolution kernels (``aten::mkldnn_convolution``, ``aten::convolution_backward``) and
everything else. ``conv ÷ CE step`` is the Jacobian step's ratio to its CE step if everything but the convolutions
cost nothing: a ``≤ r×`` target below it cannot be met with PyTorch's convolutions (median of ``repeats``
profiled steps, one thread by default: the profile of a 2-thread step double-counts nothing, but is noisier).

    python -m benchmarks.conv_share [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from ._common import make_vgg_step
from .trainer_step import make_step

CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution_double_backward")


def _profile(step) -> tuple[float, float]:
    """(convolution, total) self CPU ms of one call of ``step``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    conv = sum(e.self_cpu_time_total for e in events if e.key in CONV_OPS) / 1e3
    return conv, total


def measure(repeats: int = 3) -> list[dict]:
    steps = {}
    for variant in ("ce", "jac_torch", "jac_fastjac"):
        steps[f"report {variant}"] = make_vgg_step(variant)[0]
    for loss in ("CE", "CE + Jacobian norm (live)", "CE + Jacobian norm (frozen)"):  # no teacher: none is read
        steps[f"trainer {loss}"] = make_step("vgg9", loss, True, teacher_path="")
    for step in steps.values():  # warm-up
        step()
    samples = {k: [] for k in steps}
    for _ in range(repeats):
        for k, step in steps.items():
            samples[k].append(_profile(step))
    rows = []
    for k, v in samples.items():
        conv, total = statistics.median(c for c, _ in v), statistics.median(t for _, t in v)
        rows.append({"step": k, "conv_ms": conv, "total_ms": total})
    ce = {"report": next(r["total_ms"] for r in rows if r["step"] == "report ce"),
          "trainer": next(r["total_ms"] for r in rows if r["step"] == "trainer CE")}
    for r in rows:
        base = ce[r["step"].split()[0]]
        r["conv_over_ce"], r["total_over_ce"] = r["conv_ms"] / base, r["total_ms"] / base
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| step (VGG-9-BN) | convolution, ms | everything else, ms | total ÷ CE step | convolution alone ÷ CE step |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['conv_ms']:.0f} | {r['total_ms'] - r['conv_ms']:.0f} | "
                     f"{r['total_over_ce']:.2f}× | {r['conv_over_ce']:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.conv_share", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.repeats} profiled steps")
    print(markdown(measure(args.repeats)))


if __name__ == "__main__":
    main()
