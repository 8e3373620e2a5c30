"""The trainer's own step (``Trainer._step``: zero_grad, every loss term, backward, optimiser step) on the
bundled digits, CE against each Jacobian term in each BatchNorm mode, fused against plain, in one process.

Models: ``vgg9`` (VGG-9-BN, batch 64, 3×32×32 digits, 10 classes: the VGG step of the kernel report, on real
images) and ``demo`` (the demo's student: VGG-4 width 0.25, batch 10 of 1×16×16, its teacher VGG-4 width 0.5).
The teacher of ``jacobian_matching`` is an untrained model of the config's teacher architecture, saved to a
temporary file (its weights do not change the cost). Jacobian matching runs both routes of the teacher's rows:
computed every step (``teacher.cache_jacobians: false``) and "teacher cached" (``true``: read from the cache
that ``Trainer.setup`` computes once, not timed; these variants train on the timed batch's examples only,
``data.train_limit``, so that setup stays short: a step reads its rows the same way whatever the cache's size).
Variants are timed round-robin, median of ``repeats``; a step's ratio to its CE step is the median of the ratios
within each round (robust to the machine's speed drifting between rounds), with their range.

    python -m benchmarks.trainer_step [--repeats 5] [--models vgg9 demo] [--precision bfloat16] [--sync]
        [--device cuda] [--batch-size 128] [--block 10] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from fastjac.training import config as config_io
from fastjac.training.models import build_model
from fastjac.training.trainer import Trainer

MODELS = {
    "vgg9": dict(model={"arch": "vgg9", "num_classes": 10, "in_channels": 3},
                 teacher={"arch": "vgg9", "num_classes": 10, "in_channels": 3},
                 data={"dataset": "digits", "image_size": 32, "channels": 3, "batch_size": 64}),
    "demo": dict(model={"arch": "vgg4", "num_classes": 10, "in_channels": 1, "width": 0.25},
                 teacher={"arch": "vgg4", "num_classes": 10, "in_channels": 1, "width": 0.5},
                 data={"dataset": "digits", "image_size": 16, "channels": 1, "batch_size": 10}),
}
LOSSES = {"CE": {"ce": 1.0}}
#: loss name -> ``teacher.cache_jacobians`` of the variants with a teacher
CACHE: dict[str, bool] = {}
for _mode in ("frozen", "live"):
    LOSSES[f"CE + Jacobian norm ({_mode})"] = {"ce": 1.0, "jacobian_norm": {"weight": 0.01, "batch_norm": _mode}}
    for _cached, _suffix in ((False, ""), (True, ", teacher cached")):
        LOSSES[f"CE + Jacobian matching ({_mode}{_suffix})"] = {
            "ce": 1.0, "jacobian_matching": {"weight": 1.0, "batch_norm": _mode}}
        CACHE[f"CE + Jacobian matching ({_mode}{_suffix})"] = _cached


def make_step(model: str, loss: str, fused: bool, teacher_path: str, precision: str = "float32", sync: bool = False,
              device: str = "cpu", batch_size: int | None = None):
    """``step()`` running one ``Trainer._step`` of the variant on a fixed batch of training digits on ``device``;
    ``sync``: and read the logged values on the host after it (what ``sync_every: 1`` does). ``step.read()``
    returns the means of the logged values so far (raising if one was non-finite)."""
    spec = MODELS[model]
    data = dict(spec["data"], batch_size=batch_size or spec["data"]["batch_size"])
    cfg = {"name": f"{model}/{loss}", "epochs": 1, "model": dict(spec["model"], fused=fused), "precision": precision,
           "data": data, "optim": {"name": "sgd", "lr": 0.01}, "loss": LOSSES[loss]}
    if "jacobian_matching" in LOSSES[loss]:
        cfg["teacher"] = {"model": dict(spec["teacher"], fused=fused), "checkpoint": teacher_path,
                          "cache_jacobians": CACHE[loss]}
        if CACHE[loss]:
            data["train_limit"] = data["batch_size"]
    trainer = Trainer(config_io.from_mapping(cfg), tempfile.mkdtemp(prefix="fastjac-bench-"), device=device,
                      progress=False)
    trainer.setup()
    assert (trainer.teacher_jacobians is not None) == CACHE.get(loss, False), loss  # the route the name says
    trainer.model.train()
    idx = torch.arange(data["batch_size"])

    def step():
        trainer._step(idx, 0, 0)
        if sync:
            trainer.log.read(0)

    step.read = lambda: trainer.log.read(0)
    return step


def measure(models=("vgg9", "demo"), repeats: int = 5, precision: str = "float32", sync: bool = False,
            device: str = "cpu", batch_size: int | None = None, block: int = 1) -> list[dict]:
    """Median milliseconds per step of every variant; a sample times ``block`` consecutive steps and then waits
    for the device (so steps without a host sync can overlap, as in training)."""
    wait = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            teacher_path = os.path.join(tmp, f"{model}-teacher.pt")
            torch.save(build_model(dict(MODELS[model]["teacher"], fused=False)).state_dict(), teacher_path)
            steps = {(loss, fused): make_step(model, loss, fused, teacher_path, precision, sync, device, batch_size)
                     for loss in LOSSES for fused in (False, True)}
            times = {key: [] for key in steps}
            for step in steps.values():  # warm-up
                step()
            for _ in range(repeats):
                for key, step in steps.items():
                    wait()
                    t0 = time.perf_counter()
                    for _ in range(block):
                        step()
                    wait()
                    times[key].append((time.perf_counter() - t0) / block)
            med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
            # a ratio to the CE step per round-robin round (the two timed seconds apart, so a drift of the
            # machine's speed between rounds cancels), then the median and range over the rounds
            per_round = {key: [t / ce for t, ce in zip(v, times[("CE", key[1])])] for key, v in times.items()}
            for loss in LOSSES:
                rows.append({"model": model, "loss": loss, "plain_ms": med[(loss, False)], "fused_ms": med[(loss, True)],
                             "plain_vs_ce": statistics.median(per_round[(loss, False)]),
                             "fused_vs_ce": statistics.median(per_round[(loss, True)]),
                             "fused_vs_ce_range": (min(per_round[(loss, True)]), max(per_round[(loss, True)]))})
    return rows


def markdown(rows: list[dict]) -> str:
    """The table: median milliseconds, and each step's ratio to its CE step as the median (and, fused, the range)
    of the per-round ratios."""
    lines = ["| model | step | plain, ms | fused, ms | plain / fused | plain ÷ its CE | fused ÷ its CE | "
             "fused ÷ its CE, range over rounds |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lo, hi = r["fused_vs_ce_range"]
        lines.append(f"| {r['model']} | {r['loss']} | {r['plain_ms']:.1f} | {r['fused_ms']:.1f} | "
                     f"{r['plain_ms'] / r['fused_ms']:.2f}× | {r['plain_vs_ce']:.2f}× | {r['fused_vs_ce']:.2f}× | "
                     f"{lo:.2f}–{hi:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--sync", action="store_true", help="read the logged values on the host after every step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="instead of the model's (vgg9 64, demo 10)")
    parser.add_argument("--block", type=int, default=1, help="consecutive steps per timed sample")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    load = os.getloadavg()
    text = (f"torch threads {torch.get_num_threads()}, load average at start {load[0]:.2f}, median of "
            f"{args.repeats}, precision {args.precision}, "
            f"{'a host sync after every step' if args.sync else 'no host sync'}, device {args.device}, "
            f"{args.block} steps per sample\n\n"
            + markdown(measure(args.models, args.repeats, args.precision, args.sync, args.device, args.batch_size,
                               args.block)))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
