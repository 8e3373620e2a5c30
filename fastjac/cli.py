"""The ``fastjac`` command (also ``python -m fastjac``; ``torchrun --nproc_per_node=N -m fastjac run ...``).

    fastjac list                                   the bundled experiment configs
    fastjac run CONFIG [--data-root DIR] [--out DIR] [--set key=value ...] [--resume]
    fastjac table RUN_DIR                          markdown table shaped like the paper's
    fastjac plot RUN_DIR                           PNG curves
    fastjac demo                                   E1 on scikit-learn digits (the main job)
    fastjac synth DIR                              synthetic data for the smoke configs (--data-root DIR)
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

from .training.config import CONFIG_DIR, resolve_config  # noqa: F401 - part of the CLI's interface


def _list(_args) -> int:
    import yaml

    for path in sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))):
        with open(path) as f:
            desc = (yaml.safe_load(f) or {}).get("description", "")
        print(f"{os.path.basename(path)[:-5]:<32} {desc.strip().splitlines()[0] if desc.strip() else ''}")
    return 0


def _init_distributed(device: str) -> str:
    """Join the ``torchrun`` process group when there is one: NCCL for CUDA runs, each rank on its own GPU
    (``cuda:LOCAL_RANK``), Gloo for CPU runs (also on machines that have a GPU). Returns this rank's device."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if torch.device(device).type == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return device


def check_device(name: str) -> str:
    """``name`` as a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``), checked before any
    data is loaded; otherwise a ValueError naming ``--device`` and what there is."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: {name!r} is not a torch device; expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device: {name!r} is not supported; expected cpu, cuda, cuda:N or mps")
    return name


def _run(args) -> int:
    from .experiments.runner import run_experiment  # first: registers the evaluations the config may list
    from .training import config as config_io

    check_device(args.device)
    path = resolve_config(args.config)
    out = args.out or os.path.join("runs", os.path.basename(path)[:-5])
    if args.resume and not os.path.exists(out):
        raise FileNotFoundError(f"--resume: {out!r} does not exist, so there is nothing to resume; run without "
                                "--resume to start it")
    cfg = config_io.load(path, args.set)
    device = _init_distributed(args.device)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    results = run_experiment(cfg, out, data_root=args.data_root, resume=args.resume,
                             progress=not args.no_progress, device=device,
                             log=print if rank == 0 else (lambda *_: None), overrides=args.set)
    if rank == 0:
        from .training.report import table

        if results:  # epochs: 0 trains nothing: only the evaluations' tables (OUT/evaluations/<name>/)
            print(table(out))
        print(f"results in {out}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if results or cfg.evaluations else 1


def _table(args) -> int:
    from .training.report import table

    print(table(args.run_dir))
    return 0


def _plot(args) -> int:
    from .training.report import plot, plot_noise

    print(plot(args.run_dir, args.output))
    if args.output is None:  # E2 runs: accuracy against the noise std, one line per method
        for batch_stats in (False, True):
            path = plot_noise(args.run_dir, batch_stats=batch_stats)
            if path:
                print(path)
    return 0


def _demo(args) -> int:
    from .experiments.demo import main

    return main(out=args.out, quick=args.quick)


def _synth(args) -> int:
    from .training.synthetic import write_smoke_data

    if os.path.exists(args.dir) and not os.path.isdir(args.dir):
        raise FileNotFoundError(f"synth: {args.dir!r} is a file; expected a directory")
    for path in write_smoke_data(args.dir):
        print(path)
    print(f"synthetic data for the smoke configs in {args.dir}: fastjac run smoke_e1 --data-root {args.dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastjac", description="Jacobian-based training experiments")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the bundled experiment configs").set_defaults(fn=_list)
    p = sub.add_parser("run", help="train every run of a config")
    p.add_argument("config")
    p.add_argument("--data-root", default=None, help="folder holding the datasets (nothing is downloaded)")
    p.add_argument("--out", default=None, help="run directory (default runs/<config name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoints")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=_run)
    p = sub.add_parser("table", help="markdown table of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(fn=_table)
    p = sub.add_parser("plot", help="PNG curves of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--output", default=None)
    p.set_defaults(fn=_plot)
    p = sub.add_parser("demo", help="E1 (Jacobian-matching distillation) on scikit-learn digits")
    p.add_argument("--out", default=None, help="output folder (default runs/demo, or runs/demo-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a reduced run (seconds) of the same code path")
    p.set_defaults(fn=_demo)
    p = sub.add_parser("synth", help="write synthetic data for the smoke configs (then --data-root DIR)")
    p.add_argument("dir")
    p.set_defaults(fn=_synth)
    args = parser.parse_args(argv)
    from .training.checkpoint import CheckpointError

    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError, CheckpointError, FloatingPointError) as exc:
        print(f"fastjac {args.command}: error: {exc}", file=sys.stderr)
        return 2
