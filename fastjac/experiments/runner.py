"""Running a whole config (all cells of its sweep, and its teacher first) into an output directory.

Layout: ``OUT/teacher/`` (when the config trains its teacher), ``OUT/<method>/pc<k>/seed<s>/`` per cell, and
``OUT/experiment.yaml`` (the config as given, for ``fastjac table``). With ``--resume``, a finished cell (a
``result.json``) is reused only when the config it was trained with (its ``config.yaml``) is the one asked for
now; otherwise the run stops with an error naming the differing fields, as an unfinished checkpoint does. So
rerunning a config after a crash continues where it stopped, and never mixes runs of different configs.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import yaml

from ..evaluation.registry import Cell, EvalContext, run_evaluations
from ..training import checkpoint as ckpt_io
from ..training import config as config_io
from ..training.config import RunConfig
from ..training.trainer import Trainer


def cell_dir(out: str, cell: dict) -> str:
    """``OUT/<method>/pc<k>/seed<s>``; the method name is made a safe folder name (``cell.json`` keeps it)."""
    pc = cell["per_class"] if cell["per_class"] is not None else "all"
    safe = "".join(ch if ch.isalnum() or ch in "+-=.,()" else "_" for ch in str(cell["method"]).replace(" ", ""))
    return os.path.join(out, safe, f"pc{pc}", f"seed{cell['seed']}")


def _teacher_config(cfg: RunConfig) -> RunConfig:
    """The run that trains the teacher: the base config with ``teacher.train`` overrides (full training set)."""
    base = cfg.to_dict()
    base.update(sweep=None, teacher=None, evaluations={}, name=f"{cfg.name}/teacher")
    base["data"]["per_class"] = None
    base["model"] = copy.deepcopy(cfg.teacher.model or cfg.model)
    base["loss"] = {"ce": 1.0}
    base["eval"] = {}
    for key, value in (cfg.teacher.train or {}).items():
        if key == "loss":
            base["loss"] = copy.deepcopy(value)
        else:
            config_io.set_dotted(base, key, copy.deepcopy(value))
    try:
        return config_io.validate(config_io.from_dict(RunConfig, base))
    except config_io.ConfigError as exc:
        raise config_io.ConfigError(f"teacher.train: {exc}") from exc


def trains_teacher(cfg: RunConfig) -> bool:
    return cfg.teacher is not None and cfg.teacher.train is not None and cfg.teacher.checkpoint is None


def with_teacher(cfg: RunConfig, out: str) -> RunConfig:
    """``cfg`` with ``teacher.checkpoint`` pointing at the teacher that ``run_experiment`` trains in ``out``."""
    if not trains_teacher(cfg):
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.teacher.checkpoint = os.path.normpath(os.path.join(out, "teacher"))
    return cfg


def run_experiment(cfg: RunConfig, out: str, data_root: str | None = None, resume: bool = False,
                   progress: bool = True, device: str = "cpu", log=print) -> list[dict[str, Any]]:
    """Train every run of ``cfg`` (teacher first if ``teacher.train``), then run ``cfg.evaluations`` on the
    trained runs (``OUT/evaluations/<name>/``); returns one result per cell. ``epochs: 0`` trains nothing:
    the evaluations see the configured models (e.g. pretrained weights)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "experiment.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    if trains_teacher(cfg):
        _run_one(_teacher_config(cfg), os.path.join(out, "teacher"), data_root, resume, progress, device, log)
    cfg = with_teacher(cfg, out)
    results, cells = [], []
    for cell, run_cfg in config_io.expand(cfg):
        run_dir = cell_dir(out, cell)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "cell.json"), "w") as f:  # the method's real name, for tables
            json.dump(cell, f)
        cells.append(Cell(cell["method"], cell["per_class"], cell["seed"], run_dir, run_cfg))
        if run_cfg.epochs == 0:
            continue
        result = _run_one(run_cfg, run_dir, data_root, resume, progress, device, log)
        results.append({**cell, **result})
    if cfg.evaluations:
        ctx = EvalContext(cfg, out, cells, data_root=data_root, device=device, log=log, progress=progress,
                          resume=resume)
        run_evaluations(ctx, cfg.evaluations, resume=resume)
    return results


def finished_result(cfg: RunConfig, run_dir: str) -> dict[str, Any] | None:
    """The result of a finished run of ``cfg`` in ``run_dir``, or None if it has none; a finished run of a
    different config is an error naming the fields that differ."""
    result_path = os.path.join(run_dir, "result.json")
    if not os.path.isfile(result_path):
        return None
    config_path = os.path.join(run_dir, "config.yaml")
    trained = None
    if os.path.isfile(config_path):
        with open(config_path) as f:
            trained = yaml.safe_load(f)
    diff = ckpt_io.config_differences(trained, cfg.to_dict()) if isinstance(trained, dict) else ["<no config.yaml>"]
    if diff:
        raise ckpt_io.CheckpointError(
            f"{run_dir!r} holds a finished run of a different config (fields {diff}); rerun without --resume "
            "into another --out directory, or delete that run to retrain it")
    with open(result_path) as f:
        return json.load(f)


def _run_one(cfg: RunConfig, run_dir: str, data_root, resume, progress, device, log) -> dict[str, Any]:
    done = finished_result(cfg, run_dir) if resume else None
    if done is not None:
        log(f"[done] {cfg.name}")
        return done
    result = Trainer(cfg, run_dir, data_root=data_root, device=device, progress=progress).run(resume=resume)
    log(f"[{cfg.name}] test accuracy {result.get('test_acc', float('nan')):.2f} %")
    return result
