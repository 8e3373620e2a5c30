"""Running a whole config (its teacher first, then all cells of its sweep, then its evaluations) into an output
directory (layout: :mod:`fastjac.experiments.plan`; ``OUT/experiment.yaml`` is the config as given, for
``fastjac table``).

Every check of :mod:`.plan` runs before the first training step and before anything is written. With
``--resume``, a finished cell (a ``result.json``) is reused only when the config it was trained with (its
``config.yaml``) is the one asked for now; otherwise the run stops with an error naming the differing fields,
as an unfinished checkpoint does. So rerunning a config after a crash continues where it stopped, and never
mixes runs of different configs.

Under ``torchrun`` every rank runs the same runs; rank 0 alone writes the experiment's files, and the ranks
wait for each other after each run (:func:`fastjac.training.distributed.barrier`), so no rank reads a teacher
or a result before rank 0 has written it.
"""
from __future__ import annotations

import os
from typing import Any

import yaml

from ..evaluation.registry import Cell, EvalContext, run_evaluations
from ..training import checkpoint as ckpt_io
from ..training.config import RunConfig
from ..training.distributed import barrier, rank_and_world
from ..training.trainer import Trainer
from .plan import check_evaluations, check_overrides, check_runs, check_trained_config, plan


def run_experiment(cfg: RunConfig, out: str, data_root: str | None = None, resume: bool = False,
                   progress: bool = True, device: str = "cpu", log=print,
                   overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """Train every run of ``cfg`` (teacher first if ``teacher.train``), then run ``cfg.evaluations`` on the
    trained runs (``OUT/evaluations/<name>/``); returns one result per cell. ``epochs: 0`` trains nothing:
    the evaluations see the configured models (e.g. pretrained weights). ``overrides``: the ``--set`` items
    ``cfg`` was loaded with (each must take effect in some run)."""
    rank, world = rank_and_world()
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileNotFoundError(f"--out {out!r} is a file; expected a directory (it is created if missing)")
    runs = plan(cfg, out)
    check_overrides(runs, overrides or [])
    check_runs(cfg, runs, resume, data_root, world)
    check_evaluations(cfg, out, resume)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "experiment.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        for run in runs:
            if run.cell is not None:
                os.makedirs(run.run_dir, exist_ok=True)
                ckpt_io.write_json_atomic(run.cell, os.path.join(run.run_dir, "cell.json"))  # the method's name
    barrier()
    results, cells = [], []
    for run in runs:
        if run.cell is not None:
            cells.append(Cell(run.cell["method"], run.cell["per_class"], run.cell["seed"], run.run_dir, run.config))
        if run.config.epochs == 0:
            continue
        result = _run_one(run.config, run.run_dir, data_root, resume, progress, device, log)
        barrier()  # the teacher's model.pt, a cell's result.json: written by rank 0 before any rank goes on
        if run.cell is not None:
            results.append({**run.cell, **result})
    if cfg.evaluations:
        ctx = EvalContext(cfg, out, cells, data_root=data_root, device=device, log=log, progress=progress,
                          resume=resume)
        run_evaluations(ctx, cfg.evaluations, resume=resume)
    return results


def finished_result(cfg: RunConfig, run_dir: str) -> dict[str, Any] | None:
    """The result of a finished run of ``cfg`` in ``run_dir``, or None if it has none; a finished run of a
    different config is an error naming the fields that differ (checked for every run before training starts,
    :func:`fastjac.experiments.plan.check_runs`; checked again here, where the result is read)."""
    result_path = os.path.join(run_dir, "result.json")
    if not os.path.isfile(result_path):
        return None
    check_trained_config(cfg, run_dir, finished=True)
    return ckpt_io.read_json(result_path)


def _run_one(cfg: RunConfig, run_dir: str, data_root, resume, progress, device, log) -> dict[str, Any]:
    done = finished_result(cfg, run_dir) if resume else None
    if done is not None:
        log(f"[done] {cfg.name}")
        return done
    result = Trainer(cfg, run_dir, data_root=data_root, device=device, progress=progress).run(resume=resume)
    log(f"[{cfg.name}] test accuracy {result.get('test_acc', float('nan')):.2f} %")
    return result
