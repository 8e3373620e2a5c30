"""GPU benchmark report: op-level forward + backward + double backward and the VGG-9-BN training step on a CUDA
device, PyTorch (cuDNN) vs every available fastjac GPU backend forced (``fastjac-cuda``, ``fastjac-triton``), in
float32 and bfloat16, with the device-to-device copy bandwidth as the floor.

    python -m benchmarks.gpu_report [--quick] [--out FILE] [--device cuda]

Every time is the median of synchronized wall-clock times (``torch.cuda.synchronize`` before and after each
call), implementations interleaved round-robin. ``floor`` = :func:`benchmarks._common.floor_bytes` at the dtype's
size divided by the measured copy bandwidth. The double-backward gradients of every fastjac backend are checked
against PyTorch first (a mismatch is reported, not timed as if equal). ``--device cpu --quick`` runs the same
code on small CPU shapes (a smoke test of this script on machines without a GPU; those numbers mean nothing).
The CPU report is ``python -m benchmarks.report``.
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch

import fastjac

from ._common import (OP_CASES, VGG_VARIANTS, OpCase, check_op_agreement, copy_bandwidth, floor_bytes, impls,
                      make_op_workload, make_vgg_step, median, time_interleaved)

DTYPES = (torch.float32, torch.bfloat16)
QUICK_CASES = (OpCase("bn", (8, 16, 8, 8)), OpCase("bn_relu", (8, 16, 8, 8)), OpCase("relu", (8, 16, 8, 8)),
               OpCase("softplus", (8, 16, 8, 8)))
SETTINGS = {"full": dict(op=(3, 20), vgg=(2, 10), bw=(3, 20)), "quick": dict(op=(1, 3), vgg=(1, 2), bw=(1, 3))}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def run_ops(device: str, mode: str, bandwidth: float) -> list[dict]:
    cfg, rows = SETTINGS[mode], []
    for dtype in DTYPES:
        for case in QUICK_CASES if mode == "quick" else OP_CASES:
            log(f"{case.id} {_name(dtype)}")
            names = impls(device)
            tol = 1e-3 if dtype == torch.float32 else 5e-2
            row = {"case": case, "dtype": dtype, "floor": floor_bytes(case, dtype.itemsize) / bandwidth,
                   "mismatch": [m for impl in names if impl != "torch"
                                for m in [check_op_agreement(case, tol, tol, device, dtype, impl)] if m]}
            runs = {impl: make_op_workload(case, impl, device=device, dtype=dtype) for impl in names}
            for impl, times in time_interleaved(runs, *cfg["op"], device=device).items():
                row[impl] = median(times)
            rows.append(row)
            del runs
    return rows


def run_vgg(device: str, mode: str) -> dict:
    steps = {}
    for variant in VGG_VARIANTS:
        step, _ = make_vgg_step(variant, batch=8 if mode == "quick" else 64, device=device)
        steps[variant] = step
    variants = dict(steps)
    forced = [impl.split("-", 1)[1] for impl in impls(device) if impl.startswith("fastjac-")]
    for backend in forced:  # the fastjac-converted model under each GPU backend
        def step_with(step=steps["jac_fastjac"], backend=backend):
            with fastjac.use_backend(backend):
                return step()
        variants[f"jac_fastjac ({backend})"] = step_with
    if forced:
        del variants["jac_fastjac"]  # auto: the same work as one of the forced ones
    timed = time_interleaved(variants, *SETTINGS[mode]["vgg"], device=device)
    return {name: median(times) for name, times in timed.items()}


def render(res: dict) -> str:
    names = list(impls(res["device"]))
    out = [f"# fastjac GPU benchmarks ({res['date']})", "",
           f"Device: {res['device_name']}; torch {torch.__version__}; fastjac backends {fastjac.backends()}; "
           f"copy bandwidth {res['bandwidth'] / 1e9:.0f} GB/s (read + write).", "",
           "## Forward + backward + double backward (ms, median)", "",
           "| op | shape | dtype | " + " | ".join(names) + " | floor | " + " | ".join(
               f"{n} vs torch" for n in names[1:]) + " | notes |",
           "|" + "---|" * (4 + 2 * len(names))]
    for r in res["ops"]:
        t = [r.get(n) for n in names]
        speed = [f"{t[0] / x:.1f}×" if x else "—" for x in t[1:]]
        out.append(f"| {r['case'].label} | {r['case'].shape_str} | {_name(r['dtype'])} | "
                   + " | ".join(f"{x * 1e3:.3f}" for x in t) + f" | {r['floor'] * 1e3:.3f} | " + " | ".join(speed)
                   + f" | {'; '.join(r['mismatch']) or ''} |")
    out += ["", "## VGG-9-BN training step (ms, median; float32)", "", "| variant | ms | vs (a) |", "|---|---|---|"]
    base = res["vgg"].get("ce")
    for name, t in res["vgg"].items():
        out.append(f"| {name} | {t * 1e3:.2f} | {t / base:.2f}× |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu only as a smoke test")
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke)")
    ap.add_argument("--out", help="also write the report (markdown) to this file")
    args = ap.parse_args(argv)
    device, mode = args.device, "quick" if args.quick else "full"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (the CPU report is python -m benchmarks.report)", file=sys.stderr)
        return 2
    res = {"device": device, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "device_name": torch.cuda.get_device_name(device) if device != "cpu" else "CPU (smoke run)"}
    log("copy bandwidth")
    res["bandwidth"] = copy_bandwidth(warmup=SETTINGS[mode]["bw"][0], repeats=SETTINGS[mode]["bw"][1], device=device)
    res["ops"] = run_ops(device, mode, res["bandwidth"])
    log("vgg")
    res["vgg"] = run_vgg(device, mode)
    text = render(res)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
