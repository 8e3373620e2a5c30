"""An experiment's runs (its teacher first, then every cell of its sweep) and the checks made before the first of
them trains: every ``--set`` override takes effect in some run, every run's data holds its subset and gives
optimiser steps, and the output directory holds nothing stale (a finished or unfinished run, or an evaluation,
of a different config). A check that fails raises before anything is trained or written.

Layout: ``OUT/teacher/`` (when the config trains its teacher), ``OUT/<method>/pc<k>/seed<s>/`` per cell
(:func:`fastjac.training.layout.cell_dir`), ``OUT/evaluations/<name>/``, ``OUT/experiment.yaml``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from ..training import checkpoint as ckpt_io
from ..training import config as config_io
from ..training import data as data_io
from ..training import teacher_jacobians
from ..training import terms as loss_terms
from ..training.config import ConfigError, RunConfig
from ..training.layout import cell_dir
from ..training.trainer import config_changes, load_split_labels


@dataclass
class Run:
    """One training run of the experiment: the teacher (``cell`` None) or a cell of the sweep."""

    cell: Optional[dict]
    config: RunConfig
    run_dir: str

    @property
    def name(self) -> str:
        return self.config.name


def teacher_config(cfg: RunConfig) -> RunConfig:
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
    except ConfigError as exc:
        raise ConfigError(f"teacher.train: {exc}") from exc


def trains_teacher(cfg: RunConfig) -> bool:
    return cfg.teacher is not None and cfg.teacher.train is not None and cfg.teacher.checkpoint is None


def with_teacher(cfg: RunConfig, out: str) -> RunConfig:
    """``cfg`` with ``teacher.checkpoint`` pointing at the teacher that the experiment trains in ``out``."""
    if not trains_teacher(cfg):
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.teacher.checkpoint = os.path.normpath(os.path.join(out, "teacher"))
    return cfg


def plan(cfg: RunConfig, out: str) -> list[Run]:
    """The experiment's runs in training order (every cell's config validated: a bad cell fails here)."""
    runs = [Run(None, teacher_config(cfg), os.path.join(out, "teacher"))] if trains_teacher(cfg) else []
    return runs + [Run(cell, run_cfg, cell_dir(out, cell)) for cell, run_cfg in config_io.expand(with_teacher(cfg, out))]


_LABELS = ("name", "description")  # fields that name runs rather than configure them

#: Fields that act only under some value of another: ``--set`` of one on runs where it does nothing is an error.
INERT: dict[str, tuple[str, Any]] = {
    "optim.momentum": ("applies to optim.name sgd only", lambda c: c.optim.name != "sgd"),
    "optim.nesterov": ("applies to optim.name sgd only", lambda c: c.optim.name != "sgd"),
    "schedule.milestones": ("applies to schedule.name multistep only", lambda c: c.schedule.name != "multistep"),
    "schedule.gamma": ("applies to schedule.name multistep only", lambda c: c.schedule.name != "multistep"),
    "data.crop_padding": ("applies with data.augment true only", lambda c: not c.data.augment),
    "data.flip": ("applies with data.augment true only", lambda c: not c.data.augment),
    "data.test_fraction": ("applies to data.dataset digits only", lambda c: c.data.dataset != "digits"),
    "data.subset_seed": ("applies with data.per_class only", lambda c: c.data.per_class is None),
    "teacher.cache_jacobians": ("applies with a jacobian_matching term and data.augment false only",
                                lambda c: not teacher_jacobians.may_cache(c)),
}


def check_overrides(runs: list[Run], overrides: list[str]) -> None:
    """Every ``--set key=value`` must take effect in at least one run (e.g. ``loss.<term>`` on a config whose
    sweep methods all define their own ``loss``, ``data.per_class`` under ``sweep.per_class``, or
    ``optim.momentum`` with Adam, is an error naming the key). ``sweep.*`` and ``evaluations.*`` keys are
    checked by validation instead."""
    for key, value in config_io.parse_overrides(overrides):
        top = key.split(".")[0]
        if top in _LABELS or top in ("sweep", "evaluations"):
            continue
        found, effective = [], False
        why, inert = INERT.get(key, ("", lambda c: False))
        for run in runs:
            try:
                found.append(config_io.get(run.config, key))
            except (AttributeError, KeyError, TypeError):
                continue
            effective = effective or (found[-1] == value and not inert(run.config))
        if value in found and not effective:
            raise ConfigError(f"{key}: --set {key}={value!r} has no effect in any run of this experiment ({why})")
        if not effective:
            raise ConfigError(f"{key}: --set {key}={value!r} takes effect in no run of this experiment (every run "
                              f"replaces it: a sweep method's own settings, sweep.per_class / sweep.seeds, or the "
                              f"teacher's training settings; values used: {found}); set it in sweep.methods.<method> "
                              "or teacher.train instead")


def _stale(run: Run, resume: bool) -> None:
    """A run directory holds nothing of another config (and, without ``resume``, no run at all)."""
    d = run.run_dir
    if os.path.exists(d) and not os.path.isdir(d):
        raise FileNotFoundError(f"{d!r} is a file, where run {run.name!r} needs a directory")
    held = [f for f in ("result.json", "checkpoint.pt") if os.path.isfile(os.path.join(d, f))]
    if held and not resume:
        raise ckpt_io.CheckpointError(f"{d!r} already holds a run ({', '.join(held)}); pass --resume to continue or "
                                      "reuse it, or choose another --out")
    if resume:
        check_trained_config(run.config, d, finished="result.json" in held)
    if resume and "result.json" in held:
        ckpt_io.read_json(os.path.join(d, "result.json"))  # a truncated file is an error naming it


def check_trained_config(cfg: RunConfig, run_dir: str, finished: bool) -> None:
    """The config a run directory was trained with (its ``config.yaml``) is ``cfg``: otherwise a
    :class:`~fastjac.training.checkpoint.CheckpointError` naming the differing fields (a finished run without a
    ``config.yaml`` is refused too; an unfinished one is checked against its checkpoint by the trainer)."""
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        diff = ["<no config.yaml>"] if finished else []
    else:
        with open(config_path) as f:
            trained = config_io.yaml_load(f)
        diff = config_changes(trained, cfg) if isinstance(trained, dict) else ["<all>"]
    if diff:
        raise ckpt_io.CheckpointError(
            f"{run_dir!r} holds {'a finished' if finished else 'an unfinished'} run of a different config (fields "
            f"{diff}); rerun without --resume into another --out directory, or delete that run to retrain it")


def _check_data(run: Run, data_root: Optional[str], world: int, cache: dict) -> None:
    """The run's training subset exists (``data.per_class`` within what each class holds) and gives optimiser
    steps with this many processes; ``teacher.cache_jacobians: true`` fits the cache's size cap."""
    cfg, d = run.config, run.config.data
    per_step = 2 * world * cfg.accumulate  # BatchNorm needs 2 examples per micro-batch on every rank
    if d.batch_size < per_step:
        raise ConfigError(f"{run.name}: data.batch_size {d.batch_size} is too small for {world} process(es) x "
                          f"accumulate {cfg.accumulate} (BatchNorm needs 2 examples per micro-batch): at least {per_step}")
    key = json.dumps([dataclasses.asdict(d) | {"per_class": None, "subset_seed": None}, data_root], sort_keys=True)
    if key not in cache:
        cache[key] = load_split_labels(cfg, "train", data_root)
    labels = cache[key]
    seed = cfg.seed if d.subset_seed is None else d.subset_seed
    try:
        n = len(data_io.stratified_subset(labels, d.per_class, seed))
    except ValueError as exc:
        raise ConfigError(f"{run.name}: data.per_class: {exc}") from exc
    if cfg.teacher is not None:  # `teacher.cache_jacobians: true` over the size cap
        try:
            teacher_jacobians.use_cache(cfg.teacher.cache_jacobians, d.augment,
                                        teacher_jacobians.matched_classes(loss_terms.parse(cfg.loss)), n,
                                        config_io.input_shape(d))
        except ConfigError as exc:
            raise ConfigError(f"{run.name}: {exc}") from exc
    examples = d.epoch_size or n
    if n == 0 or examples // d.batch_size + (examples % d.batch_size >= per_step) == 0:
        raise ConfigError(f"{run.name}: data.batch_size {d.batch_size}: {examples} training examples per epoch give 0 "
                          f"optimiser steps (a batch needs {per_step}); lower data.batch_size or use more data")


