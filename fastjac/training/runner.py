"""Running a whole config (all cells of its sweep, and its teacher first) into an output directory.

Layout: ``OUT/teacher/`` (when the config trains its teacher), ``OUT/<method>/pc<k>/seed<s>/`` per cell, and
``OUT/experiment.yaml`` (the config as given, for ``fastjac table``). Finished cells (a ``result.json``) are
skipped, so rerunning a config with ``--resume`` after a crash continues where it stopped.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import yaml

from . import config as config_io
from .config import RunConfig
from .trainer import Trainer


def cell_dir(out: str, cell: dict) -> str:
    pc = cell["per_class"] if cell["per_class"] is not None else "all"
    return os.path.join(out, str(cell["method"]).replace("/", "_").replace(" ", ""), f"pc{pc}", f"seed{cell['seed']}")


def _teacher_config(cfg: RunConfig) -> RunConfig:
    """The run that trains the teacher: the base config with ``teacher.train`` overrides (full training set)."""
    base = cfg.to_dict()
    base.update(sweep=None, teacher=None, name=f"{cfg.name}/teacher")
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


def run_experiment(cfg: RunConfig, out: str, data_root: str | None = None, resume: bool = False,
                   progress: bool = True, device: str = "cpu", log=print) -> list[dict[str, Any]]:
    """Train every run of ``cfg`` (teacher first if ``teacher.train``); returns one result per cell."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "experiment.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    if cfg.teacher is not None and cfg.teacher.train is not None and cfg.teacher.checkpoint is None:
        teacher_dir = os.path.join(out, "teacher")
        _run_one(_teacher_config(cfg), teacher_dir, data_root, resume, progress, device, log)
        cfg = copy.deepcopy(cfg)
        cfg.teacher.checkpoint = teacher_dir
    results = []
    for cell, run_cfg in config_io.expand(cfg):
        result = _run_one(run_cfg, cell_dir(out, cell), data_root, resume, progress, device, log)
        results.append({**cell, **result})
    return results


def _run_one(cfg: RunConfig, run_dir: str, data_root, resume, progress, device, log) -> dict[str, Any]:
    result_path = os.path.join(run_dir, "result.json")
    if resume and os.path.isfile(result_path):
        with open(result_path) as f:
            log(f"[done] {cfg.name}")
            return json.load(f)
    result = Trainer(cfg, run_dir, data_root=data_root, device=device, progress=progress).run(resume=resume)
    log(f"[{cfg.name}] test accuracy {result.get('test_acc', float('nan')):.2f} %")
    return result
