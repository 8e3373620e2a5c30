"""Where the time goes: ``python -m benchmarks.profile [NAME ...] [--rows N] [--shapes]``.

NAME is a VGG variant (``ce``, ``jac_torch``, ``jac_fastjac``) or an op case id (``bn-128x64x32x32``, see
:data:`benchmarks._common.OP_CASES`; the op's PyTorch and fastjac workloads are both profiled). Each
workload runs twice untimed, then once under ``torch.profiler``; prints the ops by self CPU time and a
summary by category (convolution, fastjac kernels, BatchNorm in PyTorch, everything else).
Default: the three VGG variants.
"""
from __future__ import annotations

import argparse
import collections

from torch.profiler import ProfilerActivity, profile

from ._common import IMPLS, OP_CASES, VGG_VARIANTS, make_op_workload, make_vgg_step


def _category(name: str) -> str:
    if "convolution" in name:
        return "convolution (fwd + bwd)"
    if name.startswith("fastjac::"):
        return "fastjac ops"
    if "batch_norm" in name:
        return "aten batch norm"
    if name.startswith("aten::"):
        return "other aten ops"
    return "autograd / python glue"


def profile_fn(fn, title: str, rows: int, shapes: bool) -> None:
    fn()
    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
        fn()
    averages = prof.key_averages(group_by_input_shape=shapes)
    print(f"\n===== {title}")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    by_cat = collections.Counter()
    for e in averages:
        by_cat[_category(e.key)] += e.self_cpu_time_total
    total = sum(by_cat.values())
    print("self CPU by category: " + ", ".join(
        f"{k} {v / 1e3:.0f} ms ({100 * v / total:.0f}%)" for k, v in by_cat.most_common()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", default=list(VGG_VARIANTS))
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--shapes", action="store_true", help="group by input shapes")
    args = ap.parse_args(argv)
    cases = {c.id: c for c in OP_CASES}
    for name in args.names:
        if name in VGG_VARIANTS:
            step, _ = make_vgg_step(name)
            profile_fn(step, f"VGG-9-BN step {name}", args.rows, args.shapes)
        elif name in cases:
            for impl in IMPLS:
                profile_fn(make_op_workload(cases[name], impl), f"{name} {impl}", args.rows, args.shapes)
        else:
            raise SystemExit(f"unknown name {name!r}: one of {', '.join(list(VGG_VARIANTS) + list(cases))}")


if __name__ == "__main__":
    main()