def check_runs(cfg: RunConfig, runs: list[Run], resume: bool, data_root: Optional[str], world: int) -> None:
    """Everything about the runs that can fail before training: stale directories, data, teacher checkpoint."""
    if world > 1 and cfg.evaluations:
        raise ConfigError(f"evaluations: not supported under torchrun ({world} processes); run this config in one "
                          "process")
    if cfg.teacher is not None and cfg.teacher.checkpoint is not None and "{data_root}" not in cfg.teacher.checkpoint:
        path = cfg.teacher.checkpoint
        if not os.path.exists(os.path.join(path, "model.pt") if os.path.isdir(path) else path):
            raise FileNotFoundError(f"teacher.checkpoint: {path!r} is neither a run directory with a model.pt nor a "
                                    "weights file")
    cache: dict[str, Any] = {}
    for run in runs:
        if run.config.epochs == 0:
            continue
        _stale(run, resume)
        _check_data(run, data_root, world, cache)


def check_evaluations(cfg: RunConfig, out: str, resume: bool) -> None:
    """With ``resume``, an evaluation whose table exists is reused only if it ran with the options asked for now."""
    for name, spec in cfg.evaluations.items() if resume else ():
        folder = os.path.join(out, "evaluations", name)
        if not os.path.isfile(os.path.join(folder, "table.csv")):
            continue
        options = dataclasses.asdict(config_io.parse_evaluation_options(name, spec))
        path = os.path.join(folder, "options.json")
        used = ckpt_io.read_json(path) if os.path.isfile(path) else None
        diff = ckpt_io.config_differences(json.loads(json.dumps(used)), json.loads(json.dumps(options)))
        if diff:
            raise ckpt_io.CheckpointError(
                f"{folder!r} holds evaluation {name!r} run with other options (evaluations.{name}: {diff}); rerun "
                "without --resume into another --out directory, or delete that folder to recompute it")
