"""One-run benchmark report: ``python -m benchmarks.report [--quick] [--out FILE] [--json FILE]``.

Runs, in this order and in one process (peak memory: one fresh subprocess per VGG variant):

1. copy bandwidth (``dst.copy_(src)``, 256 MiB float32);
2. every op case of :data:`benchmarks._common.OP_CASES`, PyTorch autograd and fastjac (agreement of the
   double-backward gradients checked first), forward + backward(create_graph) + double backward; then, per
   shape of the BN+ReLU target, fused BN+ReLU against plain BN in one interleaved group (:func:`bn_relu_pair`);
3. VGG-9-BN training steps (a) CE, (b) Jacobian, (c) Jacobian on ``fastjac.convert(model)``; the first
   step of each is run under the saved-tensor hooks (it doubles as a warm-up), then the timed steps;
4. peak memory of one step per variant (:mod:`benchmarks._memory`);
5. the per-call cost on tiny tensors, one thread (:mod:`benchmarks.call_overhead`);
6. ``torch.func`` transforms of converted vs unconverted models (:mod:`benchmarks.torch_func_cost`).

Prints the machine and ONE markdown table (median of the timed repeats after warm-up), then the
issue's targets with pass/fail. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

import fastjac

from . import call_overhead, torch_func_cost
from ._common import (
    IMPLS,
    ForeignLoad,
    OP_CASES,
    OpCase,
    VGG_VARIANTS,
    check_op_agreement,
    convert_available,
    copy_bandwidth,
    first_touch_cost,
    floor_bytes,
    machine_info,
    make_op_workload,
    make_vgg_step,
    median,
    peak_memory_many,
    saved_tensor_bytes,
    time_interleaved,
)

MiB = 2**20

#: (warm-up, repeats) per kind of measurement
SETTINGS = {
    "full": {"bandwidth": (2, 10), "op": (2, 10), "vgg": (1, 11)},  # + the saved-bytes step as warm-up
    "quick": {"bandwidth": (1, 3), "op": (1, 1), "vgg": (0, 1)},
}

TARGETS = {  # issue 12, "Measure"
    "bn_speedup": 8.0,  # BN fwd+bwd+dbwd 128x64x32x32: fastjac >= 8x faster than PyTorch autograd
    "softplus_speedup": 3.0,  # Softplus fwd+bwd+dbwd 128x64x32x32: fastjac >= 3x faster than PyTorch
    "bn_relu_over_bn": 1.1,  # fused BN+ReLU <= 1.1x fastjac BN's time, at both shapes
    "jac_over_ce": 2.05,  # converted Jacobian step <= 2.05x plain CE step of the unconverted model
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


class Guard:
    """Runs measurement blocks when the machine is quiet: before a block, wait (at most ``wait_s``) until
    other processes use less than ``max_load`` of the CPU over 2 s; after it, if they used more than
    ``max_load`` during the block, measure it again (at most ``retries`` times; the last try is kept).
    ``max_load=None`` disables both (quick mode). Returns ``(result, other_load)``."""

    def __init__(self, max_load: float | None, retries: int = 3, wait_s: float = 180):
        self.max_load, self.retries, self.wait_s = max_load, retries, wait_s

    def _wait_quiet(self) -> None:
        start = time.monotonic()
        last_log = None
        while time.monotonic() < start + self.wait_s:
            probe = ForeignLoad().start()
            time.sleep(2)
            load = probe.stop()
            if load is None or load < self.max_load:
                return
            if last_log is None or time.monotonic() - last_log > 30:
                log(f"  other processes use {100 * load:.0f}% of the CPU; waiting (at most {self.wait_s:.0f} s)")
                last_log = time.monotonic()

    def run(self, fn):
        for attempt in range(1 + (self.retries if self.max_load is not None else 0)):
            if self.max_load is not None:
                self._wait_quiet()
            load = ForeignLoad().start()
            result = fn()
            other = load.stop()
            if self.max_load is None or other is None or other <= self.max_load:
                break
            log(f"  other processes used {100 * other:.0f}% of the CPU during the measurement; "
                f"{'again' if attempt < self.retries else 'keeping it'}")
        return result, other


BN_RELU_SHAPES = ((128, 64, 32, 32), (128, 256, 8, 8))


def bn_relu_pair(shape: tuple, warmup: int, repeats: int) -> dict:
    """fastjac's fused BN+ReLU against its plain BN at ``shape``, timed in one round-robin group, each fastjac run
    right after the PyTorch run of the same op: both start from the caches a PyTorch chain leaves (the tensors of
    128x256x8x8 fit this host's last-level cache, so a run right after another fastjac run reads them from cache).
    Comparing the two ops' rows of the op table instead compares times from different groups, taken minutes apart
    after different PyTorch workloads. ``ratio``: the median over rounds of BN+ReLU / BN."""
    runs = {}
    for op in ("bn", "bn_relu"):
        for impl in IMPLS:
            runs[(op, impl)] = make_op_workload(OpCase(op, shape), impl)
    timed = time_interleaved(runs, warmup, repeats)
    fused, plain = timed[("bn_relu", "fastjac")], timed[("bn", "fastjac")]
    return {"bn": median(plain), "bn_relu": median(fused), "ratio": median([f / p for f, p in zip(fused, plain)])}


def run_all(mode: str, backend: str | None, with_memory: bool = True, max_load: float | None = None) -> dict:
    cfg = SETTINGS[mode]
    guard = Guard(max_load)
    res_max_load = max_load
    res: dict = {"mode": mode, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "max_load": res_max_load}
    res["machine"] = machine_info()
    res["loadavg_start"] = loadavg()
    total_load = ForeignLoad().start()

    log("copy bandwidth")
    res["bandwidth"], res["bandwidth_foreign_load"] = guard.run(
        lambda: copy_bandwidth(warmup=cfg["bandwidth"][0], repeats=cfg["bandwidth"][1]))
    res["first_touch_32mib"], _ = guard.run(
        lambda: first_touch_cost(warmup=cfg["bandwidth"][0], repeats=cfg["bandwidth"][1]))

    res["ops"] = []
    for case in OP_CASES:
        row = {"case": case, "floor_bytes": floor_bytes(case)}
        if mode == "full":
            log(f"{case.id}: agreement")
            row["mismatch"] = check_op_agreement(case)
        log(f"{case.id}: timing {', '.join(IMPLS)} (interleaved)")
        runs = {impl: make_op_workload(case, impl) for impl in IMPLS}
        timed, row["foreign_load"] = guard.run(lambda: time_interleaved(runs, *cfg["op"]))
        for impl, times in timed.items():
            row[impl] = median(times)
            row[impl + "_times"] = times
        del runs
        res["ops"].append(row)
    res["bn_relu_pairs"] = []
    for shape in BN_RELU_SHAPES:
        log(f"BN+ReLU vs BN {'x'.join(map(str, shape))}: timing in one interleaved group")
        pair, load = guard.run(lambda: bn_relu_pair(shape, *cfg["op"]))
        res["bn_relu_pairs"].append(dict(pair, shape=shape, foreign_load=load))

    res["vgg"] = {}
    steps = {}
    for variant in VGG_VARIANTS:
        if variant == "jac_fastjac" and not convert_available():
            log(f"vgg {variant}: skipped, fastjac.convert missing")
            continue
        log(f"vgg {variant}: saved tensors (first step)")
        step, model = make_vgg_step(variant)
        res["vgg"][variant] = {"saved": saved_tensor_bytes(step, model)}  # also the first warm-up step
        losses = []
        steps[variant] = (lambda step=step, losses=losses: losses.append(step()))
        res["vgg"][variant]["losses"] = losses
    log(f"vgg {', '.join(steps)}: timing (interleaved)")
    timed, res["vgg_foreign_load"] = guard.run(lambda: time_interleaved(steps, *cfg["vgg"]))
    for variant, times in timed.items():
        v = res["vgg"][variant]
        v["time"], v["times"] = median(times), times
        v["loss"] = v.pop("losses")[-1].item()
    del steps

    if with_memory:
        log(f"vgg {', '.join(res['vgg'])}: peak memory (one subprocess each, concurrently)")
        for variant, mem in peak_memory_many(list(res["vgg"]), backend).items():
            res["vgg"][variant]["memory"] = mem
    log("call overhead (tiny tensors, one thread)")
    res["call_overhead"], res["call_overhead_foreign_load"] = guard.run(
        lambda: call_overhead.measure(repeats=7 if mode == "full" else 3))
    log("torch.func transforms (converted vs unconverted models)")
    res["torch_func"], res["torch_func_foreign_load"] = guard.run(
        lambda: torch_func_cost.measure(repeats=5 if mode == "full" else 2))
    res["loadavg_end"] = loadavg()
    res["foreign_load"] = total_load.stop()
    return res


def _ms(t):
    return "—" if t is None else f"{t * 1e3:.1f}"


def _x(r):
    return "—" if r is None or not math.isfinite(r) else f"{r:.2f}×"


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _mib(b):
    return "—" if b is None else f"{b / MiB:.1f}"


def render(res: dict) -> str:
    m = res["machine"]
    bw = res["bandwidth"]
    out = []
    out.append(f"- CPU: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}")
    out.append(f"- torch {m['torch']}, Python {m['python']}, fastjac {m['fastjac']} at {m['git']}")
    avail = ", ".join(k for k, v in m["fastjac_backends"].items() if v)
    out.append(f"- fastjac backends available: {avail}; in use for CPU tensors: **{m['fastjac_backend_in_use']}**")
    out.append(f"- copy bandwidth (`dst.copy_(src)`, 256 MiB fp32, read+write bytes): {bw / 1e9:.1f} GB/s")
    out.append(f"- first write of a fresh 32 MiB tensor costs {res['first_touch_32mib'] * 1e3:.1f} ms more than "
               "rewriting an existing one (page faults + zeroing; not in the floor)")
    out.append(f"- mode: {res['mode']}; date {res['date']}; load average at start {res['loadavg_start']}, "
               f"end {res['loadavg_end']}; CPU used by other processes over the whole run (waits included): "
               f"{_pct(res['foreign_load'])}; column *other load*: during that measurement"
               + (f" (re-measured when above {_pct(res['max_load'])})" if res.get("max_load") else ""))
    out.append("")
    out.append("| benchmark | PyTorch | fastjac | PyTorch / fastjac | floor | fastjac / floor | other load |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for row in res["ops"]:
        case = row["case"]
        floor = row["floor_bytes"] / bw
        name = f"{case.label} {case.shape_str} fwd+bwd+dbwd, ms"
        if row.get("mismatch"):
            name += " ⚠ results differ"
        out.append(
            f"| {name} | {_ms(row['torch'])} | {_ms(row['fastjac'])} | {_x(row['torch'] / row['fastjac'])} | "
            f"{_ms(floor)} | {_x(row['fastjac'] / floor)} | {_pct(row.get('foreign_load'))} |"
        )
    v = res["vgg"]
    ce = v.get("ce", {}).get("time")
    jt = v.get("jac_torch", {}).get("time")
    jf = v.get("jac_fastjac", {}).get("time")

    def ratio(a, b):
        return None if a is None or b is None else a / b

    vl = _pct(res.get("vgg_foreign_load"))
    out.append(f"| VGG-9-BN (a) CE step, ms | {_ms(ce)} | — | | | | {vl} |")
    out.append(f"| VGG-9-BN Jacobian step, ms [(b) PyTorch, (c) converted] | {_ms(jt)} | {_ms(jf)} | "
               f"{_x(ratio(jt, jf))} | | | {vl} |")
    out.append(f"| Jacobian step ÷ (a) CE step | {_x(ratio(jt, ce))} | {_x(ratio(jf, ce))} | | | | {vl} |")

    def get(variant, *keys):
        d = v.get(variant)
        for k in keys:
            if d is None:
                return None
            d = d.get(k)
        return d

    for title, keys in (
        ("saved tensors per step, MiB (unique storages, incl. parameters)", ("saved", "total")),
        ("saved tensors per step, MiB (activations only)", ("saved", "activations")),
        ("saved tensors per step, MiB (sum over pack calls, no dedup)", ("saved", "packed_no_dedup")),
        ("peak RSS growth of one step, MiB", ("memory", "step_peak_bytes")),
        ("peak allocator bytes of one step, MiB", ("memory", "alloc_peak_bytes")),
    ):
        a, b, c = (get(x, *keys) for x in VGG_VARIANTS)
        out.append(f"| {title}: (a) CE | {_mib(a)} | — | | | | |")
        out.append(f"| {title}: Jacobian [(b), (c)] | {_mib(b)} | {_mib(c)} | {_x(ratio(b, c))} | | | |")
    if res.get("call_overhead"):
        out += ["", f"Per-call cost (other load {_pct(res.get('call_overhead_foreign_load'))}):", "",
                call_overhead.markdown(res["call_overhead"])]
    if res.get("torch_func"):
        out += ["", f"torch.func transforms (other load {_pct(res.get('torch_func_foreign_load'))}):", "",
                torch_func_cost.markdown(res["torch_func"])]
    return "\n".join(out)


def targets(res: dict) -> list[tuple[str, str, str]]:
    """(target, measured, PASS/FAIL/n/a)."""
    rows = []
    bn = next((r for r in res["ops"] if r["case"].op == "bn" and r["case"].shape == (128, 64, 32, 32)
               and r["case"].wrt_all), None)
    if bn:
        s = bn["torch"] / bn["fastjac"]
        rows.append((f"BN fwd+bwd+dbwd 128×64×32×32: fastjac ≥ {TARGETS['bn_speedup']:.0f}× faster than PyTorch",
                     f"{s:.2f}× ({bn['torch'] * 1e3:.0f} ms vs {bn['fastjac'] * 1e3:.0f} ms)",
                     "PASS" if s >= TARGETS["bn_speedup"] else "FAIL"))
    def op_row(op, shape):
        return next((r for r in res["ops"] if r["case"].op == op and r["case"].shape == shape and r["case"].wrt_all),
                    None)

    sp = op_row("softplus", (128, 64, 32, 32))
    if sp:
        s = sp["torch"] / sp["fastjac"]
        rows.append((f"Softplus fwd+bwd+dbwd 128×64×32×32: fastjac ≥ {TARGETS['softplus_speedup']:.0f}× faster than "
                     "PyTorch", f"{s:.2f}×", "PASS" if s >= TARGETS["softplus_speedup"] else "FAIL"))
    for pair in res.get("bn_relu_pairs", []):
        r = pair["ratio"]
        rows.append((f"BN+ReLU ≤ {TARGETS['bn_relu_over_bn']}× BN, {'×'.join(map(str, pair['shape']))}",
                     f"{r:.2f}× ({pair['bn_relu'] * 1e3:.1f} vs {pair['bn'] * 1e3:.1f} ms, one interleaved group)",
                     "PASS" if r <= TARGETS["bn_relu_over_bn"] else "FAIL"))
    v = res["vgg"]
    ce = v.get("ce", {}).get("time")
    jf = v.get("jac_fastjac", {}).get("time")
    jt = v.get("jac_torch", {}).get("time")
    if ce and jf:
        r = jf / ce
        rows.append((f"converted Jacobian step ≤ {TARGETS['jac_over_ce']}× plain CE step",
                     f"{r:.3f}× (PyTorch's own Jacobian step: {jt / ce:.3f}×)" if jt else f"{r:.3f}×",
                     "PASS" if r <= TARGETS["jac_over_ce"] else "FAIL"))
    else:
        rows.append((f"converted Jacobian step ≤ {TARGETS['jac_over_ce']}× plain CE step",
                     "not measured (fastjac.convert missing)", "n/a"))
    for title, keys, strict in (
        ("saved-tensor bytes: converted Jacobian step ≤ PyTorch Jacobian step", ("saved", "total"), False),
        ("peak memory (RSS growth of one step): converted < PyTorch Jacobian step", ("memory", "step_peak_bytes"), True),
    ):
        b = v.get("jac_torch", {})
        c = v.get("jac_fastjac", {})
        for k in keys:
            b = b.get(k, {}) if isinstance(b, dict) else None
            c = c.get(k, {}) if isinstance(c, dict) else None
        if isinstance(b, int) and isinstance(c, int):
            ok = c < b if strict else c <= b
            rows.append((title, f"{c / MiB:.1f} MiB vs {b / MiB:.1f} MiB", "PASS" if ok else "FAIL"))
        else:
            rows.append((title, "not measured", "n/a"))
    for r in res.get("call_overhead", []):
        what = "forward call" if r["order"] == "forward" else "fwd+bwd+dbwd chain"
        rows.append((f"{r['op']} {what}, tiny tensor: fastjac ≤ {r['target']:g}× PyTorch", f"{r['ratio']:.2f}×",
                     "PASS" if r["ratio"] <= r["target"] else "FAIL"))
    for r in res.get("torch_func", []):
        if r["target"] is not None:
            rows.append((f"torch.func {r['transform']} of converted {r['model']} ≤ {r['target']:g}× unconverted",
                         f"{r['ratio']:.2f}×", "PASS" if r["ratio"] <= r["target"] else "FAIL"))
    return rows


def render_targets(rows) -> str:
    out = ["| target | measured | result |", "|---|---|---|"]
    out += [f"| {t} | {m} | {r} |" for t, m, r in rows]
    return "\n".join(out)


def _jsonable(res: dict) -> dict:
    res = dict(res)
    res["ops"] = [dict(r, case=r["case"].id) for r in res["ops"]]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, no agreement check (CI smoke, < 2 min)")
    ap.add_argument("--out", help="also write the report (markdown) to this file")
    ap.add_argument("--json", help="also write the raw measurements (all repeats) to this file")
    ap.add_argument("--backend", choices=("auto", "reference", "cpu"), default=None,
                    help="force a fastjac backend (default: fastjac's automatic choice)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--max-other-load", type=float, default=None, metavar="FRACTION",
                    help="shared machine: wait for, and re-measure (up to 3 times) any timing during which, other "
                         "processes use more than FRACTION of the CPU (default 0.1 in full mode, off with --quick)")
    args = ap.parse_args(argv)
    if args.backend:
        fastjac.set_backend(args.backend)
    t0 = time.perf_counter()
    max_load = args.max_other_load if args.max_other_load is not None else (None if args.quick else 0.1)
    res = run_all("quick" if args.quick else "full", args.backend, with_memory=not args.no_memory,
                  max_load=max_load if max_load and max_load > 0 else None)
    res["wall_s"] = time.perf_counter() - t0
    text = render(res)
    tgt = render_targets(targets(res))
    mismatches = [r["mismatch"] for r in res["ops"] if r.get("mismatch")]
    mismatches += [f"VGG {k}: training loss is not finite ({v['loss']})" for k, v in res["vgg"].items()
                   if not math.isfinite(v["loss"])]
    cmd = "python -m benchmarks.report " + " ".join(argv if argv is not None else sys.argv[1:])
    report = f"## fastjac benchmarks\n\n`{cmd.strip()}` ({res['wall_s']:.0f} s)\n\n{text}\n\n### Targets\n\n{tgt}\n"
    if mismatches:
        report += "\n**Invalid measurements:**\n\n" + "\n".join(f"- {m}" for m in mismatches) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_jsonable(res), f, indent=1, default=str)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
