"""How evaluations plug into experiments: a registry, the context they run in, and their outputs.

An experiment config lists evaluations by name under ``evaluations:`` (``{name: {option: value}}``). Each
registered evaluation declares a dataclass of options (validated like the rest of the config: unknown or
mistyped options raise a :class:`~fastjac.training.config.ConfigError` naming ``evaluations.<name>.<option>``)
and a function ``fn(ctx, options) -> rows``. After the experiment's runs are trained, :func:`run_evaluations`
calls each one and writes ``OUT/evaluations/<name>/table.csv`` (the rows) and, if the evaluation has a
``plot``, ``OUT/evaluations/<name>/plot.png``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..training import config as config_io
from ..training import data as data_io
from ..training.config import RunConfig
from ..training.models import build_model

__all__ = ["Evaluation", "EVALUATIONS", "register", "parse_options", "Cell", "EvalContext", "run_evaluations",
           "write_table"]


@dataclass
class Evaluation:
    name: str
    fn: Callable[["EvalContext", Any], list[dict]]
    options: type                                   # a dataclass; defaults = the paper's settings
    plot: Optional[Callable[[list[dict], str], None]] = None   # (rows, png_path)


EVALUATIONS: dict[str, Evaluation] = {}


def register(name: str, options: type, plot: Optional[Callable] = None):
    """Decorator registering ``fn(ctx, options) -> list[dict]`` as the evaluation ``name``."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"evaluation {name!r}: options must be a dataclass type")

    def wrap(fn):
        if name in EVALUATIONS:
            raise ValueError(f"evaluation {name!r} is registered twice")
        EVALUATIONS[name] = Evaluation(name, fn, options, plot)
        config_io.EVALUATION_OPTIONS[name] = options  # what config validation checks ``evaluations`` against
        return fn
    return wrap


parse_options = config_io.parse_evaluation_options  # the options dataclass of an evaluation from its mapping


@dataclass
class Cell:
    """One trained run of the experiment: its sweep coordinates, directory and resolved config."""

    method: str
    per_class: Optional[int]
    seed: int
    run_dir: str
    config: RunConfig


class EvalContext:
    """What an evaluation sees: the experiment config, its trained runs, data, device and output folder."""

    def __init__(self, cfg: RunConfig, out: str, cells: list[Cell], data_root: str | None = None,
                 device: str = "cpu", log: Callable = print, progress: bool = False, resume: bool = False):
        self.cfg, self.out, self.cells = cfg, out, cells
        self.data_root, self.device, self.log, self.progress = data_root, torch.device(device), log, progress
        self.resume = resume  # evaluations that train (ROAR) skip finished runs and continue killed ones

    def cell(self, method: str, seed: Optional[int] = None) -> Cell:
        """The run of ``method`` (the first seed unless ``seed`` is given); errors list the methods there are."""
        for c in self.cells:
            if c.method == method and (seed is None or c.seed == seed):
                return c
        raise ValueError(f"no trained run of method {method!r}{'' if seed is None else f' seed {seed}'} in this "
                         f"experiment; methods: {sorted({c.method for c in self.cells})}")

    def model(self, cell: Cell) -> nn.Module:
        """The run's model in eval mode on the device: its trained ``model.pt``, or (experiments with
        ``epochs: 0``) the model the config describes, pretrained weights included."""
        from ..training.trainer import model_spec

        root = self.data_root if self.data_root is not None else cell.config.data.root
        spec = model_spec(cell.config.model, root)  # {data_root} in weights, as in teacher.checkpoint
        path = os.path.join(cell.run_dir, "model.pt")
        if os.path.isfile(path):
            spec["weights"] = path
        elif cell.config.epochs > 0:
            raise FileNotFoundError(f"run {cell.run_dir!r} has no model.pt: train it first (fastjac run)")
        return build_model(spec).to(self.device).eval()

    def data(self, cell: Cell):
        """The run's :class:`~fastjac.training.trainer.RunData` (images in [0, 1], the run's training subset)."""
        from ..training.trainer import load_run_data

        return load_run_data(cell.config, self.data_root)

    def normalize(self, images: torch.Tensor, cell: Cell) -> torch.Tensor:
        """Images in [0, 1] -> the network's input, as the trainer feeds it."""
        return data_io.normalize(images, cell.config.data.dataset)

    def folder(self, name: str) -> str:
        path = os.path.join(self.out, "evaluations", name)
        os.makedirs(path, exist_ok=True)
        return path


def write_table(rows: list[dict], path: str) -> None:
    """Rows -> CSV (columns in first-seen order), written atomically."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def run_evaluations(ctx: EvalContext, specs: dict[str, Any], resume: bool = False) -> dict[str, list[dict]]:
    """Run every evaluation in ``specs`` (``{name: options}``); returns ``{name: rows}``. With ``resume``, an
    evaluation whose ``table.csv`` exists is not run again."""
    results = {}
    for name, spec in specs.items():
        options = parse_options(name, spec)
        folder = ctx.folder(name)
        table = os.path.join(folder, "table.csv")
        if resume and os.path.isfile(table):
            ctx.log(f"[done] evaluation {name}")
            with open(table) as f:
                results[name] = list(csv.DictReader(f))
            continue
        ctx.log(f"[evaluation] {name}")
        rows = EVALUATIONS[name].fn(ctx, options)
        with open(os.path.join(folder, "options.json"), "w") as f:
            json.dump(dataclasses.asdict(options), f, indent=1)
        if EVALUATIONS[name].plot is not None and rows:
            EVALUATIONS[name].plot(rows, os.path.join(folder, "plot.png"))
        write_table(rows, table)
        results[name] = rows
    return results
